/* test_taskweight.c — uncertainty weighting: s_k converges to log(loss_weight_k * L_k), the noisier task
 * gets the smaller weight, absent tasks do not move, and fixed weighting is the identity. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>

#include "worker/taskweight.h"

static void test_converges_to_log_loss(void **state) {
    (void)state;
    st_taskw w;
    st_taskw_init(&w, 2, 1, 0.05);
    double lw[2] = {1.0, 1.0}, mean[2] = {0.5, 3.0};
    int present[2] = {1, 1};
    for (int i = 0; i < 3000; i++) st_taskw_update(&w, lw, mean, present);
    assert_true(fabs(w.s[0] - log(0.5)) < 1e-2);
    assert_true(fabs(w.s[1] - log(3.0)) < 1e-2);
    /* the hard task (higher loss) ends with the smaller weight */
    assert_true(st_taskw_scale(&w, 1) < st_taskw_scale(&w, 0));
    assert_true(fabs(st_taskw_scale(&w, 0) * mean[0] - 1.0) < 2e-2);
}

static void test_absent_task_frozen(void **state) {
    (void)state;
    st_taskw w;
    st_taskw_init(&w, 2, 1, 0.05);
    double lw[2] = {1.0, 2.0}, mean[2] = {1.5, 0.0};
    int present[2] = {1, 0};
    for (int i = 0; i < 10; i++) st_taskw_update(&w, lw, mean, present);
    assert_true(w.s[0] > 0.0);
    assert_true(w.s[1] == 0.0 && w.step[1] == 0);
    assert_true(st_taskw_penalty(&w, present) == w.s[0]);
}

static void test_fixed_is_identity(void **state) {
    (void)state;
    st_taskw w;
    st_taskw_init(&w, 3, 0, 0.05);
    double lw[3] = {1, 1, 1}, mean[3] = {1, 2, 3};
    int present[3] = {1, 1, 1};
    st_taskw_update(&w, lw, mean, present);
    for (int k = 0; k < 3; k++) assert_true(st_taskw_scale(&w, k) == 1.0);
    assert_true(st_taskw_penalty(&w, present) == 0.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_converges_to_log_loss),
        cmocka_unit_test(test_absent_task_frozen),
        cmocka_unit_test(test_fixed_is_identity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
