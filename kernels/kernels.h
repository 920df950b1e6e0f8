/* kernels.h — the one backend interface. The worker computes only through these functions.
 *
 * A backend (cpu, cuda) is a table of function pointers. The CPU backend is the reference: every
 * CUDA kernel computes the same function as its CPU twin (same inputs, same outputs, same layout).
 *
 * Conventions (all backends):
 *  - fp32 tensors, row-major, contiguous. Pointers are device pointers for the backend (host for cpu).
 *  - Kernels never allocate: the caller passes every buffer. Small O(T) per-thread stack use is allowed.
 *  - "_bwd" functions ACCUMULATE (+=) into parameter gradients (dw, db, dwte, dwpe) and into dx of norms
 *    (a norm's input is always a residual stream whose gradient already holds the skip path). Every other
 *    output is overwritten unless the comment says otherwise.
 *  - Linear weights are stored [out, in] (PyTorch nn.Linear). GPT-2 Conv1D weights are transposed at import.
 *  - Packed attention input qkv: per token [q heads (H*hd) | k heads (KVH*hd) | v heads (KVH*hd)].
 *  - RoPE is HF's rotate_half form: pairs (i, i + hd/2), angle t * theta^(-2i/hd).
 */
#ifndef ST_KERNELS_H
#define ST_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef struct st_backend st_backend;

#define ST_SUMSQ_CHUNK 8192 /* the host sumsq's chunk (st_backend.sumsq) */

/* One tensor range of a multi-tensor AdamW step (adamw_multi): fp32 master weights with their gradient
 * and moments, the range's own lr, weight decay and step count (layer-wise lr, no-decay sets, parameters
 * that started training later), optionally the bf16 copy to refresh (NULL: none), and optionally the
 * gradient again as zero_grad (NULL, or == grad): each gradient element is set to 0 once it is read, so
 * the next step accumulates into zeros without a separate zeroing pass. */
typedef struct {
    float *param;
    const float *grad;
    float *m, *v;
    uint16_t *param_bf16;
    size_t n;
    float lr, weight_decay;
    int step;
    float *zero_grad;
} st_adamw_range;

/* One operand of matmul_bf16: fp32 values (rounded to bf16 by the kernel) or values already stored as
 * bf16 (raw bit patterns: the upper 16 bits of the fp32 value). Exactly one pointer is non-NULL.
 * `rounded` (fp32 only) promises the fp32 values are already bf16 values (round_bf16 ran on them): the
 * result is the same either way, but the CPU twin can then skip its rounding copy. */
typedef struct {
    const float *f32;
    const uint16_t *bf16;
    int rounded;
} st_mm_in;

/* A QLoRA base weight W[rows, cols] held quantized (worker/qlora.c), the operand of qmatmul: up to
 * ST_QW_PARTS tensors stacked by rows (a packed q/k/v or gate/up matmul unit), all `cols` wide. Each part
 * has its own codes (nf4: two a byte, low nibble first, as dequant_nf4; int8: one a byte, as dequant_int8)
 * and one scale per `block` consecutive elements of its own row-major storage: scales[b], or, with scales
 * NULL (double quantization), (float)q8[b] * scale2[b / ST_QW_DQ_BLOCK] then + mean, each operation
 * rounded on its own (what dequant_int8 + add_scalar compute). The struct is host memory (passed by
 * pointer); the pointers in it are backend memory. */
#define ST_QW_PARTS 4
#define ST_QW_DQ_BLOCK 256
typedef struct {
    const uint8_t *codes;
    const float *scales;
    const int8_t *q8;
    const float *scale2;
    float mean;
    int rows;
} st_qw_part;
typedef struct {
    int nf4; /* 1: nf4 codes, 0: int8 codes */
    int block;
    int cols;
    int nparts;
    st_qw_part part[ST_QW_PARTS];
} st_qweight;

static inline st_mm_in st_mm_f32(const float *p) { st_mm_in o = {p, NULL, 0}; return o; }
static inline st_mm_in st_mm_f32_rounded(const float *p) { st_mm_in o = {p, NULL, 1}; return o; }
static inline st_mm_in st_mm_bf16(const uint16_t *p) { st_mm_in o = {NULL, p, 0}; return o; }

struct st_backend {
    const char *name; /* "cpu" or "cuda" (for messages; code tests the properties below, never the name) */
    /* 1: buffers from alloc are ordinary host memory (MPI, memcpy and the host may read them in place);
     * 0: device memory, reached only through this table (copies) and NCCL. */
    int host_memory;

    /* ---- memory ---- */
    void *(*alloc)(size_t bytes); /* zeroed; NULL on failure */
    void (*free)(void *p);
    void (*memset0)(void *p, size_t bytes);
    void (*copy_to_device)(void *dst, const void *host_src, size_t bytes);
    void (*copy_to_host)(void *host_dst, const void *src, size_t bytes);
    void (*copy)(void *dst, const void *src, size_t bytes); /* device to device */
    void (*synchronize)(void);
    /* Device failures. The kernels return void and queue asynchronously, so a failure (a launch error, an
     * illegal address, no cuBLASLt algorithm for a shape, an unsupported head_dim, too little scratch, an
     * out-of-vocabulary target) is recorded and reported here: synchronizes, then returns 0, or
     * ST_EDEVICE with st_error() naming the first failing kernel and the reason (the record is cleared).
     * The trainer calls it at every step boundary; results computed after a failure are garbage. */
    int (*status)(void);
    /* The 16-byte id of the device this backend is bound to (CUDA: its UUID), so ranks can tell two GPUs
     * apart whatever CUDA_VISIBLE_DEVICES shows; 0, or non-zero when the backend has no device (cpu). */
    int (*device_id)(unsigned char id[16]);

    /* ---- matmul ----
     * C[M,N] = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T.
     * A is [M,K] (or [K,M] when trans_a), B is [K,N] (or [N,K] when trans_b). */
    void (*matmul)(float *c, const float *a, const float *b, int m, int n, int k, int trans_a, int trans_b,
                   float alpha, float beta);
    /* Mixed precision (precision: bf16): C = alpha * bf16(op(A)) @ bf16(op(B)) + beta * C (+ bias).
     * Each operand is fp32 (rounded to bf16, round to nearest even, on the fly; the input is not modified)
     * or already bf16 (st_mm_in); products are accumulated in fp32 into the fp32 C. When `bias` is not
     * NULL, bias[N] (fp32) is added to every row of C after the product (the cuBLASLt bias epilogue).
     * `scratch` is backend memory of st_matmul_bf16_scratch_floats(m, n, k) floats, owned by the caller
     * (the CPU twin widens both operands into it as fp32; CUDA keeps bf16 copies of fp32 operands). */
    void (*matmul_bf16)(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int trans_a,
                        int trans_b, float alpha, float beta, float *scratch);
    /* bf16 storage (saved activations, the bf16 weight copy): dst[i] = bf16(src[i]), round to nearest
     * even (kernels/bf16.h is the one rule); and back, dst[i] = src[i] as fp32 (exact). */
    void (*to_bf16)(uint16_t *dst, const float *src, size_t n);
    void (*from_bf16)(float *dst, const uint16_t *src, size_t n);
    /* y[N,C] += bias[C] broadcast over rows. */
    void (*bias_add)(float *y, const float *bias, int n, int c);
    /* dbias[C] += sum over rows of dy[N,C]. */
    void (*bias_bwd)(float *dbias, const float *dy, int n, int c);

    /* ---- reductions ---- */
    /* Sum of squares of x, accumulated in double. On host memory (cpu): the sum, added in order from 0, of
     * the sums of consecutive ST_SUMSQ_CHUNK-element chunks from x, each chunk's sum being sumsq of that
     * chunk alone: per-chunk calls added in order give the same bits as one call (worker/comm.c). */
    double (*sumsq)(const float *x, size_t n);

    /* ---- norms (rows of C) ----
     * LayerNorm: out = (x - mean) * rstd * w + b; saves mean[N], rstd[N].
     * RMSNorm:   out = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); saves rstd[N]. */
    void (*layernorm_fwd)(float *out, float *mean, float *rstd, const float *x, const float *w, const float *b,
                          int n, int c, float eps);
    void (*layernorm_bwd)(float *dx, float *dw, float *db, const float *dout, const float *x, const float *w,
                          const float *mean, const float *rstd, int n, int c);
    void (*rmsnorm_fwd)(float *out, float *rstd, const float *x, const float *w, int n, int c, float eps);
    void (*rmsnorm_bwd)(float *dx, float *dw, const float *dout, const float *x, const float *w,
                        const float *rstd, int n, int c);

    /* ---- rotary embeddings, in place on packed qkv [B,T,(H+2*KVH)*hd] (q and k heads only) ----
     * cos/sin: [T, hd/2] tables for positions 0..T-1 (see st_rope_tables; the model's tables come from
     * st_model_rope_tables and may carry an attention scaling in both, making the map a scaled rotation).
     * bwd applies the transpose of the same map to dqkv in place. */
    void (*rope_fwd)(float *qkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd);
    void (*rope_bwd)(float *dqkv, const float *cos, const float *sin, int b, int t, int h, int kvh, int hd);

    /* ---- causal self-attention with grouped-query heads (query head i uses kv head i / (H/KVH)) ----
     * out[B,T,H*hd] = softmax(q k^T / sqrt(hd) + causal mask) v; lse[B,H,T] = log-sum-exp of each
     * scaled score row (saved for backward, which recomputes probabilities from it).
     * bwd writes (overwrites) dqkv[B,T,(H+2*KVH)*hd]. */
    void (*attention_fwd)(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd);
    void (*attention_bwd)(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                          int b, int t, int h, int kvh, int hd);

    /* ---- activations ----
     * GELU (tanh approximation, GPT-2's gelu_new): out = gelu(x). bwd: dx = dout * gelu'(x).
     * SwiGLU over packed gate|up rows gu[N, 2F] (per row: F gate values then F up values):
     * out[N,F] = silu(gate) * up. bwd writes dgu[N,2F]. */
    void (*gelu_fwd)(float *out, const float *x, size_t n);
    void (*gelu_bwd)(float *dx, const float *dout, const float *x, size_t n);
    void (*swiglu_fwd)(float *out, const float *gu, int n, int f);
    void (*swiglu_bwd)(float *dgu, const float *dout, const float *gu, int n, int f);

    /* ---- embeddings ----
     * out[B*T, C] = wte[tokens] (+ wpe[t] when wpe != NULL, t = position within the sequence).
     * bwd accumulates dwte (and dwpe when non-NULL); deterministic (no atomics order dependence). */
    void (*embedding_fwd)(float *out, const int32_t *tokens, const float *wte, const float *wpe, int b, int t,
                          int c);
    void (*embedding_bwd)(float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int b, int t,
                          int c);

    /* ---- fused softmax cross-entropy ----
     * For each row i of logits[N,V]: loss[i] = logsumexp(logits[i]) - logits[i][target[i]] (0 where
     * weight[i] == 0), then logits[i] is overwritten IN PLACE with dlogits = weight[i] * (softmax - onehot)
     * (all zeros where weight[i] == 0). weight carries the loss mask, per-task loss weights and the
     * 1/normalizer; targets of weight-0 rows are never read. Returns sum_i weight[i] * loss[i] (double). */
    double (*cross_entropy)(float *logits, float *loss, const int32_t *target, const float *weight, int n, int v);
    /* The LM head's form of cross_entropy (one call per head chunk, no host wait per chunk): the same rows,
     * but the chunk's sum_i weight[i] * loss[i] (summed from 0 in double, as cross_entropy returns it) is
     * added to total[0], a double in backend memory that the caller reads once after its last chunk.
     * dlogits_bf16 NULL: logits are overwritten with dlogits as above. Not NULL (precision bf16): dlogits go
     * there as bf16 bits instead, rounded once (round to nearest even, kernels/bf16.h: the values round_bf16
     * would leave), ready for matmul_bf16 as st_mm_bf16; logits are then scratch (contents unspecified). */
    void (*cross_entropy_acc)(float *logits, uint16_t *dlogits_bf16, float *loss, const int32_t *target,
                              const float *weight, int n, int v, double *total);
    /* ---- fused knowledge-distillation loss (worker/distill.h has the definition) ----
     * For each row i of the student's s_logits[N,V] and the teacher's t_logits[N,V], in double:
     * kd_i = T^2 KL(softmax(t_i/T) || softmax(s_i/T)), ce_i = logsumexp(s_i) - s_i[target[i]],
     * loss[i] = alpha kd_i + (1 - alpha) ce_i (0 where weight[i] == 0, target then never read), and the
     * gradient weight[i] * (alpha T (softmax(s_i/T) - softmax(t_i/T)) + (1 - alpha) (softmax(s_i) - onehot))
     * overwrites s_logits (or goes to dlogits_bf16 as bf16 bits, as cross_entropy_acc). Adds the call's
     * sum_i w_i loss_i to total[0] and sum_i w_i kd_i, sum_i w_i ce_i to parts[0], parts[1] (backend-memory
     * doubles). A target outside [0, V) on a live row makes the sums NaN. */
    void (*kd_loss)(float *s_logits, uint16_t *dlogits_bf16, const float *t_logits, float *loss,
                    const int32_t *target, const float *weight, int n, int v, float temperature, float alpha,
                    double *total, double *parts);
    /* ---- cross_entropy_acc by vocabulary blocks (an LM head gathered block by block, worker/model.c) ----
     * logits[n, nv] holds columns [j0, j0 + nv) of n rows' logits (blocks visited in order, j0 = 0 first);
     * stats[n, 3] per row: the running max, the sum of exp(x - max) and the target's logit.
     * xent_block_stats: j0 == 0 starts each row's statistics from this block; a later block folds its own in
     * (max' = max(max, block max), sum' = sum exp(max - max') + sum_j exp(x_j - max')), and the block holding
     * target[i] records its logit. Rows with weight[i] == 0 are skipped (target never read).
     * xent_block_loss (after the last block): loss[i] = max + log(sum) - x_target (0 where weight[i] == 0) and
     * total[0] += sum_i weight[i] * loss[i] in double, as cross_entropy_acc; an out-of-range target on a live
     * row: as cross_entropy_acc on that backend (NaN, or the device's bad-target flag).
     * xent_block_grad (with the final stats): the block's dlogits weight * (exp(x - max) / sum - onehot) in
     * place of logits, or as bf16 bits into dlogits_bf16 [n, nv] (rounded once; logits then scratch). */
    void (*xent_block_stats)(const float *logits, float *stats, const int32_t *target, const float *weight, int n,
                             int nv, int j0);
    void (*xent_block_loss)(const float *stats, float *loss, const int32_t *target, const float *weight, int n,
                            int v, double *total);
    void (*xent_block_grad)(float *logits, uint16_t *dlogits_bf16, const float *stats, const int32_t *target,
                            const float *weight, int n, int nv, int j0);

    /* ---- fused AdamW over a flat range (PyTorch torch.optim.AdamW semantics) ----
     * g = grad * grad_scale; p -= lr * weight_decay * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
     * p -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps). step counts from 1. */
    void (*adamw)(float *param, const float *grad, float *m, float *v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float grad_scale, int step);

    /* ---- dequantization (QLoRA bases) ----
     * int8: out[i] = q[i] * scale[i / block]. nf4: two 4-bit codes per byte (low nibble first),
     * out[i] = ST_NF4_LEVELS[code_i] * absmax[i / block]. */
    void (*dequant_int8)(float *out, const int8_t *q, const float *scale, size_t n, int block);
    void (*dequant_nf4)(float *out, const uint8_t *packed, const float *absmax, size_t n, int block);

    /* ---- multi-tensor AdamW ----
     * For each range: exactly `adamw` on it, then param_bf16[i] = bf16(param[i]) when param_bf16 is not
     * NULL (the mixed-precision weight copy, written in the same pass), and grad[i] = 0 when zero_grad is
     * not NULL (it is then the same pointer as grad; the same pass too). One call per optimizer step, so
     * a GPU runs a few launches instead of one per tensor. */
    void (*adamw_multi)(const st_adamw_range *ranges, int count, float beta1, float beta2, float eps,
                        float grad_scale);
    /* x[i] = bf16(x[i]) in place, kept as fp32 (round to nearest even): for an fp32 operand that several
     * bf16 matmuls read, rounded once and passed as st_mm_f32_rounded (the LM head's dlogits no longer
     * need it: the loss kernel writes them as bf16, cross_entropy_acc / kd_loss). */
    void (*round_bf16)(float *x, size_t n);

    /* ---- decoding with a KV cache (worker/generate.c) ----
     * Caches kcache/vcache are [S, KVH, max_t, hd]: sequence s, kv head g, position p (a head's keys
     * and values contiguous by position). `rows` tokens are in flight;
     * token i belongs to sequence row_seq[i] at position row_pos[i] (both int32 arrays in backend memory).
     * kv_store: copies each token's k and v heads from packed qkv [rows, (H+2*KVH)*hd] into the caches.
     * attention_cached: out[rows, H*hd] = for each token and query head (GQA as above), softmax over keys
     * 0..row_pos[i] of its sequence of (q . k / sqrt(hd)) times v; with window > 0 only the keys j with
     * row_pos[i] - j < window (transformers' sliding-window mask). Keys of tokens in the same call are
     * visible once kv_store has run for them (prefill of a chunk: store first, then attend). */
    void (*kv_store)(float *kcache, float *vcache, const float *qkv, const int32_t *row_seq,
                     const int32_t *row_pos, int rows, int h, int kvh, int hd, int max_t);
    void (*attention_cached)(float *out, const float *qkv, const float *kcache, const float *vcache,
                             const int32_t *row_seq, const int32_t *row_pos, int rows, int h, int kvh, int hd,
                             int max_t, int window);
    /* ---- generation's small-batch products (worker/generate.c), optional (NULL: matmul) ----
     * y[r, o] = sum_k x[r, k] W[o, k] (+ y[r, o] when beta is 1; beta is 0 or 1) for rows r < rows (a decode
     * step or a few selected rows), W [out, in] held as fp32 (w) or as bf16 bit patterns (w16, widened
     * exactly: shift left 16), exactly one of them non-NULL. Each output is one dot product summed in a fixed
     * order that depends only on `in`: the same bits whatever rows, out, the thread count, and whether W is
     * held as fp32 or (for weights that are bf16 values) as bf16. */
    void (*decode_mm)(float *y, const float *x, const float *w, const uint16_t *w16, int rows, int out, int in,
                      float beta);
    /* ---- per-head RMSNorm of the q and k heads of packed qkv [N, (H+2*KVH)*hd] (Qwen3's q_norm/k_norm,
     * before RoPE): every q head row x[hd] becomes x * rstd * wq, every k head row x * rstd * wk,
     * rstd = 1/sqrt(mean(x^2) + eps); v is untouched. fwd works in place and saves the input rows
     * xs[N, (H+KVH)*hd] and rstd[N, H+KVH]. bwd turns the q/k part of dqkv (gradient of the output) into
     * the gradient of the input, in place, and accumulates dwq/dwk (each skipped when NULL), summing rows
     * in a fixed order. */
    void (*head_rmsnorm_fwd)(float *qkv, float *xs, float *rstd, const float *wq, const float *wk, int n, int h,
                             int kvh, int hd, float eps);
    void (*head_rmsnorm_bwd)(float *dqkv, float *dwq, float *dwk, const float *xs, const float *rstd,
                             const float *wq, const float *wk, int n, int h, int kvh, int hd);

    /* ---- sliding-window causal attention (Mistral, Qwen2/3 sliding layers) ----
     * attention_fwd / attention_bwd where query row i sees only the keys j with 0 <= i - j < window (as
     * transformers' sliding-window mask); window <= 0 or >= t is plain causal attention. */
    void (*attention_window_fwd)(float *out, float *lse, const float *qkv, int b, int t, int h, int kvh, int hd,
                                 int window);
    void (*attention_window_bwd)(float *dqkv, const float *dout, const float *qkv, const float *out,
                                 const float *lse, int b, int t, int h, int kvh, int hd, int window);

    /* ---- document-packed sequences (train.packing: documents; kernels/cpu/cpu_attention_docs.c) ----
     * pos[B*T] (backend memory): each token's position inside its document (0 at a document's first
     * token, +1 per token; documents are contiguous). attention_docs_*: attention_window_* where query row
     * i also sees only keys j >= i - pos[i] (its own document); window <= 0 = no window. rope_pos_*:
     * rope_* with table row pos[r] for token r. embedding_pos_fwd: embedding_fwd with wpe[pos[r]] (wpe
     * required); embedding_pos_bwd accumulates dwpe[pos[r]] += dout[r] only (dwte: embedding_bwd with
     * dwpe NULL). All optional: a model refuses documents mode on a backend without them. */
    void (*attention_docs_fwd)(float *out, float *lse, const float *qkv, const int32_t *pos, int b, int t, int h,
                               int kvh, int hd, int window);
    void (*attention_docs_bwd)(float *dqkv, const float *dout, const float *qkv, const float *out,
                               const float *lse, const int32_t *pos, int b, int t, int h, int kvh, int hd,
                               int window);
    void (*rope_pos_fwd)(float *qkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                         int kvh, int hd);
    void (*rope_pos_bwd)(float *dqkv, const float *cos, const float *sin, const int32_t *pos, int b, int t, int h,
                         int kvh, int hd);
    void (*embedding_pos_fwd)(float *out, const int32_t *tokens, const float *wte, const float *wpe,
                              const int32_t *pos, int b, int t, int c);
    void (*embedding_pos_bwd)(float *dwpe, const float *dout, const int32_t *pos, int b, int t, int c);
    /* A column block of a row-major matrix (a packed q/k/v or gate/up site's LoRA adapter, worker/lora.c):
     * dst[i * ldd + j] = src[i * lds + j] (accumulate 0) or dst[i * ldd + j] += src[i * lds + j] (1),
     * i < rows, j < cols; both pointers are device memory, already offset to the block's first column. */
    void (*copy_cols)(float *dst, int ldd, const float *src, int lds, int rows, int cols, int accumulate);
    /* x[i] += v, i < n (QLoRA's double-quantized scales: their mean added back, worker/qlora.c). */
    void (*add_scalar)(float *x, float v, size_t n);
    /* LoRA dropout over adapter k's [rows, in] input x (worker/lora.c): row i's key
     * rk = mix(mix(key ^ mix((sample0 + i / t) * 0x9e3779b97f4a7c15 + i % t)) ^ k) (mix: splitmix64's
     * finalizer, uint64 arithmetic), element j kept when mix(rk + j) >= thresh; v = kept ? x * inv : 0;
     * out = v (add NULL) or add + v (add may be out). */
    void (*lora_dropout)(float *out, const float *x, const float *add, int rows, int in, int t, uint64_t key,
                         int64_t sample0, int k, uint64_t thresh, float inv);
    /* DoRA (worker/lora.c), every product and sum rounded on its own (no FMA contraction), double sums in
     * row / column order. dora_norm: for row j of the [out, in] weight, ss = sum_i (W + (double)scale * ba)^2
     * in double, inv[j] = (float)(1 / sqrt(ss)), c[j] = mg[j] * inv[j]. dora_apply: y[i * ldy + j] +=
     * c[j] * z[i, j] - base[i, j] over [rows, out]. dora_bwd: gm[j] += (float)(inv[j] * sum_i (double)dy[i, j]
     * z[i, j]) (gm NULL: skipped), base = (c[j] - 1) * dy, then dy *= c[j]. scale_rows: w[j, i] *= c[j]. */
    void (*dora_norm)(float *c, float *inv, const float *w, const float *ba, const float *mg, int out, int in,
                      float scale);
    void (*dora_apply)(float *y, int ldy, const float *z, const float *base, const float *c, int rows, int out);
    void (*dora_bwd)(float *gm, float *base, float *dy, const float *z, const float *c, const float *inv, int rows,
                     int out);
    void (*scale_rows)(float *w, const float *c, int out, int in);
    /* The prompt encoders' hidden activation (worker/prompt.c): r = tanh(a) (tanh_act) or max(a, 0); and its
     * backward dx *= tanh_act ? 1 - r * r : (a > 0). */
    void (*prompt_act)(float *r, const float *a, size_t n, int tanh_act);
    void (*prompt_act_bwd)(float *dx, const float *a, const float *r, size_t n, int tanh_act);

    /* ---- int8 forward matmuls (a frozen distillation teacher, distill.teacher_dtype: int8) ----
     * A weight W[out, in] is quantized once per output row, symmetric: s_j = absmax_j / 127 (absmax of row j),
     * q[j, k] = clamp(rint(W[j, k] / s_j), -127, 127) (0 where s_j = 0), as QLoRA's int8 rule with one block per
     * row; w8_pack writes it into an opaque blob of w8_bytes(out, in) bytes (the backend's layout: codes,
     * scales, row sums). matmul_w8a8: C[m, out] = (op) + beta * C (+ bias[out]), where each row i of the fp32
     * activations a[m, in] is quantized per token the same way (t_i = absmax_i / 127, p[i, k] = clamp(rint(
     * a[i, k] / t_i))), the products summed exactly in int32 and rescaled: op[i, j] = (float)sum_k p q * (t_i *
     * s_j) (the scale product rounded to fp32 first; beta * C added after, then the bias; beta 0 never reads C).
     * scratch: backend memory of w8_scratch_bytes(m, in) bytes. All optional (NULL: no int8 teacher here). */
    size_t (*w8_bytes)(int out, int in);
    size_t (*w8_scratch_bytes)(int m, int in);
    void (*w8_pack)(void *packed, const float *w, int out, int in);
    void (*matmul_w8a8)(float *c, const float *a, const void *packed, const float *bias, int m, int out, int in,
                        float beta, void *scratch);
    /* ---- fused dequantize-matmul (QLoRA bases, worker/qlora.c st_qlora_matmul) ----
     * W[R, K] = the dequantized st_qweight (R = the sum of its parts' rows, K = cols), never materialized
     * whole: trans 0 (forward): C[m, R] = X[m, K] @ W^T + beta * C; trans 1 (input gradient): C[m, K] =
     * X[m, R] @ W + beta * C (beta 0 never reads C). bf16 0: matmul's product of fp32 X and the dequantized
     * W (the CPU twin gives matmul's bits: the same sgemm per output element, K summed in the same order; a
     * one-row trans 1 within fp32 summation error: OpenBLAS's sgemv orders by the call's length);
     * bf16 1: matmul_bf16's (X and the dequantized W rounded to bf16, fp32 accumulation; X may be stored as
     * bf16); bf16 2 (ST_QMM_W16): matmul's fp32 product of fp32 X (never rounded; no bf16 X) and the dequantized
     * W rounded to bf16 (DoRA's base term under bf16 reads the base matmul's bf16 weight, worker/lora.c). scratch: backend memory of st_qmatmul_scratch_floats(m, R, K, trans, bf16, threads) floats,
     * `threads` the CPU backend's thread count (the CPU twin dequantizes one panel of W per thread there and
     * uses at most scratch_floats of it; CUDA dequantizes tiles in shared memory and needs none: NULL, 0).
     * Optional (NULL: the caller dequantizes whole matrices and uses matmul / matmul_bf16). */
    void (*qmatmul)(float *c, st_mm_in x, const st_qweight *w, int m, int trans, int bf16, float beta, float *scratch,
                    size_t scratch_floats);
};

/* Arithmetic of the model (config key `precision`): fp32; or bf16 mixed precision — fp32 master weights,
 * gradients, optimizer state, residual stream and loss; a bf16 copy of the weights and bf16 saved
 * activations; every matmul on bf16 operands with fp32 accumulation (matmul_bf16). worker/model.c has the
 * exact list of what is stored as bf16. */
typedef enum { ST_PRECISION_FP32 = 0, ST_PRECISION_BF16 = 1 } st_precision;

/* Floats of scratch matmul_bf16 needs for this shape on any backend: room for a copy of both operands
 * (A: m*k, B: k*n) as fp32 (the CPU twin) with A's copy padded to 64 bytes; bf16 copies (CUDA) need half. */
static inline size_t st_matmul_bf16_scratch_floats(int m, int n, int k) {
    if (m <= 0 || n <= 0 || k <= 0) return 0;
    return ((size_t)m * (size_t)k + 15) / 16 * 16 + (size_t)k * (size_t)n;
}

/* qmatmul's CPU panels: about 256 Ki floats of W each (1 MB: an L2) — panel width P output columns
 * (rows of W for trans 0, len = K; columns of W for trans 1, len = R), a multiple of 16, at most n (the output
 * columns) rounded up to 16. The n columns are split into ceil(n / P) panels of near-equal widths whose edges
 * are multiples of 16 (widths at most P + 15): oneDNN's AVX2 sgemm (2.6) sums a column that falls in a last tile
 * of 8 or fewer columns in another order than one in a full 16-column tile, so only edges on the whole matrix's
 * own 16-column tiles give its bits (test_qlora.c split_exact measures it; AVX-512 takes any multiple of 4).
 * Each panel is at least 2^20 / (m len) columns wide: OpenBLAS's small-matrix sgemm kernels (SkylakeX:
 * m n k <= 10^6) sum k in one pass where the blocked ones sum it in chunks, so no panel may fall under that size
 * unless the whole product does (the bits would then differ from the whole-matrix sgemm's). */
static inline int st_qmatmul_panel(int m, int len, int n) {
    long p = len > 0 ? 262144L / len : 16, small = m > 0 && len > 0 ? (1L << 20) / ((long)m * len) + 1 : 0;
    if (p < 2 * small + 32) p = 2 * small + 32; /* a panel is then at least n / np - 15 > P / 2 - 15 > small */
    p = (p + 15) / 16 * 16;
    long nn = ((long)n + 15) / 16 * 16;
    return (int)(p < nn ? p : nn);
}

/* The first output column of panel q of np over n columns: q n / np rounded down to a multiple of 16 (n for
 * q = np), so every panel's sgemm tiles its columns as the whole-matrix call does (see st_qmatmul_panel). */
static inline int st_qmatmul_edge(int q, int np, int n) { return q >= np ? n : (int)((long)q * n / np / 16 * 16); }

/* Floats of scratch qmatmul needs on the CPU backend with `threads` threads: X's bf16 values as fp32
 * (bf16 1 only, padded to 64 bytes), then one panel slot ((P + 16) x len floats) per thread. A smaller scratch
 * runs fewer threads (one slot at the least). */
#define ST_QMM_W16 2 /* qmatmul's bf16 argument: W rounded to bf16, X fp32 as is */
static inline size_t st_qmatmul_scratch_floats(int m, int rows, int cols, int trans, int bf16, int threads) {
    if (m <= 0 || rows <= 0 || cols <= 0) return 0;
    int len = trans ? rows : cols, n = trans ? cols : rows;
    size_t xs = bf16 == 1 ? ((size_t)m * (size_t)len + 15) / 16 * 16 : 0;
    return xs + ((size_t)st_qmatmul_panel(m, len, n) + 16) * (size_t)len * (size_t)(threads > 0 ? threads : 1);
}

/* AdamW's per-range scalars, computed in double and rounded to float once, where PyTorch hands them to
 * its float kernel. Every backend's AdamW takes these and then runs, per element, exactly:
 *   g = grad * grad_scale; p = param * decay; m = m * beta1 + one_m_b1 * g;
 *   v = v * beta2 + one_m_b2 * g * g; param = p + neg_step_size * m / (sqrtf(v) / bc2_sqrt + eps). */
typedef struct {
    float decay, one_m_b1, one_m_b2, neg_step_size, bc2_sqrt;
} st_adamw_scalars;
st_adamw_scalars st_adamw_scalars_for(float lr, float weight_decay, float beta1, float beta2, int step);

/* The 16 NormalFloat-4 levels (QLoRA paper), shared by every backend. */
extern const float ST_NF4_LEVELS[16];

/* Fills cos/sin [t, hd/2] for positions 0..t-1: angle = pos * theta^(-2i/hd). Host memory. */
void st_rope_tables(float *cos_out, float *sin_out, int t, int hd, float theta);

/* The CPU backend's w8_bytes and w8_scratch_bytes (kernels/cpu/cpu_int8.c), for planning without a backend. */
size_t st_cpu_w8_bytes(int out, int in);
size_t st_cpu_w8_scratch_bytes(int m, int in);
/* The CUDA backend's (kernels/cuda/int8.cu; defined in kernels/backend.c so a build without CUDA plans too). */
size_t st_cuda_w8_bytes(int out, int in);
size_t st_cuda_w8_scratch_bytes(int m, int in);

/* The CPU backend. Sets the OpenMP and BLAS thread counts to `threads` (<= 0: st_num_threads()). */
const st_backend *st_backend_cpu(int threads);

/* The CUDA backend, or NULL (with st_error() saying why) when not built or no usable device. */
const st_backend *st_backend_cuda(int device);
/* The CUDA backend on the device for rank `local_rank` of the `local_size` ranks on this node
 * (st_cuda_pick_device in kernels/cuda/launch_host.h has the rule), or NULL with st_error() set. */
const st_backend *st_backend_cuda_for_rank(int local_rank, int local_size);

/* Tests only: a table the trainer uses instead of looking one up (config key `backend` is then ignored),
 * e.g. tests/tools/fakedev.c's CPU backend with tagged device memory and an injected kernel failure.
 * NULL (the default) restores the lookup. */
void st_backend_set_override(const st_backend *be);
const st_backend *st_backend_override(void);

#endif
