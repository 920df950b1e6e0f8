/* comm.c — see comm.h. Plain blocking MPI collectives over the compact gradient space. */
#include "worker/comm.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "worker/optim.h"

static int mpi_check(int rc, const char *what, int rank) {
    if (rc == MPI_SUCCESS) return 0;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return st_fail(ST_ECOMM, "rank %d: %s failed: %s", rank, what, msg);
}

int st_comm_init(st_comm *c, MPI_Comm comm, int stage, const st_model *m) {
    memset(c, 0, sizeof *c);
    c->comm = comm;
    MPI_Comm_rank(comm, &c->rank);
    MPI_Comm_size(comm, &c->world);
    if (stage < 0 || stage > 2) return st_fail(ST_ECONFIG, "sharding.stage %d is not supported (0, 1 or 2)", stage);
    c->stage = stage;
    c->n = m->n_grads;
    c->n_pad = m->grad_alloc;
    if (c->n_pad % (size_t)c->world) return st_fail(ST_EINVAL, "gradient space not padded to the world size");
    c->shard = c->n_pad / (size_t)c->world;
    c->lo = c->shard * (size_t)c->rank;
    c->hi = c->lo + c->shard;
    if (stage >= 1 && c->n_pad) {
        c->flat_params = st_calloc_aligned(c->n_pad * sizeof(float));
        if (!c->flat_params) return st_fail(ST_ENOMEM, "out of memory for the parameter gather buffer");
    }
    if (stage == 2 && c->shard) {
        c->shard_grads = st_calloc_aligned(c->shard * sizeof(float));
        if (!c->shard_grads) return st_fail(ST_ENOMEM, "out of memory for the gradient shard");
    }
    return 0;
}

void st_comm_free(st_comm *c) {
    free(c->shard_grads);
    free(c->flat_params);
    c->shard_grads = c->flat_params = NULL;
}

void st_comm_optim_range(const st_comm *c, size_t *lo, size_t *hi) {
    if (c->stage == 0) { *lo = 0; *hi = c->n_pad; }
    else { *lo = c->lo; *hi = c->hi; }
}

int st_comm_reduce_grads(st_comm *c, st_model *m, float **optim_grads) {
    double t0 = st_now();
    int rc = 0;
    c->comm_seconds = 0;
    if (c->n_pad == 0) { *optim_grads = m->grads; return 0; }
    if (c->world > 1) {
        if (c->stage == 2)
            rc = mpi_check(MPI_Reduce_scatter_block(m->grads, c->shard_grads, (int)c->shard, MPI_FLOAT, MPI_SUM,
                                                    c->comm), "gradient reduce-scatter", c->rank);
        else
            rc = mpi_check(MPI_Allreduce(MPI_IN_PLACE, m->grads, (int)c->n_pad, MPI_FLOAT, MPI_SUM, c->comm),
                           "gradient all-reduce", c->rank);
    } else if (c->stage == 2) {
        memcpy(c->shard_grads, m->grads, c->shard * sizeof(float));
    }
    c->comm_seconds += st_now() - t0;
    if (c->stage == 0) *optim_grads = m->grads;
    else if (c->stage == 1) *optim_grads = m->grads + c->lo;
    else *optim_grads = c->shard_grads;
    return rc;
}

double st_comm_grad_sumsq(st_comm *c, const st_model *m, const float *optim_grads) {
    size_t lo, hi;
    st_comm_optim_range(c, &lo, &hi);
    double s = hi > lo ? m->be->sumsq(optim_grads, hi - lo) : 0.0;
    if (c->stage != 0 && c->world > 1) {
        double t0 = st_now();
        MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_SUM, c->comm);
        c->comm_seconds += st_now() - t0;
    }
    return s;
}

typedef struct { const st_model *m; float *flat; int to_flat; } pack_ctx;

static void pack_range(void *vctx, const st_param *p, size_t start, size_t len) {
    pack_ctx *k = vctx;
    float *w = k->m->weights + p->offset + (start - (size_t)p->grad_offset);
    if (k->to_flat) memcpy(k->flat + start, w, len * sizeof(float));
    else memcpy(w, k->flat + start, len * sizeof(float));
}

int st_comm_gather_params(st_comm *c, st_model *m) {
    if (c->stage == 0 || c->world == 1 || c->n_pad == 0) return 0;
    double t0 = st_now();
    pack_ctx k = {m, c->flat_params, 1};
    st_for_each_param_range(m, c->lo, c->hi, pack_range, &k);
    int rc = mpi_check(MPI_Allgather(MPI_IN_PLACE, (int)c->shard, MPI_FLOAT, c->flat_params, (int)c->shard,
                                     MPI_FLOAT, c->comm), "parameter all-gather", c->rank);
    if (rc) return rc;
    k.to_flat = 0;
    st_for_each_param_range(m, 0, c->n_pad, pack_range, &k);
    c->comm_seconds += st_now() - t0;
    return 0;
}

int st_comm_sum(st_comm *c, double *x, int n) {
    if (c->world == 1 || n == 0) return 0;
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, c->comm), "scalar all-reduce", c->rank);
}

int st_comm_gather_state(st_comm *c, const float *part, float *full) {
    if (c->n_pad == 0) return 0;
    if (c->stage == 0) {
        memcpy(full, part, c->n_pad * sizeof(float));
        return 0;
    }
    return mpi_check(MPI_Allgather(part, (int)c->shard, MPI_FLOAT, full, (int)c->shard, MPI_FLOAT, c->comm),
                     "optimizer state all-gather", c->rank);
}
