/* comm_dev.h — pieces the device ZeRO paths share (worker/comm_zero2_dev.c; worker/comm_zero3_dev.c does the
 * same steps inline, through receive buffers): how a range of the compact space splits over the owners'
 * shards, and a group's gradients reduce-scattered in place on the comm stream (ended by a comm-stream
 * mark, as device ZeRO-3's reductions are) and, once the compute stream waited for that mark, this rank's
 * part added into shard_grads. */
#ifndef ST_COMM_DEV_H
#define ST_COMM_DEV_H

#include "worker/comm.h"

/* parts[r] = how much of [a, b) lies in rank r's shard (world entries). */
void st_commdev_parts(const st_comm *c, size_t a, size_t b, size_t *parts);

/* Enqueues the sum over the ranks of the gradients of the compact range [lo, hi) at src (device memory), in
 * place: each owner's part of the sum lands in its own src, at that part's place (st_nccl_reduce_parts_sum,
 * one grouped call, no receive buffer; the comm stream first waits for the compute stream), then records
 * comm-stream mark `ev` (st_nccl_record). The host does not block and nothing is added yet: the compute
 * stream must wait for the mark (st_nccl_wait_event) before it reads this rank's part (st_commdev_add_own)
 * or writes src again. One rank without NCCL: nothing to do (src is already the sum). */
int st_commdev_reduce_start(st_comm *c, float *src, size_t lo, size_t hi, int ev);

/* shard_grads += this rank's part of the compact range [lo, hi), read at src (the range's gradients, or its
 * reduced sums after st_commdev_reduce_start finished): bias_add over one row, in pieces of at most 2^30. */
void st_commdev_add_own(st_comm *c, const float *src, size_t lo, size_t hi);

#endif
