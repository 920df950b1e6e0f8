/* nccl_fake.c — runs worker/comm.c's device (NCCL) code path on the CPU, with stream semantics checked.
 *
 *   mpirun -np W nccl_fake --stage S [--steps N] [--accum A] [--bucket-kb K] [--no-overlap] [--inject-race] [--bf16]
 *                          [--drop-each-wait]
 *   mpirun -np W nccl_fake --p2p-self-test
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
 * 1e-6 relative). --inject-race scales the gradients between backward and the reduction on purpose (stage 2
 * on the device path, which reduces during backward: drops the 3rd wait for a mark, drop_event): the checker must
 * then report a violation (the test requires that, so the checker itself can fail). Stage 2's device path
 * is worker/comm_zero2_dev.c: no full-size gradient buffer (checked), a layer's bucket reduced per group.
 * On the MPI path at stage 2 (several ranks) the model's full-size gradient buffer must read all zero after
 * every backward (every bucket reduce-scattered into the shard during it, its pages given back).
 * Last, the sharded AdamW moments are gathered on every rank as at a progressive stage change
 * (st_comm_gather_state: through the fake NCCL on the device path) and must agree with the MPI path.
 * The step's FLOP count (st_model_step_flops, MFU) must be the same on both paths (a device ZeRO-2/3 model
 * finds its gradients through residency windows, which hold no layer between steps).
 * Prints one line per step and path: "step K path P loss L". Runs in any build: comm.c's NCCL path has
 * no #ifdef, and this file's st_nccl_* replace the real ones (CUDA) or the failing stubs (no CUDA).
 * On one rank with SHARDTUNE_NCCL_ONE_RANK=1 the device path runs through the (fake) one-rank NCCL.
 * Stage 2's device path keeps each layer's in-place reduce-scatter in flight while the next layer's backward
 * writes the other bucket: with overlap on several ranks more than one reduction per micro-batch must have
 * travelled beside a matmul (the fake's reductions_overlapped), none with --no-overlap. --drop-each-wait runs
 * the device path again once per wait for a comm-stream mark it made, that wait dropped (NCCL_FAKE_DROP_EVENT's
 * drop_event): each run must report a violation.
 * Stage 3: the device path is worker/comm_zero3_dev.c (gather slots, per-group reduce-scatter in flight while
 * the next layer's backward computes), the MPI path the CPU ranks' stage 3; --bf16 runs both under mixed
 * precision; SHARDTUNE_ZERO3_DEV_FAULT removes one of its waits (the checker must then fail: matmul and
 * to_bf16 check their operands, bias_add its received sums). The fake NCCL itself: nccl_fake.h; --p2p-self-test
 * checks its point to point (st_nccl_send_recv: values, untouched gaps, bytes counted, a late write and a size
 * mismatch reported). */
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
#include "tests/tools/nccl_fake.h"

/* Whether comm.c's device path must use NCCL: several ranks, or one with SHARDTUNE_NCCL_ONE_RANK=1. */
static int nccl_expected(void) {
    const char *one = getenv("SHARDTUNE_NCCL_ONE_RANK");
    int w = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &w);
    return w > 1 || (one && !strcmp(one, "1"));
}

/* ---------------------------------------------------------------- the "device" backend */

static st_backend dev;
static const st_backend *cpu;

static double dev_sumsq(const float *x, size_t n) {
    check_read(x, n * sizeof(float), "sumsq (gradient norm)");
    return cpu->sumsq(x, n);
}
static void dev_copy(void *dst, const void *src, size_t bytes) {
    check_read(src, bytes, "copy");
    cpu->copy(dst, src, bytes);
}
static void dev_bias_add(float *y, const float *bias, int n, int c) { /* stages 2-3 add the received sums with it */
    check_read(bias, (size_t)c * sizeof(float), "bias_add (stage 2-3 gradient sum)");
    cpu->bias_add(y, bias, n, c);
}
/* a weight or activation operand still being written by a queued collective (stage 3: a gather the acquire
 * did not wait for) is a race */
static long overlapped_mm; /* matmuls that ran while a gradient reduce-scatter was still queued */
static void count_overlap(void) { overlapped_mm += compute_ran(); }
static void dev_matmul_bf16(float *c, st_mm_in a, st_mm_in b, const float *bias, int m, int n, int k, int ta, int tb,
                            float alpha, float beta, float *scratch) {
    count_overlap();
    if (k > 0) {
        check_read(a.f32 ? (const void *)a.f32 : (const void *)a.bf16, (size_t)m * k * (a.f32 ? 4 : 2), "matmul_bf16");
        check_read(b.f32 ? (const void *)b.f32 : (const void *)b.bf16, (size_t)k * n * (b.f32 ? 4 : 2), "matmul_bf16");
    }
    cpu->matmul_bf16(c, a, b, bias, m, n, k, ta, tb, alpha, beta, scratch);
}
static void dev_matmul(float *c, const float *a, const float *b, int m, int n, int k, int ta, int tb, float alpha,
                       float beta) {
    count_overlap();
    if (k > 0) {
        check_read(a, (size_t)m * k * sizeof(float), "matmul");
        check_read(b, (size_t)k * n * sizeof(float), "matmul");
    }
    cpu->matmul(c, a, b, m, n, k, ta, tb, alpha, beta);
}
static void dev_to_bf16(uint16_t *dst, const float *src, size_t n) { /* stage 3 rounds a gathered group */
    check_read(src, n * sizeof(float), "to_bf16");
    cpu->to_bf16(dst, src, n);
}
static void dev_adamw_multi(const st_adamw_range *r, int count, float b1, float b2, float eps, float gs) {
    for (int i = 0; i < count; i++) check_read(r[i].grad, r[i].n * sizeof(float), "adamw_multi (optimizer)");
    cpu->adamw_multi(r, count, b1, b2, eps, gs);
}

/* ---------------------------------------------------------------- training steps */

typedef struct {
    int stage, steps, accum, overlap, inject_race, bf16, drop_each;
    size_t bucket_bytes;
    long drop_event; /* > 0: the device path's drop_event-th st_nccl_wait_event is dropped */
} options;

static void build_model(st_model *m, const st_backend *be, int world, int bf16) {
    st_model_config c;
    memset(&c, 0, sizeof c);
    c.family = ST_FAMILY_LLAMA;
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.n_layer = 3, c.d_model = 48, c.n_head = 4, c.n_kv_head = 2, c.head_dim = 12, c.d_ff = 96, c.vocab = 97;
    c.max_seq = 16, c.norm_eps = 1e-5f, c.rope_theta = 10000.0f, c.bos_id = c.eos_id = -1;
    unsigned char layers[3] = {1, 1, 1};
    if (st_model_build(m, &c, be) || st_model_init_random(m, 5) || (m->grad_align = world, 0) ||
        st_model_set_trainable(m, layers, ST_MOD_ALL) || st_model_alloc_activations(m, 2, 16) ||
        (bf16 && st_model_set_precision(m, ST_PRECISION_BF16))) {
        fprintf(stderr, "nccl_fake: %s\n", st_error());
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
}

/* The trainer's step sequence (coordinator/trainer/train_step.c) on `be`; returns the losses, then (as a stage
 * change does) gathers the sharded AdamW first moments on every rank and returns their sum of squares. */
static void train(const st_backend *be, const options *o, double *losses, double *moments, double *flops) {
    int rank, world;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    st_model m;
    build_model(&m, be, world, o->bf16);
    st_comm comm;
    st_optim opt;
    st_optim_config oc = {3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, ST_SCHED_CONSTANT, 0, 0, 0.0f, 1.0f};
    size_t lo, hi;
    if (st_comm_init(&comm, MPI_COMM_WORLD, &(st_comm_options){.stage = o->stage, .bucket_bytes = o->bucket_bytes}, &m))
        goto fail;
    st_comm_optim_range(&comm, &lo, &hi);
    if (st_optim_init(&opt, &oc, lo, hi, &m, be)) goto fail;
    /* stage 2 on a device: no full-size gradient buffer (worker/comm_zero2_dev.c), gradients in windows */
    /* the FLOPs a step performs (MFU) do not depend on where the gradients live (device windows) */
    *flops = st_model_step_flops(&m, 1);
    int z2dev = o->stage == 2 && !be->host_memory;
    if (z2dev && (!comm.z2dev || !m.grads_windowed)) violation("stage 2 on a device kept the full gradient buffer");
    /* one stream wait removed (the 3rd wait for a reduction's mark): the checks must catch it */
    if (z2dev && o->inject_race) drop_event = 3;
    if (!be->host_memory && o->drop_event > 0) drop_event = (int)o->drop_event;
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
        if (o->inject_race && !z2dev) /* writes grads being reduced (host memory: the fake device is the CPU) */
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

/* --drop-each-wait: the device path once as it is (no violation, K waits for a comm-stream mark counted),
 * then K more times with the k-th of those waits dropped (drop_event): every run must report a violation,
 * so no wait made is redundant and none may go missing. 0: all caught; 1: the plain run had violations; 6:
 * no such wait was made; 7: a dropped wait went unnoticed. */
static int drop_each(options *o) {
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    double losses[64], mom, fl;
    long before = event_waits;
    train(&dev, o, losses, &mom, &fl);
    long n = event_waits - before, lo = n, hi = n;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_LONG, MPI_MAX, MPI_COMM_WORLD);
    int clean = 0;
    MPI_Allreduce(&violations, &clean, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (lo != hi) {
        if (rank == 0) fprintf(stderr, "nccl_fake: the ranks made %ld to %ld waits for a mark\n", lo, hi);
        return 1;
    }
    int missed = 0;
    for (long k = 1; k <= n && !clean; k++) {
        violations = 0;
        o->drop_event = k;
        train(&dev, o, losses, &mom, &fl);
        drop_event = 0;
        int total = 0;
        MPI_Allreduce(&violations, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
        if (rank == 0) printf("wait %ld of %ld for a comm-stream mark dropped: %d violation(s)%s\n", k, n, total,
                              total ? "" : ": NOT caught");
        missed += total == 0;
    }
    if (rank == 0)
        printf("stage %d: %ld waits for a comm-stream mark, each dropped in turn: %ld caught, %d missed%s\n", o->stage,
               n, clean ? 0 : n - missed, missed, clean ? " (the plain run had violations)" : "");
    return clean ? 1 : n == 0 ? 6 : missed ? 7 : 0;
}

/* --p2p-self-test: the fake's st_nccl_send_recv itself. Rank i sends rank r (i + 2r + 1) floats valued
 * 1000 i + 100 r + j from a packed send buffer into an unpacked receive buffer (its own entries set, to be
 * ignored); every value and every untouched float must be as expected, p2p_recv_bytes the sum of the receives,
 * no violation. Then the stream-order check: a send buffer written after the enqueue, and a send one float longer
 * than its peer's receive, must each be a violation. 0: all held. */
static int p2p_self_test(void) {
    int me, w;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &w);
    st_nccl_comm *c;
    unsigned char id[ST_NCCL_ID_BYTES];
    st_nccl_get_unique_id(id);
    st_nccl_init(&c, me, w, id);
    st_nccl_span to[w], from[w];
    float send[256], recv[512];
    size_t so = 0, ro = 3, want = 0;
    for (int r = 0; r < w; r++) {
        to[r] = (st_nccl_span){so, (size_t)(me + 2 * r + 1)};
        from[r] = (st_nccl_span){ro, (size_t)(r + 2 * me + 1)};
        for (size_t j = 0; j < to[r].n; j++) send[so + j] = (float)(1000 * me + 100 * r + (int)j);
        so += to[r].n, ro += from[r].n + 2; /* gaps between the receives stay untouched */
        want += r != me ? from[r].n * sizeof(float) : 0;
    }
    for (int i = 0; i < 512; i++) recv[i] = -1.0f;
    int bad = st_nccl_send_recv(c, send, to, recv, from) || st_nccl_wait_compute(c);
    for (int r = 0; r < w; r++)
        for (size_t j = 0; j < from[r].n; j++)
            bad |= recv[from[r].off + j] != (r == me ? -1.0f : (float)(1000 * r + 100 * me + (int)j));
    for (int i = 0, r = 0; i < 512; i++) { /* outside every receive: untouched */
        while (r < w && (size_t)i >= from[r].off + from[r].n) r++;
        if (r == w || (size_t)i < from[r].off) bad |= recv[i] != -1.0f;
    }
    bad |= p2p_recv_bytes != want || violations != 0;
    int before = violations;
    st_nccl_send_recv(c, send, to, recv, from);
    send[to[(me + 1) % w].off] += 1.0f; /* written after the hand-over */
    st_nccl_synchronize(c);
    int caught_write = w == 1 || violations > before;
    before = violations;
    for (int r = 0; r < w; r++) to[r].n += r != me; /* one float more than the peer receives */
    st_nccl_send_recv(c, send, to, recv, from);
    st_nccl_synchronize(c);
    int caught_size = w == 1 || violations > before;
    st_nccl_destroy(c);
    int ok = !bad && caught_write && caught_size, all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!ok) fprintf(stderr, "nccl_fake: rank %d: send/recv self-test: values/bytes %s, late write %s, size mismatch %s\n",
                     me, bad ? "WRONG" : "ok", caught_write ? "caught" : "NOT caught", caught_size ? "caught" : "NOT caught");
    if (me == 0 && all) printf("nccl_fake: send/recv self-test on %d ranks: OK\n", w);
    return all ? 0 : 1;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (argc == 2 && !strcmp(argv[1], "--p2p-self-test")) {
        int rc = p2p_self_test();
        MPI_Finalize();
        return rc;
    }
    options o = {1, 4, 2, 1, 0, 0, 0, 8 * 1024, 0};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--stage") && i + 1 < argc) o.stage = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) o.steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--accum") && i + 1 < argc) o.accum = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--bucket-kb") && i + 1 < argc) o.bucket_bytes = (size_t)atoi(argv[++i]) * 1024;
        else if (!strcmp(argv[i], "--inject-race")) o.inject_race = 1;
        else if (!strcmp(argv[i], "--no-overlap")) o.overlap = 0;
        else if (!strcmp(argv[i], "--bf16")) o.bf16 = 1;
        else if (!strcmp(argv[i], "--drop-each-wait")) o.drop_each = 1;
        else { fprintf(stderr, "nccl_fake: unknown argument %s\n", argv[i]); MPI_Abort(MPI_COMM_WORLD, 2); }
    }
    if (o.inject_race && o.stage == 3) { /* it writes m->grads, which a device stage-3 model does not have */
        fprintf(stderr, "nccl_fake: --inject-race is for stages 0-2\n");
        return 2;
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
    dev.bias_add = dev_bias_add;
    dev.matmul = dev_matmul;
    dev.matmul_bf16 = dev_matmul_bf16;
    dev.to_bf16 = dev_to_bf16;
    if (o.drop_each) {
        int rc = drop_each(&o);
        MPI_Finalize();
        return rc;
    }
    double via_nccl[64], via_mpi[64], m_nccl = 0, m_mpi = 0, f_nccl = 0, f_mpi = 0;
    train(&dev, &o, via_nccl, &m_nccl, &f_nccl);
    train(cpu, &o, via_mpi, &m_mpi, &f_mpi);
    if (f_nccl != f_mpi) {
        fprintf(stderr, "nccl_fake: the step's FLOP count differs: %.17g on the device path, %.17g on the MPI path\n",
                f_nccl, f_mpi);
        violations++;
    }
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
    /* stage 3 with overlap on several ranks: a layer's reduce-scatter is still in flight while the next
     * layer's backward computes (its matmuls ran with it queued) */
    long ov = 0;
    MPI_Allreduce(&overlapped_mm, &ov, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    int world = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    long rs[2] = {reductions_overlapped, reductions_run};
    MPI_Allreduce(MPI_IN_PLACE, rs, 2, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0 && o.stage == 3) printf("stage 3: %ld matmuls ran with a gradient reduce-scatter in flight\n", ov);
    if (rank == 0 && o.stage >= 2)
        printf("stage %d: %ld of %ld gradient reductions travelled beside compute (matmuls ran while queued)\n",
               o.stage, rs[0], rs[1]);
    int serial = o.stage == 3 && world > 1 && (o.overlap ? ov == 0 : ov != 0);
    /* stage 2 on a device (several ranks): besides final norm + head's (in flight from the start of backward),
     * at least one layer's reduction per micro-batch travels beside the next layer's backward; none under
     * --no-overlap */
    long micro = (long)o.steps * o.accum * world;
    if (o.stage == 2 && world > 1 && (o.overlap ? rs[0] < 2 * micro : rs[0] != 0)) {
        fprintf(stderr, "nccl_fake: stage 2's gradient reductions %s (%ld of %ld beside compute, %ld micro-batches)\n",
                o.overlap ? "did not overlap the next layer's backward" : "overlapped backward under --no-overlap",
                rs[0], rs[1], micro);
        serial = 1;
    }
    if (serial && o.stage == 3)
        fprintf(stderr, "nccl_fake: stage 3's gradient reduce-scatter %s\n",
                o.overlap ? "never overlapped backward" : "overlapped backward under --no-overlap");
    MPI_Finalize();
    if (missing) return 4;
    if (serial) return 5;
    return total ? 1 : worst <= 1e-6 ? 0 : 3;
}

