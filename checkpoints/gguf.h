/* gguf.h — GGUF v3 export (the file format llama.cpp and Ollama run) of a GPT-2 or Llama-family model.
 *
 * st_gguf_export writes one .gguf file from a built model and its weights (host memory, internal
 * layout): the llama.cpp metadata for the architecture (`llama` for llama/mistral, `qwen2`, `gpt2`),
 * the tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output), the
 * Q/K row permutation llama.cpp's converter applies to `llama` weights, and, when a tokenizer.json is
 * given, the tokenizer (see docs/compress.md for exactly which keys and how they are derived).
 * The block encoders (f16, bf16, Q8_0, Q4_0, Q5_0, Q5_1, Q2_K..Q6_K) are bit-exact to ggml's reference quantizers.
 * Nothing allocated here is handed to the caller. */
#ifndef ST_GGUF_H
#define ST_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "checkpoints/model_io.h"
#include "worker/model.h"

/* ggml tensor types (values are ggml's enum ggml_type), and the two mixes `--quant q4_K_M | q5_K_M` (not ggml
 * types: values outside ggml's enum; their tensors are stored as q4_K / q5_K / q6_K / fallbacks, chosen per
 * tensor as llama-quantize's Q4_K_M / Q5_K_M do: docs/compress.md). */
typedef enum {
    ST_GGML_F32 = 0, ST_GGML_F16 = 1, ST_GGML_Q4_0 = 2, ST_GGML_Q5_0 = 6, ST_GGML_Q5_1 = 7, ST_GGML_Q8_0 = 8,
    ST_GGML_Q2_K = 10, ST_GGML_Q3_K = 11, ST_GGML_Q4_K = 12, ST_GGML_Q5_K = 13, ST_GGML_Q6_K = 14, ST_GGML_BF16 = 30,
    ST_GGUF_MIX_Q4_K_M = 1015, ST_GGUF_MIX_Q5_K_M = 1017
} st_ggml_type;

/* A --quant value: "f32" | "f16" | "bf16" | "q8_0" | "q4_0" | "q2_K" | "q3_K" | "q4_K" | "q5_K" | "q6_K" |
 * "q4_K_M" | "q5_K_M" -> type; ST_EINVAL naming the value otherwise. (q5_0 / q5_1 are only picked per tensor
 * as the k-quants' fallbacks: docs/compress.md.) */
int st_ggml_type_parse(const char *s, st_ggml_type *out);
const char *st_ggml_type_name(st_ggml_type t);
/* Bytes of one row of n elements (n must be a multiple of the block size for Q types). */
size_t st_ggml_row_bytes(st_ggml_type t, int64_t n);
/* Elements per block: 1 (f32/f16/bf16), 32 (q4_0/q5_0/q5_1/q8_0), 256 (q2_K..q6_K). */
int64_t st_ggml_block_size(st_ggml_type t);

/* Scalar conversions as ggml does them (round to nearest even; bf16 quiets NaNs). */
uint16_t st_fp32_to_fp16(float f);
uint16_t st_fp32_to_bf16_ggml(float f);
/* Encodes n floats (n a multiple of the type's block size) into out (st_ggml_row_bytes(t, n) bytes). */
void st_ggml_encode(st_ggml_type t, const float *x, int64_t n, uint8_t *out);
/* The k-quant family (gguf_kquant.c): q2_K..q6_K and their fallbacks q5_0, q5_1; called by st_ggml_encode. */
void st_ggml_encode_kquant(st_ggml_type t, const float *x, int64_t n, uint8_t *out);
/* Q4_K / Q5_K with the sub-blocks fitted one at a time (ggml's loop structure); st_ggml_encode fits the 8 of
 * a super-block in vector lanes, which must give the same bytes (tests/unit/test_gguf_kquant.c). */
void st_ggml_kquant_scalar(st_ggml_type t, const float *x, int64_t n, uint8_t *out);
/* The plain, ggml-loop-shaped form of every encoder that st_ggml_encode runs in a faster form (q8_0 / q4_0:
 * AVX2 / AVX-512; q2_K, q4_K, q5_K, q6_K: vector lanes); the unit test holds the two to the same bytes. */
void st_ggml_encode_reference(st_ggml_type t, const float *x, int64_t n, uint8_t *out);
/* 1 when the encoders run their AVX-512 builds (x86-64 CPU with AVX-512F/DQ/BW/VL, and the environment
 * variable SHARDTUNE_GGUF_SIMD is not "avx2"), 0 for the default build; decided at the first call.
 * st_ggml_simd_reset makes the next call decide again (tests run both builds). */
int st_ggml_simd_wide(void);
void st_ggml_simd_reset(void);

typedef struct {
    const char *tokenizer_dir; /* folder with tokenizer.json (+ tokenizer_config.json); NULL: none */
    const char *name;          /* general.name; NULL: omitted */
    const char *tokenizer_pre; /* tokenizer.ggml.pre override (--tokenizer-pre); NULL: from the split regex */
} st_gguf_options;

typedef struct {
    int n_tensors;
    int n_fallback;         /* 2-D tensors stored in another type because their rows do not fit the quant block
                               (f16; under the k-quants: q5_0 / q5_1 / q4_0 / q8_0, or f16) */
    int has_tokenizer;      /* tokenizer metadata written */
    char tokenizer_model[16];  /* "gpt2" | "llama" | "" */
    char tokenizer_pre[32];
    uint64_t bytes;         /* file size */
} st_gguf_report;

/* Writes `path` atomically (PATH.partial, then rename). `host_weights` is m->n_weights floats in the
 * model's internal layout. Returns 0 or a negative ST_E* with a message naming the cause. */
int st_gguf_export(const st_model *m, const float *host_weights, st_ggml_type quant, const st_gguf_options *opt,
                   const char *path, st_gguf_report *rep);

/* st_gguf_export with the weights coming from fetch (model_io.h: parameter i in registry layout = the
 * internal layout), a tensor at a time, so that no whole-model copy exists: a helper thread fetches (reads and
 * converts) the next parameter while the current one is encoded on the OpenMP threads and the writer thread
 * writes the previous chunk. Memory: two buffers of the largest parameter, plus what st_gguf_export uses.
 * fetch is called at most once per parameter, in increasing order, from that helper thread one call at a
 * time (so it must not be a collective; its st_fail message is carried back); after a failure no further
 * parameter is fetched. The same bytes as st_gguf_export over the same values (tests/unit/test_gguf_stream.c). */
int st_gguf_export_streamed(const st_model *m, st_model_fetch_fn fetch, void *ctx, st_ggml_type quant,
                            const st_gguf_options *opt, const char *path, st_gguf_report *rep);

/* A streamed export's source: `fetch` gives whole parameters (as st_gguf_export_streamed's); `rows`, when
 * not NULL, gives rows [r0, r0 + n) of a 2-D parameter i (registry layout: shape[1] floats a row) for the
 * parameters `ranged` accepts. A ranged tensor is read, converted, checked and encoded a cache-sized piece
 * at a time on the OpenMP threads (rows may be called concurrently from them, in any order, each range at
 * most once per tensor written; its st_fail message is carried back), so no buffer of the whole tensor
 * exists and each value crosses memory once. The others come from `fetch` as in st_gguf_export_streamed. */
typedef int (*st_gguf_rows_fn)(void *ctx, const st_model *m, int i, int64_t r0, int64_t n, float *dst);
typedef struct {
    st_model_fetch_fn fetch;
    st_gguf_rows_fn rows;                                /* NULL: every parameter through fetch */
    int (*ranged)(void *ctx, const st_model *m, int i); /* 1: parameter i through rows (NULL: every 2-D one) */
    void *ctx;
} st_gguf_source;

/* st_gguf_export_streamed from such a source: the same bytes (tests/unit/test_gguf_stream.c). */
int st_gguf_export_source(const st_model *m, const st_gguf_source *src, st_ggml_type quant, const st_gguf_options *opt,
                          const char *path, st_gguf_report *rep);

/* The model's LoRA adapters (worker/lora.h; host_weights: all m->n_weights floats, adapters included) as
 * a GGUF LoRA adapter as llama.cpp's convert_lora_to_gguf.py writes one: general.type "adapter",
 * adapter.type "lora", adapter.lora.alpha (scale * r), general.architecture of the base, tensors
 * blk.N.<base>.weight.lora_a / .lora_b (docs/compress.md). Any single type incl. q2_K..q6_K (llama.cpp loads
 * quantized adapters); ST_EINVAL without adapters or for the q4_K_M / q5_K_M mixes, ST_ECONFIG for DoRA. */
int st_gguf_export_lora(const st_model *m, const float *host_weights, st_ggml_type quant, const st_gguf_options *opt,
                        const char *path, st_gguf_report *rep);
/* The same with the adapter tensors coming from fetch, one parameter at a time in increasing order (only the
 * adapters' parameters are fetched; the base's weights are never read, so a base built without loading its
 * weights serves): the same bytes (tests/unit/test_gguf_stream.c). */
int st_gguf_export_lora_streamed(const st_model *m, st_model_fetch_fn fetch, void *ctx, st_ggml_type quant,
                                 const st_gguf_options *opt, const char *path, st_gguf_report *rep);

#endif
