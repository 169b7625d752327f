// header_cxx.cpp: the header compiles as C++17 and the library is usable from C++
// (built and run by tests/c/run.sh with -Wall -Wextra -Werror -pedantic).
#include "kici_agent.h"

#include <cstdio>
#include <cstring>

static_assert(KICI_RESULT_OK == 0, "KICI_RESULT_OK is 0");
static_assert(sizeof(kici_result) == 4, "kici_result is 32 bits wide");

extern "C" int32_t run_step(void *, const char *, const char *, kici_step_context *context) {
    return kici_step_context_write_line(context, "from C++", nullptr) == KICI_RESULT_OK ? 0 : 1;
}

int main() {
    kici_executor_vtable vtable{};
    vtable.struct_size = sizeof vtable;
    vtable.run_step = run_step;
    kici_executor *executor = nullptr;
    kici_error *err = nullptr;
    if (kici_executor_new(&vtable, "cxx", &executor, &err) != KICI_RESULT_OK) {
        std::fprintf(stderr, "kici_executor_new: %s\n", kici_error_message(err));
        kici_error_free(err);
        return 1;
    }
    kici_executor_free(executor);
    if (std::strcmp(kici_version(), KICI_AGENT_VERSION) != 0) {
        std::fprintf(stderr, "library %s, header %s\n", kici_version(), KICI_AGENT_VERSION);
        return 1;
    }
    std::printf("kici_agent %s works from C++17\n", kici_version());
    return 0;
}
