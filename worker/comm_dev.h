/* comm_dev.h — pieces the device ZeRO paths share (worker/comm_zero2_dev.c; worker/comm_zero3_dev.c does the
 * same steps inline): how a range of the compact space splits over the owners' shards, and the chunked
 * reduce-scatter of a group's gradients added into this rank's shard_grads. */
#ifndef ST_COMM_DEV_H
#define ST_COMM_DEV_H

#include "worker/comm.h"

/* parts[r] = how much of [a, b) lies in rank r's shard (world entries). */
void st_commdev_parts(const st_comm *c, size_t a, size_t b, size_t *parts);

/* The gradients of the compact range [lo, hi), at src (device memory), summed over the ranks into their
 * owners' shard_grads: in chunks of at most recv_floats floats, each reduce-scattered over NCCL into recv
 * (st_nccl_reduce_parts_sum: the comm stream first waits for the compute stream), the compute stream then
 * waits for it (src may be rewritten and recv read after), and this rank's part added into shard_grads
 * (bias_add over one row). One rank without NCCL adds its own gradients. Returns the first failure. */
int st_commdev_reduce_add(st_comm *c, float *recv, size_t recv_floats, const float *src, size_t lo, size_t hi);

#endif
