/*
 * test_two_agents.c: two agents in one process, each with its own runtime, HTTP port, metrics,
 * events and C executor, run jobs from the mock orchestrator at the same time; one executor is
 * shared by both and finalized once.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

typedef struct named_state {
    const char *label;
    atomic_int steps;
} named_state;

static named_state state_a = {"A", 0};
static named_state state_b = {"B", 0};
static atomic_int shared_finalized;

static int run_named(void *user_data, const char *job_json, const char *step_json,
                     kici_step_context *context) {
    named_state *s = user_data;
    char line[64];
    (void)job_json;
    (void)step_json;
    atomic_fetch_add(&s->steps, 1);
    snprintf(line, sizeof line, "step ran on agent %s", s->label);
    kici_step_context_write_line(context, line, NULL);
    kici_step_context_set_output(context, "agent", s->label, NULL);
    return 0;
}

static int run_shared(void *user_data, const char *job_json, const char *step_json,
                      kici_step_context *context) {
    (void)user_data;
    (void)job_json;
    (void)step_json;
    kici_step_context_write_line(context, "shared executor", NULL);
    return 0;
}

static void finalize_shared(void *user_data) {
    (void)user_data;
    atomic_fetch_add(&shared_finalized, 1);
}

static kici_executor *executor_for(void *user_data,
                                   int (*run)(void *, const char *, const char *,
                                              kici_step_context *),
                                   void (*finalize)(void *)) {
    kici_executor_vtable vtable;
    kici_executor *executor = NULL;
    kici_error *err = NULL;
    memset(&vtable, 0, sizeof vtable);
    vtable.struct_size = sizeof vtable;
    vtable.user_data = user_data;
    vtable.run_step = run;
    vtable.free_user_data = finalize;
    CHECK_CODE(KICI_RESULT_OK, kici_executor_new(&vtable, "named", &executor, &err), err);
    return executor;
}

static kici_agent *start_agent(const char *id, named_state *state, kici_executor *shared) {
    kici_config *config = harness_config(id);
    kici_agent *agent = NULL;
    kici_error *err = NULL;
    kici_executor *own = executor_for(state, run_named, NULL);
    char *event;
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_default_executor(agent, own, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_step_executor(agent, "shared", shared, &err),
               err);
    kici_executor_free(own);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);
    event = harness_wait_event(agent, "\"type\":\"registered\"", id, 30000);
    CHECK(event != NULL);
    kici_string_free(event);
    return agent;
}

static int metric_says(const kici_agent *agent, const char *needle) {
    char *text = NULL;
    int found = kici_agent_metrics(agent, &text, NULL) == KICI_RESULT_OK &&
                strstr(text, needle) != NULL;
    kici_string_free(text);
    return found;
}

static void test_two_agents_in_one_process(void) {
    char id_a[64];
    char id_b[64];
    kici_agent *a;
    kici_agent *b;
    kici_error *err = NULL;
    uint16_t port_a = 0;
    uint16_t port_b = 0;
    char *status;
    kici_executor *shared = executor_for(NULL, run_shared, finalize_shared);
    snprintf(id_a, sizeof id_a, "c-two-a-%ld", (long)getpid());
    snprintf(id_b, sizeof id_b, "c-two-b-%ld", (long)getpid());
    a = start_agent(id_a, &state_a, shared);
    b = start_agent(id_b, &state_b, shared);
    kici_executor_free(shared);

    CHECK_CODE(KICI_RESULT_OK, kici_agent_http_port(a, &port_a, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_http_port(b, &port_b, &err), err);
    CHECK(port_a != 0 && port_b != 0 && port_a != port_b);

    /* Both agents work at the same time. */
    CHECK(mock_dispatch(id_a, "run-two", "job-a1", "job", "[{\"name\":\"s\"}]", NULL) == 200);
    CHECK(mock_dispatch(id_b, "run-two", "job-b1", "job", "[{\"name\":\"s\"}]", NULL) == 200);
    status = mock_wait("job.status", "success", "job-a1", 30000);
    CHECK(status != NULL && strstr(status, "\"agent\":\"A\"") != NULL);
    free(status);
    status = mock_wait("job.status", "success", "job-b1", 30000);
    CHECK(status != NULL && strstr(status, "\"agent\":\"B\"") != NULL);
    free(status);
    CHECK(mock_dispatch(id_a, "run-two", "job-a2", "job",
                        "[{\"name\":\"s\"},{\"name\":\"shared\"}]", NULL) == 200);
    status = mock_wait("job.status", "success", "job-a2", 30000);
    CHECK(status != NULL);
    free(status);
    CHECK(mock_dispatch(id_b, "run-two", "job-b2", "job", "[{\"name\":\"shared\"}]", NULL) == 200);
    status = mock_wait("job.status", "success", "job-b2", 30000);
    CHECK(status != NULL);
    free(status);

    CHECK(atomic_load(&state_a.steps) == 2 && atomic_load(&state_b.steps) == 1);
    /* Each agent counts only its own jobs. */
    CHECK(metric_says(a, "kici_agent_jobs_total{status=\"success\"} 2"));
    CHECK(metric_says(b, "kici_agent_jobs_total{status=\"success\"} 2"));
    CHECK(metric_says(a, "kici_agent_steps_total"));

    CHECK_CODE(KICI_RESULT_OK, kici_agent_drain(a, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_wait(a, 30000, &err), err);
    /* Stopping one leaves the other running. */
    CHECK_CODE(KICI_RESULT_TIMEOUT, kici_agent_wait(b, 0, &err), err);
    CHECK(mock_dispatch(id_b, "run-two", "job-b3", "job", "[{\"name\":\"s\"}]", NULL) == 200);
    status = mock_wait("job.status", "success", "job-b3", 30000);
    CHECK(status != NULL);
    free(status);
    CHECK(metric_says(b, "kici_agent_jobs_total{status=\"success\"} 3"));
    CHECK(metric_says(a, "kici_agent_jobs_total{status=\"success\"} 2"));
    kici_agent_free(a);
    CHECK(atomic_load(&shared_finalized) == 0);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_shutdown(b, 1000, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_wait(b, 30000, &err), err);
    kici_agent_free(b);
    CHECK(atomic_load(&shared_finalized) == 1);
}

int main(void) {
    RUN_TEST(test_two_agents_in_one_process);
    return harness_finish("test_two_agents");
}
