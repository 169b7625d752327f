/*
 * test_jobs.c: one agent embedded in this process runs real jobs from the strict mock
 * orchestrator with executors written in C: success with log lines and outputs, failure with a
 * message (and the agent goes on), cancel observed through the step context, events (also for
 * a lost connection), masking, and the agent's own /health, /ready and /metrics.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

#define SECRET "hunter2-c-secret-value"
#define SECRET_OUTPUT "https://signed.example/c-output-5e1d"

/* What the callbacks saw; they run on agent threads, so everything is atomic. */
typedef struct executor_state {
    atomic_int steps;
    atomic_int prepared;
    atomic_int cleaned;
    atomic_int cancel_seen;
    atomic_int blocking_refused;
    atomic_int context_ok;
    const kici_agent *agent;
} executor_state;

static atomic_int finalized;

static executor_state state;
static kici_agent *agent;
static char agent_id[64];

static void free_state(void *user_data) {
    CHECK(user_data == &state);
    atomic_fetch_add(&finalized, 1);
}

static int prepare_job(void *user_data, const char *job_json) {
    executor_state *s = user_data;
    if (strstr(job_json, "\"runId\"") != NULL) {
        atomic_fetch_add(&s->prepared, 1);
    }
    return 0;
}

static void cleanup_job(void *user_data, const char *job_json) {
    executor_state *s = user_data;
    (void)job_json;
    atomic_fetch_add(&s->cleaned, 1);
}

/* Checks what a step can read: JSON, workspace, environment. */
static int context_is_complete(const char *job_json, const char *step_json,
                               kici_step_context *context, const char *step_name) {
    const char *workspace = NULL;
    const char *value = NULL;
    const char *name = NULL;
    size_t count = 0;
    struct stat info;
    int ok = strstr(job_json, "\"jobId\"") != NULL && strstr(step_json, step_name) != NULL;
    ok = ok && kici_step_context_workspace(context, &workspace, NULL) == KICI_RESULT_OK;
    ok = ok && stat(workspace, &info) == 0 && S_ISDIR(info.st_mode);
    ok = ok && kici_step_context_env(context, "KICI_STEP_NAME", &value, NULL) == KICI_RESULT_OK;
    ok = ok && strcmp(value, step_name) == 0;
    ok = ok && kici_step_context_env(context, "NOT_SET_ANYWHERE", &value, NULL) ==
                   KICI_RESULT_NOT_FOUND;
    ok = ok && kici_step_context_env_count(context, &count, NULL) == KICI_RESULT_OK && count > 0;
    ok = ok && kici_step_context_env_entry(context, 0, &name, &value, NULL) == KICI_RESULT_OK;
    ok = ok && kici_step_context_env_entry(context, count, &name, &value, NULL) ==
                   KICI_RESULT_NOT_FOUND;
    return ok;
}

static int greet(void *user_data, const char *job_json, const char *step_json,
                 kici_step_context *context) {
    executor_state *s = user_data;
    kici_error *err = NULL;
    static const unsigned char raw[] = "raw bytes line\npartial ";
    atomic_fetch_add(&s->steps, 1);
    if (context_is_complete(job_json, step_json, context, "greet")) {
        atomic_fetch_add(&s->context_ok, 1);
    }
    /* A blocking agent call from a callback is refused instead of deadlocking. */
    if (kici_agent_wait(s->agent, 0, &err) == KICI_RESULT_INVALID_STATE) {
        atomic_fetch_add(&s->blocking_refused, 1);
    }
    kici_error_free(err);
    kici_step_context_write_line(context, "hello from C", NULL);
    kici_step_context_write_line(context, "the secret is " SECRET, NULL);
    kici_step_context_write(context, raw, sizeof raw - 1, NULL);
    kici_step_context_write_line(context, "end", NULL);
    kici_step_context_set_output(context, "greeting", "hello", NULL);
    kici_step_context_set_output_json(context, "count", "3", NULL);
    if (kici_step_context_set_output_json(context, "bad", "{not json", NULL) !=
        KICI_RESULT_INVALID_ARGUMENT) {
        return 9;
    }
    /* Sealed for the run's key; masked from here on, even in this step's own lines. */
    if (kici_step_context_set_secret_output(context, "SIGNED_URL", SECRET_OUTPUT, &err) !=
        KICI_RESULT_OK) {
        kici_error_free(err);
        return 10;
    }
    kici_step_context_write_line(context, "sealed " SECRET_OUTPUT, NULL);
    return 0;
}

static int fail(void *user_data, const char *job_json, const char *step_json,
                kici_step_context *context) {
    executor_state *s = user_data;
    (void)job_json;
    (void)step_json;
    atomic_fetch_add(&s->steps, 1);
    kici_step_context_write_line(context, "about to fail", NULL);
    kici_step_context_set_failure(context, "the C step failed on purpose", NULL);
    return 3;
}

static int wait_for_cancel(void *user_data, const char *job_json, const char *step_json,
                           kici_step_context *context) {
    executor_state *s = user_data;
    int waited_ms = 0;
    (void)job_json;
    (void)step_json;
    atomic_fetch_add(&s->steps, 1);
    kici_step_context_write_line(context, "waiting for a cancel", NULL);
    while (!kici_step_context_is_cancelled(context) && waited_ms < 60000) {
        harness_sleep_ms(10);
        waited_ms += 10;
    }
    if (kici_step_context_is_cancelled(context)) {
        atomic_fetch_add(&s->cancel_seen, 1);
        kici_step_context_write_line(context, "cancel observed", NULL);
    }
    return 1;
}

static kici_executor *make_executor(const char *name,
                                    int (*run)(void *, const char *, const char *,
                                               kici_step_context *),
                                    int owns_state) {
    kici_executor_vtable vtable;
    kici_executor *executor = NULL;
    kici_error *err = NULL;
    memset(&vtable, 0, sizeof vtable);
    vtable.struct_size = sizeof vtable;
    vtable.user_data = &state;
    vtable.run_step = run;
    vtable.prepare_job = prepare_job;
    vtable.cleanup_job = cleanup_job;
    vtable.free_user_data = owns_state ? free_state : NULL;
    CHECK_CODE(KICI_RESULT_OK, kici_executor_new(&vtable, name, &executor, &err), err);
    return executor;
}

static void test_start_and_register(void) {
    kici_config *config;
    kici_error *err = NULL;
    kici_executor *greeter = make_executor("greeter", greet, 1);
    kici_executor *failer = make_executor("failer", fail, 0);
    kici_executor *waiter = make_executor("waiter", wait_for_cancel, 0);
    char *event;
    const char *id = NULL;
    snprintf(agent_id, sizeof agent_id, "c-jobs-%ld", (long)getpid());
    config = harness_config(agent_id);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    state.agent = agent;
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_step_executor(agent, "greet", greeter, &err),
               err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_job_executor(agent, "failing-job", failer, &err),
               err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_default_executor(agent, waiter, &err), err);
    /* The agent holds its own references now. */
    kici_executor_free(greeter);
    kici_executor_free(failer);
    kici_executor_free(waiter);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_id(agent, &id, &err), err);
    CHECK(id != NULL && strcmp(id, agent_id) == 0);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);
    event = harness_wait_event(agent, "\"type\":\"registered\"", agent_id, 30000);
    CHECK(event != NULL);
    kici_string_free(event);
}

static void test_success_with_log_lines_and_outputs(void) {
    char *status;
    char *received;
    char *event;
    CHECK(mock_dispatch(agent_id, "run-ok", "job-ok", "greeting-job",
                        "[{\"name\":\"greet\",\"hasOutputs\":true}]",
                        "{\"C_TEST_SECRET\":\"" SECRET "\"}") == 200);
    status = mock_wait("job.status", "success", "job-ok", 30000);
    CHECK(status != NULL);
    if (status != NULL) {
        CHECK(strstr(status, "\"greeting\":\"hello\"") != NULL);
        CHECK(strstr(status, "\"count\":3") != NULL);
        CHECK(strstr(status, "\"bad\"") == NULL);
        CHECK(strstr(status, "\"secretOutputs\":{\"SIGNED_URL\":{\"agentPublicKey\":"
                             "\"MCowBQYDK2VuAyEA") != NULL);
        CHECK(strstr(status, "\"encrypted\":\"") != NULL);
    }
    free(status);
    received = mock_received();
    CHECK(received != NULL);
    if (received != NULL) {
        CHECK(strstr(received, "hello from C") != NULL);
        CHECK(strstr(received, "the secret is ***") != NULL);
        CHECK(strstr(received, SECRET) == NULL);
        CHECK(strstr(received, "sealed ***") != NULL);
        CHECK(strstr(received, SECRET_OUTPUT) == NULL);
        CHECK(strstr(received, "raw bytes line") != NULL);
        CHECK(strstr(received, "partial end") != NULL);
    }
    free(received);
    event = harness_wait_event(agent, "\"type\":\"job_started\"", "\"jobId\":\"job-ok\"", 10000);
    CHECK(event != NULL && strstr(event, "\"name\":\"greeting-job\"") != NULL);
    kici_string_free(event);
    event = harness_wait_event(agent, "\"type\":\"step_finished\"", "\"stepName\":\"greet\"",
                               10000);
    CHECK(event != NULL && strstr(event, "\"state\":\"success\"") != NULL);
    kici_string_free(event);
    event = harness_wait_event(agent, "\"type\":\"job_finished\"", "\"jobId\":\"job-ok\"", 10000);
    CHECK(event != NULL && strstr(event, "\"state\":\"success\"") != NULL);
    kici_string_free(event);
    CHECK(atomic_load(&state.context_ok) == 1);
    CHECK(atomic_load(&state.blocking_refused) == 1);
    CHECK(atomic_load(&state.prepared) >= 1);
    CHECK(atomic_load(&state.cleaned) >= 1);
}

static void test_failure_with_message_and_the_agent_goes_on(void) {
    char *status;
    char *event;
    CHECK(mock_dispatch(agent_id, "run-fail", "job-fail", "failing-job",
                        "[{\"name\":\"explode\",\"hasOutputs\":false}]", NULL) == 200);
    status = mock_wait("step.status", "failed", "job-fail", 30000);
    CHECK(status != NULL);
    if (status != NULL) {
        CHECK(strstr(status, "the C step failed on purpose") != NULL);
        CHECK(strstr(status, "\"exitCode\":3") != NULL);
    }
    free(status);
    status = mock_wait("job.status", "failed", "job-fail", 30000);
    CHECK(status != NULL);
    free(status);
    event = harness_wait_event(agent, "\"type\":\"job_finished\"", "\"jobId\":\"job-fail\"",
                               10000);
    CHECK(event != NULL && strstr(event, "\"state\":\"failed\"") != NULL);
    kici_string_free(event);

    /* The same agent takes the next job. */
    CHECK(mock_dispatch(agent_id, "run-after", "job-after", "greeting-job",
                        "[{\"name\":\"greet\",\"hasOutputs\":true}]", NULL) == 200);
    status = mock_wait("job.status", "success", "job-after", 30000);
    CHECK(status != NULL);
    free(status);
}

static void test_cancel_is_observed_through_the_context(void) {
    char *status;
    char *received;
    char body[256];
    CHECK(mock_dispatch(agent_id, "run-cancel", "job-cancel", "waiting-job",
                        "[{\"name\":\"wait\",\"hasOutputs\":false}]", NULL) == 200);
    status = mock_wait("step.status", "running", "job-cancel", 30000);
    CHECK(status != NULL);
    free(status);
    snprintf(body, sizeof body,
             "{\"agentId\":\"%s\",\"runId\":\"run-cancel\",\"jobId\":\"job-cancel\"}", agent_id);
    CHECK(mock_post("/cancel", body) == 200);
    status = mock_wait("job.status", "cancelled", "job-cancel", 30000);
    CHECK(status != NULL);
    free(status);
    CHECK(atomic_load(&state.cancel_seen) == 1);
    received = mock_received();
    CHECK(received != NULL && strstr(received, "cancel observed") != NULL);
    free(received);
}

static void test_health_ready_and_metrics_are_served(void) {
    uint16_t port = 0;
    kici_error *err = NULL;
    char base[64];
    char *metrics = NULL;
    http_response response;
    CHECK_CODE(KICI_RESULT_OK, kici_agent_http_port(agent, &port, &err), err);
    CHECK(port != 0);
    snprintf(base, sizeof base, "http://127.0.0.1:%u", (unsigned)port);
    response = http_request(base, "GET", "/health", NULL);
    CHECK(response.status == 200);
    CHECK(response.body != NULL && strstr(response.body, agent_id) != NULL);
    http_response_free(&response);
    response = http_request(base, "GET", "/ready", NULL);
    CHECK(response.status == 200);
    http_response_free(&response);
    response = http_request(base, "GET", "/metrics", NULL);
    CHECK(response.status == 200);
    CHECK(response.body != NULL &&
          strstr(response.body, "kici_agent_jobs_total{status=\"success\"} 2") != NULL);
    http_response_free(&response);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_metrics(agent, &metrics, &err), err);
    CHECK(metrics != NULL &&
          strstr(metrics, "kici_agent_jobs_total{status=\"failed\"} 1") != NULL);
    kici_string_free(metrics);
}

static void test_a_lost_connection_is_an_event_and_the_agent_comes_back(void) {
    char body[256];
    char *event;
    char *status;
    snprintf(body, sizeof body, "{\"agentId\":\"%s\",\"code\":1012}", agent_id);
    CHECK(mock_post("/disconnect", body) == 200);
    event = harness_wait_event(agent, "\"type\":\"disconnected\"", NULL, 10000);
    CHECK(event != NULL);
    kici_string_free(event);
    event = harness_wait_event(agent, "\"type\":\"registered\"", agent_id, 30000);
    CHECK(event != NULL);
    kici_string_free(event);
    CHECK(mock_dispatch(agent_id, "run-back", "job-back", "greeting-job",
                        "[{\"name\":\"greet\",\"hasOutputs\":true}]", NULL) == 200);
    status = mock_wait("job.status", "success", "job-back", 30000);
    CHECK(status != NULL);
    free(status);
}

static void test_ready_is_503_while_draining(void) {
    uint16_t port = 0;
    kici_error *err = NULL;
    char base[64];
    char body[256];
    char *status;
    http_response response;
    /* A running job keeps the drained agent up (idle, it would stop at once). */
    CHECK(mock_dispatch(agent_id, "run-drain", "job-drain", "waiting-job",
                        "[{\"name\":\"wait\",\"hasOutputs\":false}]", NULL) == 200);
    status = mock_wait("step.status", "running", "job-drain", 30000);
    CHECK(status != NULL);
    free(status);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_http_port(agent, &port, &err), err);
    snprintf(base, sizeof base, "http://127.0.0.1:%u", (unsigned)port);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_drain(agent, &err), err);
    response = http_request(base, "GET", "/ready", NULL);
    CHECK(response.status == 503);
    CHECK(response.body != NULL && strstr(response.body, "\"draining\":true") != NULL);
    http_response_free(&response);
    response = http_request(base, "GET", "/health", NULL);
    CHECK(response.status == 200);
    CHECK(response.body != NULL && strstr(response.body, "\"draining\":true") != NULL);
    http_response_free(&response);
    snprintf(body, sizeof body,
             "{\"agentId\":\"%s\",\"runId\":\"run-drain\",\"jobId\":\"job-drain\"}", agent_id);
    CHECK(mock_post("/cancel", body) == 200);
    status = mock_wait("job.status", "cancelled", "job-drain", 30000);
    CHECK(status != NULL);
    free(status);
}

static void test_shutdown_wait_and_free(void) {
    kici_error *err = NULL;
    char *event;
    char *json = NULL;
    CHECK_CODE(KICI_RESULT_OK, kici_agent_shutdown(agent, 2000, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_wait(agent, 30000, &err), err);
    event = harness_wait_event(agent, "\"type\":\"stopped\"", NULL, 1000);
    CHECK(event != NULL);
    kici_string_free(event);
    CHECK_CODE(KICI_RESULT_CLOSED, kici_agent_next_event(agent, KICI_WAIT_FOREVER, &json, &err),
               err);
    CHECK(json == NULL);
    CHECK(atomic_load(&finalized) == 0);
    kici_agent_free(agent);
    agent = NULL;
    CHECK(atomic_load(&finalized) == 1);
}

int main(void) {
    RUN_TEST(test_start_and_register);
    RUN_TEST(test_success_with_log_lines_and_outputs);
    RUN_TEST(test_failure_with_message_and_the_agent_goes_on);
    RUN_TEST(test_cancel_is_observed_through_the_context);
    RUN_TEST(test_health_ready_and_metrics_are_served);
    RUN_TEST(test_a_lost_connection_is_an_event_and_the_agent_comes_back);
    RUN_TEST(test_ready_is_503_while_draining);
    RUN_TEST(test_shutdown_wait_and_free);
    return harness_finish("test_jobs");
}
