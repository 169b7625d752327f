/*
 * kici_agent_example.c: a C program that embeds a KiCI agent.
 *
 * The agent is configured from the KICI_* environment (KICI_ORCHESTRATOR_URL at least), runs
 * every step with the C executor below (it writes log lines and sets an output), and prints
 * the agent's events as JSON lines on stdout. The agent serves /health, /ready and /metrics on
 * KICI_PORT (8080; 0 picks a free port).
 *
 * Signals: the first SIGINT or SIGTERM drains (finish the running job, take no new one), the
 * second shuts down (cancel the running job). The program exits 0 once the agent stopped.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kici_agent.h>

/* Steps run by this executor, for the log line; callbacks may run on several threads. */
static atomic_int steps_run;

/* The C executor: one step attempt. Runs on an agent thread and may block. */
static int run_step(void *user_data, const char *job_json, const char *step_json,
                    kici_step_context *context) {
    const char *step_name = "?";
    const char *workspace = "?";
    char line[512];
    int number = atomic_fetch_add(&steps_run, 1) + 1;
    (void)user_data;
    (void)job_json;
    (void)step_json; /* the whole step as JSON: name, spec (with "run", "env", ...), attempt */

    kici_step_context_env(context, "KICI_STEP_NAME", &step_name, NULL);
    kici_step_context_workspace(context, &workspace, NULL);
    snprintf(line, sizeof line, "Hello from a C executor: step '%s' (#%d)", step_name, number);
    kici_step_context_write_line(context, line, NULL);
    snprintf(line, sizeof line, "workspace: %s", workspace);
    kici_step_context_write_line(context, line, NULL);

    /* Long work checks for cancellation between pieces. */
    for (int piece = 1; piece <= 3; piece++) {
        if (kici_step_context_is_cancelled(context)) {
            kici_step_context_set_failure(context, "cancelled before the work was done", NULL);
            return 1;
        }
        snprintf(line, sizeof line, "working... %d/3", piece);
        kici_step_context_write_line(context, line, NULL);
    }
    if (kici_step_context_set_output(context, "greeting", "hello from C", NULL) !=
        KICI_RESULT_OK) {
        kici_step_context_set_failure(context, "could not set the output", NULL);
        return 1;
    }
    return 0;
}

/* Signal handling on one thread: signals are blocked everywhere else (agent threads inherit
 * the mask), so no handler runs inside the agent. */
typedef struct signal_watch {
    sigset_t signals;
    kici_agent *agent;
    atomic_int done;
} signal_watch;

static void *watch_signals(void *arg) {
    signal_watch *watch = arg;
    int received = 0;
    for (;;) {
        int signal_number = 0;
        if (sigwait(&watch->signals, &signal_number) != 0 || atomic_load(&watch->done)) {
            return NULL;
        }
        received++;
        if (received == 1) {
            fprintf(stderr, "signal %d: draining (again to shut down)\n", signal_number);
            kici_agent_drain(watch->agent, NULL);
        } else {
            fprintf(stderr, "signal %d: shutting down\n", signal_number);
            kici_agent_shutdown(watch->agent, 0, NULL);
        }
    }
}

static int fail(const char *what, kici_result result, kici_error *err) {
    fprintf(stderr, "%s: %s: %s\n", what, kici_result_str(result), kici_error_message(err));
    kici_error_free(err);
    return 1;
}

int main(void) {
    kici_config *config = NULL;
    kici_agent *agent = NULL;
    kici_executor *executor = NULL;
    kici_executor_vtable vtable;
    kici_error *err = NULL;
    kici_result result;
    signal_watch watch;
    pthread_t watcher;
    size_t warnings = 0;
    uint16_t port = 0;
    const char *agent_id = NULL;

    if (strcmp(kici_version(), KICI_AGENT_VERSION) != 0) {
        fprintf(stderr, "header %s does not match library %s\n", KICI_AGENT_VERSION,
                kici_version());
        return 1;
    }
    result = kici_config_from_env(&config, &err);
    if (result != KICI_RESULT_OK) {
        return fail("configuration", result, err);
    }
    kici_config_warning_count(config, &warnings, NULL);
    for (size_t i = 0; i < warnings; i++) {
        const char *warning = NULL;
        if (kici_config_warning(config, i, &warning, NULL) == KICI_RESULT_OK) {
            fprintf(stderr, "warning: %s\n", warning);
        }
    }
    result = kici_agent_new(config, &agent, &err);
    kici_config_free(config); /* the agent keeps its own copy */
    if (result != KICI_RESULT_OK) {
        return fail("agent", result, err);
    }

    memset(&vtable, 0, sizeof vtable);
    vtable.struct_size = sizeof vtable;
    vtable.run_step = run_step;
    result = kici_executor_new(&vtable, "c-example", &executor, &err);
    if (result == KICI_RESULT_OK) {
        result = kici_agent_register_default_executor(agent, executor, &err);
    }
    kici_executor_free(executor); /* the agent keeps its own reference */
    if (result != KICI_RESULT_OK) {
        kici_agent_free(agent);
        return fail("executor", result, err);
    }

    sigemptyset(&watch.signals);
    sigaddset(&watch.signals, SIGINT);
    sigaddset(&watch.signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &watch.signals, NULL);
    watch.agent = agent;
    atomic_init(&watch.done, 0);

    result = kici_agent_start(agent, &err);
    if (result != KICI_RESULT_OK) {
        kici_agent_free(agent);
        return fail("start", result, err);
    }
    if (pthread_create(&watcher, NULL, watch_signals, &watch) != 0) {
        kici_agent_free(agent);
        fprintf(stderr, "could not start the signal thread\n");
        return 1;
    }
    kici_agent_id(agent, &agent_id, NULL);
    kici_agent_http_port(agent, &port, NULL);
    fprintf(stderr, "agent %s started; /health, /ready and /metrics on port %u\n", agent_id,
            (unsigned)port);

    /* The host owns the event loop: print every event until the agent stopped. */
    for (;;) {
        char *event = NULL;
        result = kici_agent_next_event(agent, KICI_WAIT_FOREVER, &event, &err);
        if (result != KICI_RESULT_OK) {
            break;
        }
        printf("%s\n", event);
        fflush(stdout);
        kici_string_free(event);
    }
    if (result != KICI_RESULT_CLOSED) {
        fail("events", result, err);
    } else {
        kici_error_free(err);
    }

    /* Wake the signal thread so that it ends, then release the agent. */
    atomic_store(&watch.done, 1);
    pthread_kill(watcher, SIGTERM);
    pthread_join(watcher, NULL);
    kici_agent_free(agent);
    fprintf(stderr, "agent stopped after %d steps\n", atomic_load(&steps_run));
    return result == KICI_RESULT_CLOSED ? 0 : 1;
}
