/* comm_zero3_dev.c — ZeRO-3 on a device backend (worker/comm_zero3_dev.h), without virtual-memory tricks.
 *
 * Layout: the compact (gradient) space is the weight space (every parameter trains). Each rank keeps its
 * shard [lo, hi) of the fp32 master weights in one device buffer (`master`, shard floats); m->weights is
 * set to master - lo, so the code that reads or writes this rank's parts at weights + offset (optimizer,
 * checkpoint parts, streaming load, final-weight gathers) finds them there; nothing else of the weight
 * space has memory. For forward and backward the model runs `windowed` (worker/model.h): a group
 * (embeddings, a layer, final norm + head) is gathered into one of a few device slots of the largest
 * group's size (two, three with tied embeddings: wte stays until the head has run), the model's weight
 * pointers resolved into the slot while it is resident; under bf16 the slot's compute copy is rounded
 * from the gathered fp32 weights on the device. The gather: each rank copies its own part into the slot
 * and an in-place uneven all-gather (st_nccl_all_gather_parts) fills in the rest; the prefetch hook
 * enqueues the next group's gather on the comm stream while this group computes, and its acquire makes
 * the compute stream wait for it (st_nccl_wait_compute).
 * Gradients: a layer's gradient goes to the one layer gradient buffer the slots share (zeroed by the
 * acquire in backward); final norm + head's and a tied embedding's (written in the training forward's fused
 * head as well as in backward) to resident edge buffers; an untied embedding's (written only after layer
 * 0's reduction) to the layer gradient buffer again. When a group's backward ends (grad_ready) its range is
 * reduce-scattered in chunks (st_nccl_reduce_parts_sum: each owner's part summed into `recv`), the compute
 * stream waits, and recv is added into shard_grads (bias_add over one row: the micro-batches accumulate there
 * as on CPU ranks); an edge buffer is zeroed again. One rank without NCCL copies and adds locally.
 * Outside forward/backward an acquire (a checkpoint snapshot: one tensor at a time, collective) gathers into
 * a slot the same way; such readers find the tensor with st_model_param_weights. The optimizer, the final
 * weights' gathers and the streaming load touch only this rank's parts, at weights + offset. */
#include "worker/comm_zero3_dev.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/cuda/nccl_comm.h"

#define Z3D_SLOTS 3

typedef struct {
    float *w;        /* [slot_floats] the group's fp32 weights */
    uint16_t *w16;   /* [slot_floats] their bf16 copy (precision bf16), else NULL */
    float *g;        /* [layer_floats] a layer's gradients: one buffer shared by the slots (a layer's
                        reduction is finished before the next layer's backward begins) */
    int first, last; /* the group held (parameters) */
    size_t lo, hi;   /* its weight (= compact) range */
    int state;       /* 0 free, 1 gather enqueued (prefetched), 2 resident */
    int g_live;      /* g holds a layer's gradients not yet reduced */
} z3d_slot;

typedef struct st_z3dev st_z3dev;
struct st_z3dev {
    st_model *m;
    int n_slots, in_bwd;
    size_t slot_floats, layer_floats;
    z3d_slot slot[Z3D_SLOTS];
    float *master;       /* [shard] this rank's fp32 master weights */
    float *recv;         /* [recv_floats] this rank's part of a reduce-scattered group */
    size_t recv_floats;
    float *edge[2];      /* gradients of the embeddings and of final norm + head */
    int edge0_shared;    /* untied embeddings: their gradient, written only after the last layer's backward
                            (embedding_bwd), lives in the layer gradient buffer */
    size_t edge_lo[2], edge_hi[2];
};

/* Weight range of parameters [first, last) (registry order is offset order). */
static void span(const st_model *m, int first, int last, size_t *a, size_t *b) {
    *a = m->params[first].offset;
    *b = m->params[last - 1].offset + m->params[last - 1].numel;
}

/* parts[r] = how much of [a, b) lies in rank r's shard. */
static void owner_parts(const st_comm *c, size_t a, size_t b, size_t *parts) {
    for (int r = 0; r < c->world; r++) {
        size_t lo = c->shard * (size_t)r, hi = lo + c->shard;
        size_t s = a > lo ? a : lo, e = b < hi ? b : hi;
        parts[r] = e > s ? e - s : 0;
    }
}

static void keep_rc(st_comm *c, int rc) {
    if (rc && !c->z3_rc) c->z3_rc = rc;
}

/* The model's windows from the slots' state: resident groups' weights, the edge gradient buffers and the
 * resident layers' gradient buffers. */
static void sync_windows(st_z3dev *z) {
    st_model *m = z->m;
    m->n_wwin = m->n_gwin = 0;
    for (int e = 0; e < 2; e++)
        if (z->edge[e]) m->gwin[m->n_gwin++] = (st_res_window){z->edge_lo[e], z->edge_hi[e], z->edge[e], NULL};
    for (int k = 0; k < z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (s->state != 2) continue;
        m->wwin[m->n_wwin++] = (st_res_window){s->lo, s->hi, s->w, s->w16};
        if (s->g_live) m->gwin[m->n_gwin++] = (st_res_window){s->lo, s->hi, s->g, NULL};
    }
}

/* Whether [first, last) is a layer's group (its gradients go to a slot, not an edge buffer). */
static int is_layer_group(const st_z3dev *z, int first) {
    return first >= st_model_layer_first_param(z->m, 0) && first < st_model_layer_first_param(z->m, z->m->cfg.n_layer);
}

/* Enqueues the gather of [first, last) into slot s: this rank's part copied in from the master shard, the
 * others' parts by an in-place all-gather on the comm stream (which first waits for that copy). */
static int gather_start(st_comm *c, z3d_slot *s, int first, int last) {
    st_z3dev *z = c->z3dev;
    const st_backend *be = z->m->be;
    span(z->m, first, last, &s->lo, &s->hi);
    if (s->hi - s->lo > z->slot_floats)
        return st_fail(ST_EINVAL, "rank %d: internal error: a stage-3 group of %zu floats exceeds the gather buffer",
                       c->rank, s->hi - s->lo);
    s->first = first;
    s->last = last;
    size_t os = s->lo > c->lo ? s->lo : c->lo, oe = s->hi < c->hi ? s->hi : c->hi;
    if (os < oe) be->copy(s->w + (os - s->lo), z->master + (os - c->lo), (oe - os) * sizeof(float));
    if (!c->nccl) return 0;
    size_t parts[c->world];
    owner_parts(c, s->lo, s->hi, parts);
    return st_nccl_all_gather_parts(c->nccl, s->w, parts);
}

/* A slot for a new gather: a free one; a prefetched gather nobody acquired is dropped (after the compute
 * stream waited for it, so nothing writes the slot behind the next use). NULL when all are resident. */
static z3d_slot *free_slot(st_comm *c) {
    st_z3dev *z = c->z3dev;
    for (int k = 0; k < z->n_slots; k++)
        if (z->slot[k].state == 0 && !z->slot[k].g_live) return &z->slot[k];
    for (int k = 0; k < z->n_slots; k++)
        if (z->slot[k].state == 1) {
            if (c->nccl) keep_rc(c, st_nccl_wait_compute(c->nccl));
            z->slot[k].state = 0;
            return &z->slot[k];
        }
    return NULL;
}

static void z3d_prefetch(void *ctx, int first, int last) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    if (!c->nccl || !z->m->in_compute || !c->z3_prefetch) return;
    for (int k = 0; k < z->n_slots; k++)
        if (z->slot[k].state == 1) return; /* one in flight at a time */
    z3d_slot *s = NULL;
    for (int k = 0; k < z->n_slots && !s; k++)
        if (z->slot[k].state == 0 && !z->slot[k].g_live) s = &z->slot[k];
    if (!s) return;
    int rc = gather_start(c, s, first, last);
    keep_rc(c, rc);
    if (!rc) s->state = 1;
}

static void z3d_acquire(void *ctx, int first, int last) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    st_model *m = z->m;
    if (last <= first) return;
    double t0 = st_now();
    z3d_slot *s = NULL;
    for (int k = 0; k < z->n_slots && !s; k++)
        if (z->slot[k].state == 1 && z->slot[k].first == first && z->slot[k].last == last) s = &z->slot[k];
    int rc = 0;
    if (!s) {
        s = free_slot(c);
        rc = s ? gather_start(c, s, first, last)
               : st_fail(ST_EINVAL, "rank %d: internal error: no free stage-3 gather buffer", c->rank);
    }
    if (!rc && c->nccl) rc = st_nccl_wait_compute(c->nccl); /* the gather (and what came before) done */
    keep_rc(c, rc);
    if (!s) return;
    s->state = 2;
    if (s->w16 && m->in_compute) m->be->to_bf16(s->w16, s->w, s->hi - s->lo);
    if (z->in_bwd && is_layer_group(z, first)) { /* the layer's backward accumulates into zeros */
        for (int k = 0; k < z->n_slots; k++)
            if (z->slot[k].g_live)
                keep_rc(c, st_fail(ST_EINVAL, "rank %d: internal error: a layer's gradients were not reduced before "
                                              "the next layer's backward", c->rank));
        m->be->memset0(s->g, (s->hi - s->lo) * sizeof(float));
        s->g_live = 1;
    }
    sync_windows(z);
    c->overlap_seconds += st_now() - t0;
}

static void z3d_release(void *ctx, int first, int last) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    for (int k = 0; k < z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (s->state == 2 && s->first == first && s->last == last) {
            s->state = 0; /* its gradient buffer stays until grad_ready reduced it */
            break;
        }
    }
    sync_windows(z);
}

static void z3d_progress(void *ctx) { (void)ctx; }

/* The gradients of [lo, hi) and the buffer that holds them (slot or edge; *edge set for an edge). */
static float *grad_source(st_z3dev *z, size_t lo, size_t hi, int *edge, z3d_slot **slot) {
    *edge = 0;
    *slot = NULL;
    for (int e = 0; e < 2; e++)
        if (z->edge[e] && lo >= z->edge_lo[e] && hi <= z->edge_hi[e]) {
            *edge = 1;
            return z->edge[e] + (lo - z->edge_lo[e]);
        }
    for (int k = 0; k < z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (s->g_live && lo >= s->lo && hi <= s->hi) {
            *slot = s;
            return s->g + (lo - s->lo);
        }
    }
    return NULL;
}

/* grad_ready hook: [lo, hi) summed over the ranks into the owners' shard_grads (see the top of the file). */
static void z3d_grad_ready(void *ctx, size_t lo, size_t hi) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    const st_backend *be = z->m->be;
    double t0 = st_now();
    if (c->fresh) { /* the first reduction of a step: the last step's sums are spent (or the optimizer zeroed them) */
        if (!c->shard_zeroed) be->memset0(c->shard_grads, c->shard * sizeof(float));
        c->fresh = c->shard_zeroed = 0;
    }
    int edge;
    z3d_slot *slot;
    float *src = grad_source(z, lo, hi, &edge, &slot);
    if (!src) {
        keep_rc(c, st_fail(ST_EINVAL, "rank %d: internal error: stage-3 gradients [%zu, %zu) have no buffer", c->rank,
                           lo, hi));
        return;
    }
    int rc = 0;
    for (size_t a = lo; a < hi && !rc; a += z->recv_floats) { /* in chunks: recv holds one rank's part of one */
        size_t b = hi - a < z->recv_floats ? hi : a + z->recv_floats;
        size_t os = a > c->lo ? a : c->lo, oe = b < c->hi ? b : c->hi, own = oe > os ? oe - os : 0;
        if (c->nccl) {
            size_t parts[c->world];
            owner_parts(c, a, b, parts);
            rc = st_nccl_reduce_parts_sum(c->nccl, z->recv, src + (a - lo), parts);
            if (!rc) rc = st_nccl_wait_compute(c->nccl); /* recv is read and src reused on the compute stream */
            if (!rc && own) be->bias_add(c->shard_grads + (os - c->lo), z->recv, 1, (int)own);
        } else if (own) { /* one rank: the sum is its own gradient */
            be->bias_add(c->shard_grads + (os - c->lo), src + (os - lo), 1, (int)own);
        }
    }
    keep_rc(c, rc);
    if (edge) be->memset0(src, (hi - lo) * sizeof(float)); /* the next micro-batch accumulates into zeros */
    if (slot) slot->g_live = 0;
    if (slot && z->edge0_shared && slot->first == st_model_layer_first_param(z->m, 0)) /* the embeddings' next */
        be->memset0(z->edge[0], (z->edge_hi[0] - z->edge_lo[0]) * sizeof(float));
    sync_windows(z);
    c->overlap_seconds += st_now() - t0;
}

/* Floats of the receive buffer: one rank's part of a reduce-scattered chunk of at most ST_Z3_CHUNK. */
static size_t recv_floats(size_t shard, size_t most) {
    size_t r = shard < most ? shard : most;
    return r < ST_Z3_CHUNK ? r : ST_Z3_CHUNK;
}

/* Whether the embeddings' gradient (n floats) can live in the layer gradient buffer: untied, so nothing
 * writes it before layer 0's gradients are reduced. */
static int embed_shares(const st_model *m, size_t n, size_t layer_floats) {
    return !m->cfg.tied_embeddings && n <= layer_floats;
}

/* The largest group: the embeddings, a layer, or final norm + head. */
static void group_sizes(const st_model *m, size_t *most, size_t *layer_most) {
    int L = m->cfg.n_layer, fn = st_model_layer_first_param(m, L);
    size_t a, b;
    *most = *layer_most = 0;
    for (int l = 0; l < L; l++) {
        span(m, st_model_layer_first_param(m, l), st_model_layer_first_param(m, l + 1), &a, &b);
        if (b - a > *layer_most) *layer_most = b - a;
    }
    *most = *layer_most;
    span(m, 0, st_model_layer_first_param(m, 0), &a, &b);
    if (b - a > *most) *most = b - a;
    span(m, fn, m->n_params, &a, &b);
    if (b - a > *most) *most = b - a;
}

void st_z3dev_floats(const st_model *m, size_t shard, int bf16, size_t *weight_floats, size_t *grad_floats) {
    size_t most, layer_most, a, b, e;
    group_sizes(m, &most, &layer_most);
    span(m, 0, st_model_layer_first_param(m, 0), &a, &b);
    e = embed_shares(m, b - a, layer_most) ? 0 : b - a;
    span(m, st_model_layer_first_param(m, m->cfg.n_layer), m->n_params, &a, &b);
    e += b - a;
    size_t slots = m->cfg.tied_embeddings ? 3 : 2;
    *weight_floats = slots * (most + (bf16 ? (most + 1) / 2 : 0)) + shard; /* slots (+ bf16 copies), master */
    *grad_floats = layer_most + e + shard + recv_floats(shard, most); /* a layer's, edges, shard_grads, recv */
}

int st_z3dev_supported(const st_model *m) {
    if (m->n_grads != m->n_weights || m->lora || m->prompt || m->qlora || m->n_w16) return 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].grad_offset != (long)m->params[i].offset) return 0;
    return 1;
}

int st_z3dev_init(st_comm *c, st_model *m) {
    const st_backend *be = m->be;
    if (!st_z3dev_supported(m))
        return st_fail(ST_ECONFIG, "sharding.stage 3 on the %s backend needs every parameter trained (finetune.mode "
                                   "full, every module and layer): frozen parameters, adapters and progressive "
                                   "stages are supported on CPU ranks only; use sharding.stage 2", be->name);
    if (m->cfg.n_layer < 1) return st_fail(ST_ECONFIG, "sharding.stage 3 on the %s backend needs a layer", be->name);
    st_z3dev *z = calloc(1, sizeof *z);
    if (!z) return st_fail(ST_ENOMEM, "out of memory");
    c->z3dev = z;
    z->m = m;
    int bf16 = m->precision == ST_PRECISION_BF16;
    group_sizes(m, &z->slot_floats, &z->layer_floats);
    z->n_slots = m->cfg.tied_embeddings ? 3 : 2;
    z->recv_floats = recv_floats(c->shard, z->slot_floats);
    int L = m->cfg.n_layer, e0 = st_model_layer_first_param(m, 0), fn = st_model_layer_first_param(m, L);
    span(m, 0, e0, &z->edge_lo[0], &z->edge_hi[0]);
    span(m, fn, m->n_params, &z->edge_lo[1], &z->edge_hi[1]);
    /* the full gradient buffer and bf16 copy go first, the full weights once the master shard is cut */
    be->free(m->grads);
    m->grads = NULL;
    be->free(m->weights_bf16);
    m->weights_bf16 = NULL;
    z->master = be->alloc(c->shard * sizeof(float));
    if (!z->master) return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 shard", c->rank, be->name);
    be->memset0(z->master, c->shard * sizeof(float)); /* the padding past the last parameter */
    size_t own_end = c->hi < c->n ? c->hi : c->n;
    if (own_end > c->lo && m->weights) /* NULL: built without weights (buffers_external), streamed in after */
        be->copy(z->master, m->weights + c->lo, (own_end - c->lo) * sizeof(float));
    be->free(m->weights); /* from here on this rank's parts are the whole of its weights */
    m->weights = z->master - c->lo; /* weights + offset reaches this rank's parts (see the top of the file) */
    int ok = 1;
    for (int k = 0; k < z->n_slots; k++) {
        z->slot[k].w = be->alloc(z->slot_floats * sizeof(float));
        z->slot[k].w16 = bf16 ? be->alloc(z->slot_floats * sizeof(uint16_t)) : NULL;
        z->slot[k].g = k ? z->slot[0].g : be->alloc(z->layer_floats * sizeof(float));
        ok = ok && z->slot[k].w && (!bf16 || z->slot[k].w16) && z->slot[k].g;
    }
    z->edge0_shared = embed_shares(m, z->edge_hi[0] - z->edge_lo[0], z->layer_floats) && z->slot[0].g;
    for (int e = 0; e < 2; e++) {
        size_t n = z->edge_hi[e] - z->edge_lo[e];
        z->edge[e] = e == 0 && z->edge0_shared ? z->slot[0].g : n ? be->alloc(n * sizeof(float)) : NULL;
        ok = ok && (!n || z->edge[e]);
        if (z->edge[e]) be->memset0(z->edge[e], n * sizeof(float));
    }
    z->recv = be->alloc(z->recv_floats * sizeof(float));
    c->shard_grads = be->alloc(c->shard * sizeof(float));
    if (!ok || !z->recv || !c->shard_grads)
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 gather buffers", c->rank, be->name);
    be->memset0(c->shard_grads, c->shard * sizeof(float));
    m->grads = c->shard_grads - c->lo; /* not read: gradients live in the windows and the shard */
    const char *pf = getenv("SHARDTUNE_ZERO3_PREFETCH");
    c->z3_prefetch = !(pf && strcmp(pf, "0") == 0);
    c->model = m;
    m->windowed = 1;
    m->acquire = z3d_acquire;
    m->release = z3d_release;
    m->prefetch = z3d_prefetch;
    m->progress = z3d_progress;
    m->residency_ctx = c;
    m->grad_ready = z3d_grad_ready;
    m->grad_ready_ctx = c;
    sync_windows(z);
    return 0;
}

void st_z3dev_backward(st_comm *c, int in_backward) {
    if (c->z3dev) c->z3dev->in_bwd = in_backward;
}

void st_z3dev_free(st_comm *c) {
    st_z3dev *z = c->z3dev;
    if (!z) return;
    st_model *m = z->m;
    const st_backend *be = m->be;
    if (c->nccl) st_nccl_synchronize(c->nccl); /* nothing queued writes the buffers freed below */
    for (int k = 0; k < z->n_slots; k++) {
        be->free(z->slot[k].w);
        be->free(z->slot[k].w16);
        if (k == 0) be->free(z->slot[k].g); /* shared */
    }
    for (int e = 0; e < 2; e++)
        if (e || !z->edge0_shared) be->free(z->edge[e]);
    be->free(z->master);
    be->free(z->recv);
    /* the model keeps no weights: a device stage-3 communicator is freed at the end of a run only
     * (st_comm_reshard_optim refuses to rebuild it) */
    m->weights = NULL;
    m->grads = NULL;
    m->windowed = 0;
    m->n_wwin = m->n_gwin = 0;
    free(z);
    c->z3dev = NULL;
}
