/* lora.h — LoRA adapters on the linear projections of a st_model (finetune.mode: lora).
 *
 * An adapter on a projection y = x @ W^T adds scale * (x @ A^T) @ B^T, with A [r, in] and B [out, r]
 * (peft's lora_A / lora_B weights) and scale = alpha / r (alpha / sqrt(r) with rsLoRA). DoRA (peft's
 * use_dora) adds a magnitude vector m [out] (lora_magnitude_vector): the projection becomes
 * bias + (m / ||W + scale B A||_row) * (x W^T + scale (x A^T) B^T), the norm treated as a constant in
 * backward (DoRA paper section 4.3, as peft does); m starts at ||W||_row. Under precision bf16 the adapters
 * compute in fp32 on the bf16-rounded input of their base matmul, and DoRA's W (norms, base term) is the
 * base weight's bf16 copy widened: peft's DoRA on a bf16 base layer with fp32 adapters. Adapters are
 * ordinary registry entries appended after the base parameters (kind ST_MOD_LORA, their layer's index),
 * with their weights appended to the model's weight buffer: the trainer makes them the trainable set
 * (module mask ST_MOD_LORA), so gradients, the ZeRO shard map, the optimizer, the parameter all-gather
 * and checkpoints treat them like any trainable tensor while every base weight stays frozen (no
 * gradient buffer, no weight gradient computed).
 *
 * Targets are bits of ST_LORA_*: Llama family q/k/v/o/gate/up/down, GPT-2 c_attn, c_proj (both the
 * attention and the MLP output projection, as peft's suffix match does) and c_fc. The model calls
 * st_lora_forward / st_lora_backward at each of a layer's four matmul sites.
 *
 * Memory: st_lora_attach allocates the adapter table (owned by the model, freed by st_model_free through
 * st_lora_free) and grows the model's registry and weight buffer; the per-batch working memory (the
 * saved x @ A^T of every adapter and two scratch tensors) is backend memory owned by the table. */
#ifndef ST_LORA_H
#define ST_LORA_H

#include <stdint.h>

#include "worker/model.h"

enum {
    ST_LORA_Q = 1 << 0, ST_LORA_K = 1 << 1, ST_LORA_V = 1 << 2, ST_LORA_O = 1 << 3, ST_LORA_GATE = 1 << 4,
    ST_LORA_UP = 1 << 5, ST_LORA_DOWN = 1 << 6, ST_LORA_C_ATTN = 1 << 7, ST_LORA_C_PROJ = 1 << 8,
    ST_LORA_C_FC = 1 << 9,
    ST_LORA_LLAMA_ALL = (1 << 7) - 1,
    ST_LORA_GPT2_ALL = ST_LORA_C_ATTN | ST_LORA_C_PROJ | ST_LORA_C_FC,
};

/* Target names indexed by bit (q_proj ... c_fc), NULL-terminated: the config's finetune.lora.targets. */
extern const char *const st_lora_target_names[];

/* Where an adapter's projection runs in a layer (model.c's four matmuls). */
typedef enum { ST_LORA_SITE_QKV, ST_LORA_SITE_O, ST_LORA_SITE_UP, ST_LORA_SITE_DOWN } st_lora_site;

typedef struct {
    int r;                      /* rank, >= 1 */
    double alpha;               /* lora_alpha */
    int rslora;                 /* scale = alpha / sqrt(r) instead of alpha / r */
    int dora;                   /* DoRA magnitude vectors */
    unsigned targets;           /* ST_LORA_* bits */
    const unsigned char *layers; /* [n_layer] selection (1 = adapters on this layer); NULL = all */
    uint64_t seed;              /* A's init stream (B starts at zero) and the dropout masks' key */
    double dropout;             /* lora_dropout p in [0, 1): training forwards only (not with dora) */
} st_lora_spec;

typedef struct st_lora st_lora;

/* LoRA dropout (peft's lora_dropout: nn.Dropout on the adapter's input, x -> A -> B; the base projection
 * sees x unchanged; with DoRA the whole DoRA term, its base term x W^T included, reads the dropped x, as peft's
 * DoraLinearVariant in training). Active only in forwards with train = 1 (st_model_forward sets it; eval, generate and
 * the validation loss run without). Element (row, feature) of adapter k is kept with probability 1 - p and
 * scaled by 1 / (1 - p); the decision is a hash of (spec.seed, step, the row's global sample index, its
 * position, k, feature), so the masks of a step do not depend on how the global batch is split across
 * ranks and micro-batches, and a resumed run draws the masks the uninterrupted one drew. The trainer calls
 * st_lora_dropout_batch before each training forward; backward recomputes the masks. */
void st_lora_dropout_batch(st_model *m, int64_t step, int64_t first_sample);
void st_lora_set_training(st_model *m, int train);
/* Sets an attached adapter set's dropout p and mask seed (tests/tools/ref_model; the trainer sets both
 * through st_lora_spec). ST_ECONFIG as st_lora_attach for p outside [0, 1). */
int st_lora_set_dropout(st_model *m, double p, uint64_t seed);

/* Adds adapters for `spec` to a built model (registry-only models get the registry entries only):
 * A initialized as peft does (kaiming_uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from the
 * seed, B zero. Must precede st_model_set_trainable, st_model_alloc_activations' use and
 * st_model_set_precision (bf16 is refused with DoRA: its base term is fp32).
 * ST_ECONFIG naming the key for a target the family has not, r < 1, an empty layer selection. */
int st_lora_attach(st_model *m, const st_lora_spec *spec);
/* The adapter matmul FLOPs of layer `layer` over N rows (model.c's step count): *fwd (x A^T, u B^T; DoRA
 * also B A, x W^T), *fwd_down (the part at the down projection, which an activation-checkpointing
 * recompute skips), *bwd (dB, du, dA, dx; DoRA also its dx through W). All 0 without adapters. */
void st_lora_flops(const st_model *m, int layer, double N, double *fwd, double *fwd_down, double *bwd);
void st_lora_free(st_lora *l);

/* DoRA: sets every magnitude vector to ||W||_row of the weight the model computes with (after QLoRA
 * quantized the base: its dequantized values, read a panel of rows at a time (st_qlora_rows), as peft
 * initializes DoRA on a 4-bit base). */
/* A model whose adapters were attached to the registry alone (no backend then) and whose weight buffer
 * was laid out later (worker/qlora.h's streamed load): writes the adapters' initial values (A, B = 0 as
 * st_lora_attach; DoRA magnitudes 0 until st_lora_init_magnitudes) in place. */
int st_lora_init_adapters(st_model *m);
int st_lora_init_magnitudes(st_model *m);
/* The same, writing only the elements [*a, *b) of each magnitude vector that keep (NULL: all) selects (ZeRO-3's
 * streamed load, train.c: the base weights are gathered one at a time through st_model_acquire, collective
 * there, so every rank calls it). */
/* The largest base weight a DoRA magnitude is initialized from (floats; 0 without DoRA): the planner. */
size_t st_lora_dora_base_floats(const st_model *m);
int st_lora_init_magnitudes_kept(st_model *m, void (*keep)(void *ctx, const st_model *m, int i, size_t *a, size_t *b),
                                 void *ctx);

/* The spec the adapters were attached with (out->layers: the model's own [n_layer] mask, valid while
 * the adapters are). ST_EINVAL without adapters. */
int st_lora_spec_of(const st_model *m, st_lora_spec *out);

/* Folds every adapter into its base weight (W += scale * B @ A) and removes the adapters: the model is
 * the merged base model afterwards. */
int st_lora_merge(st_model *m);

/* The same fold of the adapters of base parameter i into W = w + at, backend memory holding its values (at: its
 * place in w, not its registry offset, which a fused QLoRA base's tensors have only virtually, worker/qlora.h);
 * the model keeps its adapters (its DoRA scratch is used). The caller has the base weight and its adapters
 * resident (st_model_acquire). eval.generate's per-layer merge (coordinator/trainer/train_samples.c). */
int st_lora_merge_range_at(const st_model *m, float *w, size_t at, int i);

/* Whether the model's adapters are DoRA (0 without adapters). */
int st_lora_has_dora(const st_model *m);

/* The scale of the model's adapters (0 when none). */
double st_lora_scale(const st_model *m);
int st_lora_rank(const st_model *m);

/* For adapter tensor `idx` of the registry: the base parameter it adapts and whether it is B (else A);
 * -1 when idx is not an adapter tensor. */
int st_lora_base_of(const st_model *m, int idx, int *is_b);

/* The name peft saves a parameter's adapter tensor under (base_model.model.<HF module>.lora_A.weight). */
void st_lora_peft_name(const st_model *m, int idx, char *out, size_t cap);

/* Registry indices [first, last) of layer l's adapter tensors (empty when none). */
void st_lora_layer_params(const st_model *m, int l, int *first, int *last);

/* y[N, ystride] (columns of the site's packed output) += each adapter's scale * (x @ A^T) @ B^T; saves
 * x @ A^T for backward. Computes in fp32 under either precision (model.c passes, under bf16, the
 * bf16-rounded inputs the base matmul reads). */
int st_lora_forward(st_model *m, int layer, st_lora_site site, const float *x, float *y, int ystride);

/* From dy[N, ystride] (the site's output gradient): accumulates the adapters' A and B gradients and adds
 * their share of the input gradient into dx[N, in] (already holding the base projection's). */
void st_lora_backward(st_model *m, int layer, st_lora_site site, const float *x, const float *dy, int ystride,
                      float *dx);

/* Floats of working memory the adapters use for N = B x T rows (x @ A^T of every adapter, two scratch
 * tensors, the larger one for mlp_rows rows at the MLP's sites: st_model_mlp_rows; DoRA's per-row tensors):
 * what st_lora_forward allocates, but DoRA's weight-shaped buffers (below). 0 without adapters. */
size_t st_lora_work_floats(const st_model *m, size_t rows, size_t mlp_rows);
/* Floats of DoRA's weight-shaped buffers: B A of the largest adapted weight, and under bf16 (bf16 1) that weight
 * widened from its bf16 copy; over a fused QLoRA base (qfused 1: worker/qlora.h, the base read through its
 * codes) only one panel of B A's rows (st_qlora_panel_rows) and no widened copy. 0 without DoRA. */
size_t st_lora_dora_weight_floats(const st_model *m, int qfused, int bf16);

/* Allocates the working memory for N = B x T rows (st_model_alloc_activations calls it). */
int st_lora_reserve(st_model *m, size_t rows);

/* Row window of the next st_lora_forward / st_lora_backward calls: rows [r0, r0 + n) of the batch's N (x, y,
 * dy and dx then hold those n rows; each adapter's saved x @ A^T is read and written at rows r0..). n = 0:
 * all N rows (the default). model.c's token-blocked MLP under activation checkpointing. Not with DoRA or
 * dropout (st_lora_rows_whole): their masks and scales are per whole batch. */
void st_lora_set_rows(st_model *m, size_t r0, size_t n);
/* 1 when the adapters need whole batches (DoRA, dropout > 0): model.c then runs the MLP unblocked. */
int st_lora_rows_whole(const st_model *m);

/* Parses one target name (q_proj ...); 0 when unknown. */
unsigned st_lora_target_bit(const char *name);

#endif
