/* comm_zero2_dev.c — ZeRO-2 on a device backend without a full-size gradient buffer (worker/comm_zero2_dev.h).
 *
 * The groups whose gradients are reported (st_model_backward's grad_ready order: final norm + head, the
 * layers top-down with each layer's adapters after its base parameters, the embeddings last):
 *  - edges: the embeddings' and the final norm + head's compact ranges, each in a resident buffer (the
 *    training forward's fused head writes the head's and a tied embedding's gradients before backward);
 *  - a layer: the compact range of its base parameters and that of its adapters, both in the one bucket
 *    (base at 0, adapters after), pointed at the next layer with gradients once both were reduced;
 *  - untied embeddings that fit in the bucket have no edge buffer: their gradient (written only by the
 *    embedding backward, after the last layer's reduction) goes to the bucket, pointed at them after the
 *    lowest layer (EMBED below).
 * The gradient windows (st_model.gwin) say where each lives; the weights stay whole on every rank, so the
 * parameter all-gather after the update is comm.c's stage 2 as before. Together the groups must cover the
 * trainable set exactly (st_z2dev_plan_used checks it; else comm.c keeps the full buffer);
 *  - the prompt's tensors (prompt tuning's table, P-tuning's encoder, prefix tuning's table, which every
 *    layer's backward writes): a third resident edge buffer, reported after the embeddings. */
#include "worker/comm_zero2_dev.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/cuda/nccl_comm.h"
#include "worker/comm_dev.h"
#include "worker/lora.h"
#include "worker/prompt.h"

#define EMBED (-2) /* z->layer: the bucket holds the embeddings' gradient */
#define NEDGE 3    /* the edge groups: embeddings, final norm + head, the prompt's tensors */

typedef struct st_z2dev st_z2dev;
struct st_z2dev {
    st_model *m;
    float *edge[NEDGE];      /* embeddings, final norm + head, prompt tables (NULL when nothing of it trains) */
    size_t edge_lo[NEDGE], edge_hi[NEDGE];
    float *bucket;           /* [bucket_floats] the gradients of the layer whose backward runs */
    size_t bucket_floats;
    float *recv;             /* [recv_floats] this rank's part of one reduce-scattered chunk */
    size_t recv_floats;
    int layer;               /* the layer the bucket holds, EMBED, -1 none */
    int embed_shared;        /* the embeddings' gradient goes to the bucket (edge[0] NULL) */
    long *goff;              /* [n_params] the trainable set's gradient offsets (fixed for this communicator) */
    size_t span_lo[2], span_hi[2]; /* its base parameters' and its adapters' compact ranges */
    int left;                /* of its non-empty ranges, not reduced yet */
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

static size_t recv_size(size_t shard, size_t most) {
    size_t r = shard < most ? shard : most;
    return r < ST_Z3_CHUNK ? r : ST_Z3_CHUNK;
}

/* Whether untied embeddings' gradient (n floats) can live in the bucket (bucket floats). */
static int embed_shares(const st_model *m, size_t n, size_t bucket) { return !m->cfg.tied_embeddings && n && n <= bucket; }

size_t st_z2dev_floats(const st_model *m, const long *grad_offset, size_t shard) {
    size_t elo[NEDGE], ehi[NEDGE], bucket, e = 0;
    layout(m, grad_offset, elo, ehi, &bucket);
    size_t most = bucket;
    for (int k = 0; k < NEDGE; k++) e += ehi[k] - elo[k];
    if (embed_shares(m, ehi[0] - elo[0], bucket)) e -= ehi[0] - elo[0];
    for (int k = 0; k < NEDGE; k++)
        if (ehi[k] - elo[k] > most) most = ehi[k] - elo[k];
    return e + bucket + recv_size(shard, most);
}

/* The model's gradient windows: the edges and, while a layer is pointed at, its ranges in the bucket. */
static void sync_windows(st_z2dev *z) {
    st_model *m = z->m;
    m->n_gwin = 0;
    for (int e = 0; e < NEDGE; e++)
        if (z->edge[e]) m->gwin[m->n_gwin++] = (st_res_window){z->edge_lo[e], z->edge_hi[e], z->edge[e], NULL};
    if (z->layer == EMBED) m->gwin[m->n_gwin++] = (st_res_window){z->edge_lo[0], z->edge_hi[0], z->bucket, NULL};
    if (z->layer < 0) return;
    size_t off = 0;
    for (int s = 0; s < 2; s++) {
        if (z->span_hi[s] > z->span_lo[s])
            m->gwin[m->n_gwin++] = (st_res_window){z->span_lo[s], z->span_hi[s], z->bucket + off, NULL};
        off += z->span_hi[s] - z->span_lo[s];
    }
}

/* Points the bucket at the highest layer <= l whose backward writes gradients (its backward runs: >= the
 * model's lowest trained layer), zeroed; none: the embeddings when they share it (EMBED), else -1. */
static void point_layer(st_z2dev *z, int l) {
    st_model *m = z->m;
    z->layer = -1;
    z->left = 0;
    for (; l >= m->lowest_trained_layer && l >= 0; l--) {
        size_t lo[2], hi[2];
        layer_spans(m, z->goff, l, lo, hi);
        if (hi[0] == lo[0] && hi[1] == lo[1]) continue;
        z->layer = l;
        for (int s = 0; s < 2; s++) {
            z->span_lo[s] = lo[s], z->span_hi[s] = hi[s];
            z->left += hi[s] > lo[s];
        }
        m->be->memset0(z->bucket, (hi[0] - lo[0] + hi[1] - lo[1]) * sizeof(float));
        break;
    }
    if (z->layer < 0 && z->embed_shared) {
        z->layer = EMBED;
        m->be->memset0(z->bucket, (z->edge_hi[0] - z->edge_lo[0]) * sizeof(float));
    }
    sync_windows(z);
}

static void keep(st_z2dev *z, int rc) {
    if (rc && !z->rc) z->rc = rc;
}

/* grad_ready hook: [lo, hi) is a whole group range (an edge, or one of the bucket's layer's ranges). */
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
    int edge = 0;
    for (int e = 0; e < NEDGE && !src; e++)
        if (z->edge[e] && lo >= z->edge_lo[e] && hi <= z->edge_hi[e]) src = z->edge[e] + (lo - z->edge_lo[e]), edge = 1;
    int embed = !src && z->layer == EMBED && lo >= z->edge_lo[0] && hi <= z->edge_hi[0];
    if (embed) src = z->bucket + (lo - z->edge_lo[0]);
    size_t off = 0;
    for (int s = 0; s < 2 && !src && z->layer >= 0; s++) {
        if (lo >= z->span_lo[s] && hi <= z->span_hi[s] && hi > lo) src = z->bucket + off + (lo - z->span_lo[s]);
        off += z->span_hi[s] - z->span_lo[s];
    }
    if (!src) {
        keep(z, st_fail(ST_EINVAL, "rank %d: internal error: stage-2 gradients [%zu, %zu) have no buffer", c->rank, lo, hi));
        return;
    }
    keep(z, st_commdev_reduce_add(c, z->recv, z->recv_floats, src, lo, hi));
    z->covered += hi - lo;
    if (edge) be->memset0(src, (hi - lo) * sizeof(float)); /* the next micro-batch accumulates into zeros */
    else if (embed) z->layer = -1, sync_windows(z);
    else if (--z->left == 0) point_layer(z, z->layer - 1); /* the bucket goes to the next layer down */
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
    z->layer = -1;
    z->goff = g;
    layout(m, g, z->edge_lo, z->edge_hi, &z->bucket_floats);
    size_t most = z->bucket_floats;
    for (int e = 0; e < NEDGE; e++)
        if (z->edge_hi[e] - z->edge_lo[e] > most) most = z->edge_hi[e] - z->edge_lo[e];
    z->embed_shared = embed_shares(m, z->edge_hi[0] - z->edge_lo[0], z->bucket_floats);
    z->recv_floats = recv_size(c->shard, most);
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
    z->bucket = z->bucket_floats ? be->alloc(z->bucket_floats * sizeof(float)) : NULL;
    z->recv = z->recv_floats ? be->alloc(z->recv_floats * sizeof(float)) : NULL;
    if (!ok || (z->bucket_floats && !z->bucket) || (z->recv_floats && !z->recv))
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-2 gradient buckets", c->rank, be->name);
    m->grads = c->shard_grads - c->lo; /* not a buffer: gradients live in the windows and the shard */
    m->grads_windowed = 1;
    m->grads_managed = 1;
    st_model_set_residency(m, &(st_residency_hooks){.grad_ready = z2d_grad_ready, .ctx = c});
    c->fresh = 1;
    sync_windows(z);
    return 0;
}

void st_z2dev_backward_begin(st_comm *c) {
    st_z2dev *z = c->z2dev;
    z->covered = 0;
    point_layer(z, z->m->cfg.n_layer - 1);
}

int st_z2dev_backward_end(st_comm *c) {
    st_z2dev *z = c->z2dev;
    int rc = z->rc;
    z->rc = 0;
    if (!rc && z->covered != c->n)
        rc = st_fail(ST_ECOMM, "rank %d: internal error: stage-2 backward reduced %zu of %zu gradients", c->rank,
                     z->covered, c->n);
    z->covered = 0;
    z->layer = -1;
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
    be->free(z->bucket);
    be->free(z->recv);
    free(z->goff);
    m->grads = NULL; /* st_model_set_trainable / st_model_free find no buffer of ours */
    m->grads_windowed = 0;
    m->grads_managed = 0;
    m->n_gwin = 0;
    if (m->grad_ready_ctx == c) st_model_set_residency(m, NULL);
    free(z);
    c->z2dev = NULL;
}
