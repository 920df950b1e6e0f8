/* test_qlora.c — the QLoRA quantization primitives (worker/qlora.h) on hand-worked cases.
 *
 *  - NF4: codes are the nearest level of the QLoRA table (values written out here from bitsandbytes'
 *    published table, worked by hand: 0.5 sits 0.0593 from 0.4407 and 0.0626 from 0.5626), packed low
 *    nibble first, one absmax per block; an all-zero block gets code 7 (the 0.0 level) and absmax 0; an odd
 *    element count leaves the last high nibble 0; dequant_nf4 of the codes gives level * absmax.
 *  - int8: q = rint(w / (absmax / 127)), clamped; dequant_int8 inverts it within half a step.
 *  - double quantization: scales minus their mean, 127 steps of max |d| per 256 scales; scales all equal
 *    come back exactly (the step is 0); otherwise each within half a step; more than 256 scales use one
 *    step per 256.
 *  - one matmul unit at a time (worker/qlora.h, the unfused path): the scratch is the largest unit (q + k + v together, gate +
 *    up together or, with spec.mlp_apart, each alone, every other projection alone), not a layer, and every
 *    quantized weight's place lies inside it. A LoRA training step (activation checkpointing: forward,
 *    recomputation, backward) over the quantized base against the same model materialized (every weight
 *    dequantized into its own place, st_qlora_materialize, which also renumbers the registry): packed gate/up
 *    runs the same matmuls on the same operands, so loss and adapter gradients are bit-identical; with
 *    mlp_apart the QLoRA model runs gate and up apart (the same dot products forward, the input gradient
 *    summed as two K = F halves instead of one K = 2F sum), so they agree within fp32 reordering: relative
 *    2^-24 per term times K <= 2F = 160 terms, ~1e-5 through the two layers. A unit read from the wrong
 *    matrix (the scratch aliases all of a layer's units) moves the loss by O(1e-2), the gradients by O(1).
 *  - the fused dequantize-matmul (qmatmul): bit for bit dequantize-then-matmul on its own (test_qmatmul_fused,
 *    with a float64 bound and broken dequantizations that must show) and inside a model's step
 *    (test_fused_model: fused against SHARDTUNE_QLORA_FUSED=0, fp32 and bf16).
 *  - no whole-matrix scratch on the fused path (test_no_scratch: no storage for the quantized tensors, and every
 *    other reader — DoRA's magnitudes, norms and products, eval.generate's merged values, materialize — gives
 *    the unfused (scratch) path's bits).
 *  - ZeRO-3 on a device's hooks (worker/comm_zero3_dev.c qz_*): the blob taken away (and overwritten before
 *    it is freed), each layer's bytes copied into a buffer of their own and placed there (st_qlora_place).
 *    Fused: no scratch range at all, and every quantized weight dequantizes (st_qlora_dequant_param) and
 *    multiplies (st_qlora_param_mm) bit-identical to the untouched model's from the placed bytes. Unfused
 *    (SHARDTUNE_QLORA_FUSED=0): the scratch moved to a buffer of the caller's (st_qlora_set_scratch), every
 *    quantized weight loads bit-identical to the untouched model's, into the new scratch only (the old one
 *    keeps its poison), and st_qlora_scratch_range covers exactly the old scratch's offsets.
 *  - the sharded load (test_put_bytes, st_qlora_put_bytes): any ranks' word ranges of the blob quantized from
 *    the values alone are the whole quantization's bytes, reading each element at most once and, inside a
 *    tensor's codes, only their blocks; the double-quantization mean from the ranks owning a scale byte. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include <stdio.h>
#include <stdlib.h>

#include "kernels/bf16.h"
#include "kernels/cpu/cpu_kernels.h"
#include "kernels/kernels.h"
#include "worker/lora.h"
#include "worker/model.h"
#include "worker/qlora.h"
#include "worker/train_kinds.h"

static void test_nf4_codes(void **state) {
    (void)state;
    const float w[8] = {2.0f, -2.0f, 0.0f, 1.0f, 0.16f, -0.2f, 1.5f, -1.4f};
    /* normalized by absmax 2: 1, -1, 0, 0.5, 0.08, -0.1, 0.75, -0.7 -> levels 15, 0, 7, 12, 8, 6, 14, 1 */
    const uint8_t want[4] = {0x0F, 0xC7, 0x68, 0x1E};
    uint8_t codes[4];
    float absmax[1];
    st_qlora_quant_tensor(ST_QLORA_NF4, w, 8, 8, codes, absmax);
    assert_memory_equal(codes, want, 4);
    assert_true(absmax[0] == 2.0f);
    float out[8];
    st_backend_cpu(0)->dequant_nf4(out, codes, absmax, 8, 8);
    const int lv[8] = {15, 0, 7, 12, 8, 6, 14, 1};
    for (int i = 0; i < 8; i++) assert_true(out[i] == ST_NF4_LEVELS[lv[i]] * 2.0f);
    assert_true(ST_NF4_LEVELS[7] == 0.0f && ST_NF4_LEVELS[0] == -1.0f && ST_NF4_LEVELS[15] == 1.0f);
}

static void test_nf4_zero_block_odd_n(void **state) {
    (void)state;
    const float w[5] = {0, 0, 0, 0, -3.0f};
    uint8_t codes[3];
    float absmax[2];
    st_qlora_quant_tensor(ST_QLORA_NF4, w, 5, 4, codes, absmax);
    const uint8_t want[3] = {0x77, 0x77, 0x00};
    assert_memory_equal(codes, want, 3);
    assert_true(absmax[0] == 0.0f && absmax[1] == 3.0f);
}

static void test_int8(void **state) {
    (void)state;
    const float w[6] = {1.0f, -0.3f, 0.25f, 0.0039f, 0.0f, -4.0f};
    int8_t q[6];
    float s[2];
    st_qlora_quant_tensor(ST_QLORA_INT8, w, 6, 4, (uint8_t *)q, s);
    const int8_t want[6] = {127, -38, 32, 0, 0, -127};
    assert_memory_equal(q, want, 6);
    assert_true(s[0] == 1.0f / 127.0f && s[1] == 4.0f / 127.0f);
    float out[6];
    st_backend_cpu(0)->dequant_int8(out, q, s, 6, 4);
    for (int i = 0; i < 6; i++) assert_true(fabsf(out[i] - w[i]) <= 0.5f * s[i / 4] * 1.0001f);
}

static void test_double_quant(void **state) {
    (void)state;
    const float s[4] = {1, 2, 3, 4};
    int8_t q8[4];
    float s2[1], mean, back[4];
    st_qlora_double_quant(s, 4, q8, s2, &mean);
    assert_true(mean == 2.5f);
    assert_true(s2[0] == 1.5f / 127.0f);
    const int8_t want[4] = {-127, -42, 42, 127};
    assert_memory_equal(q8, want, 4);
    st_qlora_double_dequant(back, q8, s2, mean, 4);
    for (int i = 0; i < 4; i++) assert_true(fabsf(back[i] - s[i]) <= 0.5f * s2[0] * 1.0001f);
    const float same[3] = {2, 2, 2};
    st_qlora_double_quant(same, 3, q8, s2, &mean);
    st_qlora_double_dequant(back, q8, s2, mean, 3);
    assert_true(s2[0] == 0.0f && back[0] == 2.0f && back[2] == 2.0f);
    /* 300 scales: two blocks, the second's step from its own max |d| */
    float many[300], b2[2];
    int8_t q[300];
    for (int i = 0; i < 300; i++) many[i] = i < 256 ? 1.0f + 0.001f * (float)(i % 7) : 10.0f;
    st_qlora_double_quant(many, 300, q, b2, &mean);
    float m = 0;
    for (int i = 256; i < 300; i++) m = fmaxf(m, fabsf(many[i] - mean));
    assert_true(b2[1] == m / 127.0f && b2[0] < b2[1]);
    for (int i = 256; i < 300; i++) assert_int_equal(q[i], 127);
}

enum { UB = 2, UT = 12, UN = UB * UT };

static void unit_model_dora(st_model *m, const st_qlora_spec *spec, int materialize, int dora) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = ST_FAMILY_LLAMA;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.n_layer = 2; c.d_model = 32; c.n_head = 4; c.n_kv_head = 2; c.head_dim = 8; c.d_ff = 80; c.vocab = 53;
    c.max_seq = 16; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f; c.bos_id = c.eos_id = -1;
    assert_int_equal(st_model_build(m, &c, st_backend_cpu(1)), 0);
    assert_int_equal(st_model_init_random(m, 7), 0);
    m->grad_align = 1;
    st_lora_spec ls = {.r = 4, .alpha = 8.0, .targets = ST_LORA_LLAMA_ALL, .seed = 11, .dora = dora};
    assert_int_equal(st_lora_attach(m, &ls), 0);
    assert_int_equal(st_qlora_quantize(m, spec), 0);
    if (dora) assert_int_equal(st_lora_init_magnitudes(m), 0);
    if (materialize) assert_int_equal(st_qlora_materialize(m), 0);
    unsigned char layers[2] = {1, 1};
    assert_int_equal(st_model_set_trainable(m, layers, ST_MOD_LORA), 0);
    assert_int_equal(st_model_alloc_activations(m, UB, UT), 0);
    assert_int_equal(st_model_set_activation_checkpointing(m, 1), 0);
}

static void unit_model(st_model *m, const st_qlora_spec *spec, int materialize) {
    unit_model_dora(m, spec, materialize, 0);
}

/* One step's loss and gradients; B of every adapter set to a fixed nonzero value first (B = 0 at init would
 * leave A's gradient 0). */
static double unit_step(st_model *m, float *grads) {
    for (int i = st_model_base_params(m); i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (!strstr(p->name, "lora_B")) continue;
        for (size_t j = 0; j < p->numel; j++) m->weights[p->offset + j] = 0.01f * (float)((int)(j % 7) - 3);
    }
    st_model_weights_changed(m);
    int32_t in[UN], tg[UN];
    float w[UN];
    for (int i = 0; i < UN; i++) { in[i] = (i * 7 + 3) % 53; tg[i] = (i * 5 + 1) % 53; w[i] = 1.0f / UN; }
    st_model_zero_grad(m);
    double loss = st_model_forward(m, in, tg, w, 1);
    st_model_backward(m);
    memcpy(grads, m->grads, m->n_grads * sizeof(float));
    return loss;
}

static void matmul_units(int apart) {
    st_qlora_spec spec = {.quant = ST_QLORA_NF4, .double_quant = 1, .block = 16, .mlp_apart = apart};
    st_model q, d;
    setenv("SHARDTUNE_QLORA_FUSED", "0", 1); /* the scratch: the unfused path's (the fused one has none) */
    unit_model(&q, &spec, 0);
    /* units: q + k + v 32x32 + 2 x 16x32 = 2048, o 1024, gate / up / down 80x32 = 2560 (gate + up 5120); a
     * layer 10752 */
    size_t qb, fb, scratch, w16, lo = (size_t)-1, hi = 0, want = apart ? 2560 : 5120;
    st_qlora_footprint(&q, &spec, &qb, &fb, &scratch, &w16);
    unsetenv("SHARDTUNE_QLORA_FUSED");
    assert_int_equal(scratch, want);
    for (int i = 0; i < q.n_params; i++) {
        if (!st_qlora_holds(&q, i)) continue;
        const st_param *p = &q.params[i];
        if (p->offset < lo) lo = p->offset;
        if (p->offset + p->numel > hi) hi = p->offset + p->numel;
    }
    assert_int_equal(hi - lo, want);
    unit_model(&d, &spec, 1);
    assert_int_equal(q.n_grads, d.n_grads);
    float *gq = malloc(q.n_grads * sizeof(float)), *gd = malloc(d.n_grads * sizeof(float));
    double lq = unit_step(&q, gq), ld = unit_step(&d, gd);
    if (!apart) {
        assert_true(lq == ld);
        assert_memory_equal(gq, gd, q.n_grads * sizeof(float));
    }
    assert_true(fabs(lq - ld) <= 1e-5 * fabs(ld));
    double diff = 0, norm = 0;
    for (size_t i = 0; i < q.n_grads; i++) {
        diff += ((double)gq[i] - gd[i]) * ((double)gq[i] - gd[i]);
        norm += (double)gd[i] * gd[i];
    }
    assert_true(norm > 0 && sqrt(diff) <= 1e-4 * sqrt(norm));
    free(gq);
    free(gd);
    st_model_free(&q);
    st_model_free(&d);
}

static void test_matmul_units(void **state) {
    (void)state;
    matmul_units(0);
    matmul_units(1);
}

/* ---- the fused dequantize-matmul (qmatmul, kernels/cpu/cpu_qmatmul.c) against dequantize-then-matmul ----
 * A unit of `np` stacked parts (rows 300 / 137 / 141: no multiple of 16, of the block or of a panel), cols 1101
 * (odd: nf4 rows start on a high nibble), block 64 (blocks straddle rows), quantized by the real quantizer
 * (st_qlora_quant_tensor, double-quantized scales by st_qlora_double_quant). Today's path: every part
 * dequantized whole (dequant_nf4 / dequant_int8, the scales by dequant_int8 + add_scalar) into one stacked
 * matrix, then matmul (fp32) or matmul_bf16 on its bf16 copy. The fused kernel runs the same sgemm per output
 * element over several panels (forward: 2-3 panels of up to 240 rows; input gradient: 2-3 panels of up to 880
 * columns over 1101 for 578 rows; the reference on one thread, the fused kernel on the backend's threads), so the results must be equal bit for bit, for m = 1 (the sgemv path) and m = 37, beta 0 and 1
 * — except the one-row input gradient: OpenBLAS 0.3.21's sgemv (column-major, no transpose) orders an output's
 * sum by the length of the call, so a panel and the whole 1101 columns differ in the last bits (as
 * dequantize-then-matmul itself does between thread counts, st_cpu_matmul's matmul_row); that case is held to
 * the float64 bound below only (a backward over a single token row; the model's always has B * T rows).
 * Independently, each output against a float64 sum of the dequantized W: |err| <= K * 2^-23 * sum |x w| (fp32
 * accumulation of K terms; the bf16 case compares against the bf16-rounded operands). A deliberately broken
 * dequantization (one code nibble flipped, or the double-quant mean dropped) must change the result, and a
 * scratch too small for one panel gives NaN (never a plausible result). */
enum { QC = 1101, QBLK = 64, QM = 37 };
static const int qrows[3] = {300, 137, 141};

typedef struct {
    uint8_t *codes[3];
    float *scales[3], *scale2[3], mean[3];
    int8_t *q8[3];
    float *w; /* the stacked dequantized matrix, today's path */
} qunit_t;

static void qunit_build(qunit_t *u, st_qweight *qw, st_qlora_quant quant, int dq, int np, unsigned seed) {
    const st_backend *be = st_backend_cpu(0);
    memset(u, 0, sizeof *u);
    memset(qw, 0, sizeof *qw);
    size_t total = 0;
    for (int p = 0; p < np; p++) total += (size_t)qrows[p] * QC;
    u->w = malloc(total * sizeof(float));
    qw->nf4 = quant == ST_QLORA_NF4, qw->block = QBLK, qw->cols = QC, qw->nparts = np;
    size_t at = 0;
    for (int p = 0; p < np; p++) {
        size_t n = (size_t)qrows[p] * QC, ns = (n + QBLK - 1) / QBLK;
        float *src = malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) {
            seed = seed * 1103515245u + 12345u;
            src[i] = ((float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f) * (1.0f + (float)(i % 5));
        }
        u->codes[p] = calloc(n + 1, 1);
        u->scales[p] = malloc(ns * sizeof(float));
        st_qlora_quant_tensor(quant, src, n, QBLK, u->codes[p], u->scales[p]);
        const float *s = u->scales[p];
        float *sd = NULL;
        if (dq) {
            u->q8[p] = malloc(ns);
            u->scale2[p] = malloc(((ns + 255) / 256) * sizeof(float));
            st_qlora_double_quant(u->scales[p], ns, u->q8[p], u->scale2[p], &u->mean[p]);
            sd = malloc(ns * sizeof(float));
            be->dequant_int8(sd, u->q8[p], u->scale2[p], ns, 256);
            be->add_scalar(sd, u->mean[p], ns);
            s = sd;
        }
        if (quant == ST_QLORA_NF4) be->dequant_nf4(u->w + at, u->codes[p], s, n, QBLK);
        else be->dequant_int8(u->w + at, (const int8_t *)u->codes[p], s, n, QBLK);
        st_qw_part part = {u->codes[p], dq ? NULL : u->scales[p], u->q8[p], u->scale2[p], u->mean[p], qrows[p]};
        qw->part[p] = part;
        at += n;
        free(sd);
        free(src);
    }
}

static void qunit_free(qunit_t *u) {
    for (int p = 0; p < 3; p++) free(u->codes[p]), free(u->scales[p]), free(u->scale2[p]), free(u->q8[p]);
    free(u->w);
}

/* Today's path: C = X W^T or X W on the stacked dequantized W (bf16: its bf16 copy through matmul_bf16). */
static void qref(const st_backend *be, float *c, const float *x, const float *w, int m, int R, int trans, int bf16,
                 float beta) {
    int n = trans ? QC : R, k = trans ? R : QC;
    /* on one thread: st_cpu_matmul's thread blocks can be small enough for OpenBLAS's small-matrix kernels
     * (another K order), so today's bits depend on the thread count there; the fused panels' do not */
    st_backend_cpu(1);
    if (!bf16) {
        be->matmul(c, x, w, m, n, k, 0, !trans, 1.0f, beta);
        st_backend_cpu(0);
        return;
    }
    uint16_t *w16 = malloc((size_t)R * QC * 2);
    float *sc = malloc(st_matmul_bf16_scratch_floats(m, n, k) * sizeof(float));
    be->to_bf16(w16, w, (size_t)R * QC);
    be->matmul_bf16(c, st_mm_f32(x), st_mm_bf16(w16), NULL, m, n, k, 0, !trans, 1.0f, beta, sc);
    st_backend_cpu(0);
    free(w16);
    free(sc);
}

/* max over outputs of |c - sum| / (K 2^-23 sum |x w|), in float64 from the (bf16: rounded) operands */
static double qbound_ratio(const float *c, const float *x, const float *w, int m, int R, int trans, int bf16) {
    int n = trans ? QC : R, k = trans ? R : QC;
    double worst = 0;
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            double s = 0, a = 0;
            for (int t = 0; t < k; t++) {
                double xv = x[(size_t)i * k + t], wv = trans ? w[(size_t)t * QC + j] : w[(size_t)j * QC + t];
                if (bf16) xv = st_bf16_round((float)xv), wv = st_bf16_round((float)wv);
                s += xv * wv, a += fabs(xv * wv);
            }
            double r = fabs(c[(size_t)i * n + j] - s) / (k * 0x1p-23 * a + 1e-30);
            if (r > worst) worst = r;
        }
    return worst;
}

/* The premise of qmatmul's bit-identity, measured: the sgemm library (SHARDTUNE_SGEMM) gives the whole product's
 * bits when the product is split into qmatmul's column panels (st_qmatmul_panel / st_qmatmul_edge), here on the
 * test's own operands (bf16: rounded) at this shape, on one thread as qref. oneDNN 2.6 holds it on AVX-512 and
 * AVX2; OpenBLAS 0.3.21's Haswell/Zen kernels order a sum by the call's column blocking and do not. */
static int split_exact(const float *x, const float *w, int m, int R, int trans, int bf16) {
    int n = trans ? QC : R, len = trans ? R : QC, P = st_qmatmul_panel(m, len, n), np = (n + P - 1) / P;
    float *xr = malloc((size_t)m * len * sizeof(float)), *wr = malloc((size_t)R * QC * sizeof(float));
    float *c0 = malloc((size_t)m * n * sizeof(float)), *c1 = malloc((size_t)m * n * sizeof(float));
    float *slot = malloc((size_t)(P + 16) * len * sizeof(float));
    for (size_t i = 0; i < (size_t)m * len; i++) xr[i] = bf16 ? st_bf16_round(x[i]) : x[i];
    for (size_t i = 0; i < (size_t)R * QC; i++) wr[i] = bf16 ? st_bf16_round(w[i]) : w[i];
    st_cpu_sgemm_one(0, !trans, m, n, len, 1.0f, xr, len, wr, QC, 0.0f, c0, n);
    for (int q = 0; q < np; q++) {
        int j0 = st_qmatmul_edge(q, np, n), pn = st_qmatmul_edge(q + 1, np, n) - j0;
        if (!trans) {
            st_cpu_sgemm_one(0, 1, m, pn, len, 1.0f, xr, len, wr + (size_t)j0 * QC, QC, 0.0f, c1 + j0, n);
            continue;
        }
        for (int r = 0; r < R; r++) memcpy(slot + (size_t)r * pn, wr + (size_t)r * QC + j0, (size_t)pn * sizeof(float));
        st_cpu_sgemm_one(0, 0, m, pn, len, 1.0f, xr, len, slot, pn, 0.0f, c1 + j0, n);
    }
    int same = memcmp(c0, c1, (size_t)m * n * sizeof(float)) == 0;
    free(xr), free(wr), free(c0), free(c1), free(slot);
    return same;
}

static void qmatmul_case(st_qlora_quant quant, int dq, int np) {
    const st_backend *be = st_backend_cpu(0);
    qunit_t u;
    st_qweight qw;
    qunit_build(&u, &qw, quant, dq, np, 7u + (unsigned)quant * 3u + (unsigned)dq * 5u + (unsigned)np);
    int R = 0;
    for (int p = 0; p < np; p++) R += qrows[p];
    for (int trans = 0; trans <= 1; trans++)
        for (int bf16 = 0; bf16 <= 1; bf16++)
            for (int mi = 0; mi < 2; mi++) {
                int m = mi ? QM : 1, n = trans ? QC : R, k = trans ? R : QC;
                float *x = malloc((size_t)m * k * sizeof(float)), *c0 = malloc((size_t)m * n * sizeof(float));
                float *c1 = malloc((size_t)m * n * sizeof(float));
                for (size_t i = 0; i < (size_t)m * k; i++) x[i] = (float)((int)((i * 37) % 19) - 9) / 7.0f;
                for (size_t i = 0; i < (size_t)m * n; i++) c0[i] = c1[i] = 0.25f * (float)(i % 3);
                size_t nsc = st_qmatmul_scratch_floats(m, R, QC, trans, bf16, 4);
                float *sc = malloc(nsc * sizeof(float));
                /* m = 1 runs sgemv (a row's dot products, whatever the split; X W: see below) */
                int exact = m == 1 || split_exact(x, u.w, m, R, trans, bf16);
                if (!exact) /* said, never silent: the float64 bound below still holds the result */
                    print_message("qmatmul %s dq %d parts %d trans %d bf16 %d m %d: the sgemm library's bits change with "
                                  "the column split at this shape (probe): float64 bound only, not bit for bit\n",
                                  quant == ST_QLORA_NF4 ? "nf4" : "int8", dq, np, trans, bf16, m);
                for (float beta = 0.0f; beta <= 1.0f; beta += 1.0f) {
                    qref(be, c0, x, u.w, m, R, trans, bf16, beta);
                    be->qmatmul(c1, st_mm_f32(x), &qw, m, trans, bf16, beta, sc, nsc);
                    /* m = 1, X W: OpenBLAS's sgemv orders a column's sum by the length of the call (the
                     * whole-matrix path's own result changes with the thread count there): bound only */
                    if (exact && !(trans && m == 1) && memcmp(c0, c1, (size_t)m * n * sizeof(float)))
                        fail_msg("qmatmul %s dq %d parts %d trans %d bf16 %d m %d beta %g: not dequantize-then-matmul's "
                                 "bits", quant == ST_QLORA_NF4 ? "nf4" : "int8", dq, np, trans, bf16, m, beta);
                }
                /* beta 0 once more for the independent float64 check */
                be->qmatmul(c1, st_mm_f32(x), &qw, m, trans, bf16, 0.0f, sc, nsc);
                assert_true(qbound_ratio(c1, x, u.w, m, R, trans, bf16) <= 1.0);
                if (bf16) { /* the bound is tight enough to see a dropped bf16 rounding (of W and X) */
                    be->qmatmul(c0, st_mm_f32(x), &qw, m, trans, 0, 0.0f, sc, nsc);
                    double r = qbound_ratio(c0, x, u.w, m, R, trans, 1);
                    if (!(r > 1.0)) fail_msg("qmatmul without bf16 rounding within the bf16 bound (%g)", r);
                }
                /* a broken dequantization must show: one code changed; the double-quant mean dropped */
                uint8_t keep = u.codes[np - 1][5];
                u.codes[np - 1][5] ^= 0x11;
                be->qmatmul(c0, st_mm_f32(x), &qw, m, trans, bf16, 0.0f, sc, nsc);
                u.codes[np - 1][5] = keep;
                assert_true(memcmp(c0, c1, (size_t)m * n * sizeof(float)) != 0);
                if (dq) {
                    float mean = qw.part[0].mean;
                    qw.part[0].mean = 0.0f;
                    be->qmatmul(c0, st_mm_f32(x), &qw, m, trans, bf16, 0.0f, sc, nsc);
                    qw.part[0].mean = mean;
                    assert_true(memcmp(c0, c1, (size_t)m * n * sizeof(float)) != 0);
                }
                /* fewer threads' worth of scratch gives the same bits; less than one panel: NaN */
                size_t one = st_qmatmul_scratch_floats(m, R, QC, trans, bf16, 1);
                be->qmatmul(c0, st_mm_f32(x), &qw, m, trans, bf16, 0.0f, sc, one);
                assert_memory_equal(c0, c1, (size_t)m * n * sizeof(float));
                be->qmatmul(c0, st_mm_f32(x), &qw, m, trans, bf16, 0.0f, sc, one - 1);
                assert_true(isnan(c0[0]) && isnan(c0[(size_t)m * n - 1]));
                free(sc), free(x), free(c0), free(c1);
            }
    qunit_free(&u);
}

/* Where st_cpu_matmul splits C by rows (m >= n, a product big enough to wake the team), qmatmul runs its panels
 * in the same row blocks (st_cpu_matmul_rows): its bits are dequantize-then-matmul's at the same thread count,
 * not only on one thread (oneDNN 2.6 on AVX2 orders a sum by the call's row count). */
static void test_qmatmul_rows(void **state) {
    (void)state;
    const st_backend *be = st_backend_cpu(0);
    qunit_t u;
    st_qweight qw;
    qunit_build(&u, &qw, ST_QLORA_NF4, 1, 1, 11u);
    int m = 600, n = qrows[0], k = QC, rb = st_cpu_matmul_rows(m, n, k);
    float *x = malloc((size_t)m * k * sizeof(float)), *c0 = malloc((size_t)m * n * sizeof(float));
    float *c1 = malloc((size_t)m * n * sizeof(float));
    for (size_t i = 0; i < (size_t)m * k; i++) x[i] = (float)((int)((i * 37) % 19) - 9) / 7.0f;
    size_t nsc = st_qmatmul_scratch_floats(m, n, k, 0, 0, 4);
    float *sc = malloc(nsc * sizeof(float));
    be->matmul(c0, x, u.w, m, n, k, 0, 1, 1.0f, 0.0f); /* the whole-matrix path at this thread count */
    be->qmatmul(c1, st_mm_f32(x), &qw, m, 0, 0, 0.0f, sc, nsc);
    if (split_exact(x, u.w, m, n, 0, 0)) {
        assert_memory_equal(c0, c1, (size_t)m * n * sizeof(float));
    } else {
        print_message("qmatmul rows: the sgemm library's bits change with the column split (probe): float64 bound only\n");
    }
    print_message("qmatmul rows: m %d n %d k %d in row blocks of %d\n", m, n, k, rb);
    assert_true(qbound_ratio(c1, x, u.w, m, n, 0, 0) <= 1.0);
    free(x), free(c0), free(c1), free(sc);
    qunit_free(&u);
}

static void test_qmatmul_fused(void **state) {
    (void)state;
    qmatmul_case(ST_QLORA_NF4, 1, 3); /* q/k/v-like unit */
    qmatmul_case(ST_QLORA_NF4, 0, 1);
    qmatmul_case(ST_QLORA_INT8, 0, 3);
    qmatmul_case(ST_QLORA_INT8, 1, 2);
}

/* The model's path: a LoRA step over the quantized base with the fused matmuls (the CPU backend has qmatmul)
 * against the same step with SHARDTUNE_QLORA_FUSED=0 (each unit dequantized whole, then matmul): the same
 * sgemm dot products, so loss and adapter gradients are bit-identical, in fp32 and in bf16 (where both read
 * bf16(dequantized W) and bf16(x)); nf4 + double quantization and int8. */
static void fused_vs_unfused(st_qlora_quant quant, st_precision prec) {
    st_qlora_spec spec = {.quant = quant, .double_quant = quant == ST_QLORA_NF4, .block = 16};
    st_model a, b;
    unit_model(&a, &spec, 0);
    setenv("SHARDTUNE_QLORA_FUSED", "0", 1);
    unit_model(&b, &spec, 0);
    unsetenv("SHARDTUNE_QLORA_FUSED");
    assert_true(st_qlora_fused(&a) && !st_qlora_fused(&b));
    if (prec == ST_PRECISION_BF16) {
        assert_int_equal(st_model_set_precision(&a, prec), 0);
        assert_int_equal(st_model_set_precision(&b, prec), 0);
    }
    float *ga = malloc(a.n_grads * sizeof(float)), *gb = malloc(b.n_grads * sizeof(float));
    double la = unit_step(&a, ga), lb = unit_step(&b, gb);
    assert_true(la == lb);
    assert_memory_equal(ga, gb, a.n_grads * sizeof(float));
    double norm = 0;
    for (size_t i = 0; i < a.n_grads; i++) norm += (double)ga[i] * ga[i];
    assert_true(norm > 0);
    free(ga);
    free(gb);
    st_model_free(&a);
    st_model_free(&b);
}

static void test_fused_model(void **state) {
    (void)state;
    fused_vs_unfused(ST_QLORA_NF4, ST_PRECISION_FP32);
    fused_vs_unfused(ST_QLORA_INT8, ST_PRECISION_FP32);
    fused_vs_unfused(ST_QLORA_NF4, ST_PRECISION_BF16);
}

/* ---- no whole-matrix scratch on the fused path (worker/qlora.h) ----
 * The fused model's quantized tensors have no storage: the weight buffer is the unfused one's less its one-unit
 * scratch, and every quantized offset lies past the buffer (a reader still going through the registry offset
 * faults). Against the unfused model (SHARDTUNE_QLORA_FUSED=0: today's readers over the scratch), bit for bit:
 * DoRA's magnitudes (row panels, st_qlora_rows), DoRA training steps (norms panel by panel, the base term and
 * its input gradient through qmatmul, st_qlora_param_mm) in fp32, bf16 and bf16 with LoRA dropout (DoRA's term
 * then reads the dropped fp32 input: qmatmul's ST_QMM_W16), eval.generate's merged values of every quantized
 * tensor (st_qlora_dequant_param + st_lora_merge_range_at against the scratch's copy, fp32 and bf16-rounded)
 * and export --merge's st_qlora_materialize. Each panel and qmatmul computes every element with the same
 * operations in the same order as the whole-matrix path (dora_norm is per row, B A's rows are r-term dot
 * products, qmatmul is dequantize-then-matmul's bits: test_qmatmul_fused), so equality is exact. */
static void no_scratch_step(st_model *a, st_model *b, st_precision prec, double dropout) {
    if (prec == ST_PRECISION_BF16 && a->precision != prec) {
        assert_int_equal(st_model_set_precision(a, prec), 0);
        assert_int_equal(st_model_set_precision(b, prec), 0);
    }
    assert_int_equal(st_lora_set_dropout(a, dropout, 5), 0);
    assert_int_equal(st_lora_set_dropout(b, dropout, 5), 0);
    st_lora_dropout_batch(a, 3, 0);
    st_lora_dropout_batch(b, 3, 0);
    float *ga = malloc(a->n_grads * sizeof(float)), *gb = malloc(b->n_grads * sizeof(float));
    double la = unit_step(a, ga), lb = unit_step(b, gb);
    if (la != lb) fail_msg("DoRA step (precision %d, dropout %g): loss %.17g fused, %.17g unfused", (int)prec, dropout, la, lb);
    assert_int_equal(a->n_grads, b->n_grads);
    assert_memory_equal(ga, gb, a->n_grads * sizeof(float));
    double norm = 0;
    for (size_t i = 0; i < a->n_grads; i++) norm += (double)ga[i] * ga[i];
    assert_true(norm > 0);
    free(ga);
    free(gb);
}

static void no_scratch_merged(st_model *a, st_model *b, int round16) {
    for (int i = 0; i < st_model_base_params(a); i++) {
        if (!st_qlora_holds(a, i)) continue;
        const st_param *p = &a->params[i];
        float *wa = malloc(p->numel * sizeof(float)), *wb = malloc(p->numel * sizeof(float));
        assert_int_equal(st_qlora_dequant_param(a, i, wa, round16), 0);
        st_qlora_load(b, i); /* the unfused model's scratch: today's readers */
        if (round16) b->be->from_bf16(wb, b->weights_bf16 + b->params[i].offset, p->numel);
        else memcpy(wb, b->weights + b->params[i].offset, p->numel * sizeof(float));
        assert_memory_equal(wa, wb, p->numel * sizeof(float));
        assert_int_equal(st_lora_merge_range_at(a, wa, 0, i), 0);
        assert_int_equal(st_lora_merge_range_at(b, wb, 0, i), 0);
        assert_memory_equal(wa, wb, p->numel * sizeof(float));
        free(wa);
        free(wb);
    }
}

static void test_no_scratch(void **state) {
    (void)state;
    st_qlora_spec spec = {.quant = ST_QLORA_NF4, .double_quant = 1, .block = 16};
    st_model a, b;
    /* panels of 100 floats: 3 rows of 32 (q/k/v, gate, up: several panels, the last one short) or 1 of 80 (down:
     * its rows start mid-block, 80 = 5 blocks of 16 but 2 x 16 the alignment) */
    setenv("SHARDTUNE_QLORA_PANEL_FLOATS", "100", 1);
    unit_model_dora(&a, &spec, 0, 1);
    setenv("SHARDTUNE_QLORA_FUSED", "0", 1);
    unit_model_dora(&b, &spec, 0, 1);
    size_t qb, fb, scratch_b, scratch_a, w16;
    st_qlora_footprint(&b, &spec, &qb, &fb, &scratch_b, &w16);
    unsetenv("SHARDTUNE_QLORA_FUSED");
    st_qlora_footprint(&a, &spec, &qb, &fb, &scratch_a, &w16);
    assert_true(st_qlora_fused(&a) && !st_qlora_fused(&b));
    assert_int_equal(scratch_a, 0);
    assert_int_equal(scratch_b, 5120); /* gate + up */
    assert_int_equal(a.n_weights + scratch_b, b.n_weights);
    for (int i = 0; i < a.n_params; i++)
        if (st_qlora_holds(&a, i)) assert_true(a.params[i].offset >= a.n_weights + ((size_t)1 << 30));
    for (int i = st_model_base_params(&a); i < a.n_params; i++) { /* the adapters, DoRA magnitudes included */
        const st_param *p = &a.params[i];
        assert_memory_equal(a.weights + p->offset, b.weights + b.params[i].offset, p->numel * sizeof(float));
        if (!strstr(p->name, "lora_magnitude_vector")) continue;
        int base = st_lora_base_of(&a, i, NULL), in = (int)a.params[base].shape[1]; /* today's: the scratch's rows */
        st_qlora_load(&b, base);
        for (int j = 0; j < (int)p->numel; j++) {
            const float *r = b.weights + b.params[base].offset + (size_t)j * in;
            double ss = 0;
            for (int k = 0; k < in; k++) ss += (double)r[k] * r[k];
            assert_true(a.weights[p->offset + j] == (float)sqrt(ss));
        }
    }
    no_scratch_step(&a, &b, ST_PRECISION_FP32, 0.0);
    no_scratch_merged(&a, &b, 0);
    no_scratch_step(&a, &b, ST_PRECISION_BF16, 0.0);
    no_scratch_step(&a, &b, ST_PRECISION_BF16, 0.25);
    no_scratch_merged(&a, &b, 1);
    st_model_free(&a);
    st_model_free(&b);
    /* export --merge's materialization (fp32 base) */
    unit_model_dora(&a, &spec, 1, 1);
    setenv("SHARDTUNE_QLORA_FUSED", "0", 1);
    unit_model_dora(&b, &spec, 1, 1);
    unsetenv("SHARDTUNE_QLORA_FUSED");
    assert_int_equal(a.n_weights, b.n_weights);
    assert_memory_equal(a.weights, b.weights, a.n_weights * sizeof(float));
    st_model_free(&a);
    st_model_free(&b);
    unsetenv("SHARDTUNE_QLORA_PANEL_FLOATS");
}

/* The fused half of place_scratch: no scratch range (footprint 0), and b's placed bytes dequantize and multiply
 * bit for bit as a's own blob does (the old blob is poisoned and freed by then). */
static void place_fused(st_model *a, st_model *b, size_t lo, size_t hi, size_t scratch) {
    assert_int_equal(lo, 0);
    assert_int_equal(hi, 0);
    assert_int_equal(scratch, 0);
    for (int i = 0; i < b->n_params; i++) {
        if (!st_qlora_holds(b, i)) continue;
        const st_param *p = &b->params[i];
        int out = (int)p->shape[0], in = (int)p->shape[1], M = 3;
        float *wa = malloc(p->numel * sizeof(float)), *wb = malloc(p->numel * sizeof(float));
        float *x = malloc((size_t)M * in * sizeof(float)), *ya = calloc((size_t)M * out, sizeof(float));
        float *yb = calloc((size_t)M * out, sizeof(float));
        for (int k = 0; k < M * in; k++) x[k] = (float)((k * 37 % 23) - 11) / 16.0f;
        assert_int_equal(st_qlora_dequant_param(a, i, wa, 0), 0);
        assert_int_equal(st_qlora_dequant_param(b, i, wb, 0), 0);
        assert_memory_equal(wa, wb, p->numel * sizeof(float));
        assert_int_equal(st_qlora_param_mm(a, i, ya, x, M, 0, 0.0f), 0);
        assert_int_equal(st_qlora_param_mm(b, i, yb, x, M, 0, 0.0f), 0);
        assert_memory_equal(ya, yb, (size_t)M * out * sizeof(float));
        double n2 = 0;
        for (int k = 0; k < M * out; k++) n2 += (double)yb[k] * yb[k];
        assert_true(n2 > 0 && n2 == n2);
        free(wa), free(wb), free(x), free(ya), free(yb);
    }
}

/* The unfused half of place_scratch: the scratch moved to a buffer of ours; b loads there only, bit for bit as a
 * loads into its own scratch. */
static void place_unfused(st_model *a, st_model *b, size_t lo, size_t hi) {
    float *sw = calloc(hi - lo, sizeof(float));
    for (size_t k = lo; k < hi; k++) b->weights[k] = NAN; /* the old scratch: never written again */
    st_qlora_set_scratch(b, sw, NULL, lo);
    for (int i = 0; i < b->n_params; i++) {
        if (!st_qlora_holds(b, i)) continue;
        st_qlora_load(a, i);
        st_qlora_load(b, i);
        const st_param *p = &b->params[i];
        assert_memory_equal(sw + (p->offset - lo), a->weights + a->params[i].offset, p->numel * sizeof(float));
    }
    for (size_t k = lo; k < hi; k++) assert_true(isnan(b->weights[k]));
    st_qlora_set_scratch(b, NULL, NULL, 0);
    free(sw);
}

/* ZeRO-3 on a device: the blob's layers placed in buffers of their own; unfused, the scratch elsewhere (see the
 * top). */
static void place_scratch(int fused) {
    st_qlora_spec spec = {.quant = ST_QLORA_NF4, .double_quant = 1, .block = 16};
    st_model a, b;
    if (!fused) setenv("SHARDTUNE_QLORA_FUSED", "0", 1);
    unit_model(&a, &spec, 0);
    unit_model(&b, &spec, 0);
    assert_int_equal(st_qlora_fused(&b), fused);
    size_t lo, hi, qbytes;
    st_qlora_scratch_range(&b, &lo, &hi);
    uint8_t *blob;
    st_qlora_blob(&b, &blob, &qbytes);
    assert_non_null(blob);
    size_t fq, ff, scratch, w16;
    st_qlora_footprint(&b, &spec, &fq, &ff, &scratch, &w16);
    assert_int_equal(hi - lo, scratch); /* the one matmul unit's scratch */
    assert_int_equal(fq, qbytes);
    for (int i = 0; i < b.n_params; i++) {
        assert_int_equal(st_qlora_holds(&b, i), st_qlora_quantizable(&b, i));
        if (st_qlora_holds(&b, i) && !fused)
            assert_true(b.params[i].offset >= lo && b.params[i].offset + b.params[i].numel <= hi);
    }
    uint8_t *bufs[2];
    for (int l = 0; l < 2; l++) {
        int p0 = st_model_layer_first_param(&b, l), p1 = st_model_layer_first_param(&b, l + 1);
        size_t qa, qb;
        st_qlora_span(&b, p0, p1, &qa, &qb);
        assert_true(qb > qa && qa % 4 == 0 && qb % 4 == 0);
        bufs[l] = malloc(qb - qa);
        memcpy(bufs[l], blob + qa, qb - qa);
        st_qlora_place(&b, p0, p1, bufs[l], qa);
    }
    assert_ptr_equal(st_qlora_blob_take(&b), blob);
    memset(blob, 0xff, qbytes); /* a read of the old bytes would show */
    free(blob);
    if (fused) place_fused(&a, &b, lo, hi, scratch);
    else place_unfused(&a, &b, lo, hi);
    unsetenv("SHARDTUNE_QLORA_FUSED");
    st_model_free(&a);
    st_model_free(&b);
    free(bufs[0]);
    free(bufs[1]);
}

static void test_place_scratch(void **state) {
    (void)state;
    place_scratch(1);
    place_scratch(0);
}

/* The sharded load (spec.sharded, st_qlora_put_bytes): the blob cut into 2 .. 9 ranks' word ranges, each range
 * (and 23, 61, 97: ranges inside one tensor's codes) quantized from the fp32 values alone, byte for byte the whole quantization's; each call reads an element at
 * most once, and a range inside one tensor's codes only the blocks under them; the ranks' code elements
 * (st_qlora_code_elems) partition every tensor; the double-quantization mean comes from the calls that own a
 * scale byte and equals the whole's. */
typedef struct {
    const float *w;       /* the fp32 base, registry layout */
    const size_t *off;    /* registry offsets */
    unsigned char *seen;  /* [numel] reads of the parameter in this call */
    size_t reads;
} qsrc;

static int qsrc_read(void *ctx, int i, size_t at, size_t n, float *dst) {
    qsrc *s = ctx;
    for (size_t k = 0; k < n; k++) assert_int_equal(s->seen[at + k]++, 0); /* each element at most once */
    memcpy(dst, s->w + s->off[i] + at, n * sizeof(float));
    s->reads += n;
    return 0;
}

static void put_bytes_case(st_qlora_quant quant, int dq, int block) {
    st_qlora_spec spec = {.quant = quant, .double_quant = dq, .block = block};
    st_model a, b;
    unit_model(&a, &spec, 0); /* quantized whole */
    st_model_config c = a.cfg;
    assert_int_equal(st_model_build(&b, &c, st_backend_cpu(1)), 0);
    assert_int_equal(st_model_init_random(&b, 7), 0);
    st_lora_spec ls = {.r = 4, .alpha = 8.0, .targets = ST_LORA_LLAMA_ALL, .seed = 11};
    assert_int_equal(st_lora_attach(&b, &ls), 0);
    size_t nb = (size_t)st_model_base_params(&b), *off = malloc(nb * sizeof *off), most = 0;
    for (size_t i = 0; i < nb; i++) {
        off[i] = b.params[i].offset;
        if (b.params[i].numel > most) most = b.params[i].numel;
    }
    float *w = b.weights; /* the fp32 values the whole model quantized (the same seed) */
    b.weights = NULL;
    st_qlora_spec ss = spec;
    ss.sharded = 1;
    assert_int_equal(st_qlora_begin(&b, &ss), 0);
    assert_true(b.weights_tail_only);
    uint8_t *blob, *none;
    size_t bytes, nbytes;
    st_qlora_blob(&a, &blob, &bytes);
    st_qlora_blob(&b, &none, &nbytes);
    assert_null(none);
    assert_int_equal(nbytes, bytes);
    uint8_t *out = malloc(bytes);
    qsrc src = {.w = w, .off = off, .seen = malloc(most)};
    size_t worlds[] = {2, 3, 4, 5, 6, 7, 8, 9, 23, 61, 97}, inside = 0;
    for (size_t wi = 0; wi < sizeof worlds / sizeof *worlds; wi++) {
        size_t W = worlds[wi], shard = (bytes / 4 + W - 1) / W;
        memset(out, 0xa5, bytes);
        size_t *owned = calloc(nb, sizeof *owned);
        for (size_t r = 0; r < W; r++) {
            size_t lo = 4 * shard * r, hi = 4 * shard * (r + 1) < bytes ? 4 * shard * (r + 1) : bytes;
            if (lo >= hi) continue;
            for (size_t i = 0; i < nb; i++) {
                if (!st_qlora_holds(&b, (int)i)) continue;
                size_t qa, qb, e0, e1;
                st_qlora_span(&b, (int)i, (int)i + 1, &qa, &qb);
                memset(src.seen, 0, b.params[i].numel);
                src.reads = 0;
                int set = 0;
                assert_int_equal(st_qlora_put_bytes(&b, (int)i, lo, hi, qsrc_read, &src, out + lo, &set), 0);
                st_qlora_code_elems(&b, (int)i, lo, hi, &e0, &e1);
                owned[i] += e1 - e0;
                size_t cb = quant == ST_QLORA_NF4 ? (b.params[i].numel + 1) / 2 : b.params[i].numel;
                if (lo > qa && hi < qa + cb) { /* inside its codes: their blocks only (a whole-block piece each side) */
                    assert_true(src.reads <= (e1 - e0) + 4 * (size_t)block);
                    inside++;
                }
                if (set) assert_int_equal(*(uint32_t *)&(float){st_qlora_mean(&b, (int)i)},
                                          *(uint32_t *)&(float){st_qlora_mean(&a, (int)i)});
                assert_int_equal(set, dq && hi > qa + (cb + 3) / 4 * 4 && lo < qb);
            }
        }
        assert_memory_equal(out, blob, bytes);
        for (size_t i = 0; i < nb; i++) /* every element's code byte on exactly one rank */
            if (st_qlora_holds(&b, (int)i)) assert_int_equal(owned[i], b.params[i].numel);
        free(owned);
    }
    assert_true(inside > 0); /* ranges inside a tensor's codes were cut (a rank's edge on either side) */
    free(src.seen);
    free(out);
    free(off);
    st_model_free(&a);
    b.be->free(w);
    st_model_free(&b);
}

static void test_put_bytes(void **state) {
    (void)state;
    put_bytes_case(ST_QLORA_NF4, 1, 16);
    put_bytes_case(ST_QLORA_NF4, 1, 3);
    put_bytes_case(ST_QLORA_NF4, 0, 5);
    put_bytes_case(ST_QLORA_INT8, 0, 7);
    put_bytes_case(ST_QLORA_INT8, 1, 3);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nf4_codes),
        cmocka_unit_test(test_nf4_zero_block_odd_n),
        cmocka_unit_test(test_int8),
        cmocka_unit_test(test_double_quant),
        cmocka_unit_test(test_matmul_units),
        cmocka_unit_test(test_qmatmul_fused),
        cmocka_unit_test(test_qmatmul_rows),
        cmocka_unit_test(test_fused_model),
        cmocka_unit_test(test_no_scratch),
        cmocka_unit_test(test_place_scratch),
        cmocka_unit_test(test_put_bytes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
