/* generate.h — text generation with a KV cache on a built, loaded model (GPT-2 and the Llama family).
 *
 * st_generate decodes a list of prompts (token ids) in batches of up to `batch` sequences: the prompts of
 * a batch are prefilled together (in chunks of rows), then every unfinished sequence adds one token per
 * step, attending to its own cached keys and values. All model math runs on the model's backend through
 * kernels.h (kv_store, attention_cached and the training kernels); token choice runs on the host.
 *
 * Determinism: sequence i draws from its own RNG stream (seed, seqs[i].stream), so with the stream set to
 * the prompt's index in the input the output does not depend on which rank or batch position it ran in,
 * only on the batch composition (which fixes the matmul shapes); the CLI therefore splits prompts
 * across ranks in whole batches.
 *
 * Memory: the generator allocates its KV cache and scratch on the backend per call and frees them before
 * returning. seqs[i].out is malloc'ed here and owned by the caller (free()); seqs[i].logits, when set,
 * is a caller buffer of max_new * vocab floats. The model is only read. */
#ifndef ST_GENERATE_H
#define ST_GENERATE_H

#include <stdint.h>

#include "common/rng.h"
#include "worker/model.h"

typedef struct {
    int max_new;              /* tokens generated per prompt at most (>= 1) */
    float temperature;        /* 0: greedy (argmax, first index on ties); > 0: sample softmax(logits / T) */
    int top_k;                /* sampling: keep the logits >= the k-th largest (0 = off) */
    float top_p;              /* sampling: nucleus, smallest top set with mass >= top_p (1 = off) */
    float repetition_penalty; /* HF rule on every distinct id of prompt + output so far (1 = off) */
    uint64_t seed;
    const int32_t *eos;       /* end tokens: a sequence stops after emitting one (kept in its output) */
    int n_eos;
    int batch;                /* sequences decoded together (>= 1) */
    /* Optional: called after each new token of sequence `seq` (index into the seqs array); returning 1
     * stops that sequence (stop strings). */
    int (*stop)(void *ctx, int seq, const int32_t *out, int n_out);
    void *stop_ctx;
    /* Optional: accumulates wall time, process CPU time (every thread's) and tokens of prefill (prompt
     * tokens) and decode (generated tokens after each sequence's first, which prefill yields). */
    struct st_gen_stats *stats;
    /* Optional lockstep for models whose residency hooks are collective (ZeRO-3 eval.generate): returns
     * whether any rank is busy (an all-reduce of `busy`); every forward calls sync(ctx, 1) first, and a
     * rank out of work calls sync(ctx, 0) and repeats the forward's acquires while it returns 1. */
    int (*sync)(void *ctx, int busy);
    void *sync_ctx;
    /* Optional: the weights held in bf16 only (st_gen_hold_bf16 on this model); NULL: all read as fp32. */
    const struct st_gen_hold *hold;
} st_gen_params;

/* Matmul weights held in bf16 only for generation (st_gen_hold_bf16). */
typedef struct st_gen_hold {
    /* parameter i's bf16 copy at w16 + params[i].offset where held[i]: host [n_weights] (pages resident only
     * where written), or on a device backend (be set) device memory [n16], the held parameters laid out first */
    uint16_t *w16;
    unsigned char *held;   /* [n_params] */
    size_t floats;         /* weights held in bf16 only */
    const st_backend *be;  /* the device backend owning w16, NULL: host memory */
} st_gen_hold;

/* Holds the model's matmul weights in bf16 only where that is exact (h zeroed, or from st_gen_hold_load: the
 * units held there stay): every matmul unit (a layer's packed
 * q/k/v, the output projection, the packed gate/up or GPT-2 c_fc, the down projection, the LM head and the
 * token embedding) whose fp32 values are all bf16 values (low 16 bits zero: a bf16 source model) gets a
 * bf16 copy and its fp32 memory given back (it reads as zero after: the model is then for generation only,
 * and st_model_free). Generation reads those through decode_mm (each output one dot product, the weight
 * widened exactly: the same bits as with fp32 holding) or, for a prefill chunk of more rows, widened into
 * an fp32 scratch unit by unit (the same matmul call). A unit with any other value (a merged LoRA
 * adapter's projections) stays fp32. On a device backend (host_memory 0), whose buffers cannot give pages
 * back, the model is laid out anew: the held parameters first with no fp32 storage (m->n_w16, as
 * st_model_bind_frozen_bf16's layout; nothing reads m->weights below it), their bf16 copy in a device buffer
 * of their own (h->be), the others copied to a smaller fp32 allocation, so device memory falls by 2 bytes per
 * held float (the old allocation exists until the copy is made). Only on a backend with decode_mm, a model
 * without residency hooks, prompt learning, QLoRA or int8 packs; otherwise, or with SHARDTUNE_DECODE_FP32=1
 * (tests), nothing is held (h->floats 0). Returns 0 or ST_ENOMEM. */
int st_gen_hold_bf16(st_model *m, st_gen_hold *h);

/* Where a model that has not been read yet gets a parameter in bf16: can16(ctx, i): whether parameter i's
 * source values are bf16 values (a BF16 file tensor); read16(ctx, i, a, n, dst): writes its bf16 values
 * [a, a + n) to host dst (and may check them), 0 or an error. */
typedef struct {
    int (*can16)(void *ctx, int i);
    int (*read16)(void *ctx, int i, size_t a, size_t n, uint16_t *dst);
    void *ctx;
} st_gen_hold_source;

/* The load's side of st_gen_hold_bf16 (the same conditions; h zeroed first): every matmul unit whose parameters
 * the source has all in bf16 is read straight into the hold (read16 into h->w16) and marked held, its fp32 memory
 * never touched; the caller then reads the other parameters as fp32 and calls st_gen_hold_bf16(m, h), which keeps
 * h and holds what else is exact. A host-memory model comes with its weights allocated (st_model_open_dir);
 * on a device backend m is bound without weights (st_model_bind(m, be, 0)) and this allocates them: the held
 * parameters laid out first without fp32 storage (see st_gen_hold_bf16), read in bounded host pieces through
 * copy_to_device, the fp32 allocation for the others only (all of them when nothing is held). Returns 0 or
 * the first read16 error (h released). */
int st_gen_hold_load(st_model *m, st_gen_hold *h, const st_gen_hold_source *src);
void st_gen_hold_free(st_gen_hold *h);

typedef struct st_gen_stats {
    double prefill_s, decode_s;
    double prefill_cpu_s, decode_cpu_s; /* CPU seconds of all threads: with one thread, time it ran */
    long prefill_tokens, decode_tokens;
    long decode_team1_steps, decode_steps; /* decode steps run on one thread (see SHARDTUNE_DECODE_TEAM), all */
    long hold_bf16_floats;                 /* weights held in bf16 only (st_gen_hold_bf16) */
    double rss_mb;                         /* resident memory (VmRSS) after the last decode step, MB */
} st_gen_stats;

typedef enum {
    ST_GEN_LENGTH = 0, /* max_new tokens generated */
    ST_GEN_EOS = 1,    /* an end token */
    ST_GEN_STOP = 2,   /* the stop callback */
    ST_GEN_MAXPOS = 3, /* the positions generation can use (st_gen_max_positions) */
} st_gen_finish;

typedef struct {
    const int32_t *prompt; /* caller's ids, prompt_len >= 1 */
    int prompt_len;
    uint64_t stream;       /* RNG stream id: the prompt's index in the input */
    int32_t *out;          /* generated ids (malloc'ed by st_generate, caller frees) */
    int n_out;
    st_gen_finish finish;
    float *logits;         /* optional caller buffer [max_new, V]: the raw logits each output token came from */
} st_gen_seq;

/* Positions a sequence (prompt + output) may use: max_position_embeddings (a sliding window is applied
 * by the attention, past it too), and no more than longrope's original length (where transformers changes factors
 * mid-sequence); dynamic RoPE is plain RoPE within it. Reaching it ends with ST_GEN_MAXPOS. */
int st_gen_max_positions(const st_model_config *c);
/* The positions a prompt's tokens may use with this model: st_gen_max_positions less the virtual tokens
 * of an attached prompt (worker/prompt.h), which lead every sequence. */
int st_gen_prompt_positions(const st_model *m);

/* Checks the parameters against the model (message names the flag). */
int st_gen_params_check(const st_gen_params *p, const st_model *m);

/* Generates for seqs[0..n). Returns 0 or a negative ST_E* (a prompt that is empty, too long for the
 * model's positions, or holds an id outside the vocabulary is named by its stream id). */
int st_generate(const st_model *m, const st_gen_params *p, st_gen_seq *seqs, int n);

/* Chooses the next token from logits[V] (modified in place: penalty, temperature, filters) given the
 * ids so far (history of n_hist ids). Work buffers: mark[V] bytes, order[V] ints. Exposed for tests. */
int st_gen_choose(float *logits, int V, const int32_t *history, int n_hist, const st_gen_params *p, st_rng *rng,
                  unsigned char *mark, int *order);

#endif
