/* comm.c — see comm.h. MPI collectives over the compact gradient space on the CPU backend; NCCL
 * (kernels/cuda/nccl_comm.h, on device buffers, communicator id broadcast over MPI) on a backend whose
 * memory is device memory. Scalars (losses, norms) always go through MPI. No #ifdef: a build without CUDA
 * links NCCL stubs that fail with one line (kernels/cuda/nccl_stub_host.c). */
#include "worker/comm.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/cuda/nccl_comm.h" /* plain C; a build without CUDA links failing stubs */
#include "worker/comm_zero2_dev.h"
#include "worker/comm_zero3_dev.h"
#include "worker/optim.h"
#include "worker/qlora.h"

static int on_device(const st_model *m) { return !m->be->host_memory; }

/* Whether gradients and parameters go through collectives: several ranks, or NCCL on one rank
 * (SHARDTUNE_NCCL_ONE_RANK=1: a one-GPU machine exercises the communicator, its events and grouped calls
 * as a multi-GPU run would; the sums are then identities). */
static int collective(const st_comm *c) { return c->world > 1 || c->nccl; }

static int mpi_check(int rc, const char *what, int rank) {
    if (rc == MPI_SUCCESS) return 0;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    return st_fail(ST_ECOMM, "rank %d: %s failed: %s", rank, what, msg);
}

/* One NCCL communicator per job: rank 0 makes the id, MPI carries it. */
static int nccl_setup(st_comm *c) {
    unsigned char id[ST_NCCL_ID_BYTES];
    int rc = c->rank == 0 ? st_nccl_get_unique_id(id) : 0;
    MPI_Bcast(&rc, 1, MPI_INT, 0, c->comm);
    if (rc) return c->rank == 0 ? rc : st_fail(ST_ECOMM, "rank 0 could not create the NCCL id");
    MPI_Bcast(id, ST_NCCL_ID_BYTES, MPI_BYTE, 0, c->comm);
    st_nccl_comm *nc = NULL;
    rc = st_nccl_init(&nc, c->rank, c->world, id);
    c->nccl = nc;
    return rc ? st_fail_context(rc, "rank %d", c->rank) : 0;
}

/* The three gradient/parameter collectives, on whichever transport this job uses. */
static int coll_allreduce(st_comm *c, float *buf, size_t n) {
    if (c->nccl) return st_nccl_all_reduce_sum(c->nccl, buf, n);
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, c->comm), "gradient all-reduce",
                     c->rank);
}

static int coll_reduce_scatter(st_comm *c, const float *send, float *recv) {
    if (c->nccl) return st_nccl_reduce_scatter_sum(c->nccl, recv, send, c->shard);
    return mpi_check(MPI_Reduce_scatter_block(send, recv, (int)c->shard, MPI_FLOAT, MPI_SUM, c->comm),
                     "gradient reduce-scatter", c->rank);
}

/* full[r * shard ..) = part of rank r (device buffers go through NCCL: MPI here is not CUDA-aware). */
static int coll_allgather(st_comm *c, const float *part, float *full) {
    if (c->nccl) return st_nccl_all_gather(c->nccl, full, part, c->shard);
    return mpi_check(MPI_Allgather(part, (int)c->shard, MPI_FLOAT, full, (int)c->shard, MPI_FLOAT, c->comm),
                     "optimizer state all-gather", c->rank);
}

int st_comm_node_rank(MPI_Comm comm, int *local_rank, int *local_size) {
    MPI_Comm node;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
        return st_fail(ST_ECOMM, "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) failed: cannot tell the ranks per node");
    MPI_Comm_rank(node, local_rank);
    MPI_Comm_size(node, local_size);
    MPI_Comm_free(&node);
    return 0;
}

int st_comm_node_allgather(MPI_Comm comm, const void *mine, int bytes, unsigned char **all, int *n) {
    MPI_Comm node;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
        return st_fail(ST_ECOMM, "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) failed: cannot tell the ranks per node");
    MPI_Comm_size(node, n);
    *all = malloc((size_t)*n * (size_t)bytes);
    int rc = *all ? MPI_Allgather(mine, bytes, MPI_BYTE, *all, bytes, MPI_BYTE, node) : MPI_ERR_NO_MEM;
    MPI_Comm_free(&node);
    return rc == MPI_SUCCESS ? 0 : st_fail(ST_ECOMM, "node-local all-gather failed");
}

static int z3_init(st_comm *c, const st_model *m);
static void discard(float *x, size_t a, size_t b); /* stage 3, below: gives x[a, b)'s pages back */

/* Whether every parameter trains and the compact space is the weight space (offset = grad_offset): the
 * parameter all-gather then goes in place into the weights. */
static int weights_in_place(const st_model *m) {
    if (m->n_grads != m->n_weights) return 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].grad_offset != (long)m->params[i].offset) return 0;
    return 1;
}

size_t st_comm_param_staging_floats(size_t n_pad, size_t bucket_bytes, int in_place) {
    if (in_place) return 0;
    size_t bucket = bucket_bytes >= sizeof(float) ? bucket_bytes / sizeof(float) : ST_Z3_CHUNK;
    return bucket < n_pad ? bucket : n_pad;
}

int st_comm_init(st_comm *c, MPI_Comm comm, const st_comm_options *opt, const st_model *m) {
    int stage = opt->stage;
    memset(c, 0, sizeof *c);
    c->comm = comm;
    c->bucket_bytes = opt->bucket_bytes;
    c->z3_pre16 = opt->frozen_bf16;
    MPI_Comm_rank(comm, &c->rank);
    MPI_Comm_size(comm, &c->world);
    if (stage < 0 || stage > 3) return st_fail(ST_ECONFIG, "sharding.stage %d is not supported (0 to 3)", stage);
    c->stage = stage;
    c->n = m->n_grads;
    c->n_pad = m->grad_alloc;
    if (c->n_pad % (size_t)c->world) return st_fail(ST_EINVAL, "gradient space not padded to the world size");
    c->shard = c->n_pad / (size_t)c->world;
    c->lo = c->shard * (size_t)c->rank;
    c->hi = c->lo + c->shard;
    c->be = m->be;
    const char *nc = getenv("SHARDTUNE_NORM_CHECK"); /* tests: comm.h sq_check */
    c->sq_check = nc && !strcmp(nc, "1") ? 1 : nc && !strcmp(nc, "flip") ? 2 : 0;
    if (stage == 3) return z3_init(c, m);
    size_t flat = stage == 1 ? c->n_pad : 0;
    if (stage == 2) flat = st_comm_param_staging_floats(c->n_pad, c->bucket_bytes, weights_in_place(m));
    const char *one = getenv("SHARDTUNE_NCCL_ONE_RANK");
    int nccl_one = on_device(m) && one && !strcmp(one, "1");
    if (c->world == 1 && !nccl_one) flat = 0; /* one rank updates in place: nothing to gather (update_params) */
    if (flat) {
        c->flat_params = c->be->alloc(flat * sizeof(float));
        if (!c->flat_params) return st_fail(ST_ENOMEM, "out of memory for the parameter gather buffer");
    }
    if (stage == 2 && c->shard) {
        c->shard_grads = c->be->alloc(c->shard * sizeof(float));
        if (!c->shard_grads) return st_fail(ST_ENOMEM, "out of memory for the gradient shard");
        c->be->memset0(c->shard_grads, c->shard * sizeof(float)); /* the padding is never reduced into */
    }
    const char *keep = getenv("SHARDTUNE_ZERO2_FULL_GRADS"); /* =1: the full buffer, reduced once (benchmarks) */
    if (stage == 2 && !on_device(m) && c->world > 1 && c->n && !(keep && !strcmp(keep, "1"))) { /* comm.h: s2_release */
        c->s2_release = 1;
        c->s2_model = (st_model *)m;
        c->s2_model->grads_managed = 1;
        discard(m->grads, 0, m->grad_alloc);
    }
    int rc = on_device(m) && (c->world > 1 || nccl_one) ? nccl_setup(c) : 0;
    /* a device: the shard and a layer's bucket, no full-size gradient buffer (comm_zero2_dev.h) */
    if (!rc && stage == 2 && on_device(m) && c->n && st_z2dev_used(m)) return st_z2dev_init(c, (st_model *)m);
    if (!rc && stage == 2 && on_device(m) && c->n && !m->grads && !m->buffers_external) { /* st_comm_reshard_optim */
        st_model *mm = (st_model *)m;
        mm->grads = c->be->alloc(m->grad_alloc * sizeof(float));
        if (!mm->grads) return st_fail(ST_ENOMEM, "rank %d: out of memory for gradients", c->rank);
        c->be->memset0(mm->grads, m->grad_alloc * sizeof(float));
    }
    return rc;
}

static int prefetch_finish(st_comm *c, int first, int last); /* stage 3, below */
static int z3_rs_finish(st_comm *c);
static int z3_rs_complete(st_comm *c, int wait);
static void sq_take(st_comm *c, size_t a, size_t b); /* the norm inside the reduction, below */

/* Waits for the oldest stage-2 bucket in flight, adds a later micro-batch's part into the shard, and gives
 * the bucket's gradient pages back. */
static int s2_complete_oldest(st_comm *c) {
    st_s2_bucket *b = &c->s2[0];
    int rc = MPI_Wait(&b->req, MPI_STATUS_IGNORE);
    if (b->tmp) {
        for (size_t i = 0; i < b->own; i++) b->dst[i] += b->tmp[i];
        free(b->tmp);
    }
    size_t own_a = b->lo > c->lo ? b->lo : c->lo; /* this rank's part of the bucket: final now */
    if (rc == MPI_SUCCESS && b->own) sq_take(c, own_a, own_a + b->own);
    free(b->counts);
    if (c->s2_model) discard(c->s2_model->grads, b->lo, b->hi);
    c->s2_n--;
    memmove(c->s2, c->s2 + 1, (size_t)c->s2_n * sizeof *c->s2);
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "bucketed gradient reduce-scatter", c->rank);
}

/* Finishes every stage-2 bucket in flight; the first failure. */
static int s2_drain(st_comm *c) {
    int rc = 0;
    while (c->s2_n > 0) {
        int r = s2_complete_oldest(c);
        if (r && !rc) rc = r;
    }
    return rc;
}

void st_comm_free(st_comm *c) {
    st_z3dev_free(c); /* before the NCCL communicator goes: it waits for what is queued */
    st_z2dev_free(c);
    s2_drain(c);
    if (c->s2_model) c->s2_model->grads_managed = 0;
    c->s2_model = NULL;
    c->s2_release = 0;
    if (c->nccl) st_nccl_destroy(c->nccl);
    c->nccl = NULL;
    if (c->model) { /* stage 3: the model's hooks point here */
        prefetch_finish(c, -1, -1);
        z3_rs_finish(c);
        st_model_set_residency(c->model, NULL);
        c->model = NULL;
    }
    if (c->be) {
        c->be->free(c->shard_grads);
        c->be->free(c->flat_params);
        c->be->free(c->z3_recv);
    }
    free(c->z3_stage);
    free(c->z3_pf_counts);
    c->z3_pf_counts = NULL;
    free(c->z3_foff);
    free(c->z3_runs);
    free(c->z3_pf_freqs);
    free(c->z3_pf_fcounts);
    free(c->z3_pf_qcounts);
    c->z3_pf_qcounts = NULL;
    c->nq = 0;
    c->z3_foff = NULL;
    c->z3_runs = NULL;
    c->z3_pf_freqs = NULL;
    c->z3_pf_fcounts = NULL;
    free(c->z3_rs_counts);
    c->z3_rs_counts = NULL;
    free(c->z3_rs_reqs);
    c->z3_rs_reqs = NULL;
    c->z3_recv = NULL;
    c->z3_stage = NULL;
    free(c->reqs);
    free(c->req_counts);
    free(c->req_range);
    free(c->sq_part);
    free(c->sq_done);
    free(c->sq_left);
    c->req_range = NULL;
    c->sq_part = NULL;
    c->sq_done = NULL;
    c->sq_left = NULL;
    c->sq_x = NULL;
    c->sq_cap = c->sq_n = 0;
    c->sq_armed = c->sq_ready = 0;
    c->shard_grads = c->flat_params = NULL;
    c->reqs = NULL;
    c->req_counts = NULL;
    c->n_reqs = c->cap_reqs = 0;
}

/* ---- overlapped, bucketed reduction (all-reduce for stages 0-1, reduce-scatter for stage 2) ----
 * One host-side code path decides the buckets for both transports (on_grad_ready / launch_bucket);
 * only the last step differs: MPI starts a non-blocking collective per bucket and waits for all at the
 * end; NCCL enqueues the bucket's collective on the communication stream behind an event recorded on
 * the compute stream (it orders itself after the backward kernels queued so far, so it reads final
 * gradients while later layers' backward keeps running), and at the end the compute stream waits for
 * the comm stream before the optimizer reads the gradients.
 * Stage 2: shards are contiguous ranges of the gradient space, so a bucket [a, a + n) splits into
 * consecutive parts owned by consecutive ranks; each part is summed into its owner's shard_grads (a
 * reduce-scatter with per-rank counts: MPI_Ireduce_scatter, or one grouped ncclReduce per part). */

/* parts[r] = how much of [a, a + n) lies in rank r's shard. */
static void bucket_parts(const st_comm *c, size_t a, size_t n, size_t *parts) {
    for (int r = 0; r < c->world; r++) {
        size_t lo = c->shard * (size_t)r, hi = lo + c->shard;
        size_t s = a > lo ? a : lo, e = a + n < hi ? a + n : hi;
        parts[r] = e > s ? e - s : 0;
    }
}

/* Where this rank's part of the bucket [a, ...) lands in its shard_grads. */
static float *shard_dest(const st_comm *c, size_t a) { return c->shard_grads + (a > c->lo ? a - c->lo : 0); }

static int reserve_request(st_comm *c) {
    if (c->n_reqs < c->cap_reqs) return 0;
    int nc = c->cap_reqs ? 2 * c->cap_reqs : 16;
    MPI_Request *nr = realloc(c->reqs, (size_t)nc * sizeof *nr);
    if (nr) c->reqs = nr;
    int **np = nr ? realloc(c->req_counts, (size_t)nc * sizeof *np) : NULL;
    if (np) c->req_counts = np;
    size_t *rr = np ? realloc(c->req_range, 2 * (size_t)nc * sizeof *rr) : NULL;
    if (!rr) return st_fail(ST_ENOMEM, "rank %d: out of memory for bucket requests", c->rank);
    c->req_range = rr;
    c->cap_reqs = nc;
    return 0;
}

/* MPI's per-rank counts of a bucket's parts, followed by their displacements, for the next request
 * (reserve_request first): kept in c->req_counts until the request completes, since MPI reads them until
 * then. NULL (st_error set) when out of memory. */
static int *request_counts(st_comm *c, const size_t *parts) {
    int *counts = malloc(2 * (size_t)c->world * sizeof *counts);
    if (!counts) {
        st_fail(ST_ENOMEM, "rank %d: out of memory for bucket counts", c->rank);
        return NULL;
    }
    for (int r = 0, off = 0; r < c->world; r++) {
        counts[r] = (int)parts[r];
        counts[c->world + r] = off;
        off += counts[r];
    }
    c->req_counts[c->n_reqs] = counts;
    return counts;
}

/* Waits for every started non-blocking collective and releases their counts; returns MPI's code. */
static int wait_requests(st_comm *c) {
    int rc = c->n_reqs ? MPI_Waitall(c->n_reqs, c->reqs, MPI_STATUSES_IGNORE) : MPI_SUCCESS;
    for (int i = 0; i < c->n_reqs; i++) free(c->req_counts[i]);
    c->n_reqs = 0;
    return rc;
}

/* MPI_Ireduce_scatter of one stage-2 bucket. */
static int mpi_bucket_reduce_scatter(st_comm *c, float *grads, size_t lo, const size_t *parts) {
    int *counts = request_counts(c, parts);
    if (!counts) return ST_ENOMEM;
    return mpi_check(MPI_Ireduce_scatter(grads + lo, shard_dest(c, lo), counts, MPI_FLOAT, MPI_SUM, c->comm,
                                         &c->reqs[c->n_reqs++]),
                     "bucketed gradient reduce-scatter", c->rank);
}

/* Starts the reduction of grads[lo, lo + n) on this job's transport. */
static int bucket_reduce_start(st_comm *c, float *grads, size_t lo, size_t n) {
    size_t parts[c->world > 0 ? c->world : 1];
    if (c->stage == 2) bucket_parts(c, lo, n, parts);
    if (c->nccl && c->stage == 2) return st_nccl_reduce_parts_sum(c->nccl, shard_dest(c, lo), grads + lo, parts);
    if (c->nccl) return st_nccl_all_reduce_sum(c->nccl, grads + lo, n);
    int rc = reserve_request(c);
    if (rc) return rc;
    c->req_range[2 * c->n_reqs] = lo;
    c->req_range[2 * c->n_reqs + 1] = lo + n;
    if (c->stage == 2) return mpi_bucket_reduce_scatter(c, grads, lo, parts);
    c->req_counts[c->n_reqs] = NULL;
    return mpi_check(MPI_Iallreduce(MPI_IN_PLACE, grads + lo, (int)n, MPI_FLOAT, MPI_SUM, c->comm,
                                    &c->reqs[c->n_reqs++]),
                     "bucketed gradient all-reduce", c->rank);
}

/* Stage 2 on host memory: starts the reduce-scatter of grads[lo, lo + n) (see comm.h: s2_release). */
static int s2_launch(st_comm *c, float *grads, size_t lo, size_t n) {
    int rc = c->s2_n == ST_S2_INFLIGHT ? s2_complete_oldest(c) : 0;
    if (rc) return rc;
    size_t parts[c->world];
    bucket_parts(c, lo, n, parts);
    st_s2_bucket *b = &c->s2[c->s2_n];
    memset(b, 0, sizeof *b);
    b->lo = lo;
    b->hi = lo + n;
    b->own = parts[c->rank];
    b->dst = shard_dest(c, lo);
    b->counts = malloc((size_t)c->world * sizeof *b->counts);
    if (c->s2_micro > 0 && b->own) b->tmp = malloc(b->own * sizeof(float));
    if (!b->counts || (c->s2_micro > 0 && b->own && !b->tmp)) {
        free(b->counts);
        free(b->tmp);
        return st_fail(ST_ENOMEM, "rank %d: out of memory for a gradient bucket", c->rank);
    }
    for (int r = 0; r < c->world; r++) b->counts[r] = (int)parts[r];
    rc = MPI_Ireduce_scatter(grads + lo, b->tmp ? b->tmp : b->dst, b->counts, MPI_FLOAT, MPI_SUM, c->comm, &b->req);
    if (rc != MPI_SUCCESS) {
        free(b->counts);
        free(b->tmp);
        return mpi_check(rc, "bucketed gradient reduce-scatter", c->rank);
    }
    c->s2_n++;
    return c->s2_wait_each ? s2_drain(c) : 0;
}

/* Stage 2 on host memory: a bucket larger than bucket_bytes (one range reported at once: a layer, the
 * head) goes as several reduce-scatters of at most that size, which bounds MPI's temporaries and lets
 * the first pieces' pages go while later ones travel. */
static int s2_launch_pieces(st_comm *c, float *grads, size_t lo, size_t hi) {
    size_t piece = st_comm_zero2_piece_floats(c->bucket_bytes);
    int rc = 0;
    for (size_t s = lo; s < hi && !rc; s += piece) rc = s2_launch(c, grads, s, hi - s < piece ? hi - s : piece);
    return rc;
}

size_t st_comm_zero2_piece_floats(size_t bucket_bytes) {
    return bucket_bytes >= sizeof(float) ? bucket_bytes / sizeof(float) : ((size_t)4 << 20) / sizeof(float);
}

static void launch_bucket(st_comm *c, float *grads) {
    if (c->pend_hi <= c->pend_lo) return;
    int rc = c->s2_release ? s2_launch_pieces(c, grads, c->pend_lo, c->pend_hi)
                           : bucket_reduce_start(c, grads, c->pend_lo, c->pend_hi - c->pend_lo);
    if (rc && !c->overlap_rc) c->overlap_rc = rc; /* reported by overlap_finish (the hook returns void) */
    if (!rc) c->covered += c->pend_hi - c->pend_lo;
    c->pend_lo = c->pend_hi = 0;
}

static void sq_take_req(st_comm *c, int i); /* the norm inside the reduction, below */

static void on_grad_ready(void *vctx, size_t lo, size_t hi) {
    st_comm *c = vctx;
    float *grads = c->overlap_grads;
    double t0 = st_now();
    if (c->pend_hi > c->pend_lo && hi != c->pend_lo) launch_bucket(c, grads); /* not adjacent */
    if (c->pend_hi <= c->pend_lo) { c->pend_lo = lo; c->pend_hi = hi; }
    else c->pend_lo = lo;
    if ((c->pend_hi - c->pend_lo) * sizeof(float) >= c->bucket_bytes) launch_bucket(c, grads);
    /* Open MPI progresses non-blocking collectives only inside MPI calls: poke it once per layer */
    int done = 0;
    if (c->n_reqs) MPI_Testall(c->n_reqs, c->reqs, &done, MPI_STATUSES_IGNORE);
    for (int i = 0; done && c->sq_armed && i < c->n_reqs; i++) sq_take_req(c, i); /* all completed */
    for (int i = 0; i < c->s2_n; i++) MPI_Test(&c->s2[i].req, &done, MPI_STATUS_IGNORE); /* done: Wait returns */
    c->overlap_seconds += st_now() - t0;
}

/* The optimizer's range [lo, hi) of the gradient space (st_comm_optim_range) and its ST_SUMSQ_CHUNK chunks. */
static size_t sq_chunks(const st_comm *c, size_t *lo, size_t *hi) {
    st_comm_optim_range(c, lo, hi);
    return *hi > *lo ? (*hi - *lo + ST_SUMSQ_CHUNK - 1) / ST_SUMSQ_CHUNK : 0;
}

/* Arms the norm's sum of squares inside this step's reduction (comm.h: sq_part) when `last` (the step's
 * last micro-batch) and the reduction is one that takes it; else leaves it off. A failed allocation leaves
 * it off too (st_comm_grad_sumsq then takes its own pass). */
static void sq_arm(st_comm *c, int last) {
    size_t lo, hi, n = sq_chunks(c, &lo, &hi);
    c->sq_armed = c->sq_ready = 0;
    c->sq_taken = 0;
    if (!last || c->nccl || !c->be->host_memory || c->z2dev || c->z3dev || n == 0) return;
    if (c->stage <= 2 && !c->overlapping) return; /* stages 0-2: the bucketed reduction (world > 1) takes it */
    if (c->stage == 3 && !c->shard_grads) return;
    if (n > c->sq_cap) {
        free(c->sq_part);
        free(c->sq_done);
        free(c->sq_left);
        c->sq_part = malloc(n * sizeof *c->sq_part);
        c->sq_done = malloc(n);
        c->sq_left = malloc(n * sizeof *c->sq_left);
        c->sq_cap = c->sq_part && c->sq_done && c->sq_left ? n : 0;
        if (!c->sq_cap) return;
    }
    size_t top = hi < c->n ? hi : c->n; /* past n: padding, never reduced into */
    for (size_t k = 0; k < n; k++) {
        size_t s = lo + k * ST_SUMSQ_CHUNK, e = s + ST_SUMSQ_CHUNK < top ? s + ST_SUMSQ_CHUNK : top;
        c->sq_left[k] = e > s ? e - s : 0;
    }
    c->sq_x = c->stage <= 1 ? c->overlap_grads + lo : c->shard_grads;
    c->sq_n = n;
    memset(c->sq_done, 0, n);
    c->sq_armed = 1;
}

/* The reduction finished [a, b) of the gradient space (its values final in sq_x): every chunk of the
 * optimizer's range that now has all its elements takes its sum of squares. */
static void sq_take(st_comm *c, size_t a, size_t b) {
    size_t lo, hi;
    if (!c->sq_armed) return;
    sq_chunks(c, &lo, &hi);
    size_t top = hi < c->n ? hi : c->n;
    if (a < lo) a = lo;
    if (b > top) b = top;
    for (size_t s = a; s < b;) {
        size_t k = (s - lo) / ST_SUMSQ_CHUNK, cs = lo + k * ST_SUMSQ_CHUNK;
        size_t e = cs + ST_SUMSQ_CHUNK < b ? cs + ST_SUMSQ_CHUNK : b;
        if (e - s > c->sq_left[k]) { /* finished twice: not a partition of the range; the one pass */
            c->sq_armed = 0;
            return;
        }
        c->sq_left[k] -= e - s;
        if (!c->sq_left[k]) {
            size_t len = hi - cs < ST_SUMSQ_CHUNK ? hi - cs : ST_SUMSQ_CHUNK;
            c->sq_part[k] = c->be->sumsq(c->sq_x + (cs - lo), len);
            if (c->sq_check == 2 && !c->sq_taken) c->sq_part[k] *= 1.0 + 0x1p-20; /* tests: comm.h sq_check */
            c->sq_done[k] = 1;
            c->sq_taken++;
        }
        s = e;
    }
}

/* sq_take of request i's bucket once it completed (its range then emptied: taken once). Stage 2's
 * reduce-scatter finished this rank's part of it (sq_take keeps to the optimizer's range). */
static void sq_take_req(st_comm *c, int i) {
    sq_take(c, c->req_range[2 * i], c->req_range[2 * i + 1]);
    c->req_range[2 * i] = c->req_range[2 * i + 1];
}

/* wait_requests, taking each bucket's chunks (sq_take) as its all-reduce completes. */
static int wait_requests_sumsq(st_comm *c) {
    for (int left = c->n_reqs; left > 0; left--) {
        int i = MPI_UNDEFINED;
        int rc = MPI_Waitany(c->n_reqs, c->reqs, &i, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            c->sq_armed = 0;
            wait_requests(c);
            return rc;
        }
        if (i == MPI_UNDEFINED) break; /* the rest completed in on_grad_ready's MPI_Testall (taken there) */
        sq_take_req(c, i);
    }
    return wait_requests(c); /* every request is done: releases their counts */
}

void st_comm_overlap_begin(st_comm *c, st_model *m) {
    c->overlapping = 0;
    if (c->stage == 3 || c->z2dev) return; /* its own hook reduces every micro-batch's gradients already */
    if (!collective(c) || c->n == 0) return;
    if (!c->bucket_bytes) c->bucket_bytes = 4u << 20;
    c->overlapping = 1;
    c->s2_wait_each = 0;
    c->pend_lo = c->pend_hi = 0;
    c->covered = 0;
    c->n_reqs = 0;
    c->overlap_rc = 0;
    if (!c->s2_micro) c->overlap_seconds = 0;
    c->overlap_grads = m->grads;
    st_model_set_residency(m, &(st_residency_hooks){.grad_ready = on_grad_ready, .ctx = c}); /* stages 0-2: no other hook */
}

/* Compute stream waits (on the device) for the collectives queued so far, then the host checks that
 * they completed without an asynchronous NCCL error. No-op for MPI (its calls complete on return). */
static int coll_finish(st_comm *c) {
    if (!c->nccl) return 0;
    int rc = st_nccl_wait_compute(c->nccl);
    return rc ? rc : st_nccl_synchronize(c->nccl);
}

static int overlap_finish(st_comm *c, st_model *m) {
    launch_bucket(c, m->grads);
    st_model_set_residency(m, NULL);
    c->overlapping = 0;
    int src = s2_drain(c);
    if (src && !c->overlap_rc) c->overlap_rc = src;
    int rc = c->sq_armed ? wait_requests_sumsq(c) : wait_requests(c);
    c->sq_ready = c->sq_armed && rc == MPI_SUCCESS && !c->overlap_rc && c->covered == c->n;
    c->sq_armed = 0;
    int frc = coll_finish(c);
    if (c->overlap_rc) return c->overlap_rc;
    if (rc != MPI_SUCCESS) return mpi_check(rc, "bucketed gradient all-reduce", c->rank);
    if (frc) return frc;
    if (c->covered != c->n)
        return st_fail(ST_ECOMM, "rank %d: internal error: overlapped reduction covered %zu of %zu gradients",
                       c->rank, c->covered, c->n);
    return 0;
}

/* grad_ready hook of the fused sum of squares (st_comm.sumsq_grads). */
static void on_grad_sumsq(void *vctx, size_t lo, size_t hi) {
    st_comm *c = vctx;
    c->sumsq_sum += c->be->sumsq(c->sumsq_grads + lo, hi - lo);
    c->sumsq_covered += hi - lo;
}

/* Arms the fused sum of squares for this (last) micro-batch's backward where nothing else reads the
 * gradients as they finish: one rank (or no collective), stages 0-1, host memory. */
static void sumsq_arm(st_comm *c, st_model *m) {
    c->sumsq_ready = 0;
    if (collective(c) || c->stage > 1 || !c->be->host_memory || !m->grads || c->n == 0 || m->grad_ready) return;
    c->sumsq_grads = m->grads;
    c->sumsq_sum = 0;
    c->sumsq_covered = 0;
    st_model_set_residency(m, &(st_residency_hooks){.grad_ready = on_grad_sumsq, .ctx = c});
}

static void sumsq_disarm(st_comm *c, st_model *m) {
    if (!c->sumsq_grads) return;
    st_model_set_residency(m, NULL);
    c->sumsq_grads = NULL;
    c->sumsq_ready = c->sumsq_covered == c->n; /* else (never expected) st_comm_grad_sumsq reads them again */
}

void st_comm_backward_begin(st_comm *c, st_model *m, int overlap, int last) {
    if (c->stage == 3) {
        c->z3_async = overlap && c->world > 1;
        st_z3dev_backward(c, 1);
        sq_arm(c, last && c->model); /* CPU ranks: each chunk's part taken as it is summed into the shard */
        return;
    }
    if (c->z2dev) { /* a device's stage 2: every micro-batch's groups reduced as backward produces them */
        st_z2dev_backward_begin(c, overlap);
        return;
    }
    if (c->s2_release) {
        st_comm_overlap_begin(c, m);
        c->s2_wait_each = !overlap;
        sq_arm(c, last);
        return;
    }
    if (overlap && last) st_comm_overlap_begin(c, m);
    sq_arm(c, last);
    if (last) sumsq_arm(c, m);
}

int st_comm_backward_end(st_comm *c, st_model *m) {
    if (c->stage == 3) { /* the last layer's (the embeddings') reduction; failures: st_comm_reduce_grads */
        st_z3dev_backward(c, 0);
        double t0 = st_now();
        z3_rs_finish(c);
        c->overlap_seconds += st_now() - t0;
        c->z3_prof[ST_Z3_BWD_END] += st_now() - t0;
        return 0;
    }
    sumsq_disarm(c, m);
    if (c->z2dev) return st_z2dev_backward_end(c);
    if (!c->s2_release || !c->overlapping) return 0;
    double t0 = st_now();
    int rc = overlap_finish(c, m);
    c->s2_micro++;
    c->exposed_seconds += st_now() - t0;
    return rc;
}

void st_comm_optim_range(const st_comm *c, size_t *lo, size_t *hi) {
    if (c->stage == 0) { *lo = 0; *hi = c->n_pad; }
    else { *lo = c->lo; *hi = c->hi; }
}

/* ---- stage 3 on host memory: the moments moved shard to shard at a change of the trainable set ----
 * The old and new gradient spaces are registry-order concatenations of the trainable parameters, each cut
 * into equal shards. A parameter trainable in both layouts keeps its moments: element k sits at old_off + k
 * (old owner: that / old shard) and at grad_offset + k (new owner). Each rank sends the pieces of its old
 * shard, cut at the new owners' edges, and receives the pieces of its new shard, cut at the old owners'
 * edges; both sides visit them in registry order, so every pair of ranks posts the same runs in the same
 * order (MPI keeps the order of messages between two ranks with one tag). No rank holds more than its old
 * and its new moments: SHARDTUNE_ZERO3_RESHARD=whole gathers the whole old moments everywhere instead (the
 * path before; tests compare the two bit for bit). */

#define RESHARD_TAG 7301
#define RESHARD_RUN ((size_t)1 << 30) /* an MPI count is an int */

typedef struct {
    const float *old_m, *old_v; /* this rank's old shard, from old_lo */
    float *new_m, *new_v;       /* this rank's new shard, from new_lo */
    size_t old_lo, new_lo;
    MPI_Comm comm;
    int rank, sending, count, live; /* live 0: only count the runs */
    MPI_Request *reqs;
    const st_backend *be;
} reshard_ctx;

static int reshard_whole(void) {
    const char *e = getenv("SHARDTUNE_ZERO3_RESHARD");
    return e && !strcmp(e, "whole");
}

/* One run: n moments of one parameter at old_at (old space) and new_at (new space), peer the other side. */
static int reshard_run(reshard_ctx *x, int peer, size_t old_at, size_t new_at, size_t n) {
    if (peer == x->rank) { /* kept on this rank: copied once, on the sending pass */
        if (x->sending && x->live) {
            x->be->copy(x->new_m + (new_at - x->new_lo), x->old_m + (old_at - x->old_lo), n * sizeof(float));
            x->be->copy(x->new_v + (new_at - x->new_lo), x->old_v + (old_at - x->old_lo), n * sizeof(float));
        }
        return MPI_SUCCESS;
    }
    int k = x->count;
    x->count += 2;
    if (!x->live) return MPI_SUCCESS;
    int rc;
    if (x->sending) {
        rc = MPI_Isend(x->old_m + (old_at - x->old_lo), (int)n, MPI_FLOAT, peer, RESHARD_TAG, x->comm, &x->reqs[k]);
        if (rc == MPI_SUCCESS)
            rc = MPI_Isend(x->old_v + (old_at - x->old_lo), (int)n, MPI_FLOAT, peer, RESHARD_TAG, x->comm, &x->reqs[k + 1]);
    } else {
        rc = MPI_Irecv(x->new_m + (new_at - x->new_lo), (int)n, MPI_FLOAT, peer, RESHARD_TAG, x->comm, &x->reqs[k]);
        if (rc == MPI_SUCCESS)
            rc = MPI_Irecv(x->new_v + (new_at - x->new_lo), (int)n, MPI_FLOAT, peer, RESHARD_TAG, x->comm, &x->reqs[k + 1]);
    }
    return rc;
}

/* Registry-order visit of this rank's side: its old range [lo, hi) cut at the new owners' edges (sending) or
 * its new range cut at the old owners' edges (receiving). */
static int reshard_visit(reshard_ctx *x, const st_model *m, const long *old_off, size_t lo, size_t hi,
                         size_t old_shard, size_t new_shard) {
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0 || old_off[i] < 0) continue;
        size_t oa = (size_t)old_off[i], na = (size_t)p->grad_offset;
        size_t here = x->sending ? oa : na, there = x->sending ? na : oa;
        size_t there_shard = x->sending ? new_shard : old_shard;
        size_t s = here > lo ? here : lo, e = here + p->numel < hi ? here + p->numel : hi;
        for (size_t k = s > here ? s - here : 0; s < e && k < e - here;) {
            size_t peer = (there + k) / there_shard, end = (peer + 1) * there_shard - there;
            if (end > e - here) end = e - here;
            if (end - k > RESHARD_RUN) end = k + RESHARD_RUN;
            int rc = reshard_run(x, (int)peer, oa + k, na + k, end - k);
            if (rc != MPI_SUCCESS) return rc;
            k = end;
        }
    }
    return MPI_SUCCESS;
}

static int reshard_pass(reshard_ctx *x, const st_model *m, const long *old_off, size_t lo, size_t hi,
                        size_t old_shard, size_t new_shard, int sending) {
    x->sending = sending;
    return reshard_visit(x, m, old_off, lo, hi, old_shard, new_shard);
}

/* Moves the moments of the parameters trainable in both layouts from the old shards (old_m, old_v over
 * [old_lo, old_lo + old_shard) of the old space) into o's new ones (zero elsewhere: new parameters start
 * fresh). Collective over comm. */
static int reshard_moments(st_optim *o, const st_model *m, MPI_Comm comm, const long *old_off, const float *old_m,
                           const float *old_v, size_t old_lo, size_t old_shard, size_t new_shard) {
    reshard_ctx x = {old_m, old_v, o->m, o->v, old_lo, o->lo, comm, 0, 0, 0, 0, NULL, m->be};
    MPI_Comm_rank(comm, &x.rank);
    size_t old_hi = old_m ? old_lo + old_shard : old_lo, new_hi = o->m ? o->hi : o->lo;
    int rc = reshard_pass(&x, m, old_off, old_lo, old_hi, old_shard, new_shard, 1);
    if (rc == MPI_SUCCESS) rc = reshard_pass(&x, m, old_off, o->lo, new_hi, old_shard, new_shard, 0);
    if (rc != MPI_SUCCESS) return mpi_check(rc, "optimizer state re-shard", x.rank);
    x.reqs = x.count ? malloc((size_t)x.count * sizeof(MPI_Request)) : NULL;
    int fail = x.count && !x.reqs; /* every rank agrees before any message is posted */
    rc = MPI_Allreduce(MPI_IN_PLACE, &fail, 1, MPI_INT, MPI_MAX, comm);
    if (rc != MPI_SUCCESS) { free(x.reqs); return mpi_check(rc, "optimizer state re-shard", x.rank); }
    if (fail) { free(x.reqs); return st_fail(ST_ENOMEM, "rank %d: out of memory re-sharding optimizer state", x.rank); }
    int posted = x.count;
    x.count = 0;
    x.live = 1;
    rc = reshard_pass(&x, m, old_off, old_lo, old_hi, old_shard, new_shard, 1);
    if (rc == MPI_SUCCESS) rc = reshard_pass(&x, m, old_off, o->lo, new_hi, old_shard, new_shard, 0);
    int wrc = posted ? MPI_Waitall(x.count, x.reqs, MPI_STATUSES_IGNORE) : MPI_SUCCESS;
    if (posted) free(x.reqs);
    if (rc == MPI_SUCCESS) rc = wrc;
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "optimizer state re-shard", x.rank);
}

/* The weights likewise: element k of a parameter lives at m->weights[offset + k] (fp32) or, held in bf16 only,
 * m->weights_bf16[offset + k], on the rank that owns it in its space: the compact space while trainable, the
 * frozen space while frozen, each cut into equal shards. The new spaces are known before the new layout is
 * built (st_model_grad_offsets; frozen_space's rule), so every element goes from its old owner to its new one
 * at the same address, point to point; the new communicator's init gives back what this rank does not own
 * any more. A newly trainable tensor held in bf16 only arrives in bf16 and st_model_set_trainable widens it
 * as before. SHARDTUNE_ZERO3_RESHARD=whole acquires every parameter whole instead. */
typedef struct {
    long *goff, *foff;     /* the new layout's compact and frozen offsets, -1 where not in that space */
    size_t shard, fshard;  /* the new shards */
    MPI_Request *reqs;     /* NULL: only count */
    int count;
} weights_move;

static int move_param(const st_comm *c, st_model *m, weights_move *w, int i) {
    const st_param *p = &m->params[i];
    long oa = p->grad_offset >= 0 ? p->grad_offset : c->z3_foff[i], na = w->goff[i] >= 0 ? w->goff[i] : w->foff[i];
    size_t osh = p->grad_offset >= 0 ? c->shard : c->fshard, nsh = w->goff[i] >= 0 ? w->shard : w->fshard;
    if (oa < 0 || na < 0 || !osh || !nsh) return MPI_SUCCESS;
    int b16 = st_model_fp32_dropped(m, i);
    char *base = b16 ? (char *)(m->weights_bf16 + p->offset) : (char *)(m->weights + p->offset);
    size_t elem = b16 ? sizeof(uint16_t) : sizeof(float);
    for (int send = 1; send >= 0; send--) { /* this rank's old part cut at the new owners, its new part at the old */
        size_t here = (size_t)(send ? oa : na), there = (size_t)(send ? na : oa);
        size_t hsh = send ? osh : nsh, tsh = send ? nsh : osh, lo = (size_t)c->rank * hsh, hi = lo + hsh;
        size_t s = here > lo ? here : lo, e = here + p->numel < hi ? here + p->numel : hi;
        for (size_t k = s - here; s < e && k < e - here;) {
            size_t peer = (there + k) / tsh, end = (peer + 1) * tsh - there;
            if (end > e - here) end = e - here;
            if (end - k > RESHARD_RUN) end = k + RESHARD_RUN;
            if ((int)peer != c->rank) { /* else already in place */
                int rc = MPI_SUCCESS, n = (int)(end - k);
                MPI_Datatype t = b16 ? MPI_UINT16_T : MPI_FLOAT;
                if (w->reqs && send) rc = MPI_Isend(base + k * elem, n, t, (int)peer, RESHARD_TAG, c->comm, &w->reqs[w->count]);
                if (w->reqs && !send) rc = MPI_Irecv(base + k * elem, n, t, (int)peer, RESHARD_TAG, c->comm, &w->reqs[w->count]);
                if (rc != MPI_SUCCESS) return rc;
                w->count++;
            }
            k = end;
        }
    }
    return MPI_SUCCESS;
}

/* A tensor held in bf16 only that becomes trainable: this rank's new part widened to its fp32 master (exact)
 * and the flag cleared, so st_model_set_trainable does not widen the whole tensor (every rank's pages). */
static void widen_new_parts(const st_comm *c, st_model *m, const weights_move *w) {
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (w->goff[i] < 0 || !st_model_fp32_dropped(m, i) || p->offset < m->n_w16) continue; /* n_w16: refused there */
        size_t a = (size_t)w->goff[i], lo = (size_t)c->rank * w->shard, hi = lo + w->shard;
        size_t s = a > lo ? a : lo, e = a + p->numel < hi ? a + p->numel : hi;
        if (s < e) m->be->from_bf16(m->weights + p->offset + (s - a), m->weights_bf16 + p->offset + (s - a), e - s);
        st_model_set_fp32_dropped(m, i, 0);
    }
}

/* Collective over the old communicator c, before it is freed. */
static int reshard_weights(st_comm *c, st_model *m, const unsigned char *layer_mask, unsigned module_mask) {
    int np = m->n_params, fail = 0, rc = MPI_SUCCESS;
    weights_move w = {malloc((size_t)np * sizeof(long)), malloc((size_t)np * sizeof(long)), 0, 0, NULL, 0};
    if (w.goff && w.foff) {
        size_t n = st_model_grad_offsets(m, layer_mask, module_mask, w.goff), nf = 0, world = (size_t)c->world;
        for (int i = 0; i < np; i++) { /* frozen_space's rule */
            w.foff[i] = w.goff[i] >= 0 ? -1 : (long)nf;
            if (w.foff[i] >= 0) nf += m->params[i].numel;
        }
        w.shard = (n + world - 1) / world;
        w.fshard = (nf + world - 1) / world;
        for (int i = 0; i < np && rc == MPI_SUCCESS; i++) rc = move_param(c, m, &w, i);
        w.reqs = w.count ? malloc((size_t)w.count * sizeof(MPI_Request)) : NULL;
    }
    fail = !w.goff || !w.foff || (w.count && !w.reqs) || rc != MPI_SUCCESS; /* every rank agrees before posting */
    int arc = MPI_Allreduce(MPI_IN_PLACE, &fail, 1, MPI_INT, MPI_MAX, c->comm);
    w.count = 0;
    if (arc == MPI_SUCCESS && !fail && w.reqs) {
        for (int i = 0; i < np && rc == MPI_SUCCESS; i++) rc = move_param(c, m, &w, i);
        int wrc = MPI_Waitall(w.count, w.reqs, MPI_STATUSES_IGNORE);
        if (rc == MPI_SUCCESS) rc = wrc;
        if (rc == MPI_SUCCESS) widen_new_parts(c, m, &w);
    }
    free(w.goff);
    free(w.foff);
    free(w.reqs);
    if (arc != MPI_SUCCESS) rc = arc;
    if (rc != MPI_SUCCESS) return mpi_check(rc, "weights re-shard", c->rank);
    return fail ? st_fail(ST_ENOMEM, "rank %d: out of memory re-sharding the weights (or another rank failed)", c->rank) : 0;
}

/* rc unless another rank failed: every rank goes on to a collective, or none does. */
static int all_agree(int rc, MPI_Comm comm, int rank) {
    int bad = rc != 0, arc = MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, comm);
    if (!rc && arc != MPI_SUCCESS) rc = mpi_check(arc, "optimizer state re-shard", rank);
    if (!rc && bad) rc = st_fail(ST_ECOMM, "rank %d: another rank failed re-sharding the optimizer state", rank);
    return rc;
}

int st_comm_reshard_optim(st_comm *c, st_optim *o, st_model *m, MPI_Comm comm, const st_comm_options *opt,
                          const st_optim_config *oc, const unsigned char *layer_mask, unsigned module_mask) {
    const st_backend *be = m->be;
    long *old_off = malloc((size_t)m->n_params * sizeof(long));
    if (!old_off) return st_fail(ST_ENOMEM, "out of memory");
    for (int i = 0; i < m->n_params; i++) old_off[i] = m->params[i].grad_offset;
    /* stage 3: the old shards kept and moved once the new layout is made (host memory: shard to shard,
     * reshard_moments; a device: in bounded pieces, st_z3dev_move_moments); elsewhere the full old moments on
     * every rank, so each rank can cut its new shard */
    int move = c->stage == 3 && opt->stage == 3 && (c->z3dev || be->host_memory) && !reshard_whole();
    int dmove = move && c->z3dev;
    st_z3dev *old_z = NULL; /* dmove: the old weight shards, detached from the old communicator */
    size_t old_lo = o->lo, old_shard = c->shard;
    float *old_m = NULL, *old_v = NULL, *keep_m = NULL, *keep_v = NULL;
    int rc = 0, world = 1;
    if (move) {
        keep_m = o->m;
        keep_v = o->v;
        o->m = o->v = NULL; /* not freed with the old optimizer */
    } else if (o->m && c->n_pad > 0) {
        old_m = be->alloc(c->n_pad * sizeof(float)); /* backend memory: gathered and copied on the device */
        old_v = be->alloc(c->n_pad * sizeof(float));
        if (!old_m || !old_v) rc = st_fail(ST_ENOMEM, "out of memory re-sharding optimizer state");
        if (!rc) rc = st_comm_gather_state(c, o->m, old_m);
        if (!rc) rc = st_comm_gather_state(c, o->v, old_v);
    }
    /* stage 3: the weights moved from their old owners to their new ones (SHARDTUNE_ZERO3_RESHARD=whole, or
     * where that is not done: whole on every rank, every rank acquires: collective, so the new communicator
     * can cut its shards from them; its init gives back what this rank no longer owns) */
    if (dmove) { /* on a device (worker/comm_zero3_dev.c): the old shards kept, moved piece by piece below */
        int drc;
        old_z = st_z3dev_detach(c, &drc);
        if (!rc) rc = drc;
    } else if (c->z3dev) { /* SHARDTUNE_ZERO3_RESHARD=whole: gathered into a whole buffer, its layout undone */
        int urc = st_z3dev_unshard(c);
        if (!rc) rc = urc;
    } else if (c->stage == 3 && c->model == m && move && c->z3_foff && !c->nq && !m->lora && !m->prompt) {
        prefetch_finish(c, -1, -1); /* nothing of the old layout still in flight */
        int wrc = reshard_weights(c, m, layer_mask, module_mask); /* the old and new parts only */
        if (!rc) rc = wrc;
    } else if (c->stage == 3 && c->model == m) {
        st_model_acquire(m, 0, m->n_params);
    }
    int *old_steps = o->param_step;
    o->param_step = NULL;
    st_optim_free(o, be);
    st_comm_free(c);
    MPI_Comm_size(comm, &world);
    m->grad_align = world;
    /* stage 2 on a device: no full-size gradient buffer is made, not even for a moment (st_comm_init
     * allocates it when the bucketed layout does not apply); nor at stage 3 (its init would free it) */
    int dev2 = (opt->stage == 2 || dmove) && on_device(m), ext = m->buffers_external; /* dmove: nor at stage 3 */
    if (dev2 && !ext) {
        be->free(m->grads);
        m->grads = NULL;
        m->buffers_external = 1; /* st_model_set_trainable: no gradient buffer */
    }
    if (!rc) rc = st_model_set_trainable(m, layer_mask, module_mask);
    m->buffers_external = ext;
    if (!rc) rc = st_comm_init(c, comm, opt, m);
    if (dmove) { /* the weights first: their old shards are freed before the new moments are made */
        rc = all_agree(rc, comm, c->rank);
        if (!rc) rc = st_z3dev_reshard(c, old_z, old_off);
        else st_z3dev_drop_detached(old_z);
    }
    size_t lo, hi;
    st_comm_optim_range(c, &lo, &hi);
    if (!rc) rc = st_optim_init(o, oc, lo, hi, m, be);
    if (move) rc = all_agree(rc, comm, c->rank); /* collective below: every rank or none */
    if (dmove) {
        if (!rc && keep_m && o->m) rc = st_z3dev_move_moments(c, old_off, old_shard, keep_m, keep_v, o->m, o->v);
    } else if (move && !rc) rc = reshard_moments(o, m, comm, old_off, keep_m, keep_v, old_lo, old_shard, c->shard);
    if (!rc && old_steps) st_optim_carry_over(o, m, old_off, old_steps, old_m, old_v);
    free(old_steps);
    be->free(old_m);
    be->free(old_v);
    be->free(keep_m);
    be->free(keep_v);
    free(old_off);
    return rc;
}

int st_comm_reduce_grads(st_comm *c, st_model *m, float **optim_grads) {
    double t0 = st_now();
    int rc = 0;
    c->comm_seconds = 0;
    if (c->stage == 3) { /* reduce-scattered layer by layer during backward */
        prefetch_finish(c, -1, -1);
        z3_rs_finish(c);
        c->sq_ready = c->sq_armed && !c->z3_rc;
        c->sq_armed = 0;
        if (c->z3dev) rc = coll_finish(c); /* nothing of the step left queued on the comm stream */
        c->z3_async = 0;
        c->fresh = 1;
        *optim_grads = c->shard_grads;
        c->comm_seconds = c->overlap_seconds + (st_now() - t0);
        c->overlap_seconds = 0;
        if (c->z3_rc) rc = c->z3_rc;
        c->z3_rc = 0;
        return rc;
    }
    if (c->n_pad == 0) { *optim_grads = m->grads; return 0; }
    if (c->z2dev) { /* reduced into the shard group by group during every micro-batch's backward */
        rc = coll_finish(c); /* nothing of the step left queued on the comm stream */
        c->fresh = 1;
        *optim_grads = c->shard_grads;
        c->comm_seconds = c->overlap_seconds + (st_now() - t0);
        c->overlap_seconds = 0;
        return rc;
    }
    if (c->overlapping) {
        rc = overlap_finish(c, m);
        if (c->s2_release) c->s2_micro++;
    } else if (c->s2_micro > 0) {
        /* stage 2 on host memory: every micro-batch was reduced into the shard during its backward */
    } else if (collective(c)) {
        if (c->stage == 2) rc = coll_reduce_scatter(c, m->grads, c->shard_grads);
        else rc = coll_allreduce(c, m->grads, c->n_pad);
        if (!rc) rc = coll_finish(c);
        if (c->s2_release) discard(m->grads, 0, m->grad_alloc); /* not armed: reduced whole, now given back */
    } else if (c->stage == 2) {
        m->be->copy(c->shard_grads, m->grads, c->shard * sizeof(float));
    }
    c->comm_seconds += st_now() - t0 + c->exposed_seconds;
    c->exposed_seconds = 0;
    c->s2_micro = 0;
    if (c->stage == 0) *optim_grads = m->grads;
    else if (c->stage == 1) *optim_grads = m->grads + c->lo;
    else *optim_grads = c->shard_grads;
    return rc;
}

/* SHARDTUNE_NORM_CHECK: the sum taken inside the reduction against one pass over the range, bit for bit. */
static int sq_check(const st_comm *c, const st_model *m, const float *optim_grads, size_t n, double s) {
    double one = n ? m->be->sumsq(optim_grads, n) : 0.0;
    if (!memcmp(&one, &s, sizeof s)) return 0;
    return st_fail(ST_ECOMM, "rank %d: SHARDTUNE_NORM_CHECK: the gradient sum of squares taken in the reduction "
                             "(%zu of %zu chunks) is %.17g, one pass gives %.17g",
                   c->rank, c->sq_taken, c->sq_n, s, one);
}

int st_comm_grad_sumsq_part(st_comm *c, const st_model *m, const float *optim_grads, double *sq, int *partial) {
    size_t lo, hi;
    st_comm_optim_range(c, &lo, &hi);
    *partial = c->stage != 0 && c->world > 1;
    int fused = c->sumsq_ready && c->stage <= 1 && !collective(c);
    c->sumsq_ready = 0;
    if (fused) { /* taken during the last backward (sumsq_arm) */
        *sq = c->sumsq_sum;
        return 0;
    }
    double s = 0.0;
    int taken = c->sq_ready && c->sq_n == sq_chunks(c, &lo, &hi);
    if (taken) { /* most chunks taken during the reduction */
        for (size_t k = 0; k < c->sq_n; k++) {
            size_t at = k * ST_SUMSQ_CHUNK, len = hi - lo - at < ST_SUMSQ_CHUNK ? hi - lo - at : ST_SUMSQ_CHUNK;
            s += c->sq_done[k] ? c->sq_part[k] : m->be->sumsq(optim_grads + at, len);
        }
    } else if (hi > lo) {
        s = m->be->sumsq(optim_grads, hi - lo);
    }
    c->sq_ready = 0;
    *sq = s;
    return taken && c->sq_check ? sq_check(c, m, optim_grads, hi - lo, s) : 0;
}

double st_comm_grad_sumsq(st_comm *c, const st_model *m, const float *optim_grads) {
    double s = 0.0;
    int partial = 0;
    st_comm_grad_sumsq_part(c, m, optim_grads, &s, &partial); /* a failed check: st_error, the sum as taken */
    if (partial) {
        double t0 = st_now();
        MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_SUM, c->comm);
        c->comm_seconds += st_now() - t0;
    }
    return s;
}

typedef struct { const st_model *m; float *flat; size_t at; int to_flat; } pack_ctx; /* flat[0] = element at */

/* Copies one parameter range between the weights and the flat staging buffer; unpacking also refreshes
 * that range of the bf16 weight copy (mixed precision), so the next forward needs no repack. */
static void pack_range(void *vctx, const st_param *p, size_t start, size_t len) {
    pack_ctx *k = vctx;
    const st_model *m = k->m;
    size_t off = p->offset + (start - (size_t)p->grad_offset);
    float *w = m->weights + off;
    if (k->to_flat) {
        m->be->copy(k->flat + (start - k->at), w, len * sizeof(float));
        return;
    }
    m->be->copy(w, k->flat + (start - k->at), len * sizeof(float));
    if (m->weights_bf16) m->be->to_bf16(m->weights_bf16 + off, w, len);
}

/* Starts the all-gather of the parameter bucket [a, a + n), element a at buf[0]: each owner's part goes to
 * every rank (in place; MPI_Iallgatherv, or grouped NCCL broadcasts). */
static int gather_bucket_start(st_comm *c, float *buf, size_t a, size_t n) {
    size_t parts[c->world];
    bucket_parts(c, a, n, parts);
    if (c->nccl) return st_nccl_all_gather_parts(c->nccl, buf, parts);
    int rc = reserve_request(c);
    if (rc) return rc;
    int *counts = request_counts(c, parts);
    if (!counts) return ST_ENOMEM;
    return mpi_check(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, buf, counts, counts + c->world,
                                     MPI_FLOAT, c->comm, &c->reqs[c->n_reqs++]),
                     "bucketed parameter all-gather", c->rank);
}

static int gather_finish(st_comm *c) {
    int rc = wait_requests(c);
    int frc = coll_finish(c); /* the unpacking after it runs on the compute stream */
    if (rc != MPI_SUCCESS) return mpi_check(rc, "bucketed parameter all-gather", c->rank);
    return frc;
}

/* Whether the update may zero the gradients it reads (the next step accumulates into zeros, and no
 * separate pass zeroes them): ZeRO-3's shard (ST_OPTIM_ZERO_ALL: the reductions add into it), or ZeRO 0-1's
 * model gradients where st_model_zero_grad would zero them (not ZeRO-2's, which the reduction overwrites),
 * except those the next step's first weight-gradient matmul overwrites (ST_OPTIM_ZERO_UNLESS_OVERWRITTEN). */
static int update_zeroes(const st_comm *c, const st_model *m, const float *grads) {
    if (c->stage == 3) return grads == c->shard_grads ? ST_OPTIM_ZERO_ALL : 0;
    return c->stage <= 1 && m->grads && !m->release && !m->grads_managed && grads >= m->grads &&
                   grads < m->grads + m->grad_alloc
               ? ST_OPTIM_ZERO_UNLESS_OVERWRITTEN
               : 0;
}

/* After a zeroing update: the part of the gradients the optimizer's ranges do not cover is zeroed here
 * (ZeRO-3: the shard's padding), or left to st_model_zero_grad (ZeRO 0-1: around [lo, hi) of m->grads). */
static void after_zeroing(st_comm *c, st_model *m, const st_optim *o) {
    size_t lo = o->lo, hi = o->hi < m->n_grads ? o->hi : m->n_grads;
    if (hi < lo) hi = lo;
    if (c->stage == 3) { /* the next step's first reduction then skips its memset (stage 3's restart, fresh) */
        if (c->shard > hi - lo) c->be->memset0(c->shard_grads + (hi - lo), (c->shard - (hi - lo)) * sizeof(float));
        c->shard_zeroed = 1;
        return;
    }
    m->grads_zero_lo = lo;
    m->grads_zero_hi = hi;
}

static int update_params(st_comm *c, st_model *m, st_optim *o, const float *grads, float lr, float grad_scale);

int st_comm_update_params(st_comm *c, st_model *m, st_optim *o, const float *grads, float lr, float grad_scale) {
    o->zero_grads = update_zeroes(c, m, grads);
    int rc = update_params(c, m, o, grads, lr, grad_scale);
    if (o->zero_grads && !rc) after_zeroing(c, m, o);
    o->zero_grads = 0;
    return rc;
}

static int update_params(st_comm *c, st_model *m, st_optim *o, const float *grads, float lr, float grad_scale) {
    if (c->stage == 3 || c->stage == 0 || !collective(c) || c->n_pad == 0) {
        st_optim_update(o, m, grads, lr, grad_scale); /* ZeRO-3: the shard is the resident master copy */
        return 0;
    }
    double t0 = st_now(), optimizer = 0;
    size_t bucket = c->bucket_bytes >= sizeof(float) ? c->bucket_bytes / sizeof(float) : c->n_pad;
    /* stage 2: in place into the weights (flat_params NULL), or a bucket at a time through its staging */
    int in_place = c->stage == 2 && !c->flat_params, staged = c->stage == 2 && c->flat_params;
    if (staged) bucket = st_comm_param_staging_floats(c->n_pad, c->bucket_bytes, 0);
    st_optim_count_step(o, m);
    pack_ctx k = {m, c->flat_params, 0, 1};
    int rc = 0;
    c->n_reqs = 0;
    for (size_t a = 0; a < c->n_pad && !rc; a += bucket) {
        size_t b = a + bucket < c->n_pad ? a + bucket : c->n_pad;
        size_t s = a > c->lo ? a : c->lo, e = b < c->hi ? b : c->hi;
        k.at = staged ? a : 0;
        k.to_flat = 1;
        if (s < e) { /* this rank's part of the bucket: update it, stage it for the gather */
            double t1 = st_now();
            st_optim_update_range(o, m, grads, lr, grad_scale, s, e);
            optimizer += st_now() - t1;
            if (!in_place) st_for_each_param_range(m, s, e, pack_range, &k);
        }
        float *buf = in_place ? m->weights + a : staged ? c->flat_params : c->flat_params + a;
        size_t len = in_place ? (b < c->n ? b : c->n) - (a < c->n ? a : c->n) : b - a; /* no padding weights */
        if (len) rc = gather_bucket_start(c, buf, a, len);
        int done;
        if (!rc && c->n_reqs) MPI_Testall(c->n_reqs, c->reqs, &done, MPI_STATUSES_IGNORE); /* progress */
        if (!rc && staged) { /* one staging buffer: finish this bucket and unpack it before the next */
            rc = gather_finish(c);
            k.to_flat = 0;
            if (!rc) st_for_each_param_range(m, a, b < c->n ? b : c->n, pack_range, &k);
        }
    }
    int frc = gather_finish(c);
    if (rc || frc) return rc ? rc : frc;
    if (in_place && m->weights_bf16) m->be->to_bf16(m->weights_bf16, m->weights, c->n); /* the gathered parts */
    if (!in_place && !staged) {
        k.to_flat = 0;
        k.at = 0;
        st_for_each_param_range(m, 0, c->n_pad, pack_range, &k);
    }
    c->comm_seconds += st_now() - t0 - optimizer;
    return 0;
}

int st_comm_sum(st_comm *c, double *x, int n) {
    if (c->world == 1 || n == 0) return 0;
    return mpi_check(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, c->comm), "scalar all-reduce", c->rank);
}

int st_comm_gather_state(st_comm *c, const float *part, float *full) {
    if (c->n_pad == 0) return 0;
    if (c->stage == 0) {
        c->be->copy(full, part, c->n_pad * sizeof(float));
        return 0;
    }
    int rc = coll_allgather(c, part, full);
    return rc ? rc : coll_finish(c);
}

/* ---------------- stage 3: parameters sharded (see comm.h) ---------------- */

/* Gives the memory behind x[a, b) back to the system; the range reads as zero afterwards. Whole pages go
 * with madvise(MADV_DONTNEED) (private anonymous memory comes back as zeros on the next touch); the partial
 * pages at either end are shared with neighbouring tensors, so only the range's own elements are zeroed. */
static void discard_bytes(void *x, size_t elem, size_t a, size_t b) { st_give_back(x, elem, a, b); }

static void discard(float *x, size_t a, size_t b) { discard_bytes(x, sizeof(float), a, b); }

void st_comm_discard(void *x, size_t elem, size_t a, size_t b) { discard_bytes(x, elem, a, b); }

/* The part of x[a, b) that is not this rank's shard. */
static void discard_unowned(const st_comm *c, float *x, size_t a, size_t b) {
    discard(x, a, b < c->lo ? b : c->lo);
    discard(x, a > c->hi ? a : c->hi, b);
}

/* Compact (gradient) range [a, b) of the trainable parameters among [first, last): contiguous, since the
 * compact space is the trainable parameters in registry order. Empty (a == b) when all are frozen. With
 * every parameter trainable it is also their weight range. */
static void param_span(const st_model *m, int first, int last, size_t *a, size_t *b) {
    *a = *b = 0;
    for (int i = first; i < last; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0) continue;
        if (*b == *a) *a = (size_t)p->grad_offset;
        *b = (size_t)p->grad_offset + p->numel;
    }
}

/* MPI counts and displacements of the owners' parts of [a, b), displacements relative to a. */
static void owner_counts(const st_comm *c, size_t a, size_t b, int *counts, int *displs) {
    size_t parts[c->world];
    bucket_parts(c, a, b - a, parts);
    for (int r = 0, off = 0; r < c->world; r++) {
        counts[r] = (int)parts[r];
        displs[r] = off;
        off += counts[r];
    }
}

/* Whether the compact space is the weight space (every parameter trains): gathers then go in place. */
static int z3_in_place(const st_comm *c) { return c->n == c->model->n_weights; }

/* Frozen parameters train nowhere: they stay whole and resident on every rank. Trainable ones are
 * reached through the compact space, a piece of a parameter at a time. */
static void discard_piece(void *ctx, const st_param *p, size_t start, size_t len) {
    const st_model *m = ctx;
    size_t w = p->offset + (start - (size_t)p->grad_offset);
    discard(m->weights, w, w + len);
}

static void pack_piece(void *ctx, const st_param *p, size_t start, size_t len) {
    st_comm *c = ctx;
    memcpy(c->z3_stage + (start - c->z3_stage_at), c->model->weights + p->offset + (start - (size_t)p->grad_offset),
           len * sizeof(float));
}

static void unpack_piece(void *ctx, const st_param *p, size_t start, size_t len) {
    st_comm *c = ctx;
    memcpy(c->model->weights + p->offset + (start - (size_t)p->grad_offset), c->z3_stage + (start - c->z3_stage_at),
           len * sizeof(float));
}

/* Gives back the weights of the compact range [a, b) outside this rank's shard. */
static void release_compact(st_comm *c, size_t a, size_t b) {
    if (z3_in_place(c)) {
        discard_unowned(c, c->model->weights, a, b);
        return;
    }
    st_for_each_param_range(c->model, a, b < c->lo ? b : c->lo, discard_piece, c->model);
    st_for_each_param_range(c->model, a > c->hi ? a : c->hi, b, discard_piece, c->model);
}

/* ---- the frozen space (see comm.h) ---- */

static long foff(const st_comm *c, int i) { return c->z3_foff ? c->z3_foff[i] : -1; }

/* MPI counts and displacements of the owners' parts of the frozen range [a, b), relative to a. */
static void frozen_counts(const st_comm *c, size_t a, size_t b, int *counts, int *displs) {
    for (int r = 0, off = 0; r < c->world; r++) {
        size_t lo = c->fshard * (size_t)r, hi = lo + c->fshard;
        size_t s = a > lo ? a : lo, e = b < hi ? b : hi;
        counts[r] = e > s ? (int)(e - s) : 0;
        displs[r] = off;
        off += counts[r];
    }
}

/* The frozen parameters of [first, last) as runs contiguous in both the frozen space and m->weights and
 * alike in storage: c->z3_runs[4k] frozen offset, [4k + 1] weight offset, [4k + 2] length, [4k + 3] 1 when
 * held in bf16 only (st_comm_drop_frozen_fp32: its values in m->weights_bf16). Returns the number of runs. */
static int frozen_runs(st_comm *c, int first, int last) {
    int nr = 0;
    size_t *r = c->z3_runs;
    for (int i = first; c->z3_foff && i < last; i++) {
        const st_param *p = &c->model->params[i];
        long f = foff(c, i);
        size_t w16 = (size_t)st_model_fp32_dropped(c->model, i);
        if (f < 0 || !p->numel) continue;
        if (nr && r[4 * nr - 4] + r[4 * nr - 2] == (size_t)f && r[4 * nr - 3] + r[4 * nr - 2] == p->offset &&
            r[4 * nr - 1] == w16) {
            r[4 * nr - 2] += p->numel;
            continue;
        }
        r[4 * nr] = (size_t)f;
        r[4 * nr + 1] = p->offset;
        r[4 * nr + 2] = p->numel;
        r[4 * nr + 3] = w16;
        nr++;
    }
    return nr;
}

/* Starts (reqs) or runs (reqs NULL) the in-place all-gathers of the frozen parameters of [first, last):
 * each owner's part is resident at its place, the collective fills in the rest. counts: [nr * 2 * world]
 * (kept until the requests complete). Returns 0 or the MPI failure; *nruns the requests started. */
static int gather_frozen(st_comm *c, int first, int last, MPI_Request *reqs, int *counts, int *nruns) {
    int nr = frozen_runs(c, first, last), rc = MPI_SUCCESS;
    *nruns = 0;
    for (int k = 0; k < nr && rc == MPI_SUCCESS; k++) {
        const size_t *run = c->z3_runs + 4 * k;
        int *cn = counts + (size_t)k * 2 * (size_t)c->world, *ds = cn + c->world;
        frozen_counts(c, run[0], run[0] + run[2], cn, ds);
        /* held in bf16 only: its bf16 values travel (half the bytes), into the compute copy the matmuls read */
        void *at = run[3] ? (void *)(c->model->weights_bf16 + run[1]) : (void *)(c->model->weights + run[1]);
        MPI_Datatype t = run[3] ? MPI_UINT16_T : MPI_FLOAT;
        if (reqs) {
            rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, t, at, cn, ds, t, c->comm, &reqs[k]);
            if (rc == MPI_SUCCESS) (*nruns)++;
        } else {
            rc = MPI_Allgatherv(MPI_IN_PLACE, 0, t, at, cn, ds, t, c->comm);
        }
    }
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 frozen parameter all-gather", c->rank);
}

/* Gives back the frozen weights of [first, last) outside this rank's part of the frozen space (of one held in
 * bf16 only: its bf16 copy's). */
static void release_frozen(st_comm *c, int first, int last) {
    for (int i = first; c->z3_foff && i < last; i++) {
        const st_param *p = &c->model->params[i];
        long f = foff(c, i);
        if (f < 0) continue;
        size_t a = (size_t)f, b = a + p->numel, w = p->offset;
        size_t e1 = b < c->flo ? b : c->flo, s2 = a > c->fhi ? a : c->fhi;
        void *x = c->model->weights;
        size_t elem = sizeof(float);
        if (st_model_fp32_dropped(c->model, i)) {
            x = c->model->weights_bf16;
            elem = sizeof(uint16_t);
        }
        if (e1 > a) discard_bytes(x, elem, w, w + (e1 - a));
        if (b > s2) discard_bytes(x, elem, w + (s2 - a), w + (b - a));
    }
}

/* ---- QLoRA's quantized bytes (comm.h: z3_qb) ---- */

/* Starts (req) or runs (req NULL) the in-place all-gather of the quantized bytes of [first, last); counts
 * [2 * world] as in frozen_counts. Returns 0 or the MPI failure; *started whether a request was started. */
static int gather_qlora(st_comm *c, int first, int last, MPI_Request *req, int *counts, int *started) {
    size_t a, b;
    *started = 0;
    st_qlora_span(c->model, first, last, &a, &b);
    if (!c->nq || b <= a || c->world == 1) return 0;
    int *ds = counts + c->world;
    for (int r = 0, off = 0; r < c->world; r++) {
        size_t lo = c->qshard * (size_t)r, hi = lo + c->qshard, s = a > lo ? a : lo, e = b < hi ? b : hi;
        counts[r] = e > s ? (int)(e - s) : 0;
        ds[r] = off;
        off += counts[r];
    }
    int rc = req ? MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_BYTE, c->z3_qb + a, counts, ds, MPI_BYTE, c->comm, req)
                 : MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_BYTE, c->z3_qb + a, counts, ds, MPI_BYTE, c->comm);
    *started = req && rc == MPI_SUCCESS;
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 quantized base all-gather", c->rank);
}

/* Gives back the quantized bytes of [first, last) outside this rank's part. */
static void release_qlora(st_comm *c, int first, int last) {
    size_t a, b;
    if (!c->nq) return;
    st_qlora_span(c->model, first, last, &a, &b);
    discard_bytes(c->z3_qb, 1, a, b < c->qlo ? b : c->qlo);
    discard_bytes(c->z3_qb, 1, a > c->qhi ? a : c->qhi, b);
}

/* All-gather of the compact range [a, b) through the staging buffer, a chunk at a time (frozen
 * parameters interleave with trainable ones in the weight space): the owner packs its part, the
 * collective fills the rest in place, every rank unpacks. */
static int gather_staged(st_comm *c, size_t a, size_t b) {
    for (size_t s = a; s < b; s += ST_Z3_CHUNK) {
        size_t e = b - s > ST_Z3_CHUNK ? s + ST_Z3_CHUNK : b;
        int counts[c->world], displs[c->world];
        owner_counts(c, s, e, counts, displs);
        c->z3_stage_at = s;
        size_t os = s > c->lo ? s : c->lo, oe = e < c->hi ? e : c->hi;
        if (os < oe) st_for_each_param_range(c->model, os, oe, pack_piece, c);
        int rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, c->z3_stage, counts, displs, MPI_FLOAT, c->comm);
        if (rc != MPI_SUCCESS) return mpi_check(rc, "stage-3 parameter all-gather", c->rank);
        st_for_each_param_range(c->model, s, e, unpack_piece, c);
    }
    return 0;
}

/* precision bf16 inside forward/backward with in-place gathers: the group's bf16 compute copy travels
 * instead of its fp32 weights (half the bytes), and the fp32 weights only of the parameters read in fp32
 * (norms, biases, embeddings: st_model_param_bf16_only). Values are those of a local to_bf16: each owner
 * rounds its own part. */
static int z3_bf16_gather(const st_comm *c) {
    return c->world > 1 && c->model->weights_bf16 && c->model->in_compute && z3_in_place(c);
}

/* Starts (req) or runs (req NULL) the in-place all-gather of the bf16 copy of [a, b), after rounding this
 * rank's own part. */
static int gather_bf16(st_comm *c, size_t a, size_t b, int *counts, int *displs, MPI_Request *req) {
    const st_model *m = c->model;
    size_t os = a > c->lo ? a : c->lo, oe = b < c->hi ? b : c->hi;
    if (os < oe) m->be->to_bf16(m->weights_bf16 + os, m->weights + os, oe - os);
    owner_counts(c, a, b, counts, displs);
    int rc = req ? MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_UINT16_T, m->weights_bf16 + a, counts, displs, MPI_UINT16_T,
                                   c->comm, req)
                 : MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_UINT16_T, m->weights_bf16 + a, counts, displs, MPI_UINT16_T,
                                  c->comm);
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 bf16 parameter all-gather", c->rank);
}

/* The fp32 weights of the parameters among [first, last) that forward/backward read in fp32, in place. */
static int gather_fp32_read(st_comm *c, int first, int last) {
    for (int i = first; i < last; i++) {
        const st_param *p = &c->model->params[i];
        if (p->grad_offset < 0 || st_model_param_bf16_only(c->model, i)) continue;
        int counts[c->world], displs[c->world];
        size_t a = (size_t)p->grad_offset;
        owner_counts(c, a, a + p->numel, counts, displs);
        int rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, c->model->weights + a, counts, displs, MPI_FLOAT, c->comm);
        if (rc != MPI_SUCCESS) return mpi_check(rc, "stage-3 parameter all-gather", c->rank);
    }
    return 0;
}

/* Waits for the prefetched gathers in flight (if any). Unless they are of the group [first, last) (the one
 * being acquired), their weights are given back again: its acquire never came. Returns what of the group
 * is now resident: 1 its trainable part, 2 its frozen part. */
static int prefetch_finish(st_comm *c, int first, int last) {
    if (!c->z3_pf_active) return 0;
    c->z3_pf_active = 0;
    int rc = c->z3_pf_train ? MPI_Wait(&c->z3_pf_req, MPI_STATUS_IGNORE) : MPI_SUCCESS;
    if (rc == MPI_SUCCESS && c->z3_pf_nruns) rc = MPI_Waitall(c->z3_pf_nruns, c->z3_pf_freqs, MPI_STATUSES_IGNORE);
    if (rc == MPI_SUCCESS && c->z3_pf_q) rc = MPI_Wait(&c->z3_pf_qreq, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS && !c->z3_rc) c->z3_rc = mpi_check(rc, "stage-3 parameter all-gather", c->rank);
    if (c->z3_pf_first == first && c->z3_pf_last == last)
        return (c->z3_pf_train ? 1 : 0) | (c->z3_pf_nruns ? 2 : 0) | (c->z3_pf_q ? 4 : 0);
    if (c->z3_pf_train) {
        release_compact(c, c->z3_pf_a, c->z3_pf_b);
        if (c->model->weights_bf16) discard_bytes(c->model->weights_bf16, sizeof(uint16_t), c->z3_pf_a, c->z3_pf_b);
    }
    release_frozen(c, c->z3_pf_first, c->z3_pf_last);
    release_qlora(c, c->z3_pf_first, c->z3_pf_last);
    return 0;
}

/* precision bf16: the compute copy of parameters [first, last) from their (now whole) fp32 weights, the
 * same rounding stage 0 does for the whole model (worker/model.c); release gives it back again. QLoRA's
 * quantized parameters have no weights to round (worker/qlora.h: the matmuls read their codes). */
static void bf16_copy(const st_model *m, int first, int last, int make) {
    for (int i = first; i < last; i++) {
        const st_param *p = &m->params[i];
        if (st_qlora_fused(m) && st_qlora_holds(m, i)) continue;
        if (st_model_fp32_dropped(m, i)) continue; /* its bf16 values were gathered; release_frozen gives them back */
        if (make)
            m->be->to_bf16(m->weights_bf16 + p->offset, m->weights + p->offset, p->numel);
        else
            discard_bytes(m->weights_bf16, sizeof(uint16_t), p->offset, p->offset + p->numel);
    }
}

static void z3_prof_acquire(st_comm *c, int first, double dt) {
    int layer = c->model->params[first].layer;
    c->z3_prof[first == 0 ? ST_Z3_ACQ_EMBED : layer >= 0 ? ST_Z3_ACQ_LAYER : ST_Z3_ACQ_HEAD] += dt;
}

void st_comm_zero3_profile(const st_comm *c, double out[ST_Z3_PROF_N]) {
    for (int k = 0; k < ST_Z3_PROF_N; k++) out[k] = c->z3_prof[k];
}

/* embed_rows hook (model.h): the rows of every rank's ids, assembled from their owners' parts. The ranks'
 * id counts (and whether each could allocate) are all-gathered, then their ids; each rank writes the
 * elements of those rows it keeps into a table of zeros (rows of all ranks, in rank order), and a
 * bitwise-OR reduce-scatter hands each rank its own rows: every element's bits come from its one owner,
 * exactly (an embedding kept whole gives the same bits from every rank). Moves the ranks' rows instead of
 * the vocabulary x d_model table; declined (0, by every rank alike) when those rows are not fewer than the
 * table's or a rank could not allocate: the forward then gathers the table. */
static int z3_embed_rows(void *ctx, const int32_t *ids, int n, float *out) {
    st_comm *c = ctx;
    const st_model *m = c->model;
    double t0 = st_now();
    size_t C = (size_t)m->cfg.d_model, e0 = m->params[0].offset, V = (size_t)m->cfg.vocab, a, b;
    int w = c->world, mine[2] = {n, 0}, got[2 * w], counts[w], displs[w], rcounts[w], total = 0, ok = 1;
    if (w == 1) return 0;
    int32_t *all = malloc((size_t)w * (size_t)n * sizeof *all + 1); /* resized below if a rank has more */
    mine[1] = all != NULL;
    int rc = MPI_Allgather(mine, 2, MPI_INT, got, 2, MPI_INT, c->comm);
    for (int r = 0; r < w; r++) {
        counts[r] = got[2 * r];
        displs[r] = total;
        total += counts[r];
        ok &= got[2 * r + 1];
    }
    uint32_t *tab = NULL;
    if (ok && (size_t)total < V) {
        int32_t *grown = realloc(all, (size_t)total * sizeof *all + 1);
        if (grown) all = grown;
        tab = grown ? calloc((size_t)total * C + 1, sizeof *tab) : NULL;
    }
    mine[0] = tab != NULL; /* every rank's table, or none uses the rows */
    if (rc == MPI_SUCCESS && ok && (size_t)total < V) rc = MPI_Allreduce(MPI_IN_PLACE, mine, 1, MPI_INT, MPI_MIN, c->comm);
    int use = rc == MPI_SUCCESS && ok && (size_t)total < V && mine[0];
    if (use) rc = MPI_Allgatherv(ids, n, MPI_INT32_T, all, counts, displs, MPI_INT32_T, c->comm);
    st_comm_param_keep(c, m, 0, &a, &b);
    for (int i = 0; use && rc == MPI_SUCCESS && i < total; i++) {
        if (all[i] < 0 || (size_t)all[i] >= V) continue; /* not a token (the forward does not read it) */
        size_t s = (size_t)all[i] * C, lo = s > a ? s : a, hi = s + C < b ? s + C : b;
        if (lo < hi && st_model_fp32_dropped(m, 0)) /* held in bf16 only: widened, the fp32 bits exactly */
            m->be->from_bf16((float *)(tab + (size_t)i * C + (lo - s)), m->weights_bf16 + e0 + lo, hi - lo);
        else if (lo < hi)
            memcpy(tab + (size_t)i * C + (lo - s), m->weights + e0 + lo, (hi - lo) * sizeof(float));
    }
    for (int r = 0; r < w; r++) rcounts[r] = counts[r] * (int)C;
    if (use && rc == MPI_SUCCESS) rc = MPI_Reduce_scatter(tab, out, rcounts, MPI_UINT32_T, MPI_BOR, c->comm);
    if (rc != MPI_SUCCESS && !c->z3_rc) c->z3_rc = mpi_check(rc, "stage-3 embedding rows", c->rank);
    free(all);
    free(tab);
    c->overlap_seconds += st_now() - t0;
    c->z3_prof[ST_Z3_ACQ_EMBED] += st_now() - t0;
    return use || rc != MPI_SUCCESS; /* a failed collective: reported by the step, the table not gathered */
}

/* Residency hook: every rank's part of the parameters' weights, in place (the owner's part is resident);
 * under bf16 then their compute copy. */
static void z3_acquire(void *ctx, int first, int last) {
    st_comm *c = ctx;
    double t0 = st_now();
    size_t a, b;
    param_span(c->model, first, last, &a, &b);
    int pf = prefetch_finish(c, first, last), done = pf & 1, n = 0;
    int rc = c->world > 1 && !(pf & 2) ? gather_frozen(c, first, last, NULL, c->z3_pf_fcounts, &n) : 0;
    if (!rc && !(pf & 4)) rc = gather_qlora(c, first, last, NULL, c->z3_pf_qcounts, &n); /* st_qlora_acquire next */
    if (rc && !c->z3_rc) c->z3_rc = rc;
    rc = 0;
    if (z3_bf16_gather(c) && b > a) {
        int counts[c->world], displs[c->world];
        if (!done) rc = gather_bf16(c, a, b, counts, displs, NULL);
        if (!rc) rc = gather_fp32_read(c, first, last);
        if (rc && !c->z3_rc) c->z3_rc = rc;
        c->overlap_seconds += st_now() - t0;
        z3_prof_acquire(c, first, st_now() - t0);
        return; /* the bf16 copy of every parameter of the group is here */
    }
    if (c->world > 1 && b > a && !done) { /* else frozen: resident everywhere; or prefetched */
        if (z3_in_place(c)) {
            int counts[c->world], displs[c->world];
            owner_counts(c, a, b, counts, displs);
            rc = MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, c->model->weights + a, counts, displs, MPI_FLOAT, c->comm);
            rc = rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 parameter all-gather", c->rank);
        } else {
            rc = gather_staged(c, a, b);
        }
    }
    if (rc && !c->z3_rc) c->z3_rc = rc;
    c->overlap_seconds += st_now() - t0;
    z3_prof_acquire(c, first, st_now() - t0);
    if (c->model->weights_bf16) bf16_copy(c->model, first, last, 1);
}

/* Prefetch hook: starts the in-place all-gather of [first, last) without waiting (the staged gathers of
 * a model with frozen parameters share one buffer: they stay blocking, in acquire). The range is
 * disjoint from the layer computing meanwhile, and release of that layer touches only its own elements
 * (whole pages inside it, the shared edge pages element by element). */
static void z3_prefetch(void *ctx, int first, int last) {
    st_comm *c = ctx;
    if (c->world == 1 || !c->z3_prefetch) return;
    size_t a, b;
    param_span(c->model, first, last, &a, &b);
    size_t qa, qb;
    st_qlora_span(c->model, first, last, &qa, &qb);
    int train = z3_in_place(c) && b > a;
    if (!train && !frozen_runs(c, first, last) && !(c->nq && qb > qa)) return;
    prefetch_finish(c, -1, -1); /* one in flight at a time (never reached in the model's order) */
    int *counts = c->z3_pf_counts, *displs = c->z3_pf_counts + c->world;
    int rc = 0;
    if (train && z3_bf16_gather(c)) { /* the bf16 copy; the few fp32 reads are gathered by the acquire */
        rc = gather_bf16(c, a, b, counts, displs, &c->z3_pf_req);
    } else if (train) {
        owner_counts(c, a, b, counts, displs);
        rc = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, c->model->weights + a, counts, displs, MPI_FLOAT, c->comm,
                             &c->z3_pf_req);
        rc = rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 parameter all-gather", c->rank);
    }
    c->z3_pf_train = train && !rc;
    c->z3_pf_nruns = 0;
    if (!rc) rc = gather_frozen(c, first, last, c->z3_pf_freqs, c->z3_pf_fcounts, &c->z3_pf_nruns);
    c->z3_pf_q = 0;
    if (!rc) rc = gather_qlora(c, first, last, &c->z3_pf_qreq, c->z3_pf_qcounts, &c->z3_pf_q);
    /* what was started is finished by the next acquire (or given back by prefetch_finish) */
    c->z3_pf_active = c->z3_pf_train || c->z3_pf_nruns || c->z3_pf_q;
    c->z3_pf_first = first;
    c->z3_pf_last = last;
    c->z3_pf_a = a;
    c->z3_pf_b = b;
    if (rc && !c->z3_rc) c->z3_rc = rc;
}

/* Progress hook (between matmuls): lets MPI move a prefetched gather on. */
static void z3_progress(void *ctx) {
    st_comm *c = ctx;
    int flag; /* done: a request is MPI_REQUEST_NULL, Wait returns */
    while (c->z3_rs_n && z3_rs_complete(c, 0)) { /* gradient chunks that have arrived: summed, pages back */
    }
    if (!c->z3_pf_active) return;
    if (c->z3_pf_train) MPI_Test(&c->z3_pf_req, &flag, MPI_STATUS_IGNORE);
    if (c->z3_pf_nruns) MPI_Testall(c->z3_pf_nruns, c->z3_pf_freqs, &flag, MPI_STATUSES_IGNORE);
    if (c->z3_pf_q) MPI_Test(&c->z3_pf_qreq, &flag, MPI_STATUS_IGNORE);
}

static void z3_release(void *ctx, int first, int last) {
    st_comm *c = ctx;
    if (c->model->weights_bf16) bf16_copy(c->model, first, last, 0);
    size_t a, b;
    param_span(c->model, first, last, &a, &b);
    release_compact(c, a, b);
    release_frozen(c, first, last);
    release_qlora(c, first, last);
}

/* Adds this rank's part of the reduce-scattered chunk starting at compact index a (in recv) to its
 * shard_grads (the micro-batches of a step accumulate there). */
static void z3_rs_add(st_comm *c, size_t a, size_t own, const float *recv) {
    float *dst = c->shard_grads + (a > c->lo ? a - c->lo : 0);
    for (size_t i = 0; i < own; i++) dst[i] += recv[i];
    sq_take(c, a > c->lo ? a : c->lo, (a > c->lo ? a : c->lo) + own); /* the last micro-batch's: final */
}

#define ST_Z3_RS_TAG 3003 /* the stage-3 gradient chunks' point-to-point messages (no other p2p on the comm) */

/* Floats of one slot's receive buffer: the other ranks' contributions to the own part of a chunk. */
/* What the chunks in flight may hold and receive together: an eighth of the shard, at least the one
 * blocking chunk's ST_Z3_CHUNK, at most ST_Z3_RS_SLOTS of them. */
static size_t z3_inflight_floats(size_t shard) {
    size_t b = shard / 8 > ST_Z3_CHUNK ? shard / 8 : ST_Z3_CHUNK;
    return b < ST_Z3_RS_SLOTS * ST_Z3_CHUNK ? b : ST_Z3_RS_SLOTS * ST_Z3_CHUNK;
}

static size_t z3_slot_floats(size_t shard, int world) {
    size_t w1 = world > 1 ? (size_t)world - 1 : 1, r = shard * w1, cap = z3_inflight_floats(shard) / ST_Z3_RS_SLOTS;
    return r < cap ? r : cap;
}

size_t st_comm_zero3_chunk_floats(size_t shard, int world) {
    size_t f = z3_inflight_floats(shard) / ST_Z3_RS_SLOTS / (size_t)(world > 2 ? world - 1 : 1);
    return f ? f : 1;
}

size_t st_comm_zero3_recv_floats(size_t shard, int world) {
    size_t one = shard < ST_Z3_CHUNK ? shard : ST_Z3_CHUNK; /* a blocking reduce-scatter's part */
    size_t slots = world > 1 ? ST_Z3_RS_SLOTS * z3_slot_floats(shard, world) : 0;
    return slots > one ? slots : one;
}

/* Finishes the oldest chunk in flight: waits for its sends and receives (wait 0: only if they are done
 * already; returns 1 when it finished), sums the own part's contributions in rank order (exactly the
 * reduce-scatter's sum on 2 ranks) into shard_grads, gives the chunk's gradient pages back. A failure is
 * kept in z3_rc (reported by st_comm_reduce_grads). */
static int z3_rs_complete(st_comm *c, int wait) {
    if (!c->z3_rs_n) return 0;
    int k = c->z3_rs_first, done = 1;
    st_z3_rs_slot *sl = &c->z3_rs[k];
    MPI_Request *req = c->z3_rs_reqs + (size_t)k * 2 * (size_t)c->world;
    int rc = !sl->nreq ? MPI_SUCCESS
             : wait    ? MPI_Waitall(sl->nreq, req, MPI_STATUSES_IGNORE)
                       : MPI_Testall(sl->nreq, req, &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS && !c->z3_rc) c->z3_rc = mpi_check(rc, "stage-3 gradient reduce-scatter", c->rank);
    if (!done && rc == MPI_SUCCESS) return 0;
    if (sl->own && rc == MPI_SUCCESS) { /* acc (the first receive) holds rank `init`'s part */
        const float *mine = c->model->grads + sl->own_a;
        float *acc = sl->recv;
        int init = c->rank == 0 ? 1 : 0;
        for (int r = 0; r < c->world; r++) {
            if (r == init) continue;
            const float *v = r == c->rank ? mine : sl->recv + (size_t)(r < c->rank ? r : r - 1) * sl->own;
            for (size_t i = 0; i < sl->own; i++) acc[i] += v[i];
        }
        z3_rs_add(c, sl->own_a, sl->own, acc);
    }
    discard(c->model->grads, sl->a, sl->b);
    c->z3_rs_first = (k + 1) % ST_Z3_RS_SLOTS;
    c->z3_rs_n--;
    return 1;
}

/* Finishes every chunk in flight. */
static int z3_rs_finish(st_comm *c) {
    while (c->z3_rs_n) z3_rs_complete(c, 1);
    return 0;
}

/* Starts the point-to-point reduce-scatter of grads[s, e) in a free slot (the oldest finished first when
 * none is free): this rank's contribution to each other owner's part goes to it, the other ranks'
 * contributions to this rank's part come into the slot. Same (rank, tag) pairs in the same order on every
 * rank: MPI's non-overtaking order matches them. */
static int z3_rs_start(st_comm *c, size_t s, size_t e) {
    if (c->z3_rs_n == ST_Z3_RS_SLOTS) z3_rs_complete(c, 1);
    int k = (c->z3_rs_first + c->z3_rs_n) % ST_Z3_RS_SLOTS, w = c->world;
    st_z3_rs_slot *sl = &c->z3_rs[k];
    MPI_Request *req = c->z3_rs_reqs + (size_t)k * 2 * (size_t)w;
    size_t parts[w];
    bucket_parts(c, s, e - s, parts);
    memset(sl, 0, sizeof *sl);
    sl->a = s;
    sl->b = e;
    sl->own = parts[c->rank];
    sl->own_a = s > c->lo ? s : c->lo;
    sl->recv = c->z3_recv + (size_t)k * z3_slot_floats(c->shard, w);
    int rc = MPI_SUCCESS;
    for (int r = 0, j = 0; r < w && rc == MPI_SUCCESS && sl->own; r++)
        if (r != c->rank)
            rc = MPI_Irecv(sl->recv + (size_t)j++ * sl->own, (int)sl->own, MPI_FLOAT, r, ST_Z3_RS_TAG, c->comm,
                           &req[sl->nreq++]);
    for (int r = 0; r < w && rc == MPI_SUCCESS; r++) {
        if (r == c->rank || !parts[r]) continue;
        size_t lo = c->shard * (size_t)r, from = s > lo ? s : lo;
        rc = MPI_Isend(c->model->grads + from, (int)parts[r], MPI_FLOAT, r, ST_Z3_RS_TAG, c->comm, &req[sl->nreq++]);
    }
    if (rc != MPI_SUCCESS) sl->nreq--; /* the failed call started nothing */
    c->z3_rs_n++;
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 gradient reduce-scatter", c->rank);
}

/* grad_ready hook: the finished gradients [lo, hi) are summed into their owners' shard_grads and their
 * pages given back. In chunks: MPI's reduce-scatter holds a temporary as large as its message, and the
 * receive buffers need no more than that. Armed with overlap (z3_async), each chunk travels point to point
 * (z3_rs_start, comm.h) while the next layers' backward computes; else each is a blocking
 * MPI_Reduce_scatter of ST_Z3_CHUNK floats. */
static void z3_grad_ready(void *ctx, size_t lo, size_t hi) {
    st_comm *c = ctx;
    float *grads = c->model->grads;
    double t0 = st_now();
    if (c->fresh) { /* the first reduction of a step: the last step's sums are spent (or its step was skipped) */
        if (!c->shard_zeroed) c->be->memset0(c->shard_grads, c->shard * sizeof(float));
        c->fresh = c->shard_zeroed = 0;
    }
    size_t chunk = c->z3_async ? st_comm_zero3_chunk_floats(c->shard, c->world) : ST_Z3_CHUNK;
    for (size_t s = lo; s < hi; s += chunk) {
        size_t e = hi - s > chunk ? s + chunk : hi;
        int rc = 0;
        if (c->z3_async) {
            rc = z3_rs_start(c, s, e);
        } else {
            int *counts = c->z3_rs_counts, displs[c->world];
            owner_counts(c, s, e, counts, displs);
            rc = MPI_Reduce_scatter(grads + s, c->z3_recv, counts, MPI_FLOAT, MPI_SUM, c->comm);
            if (rc == MPI_SUCCESS) z3_rs_add(c, s, (size_t)counts[c->rank], c->z3_recv);
            rc = rc == MPI_SUCCESS ? 0 : mpi_check(rc, "stage-3 gradient reduce-scatter", c->rank);
            discard(grads, s, e);
        }
        if (rc && !c->z3_rc) c->z3_rc = rc;
    }
    while (c->z3_rs_n && z3_rs_complete(c, 0)) { /* what has arrived meanwhile */
    }
    c->overlap_seconds += st_now() - t0;
    c->z3_prof[ST_Z3_GRAD] += st_now() - t0;
}

/* Lays out the frozen space (comm.h): every frozen parameter but QLoRA's quantized ones, registry order. */
static int frozen_space(st_comm *c, const st_model *m) {
    const char *env = getenv("SHARDTUNE_ZERO3_SHARD_FROZEN");
    if (env && strcmp(env, "0") == 0) return 0;
    size_t np = (size_t)m->n_params, w = (size_t)c->world;
    c->z3_foff = malloc(np * sizeof(long));
    c->z3_runs = malloc(4 * np * sizeof(size_t));
    c->z3_pf_freqs = malloc(np * sizeof(MPI_Request));
    c->z3_pf_fcounts = malloc(np * 2 * w * sizeof(int));
    if (!c->z3_foff || !c->z3_runs || !c->z3_pf_freqs || !c->z3_pf_fcounts)
        return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 frozen space", c->rank);
    c->nf = 0;
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        c->z3_foff[i] = p->grad_offset >= 0 || st_qlora_holds(m, i) ? -1 : (long)c->nf;
        if (c->z3_foff[i] >= 0) c->nf += p->numel;
    }
    c->fshard = (c->nf + w - 1) / w;
    c->flo = c->fshard * (size_t)c->rank;
    c->fhi = c->flo + c->fshard;
    st_qlora_blob(m, &c->z3_qb, &c->nq); /* QLoRA's quantized bytes: sharded the same way */
    c->qshard = (c->nq + w - 1) / w;
    c->qlo = c->qshard * (size_t)c->rank;
    c->qhi = c->qlo + c->qshard;
    c->z3_pf_qcounts = malloc(2 * w * sizeof(int));
    if (!c->z3_pf_qcounts) return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 frozen space", c->rank);
    return 0;
}

/* The bf16 compute copy given back (made per acquire), but this rank's part of a frozen parameter held in
 * bf16 only (st_comm_drop_frozen_fp32): its one value. After a re-shard those parts are cut from the whole
 * tensors the old communicator gathered (st_comm_reshard_optim). */
static void discard_bf16(st_model *m) {
    size_t lo = 0;
    for (int i = 0; i < m->n_params; i++) {
        if (!st_model_fp32_dropped(m, i)) continue;
        discard_bytes(m->weights_bf16, sizeof(uint16_t), lo, m->params[i].offset);
        lo = m->params[i].offset + m->params[i].numel;
    }
    discard_bytes(m->weights_bf16, sizeof(uint16_t), lo, m->n_weights); /* the parts' edges: release_frozen's */
}

static int z3_init(st_comm *c, const st_model *cm) {
    st_model *m = (st_model *)cm; /* the communicator installs its hooks on the model it serves */
    if (on_device(m)) { /* worker/comm_zero3_dev.c; NCCL as for the other stages */
        if (!st_z3dev_supported(m)) return st_z3dev_init(c, m); /* the refusal naming the cause */
        const char *one = getenv("SHARDTUNE_NCCL_ONE_RANK");
        int rc = c->world > 1 || (one && !strcmp(one, "1")) ? nccl_setup(c) : 0;
        return rc ? rc : st_z3dev_init(c, m);
    }
    if (c->shard) {
        c->shard_grads = c->be->alloc(c->shard * sizeof(float));
        c->z3_recv = c->be->alloc(st_comm_zero3_recv_floats(c->shard, c->world) * sizeof(float));
        if (!c->shard_grads || !c->z3_recv) return st_fail(ST_ENOMEM, "rank %d: out of memory for the gradient shard", c->rank);
    }
    if (c->n != m->n_weights && c->n) { /* frozen parameters: gathers go through a staging buffer */
        c->z3_stage = malloc((c->n_pad < ST_Z3_CHUNK ? c->n_pad : ST_Z3_CHUNK) * sizeof(float));
        if (!c->z3_stage) return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 gather buffer", c->rank);
    }
    const char *pf = getenv("SHARDTUNE_ZERO3_PREFETCH");
    c->z3_prefetch = !(pf && strcmp(pf, "0") == 0);
    c->z3_pf_counts = malloc(2 * (size_t)c->world * sizeof(int));
    c->z3_rs_counts = malloc((size_t)c->world * sizeof(int));
    c->z3_rs_reqs = malloc(ST_Z3_RS_SLOTS * 2 * (size_t)c->world * sizeof(MPI_Request));
    if (!c->z3_pf_counts || !c->z3_rs_counts || !c->z3_rs_reqs) return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 prefetch", c->rank);
    int rc = frozen_space(c, m);
    if (rc) return rc;
    c->model = m;
    const char *er = getenv("SHARDTUNE_ZERO3_EMBED_ROWS"); /* 0: gather the whole table (bench, tests) */
    st_residency_hooks h = {z3_acquire, z3_release, z3_prefetch, z3_progress,
                            er && strcmp(er, "0") == 0 ? NULL : z3_embed_rows, z3_grad_ready, c, NULL, 0};
    st_model_set_residency(m, &h);
    release_compact(c, 0, c->n);
    release_frozen(c, 0, m->n_params);
    release_qlora(c, 0, m->n_params);
    if (m->grads) discard(m->grads, 0, m->grad_alloc);
    if (m->weights_bf16) discard_bf16(m); /* made per acquire */
    return 0;
}

void st_comm_weights_loaded(st_comm *c, st_model *m) {
    if (c->stage != 3 || c->model != m || c->z3dev) return; /* a device rank holds its parts only */
    release_compact(c, 0, c->n);
    release_frozen(c, 0, m->n_params);
}


/* ---- frozen parts held in bf16 only (comm.h st_comm_drop_frozen_fp32) ---- */

size_t st_comm_drop_frozen_fp32(st_comm *c, st_model *m) {
    if (c->z3dev && c->model == m) return st_z3dev_hold_bf16(c); /* on a device: worker/comm_zero3_dev.c */
    if (c->stage != 3 || c->z3dev || c->model != m || !c->z3_foff) return 0;
    int np = m->n_params, any = 0;
    unsigned char ok[np + 1];
    for (int i = 0; i < np; i++) {
        size_t a, b;
        st_comm_param_keep(c, m, i, &a, &b);
        ok[i] = !st_model_fp32_dropped(m, i) && c->z3_foff[i] >= 0 && st_model_bf16_only_candidate(m, i) &&
                st_model_bf16_exact(m->weights + m->params[i].offset + a, b - a);
        any |= ok[i];
    }
    /* the ranks agree: held so only where every rank's part is bf16 values (a bf16 source; not a tensor
     * trained earlier and frozen since) and every rank could make the flags */
    if (any && st_model_set_fp32_dropped(m, 0, st_model_fp32_dropped(m, 0))) memset(ok, 0, (size_t)np);
    int rc = np ? MPI_Allreduce(MPI_IN_PLACE, ok, np, MPI_UNSIGNED_CHAR, MPI_MIN, c->comm) : MPI_SUCCESS;
    size_t n = 0;
    for (int i = 0; i < np; i++) {
        const st_param *p = &m->params[i];
        size_t a, b;
        st_comm_param_keep(c, m, i, &a, &b);
        if (rc == MPI_SUCCESS && ok[i]) { /* this rank's part rounded (exactly), its fp32 pages back */
            m->be->to_bf16(m->weights_bf16 + p->offset + a, m->weights + p->offset + a, b - a);
            discard(m->weights, p->offset + a, p->offset + b);
            st_model_set_fp32_dropped(m, i, 1);
        }
        if (st_model_fp32_dropped(m, i)) n += b - a;
    }
    return n;
}

void st_comm_restore_fp32(st_comm *c, st_model *m) {
    for (int i = 0; c->stage == 3 && c->model == m && i < m->n_params; i++) {
        if (!st_model_fp32_dropped(m, i)) continue;
        const st_param *p = &m->params[i];
        size_t a, b;
        st_comm_param_keep(c, m, i, &a, &b);
        m->be->from_bf16(m->weights + p->offset + a, m->weights_bf16 + p->offset + a, b - a);
        discard_bytes(m->weights_bf16, sizeof(uint16_t), p->offset + a, p->offset + b);
        st_model_set_fp32_dropped(m, i, 0);
    }
}

/* ---------------- streaming load and final weights (stage 3 keeps parts) ---------------- */

/* Parameter i's offset in its sharded space and that space's range kept by this rank; 0 when whole. */
static int param_space(const st_comm *c, const st_model *m, int i, size_t *g, size_t *lo, size_t *hi) {
    const st_param *p = &m->params[i];
    if (c->stage != 3) return 0;
    if (p->grad_offset >= 0) {
        *g = (size_t)p->grad_offset, *lo = c->lo, *hi = c->hi;
        return 1;
    }
    if (c->z3_foff && c->z3_foff[i] >= 0) {
        *g = (size_t)c->z3_foff[i], *lo = c->flo, *hi = c->fhi;
        return 1;
    }
    return 0;
}

int st_comm_param_sharded(const st_comm *c, const st_model *m, int i) {
    size_t g, lo, hi;
    return param_space(c, m, i, &g, &lo, &hi);
}

uint8_t *st_comm_qlora_part(const st_comm *c, size_t *a, size_t *b) {
    if (c->z3dev) return st_z3dev_qshard(c, a, b);
    *a = *b = 0;
    if (c->stage != 3 || !c->z3_foff || !c->z3_qb) return NULL;
    *a = c->qlo < c->nq ? c->qlo : c->nq;
    *b = c->qhi < c->nq ? c->qhi : c->nq;
    return c->z3_qb + *a;
}

void st_comm_param_keep(const st_comm *c, const st_model *m, int i, size_t *a, size_t *b) {
    const st_param *p = &m->params[i];
    size_t g, lo, hi;
    *a = 0;
    *b = p->numel;
    if (!param_space(c, m, i, &g, &lo, &hi)) return; /* whole on every rank */
    size_t s = g > lo ? g : lo, e = g + p->numel < hi ? g + p->numel : hi;
    if (e <= s) { *a = *b = 0; return; }
    *a = s - g;
    *b = e - g;
}

/* st_comm_gather_param of a frozen parameter held in bf16 only (host memory): the parts travel as bf16 into
 * the upper half of recv's bytes, then are widened in place upwards (element k's 4 bytes end at or below
 * where element k + 1's 2 bytes start: each is read before anything overwrites it). Frees scratch. */
static int gather_param_bf16(st_comm *c, const st_model *m, int i, float *recv, int *counts, int *displs, size_t a,
                             size_t b, int root, float *scratch) {
    size_t n = m->params[i].numel;
    uint16_t *half = recv ? (uint16_t *)recv + n : NULL;
    int rc = MPI_Gatherv(m->weights_bf16 + m->params[i].offset + a, (int)(b - a), MPI_UINT16_T, half, counts, displs,
                         MPI_UINT16_T, root, c->comm);
    if (rc == MPI_SUCCESS && c->rank == root && recv)
        for (size_t k = 0; k < n; k++) {
            uint32_t u = (uint32_t)half[k] << 16;
            memcpy(recv + k, &u, sizeof u);
        }
    free(scratch);
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "gathering a parameter for the final weights", c->rank);
}

int st_comm_gather_param(st_comm *c, const st_model *m, int i, float *dst, int root) {
    const st_param *p = &m->params[i];
    size_t g, lo, hi, a, b;
    if (!param_space(c, m, i, &g, &lo, &hi) || c->world == 1) { /* whole on the root already (a device rank's
                                                                  * frozen parts: through part_base) */
        if (c->rank == root && dst) m->be->copy_to_host(dst, st_model_part(m, i), p->numel * sizeof(float));
        return 0;
    }
    int counts[c->world], displs[c->world];
    if (p->grad_offset >= 0) owner_counts(c, g, g + p->numel, counts, displs);
    else frozen_counts(c, g, g + p->numel, counts, displs);
    st_comm_param_keep(c, m, i, &a, &b);
    /* a root without a buffer (its write failed) still takes part: it receives into a bounded scratch */
    float *recv = dst, *scratch = NULL;
    if (c->rank == root && !dst) {
        scratch = malloc((p->numel ? p->numel : 1) * sizeof(float));
        if (!scratch) for (int r = 0; r < c->world; r++) counts[r] = displs[r] = 0; /* nothing lands: no hang */
        recv = scratch;
    }
    if (st_model_fp32_dropped(m, i)) return gather_param_bf16(c, m, i, recv, counts, displs, a, b, root, scratch);
    const float *part = c->z3dev ? NULL : st_model_part(m, i) + a;
    float *host = NULL; /* device memory: MPI is not CUDA-aware, the part goes through the host */
    if (on_device(m) && b > a) {
        host = malloc((b - a) * sizeof(float));
        if (host && c->z3dev) st_z3dev_part_fp32(c, i, a, b - a, host, 1); /* held in bf16 only: widened */
        else if (host) m->be->copy_to_host(host, part, (b - a) * sizeof(float));
        else for (int r = 0; r < c->world; r++) counts[r] = displs[r] = 0; /* nobody waits for a part: no hang */
        part = host;
    }
    int rc = MPI_Gatherv(part, b > a && part ? (int)(b - a) : 0, MPI_FLOAT, recv, counts, displs,
                         MPI_FLOAT, root, c->comm);
    free(scratch);
    free(host);
    return rc == MPI_SUCCESS ? 0 : mpi_check(rc, "gathering a parameter for the final weights", c->rank);
}

/* ---------------- a frozen model sharded over the weight space (the distillation teacher) ---------------- */

/* Weight range [a, b) of parameters [first, last): contiguous (registry order is offset order). */
static void weight_span(const st_model *m, int first, int last, size_t *a, size_t *b) {
    *a = m->params[first].offset;
    *b = m->params[last - 1].offset + m->params[last - 1].numel;
}

/* Elements [a, b) of base (elements of type t, `elem` bytes), of which rank r keeps [r * shard, (r + 1) *
 * shard), all-gathered in place. */
static void frozen_gather(st_frozen_shard *s, void *base, size_t elem, MPI_Datatype t, size_t shard, size_t a,
                          size_t b) {
    if (b <= a) return;
    int counts[s->world], displs[s->world];
    for (int r = 0, off = 0; r < s->world; r++) {
        size_t lo = shard * (size_t)r, hi = lo + shard;
        size_t x = a > lo ? a : lo, y = b < hi ? b : hi;
        counts[r] = y > x ? (int)(y - x) : 0;
        displs[r] = off;
        off += counts[r];
    }
    int rc = MPI_Allgatherv(MPI_IN_PLACE, 0, t, (char *)base + a * elem, counts, displs, t, s->comm);
    if (rc != MPI_SUCCESS && !s->rc) s->rc = mpi_check(rc, "the sharded teacher's all-gather", s->rank);
}

/* The int8 teacher (st_model_int8_packs == 2): the fp32 weights of [a, b) that are not quantized (norms,
 * biases, embeddings, a tied head), then the packs of the quantized ones (1/4 of their fp32 bytes). */
static void frozen_gather_int8(st_frozen_shard *s, const st_model *m, size_t a, size_t b, uint8_t *space,
                               size_t pa, size_t pb, size_t total) {
    size_t x = a, lo, hi;
    for (int k = 0; st_model_int8_range(m, k, &lo, &hi) && lo < b; k++) { /* weight order */
        if (hi <= x) continue;
        if (lo > x) frozen_gather(s, m->weights, sizeof(float), MPI_FLOAT, s->shard, x, lo);
        x = hi;
    }
    if (x < b) frozen_gather(s, m->weights, sizeof(float), MPI_FLOAT, s->shard, x, b);
    frozen_gather(s, space, 1, MPI_BYTE, (total + (size_t)s->world - 1) / (size_t)s->world, pa, pb);
}

static void frozen_acquire(void *ctx, int first, int last) {
    st_frozen_shard *s = ctx;
    const st_model *m = s->model;
    size_t a, b, pa, pb, total;
    uint8_t *space;
    weight_span(m, first, last, &a, &b);
    if (s->world > 1 && b > a) {
        if (st_model_int8_packs(m, a, b, &space, &pa, &pb, &total) == 2)
            frozen_gather_int8(s, m, a, b, space, pa, pb, total);
        else
            frozen_gather(s, m->weights, sizeof(float), MPI_FLOAT, s->shard, a, b);
    }
    if (m->weights_bf16 && b > a) m->be->to_bf16(m->weights_bf16 + a, m->weights + a, b - a);
}

static void frozen_release(void *ctx, int first, int last) {
    st_frozen_shard *s = ctx;
    const st_model *m = s->model;
    size_t a, b, pa, pb, total;
    uint8_t *space;
    weight_span(m, first, last, &a, &b);
    if (m->weights_bf16) discard_bytes(m->weights_bf16, sizeof(uint16_t), a, b);
    if (s->world == 1) return;
    discard(m->weights, a, b < s->lo ? b : s->lo);
    discard(m->weights, a > s->hi ? a : s->hi, b);
    if (st_model_int8_packs(m, a, b, &space, &pa, &pb, &total)) { /* the packs: this rank's share stays */
        size_t ps = (total + (size_t)s->world - 1) / (size_t)s->world, plo = ps * (size_t)s->rank, phi = plo + ps;
        discard_bytes(space, 1, pa, pb < plo ? pb : plo);
        discard_bytes(space, 1, pa > phi ? pa : phi, pb);
    }
}

int st_frozen_shard_init(st_frozen_shard *s, MPI_Comm comm, st_model *m) {
    memset(s, 0, sizeof *s);
    if (on_device(m))
        return st_fail(ST_ECONFIG, "a sharded frozen model (distill.teacher at sharding.stage 3) needs CPU ranks, "
                                   "not the %s backend", m->be->name);
    if (m->acquire) return st_fail(ST_EINVAL, "the model already has residency hooks");
    for (int i = 1; i < m->n_params; i++)
        if (m->params[i].offset != m->params[i - 1].offset + m->params[i - 1].numel)
            return st_fail(ST_EINVAL, "a sharded frozen model needs its weights in registry order");
    s->comm = comm;
    MPI_Comm_rank(comm, &s->rank);
    MPI_Comm_size(comm, &s->world);
    s->shard = (m->n_weights + (size_t)s->world - 1) / (size_t)s->world;
    s->lo = s->shard * (size_t)s->rank;
    s->hi = s->lo + s->shard;
    s->model = m;
    st_residency_hooks h = {.acquire = frozen_acquire, .release = frozen_release, .ctx = s};
    st_model_set_residency(m, &h);
    m->residency_int8 = 1; /* the hooks gather int8 packs too (distill.teacher_dtype: int8) */
    if (s->world > 1) {
        discard(m->weights, 0, s->lo < m->n_weights ? s->lo : m->n_weights);
        if (s->hi < m->n_weights) discard(m->weights, s->hi, m->n_weights);
    }
    if (m->weights_bf16) discard_bytes(m->weights_bf16, sizeof(uint16_t), 0, m->n_weights);
    return 0;
}

void st_frozen_shard_keep(const st_frozen_shard *s, const st_model *m, int i, size_t *a, size_t *b) {
    const st_param *p = &m->params[i];
    size_t x = p->offset > s->lo ? p->offset : s->lo, y = p->offset + p->numel < s->hi ? p->offset + p->numel : s->hi;
    if (y <= x) { *a = *b = 0; return; }
    *a = x - p->offset;
    *b = y - p->offset;
}

void st_frozen_shard_free(st_frozen_shard *s) {
    if (s->model && s->model->residency_ctx == s) st_model_set_residency(s->model, NULL), s->model->residency_int8 = 0;
    s->model = NULL;
}
