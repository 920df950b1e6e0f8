/* flop_count.c — counts the FLOPs one training step really performs and prints them next to the model's
 * own count (st_model_step_flops, the numerator of MFU), for tests/reference/test_mfu_flops.py.
 *
 * It runs one forward (train) + backward of a random model on the CPU backend wrapped so that every
 * be->matmul call adds 2 m n k, and every attention call adds the (query, key) pairs the kernel's
 * arguments admit, counted by brute force over i, j (causal, window, same document from the actual
 * positions): 4 hd per pair and head forward (Q K^T, P V), 10 backward (Q K^T again, dO V^T, dV, dK, dQ).
 *
 *   flop_count [--family llama|gpt2] [--layers L] [--dim C] [--heads H] [--kv-heads K] [--ffn F] [--vocab V]
 *              [--batch B] [--seq T] [--first-trained-layer l] [--modules attn|mlp|all|head]
 *              [--lora R] [--dora] [--act-ckpt] [--doc-len D] [--window W]
 * prints one JSON line: {"matmul": X, "attention": Y, "model": Z}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/kernels.h"
#include "worker/lora.h"
#include "worker/model.h"

static st_backend counted;
static const st_backend *cpu;
static double n_matmul, n_attn;
static const int32_t *host_pos;

static void c_matmul(float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb, float alpha,
                     float beta) {
    n_matmul += 2.0 * m * n * k;
    cpu->matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
}

/* Keys query i of sequence s may see: j <= i, i - j < window (window > 0), j >= i - pos[i] (documents). */
static double pairs(int b, int t, int window, const int32_t *pos) {
    double n = 0;
    for (int s = 0; s < b; s++)
        for (int i = 0; i < t; i++)
            for (int j = 0; j <= i; j++) {
                if (window > 0 && i - j >= window) continue;
                if (pos && j < i - pos[(size_t)s * t + i]) continue;
                n++;
            }
    return n;
}

static void c_att_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd) {
    n_attn += 4.0 * hd * h * pairs(b, t, 0, NULL);
    cpu->attention_fwd(out, lse, qkv, b, t, h, kvh, hd);
}
static void c_att_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse, int b,
                      int t, int h, int kvh, int hd) {
    n_attn += 10.0 * hd * h * pairs(b, t, 0, NULL);
    cpu->attention_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd);
}
static void c_attw_fwd(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd, int w) {
    n_attn += 4.0 * hd * h * pairs(b, t, w, NULL);
    cpu->attention_window_fwd(out, lse, qkv, b, t, h, kvh, hd, w);
}
static void c_attw_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse, int b,
                       int t, int h, int kvh, int hd, int w) {
    n_attn += 10.0 * hd * h * pairs(b, t, w, NULL);
    cpu->attention_window_bwd(dqkv, dout, qkv, out, lse, b, t, h, kvh, hd, w);
}
static void c_attd_fwd(float *out, float *lse, const float *qkv, const int32_t *pos, int b, int t, int h, int kvh,
                       int hd, int w) {
    n_attn += 4.0 * hd * h * pairs(b, t, w, host_pos);
    cpu->attention_docs_fwd(out, lse, qkv, pos, b, t, h, kvh, hd, w);
}
static void c_attd_bwd(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                       const int32_t *pos, int b, int t, int h, int kvh, int hd, int w) {
    n_attn += 10.0 * hd * h * pairs(b, t, w, host_pos);
    cpu->attention_docs_bwd(dqkv, dout, qkv, out, lse, pos, b, t, h, kvh, hd, w);
}

static int die(const char *what) {
    fprintf(stderr, "flop_count: %s: %s\n", what, st_error());
    return 1;
}

int main(int argc, char **argv) {
    int gpt2 = 0, L = 3, C = 64, H = 4, KV = 2, F = 160, V = 96, B = 2, T = 24, first = 0, lora = 0, dora = 0,
        ckpt = 0, doc_len = 0, window = 0;
    unsigned modules = ST_MOD_ALL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "0";
        if (!strcmp(a, "--family")) gpt2 = !strcmp(v, "gpt2"), i++;
        else if (!strcmp(a, "--layers")) L = atoi(v), i++;
        else if (!strcmp(a, "--dim")) C = atoi(v), i++;
        else if (!strcmp(a, "--heads")) H = atoi(v), i++;
        else if (!strcmp(a, "--kv-heads")) KV = atoi(v), i++;
        else if (!strcmp(a, "--ffn")) F = atoi(v), i++;
        else if (!strcmp(a, "--vocab")) V = atoi(v), i++;
        else if (!strcmp(a, "--batch")) B = atoi(v), i++;
        else if (!strcmp(a, "--seq")) T = atoi(v), i++;
        else if (!strcmp(a, "--first-trained-layer")) first = atoi(v), i++;
        else if (!strcmp(a, "--modules")) {
            modules = !strcmp(v, "attn") ? ST_MOD_ATTN : !strcmp(v, "mlp") ? ST_MOD_MLP
                    : !strcmp(v, "head") ? ST_MOD_HEAD : ST_MOD_ALL;
            i++;
        } else if (!strcmp(a, "--lora")) lora = atoi(v), i++;
        else if (!strcmp(a, "--dora")) dora = 1;
        else if (!strcmp(a, "--act-ckpt")) ckpt = 1;
        else if (!strcmp(a, "--doc-len")) doc_len = atoi(v), i++;
        else if (!strcmp(a, "--window")) window = atoi(v), i++;
        else { fprintf(stderr, "flop_count: unknown option %s\n", a); return 2; }
    }
    cpu = st_backend_cpu(1);
    counted = *cpu;
    counted.matmul = c_matmul;
    counted.attention_fwd = c_att_fwd;
    counted.attention_bwd = c_att_bwd;
    counted.attention_window_fwd = c_attw_fwd;
    counted.attention_window_bwd = c_attw_bwd;
    counted.attention_docs_fwd = c_attd_fwd;
    counted.attention_docs_bwd = c_attd_bwd;
    st_model_config c;
    memset(&c, 0, sizeof c);
    snprintf(c.model_type, sizeof c.model_type, "%s", gpt2 ? "gpt2" : "llama");
    c.family = gpt2 ? ST_FAMILY_GPT2 : ST_FAMILY_LLAMA;
    c.n_layer = L; c.d_model = C; c.n_head = H; c.n_kv_head = gpt2 ? H : KV; c.head_dim = C / H; c.d_ff = F;
    c.vocab = V; c.max_seq = T; c.norm_eps = 1e-5f; c.rope_theta = 10000.0f; c.bos_id = -1; c.eos_id = -1;
    c.sliding_window = window;
    st_model m;
    if (st_model_build(&m, &c, &counted) || st_model_init_random(&m, 5)) return die("model");
    unsigned char *layers = calloc((size_t)L, 1);
    for (int l = first; l < L; l++) layers[l] = 1;
    if (lora) {
        st_lora_spec spec = {.r = lora, .alpha = 2.0 * lora, .dora = dora, .seed = 3,
                             .targets = gpt2 ? ST_LORA_GPT2_ALL : ST_LORA_LLAMA_ALL, .layers = layers};
        if (st_lora_attach(&m, &spec)) return die("lora");
        modules = ST_MOD_LORA;
        memset(layers, 1, (size_t)L);
    }
    if (st_model_set_trainable(&m, layers, modules)) return die("trainable");
    if (st_model_set_activation_checkpointing(&m, ckpt) || st_model_alloc_activations(&m, B, T)) return die("activations");
    int32_t *in = malloc(sizeof(int32_t) * B * T), *tg = malloc(sizeof(int32_t) * B * T), *pos = NULL;
    float *w = malloc(sizeof(float) * B * T);
    for (int i = 0; i < B * T; i++) { in[i] = (i * 7) % V; tg[i] = (i * 11 + 3) % V; w[i] = 1.0f / (B * T); }
    if (doc_len > 0) {
        pos = malloc(sizeof(int32_t) * B * T);
        for (int i = 0; i < B * T; i++) pos[i] = (i % T) % doc_len;
        host_pos = pos;
        if (st_model_set_doc_positions(&m, pos)) return die("doc positions");
    }
    double model = st_model_step_flops(&m, 1); /* before the step: what MFU divides by */
    n_matmul = n_attn = 0;
    st_model_forward(&m, in, tg, w, 1);
    st_model_backward(&m);
    printf("{\"matmul\": %.17g, \"attention\": %.17g, \"model\": %.17g, \"lowest_trained_layer\": %d}\n", n_matmul,
           n_attn, model, m.lowest_trained_layer);
    free(in); free(tg); free(w); free(pos); free(layers);
    st_model_free(&m);
    return 0;
}
