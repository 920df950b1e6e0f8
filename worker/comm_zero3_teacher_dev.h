/* comm_zero3_teacher_dev.h — ZeRO-3's distillation teacher on a device backend (CUDA; NCCL between ranks),
 * sharded like the student (distill.teacher at sharding.stage 3; the CPU ranks' counterpart is worker/comm.h
 * st_frozen_shard): the frozen teacher's weight space [0, n_weights) is split into `world` equal contiguous
 * ranges (the last padded), each rank keeping its range in one device buffer; its forward runs `windowed`
 * (worker/model.h): each group the forward acquires (embeddings, a layer, final norm + head; the final norm
 * and head again per LM-head chunk, worker/distill.c) is gathered into a device slot of the largest group's
 * size (two; three with a tied head: wte stays until the head has run), the next group prefetched on the
 * student communicator's NCCL stream while this one computes, and the slot freed by the release. Under bf16
 * the slot's compute copy is rounded from the gathered fp32 weights on the device. No whole-model buffer
 * exists on a device rank. distill.teacher_dtype int8: st_model_set_int8 packs each group on the device into
 * its slot's pack buffer (a pack window, st_model.pwin) and each rank keeps 1/N of the pack space; the forward
 * gathers a group's packs and its unquantized fp32 weights (st_z3teach_int8_compact drops the quantized
 * ones' fp32 values from the shard after packing).
 * Owns: the shard, the pack share and the slots (device memory); the model's registry, activations and
 * hooks stay the model's / caller's. */
#ifndef ST_COMM_ZERO3_TEACHER_DEV_H
#define ST_COMM_ZERO3_TEACHER_DEV_H

#include "worker/comm.h"

typedef struct st_z3teach st_z3teach;

/* Builds the device shard of teacher m (bound without weights: buffers_external, m->weights NULL) on the
 * ranks of `comm`, gathering through c's NCCL communicator (c may be initialized later: its nccl is read at
 * each gather; a communicator rebuilt in place is followed): allocates this rank's shard (zeroed; m->weights
 * is set to shard - lo, so a streamed load with st_z3teach_keep fills it at weights + offset) and the slots
 * (with bf16 copies when bf16), and installs m's residency hooks. Errors: ST_ENOMEM / ST_EINVAL naming the
 * rank. */
int st_z3teach_init(st_z3teach **out, st_comm *c, MPI_Comm comm, st_model *m, int bf16);

/* Which elements [*a, *b) of parameter i this rank keeps (an st_model_keep_fn: ctx is the st_z3teach). */
void st_z3teach_keep(void *ctx, const st_model *m, int i, size_t *a, size_t *b);

/* distill.teacher_dtype int8, after st_model_set_int8 (the packs made): the quantized weights' fp32 values are
 * not read again, so this rank's shard is cut down to its unquantized weights (norms, biases, embeddings, a
 * tied head), in weight order, in a new device buffer (the old one freed; m->weights is NULL after: the
 * hooks find this rank's parts). A no-op otherwise. ST_ENOMEM naming the rank. */
int st_z3teach_int8_compact(st_z3teach *z);

/* Floats of rank `rank`'s shard for a teacher with this registry on `world` ranks (int8: after
 * st_z3teach_int8_compact; the quantized weights are st_model_param_bf16_only's). The planner counts them. */
size_t st_z3teach_kept_floats(const st_model *m, int world, int rank, int int8);

/* Removes the hooks, frees the shard and the slots; the model is left without weights. NULL is fine. */
void st_z3teach_free(st_z3teach *z);

/* Device floats it holds for a teacher with this registry on `world` ranks: the shard and the slots (their
 * bf16 copies under bf16, counted in floats, rounded up). The planner counts them. */
size_t st_z3teach_floats(const st_model *m, int world, int bf16);

#endif
