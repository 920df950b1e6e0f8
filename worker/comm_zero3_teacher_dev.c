/* comm_zero3_teacher_dev.c — ZeRO-3's distillation teacher on a device backend (comm_zero3_teacher_dev.h).
 *
 * Layout: the teacher is frozen and its registry is in offset order, so its one space is the weight space:
 * rank r keeps [r * shard, (r + 1) * shard) of it in `own` (shard floats, zero past the last weight), and
 * m->weights = own - lo, so the streamed load writes this rank's parts at weights + offset; nothing else of
 * the weight space has memory. The model runs `windowed`: an acquired group's weights are found in its slot
 * (worker/model.h wwin), the slot's bf16 copy beside it under bf16.
 * Gathers: this rank's part of the group copied into the slot on the compute stream, then an in-place uneven
 * all-gather (st_nccl_all_gather_parts) on the NCCL comm stream, which first waits for the compute stream,
 * then the mark Z3T_MARK recorded. The student's device stage 3 (comm_zero3_dev.c) uses marks 0-7 of the
 * same communicator (it asserts it stays below this one); the teacher only the last one, so at most one teacher gather is recorded and not yet
 * waited for: the prefetch hook starts the next group's gather only when no other is in flight, and an
 * acquire of another group first waits for (and drops) a prefetched one nobody acquired. The acquire makes
 * the compute stream wait for the mark, then (bf16) rounds the slot's compute copy. One rank without NCCL:
 * its part is the whole group. A failure inside a hook (which cannot return one) goes to the student
 * communicator's z3_rc, which the step's gradient reduction reports.
 * int8 (st_model_set_int8 on the windowed model, residency_int8): the first acquire while it packs makes this
 * rank's share of the pack space (pshard bytes, a multiple of 4: the all-gathers move whole floats) and a pack
 * buffer per slot of the largest group's packs; while packing, a group's fp32 weights are gathered whole, the
 * model packs them into the slot's pack window and the release copies this rank's share out. Once packed,
 * a group's gather moves its unquantized fp32 runs and its packs; st_z3teach_int8_compact keeps only the
 * unquantized weights in the shard (a run's part found by the quantized floats before it). */
#include "worker/comm_zero3_teacher_dev.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "kernels/cuda/nccl_comm.h"

#define Z3T_SLOTS 3                  /* two, three with a tied head */
#define Z3T_MARK (ST_NCCL_EVENTS - 1) /* the teacher's comm-stream mark (see the top of the file) */

typedef struct {
    float *w;        /* [cap] the group's fp32 weights */
    uint16_t *w16;   /* [cap] their bf16 copy (bf16), else NULL */
    uint8_t *p8;     /* [pcap] the group's int8 packs (int8), else NULL */
    int first, last; /* the group held (parameters) */
    size_t lo, hi;   /* its weight range */
    size_t pa, pb;   /* its pack bytes (pa = pb: none) */
    int state;       /* 0 free, 1 gather enqueued (prefetched), 2 resident */
} z3t_slot;

struct st_z3teach {
    st_comm *c; /* the student's communicator: c->nccl (rebuilt with it), c->z3_prefetch, c->z3_rc */
    st_model *m;
    int rank, world, n_slots;
    size_t shard, lo, hi, cap;
    float *own; /* [shard] this rank's part of the weight space; compact: only its unquantized weights */
    int compact; /* int8: the quantized weights' fp32 values were dropped (st_z3teach_int8_compact) */
    /* int8 (st_model_set_int8): this rank's share [plo, phi) of the pack space (pshard bytes, a multiple of 4
     * so the shares are whole floats for the all-gather), made on the first acquire that packs */
    uint8_t *pown;
    size_t pshard, plo, phi, pcap;
    z3t_slot slot[Z3T_SLOTS];
    /* SHARDTUNE_ZERO3_DEV_FAULT=teacher-gather-wait (tests only: the stream-order checker must catch it): the
     * teacher computes on a group without waiting for its gather */
    int fault_gather_wait;
};

/* Weight range of parameters [first, last) (registry order is offset order). */
static void span(const st_model *m, int first, int last, size_t *a, size_t *b) {
    *a = m->params[first].offset;
    *b = m->params[last - 1].offset + m->params[last - 1].numel;
}

/* The largest group the forward acquires: the embeddings, a layer, or the final norm + head. */
static size_t largest_group(const st_model *m) {
    int L = m->cfg.n_layer, nb = st_model_base_params(m);
    size_t most = 0, a, b;
    for (int g = -1; g <= L; g++) {
        int first = g < 0 ? 0 : st_model_layer_first_param(m, g);
        int last = g < 0 ? st_model_layer_first_param(m, 0) : g < L ? st_model_layer_first_param(m, g + 1) : nb;
        if (last <= first) continue;
        span(m, first, last, &a, &b);
        if (b - a > most) most = b - a;
    }
    return most;
}

static void keep_rc(st_z3teach *z, int rc) {
    if (rc && !z->c->z3_rc) z->c->z3_rc = rc;
}

/* The model's weight windows: the resident slots. */
static void sync_windows(st_z3teach *z) {
    st_model *m = z->m;
    m->n_wwin = m->n_gwin = m->n_pwin = 0;
    for (int k = 0; k < z->n_slots; k++) {
        const z3t_slot *s = &z->slot[k];
        if (s->state != 2) continue;
        m->wwin[m->n_wwin++] = (st_res_window){s->lo, s->hi, s->w, s->w16};
        if (s->pb > s->pa) m->pwin[m->n_pwin++] = (st_pack_window){s->lo, s->hi, s->p8, s->pa};
    }
}

/* Elements [a, b) of a space sharded `shard` per rank into dst (dst[0] = element a): this rank's part copied
 * from own (its element lo at own[0], less `skip` elements dropped before it), the others' all-gathered in
 * place (elements of 4 bytes). */
static int gather_range(st_z3teach *z, void *dst, const void *own, size_t skip, size_t shard, size_t lo, size_t elem,
                        size_t a, size_t b) {
    if (b <= a) return 0;
    size_t hi = lo + shard, os = a > lo ? a : lo, oe = b < hi ? b : hi;
    if (os < oe)
        z->m->be->copy((char *)dst + (os - a) * elem, (const char *)own + (os - lo - skip) * elem, (oe - os) * elem);
    if (!z->c->nccl) return 0;
    size_t parts[z->world];
    for (int r = 0; r < z->world; r++) {
        size_t rlo = shard * (size_t)r, rhi = rlo + shard;
        size_t x = a > rlo ? a : rlo, y = b < rhi ? b : rhi;
        parts[r] = y > x ? (y - x) * elem / sizeof(float) : 0;
    }
    return st_nccl_all_gather_parts(z->c->nccl, dst, parts);
}

/* Quantized floats in this rank's weight range before x (st_model_int8_range): what a compacted shard
 * dropped before element x. */
static size_t quantized_before(const st_z3teach *z, size_t x) {
    size_t n = 0, qlo, qhi;
    for (int k = 0; st_model_int8_range(z->m, k, &qlo, &qhi) && qlo < x; k++) {
        size_t a = qlo > z->lo ? qlo : z->lo, b = qhi < x ? qhi : x;
        n += b > a ? b - a : 0;
    }
    return n;
}

/* Unquantized fp32 run [x, y) of the slot's group (no quantized weight inside). */
static int gather_run(st_z3teach *z, z3t_slot *s, size_t x, size_t y) {
    size_t skip = z->compact ? quantized_before(z, x > z->lo ? x : z->lo) : 0;
    return gather_range(z, s->w + (x - s->lo), z->own, skip, z->shard, z->lo, sizeof(float), x, y);
}

/* int8, packs made (st_model_int8_packs 2): the fp32 weights of the slot's group that are not quantized (norms,
 * biases, embeddings, a tied head), then its packs in bytes. */
static int gather_int8(st_z3teach *z, z3t_slot *s) {
    size_t x = s->lo, qlo, qhi;
    int rc = 0;
    for (int k = 0; !rc && st_model_int8_range(z->m, k, &qlo, &qhi) && qlo < s->hi; k++) { /* weight order */
        if (qhi <= x) continue;
        if (qlo > x) rc = gather_run(z, s, x, qlo);
        x = qhi;
    }
    if (!rc && x < s->hi) rc = gather_run(z, s, x, s->hi);
    /* the shares are whole floats: pshard, pa and pb are multiples of 4 (the packs are 64-byte aligned) */
    if (!rc) rc = gather_range(z, s->p8, z->pown, 0, z->pshard / 4, z->plo / 4, sizeof(float), s->pa / 4, s->pb / 4);
    return rc;
}

/* The pack share and the slots' pack buffers, on the first acquire while st_model_set_int8 packs. */
static int int8_setup(st_z3teach *z, size_t total) {
    const st_model *m = z->m;
    const st_backend *be = m->be;
    size_t w = (size_t)z->world, pa, pb, t;
    uint8_t *sp;
    z->pshard = ((total + w - 1) / w + 3) / 4 * 4;
    z->plo = z->pshard * (size_t)z->rank;
    z->phi = z->plo + z->pshard;
    int L = m->cfg.n_layer, nb = st_model_base_params(m);
    for (int g = -1; g <= L; g++) { /* the largest group's packs */
        int first = g < 0 ? 0 : st_model_layer_first_param(m, g);
        int last = g < 0 ? st_model_layer_first_param(m, 0) : g < L ? st_model_layer_first_param(m, g + 1) : nb;
        size_t a, b;
        if (last <= first) continue;
        span(m, first, last, &a, &b);
        if (st_model_int8_packs(m, a, b, &sp, &pa, &pb, &t) && pb - pa > z->pcap) z->pcap = pb - pa;
    }
    int ok = (z->pown = be->alloc(z->pshard ? z->pshard : 4)) != NULL;
    for (int k = 0; k < z->n_slots && ok; k++) ok = (z->slot[k].p8 = be->alloc(z->pcap ? z->pcap : 4)) != NULL;
    if (!ok)
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the sharded teacher's int8 packs", z->rank, be->name);
    if (z->pshard) be->memset0(z->pown, z->pshard);
    return 0;
}

/* Enqueues the gather of [first, last) into slot s (see the top of the file); int8: while packing the whole
 * group's fp32 weights (the packs are made in the slot), once packed its packs and unquantized weights. */
static int gather_start(st_z3teach *z, z3t_slot *s, int first, int last) {
    span(z->m, first, last, &s->lo, &s->hi);
    if (s->hi - s->lo > z->cap)
        return st_fail(ST_EINVAL, "rank %d: internal error: a teacher group of %zu floats exceeds the gather buffer",
                       z->rank, s->hi - s->lo);
    s->first = first;
    s->last = last;
    s->pa = s->pb = 0;
    uint8_t *sp;
    size_t total;
    int packs = st_model_int8_packs(z->m, s->lo, s->hi, &sp, &s->pa, &s->pb, &total), rc = 0;
    if (packs && !z->pown) rc = int8_setup(z, total);
    if (!rc && s->pb - s->pa > z->pcap)
        rc = st_fail(ST_EINVAL, "rank %d: internal error: a teacher group's packs exceed the gather buffer", z->rank);
    if (rc) {
        s->pa = s->pb = 0;
        return rc;
    }
    if (z->compact && packs != 2)
        return st_fail(ST_EINVAL, "rank %d: internal error: a compacted teacher shard gathered without its packs", z->rank);
    rc = packs == 2 ? gather_int8(z, s) : gather_range(z, s->w, z->own, 0, z->shard, z->lo, sizeof(float), s->lo, s->hi);
    return rc || !z->c->nccl ? rc : st_nccl_record(z->c->nccl, Z3T_MARK);
}

/* The compute stream waits for the last teacher gather (and what the comm stream queued before it). */
static int gather_wait(st_z3teach *z) {
    return z->c->nccl && !z->fault_gather_wait ? st_nccl_wait_event(z->c->nccl, Z3T_MARK) : 0;
}

static void t_prefetch(void *ctx, int first, int last) {
    st_z3teach *z = ctx;
    if (!z->c->nccl || !z->c->z3_prefetch || last <= first) return;
    z3t_slot *s = NULL;
    for (int k = 0; k < z->n_slots; k++) {
        if (z->slot[k].state == 1) return; /* one in flight at a time: one mark */
        if (z->slot[k].state == 0 && !s) s = &z->slot[k];
    }
    if (!s) return;
    int rc = gather_start(z, s, first, last);
    keep_rc(z, rc);
    if (!rc) s->state = 1;
}

static void t_acquire(void *ctx, int first, int last) {
    st_z3teach *z = ctx;
    st_model *m = z->m;
    if (last <= first) return;
    z3t_slot *s = NULL;
    int rc = 0;
    for (int k = 0; k < z->n_slots && !s; k++)
        if (z->slot[k].state == 1 && z->slot[k].first == first && z->slot[k].last == last) s = &z->slot[k];
    if (!s) {
        for (int k = 0; k < z->n_slots; k++)
            if (z->slot[k].state == 1) { /* a prefetch nobody acquired: nothing may write its slot later */
                keep_rc(z, gather_wait(z));
                z->slot[k].state = 0;
            }
        for (int k = 0; k < z->n_slots && !s; k++)
            if (z->slot[k].state == 0) s = &z->slot[k];
        rc = s ? gather_start(z, s, first, last)
               : st_fail(ST_EINVAL, "rank %d: internal error: no free teacher gather buffer", z->rank);
    }
    if (!rc) rc = gather_wait(z);
    keep_rc(z, rc);
    if (!s) return;
    s->state = 2;
    if (s->w16) m->be->to_bf16(s->w16, s->w, s->hi - s->lo); /* the teacher always computes with it */
    sync_windows(z);
}

static void t_release(void *ctx, int first, int last) {
    st_z3teach *z = ctx;
    for (int k = 0; k < z->n_slots; k++) {
        z3t_slot *s = &z->slot[k];
        if (s->state == 2 && s->first == first && s->last == last) {
            uint8_t *sp;
            size_t pa, pb, total;
            if (s->pb > s->pa && st_model_int8_packs(z->m, s->lo, s->hi, &sp, &pa, &pb, &total) == 1) {
                /* st_model_set_int8 packed the group into the slot: this rank's share of the packs stays */
                size_t x = s->pa > z->plo ? s->pa : z->plo, y = s->pb < z->phi ? s->pb : z->phi;
                if (x < y) z->m->be->copy(z->pown + (x - z->plo), s->p8 + (x - s->pa), y - x);
            }
            s->state = 0;
            break;
        }
    }
    sync_windows(z);
}

static void t_progress(void *ctx) { (void)ctx; }

int st_z3teach_int8_compact(st_z3teach *z) {
    st_model *m = z->m;
    const st_backend *be = m->be;
    uint8_t *sp;
    size_t pa, pb, total, qlo, qhi, x = z->lo, at = 0;
    if (z->compact || st_model_int8_packs(m, 0, m->n_weights, &sp, &pa, &pb, &total) != 2) return 0;
    size_t kept = z->shard - quantized_before(z, z->hi);
    float *c = be->alloc((kept ? kept : 1) * sizeof(float));
    if (!c) return st_fail(ST_ENOMEM, "rank %d: out of %s memory compacting the sharded teacher", z->rank, be->name);
    for (int k = 0; st_model_int8_range(m, k, &qlo, &qhi) && qlo < z->hi; k++) { /* weight order */
        if (qhi <= x) continue;
        if (qlo > x) be->copy(c + at, z->own + (x - z->lo), (qlo - x) * sizeof(float)), at += qlo - x;
        x = qhi;
    }
    if (x < z->hi) be->copy(c + at, z->own + (x - z->lo), (z->hi - x) * sizeof(float));
    be->free(z->own);
    z->own = c;
    z->compact = 1;
    m->weights = NULL; /* nothing reads this rank's parts at weights + offset any more */
    return 0;
}

size_t st_z3teach_kept_floats(const st_model *m, int world, int rank, int int8) {
    size_t w = (size_t)(world > 0 ? world : 1), shard = (m->n_weights + w - 1) / w;
    if (!int8) return shard;
    size_t lo = shard * (size_t)rank, hi = lo + shard, q = 0;
    for (int i = 0; i < st_model_base_params(m); i++) { /* the quantized weights: st_model_param_bf16_only's */
        const st_param *p = &m->params[i];
        size_t a = p->offset > lo ? p->offset : lo, b = p->offset + p->numel < hi ? p->offset + p->numel : hi;
        if (b > a && st_model_param_bf16_only(m, i)) q += b - a;
    }
    return shard - q;
}

size_t st_z3teach_floats(const st_model *m, int world, int bf16) {
    size_t w = (size_t)(world > 0 ? world : 1), shard = (m->n_weights + w - 1) / w, cap = largest_group(m);
    size_t slots = m->cfg.tied_embeddings ? 3 : 2;
    return shard + slots * (cap + (bf16 ? (cap + 1) / 2 : 0));
}

void st_z3teach_keep(void *ctx, const st_model *m, int i, size_t *a, size_t *b) {
    const st_z3teach *z = ctx;
    const st_param *p = &m->params[i];
    size_t x = p->offset > z->lo ? p->offset : z->lo, y = p->offset + p->numel < z->hi ? p->offset + p->numel : z->hi;
    if (y <= x) {
        *a = *b = 0;
        return;
    }
    *a = x - p->offset;
    *b = y - p->offset;
}

int st_z3teach_init(st_z3teach **out, st_comm *c, MPI_Comm comm, st_model *m, int bf16) {
    *out = NULL;
    const st_backend *be = m->be;
    if (m->weights || m->acquire || m->lora || m->prompt || m->qlora || m->cfg.n_layer < 1)
        return st_fail(ST_EINVAL, "a device-sharded teacher is a plain model bound without weights");
    for (int i = 1; i < m->n_params; i++)
        if (m->params[i].offset != m->params[i - 1].offset + m->params[i - 1].numel)
            return st_fail(ST_EINVAL, "a sharded frozen model needs its weights in registry order");
    st_z3teach *z = calloc(1, sizeof *z);
    if (!z) return st_fail(ST_ENOMEM, "out of memory");
    z->c = c;
    z->m = m;
    MPI_Comm_rank(comm, &z->rank);
    MPI_Comm_size(comm, &z->world);
    z->shard = (m->n_weights + (size_t)z->world - 1) / (size_t)z->world;
    z->lo = z->shard * (size_t)z->rank;
    z->hi = z->lo + z->shard;
    z->cap = largest_group(m);
    z->n_slots = m->cfg.tied_embeddings ? 3 : 2;
    int ok = (z->own = be->alloc((z->shard ? z->shard : 1) * sizeof(float))) != NULL;
    for (int k = 0; k < z->n_slots && ok; k++) {
        z->slot[k].w = be->alloc(z->cap * sizeof(float));
        z->slot[k].w16 = bf16 ? be->alloc(z->cap * sizeof(uint16_t)) : NULL;
        ok = z->slot[k].w && (!bf16 || z->slot[k].w16);
    }
    if (!ok) {
        st_z3teach_free(z);
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the sharded teacher (distill.teacher)", z->rank,
                       be->name);
    }
    if (z->shard) be->memset0(z->own, z->shard * sizeof(float)); /* the padding past the last weight */
    const char *fault = getenv("SHARDTUNE_ZERO3_DEV_FAULT"); /* tests only (see st_z3teach) */
    z->fault_gather_wait = fault && !strcmp(fault, "teacher-gather-wait");
    m->weights = z->own - z->lo; /* this rank's parts at weights + offset (see the top of the file) */
    m->windowed = 1;
    m->residency_int8 = 1; /* the hooks hold int8 packs in the windows (distill.teacher_dtype: int8) */
    st_model_set_residency(m, &(st_residency_hooks){.acquire = t_acquire,
                                                    .release = t_release,
                                                    .prefetch = t_prefetch,
                                                    .progress = t_progress,
                                                    .ctx = z});
    sync_windows(z);
    *out = z;
    return 0;
}

void st_z3teach_free(st_z3teach *z) {
    if (!z) return;
    st_model *m = z->m;
    const st_backend *be = m->be;
    if (z->c->nccl) st_nccl_synchronize(z->c->nccl); /* nothing queued writes the slots freed below */
    if (m->residency_ctx == z) st_model_set_residency(m, NULL), m->residency_int8 = 0;
    for (int k = 0; k < Z3T_SLOTS; k++) {
        be->free(z->slot[k].w);
        be->free(z->slot[k].w16);
        be->free(z->slot[k].p8);
    }
    be->free(z->own);
    be->free(z->pown);
    m->weights = NULL;
    m->windowed = 0;
    m->n_wwin = m->n_pwin = 0;
    free(z);
}
