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

/* Whether the device layout runs this model: every mode (QLoRA's base only with fp32 storage for its kept
 * parameters: no spec.bf16 layout, which the trainer never uses at stage 3); frozen parameters (a frozen base
 * under adapters or a prompt too) are sharded over the frozen space as on CPU ranks. */
int st_z3dev_supported(const st_model *m);

/* Builds the device stage-3 state of `c` (stage, shard and NCCL already set up): allocates the master
 * shard (copied from the whole m->weights, which is then freed), the gather slots, the edge gradient
 * buffers and shard_grads, and installs the model's hooks. A model it does not support: ST_ECONFIG
 * naming the cause. */
int st_z3dev_init(st_comm *c, st_model *m);

/* The backward of a micro-batch begins (1) / ended (0): acquires in backward give a layer its gradients. */
void st_z3dev_backward(st_comm *c, int in_backward);

/* A change of the trainable set (progressive stages, st_comm_reshard_optim): every parameter gathered
 * whole into a new device buffer of n_weights floats that becomes m->weights (collective, one parameter at a
 * time), then the device state freed (st_z3dev_free), so the rebuilt communicator cuts its new shards from
 * the whole weights as at the start. Returns 0, or ST_ENOMEM / the NCCL failure (the model then keeps no
 * weights). */
int st_z3dev_unshard(st_comm *c);

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

#endif
