/* test_loader.c — splits, epoch coverage, world-size independence, mixture proportions, resume.
 * Datasets are built in memory with token value = global position (+ a per-task base), so every
 * sample can be traced back to the exact tokens and documents it came from. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "worker/loader.h"

static const double SPLIT[3] = {0.8, 0.1, 0.1};

/* n_docs documents of pseudo-random length in [min_len, max_len]; token i = base + i;
 * loss_mask[i] = (token % 3 != 0). */
static st_dataset make_ds(uint64_t n_docs, uint64_t min_len, uint64_t max_len, uint32_t base, uint64_t seed) {
    st_dataset ds = {0};
    ds.doc_offsets = malloc((n_docs + 1) * sizeof(uint64_t));
    ds.doc_offsets[0] = 0;
    uint64_t x = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    for (uint64_t d = 0; d < n_docs; d++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        ds.doc_offsets[d + 1] = ds.doc_offsets[d] + min_len + (x >> 33) % (max_len - min_len + 1);
    }
    ds.n_docs = n_docs;
    ds.n_tokens = ds.doc_offsets[n_docs];
    ds.tokens = malloc(ds.n_tokens * sizeof(uint32_t));
    ds.loss_mask = malloc(ds.n_tokens);
    for (uint64_t i = 0; i < ds.n_tokens; i++) {
        ds.tokens[i] = base + (uint32_t)i;
        ds.loss_mask[i] = ds.tokens[i] % 3 != 0;
    }
    ds.vocab_size = (int64_t)base + (int64_t)ds.n_tokens;
    ds.eos_id = -1;
    return ds;
}

static int init1(st_loader *L, const st_dataset *ds, int T, uint64_t seed) {
    const st_dataset *dss[1] = {ds};
    return st_loader_init(L, 1, dss, NULL, NULL, ST_MIXING_PROPORTIONAL, 1.0, 0, SPLIT, T, seed);
}

/* Which document of ds holds token position p. */
static uint64_t doc_of(const st_dataset *ds, uint64_t p) {
    uint64_t d = 0;
    while (ds->doc_offsets[d + 1] <= p) d++;
    return d;
}

static void test_split(void **state) {
    (void)state;
    st_dataset ds = make_ds(103, 3, 20, 0, 1);
    st_loader a, b, c;
    assert_int_equal(init1(&a, &ds, 4, 42), 0);
    assert_int_equal(init1(&b, &ds, 4, 42), 0);
    assert_int_equal(init1(&c, &ds, 4, 43), 0);
    const st_loader_task *ta = &a.tasks[0], *tb = &b.tasks[0], *tc = &c.tasks[0];
    assert_int_equal(ta->n_docs[0], 82); /* round(0.8 * 103) */
    assert_int_equal(ta->n_docs[1], 10);
    assert_int_equal(ta->n_docs[2], 11);
    int seen[103] = {0}, same_as_other_seed = 1;
    for (int s = 0; s < 3; s++) {
        uint64_t tokens = 0;
        assert_memory_equal(ta->docs[s], tb->docs[s], ta->n_docs[s] * sizeof(uint64_t));
        for (uint64_t i = 0; i < ta->n_docs[s]; i++) {
            seen[ta->docs[s][i]]++;
            tokens += ds.doc_offsets[ta->docs[s][i] + 1] - ds.doc_offsets[ta->docs[s][i]];
            if (ta->docs[s][i] != tc->docs[s][i]) same_as_other_seed = 0;
        }
        assert_int_equal(tokens, ta->n_tokens[s]);
    }
    for (int d = 0; d < 103; d++) assert_int_equal(seen[d], 1); /* every doc in exactly one split */
    assert_false(same_as_other_seed);
    st_loader_free(&a);
    st_loader_free(&b);
    st_loader_free(&c);

    /* Few documents: train gets one even when 0.8*D rounds to 0; val/test may be empty. */
    st_dataset one = make_ds(1, 50, 50, 0, 2);
    assert_int_equal(init1(&a, &one, 4, 1), 0);
    assert_int_equal(a.tasks[0].n_docs[0], 1);
    assert_int_equal(a.tasks[0].n_docs[1] + a.tasks[0].n_docs[2], 0);
    st_loader_eval it;
    assert_int_equal(st_loader_eval_begin(&a, 0, ST_SPLIT_VAL, &it), 0);
    int32_t in[4], tg[4];
    float m[4];
    assert_int_equal(st_loader_eval_next(&it, in, tg, m), 0);
    st_loader_free(&a);
    st_dataset_free(&one);
    st_dataset_free(&ds);
}

static void test_epoch_coverage(void **state) {
    (void)state;
    enum { T = 7 };
    st_dataset ds = make_ds(40, 1, 30, 0, 3);
    st_loader L;
    assert_int_equal(init1(&L, &ds, T, 9), 0);
    const st_loader_task *t = &L.tasks[0];
    uint64_t n_train = t->n_tokens[0], n_win = t->n_windows;
    assert_int_equal(n_win, (n_train - 1) / T);
    int *in_train = calloc(ds.n_tokens, sizeof(int));
    for (uint64_t i = 0; i < t->n_docs[0]; i++)
        for (uint64_t p = ds.doc_offsets[t->docs[0][i]]; p < ds.doc_offsets[t->docs[0][i] + 1]; p++) in_train[p] = 1;
    int32_t in[T], tg[T];
    float m[T];
    int task;
    for (int epoch = 0; epoch < 3; epoch++) {
        int *used = calloc(ds.n_tokens, sizeof(int));
        uint64_t used_count = 0;
        for (uint64_t w = 0; w < n_win; w++) {
            assert_int_equal(st_loader_next(&L, 1, 0, 1, in, tg, m, &task), 0);
            assert_int_equal(task, 0);
            for (int j = 0; j < T; j++) {
                assert_true(in_train[in[j]] && in_train[tg[j]]);
                assert_true(m[j] == (float)(tg[j] % 3 != 0)); /* the mask of the target token */
                if (j + 1 < T) assert_int_equal(tg[j], in[j + 1]);
                /* Consecutive within a document, or a jump from a doc's end to another doc's start. */
                if (tg[j] != in[j] + 1) {
                    assert_int_equal(ds.doc_offsets[doc_of(&ds, (uint64_t)in[j]) + 1], (uint64_t)in[j] + 1);
                    assert_int_equal(ds.doc_offsets[doc_of(&ds, (uint64_t)tg[j])], (uint64_t)tg[j]);
                }
                used[in[j]]++; /* stride T: each train token is an input at most once per epoch */
                used_count++;
            }
        }
        for (uint64_t p = 0; p < ds.n_tokens; p++) assert_true(used[p] <= 1);
        assert_int_equal(used_count, n_win * T);
        /* Only the tail (fewer than T+1 tokens... minus the shared last target) is left out. */
        assert_true(n_train - used_count <= T);
        free(used);
        assert_int_equal(t->window, n_win);
    }
    assert_int_equal(t->epoch, 2);
    free(in_train);
    st_loader_free(&L);
    st_dataset_free(&ds);
}

/* Runs `steps` steps of a 2-task mixture on `world` simulated ranks (one loader each) and returns
 * the concatenation of the ranks' samples, step by step. */
static void run_world(const st_dataset *const *dss, int world, int global_batch, int steps, int T, int32_t *inputs,
                      int32_t *targets, float *mask, int *tasks) {
    st_loader *L = calloc((size_t)world, sizeof *L);
    const char *names[2] = {"a", "b"};
    for (int r = 0; r < world; r++)
        assert_int_equal(st_loader_init(&L[r], 2, dss, names, NULL, ST_MIXING_TEMPERATURE, 2.0, 0, SPLIT, T, 77), 0);
    int per = global_batch / world;
    for (int s = 0; s < steps; s++)
        for (int r = 0; r < world; r++) {
            size_t at = (size_t)s * global_batch + (size_t)r * per;
            assert_int_equal(st_loader_next(&L[r], global_batch, r * per, per, inputs + at * T, targets + at * T,
                                            mask + at * T, tasks + at), 0);
        }
    for (int r = 0; r < world; r++) st_loader_free(&L[r]);
    free(L);
}

static void test_world_size_independence(void **state) {
    (void)state;
    enum { T = 5, G = 8, STEPS = 5, N = STEPS * G };
    st_dataset a = make_ds(30, 2, 12, 0, 4), b = make_ds(20, 2, 9, 100000, 5); /* small: epochs wrap */
    const st_dataset *dss[2] = {&a, &b};
    int32_t in[3][N * T], tg[3][N * T];
    float m[3][N * T];
    int task[3][N];
    const int worlds[3] = {1, 2, 4};
    for (int w = 0; w < 3; w++) run_world(dss, worlds[w], G, STEPS, T, in[w], tg[w], m[w], task[w]);
    for (int w = 1; w < 3; w++) {
        assert_memory_equal(in[0], in[w], sizeof in[0]);
        assert_memory_equal(tg[0], tg[w], sizeof tg[0]);
        assert_memory_equal(m[0], m[w], sizeof m[0]);
        assert_memory_equal(task[0], task[w], sizeof task[0]);
    }
    int count[2] = {0};
    for (int i = 0; i < N; i++) {
        count[task[0][i]]++;
        assert_true((task[0][i] == 1) == (in[0][i * T] >= 100000)); /* sample came from its task */
    }
    assert_true(count[0] > 0 && count[1] > 0);
    st_dataset_free(&a);
    st_dataset_free(&b);
}

static void check_proportions(const st_dataset *const *dss, const double *weights, st_mixing_strategy strategy,
                              double temperature, int64_t cap, const double *want) {
    enum { T = 4, G = 100, STEPS = 100 };
    st_loader L;
    assert_int_equal(st_loader_init(&L, 3, dss, NULL, weights, strategy, temperature, cap, SPLIT, T, 5), 0);
    double p[3];
    st_loader_probabilities(&L, p);
    int32_t *in = malloc(G * T * sizeof(int32_t)), *tg = malloc(G * T * sizeof(int32_t));
    float *m = malloc(G * T * sizeof(float));
    int task[G], count[3] = {0};
    for (int s = 0; s < STEPS; s++) {
        assert_int_equal(st_loader_next(&L, G, 0, G, in, tg, m, task), 0);
        for (int i = 0; i < G; i++) count[task[i]]++;
    }
    for (int k = 0; k < 3; k++) {
        if (fabs(p[k] - want[k]) > 1e-12) fail_msg("strategy %d: p[%d] = %g, want %g", (int)strategy, k, p[k], want[k]);
        double freq = count[k] / (double)(G * STEPS);
        if (fabs(freq - want[k]) > 0.02) fail_msg("strategy %d: task %d drawn %.4f, want %.4f", (int)strategy, k, freq, want[k]);
    }
    free(in);
    free(tg);
    free(m);
    st_loader_free(&L);
}

static void test_proportions(void **state) {
    (void)state;
    st_dataset d[3] = {make_ds(50, 5, 30, 0, 6), make_ds(100, 20, 60, 0, 7), make_ds(200, 40, 80, 0, 8)};
    const st_dataset *dss[3] = {&d[0], &d[1], &d[2]};
    st_loader L;
    assert_int_equal(st_loader_init(&L, 3, dss, NULL, NULL, ST_MIXING_PROPORTIONAL, 1.0, 0, SPLIT, 4, 5), 0);
    double n[3];
    for (int k = 0; k < 3; k++) n[k] = (double)L.tasks[k].n_windows; /* train windows, re-derived below */
    for (int k = 0; k < 3; k++) assert_true(n[k] == (double)((L.tasks[k].n_tokens[0] - 1) / 4));
    st_loader_free(&L);
    assert_true(n[0] < n[1] && n[1] < n[2]);

    double want[3], sum = 0;
    for (int k = 0; k < 3; k++) sum += n[k];
    for (int k = 0; k < 3; k++) want[k] = n[k] / sum;
    check_proportions(dss, NULL, ST_MIXING_PROPORTIONAL, 1.0, 0, want);

    int64_t cap = (int64_t)n[1] / 2; /* caps tasks 1 and 2 */
    double c[3];
    sum = 0;
    for (int k = 0; k < 3; k++) sum += c[k] = fmin(n[k], (double)cap);
    for (int k = 0; k < 3; k++) want[k] = c[k] / sum;
    check_proportions(dss, NULL, ST_MIXING_PROPORTIONAL, 1.0, cap, want);

    sum = 0;
    for (int k = 0; k < 3; k++) sum += c[k] = pow(n[k], 1.0 / 3.0);
    for (int k = 0; k < 3; k++) want[k] = c[k] / sum;
    check_proportions(dss, NULL, ST_MIXING_TEMPERATURE, 3.0, 0, want);

    const double weights[3] = {5, 1, 2};
    for (int k = 0; k < 3; k++) want[k] = weights[k] / 8.0;
    check_proportions(dss, weights, ST_MIXING_WEIGHTS, 1.0, 0, want);
    for (int k = 0; k < 3; k++) st_dataset_free(&d[k]);
}

static void test_state_restore(void **state) {
    (void)state;
    enum { T = 6, G = 6, MORE = 9 };
    st_dataset a = make_ds(15, 3, 15, 0, 10), b = make_ds(12, 3, 15, 50000, 11);
    const st_dataset *dss[2] = {&a, &b};
    const double weights[2] = {1, 3};
    st_loader L1, L2;
    assert_int_equal(st_loader_init(&L1, 2, dss, NULL, weights, ST_MIXING_WEIGHTS, 1, 0, SPLIT, T, 3), 0);
    int32_t in1[MORE][G * T], in2[MORE][G * T], tg[G * T];
    float m[G * T];
    int task1[MORE][G], task2[MORE][G];
    for (int s = 0; s < 7; s++) assert_int_equal(st_loader_next(&L1, G, 0, G, in1[0], tg, m, task1[0]), 0);
    uint64_t words[64];
    assert_true(st_loader_state_words(&L1) <= 64);
    st_loader_state_save(&L1, words);
    for (int s = 0; s < MORE; s++) assert_int_equal(st_loader_next(&L1, G, 0, G, in1[s], tg, m, task1[s]), 0);
    assert_true(L1.tasks[0].epoch + L1.tasks[1].epoch > 0); /* the run crossed an epoch boundary */

    assert_int_equal(st_loader_init(&L2, 2, dss, NULL, weights, ST_MIXING_WEIGHTS, 1, 0, SPLIT, T, 3), 0);
    assert_int_equal(st_loader_state_restore(&L2, words, st_loader_state_words(&L2)), 0);
    /* Resume on "two ranks": halves of the batch from two restored loaders give the same samples. */
    st_loader L3;
    assert_int_equal(st_loader_init(&L3, 2, dss, NULL, weights, ST_MIXING_WEIGHTS, 1, 0, SPLIT, T, 3), 0);
    assert_int_equal(st_loader_state_restore(&L3, words, st_loader_state_words(&L3)), 0);
    for (int s = 0; s < MORE; s++) {
        assert_int_equal(st_loader_next(&L2, G, 0, G / 2, in2[s], tg, m, task2[s]), 0);
        assert_int_equal(st_loader_next(&L3, G, G / 2, G / 2, in2[s] + G / 2 * T, tg, m, task2[s] + G / 2), 0);
    }
    assert_memory_equal(in1, in2, sizeof in1);
    assert_memory_equal(task1, task2, sizeof task1);
    st_loader_free(&L2);

    /* A different seed is refused. */
    assert_int_equal(st_loader_init(&L2, 2, dss, NULL, weights, ST_MIXING_WEIGHTS, 1, 0, SPLIT, T, 4), 0);
    assert_true(st_loader_state_restore(&L2, words, st_loader_state_words(&L2)) < 0);
    assert_non_null(strstr(st_error(), "seed"));
    st_loader_free(&L1);
    st_loader_free(&L2);
    st_loader_free(&L3);
    st_dataset_free(&a);
    st_dataset_free(&b);
}

static void test_eval_and_errors(void **state) {
    (void)state;
    enum { T = 3 };
    st_dataset ds = make_ds(60, 2, 10, 0, 12);
    st_loader L;
    assert_int_equal(init1(&L, &ds, T, 8), 0);
    const st_loader_task *t = &L.tasks[0];
    /* Eval windows: val docs in file order, stride T, partial tail dropped. */
    uint64_t n_val = t->n_tokens[ST_SPLIT_VAL], pos = 0;
    uint32_t *stream = malloc(n_val * sizeof(uint32_t));
    for (uint64_t i = 0; i < t->n_docs[ST_SPLIT_VAL]; i++) {
        uint64_t d = t->docs[ST_SPLIT_VAL][i];
        if (i > 0) assert_true(d > t->docs[ST_SPLIT_VAL][i - 1]);
        for (uint64_t p = ds.doc_offsets[d]; p < ds.doc_offsets[d + 1]; p++) stream[pos++] = ds.tokens[p];
    }
    st_loader_eval it;
    assert_int_equal(st_loader_eval_begin(&L, 0, ST_SPLIT_VAL, &it), 0);
    int32_t in[T], tg[T];
    float m[T];
    uint64_t w = 0;
    while (st_loader_eval_next(&it, in, tg, m)) {
        for (int j = 0; j < T; j++) {
            assert_int_equal(in[j], stream[w * T + j]);
            assert_int_equal(tg[j], stream[w * T + j + 1]);
        }
        w++;
    }
    assert_int_equal(w, (n_val - 1) / T);
    free(stream);
    st_loader_free(&L);

    /* Errors name the task and the numbers. */
    const st_dataset *dss[2] = {&ds, &ds};
    const char *names[2] = {"qa", "chat"};
    assert_true(st_loader_init(&L, 2, dss, names, NULL, ST_MIXING_PROPORTIONAL, 1, 0, SPLIT, 100000, 1) < 0);
    assert_non_null(strstr(st_error(), "task 'qa': its train split has"));
    assert_non_null(strstr(st_error(), "seq_len+1 = 100001"));
    const double bad_w[2] = {1, 0};
    assert_true(st_loader_init(&L, 2, dss, names, bad_w, ST_MIXING_WEIGHTS, 1, 0, SPLIT, 4, 1) < 0);
    assert_non_null(strstr(st_error(), "task 'chat': weight must be > 0"));
    assert_true(st_loader_init(&L, 2, dss, names, NULL, (st_mixing_strategy)7, 1, 0, SPLIT, 4, 1) < 0);
    assert_non_null(strstr(st_error(), "mixing.strategy 7 is not"));
    assert_true(st_loader_init(&L, 2, dss, names, NULL, ST_MIXING_TEMPERATURE, 0, 0, SPLIT, 4, 1) < 0);
    const double bad_split[3] = {0.5, 0.1, 0.1};
    assert_true(st_loader_init(&L, 2, dss, names, NULL, ST_MIXING_PROPORTIONAL, 1, 0, bad_split, 4, 1) < 0);
    assert_non_null(strstr(st_error(), "sum to"));
    st_dataset empty = {0};
    const st_dataset *with_empty[2] = {&ds, &empty};
    assert_true(st_loader_init(&L, 2, with_empty, names, NULL, ST_MIXING_PROPORTIONAL, 1, 0, SPLIT, 4, 1) < 0);
    assert_non_null(strstr(st_error(), "task 'chat' has no data"));
    assert_int_equal(init1(&L, &ds, 4, 1), 0);
    int32_t x[8], y[8];
    float z[8];
    assert_true(st_loader_next(&L, 4, 3, 2, x, y, z, NULL) < 0); /* slots outside the batch */
    st_loader_free(&L);
    st_dataset_free(&ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split),
        cmocka_unit_test(test_epoch_coverage),
        cmocka_unit_test(test_world_size_independence),
        cmocka_unit_test(test_proportions),
        cmocka_unit_test(test_state_restore),
        cmocka_unit_test(test_eval_and_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
