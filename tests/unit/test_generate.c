/* test_generate.c — token choice (st_gen_choose) on hand-made logits, where the right answer is known
 * without running a model: greedy ties, the repetition-penalty rule on both signs, top-k ties, the
 * top-p boundary, and that sampling never leaves the kept set; and the compare score helpers (Wilson
 * interval of a hand-worked case, bands at their edges), plus the sheet's escaping of answers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "coordinator/compare.h"
#include "test_tmpdir.h"
#include "worker/generate.h"

#define V 6

static st_gen_params greedy(void) {
    st_gen_params p;
    memset(&p, 0, sizeof p);
    p.max_new = 1;
    p.top_p = 1.0f;
    p.repetition_penalty = 1.0f;
    p.batch = 1;
    return p;
}

static int choose(const float *in, const int32_t *hist, int nh, const st_gen_params *p, st_rng *rng) {
    float l[V];
    unsigned char mark[V];
    int order[V];
    memcpy(l, in, sizeof l);
    return st_gen_choose(l, V, hist, nh, p, rng, mark, order);
}

static void test_greedy_and_penalty(void **state) {
    (void)state;
    st_gen_params p = greedy();
    st_rng rng;
    st_rng_seed(&rng, 1, 0);
    const float tie[V] = {0, 3, 1, 3, -2, 0};
    assert_int_equal(choose(tie, NULL, 0, &p, &rng), 1); /* exact tie: lowest id, as torch.argmax */
    /* penalty 2: id 1 (3 -> 1.5) and id 3 (3 -> 1.5) drop below id 2 (1); a negative logit is multiplied */
    const float l[V] = {0, 3, 1, 3, -0.4f, 0};
    p.repetition_penalty = 2.0f;
    const int32_t hist[] = {1, 3, 3, 1};
    assert_int_equal(choose(l, hist, 4, &p, &rng), 1); /* 1.5 == 1.5 > 1: lowest id */
    const int32_t h2[] = {1, 3, 5};
    const float l2[V] = {1.7f, 3, 1, 3, -0.4f, 3.2f};
    assert_int_equal(choose(l2, h2, 3, &p, &rng), 0); /* 1.5, 1.5, 1.6 all below id 0's 1.7 */
}

static void test_penalty_values(void **state) {
    (void)state;
    st_gen_params p = greedy();
    p.repetition_penalty = 2.0f;
    float l[V] = {4, -4, 2, -2, 1, 0};
    unsigned char mark[V];
    int order[V];
    st_rng rng;
    st_rng_seed(&rng, 1, 0);
    const int32_t hist[] = {0, 1, 1, 0, 3};
    st_gen_choose(l, V, hist, 5, &p, &rng, mark, order);
    /* once per distinct id: positive halved, negative doubled; others untouched */
    assert_true(l[0] == 2.0f && l[1] == -8.0f && l[2] == 2.0f && l[3] == -4.0f && l[4] == 1.0f && l[5] == 0.0f);
}

/* Draws many samples; returns how often each id came out. */
static void sample_counts(const float *l, const st_gen_params *p, int n, int *counts) {
    st_rng rng;
    st_rng_seed(&rng, 7, 3);
    memset(counts, 0, V * sizeof *counts);
    for (int i = 0; i < n; i++) counts[choose(l, NULL, 0, p, &rng)]++;
}

static void test_top_k_top_p_sets(void **state) {
    (void)state;
    const float l[V] = {2, 1, 2, 0, 1, -1};
    st_gen_params p = greedy();
    p.temperature = 1.0f;
    int c[V];
    p.top_k = 2; /* ids 0 and 2 (both 2) */
    sample_counts(l, &p, 2000, c);
    assert_true(c[0] > 0 && c[2] > 0 && c[1] + c[3] + c[4] + c[5] == 0);
    p.top_k = 3; /* the third largest is 1, tied by ids 1 and 4: both kept */
    sample_counts(l, &p, 2000, c);
    assert_true(c[1] > 0 && c[4] > 0 && c[3] + c[5] == 0);
    /* top-p: probabilities of {2,2,1,1,0,-1}; the two 2s hold 2e^2/Z */
    double z = 2 * exp(2) + 2 * exp(1) + exp(0) + exp(-1), two = 2 * exp(2) / z;
    p.top_k = 0;
    p.top_p = (float)(two - 1e-3); /* the mass above the second 2 is e^2/Z < top_p, so it stays; the 1s go */
    sample_counts(l, &p, 2000, c);
    assert_true(c[0] > 0 && c[2] > 0 && c[1] + c[3] + c[4] + c[5] == 0);
    p.top_p = (float)(two + 1e-3); /* now the mass above id 1 (the first 1) is below top_p: it is kept */
    sample_counts(l, &p, 2000, c);
    assert_true(c[1] > 0 && c[4] == 0 && c[3] + c[5] == 0);
    p.top_p = 1e-6f; /* at least one token: the top one (id 0 before id 2 on the tie) */
    sample_counts(l, &p, 200, c);
    assert_int_equal(c[0], 200);
}

static void test_wilson_and_bands(void **state) {
    (void)state;
    double lo, hi;
    st_wilson95(8, 10, &lo, &hi); /* the textbook case: [0.490, 0.943] */
    assert_true(fabs(lo - 0.4902) < 1e-4 && fabs(hi - 0.9433) < 1e-4);
    st_wilson95(0, 5, &lo, &hi);
    assert_true(lo == 0.0 && fabs(hi - 0.4345) < 1e-4);
    assert_string_equal(st_compare_band(0.3), "worse than the base");
    assert_string_equal(st_compare_band(0.45), "worse than the base");
    assert_string_equal(st_compare_band(0.49), "worse than the base");
    assert_string_equal(st_compare_band(0.495), "no real progress");
    assert_string_equal(st_compare_band(0.5), "no real progress");
    assert_string_equal(st_compare_band(0.505), "no real progress");
    assert_string_equal(st_compare_band(0.51), "not good enough");
    assert_string_equal(st_compare_band(0.55), "not good enough");
    assert_string_equal(st_compare_band(0.6), "not good enough");
    assert_string_equal(st_compare_band(0.7), "successful");
    assert_string_equal(st_compare_band(0.8), "successful");
    assert_string_equal(st_compare_band(0.81), "clear improvement");
}

static void test_sheet_escapes(void **state) {
    (void)state;
    char path[600];
    const char *dir = st_test_path("sheet");
    st_sheet_item it = {"a</script>", "p <b>", "</script><script>alert(1)</script>", "x & y"};
    assert_int_equal(st_sheet_write(dir, &it, 1, 5), 0);
    snprintf(path, sizeof path, "%s/sheet.html", dir);
    char *html = NULL;
    size_t len = 0;
    assert_int_equal(st_read_file(path, &html, &len), 0);
    const char *data = strstr(html, "id=\"sheet-data\">");
    assert_non_null(data);
    const char *end = strstr(data, "</script>");
    /* the first </script> after the data is the data element's own end: nothing inside closes it */
    assert_non_null(end);
    assert_null(memmem(data, (size_t)(end - data), "<", 1));
    assert_non_null(strstr(data, "\\u003c/script\\u003e\\u003cscript\\u003ealert(1)"));
    free(html);
    snprintf(path, sizeof path, "%s/key.json", dir);
    assert_int_equal(st_read_file(path, &html, &len), 0);
    char want[64];
    snprintf(want, sizeof want, "\"a</script>\": \"%c\"", st_sheet_tuned_side(5, 0));
    assert_non_null(strstr(html, want));
    free(html);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy_and_penalty), cmocka_unit_test(test_penalty_values),
        cmocka_unit_test(test_top_k_top_p_sets), cmocka_unit_test(test_wilson_and_bands),
        cmocka_unit_test(test_sheet_escapes),
    };
    return cmocka_run_group_tests(tests, st_test_dir_setup, st_test_dir_teardown);
}
