/*
 * test_api.c: the C API without jobs: versions, result names, error objects, NULL arguments
 * and misuse of every object, configuration from code and from the environment, executor
 * tables, the agent's life cycle and its HTTP endpoints without an orchestrator.
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"

/* Nothing listens here: the agent keeps retrying in the background. */
#define DEAD_URL "ws://127.0.0.1:9/ws"

static atomic_int finalized;

static void count_finalize(void *user_data) {
    (void)user_data;
    atomic_fetch_add(&finalized, 1);
}

static int succeed(void *user_data, const char *job_json, const char *step_json,
                   kici_step_context *context) {
    (void)user_data;
    (void)job_json;
    (void)step_json;
    (void)context;
    return 0;
}

static kici_config *dead_config(void) {
    kici_config *config = NULL;
    kici_error *err = NULL;
    CHECK_CODE(KICI_RESULT_OK, kici_config_new(&config, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_ORCHESTRATOR_URL", DEAD_URL, &err),
               err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_PORT", "0", &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_BIND_ADDRESS", "127.0.0.1", &err),
               err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_SHUTDOWN_GRACE_MS", "500", &err), err);
    return config;
}

static kici_agent *dead_agent(void) {
    kici_config *config = dead_config();
    kici_agent *agent = NULL;
    kici_error *err = NULL;
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    return agent;
}

static kici_executor_vtable table(void *user_data, void (*finalize)(void *)) {
    kici_executor_vtable vtable;
    memset(&vtable, 0, sizeof vtable);
    vtable.struct_size = sizeof vtable;
    vtable.user_data = user_data;
    vtable.run_step = succeed;
    vtable.free_user_data = finalize;
    return vtable;
}

static void test_version_and_result_names(void) {
    char expected[32];
    CHECK(strcmp(kici_version(), KICI_AGENT_VERSION) == 0);
    snprintf(expected, sizeof expected, "%d.%d.%d", KICI_AGENT_VERSION_MAJOR,
             KICI_AGENT_VERSION_MINOR, KICI_AGENT_VERSION_PATCH);
    CHECK(strcmp(expected, KICI_AGENT_VERSION) == 0);
    CHECK(KICI_RESULT_OK == 0);
    CHECK(strcmp(kici_result_str(KICI_RESULT_OK), "KICI_RESULT_OK") == 0);
    CHECK(strcmp(kici_result_str(KICI_RESULT_NULL_ARGUMENT), "KICI_RESULT_NULL_ARGUMENT") == 0);
    CHECK(strcmp(kici_result_str(KICI_RESULT_PANIC), "KICI_RESULT_PANIC") == 0);
    CHECK(strcmp(kici_result_str(12345), "KICI_RESULT_UNKNOWN") == 0);
}

static void test_error_objects(void) {
    kici_error *err = NULL;
    kici_config *config = NULL;
    CHECK(kici_config_new(&config, &err) == KICI_RESULT_OK);
    CHECK(err == NULL); /* untouched on success */
    CHECK(kici_config_validate(config, &err) == KICI_RESULT_INVALID_CONFIG);
    CHECK(err != NULL);
    CHECK(kici_error_code(err) == KICI_RESULT_INVALID_CONFIG);
    CHECK(strstr(kici_error_message(err), "KICI_ORCHESTRATOR_URL") != NULL);
    kici_error_free(err);
    /* Without an error pointer the code alone is reported. */
    CHECK(kici_config_validate(config, NULL) == KICI_RESULT_INVALID_CONFIG);
    CHECK(kici_error_code(NULL) == KICI_RESULT_NULL_ARGUMENT);
    CHECK(strcmp(kici_error_message(NULL), "") == 0);
    kici_error_free(NULL);
    kici_string_free(NULL);
    kici_config_free(config);
}

static void test_null_arguments_are_errors(void) {
    kici_error *err = NULL;
    kici_config *config = dead_config();
    kici_agent *agent = dead_agent();
    kici_executor_vtable vtable = table(NULL, NULL);
    kici_executor *executor = NULL;
    const char *text = NULL;
    char *owned = NULL;
    size_t count = 0;
    uint16_t port = 0;
    const char *labels[] = {"a", NULL};

    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_new(NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_from_env(NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_validate(NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_set(NULL, "KICI_PORT", "1", &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_set(config, NULL, "1", &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_set(config, "KICI_ORCHESTRATOR_URL", NULL,
                                                          &err),
               err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_set_labels(config, NULL, 1, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_set_labels(config, labels, 2, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set_labels(config, NULL, 0, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_set_property(config, "k", NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_warning_count(config, NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_config_warning(NULL, 0, &text, &err), err);

    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_executor_new(NULL, "x", &executor, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_executor_new(&vtable, NULL, &executor, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_executor_new(&vtable, "x", NULL, &err), err);
    CHECK(executor == NULL);

    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_new(NULL, &agent, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_new(config, NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_register_default_executor(agent, NULL, &err),
               err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_register_step_executor(NULL, "s", NULL, &err),
               err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_start(NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_drain(NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_shutdown(NULL, 0, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_wait(NULL, 0, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_next_event(NULL, 0, &owned, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_next_event(agent, 0, NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_metrics(NULL, &owned, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_http_port(agent, NULL, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_http_port(NULL, &port, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_agent_id(NULL, &text, &err), err);
    CHECK(owned == NULL && port == 0);

    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_write_line(NULL, "x", &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_write(NULL, NULL, 0, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_set_output(NULL, "k", "v", &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_set_output_json(NULL, "k", "1", &err),
               err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT,
               kici_step_context_set_secret_output(NULL, "k", "v", &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_set_failure(NULL, "m", &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_workspace(NULL, &text, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_env(NULL, "PATH", &text, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT, kici_step_context_env_count(NULL, &count, &err), err);
    CHECK_CODE(KICI_RESULT_NULL_ARGUMENT,
               kici_step_context_env_entry(NULL, 0, &text, &text, &err), err);
    CHECK(kici_step_context_is_cancelled(NULL));

    /* Freeing NULL is a no-op for every object. */
    kici_config_free(NULL);
    kici_executor_free(NULL);
    kici_agent_free(NULL);
    kici_agent_free(agent);
    kici_config_free(config);
}

static void test_configuration_from_code(void) {
    kici_config *config = dead_config();
    kici_agent *agent = NULL;
    kici_error *err = NULL;
    const char *good_labels[] = {"gpu", "linux-x"};
    const char *reserved_labels[] = {"kici:os:linux"};
    const char *id = NULL;
    /* Every setting by its variable or its key, text read like the environment. */
    const char *settings[][2] = {
        {"KICI_AGENT_ID", "c-api-agent"},  {"log_level", "debug"},
        {"KICI_LOG_FORMAT", "json"},       {"token", "kat_x"},
        {"KICI_GITHUB_TOKEN", ""},         {"KICI_MAX_LOG_SIZE_BYTES", "1048576"},
        {"default_step_timeout", "60000"}, {"KICI_DOCKER_KEEP_FAILED", "true"},
        {"KICI_JOB_HEARTBEAT_INTERVAL_MS", "1000"},
        {"KICI_HEARTBEAT_INTERVAL_MS", "1000"},
        {"KICI_BACKPRESSURE_MODE", "drop"}, {"KICI_SANDBOX", "false"},
        {"KICI_SANDBOX_NETWORK", "host"},   {"KICI_SCALER_MANAGED", "0"},
        {"KICI_SCALER_IDLE_TIMEOUT", "0"},  {"KICI_SCALER_PENDING_DISPATCH_TIMEOUT", "0"},
        {"KICI_EXECUTION_MODE", "bare-metal"},
        {"KICI_CONCURRENCY_WAIT_TIMEOUT_MS", "5000"},
        {"KICI_AGENT_IS_ORCHESTRATOR_HOST", "true"},
        {"max_concurrency", "2"},          {"KICI_CANCEL_GRACE_MS", "100"},
        {"KICI_STEP_MAP", ""},             {"KICI_PROCESS_EXECUTOR", ""},
        {"KICI_CONTAINER_IMAGE", "alpine:3"},
        {"KICI_DEV", "false"},             {"KICI_JOB_PIDS_MAX", "256"},
        {"KICI_LOG_DIR", "/tmp"},          {"KICI_LOG_MAX_SIZE", "10m"},
        {"KICI_LOG_RETENTION_DAYS", "2"},  {"KICI_NODE", "/usr/bin/node"},
        {"KICI_RATE_MSGS_PER_SEC", "50"},  {"KICI_RATE_MSG_BURST", "100"},
        {"KICI_RATE_BYTES_PER_SEC", "1e5"}, {"KICI_RATE_BYTE_BURST", "1e6"},
    };
    size_t i;
    for (i = 0; i < sizeof settings / sizeof settings[0]; i++) {
        CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, settings[i][0], settings[i][1], &err),
                   err);
    }
    CHECK_CODE(KICI_RESULT_OK, kici_config_set_labels(config, good_labels, 2, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set_property(config, "cores", "8", &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_validate(config, &err), err);

    /* Unknown names and unreadable values are refused at once, the rest by validation. */
    CHECK(kici_config_set(config, "KICI_PROT", "1", &err) == KICI_RESULT_INVALID_ARGUMENT);
    CHECK(err != NULL && strstr(kici_error_message(err), "did you mean KICI_PORT?") != NULL);
    kici_error_free(err);
    err = NULL;
    CHECK_CODE(KICI_RESULT_INVALID_ARGUMENT, kici_config_set(config, "KICI_LOG_LEVEL", "loud", &err),
               err);
    CHECK_CODE(KICI_RESULT_INVALID_ARGUMENT, kici_config_set(config, "bind_address", "x", &err),
               err);
    CHECK_CODE(KICI_RESULT_INVALID_ARGUMENT,
               kici_config_set(config, "KICI_EXECUTION_MODE", "vm", &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_RATE_MSGS_PER_SEC", "0", &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_CONFIG, kici_config_validate(config, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_RATE_MSGS_PER_SEC", "50", &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set_labels(config, reserved_labels, 1, &err), err);
    CHECK(kici_agent_new(config, &agent, &err) == KICI_RESULT_INVALID_CONFIG);
    CHECK(err != NULL && strstr(kici_error_message(err), "kici:os:linux") != NULL);
    CHECK(agent == NULL); /* outputs are written only on success */
    kici_error_free(err);
    err = NULL;
    CHECK_CODE(KICI_RESULT_OK, kici_config_set_labels(config, good_labels, 2, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_ROLES", "builder", &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_CONFIG, kici_agent_new(config, &agent, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_ROLES", "", &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    /* The agent copied the configuration. */
    kici_config_free(config);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_id(agent, &id, &err), err);
    CHECK(id != NULL && strcmp(id, "c-api-agent") == 0);
    kici_agent_free(agent);
}

static void test_configuration_from_the_environment(void) {
    kici_config *config = NULL;
    kici_error *err = NULL;
    size_t count = 0;
    const char *warning = NULL;
    kici_agent *agent = NULL;
    const char *id = NULL;
    setenv("KICI_ORCHESTRATOR_URL", DEAD_URL, 1);
    setenv("KICI_PORT", "0", 1);
    setenv("KICI_AGENT_ID", "from-env", 1);
    setenv("KICI_LABELS", "gpu,,arm", 1);
    setenv("KICI_TYPO_VARIABLE", "1", 1);
    CHECK(kici_config_from_env(&config, &err) == KICI_RESULT_INVALID_CONFIG);
    CHECK(err != NULL && strstr(kici_error_message(err), "KICI_TYPO_VARIABLE") != NULL);
    CHECK(config == NULL);
    kici_error_free(err);
    err = NULL;
    setenv("KICI_DEV", "true", 1);
    CHECK_CODE(KICI_RESULT_OK, kici_config_from_env(&config, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_warning_count(config, &count, &err), err);
    CHECK(count == 1);
    CHECK_CODE(KICI_RESULT_OK, kici_config_warning(config, 0, &warning, &err), err);
    CHECK(warning != NULL && strstr(warning, "KICI_TYPO_VARIABLE") != NULL);
    CHECK_CODE(KICI_RESULT_NOT_FOUND, kici_config_warning(config, 1, &warning, &err), err);
    /* Setters still apply after loading. */
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_BIND_ADDRESS", "127.0.0.1", &err),
               err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_id(agent, &id, &err), err);
    CHECK(id != NULL && strcmp(id, "from-env") == 0);
    kici_agent_free(agent);
    kici_config_free(config);
    unsetenv("KICI_ORCHESTRATOR_URL");
    unsetenv("KICI_PORT");
    unsetenv("KICI_AGENT_ID");
    unsetenv("KICI_LABELS");
    unsetenv("KICI_TYPO_VARIABLE");
    unsetenv("KICI_DEV");
}

static void test_executor_tables(void) {
    kici_executor_vtable vtable = table(&finalized, count_finalize);
    kici_executor *executor = NULL;
    kici_error *err = NULL;
    int before = atomic_load(&finalized);
    vtable.struct_size = 0;
    CHECK_CODE(KICI_RESULT_INVALID_ARGUMENT, kici_executor_new(&vtable, "x", &executor, &err),
               err);
    vtable = table(&finalized, count_finalize);
    vtable.run_step = NULL;
    CHECK_CODE(KICI_RESULT_INVALID_ARGUMENT, kici_executor_new(&vtable, "x", &executor, &err),
               err);
    CHECK(executor == NULL);
    CHECK(atomic_load(&finalized) == before); /* refused tables stay the caller's */
    /* A table from an older header stops after run_step. */
    vtable = table(&finalized, count_finalize);
    vtable.struct_size = offsetof(kici_executor_vtable, run_step) + sizeof vtable.run_step;
    CHECK_CODE(KICI_RESULT_OK, kici_executor_new(&vtable, "old", &executor, &err), err);
    kici_executor_free(executor);
    CHECK(atomic_load(&finalized) == before + 1);
}

/* The next event that is not `reconnect_scheduled` (an agent that cannot reach its orchestrator
 * reports each planned retry), or the call's code when there is none: `expected`. */
static void next_event_skipping_reconnects(kici_agent *agent, uint64_t timeout_ms, char **owned,
                                           kici_result expected) {
    kici_error *err = NULL;
    for (;;) {
        kici_result got = kici_agent_next_event(agent, timeout_ms, owned, &err);
        if (got != KICI_RESULT_OK || strstr(*owned, "\"type\":\"reconnect_scheduled\"") == NULL) {
            CHECK_CODE(expected, got, err);
            return;
        }
        kici_string_free(*owned);
        *owned = NULL;
    }
}

static void test_agent_life_cycle_and_misuse(void) {
    kici_agent *agent = dead_agent();
    kici_agent *second = dead_agent();
    kici_executor_vtable vtable = table(&finalized, count_finalize);
    kici_executor *executor = NULL;
    kici_error *err = NULL;
    char *owned = NULL;
    uint16_t port = 0;
    char base[64];
    http_response response;
    int before = atomic_load(&finalized);

    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_wait(agent, 0, &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_next_event(agent, 0, &owned, &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_metrics(agent, &owned, &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_http_port(agent, &port, &err), err);

    /* One executor, registered twice with two agents, is finalized once. */
    CHECK_CODE(KICI_RESULT_OK, kici_executor_new(&vtable, "shared", &executor, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_step_executor(agent, "a", executor, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_job_executor(agent, "b", executor, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_default_executor(second, executor, &err), err);
    kici_executor_free(executor);
    executor = NULL;
    CHECK(atomic_load(&finalized) == before);

    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_start(agent, &err), err);
    vtable.free_user_data = NULL; /* the late executor does not own the counter */
    CHECK_CODE(KICI_RESULT_OK, kici_executor_new(&vtable, "late", &executor, &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE,
               kici_agent_register_default_executor(agent, executor, &err), err);
    kici_executor_free(executor);

    /* The endpoints are served even without an orchestrator. */
    CHECK_CODE(KICI_RESULT_OK, kici_agent_http_port(agent, &port, &err), err);
    CHECK(port != 0);
    snprintf(base, sizeof base, "http://127.0.0.1:%u", (unsigned)port);
    response = http_request(base, "GET", "/health", NULL);
    CHECK(response.status == 200 && strstr(response.body, "\"connected\":false") != NULL);
    http_response_free(&response);
    response = http_request(base, "GET", "/ready", NULL);
    CHECK(response.status == 503);
    http_response_free(&response);
    response = http_request(base, "GET", "/metrics", NULL);
    CHECK(response.status == 200 && strstr(response.body, "kici_agent_jobs_active") != NULL);
    http_response_free(&response);

    /* Unconnected, the only events are the reconnect schedule's. */
    next_event_skipping_reconnects(agent, 20, &owned, KICI_RESULT_TIMEOUT);
    CHECK_CODE(KICI_RESULT_TIMEOUT, kici_agent_wait(agent, 20, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_shutdown(agent, 0, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_wait(agent, 20000, &err), err);
    next_event_skipping_reconnects(agent, 0, &owned, KICI_RESULT_OK);
    CHECK(owned != NULL && strstr(owned, "\"type\":\"stopped\"") != NULL);
    kici_string_free(owned);
    owned = NULL;
    CHECK_CODE(KICI_RESULT_CLOSED, kici_agent_next_event(agent, 1000, &owned, &err), err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_start(agent, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_drain(agent, &err), err);

    /* Drained before it started: stopped, and it cannot start any more. */
    CHECK_CODE(KICI_RESULT_OK, kici_agent_drain(second, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_wait(second, KICI_WAIT_FOREVER, &err), err);
    CHECK_CODE(KICI_RESULT_CLOSED, kici_agent_next_event(second, KICI_WAIT_FOREVER, &owned, &err),
               err);
    CHECK_CODE(KICI_RESULT_INVALID_STATE, kici_agent_start(second, &err), err);

    kici_agent_free(agent);
    CHECK(atomic_load(&finalized) == before);
    kici_agent_free(second);
    CHECK(atomic_load(&finalized) == before + 1);
}

static void test_a_taken_port_fails_start_and_start_can_be_retried(void) {
    int holder = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address;
    socklen_t length = sizeof address;
    kici_config *config = dead_config();
    kici_agent *agent = NULL;
    kici_error *err = NULL;
    char port_text[8];
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(holder >= 0);
    CHECK(bind(holder, (struct sockaddr *)&address, sizeof address) == 0);
    CHECK(listen(holder, 1) == 0);
    CHECK(getsockname(holder, (struct sockaddr *)&address, &length) == 0);
    snprintf(port_text, sizeof port_text, "%u", (unsigned)ntohs(address.sin_port));
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_PORT", port_text, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    CHECK(kici_agent_start(agent, &err) == KICI_RESULT_IO);
    CHECK(err != NULL && strstr(kici_error_message(err), "/health") != NULL);
    kici_error_free(err);
    err = NULL;
    close(holder);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);
    kici_agent_free(agent); /* shuts the running agent down */
}

int main(void) {
    RUN_TEST(test_version_and_result_names);
    RUN_TEST(test_error_objects);
    RUN_TEST(test_null_arguments_are_errors);
    RUN_TEST(test_configuration_from_code);
    RUN_TEST(test_configuration_from_the_environment);
    RUN_TEST(test_executor_tables);
    RUN_TEST(test_agent_life_cycle_and_misuse);
    RUN_TEST(test_a_taken_port_fails_start_and_start_can_be_retried);
    return harness_finish("test_api");
}
