/* comm_zero3_dev.h — ZeRO-3 on a device backend (CUDA; NCCL between ranks), for worker/comm.c: the master
 * weights sharded, per-group device gather buffers the model's weight and gradient pointers are resolved
 * into while a group is resident (st_model.windowed), gradients reduce-scattered into the owners' shards
 * as each group's backward ends, in flight while the next layer's backward computes. Frozen parameters are
 * sharded over the frozen space and gathered with their group (no gradient, no optimizer state); adapters
 * (LoRA, DoRA) and prompt learning train their own tensors over a frozen sharded base; QLoRA's quantized
 * base is sharded by bytes and a layer's codes and scales gathered with its group (comm_zero3_dev.c explains
 * the layout). */
#ifndef ST_COMM_ZERO3_DEV_H
#define ST_COMM_ZERO3_DEV_H

#include "worker/comm.h"
#include "worker/qlora.h"

typedef struct st_z3dev st_z3dev;

/* Whether the device layout runs this model: every mode (QLoRA's base only with fp32 storage for its kept
 * parameters: no spec.bf16 layout, which the trainer never uses at stage 3); frozen parameters (a frozen base
 * under adapters or a prompt too) are sharded over the frozen space as on CPU ranks. */
int st_z3dev_supported(const st_model *m);

/* Builds the device stage-3 state of `c` (stage, shard and NCCL already set up): allocates the master
 * shard (copied from the whole m->weights, which is then freed), the gather slots, the edge gradient
 * buffers and shard_grads, and installs the model's hooks. A model it does not support: ST_ECONFIG
 * naming the cause. */
int st_z3dev_init(st_comm *c, st_model *m);

/* QLoRA: this rank's part of the quantized bytes (worker/qlora.h's blob, sharded by 4-byte words): the blob's
 * bytes [*a, *b) at the returned device buffer's start (NULL, empty: none). The sharded load
 * (coordinator/trainer/train_qload.c) fills it; a model quantized whole had it copied out at st_z3dev_init. */
uint8_t *st_z3dev_qshard(const st_comm *c, size_t *a, size_t *b);

/* The backward of a micro-batch begins (1) / ended (0): acquires in backward give a layer its gradients. */
void st_z3dev_backward(st_comm *c, int in_backward);

/* A change of the trainable set (progressive stages, st_comm_reshard_optim) under SHARDTUNE_ZERO3_RESHARD=whole
 * (the path before st_z3dev_detach / st_z3dev_reshard below, kept for A/B): every parameter gathered
 * whole into a new device buffer of n_weights floats that becomes m->weights (collective, one parameter at a
 * time), then the device state freed (st_z3dev_free), so the rebuilt communicator cuts its new shards from
 * the whole weights as at the start. Returns 0, or ST_ENOMEM / the NCCL failure (the model then keeps no
 * weights). */
int st_z3dev_unshard(st_comm *c);

/* The same change without whole weights (st_comm_reshard_optim unless SHARDTUNE_ZERO3_RESHARD=whole): detach
 * keeps this rank's master shards (compact and frozen) with the old layout and frees the rest of the device
 * state (not collective; NULL and *rc on a failure: QLoRA, out of memory). Once the new communicator is built
 * around zeroed shards (st_z3dev_init on a model without weights), st_z3dev_reshard moves every parameter's
 * values from its old owners to its new ones (old_off: the old compact offsets, -1 frozen) in pieces of at
 * most one gather slot: a piece's old parts in the new communicator's first slot, each rank sending the new owners
 * what they need of its old part and receiving what its new part needs (NCCL point to point; with
 * SHARDTUNE_Z3DEV_MOVE=gather the piece all-gathered instead), then copying its new part out; nothing of the
 * model's size is allocated. It frees `old` (collective). st_z3dev_move_moments
 * moves the moments of the parameters trainable in both layouts the same way, from the old shards (old_shard
 * floats per rank, from old_shard * rank) into the new (collective). st_z3dev_drop_detached frees a detached
 * state that is not moved (a failure on the way). */
st_z3dev *st_z3dev_detach(st_comm *c, int *rc);
int st_z3dev_reshard(st_comm *c, st_z3dev *old, const long *old_off);
int st_z3dev_move_moments(st_comm *c, const long *old_off, size_t old_shard, float *old_m, float *old_v,
                          float *new_m, float *new_v);
void st_z3dev_drop_detached(st_z3dev *old);
/* Frozen parameters held in bf16 only (worker/comm.h st_comm_drop_frozen_fp32's rule on a device; collective):
 * under precision bf16, every frozen parameter of the kinds st_model_bf16_only_candidate names whose parts are
 * bf16 values on every rank keeps this rank's part as bf16 (half the device bytes; the other frozen parts stay
 * fp32, compacted), and its gathers move bf16 straight into the gather slot's bf16 copy (half the bytes on the
 * wire; the slot's fp32 window widened from it, exactly). Idempotent. Returns the floats of this rank held so
 * (0: none; the ranks agree, an allocation failure included). SHARDTUNE_FROZEN_FP32=1 keeps every part fp32. */
size_t st_z3dev_hold_bf16(st_comm *c);
/* Undoes it (a resume writes every part in fp32 again): the frozen shard whole in fp32 again. ST_ENOMEM or 0. */
int st_z3dev_restore_fp32(st_comm *c);
/* The load's side (st_comm_options.frozen_bf16: the frozen parameters whose file tensors are BF16, so their values
 * are bf16 values by construction): those parts are laid out in bf16 only when the communicator is built (the
 * ranks agree; the fp32 frozen shard is allocated without them), and the load puts their values there:
 * st_z3dev_part_held says whether parameter i's part is held so, st_z3dev_put_bf16 copies elements [a, a + n) of
 * this rank's part of it from host bf16 bits. st_z3dev_hold_bf16 then adds what else is exact. */
int st_z3dev_part_held(const st_comm *c, int i);
void st_z3dev_put_bf16(st_comm *c, int i, size_t a, size_t n, const uint16_t *host);
/* The one reader of this rank's parts (the frozen shard's, held in bf16 only or not, and the master shard's):
 * parameter i's elements [a, a + n) of this rank's part copied (fp32) or widened (bf16, exactly) into dst,
 * device memory, or host memory when host != 0. [a, a + n) may run on into the parameters kept next to i in
 * the same buffer (a run of the gathers). */
void st_z3dev_part_fp32(const st_comm *c, int i, size_t a, size_t n, float *dst, int host);

/* Frees it; the model is left without weights (the end of a run). */
void st_z3dev_free(st_comm *c);

/* Device floats (4-byte units) it holds for a model with this registry (and cfg), compact offsets goff
 * (-1 frozen; NULL: the model's own grad_offset), world size and shard, bf16 or not, QLoRA's spec (NULL
 * without QLoRA; the registry quantized or not): *weight_floats the gather slots' fp32 weights and bf16
 * copies (sized for a layer or one head block when the edges go by rows and blocks), the master shard and
 * the frozen shard (QLoRA: + this rank's part of the quantized bytes, a layer's bytes per base slot, the
 * scratch and its bf16 copy; fp32 with a head in several blocks: + one block of logits); *grad_floats the two
 * layer gradient buffers, the edge gradients, shard_grads and the two receive buffers. The planner counts them. */
void st_z3dev_floats(const st_model *m, const long *goff, int world, size_t shard, int bf16,
                     const st_qlora_spec *qs, size_t *weight_floats, size_t *grad_floats);

/* This process's head-block gathers so far (z3d_head_rows: *gathers) and the head passes they served (*passes: a
 * forward's head, released at its end). Tests (tests/tools/fakedev.c FAKEDEV_REPORT_MEM): blocks outermost,
 * worker/model.c head_outer, gather each block twice per training micro-batch. */
void st_z3dev_head_counts(long *gathers, long *passes);

/* This process's stage-change moves so far (st_z3dev_reshard, st_z3dev_move_moments): *received the bytes it
 * asked other ranks for (owner to owner: what its new parts need; SHARDTUNE_Z3DEV_MOVE=gather: every other rank's
 * old part of each piece), *needed what its new parts held that its old parts did not (counted apart from the
 * path), *moved the bytes of the tensors moved (each rank counts all). Tests (tests/tools/fakedev.c
 * FAKEDEV_REPORT_MEM) check the traffic with them. */
void st_z3dev_move_counts(size_t *received, size_t *needed, size_t *moved);

#endif
