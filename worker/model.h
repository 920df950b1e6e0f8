/* model.h — a decoder-only transformer (GPT-2 and Llama family) on a backend.
 *
 * The model owns: the parameter registry (HF names, internal shapes, layer, module kind), one contiguous
 * weight buffer, one compact flat gradient buffer holding only trainable parameters (in registry order),
 * and the activations saved for backward. All buffers live on the backend and are freed by
 * st_model_free(). The model knows nothing of files: checkpoints/ maps registry names to tensors.
 *
 * Internal layout notes:
 *  - linear weights are [out, in]; GPT-2's Conv1D tensors are [in, out] in HF files (transpose_io = 1).
 *  - a layer's q, k, v projections are adjacent (one packed [(H+2KVH)*hd, C] matmul); so are Llama's
 *    gate and up projections ([2F, C]); the same holds in the gradient buffer since trainability is
 *    decided per (layer, module kind).
 *  - the LM head runs in row chunks fused with its backward: when training, forward already produces
 *    d(final norm output) and the head's weight gradient, so [N, V] logits never exist whole. */
#ifndef ST_MODEL_H
#define ST_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kernels.h"
#include "worker/model_config.h"
#include "worker/train_kinds.h" /* ST_MOD_* module bits */

typedef struct {
    char name[96];      /* HF name, e.g. model.layers.3.self_attn.q_proj.weight or h.3.attn.c_attn.weight */
    int ndim;
    int64_t shape[2];   /* internal shape ([out, in] for linear weights) */
    size_t offset;      /* into weights (floats) */
    size_t numel;
    int layer;          /* 0..L-1, or -1 for embeddings / final norm / head */
    int kind;           /* one ST_MOD_* bit */
    int no_decay;       /* norms, biases, embeddings: no weight decay */
    int transpose_io;   /* stored transposed in HF files (GPT-2 Conv1D) */
    long grad_offset;   /* into grads (floats), -1 when frozen */
} st_param;

/* A residency window (st_model.windowed): the range [lo, hi) of the weight or gradient space lives at p
 * (element lo at p[0]); p16: the weights' bf16 copy there (precision bf16), else NULL. */
typedef struct {
    size_t lo, hi;
    float *p;
    uint16_t *p16;
} st_res_window;
#define ST_RES_WINDOWS 8

/* A pack window (st_model.pwin): the int8 packs of the weights in [lo, hi) (st_model_set_int8 under hooks with
 * residency_int8 that hold packs in windows: the device ZeRO-3 teacher), byte plo of the pack space at p[0]. */
typedef struct {
    size_t lo, hi;
    uint8_t *p;
    size_t plo;
} st_pack_window;

typedef struct {
    st_model_config cfg;
    const st_backend *be;
    int n_params;
    st_param *params;
    float *weights;    /* backend memory, n_weights floats */
    size_t n_weights;
    /* weight floats [0, n_w16) have no fp32 storage, only their place in weights_bf16 (QLoRA under bf16,
     * worker/qlora.h: the frozen embeddings and head, and the layer scratch): m->weights + n_w16 is the
     * allocation, and nothing reads m->weights below it. 0 otherwise. */
    size_t n_w16;
    int sizing_device; /* registry-only sizing (no backend): as on a device backend (st_model_activation_floats_dev) */
    int mlp_whole;     /* registry-only sizing: the adapters need whole batches (st_lora_rows_whole): no MLP blocks */
    float *grads;      /* backend memory, n_grads floats (trainable only); NULL when nothing trains */
    size_t n_grads;
    size_t grad_alloc; /* n_grads rounded up to a multiple of grad_align (zero padding for equal shards) */
    int grad_align;    /* set by the caller before st_model_set_trainable (the world size); 0 = 1 */
    int grads_managed; /* a communicator reduces m->grads range by range during backward and gives their pages
                          back (ZeRO-2 on host memory): they read zero after, st_model_zero_grad leaves them */
    size_t grads_zero_lo, grads_zero_hi; /* [lo, hi) of grads the optimizer zeroed as it read them (ZeRO
                          0-1, st_comm_update_params): the next st_model_zero_grad leaves it, once */
    /* First-write gradients (set by the trainer, which starts every step's accumulation with
     * st_model_zero_grad): the weight-gradient matmuls of the linear weights and the LM head write their
     * parameter's gradient with beta 0 on its first contribution after st_model_zero_grad (the step's first
     * micro-batch) and add (beta 1) after, so those gradients need no zeroing between steps: the optimizer
     * (ZeRO 0-1) and st_model_zero_grad leave them. grad_state[i] (n_params entries, set_trainable) holds
     * ST_GRAD_WRITTEN (written since the last st_model_zero_grad) and ST_GRAD_FIRST_WRITE (that first write
     * was a beta-0 matmul: st_model_grad_overwritten). 0: every contribution adds (tests, tools). */
    int grad_overwrite;
    unsigned char *grad_state;
    int grad_state_n;
    int lowest_trained_layer; /* backward stops here (L when only the head trains); set by set_trainable */
    int embed_trained;
    /* activations (see model.c for the layout), sized for B x T */
    int B, T;
    float *act_arena;
    size_t act_floats;
    float *rope_cos, *rope_sin;
    float *loss_per_pos; /* [B*T] unweighted loss of each target (0 where weight is 0) */
    /* train.packing documents (st_model_set_doc_positions): each token's position inside its document,
     * backend memory [doc_pos_n]; doc_pos_on: the next forward/backward use it. */
    int32_t *doc_pos;
    size_t doc_pos_n;
    int doc_pos_on;
    double doc_pairs[2]; /* sum over the B x T tokens of (position in document + 1), and of
                            min(that, cfg.sliding_window): the attended (query, key) pairs (FLOP count) */
    void *layer_acts;    /* per-layer pointers into act_arena (model.c) */
    float *capture_logits; /* optional host [B*T, V]: forward copies the logits here (tests, eval tools) */
    /* Arithmetic (st_model_set_precision). ST_PRECISION_BF16: every matmul of the model (linear layers,
     * LM head, their backward) runs through be->matmul_bf16 with mm_scratch, reading weights from the bf16
     * copy weights_bf16 and the saved activations from their bf16 copies (model.c lists which). */
    st_precision precision;
    uint16_t *weights_bf16;  /* backend memory, n_weights (bf16 only): refreshed by the next forward after */
    int weights_bf16_stale;  /* ... st_model_weights_changed() marked the fp32 master weights as written */
    /* Frozen parameters held in bf16 only (st_model_drop_frozen_fp32): w32_dropped[i] != 0 when parameter
     * i's fp32 weights were given back and its bf16 copy is its one exact value; NULL when none ever was. */
    unsigned char *w32_dropped;
    float *mm_scratch;   /* backend memory, mm_scratch_floats floats (bf16 only) */
    size_t mm_scratch_floats;
    /* Optional: called by st_model_backward each time a contiguous range [lo, hi) of the gradient space
     * is final — head first, then layers top-down, embeddings last — so communication can overlap the
     * rest of backward. Together the calls cover every trainable element exactly once. */
    void (*grad_ready)(void *ctx, size_t lo, size_t hi);
    void *grad_ready_ctx;
    /* Optional: replaces be->cross_entropy_acc in the LM head, with its contract (loss per row; dlogits in
     * place, or as bf16 into dlogits_bf16 when not NULL; sum weight * loss added to the backend-memory
     * double *total) for head chunk rows [r0, r0 + rows): knowledge distillation (worker/distill.h). */
    void (*head_loss)(void *ctx, float *logits, uint16_t *dlogits_bf16, float *loss, const int32_t *targets,
                      const float *weight, int r0, int rows, int v, double *total);
    void *head_loss_ctx;
    int head_loss_rows; /* set by st_distill_attach, kept: the head's loss keeps the row-chunk loop (the hook needs
                           whole rows), also between attaches (the MFU's FLOP count, st_model_step_flops) */
    int hidden_only; /* forward stops at the final norm (st_model_final_hidden) and returns 0: a KD teacher */
    int act_ckpt;    /* activation checkpointing (st_model_set_activation_checkpointing) */
    int ckpt_bf16;   /* ... with the kept layer inputs stored as bf16 (memory.checkpoint_dtype: bf16; under precision bf16) */
    /* Optional parameter residency (ZeRO-3, worker/comm.c): the model calls acquire(ctx, first, last) before
     * it reads the weights of parameters [first, last) and release(ctx, first, last) after its last read of
     * them, in the same order on every rank (the hooks may be collective): per layer in forward and again in
     * backward, the embeddings, the final norm and head. While they are installed their owner also manages
     * m->grads (st_model_zero_grad leaves it alone). Other readers of m->weights (checkpoint, export) use
     * st_model_acquire / st_model_release, and find the acquired tensor with st_model_param_weights (a
     * windowed model's is in its gather buffer). */
    void (*acquire)(void *ctx, int first, int last);
    void (*release)(void *ctx, int first, int last);
    /* Optional, with acquire: prefetch(ctx, first, last) announces the next acquire while this layer
     * computes (the hook may start its gather without waiting; that acquire then finishes it), and
     * progress(ctx) is called between the model's matmuls so a non-blocking gather moves on. */
    void (*prefetch)(void *ctx, int first, int last);
    void (*progress)(void *ctx);
    /* Optional, with acquire (ZeRO-3): the token embedding's rows for ids[0..n) into out[n, d_model] (host),
     * collective, without gathering the table; returns 1, or 0 when it declined (every rank alike: the
     * forward then acquires the table as usual). The forward tries it for an untied Llama-family embedding
     * (no position table); the values are the table's rows, bit for bit. */
    int (*embed_rows)(void *ctx, const int32_t *ids, int n, float *out);
    /* Optional, with acquire (ZeRO-3 on a device): an untied LM head is never resident whole but in blocks of
     * at most head_block vocabulary rows (model.c head_logits / head_backward: the same blocks and sums as a
     * head blocked by head_vblock). head_rows(ctx, j0, n, next, next_n, rows) makes rows [j0, j0 + n) of the
     * head's weights resident (a window: the matmuls find its bf16 copy as any weight's; the block before is
     * not resident any more) and may start gathering rows [next, next + next_n) (next < 0: no block follows);
     * j0 < 0 releases the head. It returns a scratch of rows x n floats for one block of logits or dlogits
     * (rows 0: none needed, NULL). The forward then acquires the final norm without the head. */
    float *(*head_rows)(void *ctx, int j0, int n, int next, int next_n, int rows);
    int head_block;
    void *residency_ctx;
    /* Set by hooks that also gather int8 packs (worker/comm.h st_frozen_shard): st_model_set_int8 may then
     * quantize a model with residency hooks (see st_model_int8_packs). */
    int residency_int8;
    /* Optional residency windows (ZeRO-3 on a device backend, worker/comm_zero3_dev.c): with `windowed` set,
     * forward and backward find a parameter's weights (and their bf16 copy) in the window of wwin that holds
     * its weight offset, and its gradient in the window of gwin that holds its gradient offset, instead of
     * at weights + offset / grads + grad_offset (NULL when none holds it). The hooks keep the windows
     * current: the groups gathered into per-group device buffers, and where their gradients go. */
    int windowed;
    /* Gradients only through gwin, the weights at weights + offset as usual (ZeRO-2 on a device backend,
     * worker/comm_zero2_dev.c: no full-size gradient buffer; m->grads is then not a buffer to write). */
    int grads_windowed;
    int n_wwin, n_gwin;
    st_res_window wwin[ST_RES_WINDOWS], gwin[ST_RES_WINDOWS];
    /* With windowed int8 packs (st_model_set_int8 on a windowed model): the resident groups' packs, kept
     * current by the hooks; a quantized weight's pack is found in the pack window holding its offset. */
    int n_pwin;
    st_pack_window pwin[ST_RES_WINDOWS];
    /* The weights, their bf16 copy and the gradients belong to a communicator (ZeRO-3 on a device,
     * worker/comm_zero3_dev.c), set before the buffers would be made: st_model_set_precision allocates no
     * bf16 copy and st_model_set_trainable no gradient buffer (a model bound without weights keeps none). */
    int buffers_external;
    /* Where this rank keeps the parts of the parameters it owns, when not at weights + offset (ZeRO-3 on a
     * device with frozen parameters, worker/comm_zero3_dev.c: the trainable parts in one master shard, the
     * frozen ones in another): element e of parameter i's kept range is at part_base[i] + e. NULL
     * otherwise. Readers and writers of a rank's parts (optimizer, streaming load, checkpoint parts, final
     * weight gathers) go through st_model_part / st_model_weight_ptr. */
    float **part_base;
    int in_compute; /* inside forward / backward: under bf16 an acquire then needs the fp32 weights only of
                       the parameters st_model_param_bf16_only says no to (checkpoints need all of them) */
    /* LoRA adapters (worker/lora.h): registry entries [n_base_params, n_params) and weights
     * [n_base_weights, n_weights); 0 / NULL without adapters (then n_base_* = 0 means "all"). */
    int n_base_params;
    size_t n_base_weights;
    struct st_lora *lora;
    struct st_prompt *prompt; /* prompt tuning (worker/prompt.h): registry entry n_base_params; NULL otherwise */
    /* QLoRA (worker/qlora.h): the layers' projection weights held quantized; their registry offsets are
     * virtual (no storage: the fused matmuls read the codes), or unfused point at one matmul unit's
     * dequantization scratch, filled right before each matmul (st_qlora_load). NULL otherwise. */
    struct st_qlora *qlora;
    /* int8 forward matmuls (st_model_set_int8: a distillation teacher under distill.teacher_dtype: int8): the
     * layers' linear weights and the LM head quantized once per output row; NULL otherwise. */
    struct st_w8 *w8;
    /* Set by a caller whose weights are still the allocation's zeros (ZeRO-3 streams them in after the
     * adapters are attached): attaching adapters then grows the buffer without copying the base (no page
     * of it touched). Cleared by the caller once the adapters are attached. */
    int weights_unread;
    /* The weight buffer holds only the adapters' / prompt's floats [n_base_weights, n_weights) (the allocation
     * is m->weights + n_base_weights; nothing below exists): a model bound without weights (buffers_external:
     * ZeRO-3 on a device) got them attached; the communicator cuts its shards from it (comm_zero3_dev.c). */
    int weights_tail_only;
} st_model;

/* Where element 0 of parameter i is kept on this rank (see part_base): m->weights + offset by default. */
static inline float *st_model_part(const st_model *m, int i) {
    return m->part_base ? m->part_base[i] : m->weights + m->params[i].offset;
}

/* The same for weight-space index `at` (an element of a part this rank keeps). */
float *st_model_weight_ptr(const st_model *m, size_t at);

/* Parameters of the base model (the registry without LoRA adapters). */
static inline int st_model_base_params(const st_model *m) { return m->lora || m->prompt ? m->n_base_params : m->n_params; }

/* Builds the registry and allocates zeroed weights. Validates cfg (clear message on nonsense). */
int st_model_build(st_model *m, const st_model_config *cfg, const st_backend *be);
/* The registry only (names, shapes, offsets, n_weights): no backend, no weights. The planner uses it to
 * size models that would not fit in this process. st_model_set_trainable must not be called on it (it
 * allocates gradients); st_model_count_trainable may. Release with st_model_free(). */
int st_model_build_registry(st_model *m, const st_model_config *cfg);
/* Puts a registry-only model on `be` (ST_ECONFIG when the backend lacks a kernel the config needs) and,
 * with alloc_weights, allocates its weight buffer (n_weights floats); without, m->weights stays NULL for
 * the caller to lay out (worker/qlora.h's streamed load). st_model_build = registry + bind(.., 1). */
int st_model_bind(st_model *m, const st_backend *be, int alloc_weights);
void st_model_free(st_model *m);

/* Random init (std 0.02, residual projections scaled by 1/sqrt(2L), norms 1, biases 0). */
int st_model_init_random(st_model *m, uint64_t seed);

/* Index of the parameter with this name, or -1. */
int st_model_find(const st_model *m, const char *name);

/* Decides which parameters train and (re)allocates the compact gradient buffer (zeroed).
 * layer_mask[l] != 0 selects layer l; module_mask is a set of ST_MOD_* bits. Rules (docs/finetune.md):
 * in-layer params train when their layer and kind are selected; embeddings when ST_MOD_EMBED is selected
 * and layer 0 is; final norm and LM head when ST_MOD_HEAD is selected. A tied wte trains if either
 * use selects it. Returns the number of trainable floats via m->n_grads. */
int st_model_set_trainable(st_model *m, const unsigned char *layer_mask, unsigned module_mask);

/* Number of floats that st_model_set_trainable would make trainable (no allocation). */
size_t st_model_count_trainable(const st_model *m, const unsigned char *layer_mask, unsigned module_mask);

/* The gradient offsets st_model_set_trainable would assign (grad_offset[n_params], -1 = frozen; may be
 * NULL) without allocating anything; returns the number of trainable floats. */
size_t st_model_grad_offsets(const st_model *m, const unsigned char *layer_mask, unsigned module_mask,
                             long *grad_offset);

/* RoPE of a Llama-family config for a batch of sequence length T (positions 0..T-1), exactly as
 * transformers' modeling_rope_utils defines each rope_type: inv_freq[head_dim/2] (rounded to fp32, as
 * transformers holds it) and the attention scaling that multiplies cos and sin (yarn, longrope; 1 else).
 * T matters only for `dynamic` (NTK base for T > max_seq) and `longrope` (long factors for
 * T > original_max). Returns 0 or ST_ECONFIG naming what is wrong. */
int st_model_rope_inv_freq(const st_model_config *cfg, int T, float *inv_freq, double *attention_scaling);

/* The tables every kernel applies (kernels.h rope_fwd/rope_bwd): cos/sin [T, head_dim/2] in host memory,
 * angle = pos * inv_freq[i], both already multiplied by the attention scaling, so the kernels need not
 * know the variant (the backward rotation is the transpose of the same scaled matrix). Generation builds
 * its tables with this too. Returns 0 or ST_ECONFIG. */
int st_model_rope_tables(const st_model_config *cfg, int T, float *cos_out, float *sin_out);

/* Whether sequences of T tokens can run: T <= max_seq, except dynamic RoPE (made to extend it).
 * 0 or ST_ECONFIG naming the limit. */
int st_model_check_seq_len(const st_model_config *cfg, int T);

/* Allocates activations for micro-batches of B sequences of T tokens (st_model_check_seq_len). */
int st_model_alloc_activations(st_model *m, int B, int T);

/* Floats that st_model_alloc_activations(m, B, T) allocates for a model of this config and precision:
 * the arena (same layout code), loss_per_pos [B*T], the RoPE tables and, under bf16, the matmul operand
 * scratch. No allocation, no validation of T. (The bf16 weight copy, n_weights halves, is not included.) */
size_t st_model_activation_floats(const st_model_config *cfg, int B, int T, st_precision precision);

/* Same, with activation checkpointing on (act_ckpt != 0): only each layer's input residual is kept, plus
 * one layer's full set of saved tensors that backward recomputes into, layer by layer. */
size_t st_model_activation_floats_ckpt(const st_model_config *cfg, int B, int T, st_precision precision, int act_ckpt);
/* The same for a model on a device backend (device != 0: CUDA) or a host one (the CPU backend; what _ckpt
 * gives): the host's logits chunks are larger (model.c head_chunk_rows); under bf16 the LM head and large
 * layer weights run in blocks on both (head_vblock, wblock_rows). */
size_t st_model_activation_floats_dev(const st_model_config *cfg, int B, int T, st_precision precision, int act_ckpt,
                                      int device);
/* The same for adapters that need whole batches (mlp_whole != 0: st_lora_rows_whole, DoRA or LoRA dropout),
 * whose model runs the MLP unblocked under activation checkpointing (the planner's call). */
size_t st_model_activation_floats_opts(const st_model_config *cfg, int B, int T, st_precision precision, int act_ckpt,
                                       int device, int mlp_whole);

/* Activation checkpointing (memory.activation_checkpointing): forward keeps each layer's input residual
 * only; backward recomputes the layer's forward from it (into one shared layer's worth of buffers) just
 * before that layer's backward. The arithmetic is the same calls on the same inputs, so losses and
 * gradients are bit-identical to the run without it; it costs one more forward of the trained layers
 * (minus the last projection, which backward does not need). The MLP is per token: under activation
 * checkpointing it runs over blocks of tokens (model.c mlp_rows: ~32 MiB of [rows, 2 d_ff] per block), forward
 * and backward, so its [N, d_ff] buffers shrink to [rows, d_ff], and under bf16 gate and up run as two
 * matmuls (one [d_ff, d_model] weight widened at a time by the CPU twin). Losses are unchanged; the adapter
 * and weight gradients sum the blocks' products in block order (float rounding). Re-lays out the activations when they are
 * allocated. st_model_layer_activations is refused while it is on (nothing per layer is kept). */
int st_model_set_activation_checkpointing(st_model *m, int on);
/* Rows per token block of the MLP (N = B x T when unblocked): of this model, and of a model of this config
 * (the planner's; mlp_whole: st_lora_rows_whole). */
int st_model_mlp_rows(const st_model *m);
int st_model_mlp_block_rows(const st_model_config *cfg, int B, int T, int act_ckpt, int mlp_whole);
/* Whether such a model runs gate and up as two matmuls (Llama family, precision bf16 (bf16 != 0), the MLP in
 * blocks): QLoRA's spec.mlp_apart (worker/qlora.h). */
int st_model_mlp_splits(const st_model_config *cfg, int B, int T, int act_ckpt, int mlp_whole, int bf16);
/* on = ST_MODEL_CKPT_BF16 (memory.checkpoint_dtype: bf16): the kept layer inputs are stored as bf16 under
 * precision bf16 (half of their memory; one fp32 working copy of the current layer's input). Forward rounds
 * each layer's output residual to bf16 and computes the next layer from that rounded value, so backward's
 * recomputation sees exactly what forward did: a numerics change of its own (the residual stream is rounded at
 * every layer boundary, as a bf16 model's is), a config choice, off by default. Under fp32 it acts as on = 1. */
#define ST_MODEL_CKPT_BF16 2

/* Selects the arithmetic (fp32 | bf16 mixed precision, see kernels/kernels.h). bf16 needs a backend with
 * matmul_bf16, to_bf16 and from_bf16; it allocates the bf16 weight copy, re-lays out the activations
 * (bf16 saved tensors) and the matmul operand scratch for the current B x T. Master weights, gradients
 * and optimizer state stay fp32. */
int st_model_set_precision(st_model *m, st_precision precision);

/* Frozen weights stored once, in bf16 (docs/finetune.md "Frozen weights under bf16"): under precision bf16 on
 * a host-memory backend without residency hooks (ZeRO 0-2), not QLoRA (LoRA / DoRA and the prompt family
 * qualify: their whole base is frozen), every frozen base parameter that forward and backward read only through
 * the bf16 copy (the layers' and an untied head's matmul weights; DoRA's weight norms read that copy too) or an
 * untied Llama-family token embedding (forward then widens the batch's rows from the
 * bf16 copy), whose fp32 values are all bf16 values (a bf16 source model: their low 16 bits are zero, so
 * the bf16 copy is the value itself, exactly), has its fp32 memory given back (common/util.h
 * st_give_back). Anything that needs its fp32 value widens the bf16 copy (st_model_param_fp32; exact).
 * Idempotent; call after the trainable set is final (st_model_set_trainable gives a parameter that becomes
 * trainable its fp32 weights back first, widened exactly). Returns the floats held in bf16 only.
 * SHARDTUNE_FROZEN_FP32=1 (tests) keeps every fp32 copy. */
size_t st_model_drop_frozen_fp32(st_model *m);
/* Loading a bf16 source straight into the bf16 copy (no fp32 page of those tensors ever touched): whether
 * st_model_drop_frozen_fp32 would hold parameter i in bf16 only for the trainable set goff once its values are
 * bf16 values (the caller knows they are: a BF16 file tensor). Needs the precision set (the bf16 copy exists). */
int st_model_bf16_load_planned(const st_model *m, int i, const long *goff);
/* The caller wrote parameter i's exact value into m->weights_bf16 and never into m->weights: it is held in bf16
 * only from now on, as if st_model_drop_frozen_fp32 had given its fp32 memory back. ST_ENOMEM or 0. */
int st_model_mark_bf16_only(st_model *m, int i);
/* Whether parameter i's fp32 weights were given back (st_model_drop_frozen_fp32). */
int st_model_fp32_dropped(const st_model *m, int i);
/* Widens parameter i's elements [a, a + n) to fp32 into dst (backend memory): from the bf16 copy when its
 * fp32 weights were given back, else copied from m->weights. */
void st_model_param_fp32(const st_model *m, int i, size_t a, size_t n, float *dst);
/* Gives every parameter its fp32 weights back (widened from the bf16 copy, exactly): before a reader of
 * m->weights that does not go through st_model_param_fp32 (generation). */
void st_model_restore_fp32(st_model *m);
/* The fp32 weights were all written anew (resume): none is held in bf16 only any more, the copy is stale. */
void st_model_fp32_rewritten(st_model *m);
/* Whether x[0, n) are all bf16 values (their bf16 copy widens back to them exactly). */
int st_model_values_bf16(const float *x, size_t n);
/* Parameter i, held in bf16 only, gets its fp32 place back: its first n floats widened from the bf16 copy (exact),
 * the rest for the caller to write (a resume reading values that are not bf16 into a bf16-only tensor). */
void st_model_fp32_regain(st_model *m, int i, size_t n);
/* st_model_param_fp32 into host memory (any backend; a device's bf16 copy widened on the host, exactly: the
 * same bits as the backend's from_bf16): the readers outside a step that write files (checkpoint snapshot and
 * resume check, final/, the base checksums). */
void st_model_param_fp32_host(const st_model *m, int i, size_t a, size_t n, float *host);

/* Frozen weights stored once, in bf16, on a device backend (docs/finetune.md "Frozen weights under bf16"): a
 * device buffer cannot give pages back, so there the choice is made before anything is allocated. w16[i] != 0
 * names the parameters to hold in bf16 only (the caller's choice: frozen in every stage of the run, a bf16 source
 * tensor, precision bf16, below ZeRO-3); of them those st_model_drop_frozen_fp32 would admit
 * (st_model_bf16_storable) get their offsets first, [0, n_w16), in registry order, the rest after in registry
 * order (q/k/v and gate/up stay adjacent: they are frozen together), and no fp32 storage: the model is bound to
 * `be` with m->weights + n_w16 the fp32 allocation (nothing reads below it, as QLoRA's bf16-only part,
 * worker/qlora.h) and the whole bf16 copy allocated (st_model_set_precision keeps it); those parameters read as
 * st_model_fp32_dropped for good (st_model_restore_fp32 and st_model_fp32_rewritten leave them; one selected
 * to train is refused by st_model_set_trainable). The caller then writes their bf16 values into weights_bf16
 * and the others' fp32 values into m->weights. Call on a registry-only model, before adapters are attached
 * (st_lora_attach / st_prompt_attach grow both buffers with it). No parameter admitted: an ordinary bind. */
int st_model_bind_frozen_bf16(st_model *m, const st_backend *be, const unsigned char *w16);
/* Whether parameter i is of a kind that may be held in bf16 only (see st_model_drop_frozen_fp32). */
int st_model_bf16_storable(const st_model *m, int i);
/* Regrows the bf16 copy of a model with a bf16-only part (st_model_bind_frozen_bf16) after its registry grew from
 * old_n floats (adapters attached; w32_dropped grows with it): the new copy holds the old one's [0, old_n), the
 * rest is made by the next refresh. A no-op for any other model. */
int st_model_grow_bf16(st_model *m, size_t old_n);

/* Floats st_model_drop_frozen_fp32 would hold in bf16 only for the trainable set goff (registry-only model,
 * the planner's; a bf16 source, precision bf16 and ZeRO 0-2 are the caller's to check; on a device backend goff
 * is the set no stage trains, st_model_bind_frozen_bf16's);
 * *largest (may be NULL): the most floats of one of those tensors. */
size_t st_model_bf16_frozen_floats(const st_model *m, const long *goff, size_t *largest);

/* ZeRO-3 (worker/comm.c st_comm_drop_frozen_fp32 on CPU ranks, worker/comm_zero3_dev.c st_z3dev_hold_bf16 on a
 * device): whether frozen parameter i is of a kind held in bf16 only (as st_model_drop_frozen_fp32's, precision
 * bf16, SHARDTUNE_FROZEN_FP32 unset);
 * from the registry and the model's settings only (the same on every rank). Whether its values are bf16
 * values is the caller's to check. */
int st_model_bf16_only_candidate(const st_model *m, int i);
/* Whether host x[0, n) are all bf16 values (low 16 bits zero): their bf16 copy widens back to them exactly. */
int st_model_bf16_exact(const float *x, size_t n);
/* Marks parameter i as held in bf16 only (on) or not (st_model_fp32_dropped), for a caller that moved its
 * values itself (ZeRO-3: this rank's part of it). Returns -1 when the flags cannot be allocated. */
int st_model_set_fp32_dropped(st_model *m, int i, int on);

/* Tells the model its fp32 weights were written (optimizer step, parameter all-gather, load), so the
 * bf16 copy is refreshed before the next forward. Every writer of m->weights calls it. */
void st_model_weights_changed(st_model *m);

/* Self-check of the mixed-precision bookkeeping: when the bf16 copy is marked current, it must equal the
 * fp32 weights rounded to bf16, element for element. Returns 0, or ST_ECORRUPT naming the first tensor
 * that differs (the trainer runs it every step when SHARDTUNE_CHECK_BF16_COPY=1; tests set it). */
int st_model_check_bf16_copy(const st_model *m);

/* Floats of matmul_bf16 scratch the model needs for micro-batches of B x T (the largest matmul). */
size_t st_model_bf16_scratch_floats(const st_model_config *cfg, int B, int T);

/* Forward over inputs[B*T]. targets[B*T] and weight[B*T] (loss weights, already divided by the
 * normalizer; 0 = not a target) give the loss. Returns sum_i weight[i] * loss_i; m->loss_per_pos holds
 * each position's unweighted loss. With `train` set, also computes the LM head's backward (weight
 * gradient accumulated into grads if the head trains) in preparation for st_model_backward(). */
double st_model_forward(st_model *m, const int32_t *inputs, const int32_t *targets, const float *weight,
                        int train);

/* Document-packed sequences (train.packing: documents): pos_host[B*T] gives each token's position inside
 * its document (0 at its first token, +1 per token; worker/packing.h), so attention stays inside a
 * document and RoPE / GPT-2's learned positions restart at each one, for the forwards and backwards
 * that follow. NULL turns it off (positions 0..T-1, plain causal attention). Needs the backend's
 * attention_docs / rope_pos / embedding_pos kernels; call after st_model_alloc_activations. */
int st_model_set_doc_positions(st_model *m, const int32_t *pos_host);

/* Backward from the saved activations of the last training forward; accumulates into m->grads. */
void st_model_backward(st_model *m);

/* Starts a step's gradient accumulation: sets the gradients to zero (nothing when residency hooks manage
 * them), except those the optimizer zeroed as it read them (grads_zero_lo/hi) and, under grad_overwrite,
 * those whose first write of the last step was a beta-0 matmul (the next one will be too). */
void st_model_zero_grad(st_model *m);

/* Under grad_overwrite: whether parameter i's gradient was first written by a beta-0 matmul since the last
 * st_model_zero_grad (its stale values need no zeroing before the next step: the optimizer skips them). */
int st_model_grad_overwritten(const st_model *m, int i);

/* Makes the weights of parameters [first, last) readable in m->weights / lets them go again: the residency
 * hooks when installed (collective then: every rank makes the same calls), nothing otherwise. */
void st_model_acquire(const st_model *m, int first, int last);
/* Registry index of layer l's first parameter (l = n_layer: the final norm's); the embeddings are
 * [0, st_model_layer_first_param(m, 0)), the final norm and head [that of n_layer, st_model_base_params).
 * The groups the forward acquires (generation acquires the same ones). */
int st_model_layer_first_param(const st_model *m, int l);
void st_model_release(const st_model *m, int first, int last);
/* Where parameter i's fp32 weights are now: m->weights + offset, or while acquired on a windowed model
 * (ZeRO-3 on a device) its place in the gather buffer (NULL when not resident there). */
const float *st_model_param_weights(const st_model *m, int i);
/* Where parameter i's gradient accumulates now: m->grads + grad_offset, or on a model with gradient
 * windows (windowed, grads_windowed) its place in the window that holds it; NULL when it is frozen or no
 * window holds it. Code outside model.c that writes gradients (the adapters) finds them here. */
float *st_model_param_grad(const st_model *m, int i);
/* Parameter i's bf16 compute copy under precision bf16 (the model's weights_bf16, or while acquired on a windowed
 * model its gather buffer's copy); NULL when it has none there (fp32, or not resident). */
const uint16_t *st_model_param_bf16(const st_model *m, int i);
/* Whether forward and backward read parameter i only through the bf16 compute copy under precision bf16
 * (the layers' and the untied head's matmul weights; norms, biases and the embeddings read fp32). */
int st_model_param_bf16_only(const st_model *m, int i);
/* The next st_model_acquire will be of [first, last): the residency hooks may start fetching it now. */
void st_model_prefetch(const st_model *m, int first, int last);

/* One set of residency hooks (the st_model fields of the same names, see there) and the context every one
 * of them gets (residency_ctx and grad_ready_ctx). A NULL entry leaves that hook off. */
typedef struct {
    void (*acquire)(void *ctx, int first, int last);
    void (*release)(void *ctx, int first, int last);
    void (*prefetch)(void *ctx, int first, int last);
    void (*progress)(void *ctx);
    int (*embed_rows)(void *ctx, const int32_t *ids, int n, float *out);
    void (*grad_ready)(void *ctx, size_t lo, size_t hi);
    void *ctx;
    float *(*head_rows)(void *ctx, int j0, int n, int next, int next_n, int rows);
    int head_block; /* with head_rows: the most vocabulary rows of one block */
} st_residency_hooks;

/* Installs all the residency hooks of `h` at once (every field, NULL ones included); h NULL removes them. */
void st_model_set_residency(st_model *m, const st_residency_hooks *h);

/* Layer l's activations from the last forward, in backend memory (fp32 precision only): its input residual
 * [B*T, C], the attention output before the output projection [B*T, H*hd], the MLP activation before the
 * down projection [B*T, F] and its output residual [B*T, C]. Used by calibration (worker/prune.c). */
int st_model_layer_activations(const st_model *m, int l, const float **res_in, const float **attn, const float **mlp,
                               const float **res_out);

/* Floats of one LM-head chunk of logits (rows per chunk x vocab) for micro-batches of B x T on a host backend
 * (device: a device one): the buffer a KD teacher's logits take (worker/distill.c; the planner). */
size_t st_model_head_chunk_floats(const st_model_config *cfg, int B, int T, int device);

/* The final norm's output [B*T, C] from the last forward (backend memory): the LM head's input. */
const float *st_model_final_hidden(const st_model *m);

/* The LM head's logits for rows [r0, r0 + rows) of the last forward (out: backend memory, rows * vocab
 * floats; rows <= the model's head chunk), from its final hidden states under its precision rules (bf16: the
 * bf16 weight copy and the hidden states rounded, fp32 accumulation): a KD teacher's logits. */
void st_model_head_logits(st_model *m, float *out, int r0, int rows);

/* distill.teacher_dtype: int8 — a frozen, forward-only model's matmuls in int8 (kernels.h matmul_w8a8): every
 * layer's q/k/v, output, MLP up (gate|up) and down projection and the LM head are quantized once here per output
 * row (symmetric absmax / 127) and packed; every forward then quantizes their inputs per token and multiplies in
 * int8 with int32 sums, rescaled to fp32. Norms, RoPE, attention, activations, embeddings and the loss stay fp32.
 * Needs a backend with matmul_w8a8 (cpu, cuda; ST_ECONFIG naming the backend otherwise), fp32 precision,
 * activations allocated (B x T: the activation scratch is sized for them), no adapters, and no residency hooks
 * other than ones with residency_int8 set (the ZeRO-3 teacher, st_frozen_shard): with those, every pack goes
 * into one space in site order and is made from its group's gathered fp32 weights (each group acquired and
 * released once here: collective), so the packs are those of an unsharded model, byte for byte; the hooks keep
 * this rank's share of the space and gather a group's packs (st_model_int8_packs). A windowed model (the device
 * ZeRO-3 teacher, worker/comm_zero3_teacher_dev.c) gets no pack space at all: its hooks give each acquired
 * group a pack window with the bytes of its packs (st_model.pwin; packed there, then kept in share by the
 * release; later gathered there), and the matmuls read a site's pack from the pack window holding its weight. The fp32 weights stay
 * allocated (norms, embeddings and a tied head read them; the caller may give back the memory of
 * st_model_int8_ranges); call after the weights are final (a later write is not seen).
 * *bytes (may be NULL): the packed weights and the scratch, backend memory. */
int st_model_set_int8(st_model *m, size_t *bytes);
/* Under st_model_set_int8 with residency_int8 hooks: the pack space (*space, *total bytes; *space NULL for a
 * windowed model, whose hooks hold the packs) and the bytes
 * [*pa, *pb) of it holding the packs of the weights that start in the weight range [a, b) (floats; *pa = *pb
 * when none). Returns 0 without such a space, 1 while st_model_set_int8 is still packing (the hooks gather
 * fp32 weights then), 2 once the packs are made (the hooks gather the packs, not the quantized fp32 weights:
 * st_model_int8_ranges). */
int st_model_int8_packs(const st_model *m, size_t a, size_t b, uint8_t **space, size_t *pa, size_t *pb, size_t *total);
/* The weight ranges [lo[i], hi[i]) (floats of m->weights) whose fp32 values nothing reads after
 * st_model_set_int8 (the quantized weights; not a tied head, which the embedding reads): the caller may give
 * their memory back (worker/comm.h st_comm_discard). Returns how many (<= max); 0 without int8. */
int st_model_int8_ranges(const st_model *m, size_t *lo, size_t *hi, int max);
/* The k-th of those ranges (from 0, in weight order) into [*lo, *hi); 0 past the last. */
int st_model_int8_range(const st_model *m, int k, size_t *lo, size_t *hi);
/* The bytes st_model_set_int8 allocates for a model of this config on the cpu backend (device: the cuda
 * backend), for B x T, and (each may be NULL) released: the fp32 bytes of st_model_int8_ranges less a page at
 * either end of each (0 on a device: not given back); layer_packs: one layer's packs; head_pack: the head's
 * (planner). */
size_t st_model_int8_bytes(const st_model_config *cfg, int B, int T, int device, size_t *released, size_t *layer_packs,
                           size_t *head_pack);

/* The pack space st_model_set_int8 lays out under residency_int8 hooks for a model with this registry (may be
 * registry-only) on the cpu backend (device: cuda): its bytes (each site's pack 64-byte aligned), and (may be
 * NULL) the most bytes one group the forward acquires holds (planner). 0 when out of memory. */
size_t st_model_int8_space(const st_model *m, int device, size_t *group_most);

/* FLOPs of one training step per token (6N + 12 L T C, N = non-embedding params incl. head). */
double st_model_flops_per_token(const st_model *m, int T);
/* The FLOPs of one training forward + backward of the current B x T batch as the step performs them
 * (docs/architecture.md "MFU"): every matmul of the linear layers and the LM head, the weight-gradient
 * matmuls of trainable weights only, no backward below the lowest trained layer, the LoRA / DoRA
 * adapter matmuls, the layer forward recomputed under activation checkpointing, and attention over the
 * causal (sliding-window, same-document when packed) pairs: 4 hd FLOPs per pair and head forward, 10
 * backward (P is recomputed). Elementwise work (norms, activations, softmax, optimizer) is not counted.
 * train = 0: a forward only (eval, a KD teacher). */
double st_model_step_flops(const st_model *m, int train);

#endif
