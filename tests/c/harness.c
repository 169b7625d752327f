/* harness.c: see harness.h. */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <netdb.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int harness_failures = 0;

static int cases_passed = 0;
static int cases_failed = 0;

void harness_check(int ok, const char *what, const char *file, int line) {
    if (!ok) {
        fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what);
        harness_failures++;
    }
}

void harness_check_code(kici_result expected, kici_result got, kici_error *err, const char *what,
                        const char *file, int line) {
    if (expected != got) {
        fprintf(stderr, "%s:%d: %s\n    returned %s, expected %s%s%s\n", file, line, what,
                kici_result_str(got), kici_result_str(expected), err ? ": " : "",
                err ? kici_error_message(err) : "");
        harness_failures++;
    }
    kici_error_free(err);
}

void harness_run(const char *name, void (*fn)(void)) {
    int before = harness_failures;
    fprintf(stderr, "--- %s\n", name);
    fn();
    if (harness_failures == before) {
        cases_passed++;
        fprintf(stderr, "ok   %s\n", name);
    } else {
        cases_failed++;
        fprintf(stderr, "FAIL %s\n", name);
    }
}

int harness_finish(const char *program) {
    fprintf(stderr, "%s: %d cases passed, %d failed\n", program, cases_passed, cases_failed);
    return harness_failures == 0 ? 0 : 1;
}

int harness_timeout_ms(int timeout_ms) {
    const char *scale_text = getenv("KICI_E2E_TIME_SCALE");
    long scale = scale_text ? strtol(scale_text, NULL, 10) : 1;
    if (scale < 1 || scale > 20) {
        scale = 1;
    }
    return timeout_ms > INT_MAX / (int)scale ? INT_MAX : timeout_ms * (int)scale;
}

const char *harness_env(const char *name) {
    const char *value = getenv(name);
    if (value == NULL || value[0] == '\0') {
        fprintf(stderr, "%s is not set; run the C tests through tests/c/run.sh\n", name);
        exit(2);
    }
    return value;
}

void harness_sleep_ms(int ms) {
    struct timespec delay;
    delay.tv_sec = ms / 1000;
    delay.tv_nsec = (long)(ms % 1000) * 1000000L;
    nanosleep(&delay, NULL);
}

/* ---- HTTP ---------------------------------------------------------------------------- */

/* Splits "http://HOST:PORT" into host and port. */
static int parse_base_url(const char *base_url, char *host, size_t host_len, char *port,
                          size_t port_len) {
    const char *rest = strncmp(base_url, "http://", 7) == 0 ? base_url + 7 : base_url;
    const char *colon = strrchr(rest, ':');
    const char *end = strchr(rest, '/');
    size_t host_size;
    size_t port_size;
    if (colon == NULL) {
        return -1;
    }
    if (end == NULL) {
        end = rest + strlen(rest);
    }
    host_size = (size_t)(colon - rest);
    port_size = (size_t)(end - colon - 1);
    if (host_size == 0 || host_size >= host_len || port_size == 0 || port_size >= port_len) {
        return -1;
    }
    memcpy(host, rest, host_size);
    host[host_size] = '\0';
    memcpy(port, colon + 1, port_size);
    port[port_size] = '\0';
    return 0;
}

static int connect_to(const char *host, const char *port, int patience_s) {
    struct addrinfo hints;
    struct addrinfo *found = NULL;
    struct addrinfo *candidate;
    struct timeval patience;
    int fd = -1;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &found) != 0) {
        return -1;
    }
    for (candidate = found; candidate != NULL; candidate = candidate->ai_next) {
        fd = socket(candidate->ai_family, candidate->ai_socktype, candidate->ai_protocol);
        if (fd < 0) {
            continue;
        }
        if (connect(fd, candidate->ai_addr, candidate->ai_addrlen) == 0) {
            break;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(found);
    if (fd >= 0) {
        /* A hung peer fails the test instead of hanging it. */
        patience.tv_sec = patience_s;
        patience.tv_usec = 0;
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &patience, sizeof patience);
    }
    return fd;
}

static int send_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t sent = send(fd, data, len, 0);
        if (sent < 0 && errno == EINTR) {
            continue;
        }
        if (sent <= 0) {
            return -1;
        }
        data += sent;
        len -= (size_t)sent;
    }
    return 0;
}

static char *read_all(int fd, size_t *out_len) {
    size_t cap = 8192;
    size_t len = 0;
    char *buf = malloc(cap);
    if (buf == NULL) {
        return NULL;
    }
    for (;;) {
        ssize_t got;
        if (cap - len < 4096) {
            char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL) {
                free(buf);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
        got = recv(fd, buf + len, cap - len - 1, 0);
        if (got < 0 && errno == EINTR) {
            /* A socket with a receive timeout is never restarted after a signal handler
             * (signal(7)); the library's runtime may have one for SIGCHLD (see the header). */
            continue;
        }
        if (got < 0) {
            free(buf);
            return NULL;
        }
        if (got == 0) {
            break;
        }
        len += (size_t)got;
    }
    buf[len] = '\0';
    *out_len = len;
    return buf;
}

/* Decodes a chunked body in place; returns its length. */
static size_t dechunk(char *body) {
    char *read = body;
    char *write = body;
    for (;;) {
        unsigned long size = strtoul(read, NULL, 16);
        char *line_end = strstr(read, "\r\n");
        if (line_end == NULL || size == 0) {
            break;
        }
        read = line_end + 2;
        memmove(write, read, size);
        write += size;
        read += size + 2;
    }
    *write = '\0';
    return (size_t)(write - body);
}

/* http_request, waiting up to `patience_s` seconds for each read or write. */
static http_response http_request_within(const char *base_url, const char *method,
                                         const char *path, const char *body, int patience_s) {
    http_response response = {0, NULL};
    char host[256];
    char port[16];
    char *request;
    char *raw;
    char *body_start;
    size_t body_len = body ? strlen(body) : 0;
    size_t raw_len = 0;
    size_t request_cap;
    int request_len;
    int fd;
    if (parse_base_url(base_url, host, sizeof host, port, sizeof port) != 0) {
        fprintf(stderr, "bad base URL %s\n", base_url);
        return response;
    }
    fd = connect_to(host, port, patience_s);
    if (fd < 0) {
        return response;
    }
    request_cap = body_len + strlen(path) + 512;
    request = malloc(request_cap);
    if (request == NULL) {
        close(fd);
        return response;
    }
    request_len = snprintf(request, request_cap,
                           "%s %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n"
                           "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                           method, path, host, port, body_len, body ? body : "");
    if (request_len < 0 || send_all(fd, request, (size_t)request_len) != 0) {
        free(request);
        close(fd);
        return response;
    }
    free(request);
    raw = read_all(fd, &raw_len);
    close(fd);
    if (raw == NULL || sscanf(raw, "HTTP/1.%*d %d", &response.status) != 1) {
        free(raw);
        response.status = 0;
        return response;
    }
    body_start = strstr(raw, "\r\n\r\n");
    body_start = body_start ? body_start + 4 : raw + raw_len;
    body_len = raw_len - (size_t)(body_start - raw);
    response.body = malloc(body_len + 1);
    if (response.body != NULL) {
        int chunked;
        memcpy(response.body, body_start, body_len);
        response.body[body_len] = '\0';
        body_start[0] = '\0';
        /* Lower-case the headers to look for the transfer encoding. */
        for (char *c = raw; *c; c++) {
            *c = (char)(*c >= 'A' && *c <= 'Z' ? *c - 'A' + 'a' : *c);
        }
        chunked = strstr(raw, "transfer-encoding: chunked") != NULL;
        if (chunked) {
            dechunk(response.body);
        }
    }
    free(raw);
    return response;
}

void http_response_free(http_response *response) {
    free(response->body);
    response->body = NULL;
}

http_response http_request(const char *base_url, const char *method, const char *path,
                           const char *body) {
    return http_request_within(base_url, method, path, body, 90);
}

/* ---- the mock orchestrator ----------------------------------------------------------- */

int mock_post(const char *path, const char *json_body) {
    http_response response =
        http_request(harness_env("KICI_E2E_CONTROL_URL"), "POST", path, json_body);
    int status = response.status;
    if (status != 200) {
        fprintf(stderr, "POST %s -> %d %s\n", path, status, response.body ? response.body : "");
    }
    http_response_free(&response);
    return status;
}

char *mock_wait(const char *type, const char *state, const char *job_id, int timeout_ms) {
    char path[512];
    http_response response;
    timeout_ms = harness_timeout_ms(timeout_ms);
    snprintf(path, sizeof path, "/wait?type=%s%s%s%s%s&timeoutMs=%d", type,
             state ? "&state=" : "", state ? state : "", job_id ? "&jobId=" : "",
             job_id ? job_id : "", timeout_ms);
    /* The socket outlasts the mock's own wait, so a 408 is what says "not seen". */
    response = http_request_within(harness_env("KICI_E2E_CONTROL_URL"), "GET", path, NULL,
                                   timeout_ms / 1000 + 30);
    if (response.status != 200) {
        fprintf(stderr, "GET %s -> %d %s\n", path, response.status,
                response.body ? response.body : "");
        http_response_free(&response);
        return NULL;
    }
    return response.body;
}

char *mock_received(void) {
    http_response response =
        http_request(harness_env("KICI_E2E_CONTROL_URL"), "GET", "/received", NULL);
    if (response.status != 200) {
        http_response_free(&response);
        return NULL;
    }
    return response.body;
}

/* The real orchestrator's dispatch (fixtures/real-orchestrator/job.dispatch.json), without a
 * checkout (repoUrl ""). Under 4095 characters, so it is one portable string literal. */
static const char DISPATCH_TEMPLATE[] =
    "{\"agentId\":\"%s\",\"dispatch\":{\"type\":\"job.dispatch\",\"messageId\":\"msg-%s\","
    "\"runId\":\"%s\",\"jobId\":\"%s\",\"repoUrl\":\"\",\"ref\":\"main\","
    "\"sha\":\"b9b71c346df582e282084848b408b388a24214a9\",\"lockFileUrl\":\"\","
    "\"jobConfig\":{\"source\":{\"file\":\".kici/workflows/c.ts\",\"export\":\"#default\"},"
    "\"workflowName\":\"c-tests\",\"name\":\"%s\",\"baseJobName\":\"%s\","
    "\"runsOnPick\":\"deterministic\",\"steps\":%s,\"needs\":[],\"cacheOrgId\":\"org_c\","
    "\"cacheRepoId\":\"c/tests\",\"cacheRefScope\":\"shared\",\"event\":{\"type\":\"push\","
    "\"targetBranch\":\"main\",\"payload\":{\"ref\":\"refs/heads/main\","
    "\"after\":\"b9b71c346df582e282084848b408b388a24214a9\",\"repository\":"
    "{\"full_name\":\"c/tests\",\"default_branch\":\"main\"}},\"provider\":\"local\"},"
    "\"provider\":\"local\"},\"timestamp\":%lld,\"orgId\":\"org_c\",\"repoId\":\"c/tests\","
    "\"cacheRefScope\":\"shared\",\"requestId\":\"req-%s\","
    "\"runPublicKey\":\"MCowBQYDK2VuAyEARa2aY9Tb+zXaoT7ReEfCUDr739N8qZeC3ygBFTVHEnw=\"%s%s}}";

int mock_dispatch(const char *agent_id, const char *run_id, const char *job_id,
                  const char *job_name, const char *steps_json, const char *secrets_json) {
    size_t cap = sizeof DISPATCH_TEMPLATE + strlen(agent_id) + 3 * strlen(job_id) +
                 strlen(run_id) + 2 * strlen(job_name) + strlen(steps_json) +
                 (secrets_json ? strlen(secrets_json) : 0) + 64;
    char *body = malloc(cap);
    struct timespec now;
    long long now_ms;
    int status;
    if (body == NULL) {
        return 0;
    }
    clock_gettime(CLOCK_REALTIME, &now);
    now_ms = (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
    snprintf(body, cap, DISPATCH_TEMPLATE, agent_id, job_id, run_id, job_id, job_name, job_name,
             steps_json, now_ms, job_id, secrets_json ? ",\"secrets\":" : "",
             secrets_json ? secrets_json : "");
    status = mock_post("/dispatch", body);
    free(body);
    return status;
}

/* ---- agents -------------------------------------------------------------------------- */

static void must(kici_result result, kici_error *err, const char *what) {
    if (result != KICI_RESULT_OK) {
        fprintf(stderr, "%s: %s %s\n", what, kici_result_str(result),
                err ? kici_error_message(err) : "");
        exit(2);
    }
}

kici_config *harness_config(const char *agent_id) {
    kici_config *config = NULL;
    kici_error *err = NULL;
    must(kici_config_new(&config, &err), err, "kici_config_new");
    const char *settings[][2] = {
        {"KICI_ORCHESTRATOR_URL", harness_env("KICI_E2E_WS_URL")},
        {"KICI_AGENT_TOKEN", harness_env("KICI_E2E_TOKEN")},
        {"KICI_AGENT_ID", agent_id},
        {"KICI_PORT", "0"},
        {"KICI_BIND_ADDRESS", "127.0.0.1"},
        {"KICI_CANCEL_GRACE_MS", "5000"},
        {"KICI_SHUTDOWN_GRACE_MS", "5000"},
    };
    size_t i;
    for (i = 0; i < sizeof settings / sizeof settings[0]; i++) {
        must(kici_config_set(config, settings[i][0], settings[i][1], &err), err, settings[i][0]);
    }
    return config;
}

static long long monotonic_ms(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

char *harness_wait_event(const kici_agent *agent, const char *needle1, const char *needle2,
                         int timeout_ms) {
    long long deadline = monotonic_ms() + harness_timeout_ms(timeout_ms);
    for (;;) {
        long long left = deadline - monotonic_ms();
        char *json = NULL;
        kici_result result;
        if (left < 0) {
            left = 0;
        }
        result = kici_agent_next_event(agent, (uint64_t)left, &json, NULL);
        if (result != KICI_RESULT_OK) {
            fprintf(stderr, "no event with %s %s: %s\n", needle1 ? needle1 : "",
                    needle2 ? needle2 : "", kici_result_str(result));
            return NULL;
        }
        if ((needle1 == NULL || strstr(json, needle1) != NULL) &&
            (needle2 == NULL || strstr(json, needle2) != NULL)) {
            return json;
        }
        kici_string_free(json);
    }
}
