/*
 * harness.h: what the C tests share: checks, a tiny HTTP/1.1 client for the mock
 * orchestrator's control API and the agent's /health, /ready and /metrics, and helpers that
 * build dispatches and wait for agent events.
 *
 * The tests read the mock's endpoints from KICI_E2E_WS_URL, KICI_E2E_CONTROL_URL and
 * KICI_E2E_TOKEN (names the agent's environment check allows), set by tests/c/run.sh.
 */
#ifndef KICI_TEST_HARNESS_H
#define KICI_TEST_HARNESS_H

#include <stddef.h>

#include "kici_agent.h"

/* Failed checks so far; a test program exits non-zero when it is not 0. */
extern int harness_failures;

void harness_check(int ok, const char *what, const char *file, int line);
/* Checks that `got` is `expected`; prints and frees `err` (may be NULL) when it is not. */
void harness_check_code(kici_result expected, kici_result got, kici_error *err, const char *what,
                        const char *file, int line);

#define CHECK(cond) harness_check((cond) ? 1 : 0, #cond, __FILE__, __LINE__)
/* CHECK_CODE(KICI_RESULT_OK, kici_x(..., &err), err): frees err if set. */
#define CHECK_CODE(expected, call, err)                                                       \
    do {                                                                                      \
        kici_result check_code_got_ = (call);                                                 \
        harness_check_code((expected), check_code_got_, (err), #call, __FILE__, __LINE__);    \
        (err) = NULL;                                                                         \
    } while (0)
/* Runs one test function and reports it. */
#define RUN_TEST(fn) harness_run(#fn, fn)
void harness_run(const char *name, void (*fn)(void));
/* Prints the summary; the exit status of main. */
int harness_finish(const char *program);

/* A required environment variable (aborts the test program when missing). */
const char *harness_env(const char *name);

/* An HTTP response: status (0 when the request failed) and a NUL-terminated body. */
typedef struct http_response {
    int status;
    char *body;
} http_response;

/* `timeout_ms` times KICI_E2E_TIME_SCALE (an integer 1-20, default 1): run.sh sets it for the
 * valgrind variant, where in-process work (the git clone above all) runs tens of times slower. */
int harness_timeout_ms(int timeout_ms);

/* GET or POST `path` at `base_url` ("http://127.0.0.1:PORT"); body may be NULL. */
http_response http_request(const char *base_url, const char *method, const char *path,
                           const char *body);
void http_response_free(http_response *response);

/* POST to the mock's control API; returns the HTTP status. */
int mock_post(const char *path, const char *json_body);
/* GET /wait?type=...&state=...&jobId=...; returns the message (free it) or NULL on 408.
 * timeout_ms is scaled by harness_timeout_ms. */
char *mock_wait(const char *type, const char *state, const char *job_id, int timeout_ms);
/* GET /received as one string (free it). */
char *mock_received(void);

/* A job.dispatch for `agent_id` whose jobConfig.name is `job_name` and whose steps are the
 * JSON array `steps_json`; `secrets_json` is a JSON object or NULL. Returns the HTTP status. */
int mock_dispatch(const char *agent_id, const char *run_id, const char *job_id,
                  const char *job_name, const char *steps_json, const char *secrets_json);

/* A configuration for the mock: URL, token, port 0, short graces, id `agent_id`. */
kici_config *harness_config(const char *agent_id);

/* Reads events until one whose JSON contains every non-NULL needle; returns it (free it with
 * kici_string_free) or NULL after timeout_ms (scaled by harness_timeout_ms). Other events are
 * dropped. */
char *harness_wait_event(const kici_agent *agent, const char *needle1, const char *needle2,
                         int timeout_ms);

/* Sleeps `ms` milliseconds. */
void harness_sleep_ms(int ms);

#endif /* KICI_TEST_HARNESS_H */
