/* nccl_fake.c — runs worker/comm.c's device (NCCL) code path on the CPU, with stream semantics checked.
 *
 *   mpirun -np W nccl_fake --stage S [--steps N] [--accum A] [--bucket-kb K] [--no-overlap] [--inject-race]
 *
 * No GPU exists here, so the NCCL path of comm.c (bucketed overlap, reduce-scatter into shards, the
 * parameter all-gather, and the waits before the compute stream touches their results) would only ever
 * be compiled. This tool links its own implementation of kernels/cuda/nccl_comm.h in place of the real
 * one (the static library's nccl_comm.o is then never pulled in) and a "device" backend that is the CPU
 * backend with host_memory 0 (so comm.c takes its device path). The fake models the two streams:
 *  - a collective is only ENQUEUED: it snapshots its input (what the comm stream reads once it has waited
 *    for the compute work queued so far) and runs later, when comm.c calls st_nccl_wait_compute or
 *    st_nccl_synchronize (MPI does the arithmetic then, in enqueue order on every rank);
 *  - when it runs, its input must still equal the snapshot: compute that wrote it after the enqueue would
 *    be a race on a GPU (the bucket was handed over before its gradients were final, or zeroed early);
 *  - compute that READS a pending collective's output (the optimizer, the grad norm, a copy) before the
 *    wait is a race too.
 * Any violation is printed ("stream order violated: ...") and the exit status is 1. The same training
 * steps also run through the MPI path (the CPU backend itself); both must give the same losses (within
 * 1e-6 relative). --inject-race scales the gradients between backward and the reduction on purpose: the
 * checker must then report a violation (the test requires that, so the checker itself can fail).
 * On the MPI path at stage 2 (several ranks) the model's full-size gradient buffer must read all zero after
 * every backward (every bucket reduce-scattered into the shard during it, its pages given back).
 * Last, the sharded AdamW moments are gathered on every rank as at a progressive stage change
 * (st_comm_gather_state: through the fake NCCL on the device path) and must agree with the MPI path.
 * Prints one line per step and path: "step K path P loss L". Runs in any build: comm.c's NCCL path has
 * no #ifdef, and this file's st_nccl_* replace the real ones (CUDA) or the failing stubs (no CUDA).
 * On one rank with SHARDTUNE_NCCL_ONE_RANK=1 the device path runs through the (fake) one-rank NCCL. */
#include <stdio.h>
#include <stdlib.h>

#include <math.h>
#include <mpi.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cuda/nccl_comm.h"
#include "kernels/kernels.h"
#include "worker/comm.h"
#include "worker/model.h"
#include "worker/optim.h"

static int violations;
static void violation(const char *what) {
    violations++;
    fprintf(stderr, "stream order violated: %s\n", what);
}

/* ---------------------------------------------------------------- the fake NCCL */

typedef enum { OP_ALL_REDUCE, OP_REDUCE_SCATTER, OP_REDUCE_PARTS, OP_ALL_GATHER, OP_GATHER_PARTS } op_kind;

typedef struct {
    op_kind kind;
    const float *in;  /* what the comm stream reads */
    size_t in_n;
    float *snapshot;  /* its contents at enqueue */
    float *out;       /* what it writes */
    size_t out_n;
    int *counts;      /* OP_REDUCE_PARTS, OP_GATHER_PARTS: per-rank parts (then their offsets) */
} pending_op;

struct st_nccl_comm {
    int rank, world;
    pending_op ops[4096];
    int n_ops;
};
static st_nccl_comm *the_comm; /* one per process, as in the trainer */

int st_nccl_get_unique_id(unsigned char id_out[ST_NCCL_ID_BYTES]) {
    memset(id_out, 7, ST_NCCL_ID_BYTES);
    return 0;
}

int st_nccl_init(st_nccl_comm **out, int rank, int world, const unsigned char id[ST_NCCL_ID_BYTES]) {
    if (id[0] != 7) return st_fail(ST_ECOMM, "fake NCCL: the id was not broadcast");
    st_nccl_comm *c = calloc(1, sizeof *c);
    c->rank = rank;
    c->world = world;
    *out = the_comm = c;
    return 0;
}

static int enqueue(st_nccl_comm *c, op_kind kind, const float *in, size_t in_n, float *out, size_t out_n) {
    if (c->n_ops == (int)(sizeof c->ops / sizeof c->ops[0])) return st_fail(ST_ECOMM, "fake NCCL: queue full");
    pending_op *op = &c->ops[c->n_ops++];
    memset(op, 0, sizeof *op);
    op->kind = kind, op->in = in, op->in_n = in_n, op->out = out, op->out_n = out_n;
    op->snapshot = malloc((in_n ? in_n : 1) * sizeof(float));
    memcpy(op->snapshot, in, in_n * sizeof(float));
    return 0;
}

int st_nccl_all_reduce_sum(st_nccl_comm *c, float *buf, size_t n) {
    return n ? enqueue(c, OP_ALL_REDUCE, buf, n, buf, n) : 0;
}

int st_nccl_reduce_scatter_sum(st_nccl_comm *c, float *recv, const float *send, size_t recv_n) {
    return recv_n ? enqueue(c, OP_REDUCE_SCATTER, send, recv_n * (size_t)c->world, recv, recv_n) : 0;
}

/* Enqueues a collective over consecutive per-rank parts (its output: this rank's part, or all of them);
 * its op keeps MPI's counts, then displacements. */
static int enqueue_parts(st_nccl_comm *c, op_kind kind, const float *in, float *out, int out_all,
                         const size_t *parts) {
    size_t total = 0;
    for (int r = 0; r < c->world; r++) total += parts[r];
    int rc = enqueue(c, kind, in, total, out, out_all ? total : parts[c->rank]);
    if (rc) return rc;
    int *counts = malloc(2 * (size_t)c->world * sizeof *counts);
    for (int r = 0, off = 0; r < c->world; r++) {
        counts[r] = (int)parts[r];
        counts[c->world + r] = off;
        off += counts[r];
    }
    c->ops[c->n_ops - 1].counts = counts;
    return 0;
}

int st_nccl_reduce_parts_sum(st_nccl_comm *c, float *recv, const float *send, const size_t *parts) {
    return enqueue_parts(c, OP_REDUCE_PARTS, send, recv, 0, parts);
}

int st_nccl_all_gather_parts(st_nccl_comm *c, float *buf, const size_t *parts) {
    return enqueue_parts(c, OP_GATHER_PARTS, buf, buf, 1, parts);
}

int st_nccl_all_gather(st_nccl_comm *c, float *recv, const float *send, size_t send_n) {
    return send_n ? enqueue(c, OP_ALL_GATHER, send, send_n, recv, send_n * (size_t)c->world) : 0;
}

static long ops_run; /* collectives that went through this fake NCCL */
/* Whether comm.c's device path must use NCCL: several ranks, or one with SHARDTUNE_NCCL_ONE_RANK=1. */
static int nccl_expected(void) {
    const char *one = getenv("SHARDTUNE_NCCL_ONE_RANK");
    int w = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &w);
    return w > 1 || (one && !strcmp(one, "1"));
}

/* The comm stream runs everything queued, in order. */
static int run_pending(st_nccl_comm *c) {
    for (int i = 0; i < c->n_ops; i++) {
        pending_op *op = &c->ops[i];
        ops_run++;
        if (memcmp(op->in, op->snapshot, op->in_n * sizeof(float)) != 0)
            violation("compute wrote a collective's input after it was enqueued (bucket not final yet?)");
        switch (op->kind) {
        case OP_ALL_REDUCE:
            MPI_Allreduce(op->snapshot, op->out, (int)op->in_n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            break;
        case OP_REDUCE_SCATTER:
            MPI_Reduce_scatter_block(op->snapshot, op->out, (int)op->out_n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            break;
        case OP_REDUCE_PARTS:
            MPI_Reduce_scatter(op->snapshot, op->out, op->counts, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            break;
        case OP_GATHER_PARTS: {
            const int *counts = op->counts, *displs = op->counts + c->world;
            MPI_Allgatherv(op->snapshot + displs[c->rank], counts[c->rank], MPI_FLOAT, op->out, counts, displs,
                           MPI_FLOAT, MPI_COMM_WORLD);
            break;
        }
        case OP_ALL_GATHER:
            MPI_Allgather(op->snapshot, (int)op->in_n, MPI_FLOAT, op->out, (int)op->in_n, MPI_FLOAT, MPI_COMM_WORLD);
            break;
        }
        free(op->snapshot);
        free(op->counts);
    }
    c->n_ops = 0;
    return 0;
}

int st_nccl_wait_compute(st_nccl_comm *c) { return run_pending(c); }
int st_nccl_synchronize(st_nccl_comm *c) { return run_pending(c); }
int st_nccl_rank(const st_nccl_comm *c) { return c->rank; }
int st_nccl_world(const st_nccl_comm *c) { return c->world; }
void st_nccl_destroy(st_nccl_comm *c) {
    if (c && c->n_ops) violation("communicator destroyed with collectives still queued");
    if (c == the_comm) the_comm = NULL;
    free(c);
}

/* ---------------------------------------------------------------- the "device" backend */

static st_backend dev;
static const st_backend *cpu;

/* Compute reading [p, p + bytes) while a queued collective will still write there is a race. */
static void check_read(const void *p, size_t bytes, const char *who) {
    if (!the_comm || !bytes) return;
    const char *a = p, *b = a + bytes;
    for (int i = 0; i < the_comm->n_ops; i++) {
        const char *lo = (const char *)the_comm->ops[i].out, *hi = lo + the_comm->ops[i].out_n * sizeof(float);
        if (a < hi && lo < b) {
            char msg[160];
            snprintf(msg, sizeof msg, "%s read the output of a queued collective before the compute stream waited for it", who);
            violation(msg);
            return;
        }
    }
}

static double dev_sumsq(const float *x, size_t n) {
    check_read(x, n * sizeof(float), "sumsq (gradient norm)");
    return cpu->sumsq(x, n);
}
static void dev_copy(void *dst, const void *src, size_t bytes) {
    check_read(src, bytes, "copy");
    cpu->copy(dst, src, bytes);
}
static void dev_adamw_multi(const st_adamw_range *r, int count, float b1, float b2, float eps, float gs) {
    for (int i = 0; i < count; i++) check_read(r[i].grad, r[i].n * sizeof(float), "adamw_multi (optimizer)");
    cpu->adamw_multi(r, count, b1, b2, eps, gs);
}

/* ---------------------------------------------------------------- training steps */

typedef struct {
    int stage, steps, accum, overlap, inject_race;
    size_t bucket_bytes;
} options;

static void build_model(st_model *m, const st_backend *be, int world) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = ST_FAMILY_LLAMA;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.n_layer = 3, c.d_model = 48, c.n_head = 4, c.n_kv_head = 2, c.head_dim = 12, c.d_ff = 96, c.vocab = 97;
    c.max_seq = 16, c.norm_eps = 1e-5f, c.rope_theta = 10000.0f, c.bos_id = c.eos_id = -1;
    unsigned char layers[3] = {1, 1, 1};
    if (st_model_build(m, &c, be) || st_model_init_random(m, 5) || (m->grad_align = world, 0) ||
        st_model_set_trainable(m, layers, ST_MOD_ALL) || st_model_alloc_activations(m, 2, 16)) {
        fprintf(stderr, "nccl_fake: %s\n", st_error());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
}

/* The trainer's step sequence (coordinator/trainer/train_step.c) on `be`; returns the losses, then (as a stage
 * change does) gathers the sharded AdamW first moments on every rank and returns their sum of squares. */
static void train(const st_backend *be, const options *o, double *losses, double *moments) {
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    st_model m;
    build_model(&m, be, world);
    st_comm comm;
    st_optim opt;
    st_optim_config oc = {3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, ST_SCHED_CONSTANT, 0, 0, 0.0f, 1.0f};
    size_t lo, hi;
    if (st_comm_init(&comm, MPI_COMM_WORLD, &(st_comm_options){.stage = o->stage, .bucket_bytes = o->bucket_bytes}, &m))
        goto fail;
    st_comm_optim_range(&comm, &lo, &hi);
    if (st_optim_init(&opt, &oc, lo, hi, &m, be)) goto fail;
    int N = 2 * 16;
    int32_t in[32], tg[32];
    float w[32];
    for (int step = 0; step < o->steps; step++) {
        st_model_zero_grad(&m);
        double loss = 0;
        for (int a = 0; a < o->accum; a++) {
            int sample = (step * world + rank) * o->accum + a; /* each rank its own data */
            for (int i = 0; i < N; i++) {
                in[i] = (sample * 31 + i * 7) % 97;
                tg[i] = (sample * 13 + i * 5 + 1) % 97;
                w[i] = 1.0f / (float)(N * world * o->accum);
            }
            loss += st_model_forward(&m, in, tg, w, 1);
            st_comm_backward_begin(&comm, &m, o->overlap, a == o->accum - 1);
            st_model_backward(&m);
            if (st_comm_backward_end(&comm, &m)) goto fail;
            /* ZeRO-2 on host memory (the MPI path, several ranks): each bucket was reduce-scattered into
             * the shard and its gradient pages given back, so the full-size buffer holds nothing */
            if (comm.s2_release && !o->inject_race)
                for (size_t i = 0; i < m.grad_alloc; i++)
                    if (m.grads[i] != 0.0f) {
                        violation("stage 2: gradients left in the full-size buffer after backward");
                        break;
                    }
        }
        if (o->inject_race) /* writes grads that are being reduced (host memory: the fake device is the CPU) */
            for (size_t i = 0; i < m.n_grads; i++) m.grads[i] *= 0.5f;
        float *g = NULL;
        if (st_comm_reduce_grads(&comm, &m, &g)) goto fail;
        double norm = sqrt(st_comm_grad_sumsq(&comm, &m, g));
        if (st_comm_update_params(&comm, &m, &opt, g, 3e-3f, st_clip_scale(norm, 1.0f))) goto fail;
        if (the_comm && the_comm->n_ops) violation("collectives still queued at the end of a step");
        MPI_Allreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        losses[step] = loss;
    }
    float *full = be->alloc(comm.n_pad * sizeof(float));
    if (!full || st_comm_gather_state(&comm, opt.m, full)) goto fail;
    if (the_comm && the_comm->n_ops) violation("optimizer-state all-gather still queued after it returned");
    *moments = be->sumsq(full, comm.n_pad);
    be->free(full);
    st_optim_free(&opt, be);
    free(opt.param_step);
    st_comm_free(&comm);
    st_model_free(&m);
    return;
fail:
    fprintf(stderr, "nccl_fake: rank %d: %s\n", rank, st_error());
    MPI_Abort(MPI_COMM_WORLD, 2);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    options o = {1, 4, 2, 1, 0, 8 * 1024};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stage") && i + 1 < argc) o.stage = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) o.steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--accum") && i + 1 < argc) o.accum = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--bucket-kb") && i + 1 < argc) o.bucket_bytes = (size_t)atoi(argv[++i]) * 1024;
        else if (!strcmp(argv[i], "--inject-race")) o.inject_race = 1;
        else if (!strcmp(argv[i], "--no-overlap")) o.overlap = 0;
        else { fprintf(stderr, "nccl_fake: unknown argument %s\n", argv[i]); MPI_Abort(MPI_COMM_WORLD, 2); }
    }
    if (o.steps < 1 || o.steps > 64 || o.accum < 1) { fprintf(stderr, "nccl_fake: bad --steps/--accum\n"); return 2; }
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    cpu = st_backend_cpu(1);
    dev = *cpu;
    dev.name = "fake-gpu";
    dev.host_memory = 0; /* worker/comm.c takes its device (NCCL) path */
    dev.sumsq = dev_sumsq;
    dev.copy = dev_copy;
    dev.adamw_multi = dev_adamw_multi;
    double via_nccl[64], via_mpi[64], m_nccl = 0, m_mpi = 0;
    train(&dev, &o, via_nccl, &m_nccl);
    train(cpu, &o, via_mpi, &m_mpi);
    int total = 0;
    MPI_Allreduce(&violations, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    double worst = fabs(m_nccl - m_mpi) / fmax(m_mpi, 1e-30); /* gathered moments, as in a stage change */
    for (int s = 0; s < o.steps; s++) {
        worst = fmax(worst, fabs(via_nccl[s] - via_mpi[s]) / fabs(via_mpi[s]));
        if (rank == 0) printf("step %d path nccl loss %.9g path mpi loss %.9g\n", s, via_nccl[s], via_mpi[s]);
    }
    if (rank == 0)
        printf("stage %d: %d stream-order violation(s); max relative loss / gathered-moment difference nccl vs mpi "
               "path %.3g (moments sumsq %.6g vs %.6g); %ld collectives through the fake NCCL\n", o.stage, total,
               worst, m_nccl, m_mpi, ops_run);
    int missing = ops_run == 0 && nccl_expected(); /* the device path must have used NCCL */
    if (missing) fprintf(stderr, "nccl_fake: the device path never used NCCL\n");
    MPI_Finalize();
    if (missing) return 4;
    return total ? 1 : worst <= 1e-6 ? 0 : 3;
}

