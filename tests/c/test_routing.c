/*
 * test_routing.c: the core's executor routing seen from C, against the strict mock
 * orchestrator. An agent with C executors for one job and one step name only (no default):
 *  - a TypeScript job none of them claims runs through the agent's own TypeScript runner (the
 *    fixture repository run.sh prepares: KICI_E2E_TS_REPO_URL, KICI_E2E_TS_REF, KICI_E2E_TS_SHA);
 *  - the C executor registered for a job that names a container image wins over the container:
 *    its steps run on the host (no container engine is needed), and the job's log says so.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

static atomic_int host_steps;
static atomic_int flash_steps;
static kici_agent *agent;
static char agent_id[64];

static int run_on_host(void *user_data, const char *job_json, const char *step_json,
                       kici_step_context *context) {
    (void)user_data;
    (void)job_json;
    (void)step_json;
    atomic_fetch_add(&host_steps, 1);
    kici_step_context_write_line(context, "on the host, from C", NULL);
    kici_step_context_set_output(context, "ranBy", "c-job-executor", NULL);
    return 0;
}

static int flash(void *user_data, const char *job_json, const char *step_json,
                 kici_step_context *context) {
    (void)user_data;
    (void)job_json;
    (void)step_json;
    (void)context;
    atomic_fetch_add(&flash_steps, 1);
    return 0;
}

static kici_executor *make_executor(const char *name,
                                    int (*run)(void *, const char *, const char *,
                                               kici_step_context *)) {
    kici_executor_vtable vtable;
    kici_executor *executor = NULL;
    kici_error *err = NULL;
    memset(&vtable, 0, sizeof vtable);
    vtable.struct_size = sizeof vtable;
    vtable.run_step = run;
    CHECK_CODE(KICI_RESULT_OK, kici_executor_new(&vtable, name, &executor, &err), err);
    return executor;
}

/* A job.dispatch of job `job` of `workflow` in `source_file`, checked out from `repo_url` at
 * `git_ref`/`sha` ("" repo: no checkout), with `steps_json` and extra jobConfig fields
 * `extra_config` (",\"key\":value" or ""). Returns the mock's HTTP status. */
static int dispatch(const char *job_id, const char *repo_url, const char *git_ref,
                    const char *sha, const char *source_file, const char *workflow,
                    const char *job, const char *steps_json, const char *extra_config) {
    static const char template[] =
        "{\"agentId\":\"%s\",\"dispatch\":{\"type\":\"job.dispatch\",\"messageId\":\"msg-%s\","
        "\"runId\":\"run-%s\",\"jobId\":\"%s\",\"repoUrl\":\"%s\",\"ref\":\"%s\",\"sha\":\"%s\","
        "\"lockFileUrl\":\"\",\"jobConfig\":{\"source\":{\"file\":\"%s\",\"export\":\"#default\"},"
        "\"workflowName\":\"%s\",\"name\":\"%s\",\"baseJobName\":\"%s\","
        "\"runsOnPick\":\"deterministic\",\"steps\":%s,\"needs\":[],\"cacheOrgId\":\"org_c\","
        "\"cacheRepoId\":\"c/tests\",\"cacheRefScope\":\"shared\",\"event\":{\"type\":\"push\","
        "\"targetBranch\":\"main\",\"payload\":{\"ref\":\"refs/heads/main\",\"after\":\"%s\","
        "\"repository\":{\"full_name\":\"c/tests\",\"default_branch\":\"main\"}},"
        "\"provider\":\"local\"},\"provider\":\"local\"%s},\"timestamp\":%lld,"
        "\"orgId\":\"org_c\",\"repoId\":\"c/tests\",\"cacheRefScope\":\"shared\","
        "\"requestId\":\"req-%s\"}}";
    size_t cap = sizeof template + strlen(agent_id) + 4 * strlen(job_id) + strlen(repo_url) +
                 strlen(git_ref) + 2 * strlen(sha) + strlen(source_file) + strlen(workflow) +
                 2 * strlen(job) + strlen(steps_json) + strlen(extra_config) + 32;
    char *body = malloc(cap);
    struct timespec now;
    int status;
    if (body == NULL) {
        return 0;
    }
    clock_gettime(CLOCK_REALTIME, &now);
    snprintf(body, cap, template, agent_id, job_id, job_id, job_id, repo_url, git_ref, sha,
             source_file, workflow, job, job, steps_json, sha, extra_config,
             (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000, job_id);
    status = mock_post("/dispatch", body);
    free(body);
    return status;
}

static void test_start_with_executors_for_one_job_and_one_step(void) {
    kici_config *config;
    kici_error *err = NULL;
    kici_executor *host = make_executor("c-host", run_on_host);
    kici_executor *flasher = make_executor("c-flash", flash);
    char *event;
    snprintf(agent_id, sizeof agent_id, "c-routing-%ld", (long)getpid());
    config = harness_config(agent_id);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_job_executor(agent, "hil", host, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_register_step_executor(agent, "flash", flasher, &err),
               err);
    kici_executor_free(host);
    kici_executor_free(flasher);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);
    event = harness_wait_event(agent, "\"type\":\"registered\"", agent_id, 30000);
    CHECK(event != NULL);
    kici_string_free(event);
}

static void test_a_typescript_job_no_c_executor_claims_runs_through_the_runner(void) {
    char *status;
    char *received;
    CHECK(dispatch("ts-outputs", harness_env("KICI_E2E_TS_REPO_URL"),
                   harness_env("KICI_E2E_TS_REF"), harness_env("KICI_E2E_TS_SHA"),
                   ".kici/workflows/features.ts", "features", "outputs",
                   "[{\"name\":\"produce\",\"hasOutputs\":true},"
                   "{\"name\":\"step-1\",\"hasOutputs\":false},"
                   "{\"name\":\"options-step\",\"hasOutputs\":true}]",
                   "") == 200);
    status = mock_wait("job.status", "success", "ts-outputs", 120000);
    CHECK(status != NULL);
    /* The outputs are the TypeScript steps' return values. */
    CHECK(status != NULL && strstr(status, "\"produce\":{\"version\":\"1.2.3\"}") != NULL);
    CHECK(status != NULL && strstr(status, "\"options-step\":{\"value\":42}") != NULL);
    free(status);
    received = mock_received();
    CHECK(received != NULL && strstr(received, "console output of produce") != NULL);
    free(received);
    CHECK(atomic_load(&host_steps) == 0 && atomic_load(&flash_steps) == 0);
}

static void test_the_c_executor_of_a_job_that_names_a_container_wins(void) {
    char *status;
    char *received;
    CHECK(dispatch("hil-in-container", "", "main", "b9b71c346df582e282084848b408b388a24214a9",
                   ".kici/workflows/c.ts", "c-tests", "hil",
                   "[{\"name\":\"measure\",\"hasOutputs\":true}]",
                   ",\"container\":\"debian:12\"") == 200);
    status = mock_wait("job.status", "success", "hil-in-container", 30000);
    CHECK(status != NULL && strstr(status, "\"measure\":{\"ranBy\":\"c-job-executor\"}") != NULL);
    free(status);
    CHECK(atomic_load(&host_steps) == 1);
    received = mock_received();
    CHECK(received != NULL && strstr(received, "on the host, from C") != NULL);
    CHECK(received != NULL &&
          strstr(received, "Step 'measure' runs on this host with executor 'c-host' "
                           "(registered for the job), not in the job's container") != NULL);
    free(received);
}

static void test_shutdown(void) {
    kici_error *err = NULL;
    CHECK_CODE(KICI_RESULT_OK, kici_agent_shutdown(agent, 5000, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_wait(agent, 30000, &err), err);
    kici_agent_free(agent);
    agent = NULL;
}

int main(void) {
    RUN_TEST(test_start_with_executors_for_one_job_and_one_step);
    RUN_TEST(test_a_typescript_job_no_c_executor_claims_runs_through_the_runner);
    RUN_TEST(test_the_c_executor_of_a_job_that_names_a_container_wins);
    RUN_TEST(test_shutdown);
    return harness_finish("test_routing");
}
