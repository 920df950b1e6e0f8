/* comm_zero2_dev.h — ZeRO-2 on a device backend (CUDA; NCCL between ranks), for worker/comm.c: no
 * full-size gradient buffer. The model finds its gradients through gradient windows (st_model.grads_windowed):
 * resident edge buffers for the embeddings (untied ones share a layer bucket), for final norm + head (both
 * also written by the training forward's fused head) and for the prompt's tensors, and two layer buckets
 * (one with NCCL off) of the largest layer's size (its base parameters and its adapters). As a group's
 * backward ends (grad_ready) its gradients are reduce-scattered in place over NCCL on the comm stream (after
 * an event on the compute stream; worker/comm_dev.h) and a comm-stream mark recorded; with sharding.overlap
 * the reduction stays in flight while the next layer's backward writes the other bucket. It is finished —
 * the compute stream waits for its mark (st_nccl_wait_event), this rank's part is added into shard_grads
 * (bias_add over one row: the micro-batches of a step accumulate there) and an edge buffer is zeroed for the
 * next micro-batch — when its bucket is needed again (two layers down) or at the end of the micro-batch's
 * backward. A trainable set these groups do not cover exactly (none known) keeps the full buffer
 * (st_z2dev_used). */
#ifndef ST_COMM_ZERO2_DEV_H
#define ST_COMM_ZERO2_DEV_H

#include "worker/comm.h"

/* Whether a device stage-2 communicator for this model uses it: something trains, the groups cover the
 * trainable set, and not switched off by SHARDTUNE_ZERO2_FULL_GRADS=1 (benchmarks). */
int st_z2dev_used(const st_model *m);
/* The same for the planner: a registry-only model and its trainable set (grad_offset[i], -1 frozen;
 * n_trainable floats). */
int st_z2dev_plan_used(const st_model *m, const long *grad_offset, size_t n_trainable);

/* Builds it on `c` (stage 2, shard_grads allocated, NCCL set up when collective): frees the model's full
 * gradient buffer, allocates the edges and the buckets, installs the grad_ready hook. */
int st_z2dev_init(st_comm *c, st_model *m);

/* Before a micro-batch's backward: a bucket is pointed at the first layer whose backward writes gradients;
 * overlap (sharding.overlap) 0: each reduction is finished as soon as it is enqueued. After it: every
 * reduction finished, and every trainable gradient must have been reduced (else an error naming it). */
void st_z2dev_backward_begin(st_comm *c, int overlap);
int st_z2dev_backward_end(st_comm *c);

/* Frees it and gives the model back its plain layout (m->grads NULL: st_model_set_trainable allocates again). */
void st_z2dev_free(st_comm *c);

/* Device floats it holds besides shard_grads: the edges and the buckets (two on several ranks, one on one
 * rank without NCCL), for a model with this trainable set (grad_offset[i] per parameter, -1 frozen) on
 * `world` ranks. */
size_t st_z2dev_floats(const st_model *m, const long *grad_offset, int world);

#endif
