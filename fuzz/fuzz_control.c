/* fuzz_control.c — libFuzzer target over the control-request path the REP socket runs on every
 * message from the network: size check, protobuf decode, command and token validation
 * (st_control_decide). Invariants checked: never crash, the reason is always NUL-terminated, and no
 * control bit is raised unless the request carried the job's token.
 * Build: CC=clang cmake -S . -B build-fuzz -DSHARDTUNE_FUZZ=ON -DSHARDTUNE_CUDA=OFF
 * Run:   build-fuzz/fuzz_control -max_total_time=60 */
#include "coordinator/monitor/monitor_rules.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char job[] = "00112233445566778899aabbccddeeff";
    char why[256];
    int command;
    unsigned bits;
    memset(why, 'x', sizeof why);
    int ok = st_control_decide(data, size, job, &command, &bits, why, sizeof why);
    if (!memchr(why, 0, sizeof why)) abort();
    if (bits && (!ok || !memmem(data, size, job, sizeof job - 1))) abort();
    if (ok && (command < 0 || command > 4)) abort();
    /* the same input against a job without a token may only ever allow STATUS */
    ok = st_control_decide(data, size, NULL, &command, &bits, why, sizeof why);
    if (bits || (ok && command != 0)) abort();
    return 0;
}
