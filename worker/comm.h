/* comm.h — data-parallel communication of the compact gradient / parameter space over MPI.
 *
 * ZeRO stages: 0 all-reduces gradients and every rank updates everything; 1 all-reduces gradients, each
 * rank updates its shard and the updated parameters are all-gathered; 2 reduce-scatters gradients into
 * the shard owner (no full gradient is ever summed on every rank), then updates and all-gathers (in place
 * into the weights when every parameter trains); on host memory with several ranks it does so bucket by
 * bucket during every micro-batch's backward and gives each bucket's pages back (s2_release below); on a
 * device backend it keeps no full gradient either: each layer's gradients go to one reused bucket and are
 * reduce-scattered into the shard as its backward ends (worker/comm_zero2_dev.h).
 * 3 shards the parameters too (MPI on CPU ranks, fp32 or bf16; on a device backend worker/comm_zero3_dev.h,
 * NCCL, every parameter trained; what follows is the host layout): the weights
 * of the trainable parameters in this rank's shard of the compact space are its fp32 master shard and stay
 * resident in m->weights (frozen parameters are sharded the same way over their own "frozen space", gathered
 * with their group and given back after: no gradient, no optimizer state), and the rest of
 * the weights and all of m->grads are backed by memory only while in use. The model's residency hooks all-gather a layer's weights just before its forward and
 * again before its backward and give the pages back after (madvise); the grad_ready hook reduce-scatters
 * each layer's gradients into the owners' shard_grads as soon as its backward ends (every micro-batch)
 * and gives those pages back (non-blocking when armed with overlap: in flight while the next layer's
 * backward computes, finished by the next reduction or st_comm_backward_end). The prefetch hook starts the
 * next group's all-gathers (MPI_Iallgatherv, in place: the frozen part always, the trainable part when every
 * parameter trains) while this one computes.
 * Under bf16, inside forward/backward, the group's bf16 compute copy is gathered (plus the fp32 weights the model reads in fp32); elsewhere the acquire
 * hook makes it from the gathered fp32 weights; release gives it back. The optimizer updates the
 * resident shard in place: no parameter gather.
 * The compact space (model->grad_alloc floats) is padded to a multiple of the world size so every shard
 * has the same length. The communicator owns its staging buffers (backend memory). On a device backend the
 * gradient and parameter collectives go through NCCL; scalars always go through MPI. */
#ifndef ST_COMM_H
#define ST_COMM_H

#include <mpi.h>
#include <stddef.h>

#include "worker/model.h"
#include "worker/optim.h"

/* Stage 2 on host memory: at most this many reduce-scatter buckets in flight; the oldest is finished
 * (summed into the shard, its gradient pages given back) before another starts. */
#define ST_S2_INFLIGHT 4

/* One stage-2 bucket in flight: grads[lo, hi) being reduce-scattered into the owners' shards. */
typedef struct {
    MPI_Request req;
    int *counts;     /* per-rank counts (MPI reads them until the request completes) */
    size_t lo, hi;
    float *dst;      /* this rank's part of the sum lands at dst[0 .. own) in shard_grads */
    float *tmp;      /* later micro-batches: received here, then added to dst (NULL: received into dst) */
    size_t own;
} st_s2_bucket;

/* Stage 3: gradient chunks in flight at once (overlapped reduce-scatter, below). */
#define ST_Z3_RS_SLOTS 4

/* One stage-3 gradient chunk in flight: grads[a, b), this rank's part of it [own_a, own_a + own). */
typedef struct {
    size_t a, b, own_a, own;
    float *recv;             /* the other ranks' contributions to the own part, rank order, own floats each */
    int nreq;                /* requests in flight (sends and receives) */
} st_z3_rs_slot;

/* Where stage 3 spends its communication time (st_comm_zero3_profile): the acquires of the embeddings,
 * of the layers and of the final norm + head (gathers, the prefetched ones' waits), the gradient
 * reduce-scatters started and waited for in backward, and the wait for the last one at its end. */
enum { ST_Z3_ACQ_EMBED, ST_Z3_ACQ_LAYER, ST_Z3_ACQ_HEAD, ST_Z3_GRAD, ST_Z3_BWD_END, ST_Z3_PROF_N };

typedef struct {
    MPI_Comm comm;
    const st_backend *be;   /* where the gradient/parameter buffers live */
    void *nccl;             /* st_nccl_comm on a device backend when world > 1 (or SHARDTUNE_NCCL_ONE_RANK=1) */
    int rank, world, stage;
    size_t n, n_pad, shard; /* trainable floats, padded total, per-rank shard length */
    size_t lo, hi;          /* this rank's shard of the compact space (lo..hi may exceed n: padding) */
    float *shard_grads;     /* stage 2: reduced gradients of the shard [shard] */
    float *flat_params;     /* stage 1: compact parameter staging [n_pad]; stage 2: NULL when the compact space
                               is the weight space (gathers in place), else one bucket's staging
                               [st_comm_param_staging_floats] */
    double comm_seconds;    /* time the step waited on gradient/parameter collectives (exposed time) */
    /* Overlap of the gradient reduction with backward: ranges reported by the model's grad_ready hook are
     * merged into buckets of >= bucket_bytes (one host-side bucketing for both transports) and reduced
     * — all-reduce for stages 0-1, reduce-scatter into the owners' shards for stage 2 — with non-blocking
     * MPI, or with NCCL on the comm stream ordered after the compute stream by an event. */
    size_t bucket_bytes;
    int overlapping;        /* a bucketed reduction is in flight for this step */
    size_t pend_lo, pend_hi; /* the bucket being filled (ranges arrive top-down) */
    size_t covered;         /* elements handed to MPI so far this step */
    float *overlap_grads;   /* the model's gradient buffer while overlapping */
    /* One rank at stages 0-1 on host memory (nothing to reduce): the last micro-batch's backward reports
     * each finished gradient range (grad_ready) and its sum of squares is taken then, while the range is
     * still in cache, instead of in a pass of its own (st_comm_grad_sumsq). */
    float *sumsq_grads;     /* the model's gradient buffer while armed, else NULL */
    double sumsq_sum;       /* the ranges' sums of squares, in the order backward finished them */
    size_t sumsq_covered;   /* floats summed so far */
    int sumsq_ready;        /* the last backward covered every gradient: st_comm_grad_sumsq takes sumsq_sum */
    MPI_Request *reqs;
    int **req_counts;       /* per request: the per-rank counts of a stage-2 bucket (MPI keeps reading them) */
    size_t *req_range;      /* per request: its bucket [req_range[2i], req_range[2i + 1]) of the gradient space */
    int n_reqs, cap_reqs;
    /* The norm's sum of squares inside the reduction (host memory, MPI; armed for the step's last
     * micro-batch): several ranks at stages 0-1 overlapped (each bucket's all-reduce), stage 2 with several
     * ranks (each bucket's reduce-scatter into the shard), stage 3 (each chunk's reduce-scatter into the
     * shard, summed there). The optimizer's range (st_comm_optim_range, its gradients at sq_x) is cut into
     * ST_SUMSQ_CHUNK chunks; as a reduction finishes a range of it, the chunks it touches count down their
     * elements still to come (sq_left: the padding past n never comes, it stays zero), and a chunk that
     * reaches 0 has its values final and in cache: its sum of squares is taken then (sq_part, sq_done).
     * st_comm_grad_sumsq adds the chunks in order from 0, the ones not taken by a separate sumsq each (the
     * order of be->sumsq's one pass: kernels.h), so the norm has the same bits as one pass over the range.
     * A range reported twice (never expected) disarms it: the one pass then. SHARDTUNE_NORM_CHECK=1 (tests)
     * also takes the one pass and fails the step when the bits differ; =flip changes the first chunk taken
     * by 2^-20 of itself (the check must then fail: proves the chunks are taken during the reduction; one ulp
     * of a chunk may round away in the total). */
    double *sq_part;
    unsigned char *sq_done;
    size_t *sq_left;        /* per chunk: elements below n whose final value has not arrived */
    const float *sq_x;      /* the optimizer's gradients (element 0 = its range's start) while armed */
    size_t sq_n, sq_cap;
    size_t sq_taken;        /* chunks taken during the last armed reduction (tests) */
    int sq_armed;           /* this step's reduction takes the partials */
    int sq_ready;           /* they are taken: st_comm_grad_sumsq adds them */
    int sq_check;           /* SHARDTUNE_NORM_CHECK: 1 compare with one pass, 2 flip the first chunk too */
    int overlap_rc;         /* first failure starting a bucket (the hook cannot return it) */
    double overlap_seconds; /* time spent launching/progressing buckets during backward */
    /* stage 2 on host memory with several ranks (s2_release): the model's gradient buffer is address space
     * only. Every micro-batch's backward reduce-scatters each bucket as it fills (MPI_Ireduce_scatter;
     * the first micro-batch of a step straight into shard_grads, later ones through a bucket-sized
     * receive buffer and then added), at most ST_S2_INFLIGHT in flight; a finished bucket's gradient
     * pages are given back (madvise), so a rank holds its shard plus a few buckets, never the whole
     * gradient. A device backend has no full buffer either (z2dev below: edge buffers and two layer
     * buckets, reduced per group in place as backward ends, worker/comm_zero2_dev.h). SHARDTUNE_ZERO2_FULL_GRADS=1
     * keeps the full buffer, reduced once per step, on both (for bench/zero3_step.sh; the planner knows it
     * on a device only). */
    int s2_release;
    int s2_wait_each;       /* sharding.overlap false: each bucket is waited for as soon as it starts */
    int s2_micro;           /* micro-batches of this step already summed into shard_grads */
    int s2_n;               /* buckets in flight, oldest first */
    st_s2_bucket s2[ST_S2_INFLIGHT];
    st_model *s2_model;     /* whose grads_managed flag this communicator set (cleared by st_comm_free) */
    double exposed_seconds; /* waits at the end of earlier micro-batches' backward (added to comm_seconds) */
    /* stage 3 */
    st_model *model;        /* whose hooks this communicator installed (cleared by st_comm_free) */
    float *z3_recv;         /* [st_comm_zero3_recv_floats]: this rank's part of one reduce-scattered chunk */
    int z3_rc;              /* first failure inside a hook (they cannot return it); reported by reduce_grads */
    float *z3_stage;        /* host [min(n_pad, ST_Z3_CHUNK)]: gather staging when frozen parameters exist */
    size_t z3_stage_at;     /* compact index of z3_stage[0] during a staged gather */
    /* prefetch (in-place gathers only: every parameter trains): the next layer's MPI_Iallgatherv, started
     * by the model's prefetch hook while this layer computes, finished by the acquire of that range */
    int z3_prefetch;        /* enabled (SHARDTUNE_ZERO3_PREFETCH=0 turns it off, for benchmarks) */
    int z3_pf_active;       /* a gather of [z3_pf_a, z3_pf_b) is in flight */
    size_t z3_pf_a, z3_pf_b;
    MPI_Request z3_pf_req;
    int *z3_pf_counts;      /* [2 * world]: its per-owner counts and displacements (MPI reads them until done) */
    int z3_pf_first, z3_pf_last; /* the parameter group prefetched */
    int z3_pf_train;        /* its trainable part is in flight (z3_pf_req; in-place gathers only) */
    /* the frozen space: the frozen parameters (registry order, QLoRA's quantized ones excepted: their
     * scratch is refilled per acquire) concatenated, padded to the world and sharded like the compact
     * space: each rank keeps [flo, fhi) of it, a group's frozen part is gathered in place per run of
     * parameters contiguous in both spaces (SHARDTUNE_ZERO3_SHARD_FROZEN=0: kept whole, as before) */
    long *z3_foff;          /* [n_params]: offset in the frozen space, -1 (trainable, kept whole) */
    size_t nf, fshard, flo, fhi;
    size_t *z3_runs;        /* [4 * n_params]: a group's runs (frozen offset, weight offset, length, bf16 only) */
    int z3_pf_nruns;        /* frozen runs of the prefetched group in flight */
    MPI_Request *z3_pf_freqs; /* [n_params] */
    int *z3_pf_fcounts;     /* [n_params * 2 * world] */
    /* QLoRA's quantized base (worker/qlora.h's blob: every quantized tensor's codes and scales, registry
     * order) sharded by bytes like the frozen space: each rank keeps [qlo, qhi) of it; a group's range is
     * gathered in place (MPI_BYTE) before st_qlora_acquire dequantizes it, prefetched with the group, and
     * given back by its release (SHARDTUNE_ZERO3_SHARD_FROZEN=0: kept whole) */
    uint8_t *z3_qb;
    size_t nq, qshard, qlo, qhi;
    int z3_pf_q;            /* the prefetched group's quantized bytes are in flight (z3_pf_qreq) */
    MPI_Request z3_pf_qreq;
    int *z3_pf_qcounts;     /* [2 * world] */
    /* overlapped gradient reduce-scatter (armed by st_comm_backward_begin with overlap): the grad_ready
     * hook cuts the range into chunks of st_comm_zero3_chunk_floats and sends each rank's contribution to
     * every part's owner point to point (MPI_Isend from m->grads; the owner's MPI_Irecv into its slot of
     * z3_recv, one part per other rank) and returns; up to ST_Z3_RS_SLOTS chunks travel at once, the oldest
     * finished (its contributions summed in rank order and added to shard_grads, its gradient pages given
     * back) when a slot is needed, by the progress hook between matmuls once it has arrived, or by
     * st_comm_backward_end — so a layer's reduction travels while the next layers' backward computes, and
     * a rank waits for its peers only when every slot is busy. Without overlap: one blocking
     * MPI_Reduce_scatter per chunk. */
    int z3_async;
    st_z3_rs_slot z3_rs[ST_Z3_RS_SLOTS]; /* a ring: z3_rs_n in flight from z3_rs_first */
    int z3_rs_first, z3_rs_n;
    MPI_Request *z3_rs_reqs; /* [ST_Z3_RS_SLOTS * 2 * world]: slot k's requests from k * 2 * world */
    int *z3_rs_counts;      /* [world]: the blocking reduce-scatter's per-owner counts */
    int fresh;              /* stages 2-3: shard_grads holds a finished step's sums; the next reduction restarts */
    int shard_zeroed;       /* stage 3: the optimizer zeroed shard_grads as it read them: the restart skips its memset */
    double z3_prof[ST_Z3_PROF_N]; /* stage 3: seconds spent, by where (st_comm_zero3_profile) */
    struct st_z3dev *z3dev; /* stage 3 on a device backend (worker/comm_zero3_dev.h), else NULL */
    const unsigned char *z3_pre16; /* st_comm_options.frozen_bf16, read by st_z3dev_init only (then NULL) */
    struct st_z2dev *z2dev; /* stage 2 on a device backend (worker/comm_zero2_dev.h), else NULL */
} st_comm;

/* This rank's index among the ranks of `comm` on its node (the ranks that share memory: MPI's own
 * grouping by host, whatever launched them) and their number. Collective over `comm`. */
int st_comm_node_rank(MPI_Comm comm, int *local_rank, int *local_size);

/* Every node-local rank's `bytes` bytes, in node-local rank order: *all (malloc'd, caller frees) gets
 * *n entries. Collective over `comm`. */
int st_comm_node_allgather(MPI_Comm comm, const void *mine, int bytes, unsigned char **all, int *n);

/* What a communicator is built with (sharding.stage, sharding.bucket_mb). */
typedef struct {
    int stage;           /* ZeRO stage 0-3 */
    size_t bucket_bytes; /* overlapped reduction / interleaved all-gather bucket size; 0 = 4 MiB when overlapping */
    /* stage 3 on a device: [n_params] frozen parameters whose parts the load reads straight into bf16 (the
     * trainer's choice from the files' dtypes, train_frozen16.c; worker/comm_zero3_dev.h), else NULL */
    const unsigned char *frozen_bf16;
} st_comm_options;

/* `m` must already have its trainable set (grad_align = world size). */
int st_comm_init(st_comm *c, MPI_Comm comm, const st_comm_options *opt, const st_model *m);
void st_comm_free(st_comm *c);

/* Makes a new trainable set current (st_model_set_trainable(m, layer_mask, module_mask) with grad_align =
 * the world size) and rebuilds the communicator `c` (opt) and the optimizer `o` (oc) for
 * it. Parameters trainable before and after keep their AdamW moments and step counts (the old moments are
 * gathered in full on every rank, then each rank cuts its new range from them; at stage 3 the old shards are
 * moved into the new ones instead, and the weights too: shard to shard on host memory, in bounded pieces owner to
 * owner on a device, unless SHARDTUNE_ZERO3_RESHARD=whole); new ones start fresh.
 * On the first call c and o are zeroed (nothing to carry over). Collective. */
int st_comm_reshard_optim(st_comm *c, st_optim *o, st_model *m, MPI_Comm comm, const st_comm_options *opt,
                          const st_optim_config *oc, const unsigned char *layer_mask, unsigned module_mask);

/* Seconds by ST_Z3_* (above) since the communicator was built (all zero below stage 3). */
void st_comm_zero3_profile(const st_comm *c, double out[ST_Z3_PROF_N]);

/* Stage 3 reduce-scatters gradients in chunks of this many floats (4 MiB): bounds MPI's temporaries. */
#define ST_Z3_CHUNK ((size_t)1 << 20)

/* Floats of the stage-3 receive buffer for a shard of `shard` floats on `world` ranks (the planner counts
 * it): every slot's, and at least one blocking reduce-scatter's part. */
size_t st_comm_zero3_recv_floats(size_t shard, int world);
/* Floats of one overlapped stage-3 gradient chunk for a shard of `shard` floats on `world` ranks:
 * B / ST_Z3_RS_SLOTS / (world - 1), B = shard / 8 clamped to [ST_Z3_CHUNK, ST_Z3_RS_SLOTS x ST_Z3_CHUNK]:
 * the chunks in flight hold and receive at most B floats (small models: the one blocking chunk's). */
size_t st_comm_zero3_chunk_floats(size_t shard, int world);

/* Stage 3: after something wrote the whole of m->weights (a checkpoint load), gives back the pages of
 * the weights this rank does not own. No-op for other stages. */
void st_comm_weights_loaded(st_comm *c, st_model *m);

/* Stage 3 on CPU ranks (worker/model.h st_model_drop_frozen_fp32's rule at ZeRO-3): every frozen parameter of the
 * frozen space that st_model_bf16_only_candidate names and whose parts are bf16 values on every rank (checked
 * with one all-reduce: the ranks agree) keeps this rank's part in m->weights_bf16 only (rounded, exactly; its
 * fp32 pages given back; st_model_fp32_dropped then says so). Its gathers move bf16 into m->weights_bf16, its
 * release gives back all but that part, st_comm_gather_param widens it, a re-shard cuts the new parts from the
 * gathered bf16 tensors. Collective; idempotent; call once the weights are loaded and the trainable set is
 * final. Returns the floats of this rank's parts held so; 0 below stage 3. On a device (ZeRO-3) the same rule
 * through worker/comm_zero3_dev.h st_z3dev_hold_bf16. */
size_t st_comm_drop_frozen_fp32(st_comm *c, st_model *m);
/* Undoes it (before a reader of m->weights that does not know, generation): this rank's parts widened back into
 * their fp32 places, exactly. Local. */
void st_comm_restore_fp32(st_comm *c, st_model *m);

/* Which elements of parameter i ([*a, *b) of its numel, registry layout) this rank keeps in m->weights:
 * all of it below stage 3 (and for a QLoRA-quantized parameter); at stage 3 its part of the rank's shard of
 * the compact space (trainable) or of the frozen space (frozen), maybe none. The streaming load reads
 * exactly these (st_model_load_weights_part). */
void st_comm_param_keep(const st_comm *c, const st_model *m, int i, size_t *a, size_t *b);

/* Whether parameter i is split across the ranks (stage 3: trainable, or frozen and sharded). */
int st_comm_param_sharded(const st_comm *c, const st_model *m, int i);

/* QLoRA at stage 3: this rank's part of the quantized bytes (worker/qlora.h's blob), the blob's bytes [*a, *b)
 * at the returned pointer: on a device (worker/comm_zero3_dev.c st_z3dev_qshard) its 4-byte words in the
 * communicator's own buffer, on CPU ranks its bytes [qlo, qhi) of the blob itself (z3_qb; clipped to it). The
 * sharded load (coordinator/trainer/train_qload.c) fills exactly these. NULL, empty: none (below stage 3, or
 * SHARDTUNE_ZERO3_SHARD_FROZEN=0 on CPU ranks: the blob kept whole). */
uint8_t *st_comm_qlora_part(const st_comm *c, size_t *a, size_t *b);

/* Parameter i's fp32 values (registry layout, numel floats) gathered into dst (host memory) on rank `root`
 * from the ranks that keep its parts (MPI_Gatherv at stage 3, device parts staged through the host; a
 * local copy otherwise). Collective at stage 3: every
 * rank calls it for the same i; dst is ignored elsewhere and may be NULL on the root too. */
int st_comm_gather_param(st_comm *c, const st_model *m, int i, float *dst, int root);

/* The optimizer's range: [lo, hi) for stages 1-3, [0, n_pad) for stage 0. */
void st_comm_optim_range(const st_comm *c, size_t *lo, size_t *hi);

/* Arms overlap for the next backward (world > 1; a no-op otherwise): installs the model's grad_ready
 * hook. Call before the last micro-batch's st_model_backward. */
void st_comm_overlap_begin(st_comm *c, st_model *m);

/* Before each micro-batch's st_model_backward (`last`: the step's last one; `overlap`: sharding.overlap):
 * stages 0-1 arm the overlap (st_comm_overlap_begin) on the last micro-batch only; stage 2 on a device
 * points its bucket at the first layer (every micro-batch, comm_zero2_dev.h); stage 2 on host memory arms its per-bucket reduce-scatter on every micro-batch (blocking per
 * bucket without overlap); stage 3 makes its per-layer reduce-scatter non-blocking with overlap. */
void st_comm_backward_begin(st_comm *c, st_model *m, int overlap, int last);

/* After each micro-batch's st_model_backward: finishes what the hooks started during it (stage 2 on host
 * memory: every bucket summed into the shard and its pages given back; stage 3: the last layer's
 * reduce-scatter). Collective; the next forward may then write gradients again. */
int st_comm_backward_end(st_comm *c, st_model *m);

/* Stage 2 on host memory: the most floats of one reduce-scatter (a larger bucket goes in pieces). */
size_t st_comm_zero2_piece_floats(size_t bucket_bytes);

/* Floats of the stage-2 parameter staging buffer (0 when gathers go in place into the weights). */
size_t st_comm_param_staging_floats(size_t n_pad, size_t bucket_bytes, int in_place);

/* Sums gradients across ranks (finishing an armed overlap: flush, wait, uninstall the hook). Returns the pointer the optimizer reads (element 0 = its range start). */
int st_comm_reduce_grads(st_comm *c, st_model *m, float **optim_grads);

/* Global squared L2 norm of the summed gradients (optim_grads over the optimizer range):
 * st_comm_grad_sumsq_part, then its all-reduce when partial. */
double st_comm_grad_sumsq(st_comm *c, const st_model *m, const float *optim_grads);

/* This rank's part of it without any collective: *partial 1 when the ranks' parts are still to be summed
 * (stages 1-3 on several ranks: the trainer adds it to the step's one scalar all-reduce, with the losses),
 * 0 when *sq is the global value already. Fails only under SHARDTUNE_NORM_CHECK (bits differ). */
int st_comm_grad_sumsq_part(st_comm *c, const st_model *m, const float *optim_grads, double *sq, int *partial);

/* The optimizer step and, for stages 1-2, the parameter all-gather, interleaved per bucket of
 * bucket_bytes: each bucket's owned part is updated (st_optim_update_range), staged, and its all-gather
 * started (MPI_Iallgatherv / grouped NCCL broadcasts, uneven per-owner parts) before the next bucket is
 * updated, so early buckets travel while the optimizer works on later ones. Afterwards every rank's
 * trainable weights (and their bf16 copy) equal the owners'. Stage 0 / one rank: st_optim_update. */
int st_comm_update_params(st_comm *c, st_model *m, st_optim *o, const float *grads, float lr, float grad_scale);

/* Full copies of a sharded per-element state (e.g. AdamW moments over the optimizer range) on every
 * rank: full[n_pad] from each rank's part[range]. */
int st_comm_gather_state(st_comm *c, const float *part, float *full);

/* Element-wise sum of doubles across ranks, in place. */
int st_comm_sum(st_comm *c, double *x, int n);

/* Gives back the memory behind x[a, b) (elements of `elem` bytes, host memory): whole pages with
 * madvise(MADV_DONTNEED), the edge pages' elements zeroed. The range reads as zero afterwards. */
void st_comm_discard(void *x, size_t elem, size_t a, size_t b);

/* A frozen, forward-only model sharded across the ranks of `comm` (ZeRO-3's distillation teacher,
 * "sharded like the student"): its weight space [0, n_weights) is split into `world` equal contiguous
 * ranges (the last padded); each rank keeps only its range in m->weights (the rest of the full-size
 * buffer holds no memory) and the model's residency hooks all-gather a group's weights in place just
 * before the model reads them (MPI_Allgatherv) and give the other ranks' parts back after; under bf16 the
 * group's compute copy is rounded from the gathered fp32 weights and given back too. With int8 packs
 * (st_model_set_int8 after the init: distill.teacher_dtype int8) the pack space is split the same way in
 * bytes: a group's acquire gathers its packs and only its fp32 weights that are not quantized (norms, biases,
 * embeddings), release gives the other ranks' packs back. No gradients, no optimizer state. Collective: every
 * rank makes the same acquire/release calls (the forward does). */
typedef struct {
    MPI_Comm comm;
    int rank, world;
    size_t shard, lo, hi; /* floats per rank; this rank's [lo, hi) of the weight space */
    st_model *model;      /* whose hooks are installed (NULL after st_frozen_shard_free) */
    int rc;               /* first failure inside a hook (they cannot return it) */
} st_frozen_shard;

/* Installs the hooks on m (whose registry is built; its weights may be loaded whole or not yet) and gives
 * back the weights this rank does not keep. A model that already has residency hooks is refused. */
int st_frozen_shard_init(st_frozen_shard *s, MPI_Comm comm, st_model *m);
/* Which elements [*a, *b) of parameter i this rank keeps (for st_model_load_weights_part). */
void st_frozen_shard_keep(const st_frozen_shard *s, const st_model *m, int i, size_t *a, size_t *b);
/* Removes the hooks (the model's weights stay as they are: this rank's part). */
void st_frozen_shard_free(st_frozen_shard *s);

#endif
