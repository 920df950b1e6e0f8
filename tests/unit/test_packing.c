/* test_packing.c — train.packing documents (worker/packing.h, worker/loader.h): the best-fit rule against
 * a naive re-implementation of its definition, what every position holds (traced back to the dataset:
 * token value = global position), epoch coverage, determinism, 1 vs 2 ranks, resume across epochs,
 * refusals, and the packing efficiency on an SFT-like length distribution. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "worker/loader.h"
#include "worker/packing.h"

/* Documents with the given lengths; token i = i; loss_mask[i] = (i % 5 != 0). */
static st_dataset make_ds(const uint64_t *lens, uint64_t n) {
    st_dataset ds = {0};
    ds.doc_offsets = malloc((n + 1) * sizeof(uint64_t));
    ds.doc_offsets[0] = 0;
    for (uint64_t d = 0; d < n; d++) ds.doc_offsets[d + 1] = ds.doc_offsets[d] + lens[d];
    ds.n_docs = n;
    ds.n_tokens = ds.doc_offsets[n];
    ds.tokens = malloc((ds.n_tokens + 1) * sizeof(uint32_t));
    ds.loss_mask = malloc(ds.n_tokens + 1);
    for (uint64_t i = 0; i < ds.n_tokens; i++) {
        ds.tokens[i] = (uint32_t)i;
        ds.loss_mask[i] = i % 5 != 0;
    }
    ds.vocab_size = (int64_t)ds.n_tokens + 1;
    ds.eos_id = -1;
    return ds;
}

static void free_ds(st_dataset *ds) {
    free(ds->doc_offsets);
    free(ds->tokens);
    free(ds->loss_mask);
}

static uint64_t lcg(uint64_t *x) {
    *x = *x * 6364136223846793005ULL + 1442695040888963407ULL;
    return *x >> 33;
}

/* Lengths 1 .. 3T+5 (some of one token, some longer than T+1). */
static st_dataset mixed_ds(uint64_t n, int T, uint64_t seed) {
    uint64_t *lens = malloc(n * sizeof *lens), x = seed;
    for (uint64_t d = 0; d < n; d++) lens[d] = 1 + lcg(&x) % (uint64_t)(3 * T + 5);
    st_dataset ds = make_ds(lens, n);
    free(lens);
    return ds;
}

/* The definition in packing.h, naively: pieces in order; each goes to the open sequence with the least
 * room that fits, ties to the one that has had that room longest; else a new sequence. Returns the
 * sequence of each piece (and the piece starts). */
static uint64_t naive_pack(const st_dataset *ds, const uint64_t *docs, uint64_t n, int T, uint64_t *seq_of,
                           uint64_t *src_of) {
    uint64_t np = 0, ns = 0;
    int *room = malloc((ds->n_tokens + 1) * sizeof(int));
    uint64_t *since = malloc((ds->n_tokens + 1) * sizeof(uint64_t));
    for (uint64_t d = 0; d < n; d++) {
        uint64_t st = ds->doc_offsets[docs[d]], len = ds->doc_offsets[docs[d] + 1] - st;
        for (uint64_t off = 0; off + 1 < len; off += (uint64_t)T) {
            int need = (int)((len - off < (uint64_t)T + 1 ? len - off : (uint64_t)T + 1) - 1);
            uint64_t best = UINT64_MAX;
            for (uint64_t s = 0; s < ns; s++) {
                if (room[s] < need || room[s] == 0) continue;
                if (best == UINT64_MAX || room[s] < room[best] || (room[s] == room[best] && since[s] < since[best]))
                    best = s;
            }
            if (best == UINT64_MAX) {
                best = ns++;
                room[best] = T;
            }
            room[best] -= need;
            since[best] = np;
            src_of[np] = st + off;
            seq_of[np++] = best;
        }
    }
    free(room);
    free(since);
    return ns;
}

static void test_best_fit_rule(void **state) {
    (void)state;
    const int T = 16;
    st_dataset ds = mixed_ds(300, T, 7);
    uint64_t *docs = malloc(ds.n_docs * sizeof *docs), *seq_of = malloc(ds.n_tokens * sizeof *seq_of);
    uint64_t *src_of = malloc(ds.n_tokens * sizeof *src_of);
    for (uint64_t d = 0; d < ds.n_docs; d++) docs[d] = (d * 37) % ds.n_docs; /* some order, not file order */
    uint64_t ns = naive_pack(&ds, docs, ds.n_docs, T, seq_of, src_of);
    st_packing p;
    assert_int_equal(st_packing_build(&p, &ds, docs, ds.n_docs, T), 0);
    assert_int_equal(p.n_seq, ns);
    /* sequence s holds the pieces the naive rule sent there, in placement order */
    uint64_t i = 0, np = p.n_pieces;
    for (uint64_t s = 0; s < ns; s++)
        for (uint64_t k = 0; k < np; k++)
            if (seq_of[k] == s) {
                assert_true(i < p.seq_first[s + 1] && i >= p.seq_first[s]);
                assert_int_equal(p.piece_src[i++], src_of[k]);
            }
    assert_int_equal(i, np);
    st_packing_free(&p);
    free(docs); free(seq_of); free(src_of);
    free_ds(&ds);
}

/* Checks one filled sequence against the dataset; adds each real target's token index to `seen`. */
static void check_sequence(const st_dataset *ds, int T, const int32_t *in, const int32_t *tg, const float *m,
                           const int32_t *seg, const int32_t *pos, uint8_t *seen, uint64_t *real) {
    for (int j = 0; j < T; j++) {
        if (j == 0) assert_true(pos[0] == 0 && seg[0] == 0);
        else if (seg[j] != seg[j - 1]) assert_true(seg[j] == seg[j - 1] + 1 && pos[j] == 0);
        else assert_int_equal(pos[j], pos[j - 1] + 1);
        if (m[j] == 0.0f && (uint64_t)tg[j] != (uint64_t)in[j] + 1) continue; /* padding */
        /* a real position: the target follows the input inside one document */
        uint64_t t = (uint64_t)tg[j];
        assert_int_equal(t, (uint64_t)in[j] + 1);
        uint64_t d = 0;
        while (ds->doc_offsets[d + 1] <= t) d++;
        assert_true(t > ds->doc_offsets[d]); /* never a document's first token */
        assert_true(m[j] == (float)ds->loss_mask[t]);
        /* the input's position in its piece: pos[j]; pieces start at doc offsets multiple of T */
        assert_int_equal((in[j] - (int64_t)ds->doc_offsets[d] - pos[j]) % T, 0);
        seen[t]++;
        (*real)++;
    }
}

static st_loader_options docs_opts(const st_dataset *const *dss, int n, int T, uint64_t seed) {
    st_loader_options o = {n, dss, NULL, NULL, ST_MIXING_PROPORTIONAL, 1.0, 0, {0.8, 0.1, 0.1}, T, seed,
                           ST_PACKING_DOCUMENTS};
    return o;
}

static void test_epoch_contents(void **state) {
    (void)state;
    const int T = 24;
    st_dataset ds = mixed_ds(200, T, 3);
    const st_dataset *dss[1] = {&ds};
    st_loader_options o = docs_opts(dss, 1, T, 11);
    st_loader L;
    assert_int_equal(st_loader_open(&L, &o), 0);
    uint64_t n_seq = L.tasks[0].n_windows;
    int32_t in[T], tg[T], seg[T], pos[T];
    float m[T];
    uint8_t *seen = calloc(ds.n_tokens, 1);
    uint64_t real = 0;
    for (uint64_t s = 0; s < n_seq; s++) { /* exactly epoch 0 */
        assert_int_equal(st_loader_next_docs(&L, 1, 0, 1, in, tg, m, NULL, seg, pos), 0);
        check_sequence(&ds, T, in, tg, m, seg, pos, seen, &real);
    }
    /* every target token of every train document exactly once, nothing of val/test */
    const st_loader_task *t = &L.tasks[0];
    uint8_t *is_train = calloc(ds.n_docs, 1);
    for (uint64_t i = 0; i < t->n_docs[ST_SPLIT_TRAIN]; i++) is_train[t->docs[ST_SPLIT_TRAIN][i]] = 1;
    uint64_t want = 0;
    for (uint64_t d = 0; d < ds.n_docs; d++)
        for (uint64_t k = ds.doc_offsets[d]; k < ds.doc_offsets[d + 1]; k++) {
            int expect = is_train[d] && k > ds.doc_offsets[d];
            want += (uint64_t)expect;
            assert_int_equal(seen[k], expect);
        }
    assert_int_equal(real, want);
    double eff = st_loader_packing_efficiency(&L, 0);
    assert_true(fabs(eff - (double)real / ((double)n_seq * T)) < 1e-12);
    /* stream mode still reports 1 and the eval iterator packs the val split too */
    st_loader_eval it;
    assert_int_equal(st_loader_eval_begin(&L, 0, ST_SPLIT_VAL, &it), 0);
    memset(seen, 0, ds.n_tokens);
    real = 0;
    while (st_loader_eval_next_docs(&it, in, tg, m, seg, pos)) check_sequence(&ds, T, in, tg, m, seg, pos, seen, &real);
    want = 0;
    for (uint64_t i = 0; i < t->n_docs[ST_SPLIT_VAL]; i++) {
        uint64_t d = t->docs[ST_SPLIT_VAL][i];
        want += ds.doc_offsets[d + 1] - ds.doc_offsets[d] - (ds.doc_offsets[d + 1] > ds.doc_offsets[d]);
    }
    assert_int_equal(real, want);
    free(seen); free(is_train);
    st_loader_free(&L);
    free_ds(&ds);
}

/* Steps of G slots: 1 rank vs 2 ranks vs a run resumed mid-way (the middle crosses epoch boundaries). */
static void test_ranks_and_resume(void **state) {
    (void)state;
    enum { T = 16, G = 6, STEPS = 40, CUT = 17 };
    st_dataset a = mixed_ds(20, T, 5), b = mixed_ds(30, T, 9);
    const st_dataset *dss[2] = {&a, &b};
    st_loader_options o = docs_opts(dss, 2, T, 21);
    static int32_t in1[STEPS][G * T], seg1[STEPS][G * T], pos1[STEPS][G * T], tg[G * T];
    static int32_t in2[G * T], seg2[G * T], pos2[G * T];
    static float m[G * T];
    st_loader L1, R0, R1, L2;
    assert_int_equal(st_loader_open(&L1, &o), 0);
    assert_int_equal(st_loader_open(&R0, &o), 0);
    assert_int_equal(st_loader_open(&R1, &o), 0);
    assert_true(L1.tasks[0].n_windows * 2 < STEPS * G / 2); /* several epochs of task 0 */
    uint64_t words[64];
    for (int s = 0; s < STEPS; s++) {
        assert_int_equal(st_loader_next_docs(&L1, G, 0, G, in1[s], tg, m, NULL, seg1[s], pos1[s]), 0);
        assert_int_equal(st_loader_next_docs(&R0, G, 0, G / 2, in2, tg, m, NULL, seg2, pos2), 0);
        assert_int_equal(st_loader_next_docs(&R1, G, G / 2, G / 2, in2 + G / 2 * T, tg, m, NULL, seg2 + G / 2 * T,
                                             pos2 + G / 2 * T), 0);
        assert_memory_equal(in1[s], in2, sizeof in2);
        assert_memory_equal(seg1[s], seg2, sizeof seg2);
        assert_memory_equal(pos1[s], pos2, sizeof pos2);
        if (s + 1 == CUT) {
            assert_true(st_loader_state_words(&L1) <= 64);
            st_loader_state_save(&L1, words);
        }
    }
    assert_int_equal(st_loader_open(&L2, &o), 0);
    assert_int_equal(st_loader_state_restore(&L2, words, st_loader_state_words(&L2)), 0);
    for (int s = CUT; s < STEPS; s++) {
        assert_int_equal(st_loader_next_docs(&L2, G, 0, G, in2, tg, m, NULL, seg2, pos2), 0);
        assert_memory_equal(in1[s], in2, sizeof in2);
        assert_memory_equal(pos1[s], pos2, sizeof pos2);
    }
    /* a documents state never resumes a stream loader, nor the reverse */
    st_loader S;
    o.packing = ST_PACKING_STREAM;
    assert_int_equal(st_loader_open(&S, &o), 0);
    assert_true(st_loader_state_restore(&S, words, st_loader_state_words(&S)) < 0);
    assert_non_null(strstr(st_error(), "train.packing documents"));
    st_loader_state_save(&S, words);
    assert_true(st_loader_state_restore(&L2, words, st_loader_state_words(&L2)) < 0);
    st_loader_free(&S);
    st_loader_free(&L1); st_loader_free(&L2); st_loader_free(&R0); st_loader_free(&R1);
    free_ds(&a); free_ds(&b);
}

/* SFT-like lengths (most 50..400 tokens, a tail to 3000) at T = 2048: best fit wastes < 5%. */
static void test_efficiency(void **state) {
    (void)state;
    const int T = 2048;
    uint64_t n = 4000, x = 99, *lens = malloc(n * sizeof *lens);
    for (uint64_t d = 0; d < n; d++) {
        double u = ((double)lcg(&x) + 0.5) / 2147483648.0; /* (0,1) */
        double len = 40.0 * exp(2.2 * u * u) + (double)(lcg(&x) % 200);
        if (lcg(&x) % 50 == 0) len *= 8; /* a few long ones */
        lens[d] = (uint64_t)len;
    }
    st_dataset ds = make_ds(lens, n);
    free(lens);
    const st_dataset *dss[1] = {&ds};
    st_loader_options o = docs_opts(dss, 1, T, 1);
    st_loader L;
    assert_int_equal(st_loader_open(&L, &o), 0);
    double eff = st_loader_packing_efficiency(&L, 0);
    printf("packing efficiency %.2f%% over %llu sequences\n", 100 * eff, (unsigned long long)L.tasks[0].n_windows);
    assert_true(eff >= 0.95);
    st_loader_free(&L);
    free_ds(&ds);
}

static void test_refusals(void **state) {
    (void)state;
    uint64_t ones[10] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    st_dataset ds = make_ds(ones, 10);
    const st_dataset *dss[1] = {&ds};
    st_loader_options o = docs_opts(dss, 1, 8, 1);
    st_loader L;
    assert_true(st_loader_open(&L, &o) < 0); /* no document with a target */
    assert_non_null(strstr(st_error(), "2 or more tokens"));
    o.packing = (st_packing_mode)7;
    assert_true(st_loader_open(&L, &o) < 0);
    free_ds(&ds);
    /* short documents with a long seq_len: stream refuses (fewer tokens than T+1), documents packs them */
    uint64_t lens[20];
    for (int i = 0; i < 20; i++) lens[i] = 5;
    ds = make_ds(lens, 20);
    o = docs_opts(dss, 1, 512, 1);
    assert_int_equal(st_loader_open(&L, &o), 0);
    assert_int_equal(L.tasks[0].n_windows, 1);
    st_loader_free(&L);
    o.packing = ST_PACKING_STREAM;
    assert_true(st_loader_open(&L, &o) < 0);
    free_ds(&ds);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_best_fit_rule),
        cmocka_unit_test(test_epoch_contents),
        cmocka_unit_test(test_ranks_and_resume),
        cmocka_unit_test(test_efficiency),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
