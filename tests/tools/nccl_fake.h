/* nccl_fake.h — a fake NCCL (kernels/cuda/nccl_comm.h) with stream-order checks, for the tools that run
 * worker/comm.c's device path on the CPU (tests/tools/nccl_fake.c, tests/tools/fakedev.c). Included by exactly
 * one file of a tool: it defines the st_nccl_* functions (so the library's real or stub ones are never
 * pulled in) and static helpers. The model of the two streams: a collective is only ENQUEUED (its input
 * snapshotted) and runs, through MPI, when st_nccl_wait_compute / st_nccl_synchronize is called (or, for
 * the collectives queued before an st_nccl_record mark, st_nccl_wait_event: later ones stay queued); its input
 * must then still equal the snapshot (compute wrote it after the hand-over: a race on a GPU), and
 * check_read() reports compute reading a queued collective's output. `violations` counts what was found.
 * Dropped waits (the checks must then report a violation): NCCL_FAKE_DROP_WAIT=K (or drop_wait) the K-th
 * st_nccl_wait_compute, NCCL_FAKE_DROP_EVENT=K (or drop_event) the K-th st_nccl_wait_event (device stage 2-3's
 * waits for one reduction's or gather's mark); event_waits counts the latter. Overlap: compute_ran() (the
 * tools' matmuls call it) marks every queued reduction as having travelled beside compute;
 * reductions_overlapped / reductions_run count them when they run. st_nccl_send_recv runs as MPI point to point at
 * its queue position (its input: the span of its sends, its output: the span of its receives); a send whose size
 * differs from its peer's receive is a violation; p2p_recv_bytes counts what it delivered. */
#ifndef ST_NCCL_FAKE_H
#define ST_NCCL_FAKE_H

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cuda/nccl_comm.h"

static int violations;
/* > 0: the drop_wait-th st_nccl_wait_compute from now returns without making the compute stream wait (a
 * stream wait removed from the code under test: the checks must then report a violation). Also set by
 * NCCL_FAKE_DROP_WAIT=K when the communicator is made. */
static int drop_wait;
static int drop_event;   /* the same for st_nccl_wait_event (NCCL_FAKE_DROP_EVENT=K) */
static long event_waits; /* st_nccl_wait_event calls so far (dropped ones included) */
static long reductions_run, reductions_overlapped; /* reductions (OP_REDUCE_PARTS) run; of them, queued while compute ran */
static size_t p2p_recv_bytes; /* bytes this rank received from other ranks through st_nccl_send_recv (OP_P2P) */
static void violation(const char *what) {
    violations++;
    fprintf(stderr, "stream order violated: %s\n", what);
}

/* ---------------------------------------------------------------- the fake NCCL */

typedef enum {
    OP_ALL_REDUCE, OP_REDUCE_SCATTER, OP_REDUCE_PARTS, OP_ALL_GATHER, OP_GATHER_PARTS, OP_GATHER_PARTS16, OP_P2P
} op_kind;

typedef struct {
    op_kind kind;
    const float *in;  /* what the comm stream reads */
    size_t in_n;
    float *snapshot;  /* its contents at enqueue */
    float *out;       /* what it writes */
    size_t out_n;
    size_t elem;      /* bytes of an element: 4 (fp32), 2 (OP_GATHER_PARTS16: bf16) */
    int *counts;      /* OP_REDUCE_PARTS, OP_GATHER_PARTS: per-rank parts (then their offsets) */
    st_nccl_span *spans; /* OP_P2P: per-rank sends (offsets into in), then receives (into out) */
    int overlapped;   /* compute ran while it was queued (compute_ran) */
} pending_op;

struct st_nccl_comm {
    int rank, world;
    pending_op ops[4096];
    int n_ops;
    long enqueued, ran;             /* collectives queued / run so far (the comm stream's position) */
    long marks[ST_NCCL_EVENTS];     /* st_nccl_record: `enqueued` at the mark */
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
    const char *drop = getenv("NCCL_FAKE_DROP_WAIT");
    if (drop && atoi(drop) > 0) drop_wait = atoi(drop);
    const char *drop_ev = getenv("NCCL_FAKE_DROP_EVENT");
    if (drop_ev && atoi(drop_ev) > 0) drop_event = atoi(drop_ev);
    *out = the_comm = c;
    return 0;
}

static int enqueue(st_nccl_comm *c, op_kind kind, const float *in, size_t in_n, float *out, size_t out_n) {
    if (c->n_ops == (int)(sizeof c->ops / sizeof c->ops[0])) return st_fail(ST_ECOMM, "fake NCCL: queue full");
    pending_op *op = &c->ops[c->n_ops++];
    c->enqueued++;
    memset(op, 0, sizeof *op);
    size_t elem = kind == OP_GATHER_PARTS16 ? sizeof(uint16_t) : sizeof(float);
    op->kind = kind, op->in = in, op->in_n = in_n, op->out = out, op->out_n = out_n, op->elem = elem;
    op->snapshot = malloc((in_n ? in_n : 1) * elem);
    memcpy(op->snapshot, in, in_n * elem);
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

int st_nccl_all_gather_parts_bf16(st_nccl_comm *c, uint16_t *buf, const size_t *parts) {
    return enqueue_parts(c, OP_GATHER_PARTS16, (const float *)buf, (float *)buf, 1, parts); /* elements: 2 bytes */
}

/* The op reads the span of send covering every send to another rank and writes the span of recv covering every
 * receive (the stream-order checks' input and output); its spans keep offsets relative to those. */
int st_nccl_send_recv(st_nccl_comm *c, const float *send, const st_nccl_span *to, float *recv,
                      const st_nccl_span *from) {
    size_t slo = SIZE_MAX, shi = 0, rlo = SIZE_MAX, rhi = 0;
    for (int r = 0; r < c->world; r++) {
        if (r == c->rank) continue; /* the caller's own overlap: a local copy */
        if (to[r].n) slo = to[r].off < slo ? to[r].off : slo, shi = to[r].off + to[r].n > shi ? to[r].off + to[r].n : shi;
        if (from[r].n)
            rlo = from[r].off < rlo ? from[r].off : rlo, rhi = from[r].off + from[r].n > rhi ? from[r].off + from[r].n : rhi;
    }
    if (slo > shi) slo = shi = 0;
    if (rlo > rhi) rlo = rhi = 0;
    int rc = enqueue(c, OP_P2P, send + slo, shi - slo, recv + rlo, rhi - rlo);
    if (rc) return rc;
    st_nccl_span *sp = malloc(2 * (size_t)c->world * sizeof *sp);
    for (int r = 0; r < c->world; r++) {
        int other = r != c->rank;
        sp[r] = (st_nccl_span){other && to[r].n ? to[r].off - slo : 0, other ? to[r].n : 0};
        sp[c->world + r] = (st_nccl_span){other && from[r].n ? from[r].off - rlo : 0, other ? from[r].n : 0};
    }
    c->ops[c->n_ops - 1].spans = sp;
    return 0;
}

int st_nccl_all_gather(st_nccl_comm *c, float *recv, const float *send, size_t send_n) {
    return send_n ? enqueue(c, OP_ALL_GATHER, send, send_n, recv, send_n * (size_t)c->world) : 0;
}

static long ops_run; /* collectives that went through this fake NCCL */
/* Whether comm.c's device path must use NCCL: several ranks, or one with SHARDTUNE_NCCL_ONE_RANK=1. */
/* The comm stream runs the first n queued collectives, in order (the rest stay queued). */
static int run_first(st_nccl_comm *c, int n) {
    for (int i = 0; i < n; i++) {
        pending_op *op = &c->ops[i];
        ops_run++;
        if (op->kind == OP_REDUCE_PARTS) reductions_run++, reductions_overlapped += op->overlapped;
        if (memcmp(op->in, op->snapshot, op->in_n * op->elem) != 0)
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
        case OP_GATHER_PARTS16: {
            const int *counts = op->counts, *displs = op->counts + c->world;
            const uint16_t *in16 = (const uint16_t *)op->snapshot;
            MPI_Allgatherv(in16 + displs[c->rank], counts[c->rank], MPI_UINT16_T, op->out, counts, displs,
                           MPI_UINT16_T, MPI_COMM_WORLD);
            break;
        }
        case OP_ALL_GATHER:
            MPI_Allgather(op->snapshot, (int)op->in_n, MPI_FLOAT, op->out, (int)op->in_n, MPI_FLOAT, MPI_COMM_WORLD);
            break;
        case OP_P2P: { /* every rank runs its send/recv at the same queue position: matched by peer, in order */
            MPI_Request reqs[2 * c->world];
            MPI_Status st[2 * c->world];
            float *tmp[c->world];
            int nr = 0, got;
            const st_nccl_span *to = op->spans, *from = op->spans + c->world;
            for (int r = 0; r < c->world; r++) { /* receives first, each with a float to spare: a longer send */
                tmp[r] = from[r].n ? malloc((from[r].n + 1) * sizeof(float)) : NULL; /* is seen, not cut */
                if (tmp[r]) MPI_Irecv(tmp[r], (int)from[r].n + 1, MPI_FLOAT, r, 17, MPI_COMM_WORLD, &reqs[nr++]);
            }
            for (int r = 0; r < c->world; r++)
                if (to[r].n)
                    MPI_Isend(op->snapshot + to[r].off, (int)to[r].n, MPI_FLOAT, r, 17, MPI_COMM_WORLD, &reqs[nr++]);
            MPI_Waitall(nr, reqs, st);
            for (int r = 0, k = 0; r < c->world; r++) {
                if (!tmp[r]) continue;
                MPI_Get_count(&st[k++], MPI_FLOAT, &got);
                p2p_recv_bytes += (size_t)got * sizeof(float);
                if ((size_t)got != from[r].n) violation("send/recv: a send and its peer's receive differ in size");
                memcpy(op->out + from[r].off, tmp[r], (got < (int)from[r].n ? (size_t)got : from[r].n) * sizeof(float));
                free(tmp[r]);
            }
            break;
        }
        }
        free(op->snapshot);
        free(op->counts);
        free(op->spans);
    }
    memmove(c->ops, c->ops + n, (size_t)(c->n_ops - n) * sizeof c->ops[0]);
    c->n_ops -= n;
    c->ran += n;
    return 0;
}

/* The comm stream runs everything queued, in order. */
static int run_pending(st_nccl_comm *c) { return run_first(c, c->n_ops); }

int st_nccl_record(st_nccl_comm *c, int ev) {
    if (ev < 0 || ev >= ST_NCCL_EVENTS) return st_fail(ST_EINVAL, "fake NCCL: no event %d", ev);
    c->marks[ev] = c->enqueued;
    return 0;
}

/* The compute stream waits for the collectives queued before the mark: they run now, later ones stay. */
int st_nccl_wait_event(st_nccl_comm *c, int ev) {
    if (ev < 0 || ev >= ST_NCCL_EVENTS) return st_fail(ST_EINVAL, "fake NCCL: no event %d", ev);
    event_waits++;
    if (drop_event > 0 && --drop_event == 0) return 0; /* the removed wait: what is queued stays queued */
    long n = c->marks[ev] - c->ran;
    return n > 0 ? run_first(c, (int)n) : 0;
}

int st_nccl_wait_compute(st_nccl_comm *c) {
    if (drop_wait > 0 && --drop_wait == 0) return 0; /* the removed wait: what is queued stays queued */
    return run_pending(c);
}
int st_nccl_synchronize(st_nccl_comm *c) { return run_pending(c); }
int st_nccl_rank(const st_nccl_comm *c) { return c->rank; }
int st_nccl_world(const st_nccl_comm *c) { return c->world; }
void st_nccl_destroy(st_nccl_comm *c) {
    if (c && c->n_ops) violation("communicator destroyed with collectives still queued");
    if (c == the_comm) the_comm = NULL;
    free(c);
}


/* Compute (a matmul) runs now: every queued reduction travels beside it. Returns whether one was queued. */
static int compute_ran(void) {
    int any = 0;
    for (int i = 0; the_comm && i < the_comm->n_ops; i++)
        if (the_comm->ops[i].kind == OP_REDUCE_PARTS) the_comm->ops[i].overlapped = any = 1;
    return any;
}

/* Compute reading [p, p + bytes) while a queued collective will still write there is a race. */
static void check_read(const void *p, size_t bytes, const char *who) {
    if (!the_comm || !bytes) return;
    const char *a = p, *b = a + bytes;
    for (int i = 0; i < the_comm->n_ops; i++) {
        const char *lo = (const char *)the_comm->ops[i].out, *hi = lo + the_comm->ops[i].out_n * the_comm->ops[i].elem;
        if (a < hi && lo < b) {
            char msg[160];
            snprintf(msg, sizeof msg, "%s read the output of a queued collective before the compute stream waited for it", who);
            violation(msg);
            return;
        }
    }
}


#endif
