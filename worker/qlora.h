/* qlora.h — the frozen base of a QLoRA run (finetune.mode: qlora) held quantized in memory.
 *
 * st_qlora_quantize replaces every 2-D weight inside the layers (attention and MLP projections: what
 * bitsandbytes' QLoRA quantizes; embeddings, norms and the LM head stay unquantized: fp32, or bf16 only with
 * spec.bf16, below) by
 *   nf4:  4-bit codes into the QLoRA NormalFloat table ST_NF4_LEVELS (nearest level of w / absmax, ties to
 *         the lower code), two codes a byte, low nibble first (the backend's dequant_nf4 order), one fp32
 *         absmax per `block` consecutive elements of the row-major tensor;
 *   int8: q = rint(w / s) with s = absmax / 127 per block.
 * double_quant: the block scales (absmax, or s for int8) lose their mean, then are stored as int8 with a
 * linear symmetric map, one fp32 scale (max |scale - mean| / 127) per 256 scales — simpler than
 * bitsandbytes' dynamic 8-bit map and exact to reproduce; it only changes how precisely the scales are kept,
 * and the base is never saved, so no file format depends on it.
 * The fp32 copies leave the weight buffer. With the backend's qmatmul (the fused path, the default) no
 * dequantized matrix has a place at all: the quantized parameters' registry offsets lie in a virtual range past
 * the buffer (no storage; they still name the tensors: st_qlora_mm below), every reader goes through the codes —
 * the model's matmuls (st_qlora_select / st_qlora_mm), DoRA's products (st_qlora_param_mm) and norms (row
 * panels, st_qlora_rows), and outside a step a reader that wants a tensor dequantizes it into its own memory
 * (st_qlora_dequant_param: eval.generate's merged view, st_qlora_materialize); st_qlora_acquire then only
 * notes the new group. The unfused path (a backend without qmatmul, or SHARDTUNE_QLORA_FUSED=0: the bench's
 * and the tests' side by side) keeps the old layout: the offsets point at one shared scratch region
 * sized for one matmul unit — q/k/v of a Llama-family layer together (the packed q/k/v matmul reads them as
 * one matrix), gate/up together unless spec.mlp_apart, every other quantized weight alone — each at its
 * place in its unit. Inside forward / backward
 * (m->in_compute) the model dequantizes a unit right before the matmul that reads it (st_qlora_load: the
 * forward x W^T and the input gradient dy W; DoRA loads the weight it reads), so only one matrix is ever dequantized; outside it st_qlora_acquire
 * dequantizes the requested parameters one unit at a time (callers there read one parameter per acquire).
 * Under precision bf16 the load also rounds the dequantized values into the model's bf16 copy, which the
 * matmuls read (with spec.bf16 straight into it, a piece at a time: the scratch then has no fp32 storage).
 * The dequantized values are the same bits whichever path makes them (the same kernels, tensor by tensor).
 * Any backend with dequant_nf4 / dequant_int8 / add_scalar: the quantization itself runs on the host (one
 * fp32 tensor at a time, bit-identical everywhere); on a device backend (host_memory 0) the codes and scales
 * are then uploaded, the acquire dequantizes in device memory, and the bf16-only parameters are put through
 * a device staging piece. No ZeRO-3 residency hooks when quantizing.
 *
 * Memory: the table (codes, scales: the blob below, registry order) is backend memory (host memory on the CPU
 * backend, device memory on a GPU) owned by the model (st_model_free), as are the acquire's scale and piece
 * buffers. */
#ifndef ST_QLORA_H
#define ST_QLORA_H

#include <stddef.h>
#include <stdint.h>

#include "worker/model.h"

typedef enum { ST_QLORA_NF4, ST_QLORA_INT8 } st_qlora_quant;

typedef struct {
    st_qlora_quant quant;
    int double_quant;
    int block; /* elements per scale, >= 1 */
    int bf16;  /* precision bf16 (st_qlora_begin only): the frozen base is held once, in bf16 (see below) */
    int mlp_apart; /* Llama family: gate and up are units of their own (else one: the packed gate/up matmul
                    * reads them as one matrix); the model then always runs them as two matmuls (worker/model.c
                    * mlp_split). The trainer sets it where the model splits them anyway (st_model_mlp_splits:
                    * blocked MLP under bf16), so the results are the unquantized path's bit for bit */
    int sharded;   /* st_qlora_begin only (ZeRO-3 on a device, coordinator/trainer/train_qload.c): no blob and only
                    * the adapters' floats in the weight buffer (m->weights_tail_only); each rank puts the words it
                    * keeps with st_qlora_put_bytes (below) once the communicator exists */
} st_qlora_spec;

typedef struct st_qlora st_qlora;

/* Quantizes the model's layer weights as `spec` says and shrinks m->weights (call after st_lora_attach:
 * the adapters are compacted with the rest). ST_ECONFIG for a backend without host memory, residency
 * hooks; ST_EINVAL once bf16 weights exist (set precision after quantizing). */
int st_qlora_quantize(st_model *m, const st_qlora_spec *spec);
void st_qlora_free(st_qlora *q);

/* The streamed form of st_qlora_quantize, for a model bound to its backend without weights (st_model_bind
 * with alloc_weights 0; adapters attached to the registry): lays out and allocates the compacted buffer
 * (kept base, unfused only one matmul unit's scratch, the adapters, uninitialized). Then st_qlora_put for every base parameter,
 * in any order, each once: a quantized one is quantized from `host` (its fp32 values, numel floats, registry
 * layout), a kept one copied to its place. Same errors as st_qlora_quantize. */
int st_qlora_begin(st_model *m, const st_qlora_spec *spec);
int st_qlora_put(st_model *m, int i, const float *host);
/* Elements [a, a + n) of a parameter that is not quantized (a piece of a large tensor at a time). */
int st_qlora_put_part(st_model *m, int i, size_t a, size_t n, const float *host);
/* spec.bf16 ("the frozen weights once, in the compute precision"): the layout is [bf16-only kept | (unfused:
 * one unit's scratch) | fp32 kept | adapters], m->n_w16 the end of the bf16-only part: the token embedding (Llama family)
 * and an untied LM head live in the bf16 copy only (st_qlora_begin allocates it; st_model_set_precision
 * keeps it), an unfused scratch too (the acquire dequantizes a piece at a time and rounds it into the bf16 copy:
 * the values the fp32 path would round). Norms, biases and the adapters keep fp32 masters. Without fp32
 * values, those parameters' checksums (checkpoints' adapter_base_checksum) are recorded at load:
 * st_qlora_set_sum / st_qlora_sum (st_ckpt_checksum of the fp32 values, from element 0). */
int st_qlora_bf16_only(const st_model *m, int i);
/* Whether the base is held so (spec.bf16): its matmuls' values are the dequantized ones rounded to bf16. */
int st_qlora_held_bf16(const st_model *m);
void st_qlora_set_sum(st_model *m, int i, uint64_t sum);
uint64_t st_qlora_sum(const st_model *m, int i);

/* Quantized parameter i dequantized whole into dst (backend memory, numel floats, the caller's: eval.generate's
 * merged view, st_qlora_materialize): its fp32 values, with round16 rounded to bf16 (kept as fp32: what a
 * matmul under bf16 reads). Bit for bit what the scratch held. ST_EINVAL for a parameter not quantized. */
int st_qlora_dequant_param(const st_model *m, int i, float *dst, int round16);
/* Rows [r0, r0 + nr) of quantized parameter i dequantized (round16 as above) into the base's panel buffer
 * (backend memory, grown to the largest panel asked; valid until the next call): a pointer to row r0, NULL
 * with st_error() set (out of memory, rows outside it). Readers that want a whole matrix row by row (DoRA's
 * norms and magnitudes) take st_qlora_panel_rows(m, i) rows at a time (about 1 MB of fp32; at least a row). */
const float *st_qlora_rows(const st_model *m, int i, int r0, int nr, int round16);
int st_qlora_panel_rows(const st_model *m, int i);
/* Bytes st_qlora_rows' buffers reach with st_qlora_panel_rows panels (fp32 + bf16; the planner). */
size_t st_qlora_rows_work(const st_model *m, const st_qlora_spec *spec);
/* The fused base: C = X W^T (trans 0) or X W (trans 1) + beta C with W quantized parameter i alone, through the
 * backend's qmatmul, W as the model's matmuls read it (precision bf16: rounded to bf16, ST_QMM_W16), X fp32 as
 * is: matmul's product of the same values (DoRA's base term, worker/lora.c). ST_EINVAL unfused. */
int st_qlora_param_mm(const st_model *m, int i, float *c, const float *x, int M, int trans, float beta);

/* A new group of parameters becomes resident (the model's st_model_acquire; ZeRO-3 has just gathered their
 * quantized bytes): forgets which unit the scratch holds. Unfused, outside forward / backward it then dequantizes the
 * quantized parameters among [first, last), a unit at a time, into the scratch their offsets point at (the
 * last unit stays: acquire one parameter to read it). Inside them it does nothing more: the matmuls load. */
void st_qlora_acquire(const st_model *m, int first, int last);
/* Unfused: dequantizes the matmul unit of registry entry i into the scratch (its own place, and under bf16 the bf16
 * copy's), unless the scratch already holds it; a no-op for a parameter that is not quantized, and on the fused
 * path (no scratch). */
void st_qlora_load(const st_model *m, int i);

/* The fused path (the backend's qmatmul, kernels/kernels.h: W's codes dequantized a panel / tile at a time
 * inside the matmul, never the whole matrix). Inside forward / backward the model calls st_qlora_select
 * where it used to call st_qlora_load: with a backend that has qmatmul (and SHARDTUNE_QLORA_FUSED is not
 * "0": the bench's side by side) it only notes the unit; the next st_qlora_mm then multiplies through the
 * codes of the unit's tensors from the noted one on whose rows add up to `out` (w, the caller's pointer for the
 * noted weight, is not read: a windowed model, device ZeRO-3, has none for a storage-less tensor)
 * (q/k/v packed, gate/up packed or one of them, any other weight alone): C = X W^T (trans 0) or X W
 * (trans 1) + beta * C, under the model's precision (bf16: matmul_bf16's numerics), and returns 1. Without a
 * noted unit it returns 0 (the caller multiplies a weight that is not quantized); a shape that is no unit's
 * (no caller makes one) gives NaN. Without the fused path st_qlora_select is st_qlora_load. The CPU twin's panels come from a scratch of
 * st_qmatmul_scratch_floats (allocated on first use, grown as needed, owned by the quantized base). */
void st_qlora_select(const st_model *m, int i);
int st_qlora_mm(const st_model *m, float *c, st_mm_in x, const float *w, int M, int out, int in, int trans,
                float beta);
/* Whether the model's quantized matmuls run fused (st_qlora_select above; then no scratch exists). */
int st_qlora_fused(const st_model *m);
/* Whether a base quantized on backend be would (NULL: the planner's registry-only model, the CPU's). */
int st_qlora_fuses(const st_backend *be);
/* Bytes st_qlora_mm's scratch grows to on a host backend with `threads` threads over matmuls of M rows
 * (the most over every unit's forward and input gradient; 0 on a device backend: tiles in shared memory). */
size_t st_qlora_fused_work(const st_model *m, const st_qlora_spec *spec, int M, int bf16, int threads, int device);

/* Whether the model's quantized base has gate and up as units of their own (spec.mlp_apart). */
int st_qlora_mlp_apart(const st_model *m);

/* Whether registry entry i is held quantized (no weights of its own in the model's buffer). */
int st_qlora_holds(const st_model *m, int i);

/* Bytes the quantized base takes (codes + scales) and the fp32 bytes it replaced. */
void st_qlora_bytes(const st_model *m, size_t *quantized, size_t *fp32);

/* Gives every quantized weight its own fp32 place again, holding its dequantized values, and drops the
 * quantized table: the model is then a LoRA model over the dequantized base (what `export --merge` of a
 * QLoRA run merges onto). */
int st_qlora_materialize(st_model *m);

/* Every quantized tensor's codes and scales live in one byte buffer ("the blob", registry order, so a
 * layer's bytes are one contiguous range; large: its pages are resident once written): ZeRO-3 shards it
 * like the frozen weights (worker/comm.c gathers a layer's range before st_qlora_acquire dequantizes it, and
 * gives back the bytes outside this rank's part afterwards). NULL / 0 without a quantized base. */
void st_qlora_blob(const st_model *m, uint8_t **blob, size_t *bytes);
/* The blob's byte range [*a, *b) of the quantized parameters among [first, last) (empty: *a == *b). */
void st_qlora_span(const st_model *m, int first, int last, size_t *a, size_t *b);
/* From the registry: the most blob bytes one layer holds (the planner: one layer gathered at a time). */
size_t st_qlora_layer_bytes_max(const st_model *m, const st_qlora_spec *spec);

/* ZeRO-3 on a device (worker/comm_zero3_dev.c), which keeps only this rank's part of the blob and gathers a
 * layer's bytes into a buffer of its own:
 * st_qlora_quantizable: whether base parameter i is one QLoRA quantizes (from the registry: a registry-only
 *   model too; every such parameter is held once st_qlora_begin ran);
 * st_qlora_blob_take: hands the whole blob to the caller (backend memory: the caller frees it); the tensors
 *   then have no bytes until placed;
 * st_qlora_place: the quantized tensors among [first, last) read their codes and scales from `bytes`, which
 *   holds the blob's range from byte `a` on (st_qlora_span; the group's bytes just gathered);
 * st_qlora_scratch_range: the weight range [*lo, *hi) of the unfused path's scratch (every quantized
 *   parameter's offset); empty (0, 0) on the fused path, which has none (qmatmul reads the placed codes);
 * st_qlora_set_scratch: (unfused) the scratch lives at w (fp32) and w16 (its bf16 copy, NULL without one),
 *   element lo of the weight space at w[0], instead of at m->weights / m->weights_bf16 + offset (w NULL: back
 *   there). */
int st_qlora_quantizable(const st_model *m, int i);
uint8_t *st_qlora_blob_take(st_model *m);
void st_qlora_place(const st_model *m, int first, int last, uint8_t *bytes, size_t a);
void st_qlora_scratch_range(const st_model *m, size_t *lo, size_t *hi);
void st_qlora_set_scratch(st_model *m, float *w, uint16_t *w16, size_t lo);

/* The sharded load (spec.sharded): each rank quantizes only the bytes of the blob it keeps, reading only the
 * values they depend on.
 * st_qlora_put_bytes: the bytes [a, b) of the blob that quantized parameter i holds (none outside it) into
 *   dst (backend memory; blob byte a at dst[0]), byte for byte what quantizing the whole tensor gives: its
 *   codes from their blocks' values, fp32 scales from theirs, double-quantized scales from every block (the
 *   scales' mean). Values come from rd (elements [at, at + n) of parameter i as fp32, pieces of whole blocks
 *   and whole code bytes, each element at most once), one piece and the tensor's host bytes in memory at a time.
 *   *mean_set: 1 when it computed the tensor's double-quantization mean (st_qlora_mean), which the ranks that
 *   did not must be given (st_qlora_set_mean) before anything dequantizes it.
 * st_qlora_code_elems: the elements [*e0, *e1) of parameter i whose codes lie in blob bytes [a, b) (the ranks'
 *   code bytes partition the tensor's elements: each rank checks and sums its own, train_qload.c).
 * st_qlora_put_bytes_work: its host working bytes at most (the largest tensor's bytes and fp32 scales, a piece). */
typedef int (*st_qlora_read_fn)(void *ctx, int i, size_t at, size_t n, float *dst);
int st_qlora_put_bytes(st_model *m, int i, size_t a, size_t b, st_qlora_read_fn rd, void *ctx, uint8_t *dst,
                       int *mean_set);
void st_qlora_code_elems(const st_model *m, int i, size_t a, size_t b, size_t *e0, size_t *e1);
float st_qlora_mean(const st_model *m, int i);
void st_qlora_set_mean(st_model *m, int i, float mean);
size_t st_qlora_put_bytes_work(const st_model *m, const st_qlora_spec *spec);

/* From the registry alone (a registry-only model too): the bytes `spec` quantizes the base into, the fp32
 * bytes that leave the weight buffer, the scratch floats that replace them (0 on the fused path; unfused the
 * largest matmul unit) and (spec.bf16) the floats held in bf16 only (the bf16-only kept parameters + the
 * scratch: below n_w16). */
void st_qlora_footprint(const st_model *m, const st_qlora_spec *spec, size_t *quantized, size_t *fp32,
                        size_t *scratch, size_t *w16);
/* The streamed load's working memory besides the model (bytes, host memory): one fp32 tensor to quantize and
 * its scales, plus the piece buffer of the bf16-only parameters, and on a device backend (device 1) of every
 * kept one (coordinator/trainer/train.c load_quantized). */
size_t st_qlora_load_work(const st_model *m, const st_qlora_spec *spec, int device);
/* The acquire's buffers st_qlora_begin allocates beside the model (bytes, backend memory): the dequantized
 * scales of the largest tensor, and with spec.bf16 unfused or on a device backend the piece buffer. */
size_t st_qlora_acquire_work(const st_model *m, const st_qlora_spec *spec, int device);

/* The quantization itself, on one host tensor of n floats (exposed for tests):
 * codes: nf4 (n + 1) / 2 bytes, int8 n bytes; scales: ceil(n / block) floats (absmax for nf4, absmax / 127
 * for int8). */
void st_qlora_quant_tensor(st_qlora_quant quant, const float *w, size_t n, int block, uint8_t *codes,
                           float *scales);

/* Double quantization of ns scales: q8[ns], scale2[ceil(ns / 256)], *mean; and its inverse. */
void st_qlora_double_quant(const float *s, size_t ns, int8_t *q8, float *scale2, float *mean);
void st_qlora_double_dequant(float *s, const int8_t *q8, const float *scale2, float mean, size_t ns);

#endif
