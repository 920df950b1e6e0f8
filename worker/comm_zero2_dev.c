/* comm_zero2_dev.c — ZeRO-2 on a device backend without a full-size gradient buffer (worker/comm_zero2_dev.h).
 *
 * The groups whose gradients are reported (st_model_backward's grad_ready order: final norm + head, the
 * layers top-down with each layer's adapters after its base parameters, the embeddings last):
 *  - edges: the embeddings' and the final norm + head's compact ranges, each in a resident buffer (the
 *    training forward's fused head writes the head's and a tied embedding's gradients before backward);
 *  - a layer: the compact range of its base parameters and that of its adapters, both in one bucket (base
 *    at 0, adapters after); once both were reported the next layer down with gradients goes to the other
 *    bucket (double-buffered, as device ZeRO-3's layer gradient buffers);
 *  - untied embeddings that fit in a bucket have no edge buffer: their gradient (written only by the
 *    embedding backward, after the lowest layer was reported) goes to the next bucket (EMBED below);
 *  - the prompt's tensors (prompt tuning's table, P-tuning's encoder, prefix tuning's table, which every
 *    layer's backward writes): a third resident edge buffer, reported after the embeddings.
 * The gradient windows (st_model.gwin) say where each lives; the weights stay whole on every rank, so the
 * parameter all-gather after the update is comm.c's stage 2 as before. Together the groups must cover the
 * trainable set exactly (st_z2dev_plan_used checks it; else comm.c keeps the full buffer).
 * Streams (the pattern of device ZeRO-3's gradient reduce-scatter, comm_zero3_dev.c): a reported range is
 * reduce-scattered in place (st_commdev_reduce_start: the comm stream first waits for the compute stream's
 * event, so it reads the finished gradients) and its holder's comm-stream mark recorded after it; the host
 * goes on. The compute stream waits for a holder's mark (st_nccl_wait_event) only before the holder is
 * written again — a bucket two layers down, the edges and the last bucket at the end of the micro-batch's
 * backward — and then adds the finished reductions' parts into shard_grads (st_commdev_add_own). So layer
 * i's reduction runs beside layer i-1's backward. A wait already covered by a later one (the comm stream
 * is in order) is not issued: every wait made is needed (the fake NCCL's tests drop each in turn). */
#include "worker/comm_zero2_dev.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/cuda/nccl_comm.h"
#include "worker/comm_dev.h"
#include "worker/lora.h"
#include "worker/prompt.h"

#define EMBED (-2) /* a bucket's layer: it holds the embeddings' gradient */
#define NEDGE 3    /* the edge groups: embeddings, final norm + head, the prompt's tensors */
#define NBUCKET 2  /* layer buckets: one written by backward while the other's reduction travels */
#define NHOLD (NEDGE + NBUCKET) /* holders of gradients in flight: edge e, bucket NEDGE + b; holder h's
                                   newest reduction ends at comm-stream mark h */
#define NPEND 16   /* reductions in flight at most (a layer's two ranges per bucket and the edges: <= 7) */

_Static_assert(NHOLD <= ST_NCCL_EVENTS, "a comm-stream mark per holder");

typedef struct {
    float *g;                      /* [bucket_floats] */
    int layer;                     /* while backward writes it: the layer it holds, or EMBED */
    size_t span_lo[2], span_hi[2]; /* that layer's base parameters' and adapters' compact ranges */
    int left;                      /* of its non-empty ranges, not reported yet */
} z2_bucket;

typedef struct {     /* a reduction in flight: [lo, hi) reduced in place at src */
    float *src;
    size_t lo, hi;
    int holder;
    long seq;        /* its place in the comm stream (reductions enqueued before it + 1) */
} z2_pend;

typedef struct st_z2dev st_z2dev;
struct st_z2dev {
    st_model *m;
    float *edge[NEDGE];      /* embeddings, final norm + head, prompt tables (NULL when nothing of it trains) */
    size_t edge_lo[NEDGE], edge_hi[NEDGE];
    z2_bucket bk[NBUCKET];
    int n_bk;                /* NBUCKET with NCCL, else 1 (a reduction ends at once) */
    size_t bucket_floats;
    int live;                /* the bucket backward writes (a gradient window), -1 none */
    int next;                /* the bucket the next layer goes to */
    int embed_shared;        /* the embeddings' gradient goes to a bucket (edge[0] NULL) */
    int overlap;             /* sharding.overlap: reductions stay in flight until their buffer is needed */
    long *goff;              /* [n_params] the trainable set's gradient offsets (fixed for this communicator) */
    z2_pend pend[NPEND];     /* in flight, oldest first */
    int n_pend;
    long seq;                /* reductions enqueued */
    long waited;             /* the newest the compute stream waited for */
    long mark[NHOLD];        /* each holder's newest reduction */
    size_t covered;          /* floats reduced during this micro-batch's backward */
    int rc;                  /* first failure inside the hook (it cannot return it) */
};

/* Compact range [*a, *b) of the trainable parameters among [first, last) (grad_offset: -1 frozen);
 * contiguous, since the compact space is the trainable parameters in registry order. */
static void cspan(const st_model *m, const long *goff, int first, int last, size_t *a, size_t *b) {
    *a = *b = 0;
    for (int i = first; i < last; i++) {
        if (goff[i] < 0) continue;
        if (*b == *a) *a = (size_t)goff[i];
        *b = (size_t)goff[i] + m->params[i].numel;
    }
}

/* Layer l's base and adapter compact ranges. */
static void layer_spans(const st_model *m, const long *goff, int l, size_t lo[2], size_t hi[2]) {
    int lf, ll;
    cspan(m, goff, st_model_layer_first_param(m, l), st_model_layer_first_param(m, l + 1), &lo[0], &hi[0]);
    st_lora_layer_params(m, l, &lf, &ll);
    cspan(m, goff, lf, ll, &lo[1], &hi[1]);
}

/* The edges' ranges, the bucket's size, and the floats the groups cover together. */
static size_t layout(const st_model *m, const long *goff, size_t elo[NEDGE], size_t ehi[NEDGE], size_t *bucket) {
    int L = m->cfg.n_layer, pp = st_prompt_param(m);
    cspan(m, goff, 0, st_model_layer_first_param(m, 0), &elo[0], &ehi[0]);
    cspan(m, goff, st_model_layer_first_param(m, L), st_model_base_params(m), &elo[1], &ehi[1]);
    elo[2] = ehi[2] = 0; /* prompt tuning's table, an encoder's tensors, prefix tuning's table (written by every
                            layer): resident, reported after the embeddings */
    if (m->prompt) cspan(m, goff, pp, pp + st_prompt_param_count(m), &elo[2], &ehi[2]);
    size_t covered = 0;
    for (int e = 0; e < NEDGE; e++) covered += ehi[e] - elo[e];
    *bucket = 0;
    for (int l = 0; l < L; l++) {
        size_t lo[2], hi[2];
        layer_spans(m, goff, l, lo, hi);
        size_t n = hi[0] - lo[0] + hi[1] - lo[1];
        covered += n;
        if (n > *bucket) *bucket = n;
    }
    return covered;
}

static long *grad_offsets(const st_model *m) {
    long *g = malloc(((size_t)m->n_params + 1) * sizeof *g);
    for (int i = 0; g && i < m->n_params; i++) g[i] = m->params[i].grad_offset;
    return g;
}

int st_z2dev_plan_used(const st_model *m, const long *grad_offset, size_t n_trainable) {
    const char *keep = getenv("SHARDTUNE_ZERO2_FULL_GRADS");
    if ((keep && !strcmp(keep, "1")) || n_trainable == 0) return 0;
    size_t elo[NEDGE], ehi[NEDGE], bucket;
    return layout(m, grad_offset, elo, ehi, &bucket) == n_trainable;
}

int st_z2dev_used(const st_model *m) {
    long *g = grad_offsets(m);
    int ok = g && st_z2dev_plan_used(m, g, m->n_grads);
    free(g);
    return ok;
}

/* Whether untied embeddings' gradient (n floats) can live in a bucket (bucket floats). */
static int embed_shares(const st_model *m, size_t n, size_t bucket) { return !m->cfg.tied_embeddings && n && n <= bucket; }

size_t st_z2dev_floats(const st_model *m, const long *grad_offset, int world) {
    size_t elo[NEDGE], ehi[NEDGE], bucket, e = 0;
    layout(m, grad_offset, elo, ehi, &bucket);
    for (int k = 0; k < NEDGE; k++) e += ehi[k] - elo[k];
    if (embed_shares(m, ehi[0] - elo[0], bucket)) e -= ehi[0] - elo[0];
    return e + (world > 1 ? NBUCKET : 1) * bucket;
}

/* The model's gradient windows: the edges and the live bucket's ranges (or the embeddings in it). */
static void sync_windows(st_z2dev *z) {
    st_model *m = z->m;
    m->n_gwin = 0;
    for (int e = 0; e < NEDGE; e++)
        if (z->edge[e]) m->gwin[m->n_gwin++] = (st_res_window){z->edge_lo[e], z->edge_hi[e], z->edge[e], NULL};
    if (z->live < 0) return;
    const z2_bucket *b = &z->bk[z->live];
    if (b->layer == EMBED) {
        m->gwin[m->n_gwin++] = (st_res_window){z->edge_lo[0], z->edge_hi[0], b->g, NULL};
        return;
    }
    size_t off = 0;
    for (int s = 0; s < 2; s++) {
        if (b->span_hi[s] > b->span_lo[s])
            m->gwin[m->n_gwin++] = (st_res_window){b->span_lo[s], b->span_hi[s], b->g + off, NULL};
        off += b->span_hi[s] - b->span_lo[s];
    }
}

static void keep(st_z2dev *z, int rc) {
    if (rc && !z->rc) z->rc = rc;
}

/* Finishes the reductions in flight up to holder h's newest: the compute stream waits for its mark (unless
 * it already waited for a later one: the comm stream runs in order), then each finished reduction's part of
 * this rank is added into shard_grads, oldest first (per element the micro-batches' order), and an edge
 * buffer is zeroed (the next micro-batch accumulates into zeros). */
static void finish_upto(st_comm *c, int h) {
    st_z2dev *z = c->z2dev;
    long upto = z->mark[h];
    if (upto > z->waited) {
        if (c->nccl) keep(z, st_nccl_wait_event(c->nccl, h));
        z->waited = upto;
    }
    int k = 0;
    for (; k < z->n_pend && z->pend[k].seq <= upto; k++) {
        const z2_pend *p = &z->pend[k];
        st_commdev_add_own(c, p->src, p->lo, p->hi);
        if (p->holder < NEDGE) z->m->be->memset0(p->src, (p->hi - p->lo) * sizeof(float));
    }
    z->n_pend -= k;
    memmove(z->pend, z->pend + k, (size_t)z->n_pend * sizeof z->pend[0]);
}

/* Every reduction in flight finished (the end of a micro-batch's backward). */
static void finish_all(st_comm *c) {
    st_z2dev *z = c->z2dev;
    if (z->n_pend) finish_upto(c, z->pend[z->n_pend - 1].holder);
}

/* Whether a reduction of holder h is in flight. */
static int in_flight(const st_z2dev *z, int h) {
    for (int k = 0; k < z->n_pend; k++)
        if (z->pend[k].holder == h) return 1;
    return 0;
}

/* [lo, hi) of holder h, at src, reduced: enqueued on the comm stream and left in flight (sharding.overlap,
 * NCCL), else finished at once. */
static void reduce(st_comm *c, int h, float *src, size_t lo, size_t hi) {
    st_z2dev *z = c->z2dev;
    if (z->n_pend == NPEND) finish_upto(c, z->pend[0].holder); /* not expected: at most 7 in flight */
    keep(z, st_commdev_reduce_start(c, src, lo, hi, h));
    z->pend[z->n_pend++] = (z2_pend){src, lo, hi, h, ++z->seq};
    z->mark[h] = z->seq;
    if (!c->nccl || !z->overlap) finish_upto(c, h);
}

/* Points the next bucket at the highest layer <= l whose backward writes gradients (its backward runs: >=
 * the model's lowest trained layer), zeroed once the reduction that last read it finished; none: the
 * embeddings when they share it (EMBED), else no bucket is live. */
static void point_layer(st_comm *c, int l) {
    st_z2dev *z = c->z2dev;
    st_model *m = z->m;
    size_t lo[2] = {0, 0}, hi[2] = {0, 0}, n = 0;
    int layer = -1;
    for (; l >= m->lowest_trained_layer && l >= 0 && layer < 0; l--) {
        layer_spans(m, z->goff, l, lo, hi);
        n = hi[0] - lo[0] + hi[1] - lo[1];
        if (n) layer = l;
    }
    if (layer < 0 && z->embed_shared) layer = EMBED, n = z->edge_hi[0] - z->edge_lo[0];
    z->live = -1;
    if (layer != -1) {
        int b = z->next;
        z->next = (b + 1) % z->n_bk;
        if (in_flight(z, NEDGE + b)) finish_upto(c, NEDGE + b); /* the compute stream waits before writing it */
        z2_bucket *k = &z->bk[b];
        k->layer = layer;
        k->left = 0;
        for (int s = 0; s < 2; s++) {
            k->span_lo[s] = layer == EMBED ? 0 : lo[s], k->span_hi[s] = layer == EMBED ? 0 : hi[s];
            k->left += k->span_hi[s] > k->span_lo[s];
        }
        m->be->memset0(k->g, n * sizeof(float));
        z->live = b;
    }
    sync_windows(z);
}

/* grad_ready hook: [lo, hi) is a whole group range (an edge, or one of the live bucket's ranges). */
static void z2d_grad_ready(void *ctx, size_t lo, size_t hi) {
    st_comm *c = ctx;
    st_z2dev *z = c->z2dev;
    const st_backend *be = z->m->be;
    double t0 = st_now();
    if (c->fresh) { /* the first reduction of a step: the last step's sums are spent (or its step was skipped) */
        be->memset0(c->shard_grads, c->shard * sizeof(float));
        c->fresh = 0;
    }
    float *src = NULL;
    int h = -1;
    for (int e = 0; e < NEDGE && !src; e++)
        if (z->edge[e] && lo >= z->edge_lo[e] && hi <= z->edge_hi[e]) src = z->edge[e] + (lo - z->edge_lo[e]), h = e;
    z2_bucket *b = z->live >= 0 ? &z->bk[z->live] : NULL;
    int embed = !src && b && b->layer == EMBED && lo >= z->edge_lo[0] && hi <= z->edge_hi[0];
    if (embed) src = b->g + (lo - z->edge_lo[0]);
    size_t off = 0;
    for (int s = 0; s < 2 && !src && b && b->layer >= 0; s++) {
        if (lo >= b->span_lo[s] && hi <= b->span_hi[s] && hi > lo) src = b->g + off + (lo - b->span_lo[s]);
        off += b->span_hi[s] - b->span_lo[s];
    }
    if (!src) {
        keep(z, st_fail(ST_EINVAL, "rank %d: internal error: stage-2 gradients [%zu, %zu) have no buffer", c->rank, lo, hi));
        return;
    }
    if (h < 0) h = NEDGE + z->live;
    reduce(c, h, src, lo, hi);
    z->covered += hi - lo;
    if (embed) z->live = -1, sync_windows(z);
    else if (h >= NEDGE && --b->left == 0) point_layer(c, b->layer - 1); /* the next layer down: the other bucket */
    c->overlap_seconds += st_now() - t0;
}

int st_z2dev_init(st_comm *c, st_model *m) {
    const st_backend *be = m->be;
    st_z2dev *z = calloc(1, sizeof *z);
    long *g = grad_offsets(m);
    if (!z || !g) {
        free(z);
        free(g);
        return st_fail(ST_ENOMEM, "out of memory");
    }
    c->z2dev = z;
    z->m = m;
    z->live = -1;
    z->overlap = 1;
    z->goff = g;
    z->n_bk = c->nccl ? NBUCKET : 1;
    layout(m, g, z->edge_lo, z->edge_hi, &z->bucket_floats);
    z->embed_shared = embed_shares(m, z->edge_hi[0] - z->edge_lo[0], z->bucket_floats);
    be->free(m->grads); /* the full-size buffer set_trainable made */
    m->grads = NULL;
    int ok = 1;
    for (int e = 0; e < NEDGE; e++) {
        size_t n = z->edge_hi[e] - z->edge_lo[e];
        if (!n || (e == 0 && z->embed_shared)) continue;
        z->edge[e] = be->alloc(n * sizeof(float));
        if (z->edge[e]) be->memset0(z->edge[e], n * sizeof(float));
        ok = ok && z->edge[e];
    }
    for (int b = 0; b < z->n_bk && z->bucket_floats; b++) {
        z->bk[b].g = be->alloc(z->bucket_floats * sizeof(float));
        ok = ok && z->bk[b].g;
    }
    if (!ok) return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-2 gradient buckets", c->rank, be->name);
    m->grads = c->shard_grads - c->lo; /* not a buffer: gradients live in the windows and the shard */
    m->grads_windowed = 1;
    m->grads_managed = 1;
    st_model_set_residency(m, &(st_residency_hooks){.grad_ready = z2d_grad_ready, .ctx = c});
    c->fresh = 1;
    sync_windows(z);
    return 0;
}

void st_z2dev_backward_begin(st_comm *c, int overlap) {
    st_z2dev *z = c->z2dev;
    z->covered = 0;
    z->overlap = overlap;
    point_layer(c, z->m->cfg.n_layer - 1);
}

int st_z2dev_backward_end(st_comm *c) {
    st_z2dev *z = c->z2dev;
    double t0 = st_now();
    finish_all(c); /* the next forward writes the edges (the fused head), the shard is read after the step */
    c->overlap_seconds += st_now() - t0;
    int rc = z->rc;
    z->rc = 0;
    if (!rc && z->covered != c->n)
        rc = st_fail(ST_ECOMM, "rank %d: internal error: stage-2 backward reduced %zu of %zu gradients", c->rank,
                     z->covered, c->n);
    z->covered = 0;
    z->live = -1;
    sync_windows(z);
    return rc;
}

void st_z2dev_free(st_comm *c) {
    st_z2dev *z = c->z2dev;
    if (!z) return;
    st_model *m = z->m;
    const st_backend *be = m->be;
    if (c->nccl) st_nccl_synchronize(c->nccl); /* nothing queued reads the buffers freed below */
    for (int e = 0; e < NEDGE; e++) be->free(z->edge[e]);
    for (int b = 0; b < NBUCKET; b++) be->free(z->bk[b].g);
    free(z->goff);
    m->grads = NULL; /* st_model_set_trainable / st_model_free find no buffer of ours */
    m->grads_windowed = 0;
    m->grads_managed = 0;
    m->n_gwin = 0;
    if (m->grad_ready_ctx == c) st_model_set_residency(m, NULL);
    free(z);
    c->z2dev = NULL;
}
