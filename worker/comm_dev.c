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

int st_commdev_reduce_add(st_comm *c, float *recv, size_t recv_floats, const float *src, size_t lo, size_t hi) {
    const st_backend *be = c->be;
    int rc = 0;
    for (size_t a = lo; a < hi && !rc; a += recv_floats) {
        size_t b = hi - a < recv_floats ? hi : a + recv_floats;
        size_t os = a > c->lo ? a : c->lo, oe = b < c->hi ? b : c->hi, own = oe > os ? oe - os : 0;
        if (c->nccl) {
            size_t parts[c->world];
            st_commdev_parts(c, a, b, parts);
            rc = st_nccl_reduce_parts_sum(c->nccl, recv, src + (a - lo), parts);
            if (!rc) rc = st_nccl_wait_compute(c->nccl); /* recv is read and src reused on the compute stream */
            if (!rc && own) be->bias_add(c->shard_grads + (os - c->lo), recv, 1, (int)own);
        } else if (own) { /* one rank: the sum is its own gradient */
            be->bias_add(c->shard_grads + (os - c->lo), src + (os - lo), 1, (int)own);
        }
    }
    return rc;
}
