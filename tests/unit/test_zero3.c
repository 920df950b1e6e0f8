/* test_zero3.c — ZeRO-3 in worker/comm.c on one MPI rank (MPI_COMM_SELF); several ranks are covered by
 * tests/reference/test_zero3.py under mpirun.
 *
 *  - two AdamW steps of one micro-batch at stage 3 give bit-identical losses and weights to stage 0 on the
 *    same rank: with one rank the reduce-scatter is a copy and 0 + g is exact, so any difference is a
 *    bookkeeping error; with two micro-batches per step (gradients accumulate in shard_grads) they agree
 *    within float rounding (stage 3 adds per-micro-batch sums: (a + b) + (c + d) instead of
 *    ((a + b) + c) + d for a tied embedding, positions, repeated tokens);
 *  - after each backward the model's gradient buffer reads all zero (each layer's range given back) and
 *    st_model_zero_grad leaves it alone; the residency hooks are installed, and removed by st_comm_free;
 *  - the same with frozen layers and modules (the top layer's MLP trains: gathers go through the staging
 *    buffer, frozen weights never change);
 *  - a skipped (bad) step's reduced gradients do not leak into the next step (bit-identical to stage 0);
 *  - the fused optimizer tail: stages 0 and 1 (AdamW zeroes the gradients it reads, st_model_zero_grad
 *    skips them; the norm's sum of squares taken as backward finishes each range) are bit-identical to a
 *    plain step (st_optim_update without zeroing, the full st_model_zero_grad), with and without a
 *    skipped step; after each applied step the gradients (stage 3: the shard's) read all zero; every
 *    stage's st_comm_grad_sumsq equals a direct sum of squares of the reduced gradients within double
 *    rounding (n squares: relative 2n * 2^-53), stage 3's bit for bit, every ST_SUMSQ_CHUNK chunk of it
 *    taken as the reduce-scatter summed the chunk's last part into the shard (several ranks:
 *    integration.test_norm_in_reduction);
 *  - a device backend (host_memory 0) is accepted (worker/comm_zero3_dev.c: hooks installed, the model
 *    windowed, its weights this rank's shards, a step's losses bit-identical to stage 0 on the host), with
 *    every parameter trained and with frozen layers and modules (the frozen space's shard); several ranks
 *    and NCCL: cuda.nccl_path_zero3*, integration.test_zero3_device (adapters and prompt learning are
 *    refused there by name);
 *  - precision bf16 is accepted on the host (hooks installed; its losses: tests/reference/test_zero3.py). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "worker/comm.h"
#include "worker/model.h"
#include "worker/optim.h"

enum { B = 2, T = 16, N = B * T, L = 2 };

static void build(st_model *m, st_family family, const unsigned char *layers) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = family;
    snprintf(c.model_type, sizeof c.model_type, family == ST_FAMILY_GPT2 ? "gpt2" : "llama");
    c.n_layer = L; c.d_model = 32; c.n_head = 4; c.n_kv_head = family == ST_FAMILY_GPT2 ? 4 : 2; c.head_dim = 8;
    c.d_ff = 40; c.vocab = 47; c.max_seq = 16; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f;
    c.tied_embeddings = family == ST_FAMILY_GPT2; c.bos_id = c.eos_id = -1;
    assert_int_equal(st_model_build(m, &c, st_backend_cpu(1)), 0);
    assert_int_equal(st_model_init_random(m, 5), 0);
    unsigned char all[L] = {1, 1};
    m->grad_align = 1;
    assert_int_equal(st_model_set_trainable(m, layers ? layers : all, layers ? ST_MOD_MLP : ST_MOD_ALL), 0);
    assert_int_equal(st_model_alloc_activations(m, B, T), 0);
}

static int all_zero(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (x[i] != 0.0f) return 0;
    return 1;
}

static int skip_first_step; /* step 0 is "bad": reduced but not applied, as the trainer skips one */

#define PLAIN (-1) /* stage 0 with a plain update: st_optim_update, no zeroing, the full st_model_zero_grad */

/* Two steps of two micro-batches each; losses out, weights left in the model. */
static void train(st_model *m, int stage_arg, int accum, double loss[4]) {
    int stage = stage_arg == PLAIN ? 0 : stage_arg;
    st_comm c;
    st_optim o;
    st_optim_config oc = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f,
                          .schedule = ST_SCHED_CONSTANT, .total_steps = 2, .min_lr_ratio = 1.0f,
                          .layer_lr_decay = 1.0f};
    assert_int_equal(st_comm_init(&c, MPI_COMM_SELF, &(st_comm_options){.stage = stage}, m), 0);
    size_t lo, hi;
    st_comm_optim_range(&c, &lo, &hi);
    assert_int_equal(st_optim_init(&o, &oc, lo, hi, m, m->be), 0);
    if (stage == 3) assert_true(m->acquire && m->release && m->grad_ready);
    int32_t in[N], tg[N];
    float w[N];
    for (int s = 0; s < 2; s++) {
        st_model_zero_grad(m);
        for (int a = 0; a < accum; a++) {
            for (int i = 0; i < N; i++) {
                in[i] = (i * 7 + 3 * a + 11 * s) % 47;
                tg[i] = (i * 5 + a + s) % 47;
                w[i] = 1.0f / (float)(accum * N);
            }
            loss[2 * s + a] = st_model_forward(m, in, tg, w, 1);
            /* as the trainer: the fused norm on the last one (stage 3: taken as the shard sums each chunk) */
            int hooks = (stage <= 1 && stage_arg != PLAIN) || stage == 3;
            if (hooks) st_comm_backward_begin(&c, m, 0, a == accum - 1);
            st_model_backward(m);
            if (hooks) assert_int_equal(st_comm_backward_end(&c, m), 0);
            if (hooks && stage <= 1) assert_int_equal(c.sumsq_ready, a == accum - 1);
            if (stage == 3) assert_true(all_zero(m->grads, m->grad_alloc)); /* reduced and given back */
        }
        float *g = NULL;
        assert_int_equal(st_comm_reduce_grads(&c, m, &g), 0);
        double sq = st_comm_grad_sumsq(&c, m, g), direct = m->be->sumsq(g, hi - lo);
        if (!(fabs(sq - direct) <= 2.0 * (double)(hi - lo) * 0x1p-53 * direct))
            fail_msg("stage %d: sum of squares %.17g, directly %.17g", stage, sq, direct);
        if (stage == 3) { /* every chunk taken as the reduce-scatter finished it: the bits of one pass */
            assert_int_equal(c.sq_taken, c.sq_n);
            if (memcmp(&sq, &direct, sizeof sq)) fail_msg("stage 3: sum of squares %a, one pass %a", sq, direct);
        }
        assert_true(direct > 0);
        if (skip_first_step && s == 0) continue;
        if (stage_arg == PLAIN) st_optim_update(&o, m, g, 1e-2f, 1.0f);
        else assert_int_equal(st_comm_update_params(&c, m, &o, g, 1e-2f, 1.0f), 0);
        if (stage <= 1 && stage_arg != PLAIN) assert_true(all_zero(m->grads, m->grad_alloc));
        if (stage == 3) assert_true(all_zero(c.shard_grads, c.shard));
    }
    st_optim_free(&o, m->be);
    free(o.param_step);
    st_comm_free(&c);
    assert_null(m->acquire);
    assert_null(m->grad_ready);
}

/* Stages 0 (fused, `ref`: its losses and weights) and 1 against a plain step: bit-identical. */
static void check_fused_tail(st_family family, const unsigned char *layers, int accum, const double *lref,
                             const st_model *ref) {
    for (int stage = PLAIN; stage <= 1; stage += 2) {
        st_model p;
        build(&p, family, layers);
        double lp[4] = {0};
        train(&p, stage, accum, lp);
        assert_memory_equal(lp, lref, sizeof lp);
        assert_memory_equal(p.weights, ref->weights, p.n_weights * sizeof(float));
        st_model_free(&p);
    }
}

static void check_family(st_family family, const unsigned char *layers) {
    for (int accum = 1; accum <= 2; accum++) {
        st_model a, b;
        build(&a, family, layers);
        build(&b, family, layers);
        double la[4] = {0}, lb[4] = {0};
        train(&a, 0, accum, la);
        train(&b, 3, accum, lb);
        assert_true(la[accum] != la[0]); /* the weights did move */
        check_fused_tail(family, layers, accum, la, &a);
        if (accum == 1) {
            assert_memory_equal(la, lb, sizeof la);
            assert_memory_equal(a.weights, b.weights, a.n_weights * sizeof(float));
        } else { /* AdamW's first steps move each weight by about lr: a rounding-level gradient change may
                    flip a tiny update's size, not the loss beyond 1e-6 */
            for (int i = 0; i < 4; i++)
                if (!(fabs(la[i] - lb[i]) <= 1e-6 * fabs(la[i]))) fail_msg("loss %d: %.9g vs %.9g", i, la[i], lb[i]);
            for (size_t i = 0; i < a.n_weights; i++)
                if (!(fabsf(a.weights[i] - b.weights[i]) <= 1e-3f)) fail_msg("weight %zu differs", i);
        }
        st_model_free(&a);
        st_model_free(&b);
    }
}

static const unsigned char top_layer[L] = {0, 1};
static void test_llama_one_rank(void **state) { (void)state; check_family(ST_FAMILY_LLAMA, NULL); }
static void test_gpt2_tied_one_rank(void **state) { (void)state; check_family(ST_FAMILY_GPT2, NULL); }
static void test_frozen_one_rank(void **state) {
    (void)state;
    check_family(ST_FAMILY_LLAMA, top_layer);
    check_family(ST_FAMILY_GPT2, top_layer);
}

/* A skipped step's reduced gradients are not carried into the next step (the first reduction of a step
 * starts the shard from zero): stage 3 after a skipped step is bit-identical to stage 0 after one. */
static void test_skipped_step(void **state) {
    (void)state;
    skip_first_step = 1;
    st_model a, b;
    build(&a, ST_FAMILY_LLAMA, NULL);
    build(&b, ST_FAMILY_LLAMA, NULL);
    double la[4] = {0}, lb[4] = {0};
    train(&a, 0, 1, la);
    train(&b, 3, 1, lb);
    assert_memory_equal(la, lb, sizeof la);
    assert_memory_equal(a.weights, b.weights, a.n_weights * sizeof(float));
    check_fused_tail(ST_FAMILY_LLAMA, NULL, 1, la, &a);
    skip_first_step = 0;
    st_model_free(&a);
    st_model_free(&b);
}

/* One step of one micro-batch on m (stage `stage` on MPI_COMM_SELF); returns its loss. */
static double one_step(st_model *m, int stage) {
    st_comm c;
    st_optim o;
    st_optim_config oc = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, ST_SCHED_CONSTANT, 0, 0, 0.0f, 1.0f};
    size_t lo, hi;
    assert_int_equal(st_comm_init(&c, MPI_COMM_SELF, &(st_comm_options){.stage = stage}, m), 0);
    if (stage == 3) assert_true(m->acquire && m->windowed == !m->be->host_memory);
    st_comm_optim_range(&c, &lo, &hi);
    assert_int_equal(st_optim_init(&o, &oc, lo, hi, m, m->be), 0);
    int32_t in[B * T], tg[B * T];
    float w[B * T];
    for (int i = 0; i < B * T; i++) in[i] = (i * 7) % 47, tg[i] = (i * 5 + 1) % 47, w[i] = 1.0f / (B * T);
    double loss = 0;
    for (int s = 0; s < 2; s++) {
        st_model_zero_grad(m);
        loss = st_model_forward(m, in, tg, w, 1);
        st_comm_backward_begin(&c, m, 1, 1);
        st_model_backward(m);
        assert_int_equal(st_comm_backward_end(&c, m), 0);
        float *g;
        assert_int_equal(st_comm_reduce_grads(&c, m, &g), 0);
        assert_int_equal(st_comm_update_params(&c, m, &o, g, 1e-2f, 1.0f), 0);
    }
    loss = st_model_forward(m, in, tg, w, 0); /* after two updates */
    st_optim_free(&o, m->be);
    free(o.param_step);
    st_comm_free(&c);
    return loss;
}

static void device_case(st_family family, const unsigned char *layers) {
    st_model m, ref;
    build(&m, family, layers);
    build(&ref, family, layers);
    st_backend dev = *m.be; /* the same kernels, declared device memory: what the CUDA backend is */
    dev.host_memory = 0;
    dev.name = "cuda";
    m.be = &dev;
    double a = one_step(&m, 3), b = one_step(&ref, 0);
    if (a != b) fail_msg("device stage 3 loss %.9g != stage 0 %.9g (%s)", a, b, layers ? "frozen" : "full");
    assert_null(m.acquire);
    assert_null(m.weights); /* a device stage-3 communicator leaves the model without weights */
    assert_null(m.part_base);
    st_model_free(&m);
    st_model_free(&ref);
}

static const unsigned char top_layer_dev[L] = {0, 1};
static void test_device(void **state) {
    (void)state;
    device_case(ST_FAMILY_GPT2, NULL); /* tied embeddings: three gather buffers */
    /* frozen parameters (layer 0, the embeddings and the attention of layer 1): the frozen space's shard,
     * gathered with their group, no gradient */
    device_case(ST_FAMILY_LLAMA, top_layer_dev);
    device_case(ST_FAMILY_GPT2, top_layer_dev);
}

static void test_refusals(void **state) {
    (void)state;
    st_model m;
    build(&m, ST_FAMILY_LLAMA, NULL);
    assert_int_equal(st_model_set_precision(&m, ST_PRECISION_BF16), 0);
    st_comm c;
    assert_int_equal(st_comm_init(&c, MPI_COMM_SELF, &(st_comm_options){.stage = 3}, &m), 0);
    assert_non_null(m.acquire);
    st_comm_free(&c);
    assert_null(m.acquire);
    st_model_free(&m);
}

int main(void) {
    MPI_Init(NULL, NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_one_rank),
        cmocka_unit_test(test_gpt2_tied_one_rank),
        cmocka_unit_test(test_frozen_one_rank),
        cmocka_unit_test(test_skipped_step),
        cmocka_unit_test(test_device),
        cmocka_unit_test(test_refusals),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    MPI_Finalize();
    return rc;
}
