/* test_act_ckpt.c — activation checkpointing (memory.activation_checkpointing) in worker/model.c.
 *
 *  - losses, per-position losses and every gradient are bit-identical with and without checkpointing
 *    (memcmp, not a tolerance: backward recomputes with the same calls on the same inputs), for Llama
 *    (GQA, q/k biases; and Qwen3-style q/k norms) and GPT-2, in fp32 and bf16, with every layer trained
 *    and with only the top layer trained (backward stops early), over two steps with an update between.
 *  - the arena shrinks by exactly (L - 1) layers' saved tensors less their kept input, where a layer's
 *    size is measured independently as the arena difference between an L- and an (L+1)-layer model;
 *    st_model_activation_floats_ckpt (the planner's number) equals what the model allocates.
 *  - turning it on after activations exist re-lays them out; per-layer activations are refused.
 *  - the token-blocked MLP (model.c mlp_rows, forced small by SHARDTUNE_MLP_BLOCK_FLOATS: 3 blocks of 16 rows;
 *    under bf16 gate and up as two matmuls) against the unblocked run without checkpointing: BLAS splits a
 *    [16, n] product differently from a [48, n] one, so even the forward's rows may differ in the last bit;
 *    the losses of both steps and the per-position losses of the second, and the gradients, whose MLP weight / adapter sums (and under bf16 the split gate/up input
 *    gradient) add per block, within a derived tolerance: fp32, per tensor max |diff| <= 4 (N + 2 d_ff) eps32
 *    max |g| (two fp32 sums of at most N + 2 d_ff terms, each within gamma_n of the exact one); bf16,
 *    ||diff|| <= 2^-8 ||g|| (a last-bit fp32 change can move a bf16-rounded operand by one bf16 ulp, 2^-8
 *    relative), the losses within the same relative bound; LoRA adapters on all seven projections (fp32 and bf16) the same way; the arena is smaller and
 *    st_model_activation_floats_ckpt still equals what the model allocates.
 *  - kept inputs in bf16 (ST_MODEL_CKPT_BF16, memory.checkpoint_dtype: bf16, precision bf16): the arena
 *    shrinks by exactly L kept inputs' halves less one fp32 working copy, the planner's count equals the
 *    allocation; the run is deterministic (two runs bit-identical) and differs from the fp32-kept run (the
 *    residual stream is rounded at each layer boundary, D > 0) by little: each rounding moves an input by at
 *    most 2^-9 relative, so losses within L 2^-8 relative and every gradient within ||diff|| <= L 2^-7 ||g||
 *    (a wrong input in backward's recomputation would be off by O(1)); under fp32 the option is ignored
 *    (bit-identical to checkpointing with fp32 inputs). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kernels.h"
#include "worker/lora.h"
#include "worker/model.h"
#include "worker/train_kinds.h"

enum { B = 2, T = 24, N = B * T, L = 3 };

static st_model_config config(st_family family, int qk_norm, int n_layer) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = family;
    snprintf(c.model_type, sizeof c.model_type, family == ST_FAMILY_GPT2 ? "gpt2" : qk_norm ? "qwen3" : "llama");
    c.n_layer = n_layer; c.d_model = 32; c.n_head = 4; c.n_kv_head = family == ST_FAMILY_GPT2 ? 4 : 2;
    c.head_dim = 8; c.d_ff = 40; c.vocab = 53; c.max_seq = 32; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f;
    c.qkv_bias = family == ST_FAMILY_GPT2 || !qk_norm; c.qk_norm = qk_norm; c.bos_id = c.eos_id = -1;
    return c;
}

static void build_lora(st_model *m, const st_model_config *c, st_precision prec, int ckpt, int top_only, int lora) {
    assert_int_equal(st_model_build(m, c, st_backend_cpu(2)), 0);
    assert_int_equal(st_model_init_random(m, 7), 0);
    unsigned char layers[L];
    for (int l = 0; l < L; l++) layers[l] = !top_only || l == L - 1;
    m->grad_align = 1;
    unsigned mods = top_only ? ST_MOD_ATTN | ST_MOD_MLP | ST_MOD_HEAD : ST_MOD_ALL;
    if (lora) {
        st_lora_spec spec = {.r = 4, .alpha = 8.0, .targets = ST_LORA_LLAMA_ALL, .seed = 11};
        assert_int_equal(st_lora_attach(m, &spec), 0);
        mods = ST_MOD_LORA;
    }
    assert_int_equal(st_model_set_trainable(m, layers, mods), 0);
    assert_int_equal(st_model_alloc_activations(m, B, T), 0);
    assert_int_equal(st_model_set_precision(m, prec), 0);
    assert_int_equal(st_model_set_activation_checkpointing(m, ckpt), 0);
}

static void build(st_model *m, const st_model_config *c, st_precision prec, int ckpt, int top_only) {
    build_lora(m, c, prec, ckpt, top_only, 0);
}

/* Two training steps (a plain SGD update in between, so the second runs on changed weights): the two losses,
 * the per-position losses and the gradients of the second step. */
static void two_steps(st_model *m, double loss[2], float *pos, float *grads) {
    int32_t in[N], tg[N];
    float w[N];
    for (int i = 0; i < N; i++) { in[i] = (i * 7 + 3) % 53; tg[i] = (i * 5 + 1) % 53; w[i] = (i % 5 ? 1.0f : 0.0f) / N; }
    float *g = malloc(m->n_grads * sizeof(float)), *wt = malloc(m->n_weights * sizeof(float));
    for (int s = 0; s < 2; s++) {
        st_model_zero_grad(m);
        loss[s] = st_model_forward(m, in, tg, w, 1);
        st_model_backward(m);
        memcpy(g, m->grads, m->n_grads * sizeof(float));
        memcpy(wt, m->weights, m->n_weights * sizeof(float));
        for (int i = 0; i < m->n_params; i++) {
            const st_param *p = &m->params[i];
            if (p->grad_offset >= 0)
                for (size_t j = 0; j < p->numel; j++) wt[p->offset + j] -= 0.5f * g[p->grad_offset + j];
        }
        memcpy(m->weights, wt, m->n_weights * sizeof(float));
        st_model_weights_changed(m);
    }
    memcpy(pos, m->loss_per_pos, N * sizeof(float));
    memcpy(grads, g, m->n_grads * sizeof(float));
    free(g);
    free(wt);
}

static void check_identical(st_family family, int qk_norm, st_precision prec, int top_only) {
    st_model_config c = config(family, qk_norm, L);
    st_model a, b;
    build(&a, &c, prec, 0, top_only);
    build(&b, &c, prec, 1, top_only);
    assert_int_equal(a.n_grads, b.n_grads);
    assert_true(b.act_floats < a.act_floats);
    double la[2], lb[2];
    float pa[N], pb[N];
    float *ga = malloc(a.n_grads * sizeof(float)), *gb = malloc(b.n_grads * sizeof(float));
    two_steps(&a, la, pa, ga);
    two_steps(&b, lb, pb, gb);
    const char *what = family == ST_FAMILY_GPT2 ? "gpt2" : qk_norm ? "qwen3" : "llama";
    for (int s = 0; s < 2; s++)
        if (memcmp(&la[s], &lb[s], sizeof la[s]))
            fail_msg("%s %s: step %d loss %.17g without checkpointing, %.17g with", what,
                     prec == ST_PRECISION_BF16 ? "bf16" : "fp32", s, la[s], lb[s]);
    assert_memory_equal(pa, pb, sizeof pa);
    for (int i = 0; i < a.n_params; i++) {
        const st_param *p = &a.params[i];
        if (p->grad_offset < 0) continue;
        if (memcmp(ga + p->grad_offset, gb + p->grad_offset, p->numel * sizeof(float)))
            fail_msg("%s %s: gradient of %s differs with activation checkpointing", what,
                     prec == ST_PRECISION_BF16 ? "bf16" : "fp32", p->name);
    }
    /* the gradients are not trivially zero (a test that can fail) */
    double s = 0;
    for (size_t i = 0; i < a.n_grads; i++) s += (double)ga[i] * ga[i];
    assert_true(s > 0);
    free(ga);
    free(gb);
    st_model_free(&a);
    st_model_free(&b);
}

static void test_llama(void **state) {
    (void)state;
    for (int prec = 0; prec < 2; prec++)
        for (int top = 0; top < 2; top++) check_identical(ST_FAMILY_LLAMA, 0, (st_precision)prec, top);
}

static void test_qwen3(void **state) {
    (void)state;
    for (int prec = 0; prec < 2; prec++) check_identical(ST_FAMILY_LLAMA, 1, (st_precision)prec, 0);
}

static void test_gpt2(void **state) {
    (void)state;
    for (int prec = 0; prec < 2; prec++)
        for (int top = 0; top < 2; top++) check_identical(ST_FAMILY_GPT2, 0, (st_precision)prec, top);
}

/* Arena floats a model of this config allocates (the model's own layout, via a real allocation). */
static size_t arena(st_family family, int n_layer, st_precision prec, int ckpt) {
    st_model_config c = config(family, 0, n_layer);
    st_model m;
    assert_int_equal(st_model_build(&m, &c, st_backend_cpu(1)), 0);
    assert_int_equal(st_model_alloc_activations(&m, B, T), 0);
    assert_int_equal(st_model_set_precision(&m, prec), 0);
    assert_int_equal(st_model_set_activation_checkpointing(&m, ckpt), 0);
    size_t n = m.act_floats;
    st_model_free(&m);
    return n;
}

static void test_memory(void **state) {
    (void)state;
    for (int fam = 0; fam < 2; fam++)
        for (int prec = 0; prec < 2; prec++) {
            st_family f = fam ? ST_FAMILY_GPT2 : ST_FAMILY_LLAMA;
            st_precision p = (st_precision)prec;
            size_t full = arena(f, L, p, 0), layer = arena(f, L + 1, p, 0) - full;
            size_t res_in = ((size_t)N * 32 + 15) & ~(size_t)15; /* the kept input, 16-float aligned */
            size_t ckpt = arena(f, L, p, 1);
            assert_int_equal(ckpt, full - (size_t)(L - 1) * (layer - res_in));
            /* the planner's count: arena + loss_per_pos + RoPE tables (+ bf16 scratch) */
            st_model_config c = config(f, 0, L);
            size_t extra = st_model_activation_floats(&c, B, T, p) - full;
            assert_int_equal(st_model_activation_floats_ckpt(&c, B, T, p, 1), ckpt + extra);
            assert_int_equal(st_model_activation_floats_ckpt(&c, B, T, p, 0), full + extra);
        }
}

/* The blocked MLP against the unblocked run without checkpointing (see the top of this file). */
static void check_blocked_env(st_family family, st_precision prec, int lora, const char *env, const char *val) {
    st_model_config c = config(family, 0, L);
    st_model a, b;
    build_lora(&a, &c, prec, 0, 0, lora);
    setenv(env, val, 1);
    build_lora(&b, &c, prec, 1, 0, lora);
    st_model u;
    unsetenv(env);
    build_lora(&u, &c, prec, 1, 0, lora); /* checkpointed, unblocked (the small model's default) */
    if (!strcmp(env, "SHARDTUNE_MLP_BLOCK_FLOATS")) assert_true(b.act_floats < u.act_floats);
    /* (blocked weights: on this tiny model the head's and the weight gradients' operands set the scratch; the
     * blocks' working product only adds, b.act_floats; the planner's count is checked below) */
    setenv(env, val, 1);
    size_t rope = family == ST_FAMILY_LLAMA ? 2 * (size_t)T * (c.head_dim / 2) : 0;
    assert_int_equal(st_model_activation_floats_ckpt(&c, B, T, prec, 1),
                     b.act_floats + (size_t)N + rope + b.mm_scratch_floats);
    double la[2], lb[2];
    float pa[N], pb[N];
    float *ga = malloc(a.n_grads * sizeof(float)), *gb = malloc(b.n_grads * sizeof(float));
    unsetenv(env); /* the variable is read as each matmul runs: set only while the blocked model runs */
    two_steps(&a, la, pa, ga);
    float pa0[N], pb0[N];
    memcpy(pa0, a.loss_per_pos, sizeof pa0);
    setenv(env, val, 1);
    two_steps(&b, lb, pb, gb);
    memcpy(pb0, b.loss_per_pos, sizeof pb0);
    unsetenv(env);
    const char *what = family == ST_FAMILY_GPT2 ? "gpt2" : "llama";
    const char *pr = prec == ST_PRECISION_BF16 ? "bf16" : "fp32";
    const double eps32 = 1.0 / (1 << 23), tol32 = 4.0 * (N + 2 * c.d_ff) * eps32, tol16 = 1.0 / 256;
    double tol = prec == ST_PRECISION_BF16 ? tol16 : tol32, worst = 0;
    for (int s = 0; s < 2; s++)
        if (fabs(la[s] - lb[s]) > tol * fabs(la[s]))
            fail_msg("%s %s lora %d: step %d loss %.17g unblocked, %.17g blocked", what, pr, lora, s, la[s], lb[s]);
    for (int i = 0; i < N; i++)
        if (fabs((double)pa0[i] - pb0[i]) > tol * (fabs(pa0[i]) + 1e-30))
            fail_msg("%s %s lora %d: position %d loss %.9g unblocked, %.9g blocked", what, pr, lora, i, pa0[i], pb0[i]);
    int nonzero = 0;
    for (int i = 0; i < a.n_params; i++) {
        const st_param *p = &a.params[i];
        if (p->grad_offset < 0) continue;
        const float *x = ga + p->grad_offset, *y = gb + p->grad_offset;
        double mx = 0, md = 0, s2 = 0, d2 = 0;
        for (size_t j = 0; j < p->numel; j++) {
            double d = fabs((double)x[j] - y[j]);
            mx = fabs(x[j]) > mx ? fabs(x[j]) : mx;
            md = d > md ? d : md;
            s2 += (double)x[j] * x[j];
            d2 += d * d;
        }
        nonzero += mx > 0;
        double err = prec == ST_PRECISION_BF16 ? (s2 > 0 ? sqrt(d2 / s2) : sqrt(d2)) : (mx > 0 ? md / mx : md);
        if (err > worst) worst = err;
        if (err > tol) fail_msg("%s %s lora %d: gradient of %s off by %.3g (tolerance %.3g)", what, pr, lora, p->name, err, tol);
    }
    assert_true(nonzero > 0);
    printf("  %s=%s %s %s lora %d: loss %.9g / %.9g, worst gradient error %.3g (tol %.3g)\n", env, val, what, pr,
           lora, la[1], lb[1], worst, tol);
    (void)pa; (void)pb; (void)pa0; (void)pb0;
    free(ga);
    free(gb);
    st_model_free(&a);
    st_model_free(&b);
    st_model_free(&u);
}

static void check_blocked(st_family family, st_precision prec, int lora) {
    /* 1280 / (2 d_ff) -> 16 rows: MLP blocks of 16, 16, 16 */
    check_blocked_env(family, prec, lora, "SHARDTUNE_MLP_BLOCK_FLOATS", "1280");
}

/* Layer weights widened in blocks of 16 rows (model.c wblock_rows; 512 floats / d_model 32), under bf16 on the
 * CPU twin (fp32 ignores it), with the MLP blocked too: the same criteria (blocked input gradients sum over
 * blocks in block order; the forward adds each block's product into its own columns). */
static void test_blocked_weights(void **state) {
    (void)state;
    setenv("SHARDTUNE_MLP_BLOCK_FLOATS", "1280", 1);
    for (int prec = 0; prec < 2; prec++) {
        check_blocked_env(ST_FAMILY_LLAMA, (st_precision)prec, 1, "SHARDTUNE_W_WIDEN_FLOATS", "512");
        check_blocked_env(ST_FAMILY_GPT2, (st_precision)prec, 0, "SHARDTUNE_W_WIDEN_FLOATS", "512");
    }
    unsetenv("SHARDTUNE_MLP_BLOCK_FLOATS");
}

static void test_blocked_mlp(void **state) {
    (void)state;
    for (int prec = 0; prec < 2; prec++) {
        check_blocked(ST_FAMILY_LLAMA, (st_precision)prec, 0);
        check_blocked(ST_FAMILY_LLAMA, (st_precision)prec, 1);
        check_blocked(ST_FAMILY_GPT2, (st_precision)prec, 0);
    }
}

static void build_kept(st_model *m, const st_model_config *c, st_precision prec, int mode) {
    assert_int_equal(st_model_build(m, c, st_backend_cpu(2)), 0);
    assert_int_equal(st_model_init_random(m, 7), 0);
    unsigned char layers[L] = {1, 1, 1};
    m->grad_align = 1;
    assert_int_equal(st_model_set_trainable(m, layers, ST_MOD_ALL), 0);
    assert_int_equal(st_model_alloc_activations(m, B, T), 0);
    assert_int_equal(st_model_set_precision(m, prec), 0);
    assert_int_equal(st_model_set_activation_checkpointing(m, mode), 0);
}

static double rel_norm(const float *x, const float *y, size_t n) {
    double d2 = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - y[i];
        d2 += d * d;
        s2 += (double)x[i] * x[i];
    }
    return s2 > 0 ? sqrt(d2 / s2) : sqrt(d2);
}

static void test_kept_bf16(void **state) {
    (void)state;
    for (int fam = 0; fam < 2; fam++) {
        st_model_config c = config(fam ? ST_FAMILY_GPT2 : ST_FAMILY_LLAMA, 0, L);
        for (int prec = 0; prec < 2; prec++) {
            st_model f, k, k2;
            build_kept(&f, &c, (st_precision)prec, 1);
            build_kept(&k, &c, (st_precision)prec, ST_MODEL_CKPT_BF16);
            build_kept(&k2, &c, (st_precision)prec, ST_MODEL_CKPT_BF16);
            size_t half = ((size_t)N * 32 / 2 + 15) & ~(size_t)15, full = ((size_t)N * 32 + 15) & ~(size_t)15;
            if (prec) {
                assert_int_equal(k.act_floats, f.act_floats - (size_t)L * (full - half) + full);
                size_t rope = fam ? 0 : 2 * (size_t)T * (c.head_dim / 2);
                assert_int_equal(st_model_activation_floats_ckpt(&c, B, T, (st_precision)prec, ST_MODEL_CKPT_BF16),
                                 k.act_floats + (size_t)N + rope + k.mm_scratch_floats);
            } else {
                assert_int_equal(k.act_floats, f.act_floats);
            }
            double lf[2], lk[2], lk2[2];
            float pf[N], pk[N], pk2[N];
            float *gf = malloc(f.n_grads * sizeof(float)), *gk = malloc(k.n_grads * sizeof(float));
            float *gk2 = malloc(k.n_grads * sizeof(float));
            two_steps(&f, lf, pf, gf);
            two_steps(&k, lk, pk, gk);
            two_steps(&k2, lk2, pk2, gk2);
            assert_memory_equal(lk, lk2, sizeof lk);
            assert_memory_equal(gk, gk2, k.n_grads * sizeof(float));
            double worst = 0, tol_l = L / 256.0, tol_g = L / 128.0;
            for (int i = 0; i < f.n_params; i++) {
                const st_param *p = &f.params[i];
                if (p->grad_offset < 0) continue;
                double e = rel_norm(gf + p->grad_offset, gk + p->grad_offset, p->numel);
                if (e > tol_g) fail_msg("kept bf16 fam %d prec %d: gradient of %s off by %.3g", fam, prec, p->name, e);
                worst = e > worst ? e : worst;
            }
            for (int s = 0; s < 2; s++)
                if (fabs(lf[s] - lk[s]) > tol_l * fabs(lf[s]))
                    fail_msg("kept bf16 fam %d prec %d: step %d loss %.9g vs %.9g", fam, prec, s, lf[s], lk[s]);
            if (prec) assert_true(lf[0] != lk[0] && worst > 0); /* the rounding is real */
            else assert_true(lf[0] == lk[0] && lf[1] == lk[1] && worst == 0);
            printf("  kept inputs bf16 %s %s: loss %.9g vs fp32-kept %.9g, worst gradient difference %.3g\n",
                   fam ? "gpt2" : "llama", prec ? "bf16" : "fp32", lk[1], lf[1], worst);
            free(gf);
            free(gk);
            free(gk2);
            st_model_free(&f);
            st_model_free(&k);
            st_model_free(&k2);
        }
    }
}

static void test_toggle_and_refusal(void **state) {
    (void)state;
    st_model_config c = config(ST_FAMILY_LLAMA, 0, L);
    st_model m;
    build(&m, &c, ST_PRECISION_FP32, 0, 0);
    const float *r, *a, *h, *o;
    assert_int_equal(st_model_layer_activations(&m, 1, &r, &a, &h, &o), 0);
    size_t before = m.act_floats;
    assert_int_equal(st_model_set_activation_checkpointing(&m, 1), 0);
    assert_true(m.act_floats < before);
    assert_int_not_equal(st_model_layer_activations(&m, 1, &r, &a, &h, &o), 0);
    assert_int_equal(st_model_set_activation_checkpointing(&m, 0), 0);
    assert_int_equal(m.act_floats, before);
    st_model_free(&m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama),
        cmocka_unit_test(test_qwen3),
        cmocka_unit_test(test_gpt2),
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_blocked_mlp),
        cmocka_unit_test(test_blocked_weights),
        cmocka_unit_test(test_kept_bf16),
        cmocka_unit_test(test_toggle_and_refusal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
