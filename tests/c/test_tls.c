/*
 * test_tls.c: wss:// from C. tests/c/run.sh starts the mock orchestrator with `--tls CA_FILE`
 * (a server certificate signed by a CA it generates) and names the CA in KICI_E2E_TLS_CA_FILE.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

/* The mock's port, from its wss:// URL: what the handshake error names. */
static void mock_endpoint(char *out, size_t size) {
    const char *url = harness_env("KICI_E2E_WS_URL");
    const char *host = strstr(url, "://");
    size_t length;
    CHECK(strncmp(url, "wss://", 6) == 0 && host != NULL);
    host = host ? host + 3 : url;
    length = strcspn(host, "/");
    snprintf(out, size, "%.*s", (int)length, host);
}

static void test_wss_registers_with_the_ca_from_the_generic_setter(void) {
    kici_config *config = harness_config("c-tls-trusted");
    kici_agent *agent = NULL;
    kici_error *err = NULL;
    char *event;
    CHECK_CODE(KICI_RESULT_OK,
               kici_config_set(config, "KICI_TLS_CA_FILE", harness_env("KICI_E2E_TLS_CA_FILE"),
                               &err),
               err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_validate(config, &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);
    event = harness_wait_event(agent, "\"type\":\"registered\"", "c-tls-trusted", 30000);
    CHECK(event != NULL);
    kici_string_free(event);
    kici_agent_free(agent);
}

static void test_an_untrusted_certificate_is_a_clear_health_error(void) {
    kici_config *config = harness_config("c-tls-untrusted");
    kici_agent *agent = NULL;
    kici_error *err = NULL;
    http_response response;
    uint16_t port = 0;
    char base[64];
    char endpoint[128];
    char wait_path[96];
    char expected[256];
    CHECK_CODE(KICI_RESULT_OK, kici_agent_new(config, &agent, &err), err);
    kici_config_free(config);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_start(agent, &err), err);

    /* Refused, then retried: a certificate can be fixed, so the failure is not permanent. */
    snprintf(wait_path, sizeof wait_path, "/wait_tls_failures?count=2&timeoutMs=%d",
             harness_timeout_ms(30000));
    response = http_request(harness_env("KICI_E2E_CONTROL_URL"), "GET", wait_path, NULL);
    CHECK(response.status == 200);
    http_response_free(&response);

    mock_endpoint(endpoint, sizeof endpoint);
    snprintf(expected, sizeof expected,
             "\"lastError\":\"TLS handshake with %s failed: invalid peer certificate: "
             "UnknownIssuer\"",
             endpoint);
    CHECK_CODE(KICI_RESULT_OK, kici_agent_http_port(agent, &port, &err), err);
    snprintf(base, sizeof base, "http://127.0.0.1:%u", (unsigned)port);
    response = http_request(base, "GET", "/health", NULL);
    CHECK(response.status == 200 && response.body != NULL);
    if (response.body != NULL) {
        CHECK(strstr(response.body, expected) != NULL);
        CHECK(strstr(response.body, harness_env("KICI_E2E_TOKEN")) == NULL);
        CHECK(strstr(response.body, "stoppedReason") == NULL);
        if (strstr(response.body, expected) == NULL) {
            fprintf(stderr, "expected %s in /health: %s\n", expected, response.body);
        }
    }
    http_response_free(&response);
    response = http_request(base, "GET", "/ready", NULL);
    CHECK(response.status == 503);
    http_response_free(&response);
    kici_agent_free(agent);
}

static void test_a_ca_file_without_certificates_is_invalid(void) {
    kici_config *config = harness_config("c-tls-invalid");
    kici_error *err = NULL;
    CHECK_CODE(KICI_RESULT_OK,
               kici_config_set(config, "KICI_TLS_CA_FILE", "/nonexistent/ca.pem", &err), err);
    CHECK(kici_config_validate(config, &err) == KICI_RESULT_INVALID_CONFIG);
    CHECK(err != NULL && strstr(kici_error_message(err), "KICI_TLS_CA_FILE") != NULL);
    kici_error_free(err);
    err = NULL;
    /* "" removes the setting again. */
    CHECK_CODE(KICI_RESULT_OK, kici_config_set(config, "KICI_TLS_CA_FILE", "", &err), err);
    CHECK_CODE(KICI_RESULT_OK, kici_config_validate(config, &err), err);
    kici_config_free(config);
}

int main(void) {
    RUN_TEST(test_wss_registers_with_the_ca_from_the_generic_setter);
    RUN_TEST(test_an_untrusted_certificate_is_a_clear_health_error);
    RUN_TEST(test_a_ca_file_without_certificates_is_invalid);
    return harness_finish("test_tls");
}
