/* comm_dev.c — see comm_dev.h. */
#include "worker/comm_dev.h"

#include "kernels/cuda/nccl_comm.h"

void st_commdev_parts(const st_comm *c, size_t a, size_t b, size_t *parts) {
    for (int r = 0; r < c->world; r++) {
        size_t lo = c->shard * (size_t)r, hi = lo + c->shard;
        size_t s = a > lo ? a : lo, e = b < hi ? b : hi;
        parts[r] = e > s ? e - s : 0;
    }
}

/* This rank's part of [lo, hi): [*os, *os + return). */
static size_t own_part(const st_comm *c, size_t lo, size_t hi, size_t *os) {
    *os = lo > c->lo ? lo : c->lo;
    size_t oe = hi < c->hi ? hi : c->hi;
    return oe > *os ? oe - *os : 0;
}

int st_commdev_reduce_start(st_comm *c, float *src, size_t lo, size_t hi, int ev) {
    if (!c->nccl || hi <= lo) return 0;
    size_t parts[c->world], os;
    st_commdev_parts(c, lo, hi, parts);
    /* the parts are consecutive in rank order: this rank's (if any) starts at os - lo (ncclReduce in place
     * at its root: sendbuff == recvbuff) */
    float *own = own_part(c, lo, hi, &os) ? src + (os - lo) : src;
    int rc = st_nccl_reduce_parts_sum(c->nccl, own, src, parts);
    return rc ? rc : st_nccl_record(c->nccl, ev);
}

void st_commdev_add_own(st_comm *c, const float *src, size_t lo, size_t hi) {
    size_t os, own = own_part(c, lo, hi, &os);
    const size_t piece = (size_t)1 << 30; /* bias_add counts in int */
    for (size_t k = 0; k < own; k += piece) {
        size_t n = own - k < piece ? own - k : piece;
        c->be->bias_add(c->shard_grads + (os - c->lo) + k, src + (os - lo) + k, 1, (int)n);
    }
}
