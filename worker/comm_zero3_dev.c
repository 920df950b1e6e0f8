/* comm_zero3_dev.c — ZeRO-3 on a device backend (worker/comm_zero3_dev.h), without virtual-memory tricks.
 *
 * Layout: the compact (gradient) space is the weight space (every parameter trains). Each rank keeps its
 * shard [lo, hi) of the fp32 master weights in one device buffer (`master`, shard floats); m->weights is
 * set to master - lo, so the code that reads or writes this rank's parts at weights + offset (optimizer,
 * checkpoint parts, streaming load, final-weight gathers) finds them there; nothing else of the weight
 * space has memory. For forward and backward the model runs `windowed` (worker/model.h): a group
 * (embeddings, a layer, final norm + head) is gathered into one of a few device slots of the largest
 * group's size (two, three with tied embeddings: wte stays until the head has run) — the edges excepted:
 * an untied Llama-family embedding sends only the batch's rows (z3d_embed_rows) and an untied head comes in
 * vocabulary blocks (z3d_head_rows), so the slots are sized for a layer (or one head block) — the model's weight
 * pointers resolved into the slot while it is resident; under bf16 the slot's compute copy is rounded
 * from the gathered fp32 weights on the device. The gather: each rank copies its own part into the slot
 * and an in-place uneven all-gather (st_nccl_all_gather_parts) fills in the rest; the prefetch hook
 * enqueues the next group's gather on the comm stream while this group computes, and its acquire makes
 * the compute stream wait for it (st_nccl_wait_compute).
 * Gradients: a layer's gradient goes to one of two layer gradient buffers (double-buffered: zeroed by the
 * acquire in backward); final norm + head's and a tied embedding's (written in the training forward's fused
 * head as well as in backward) to resident edge buffers; an untied embedding's (written only after layer
 * 0's reduction was started) to whichever layer gradient buffer is free then. When a group's backward ends
 * (grad_ready) its range is reduce-scattered in chunks (st_nccl_reduce_parts_sum: each owner's part summed
 * into one of two receive buffers) and a comm-stream mark recorded after it; with sharding.overlap the
 * hook returns at once, so the reduction travels while the next layer's backward computes. A reduction is
 * finished (the compute stream waits for its mark only, st_nccl_wait_event, then adds its receive buffer
 * into shard_grads with bias_add over one row: the micro-batches accumulate there as on CPU ranks, and an
 * edge buffer is zeroed again) when its receive buffer or gradient buffer is needed again, or at the end of
 * the micro-batch's backward (st_z3dev_backward). A gather's acquire waits for that gather's own mark, not
 * for the reductions queued after it. Without overlap each chunk is finished at once. One rank without
 * NCCL copies and adds locally.
 * Outside forward/backward an acquire (a checkpoint snapshot: one tensor at a time, collective) gathers into
 * a slot the same way; such readers find the tensor with st_model_param_weights. The optimizer, the final
 * weights' gathers and the streaming load touch only this rank's parts, at weights + offset.
 * Adapters (LoRA, DoRA) and prompt learning: their registry entries (past the base model) are the trainable
 * set, the base the frozen space (no gradient, no optimizer state), both found through part_base. The model
 * acquires a layer's adapters as a group of their own right after its base (worker/model.c layer_acquire)
 * and the prompt's tensors as one group (held over every layer for a prefix without encoder): they go to
 * two more slots of the largest such group's size (fp32 only: their compute is fp32): the model prefetches
 * the next layer's adapters right after its base (worker/model.c layer_prefetch), one gather in flight of
 * each kind, so a layer's adapters travel with its base while the layer before computes. A layer's adapters get a layer gradient buffer in backward as a layer does; the prompt's
 * tensors (written by every layer's backward under prefix tuning) a third edge buffer, reduced after the
 * embeddings. lora.c and prompt.c read their tensors with st_model_param_weights (DoRA's bf16 base with
 * st_model_param_bf16) and write gradients through st_model_param_grad. An acquire larger than every slot
 * (all the adapters at once for final/, outside forward and backward) gets a spare slot made for it and
 * freed by its release. Attached to a model bound without weights, the adapters' initial values come in a
 * buffer of their own (st_model.weights_tail_only), cut into the shards like the rest.
 * QLoRA (qz_*): the model arrives laid out without its base (coordinator/trainer/train_qload.c: worker/qlora.h
 * spec.sharded, the compacted registry [kept base | adapters], unfused with one matmul unit's scratch between
 * them, only the adapters' floats in a buffer: weights_tail_only), and the trainer then fills this rank's words
 * of the codes (st_z3dev_qshard) and its parts of the kept base; or (SHARDTUNE_Z3DEV_QLOAD=whole) quantized
 * whole (train.c load_quantized: the blob of codes and scales and the whole compacted weights), cut here.
 * The quantized parameters
 * (held) are in neither space: the frozen space holds the kept base (embeddings, norms, head), the compact
 * space the adapters. The blob is sharded by 4-byte words (every tensor's bytes are a multiple of 4): this
 * rank's words in qmaster (a whole blob copied out and freed). A base group's span leaves its held parameters out (the rest
 * of a layer is contiguous in the compacted layout), and its gather also fills the slot's byte buffer with the
 * group's blob range (this rank's words copied in, an in-place all-gather for the rest, before the slot's
 * mark: prefetched with the group); its acquire points the group's tensors there (st_qlora_place). On the
 * fused path (the default: the backend's qmatmul) nothing else exists: qmatmul, DoRA's panels and every other
 * reader use the placed codes in place (worker/qlora.h). Only the unfused path (SHARDTUNE_QLORA_FUSED=0) has
 * a scratch: one device buffer of the communicator's (and its bf16 copy), a resident weight window that
 * worker/qlora.c fills (st_qlora_set_scratch) a matmul unit at a time.
 * A change of the trainable set (progressive stages): the old master shards are detached from the old state
 * (st_z3dev_detach), the new state is built around zeroed shards, and every parameter (then every kept
 * moment) goes from its old owners to its new ones in pieces of one gather slot (st_z3dev_reshard,
 * st_z3dev_move_moments), owner to owner (NCCL point to point: a rank receives what its new parts need, not the
 * piece; SHARDTUNE_Z3DEV_MOVE=gather all-gathers each piece, for A/B): no buffer of the model's size exists. */
#include "worker/comm_zero3_dev.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "common/util.h"
#include "kernels/bf16.h"
#include "kernels/cuda/nccl_comm.h"
#include "worker/lora.h"
#include "worker/prompt.h"
#include "worker/qlora.h"

#define Z3D_SLOTS 6 /* up to three base-group slots, two adapter / prompt slots, one made on demand */
#define Z3D_RS 2 /* receive buffers: reductions in flight at once */
#define Z3D_EDGES 3 /* the embeddings, final norm + head, the prompt's tensors */
_Static_assert(Z3D_SLOTS + Z3D_RS < ST_NCCL_EVENTS, "marks 0 .. Z3D_SLOTS + Z3D_RS - 1 are the student's; the last one "
               "is a device teacher's (comm_zero3_teacher_dev.c Z3T_MARK)");

typedef struct {
    float *w;        /* [cap] the group's fp32 weights */
    uint16_t *w16;   /* [cap] their bf16 copy (precision bf16, base groups), else NULL */
    size_t cap;      /* floats it holds */
    int small;       /* it holds adapter / prompt groups (registry entries past the base model) */
    int first, last; /* the group held (parameters) */
    size_t lo, hi;   /* its weight (= compact) range */
    int state;       /* 0 free, 1 gather enqueued (prefetched), 2 resident */
    uint8_t *q;      /* QLoRA, base groups: [qcap bytes] the group's quantized bytes, blob range [qa, qb) */
    size_t qcap, qa, qb;
    int blk;         /* it holds a block of the head's vocabulary rows (z3d_head_rows), not a whole group */
} z3d_slot;

typedef struct {
    float *g;        /* [layer_floats] a layer's (or an untied embedding's) gradients */
    size_t lo, hi;   /* the compact range it holds */
    int first;       /* the group's first parameter */
    int live;        /* its backward writes it (a gradient window) */
    int busy;        /* live, or its reduction not finished yet */
} z3d_gbuf;

typedef struct {     /* a reduce-scatter chunk in flight */
    int active;
    size_t os, own;  /* this rank's part: shard_grads[os - c->lo ..) gets own floats */
    int gb;          /* its last chunk: the gradient buffer whose reduction it ends, else -1 */
    float *zero;     /* its last chunk: an edge buffer zeroed after it (the next micro-batch adds into it) */
    size_t zero_n;
} z3d_rs;

struct st_z3dev {
    st_model *m;
    int n_slots, in_bwd;
    size_t slot_floats, small_floats, layer_floats;
    z3d_slot slot[Z3D_SLOTS];  /* slot k's gather: comm-stream mark k; slot n_slots: made on demand (spare); the
                                  adapter / prompt slots last (two: a layer's adapters and the next layer's
                                  prefetched with its base) */
    z3d_gbuf gbuf[2];
    float *master;       /* [shard] this rank's fp32 master weights (its shard of the compact space) */
    float *fmaster;      /* its shard of the frozen space (fp32): [c->fshard], NULL when every parameter trains; once
                            parts are held in bf16 only (st_z3dev_hold_bf16) the other frozen parts, compacted */
    uint16_t *f16;       /* [n16] this rank's parts of the frozen parameters held in bf16 only, compacted, else NULL */
    unsigned char *fb16; /* [n_params] frozen parameter i held in bf16 only (its gathers move bf16), else NULL */
    long *fat;           /* [n_params] frozen parameter i's element k is fmaster[fat[i] + k] (f16[...] when fb16[i]) */
    size_t n16;
    int held_checked;    /* st_z3dev_hold_bf16 has checked every fp32 frozen part (until st_z3dev_restore_fp32) */
    float **part_base;   /* [n_params] m->part_base (frozen parameters exist), else NULL */
    size_t *runs;        /* [5 * n_params] a group's runs: space (0 compact, 1 frozen, 2 frozen held in bf16 only),
                            space offset, weight offset, length, first parameter */
    float *recv[Z3D_RS]; /* [recv_floats] this rank's part of a reduce-scattered chunk (mark Z3D_SLOTS + j) */
    size_t recv_floats;
    z3d_rs rs[Z3D_RS];
    int rs_order[Z3D_RS], n_rs; /* in-flight reductions, oldest first (receive buffer indices) */
    float *edge[Z3D_EDGES]; /* gradients of the embeddings, of final norm + head and of the prompt's tensors */
    int edge0_shared;    /* untied embeddings: their gradient, written only after the last layer's backward
                            (embedding_bwd), lives in a free layer gradient buffer (edge0_gb) */
    int edge0_gb;
    size_t edge_lo[Z3D_EDGES], edge_hi[Z3D_EDGES];
    /* SHARDTUNE_ZERO3_DEV_FAULT (tests only: the stream-order checker must catch each): "rs-wait" adds a
     * received part without waiting for its reduction, "one-grad-buffer" reuses a gradient buffer whose
     * reduction is in flight, "gather-wait" computes on a group without waiting for its gather, "qz-late"
     * enqueues a group's quantized bytes after the mark its acquire waits for */
    int fault_rs_wait, fault_one_gbuf, fault_gather_wait, fault_qz_late;
    /* QLoRA (qz_* below): the quantized base parameters (held) leave the group spans and the frozen space;
     * their codes and scales (worker/qlora.h's blob) are sharded by 4-byte words, this rank's part in qmaster,
     * a group's range gathered into its slot's byte buffer; unfused, their one matmul unit's scratch (and its
     * bf16 copy) is a resident window of its own (fused: none, scratch NULL) */
    unsigned char *held;   /* [n_params] held quantized; NULL without QLoRA */
    uint8_t *qmaster;      /* [4 * qshard] this rank's words [qlo, qlo + qshard) of the blob */
    size_t nq4, qshard, qlo;
    size_t qslot_bytes;    /* a base slot's byte buffer: the most quantized bytes of one group */
    float *scratch;        /* [scr_hi - scr_lo] the scratch's fp32 values */
    uint16_t *scratch16;   /* their bf16 copy (precision bf16), else NULL */
    size_t scr_lo, scr_hi;
    /* The edges (edge_layout): an untied Llama-family embedding is never gathered whole (the batch's rows
     * travel: z3d_embed_rows), nor an untied head (blocks of head_block vocabulary rows: z3d_head_rows) */
    int rows_embed, head, head_block; /* head: the head's parameter when it goes by blocks, else -1 */
    float *htmp;         /* [htmp_floats] a block of logits or dlogits (the model's layout has none) */
    size_t htmp_floats;
    /* detached (st_z3dev_detach): only master and fmaster are kept, cut by the old layout below, until
     * st_z3dev_reshard has moved them into the new communicator's shards */
    long *old_foff;      /* [n_params] the old frozen offsets (the old c->z3_foff) */
    size_t old_lo, old_shard, old_flo, old_fshard;
};

/* Weight range of parameters [first, last) (registry order is offset order); QLoRA's quantized parameters
 * (held, may be NULL) left out: their offsets point at the scratch, the group's others stay contiguous. */
static void span(const st_model *m, const unsigned char *held, int first, int last, size_t *a, size_t *b) {
    if (!held) {
        *a = m->params[first].offset;
        *b = m->params[last - 1].offset + m->params[last - 1].numel;
        return;
    }
    *a = *b = 0;
    for (int i = first; i < last; i++) {
        if (held[i]) continue;
        if (*b == *a) *a = m->params[i].offset;
        *b = m->params[i].offset + m->params[i].numel;
    }
}

/* parts[r] = how much of [a, b) lies in rank r's shard of a space sharded `shard` floats per rank. */
static void space_parts(const st_comm *c, size_t shard, size_t a, size_t b, size_t *parts) {
    for (int r = 0; r < c->world; r++) {
        size_t lo = shard * (size_t)r, hi = lo + shard;
        size_t s = a > lo ? a : lo, e = b < hi ? b : hi;
        parts[r] = e > s ? e - s : 0;
    }
}

/* The same for the compact space. */
static void owner_parts(const st_comm *c, size_t a, size_t b, size_t *parts) { space_parts(c, c->shard, a, b, parts); }

/* Compact range [*a, *b) of the trainable parameters among [first, last) (contiguous: compact offsets follow
 * registry order); empty (*a = *b = 0) when none trains. */
static void grad_span(const st_model *m, int first, int last, size_t *a, size_t *b) {
    *a = *b = 0;
    for (int i = first; i < last; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0 || !p->numel) continue;
        if (*b == 0) *a = (size_t)p->grad_offset;
        *b = (size_t)p->grad_offset + p->numel;
    }
}

/* Whether the compact space is the weight space (every parameter trains, in place). */
static int all_train(const st_model *m) {
    if (m->n_grads != m->n_weights) return 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].grad_offset != (long)m->params[i].offset) return 0;
    return 1;
}

static void keep_rc(st_comm *c, int rc) {
    if (rc && !c->z3_rc) c->z3_rc = rc;
}

/* The model's windows from the slots' state: resident groups' weights, the edge gradient buffers and the
 * live layer gradient buffers. */
static void sync_windows(st_z3dev *z) {
    st_model *m = z->m;
    m->n_wwin = m->n_gwin = 0;
    for (int e = 0; e < Z3D_EDGES; e++)
        if (z->edge[e]) m->gwin[m->n_gwin++] = (st_res_window){z->edge_lo[e], z->edge_hi[e], z->edge[e], NULL};
    for (int k = 0; k <= z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (s->state == 2) m->wwin[m->n_wwin++] = (st_res_window){s->lo, s->hi, s->w, s->w16};
    }
    if (z->scratch) /* QLoRA: the matmul unit's scratch (worker/qlora.c fills it) */
        m->wwin[m->n_wwin++] = (st_res_window){z->scr_lo, z->scr_hi, z->scratch, z->scratch16};
    for (int b = 0; b < 2; b++)
        if (z->gbuf[b].live) m->gwin[m->n_gwin++] = (st_res_window){z->gbuf[b].lo, z->gbuf[b].hi, z->gbuf[b].g, NULL};
}

/* Whether [first, last) is a layer's group (its gradients go to a layer buffer, not an edge buffer): a layer's
 * base parameters or its adapters (entries past the base model that belong to a layer; the prompt's do not). */
static int is_layer_group(const st_z3dev *z, int first) {
    const st_model *m = z->m;
    if (first >= st_model_base_params(m)) return first < m->n_params && m->params[first].layer >= 0;
    return first >= st_model_layer_first_param(m, 0) && first < st_model_layer_first_param(m, m->cfg.n_layer);
}

/* Whether a group goes to the adapter / prompt slots (registry entries past the base model). */
static int small_group(const st_z3dev *z, int first) { return first >= st_model_base_params(z->m); }

/* Parameter i's space: 0 compact, 1 frozen, 2 frozen and held in bf16 only (z->fb16). */
static size_t space_of(const st_comm *c, int i) {
    if (c->z3dev->m->params[i].grad_offset >= 0) return 0;
    return c->z3dev->fb16 && c->z3dev->fb16[i] ? 2 : 1;
}

/* The runs of [first, last) contiguous in both the weight space and their sharded space (compact or
 * frozen) and alike in storage (so in this rank's buffer too): z->runs, 5 per run. Returns their number. */
static int group_runs(const st_comm *c, int first, int last) {
    st_z3dev *z = c->z3dev;
    size_t *r = z->runs;
    int nr = 0;
    for (int i = first; i < last; i++) {
        const st_param *p = &z->m->params[i];
        if (!p->numel || (p->grad_offset < 0 && c->z3_foff[i] < 0)) continue; /* QLoRA's quantized: qz_gather */
        size_t sp = space_of(c, i), *q = r + 5 * (nr - 1);
        size_t at = sp == 0 ? (size_t)p->grad_offset : (size_t)c->z3_foff[i];
        if (nr && q[0] == sp && q[1] + q[3] == at && q[2] + q[3] == p->offset) {
            q[3] += p->numel;
            continue;
        }
        q += 5;
        q[0] = sp, q[1] = at, q[2] = p->offset, q[3] = p->numel, q[4] = (size_t)i;
        nr++;
    }
    return nr;
}


/* ---- QLoRA's quantized base (st_z3dev: held, qmaster, scratch) ---- */

/* Enqueues the gather of the quantized bytes of [first, last) into slot s's byte buffer (the spare gets one
 * made for it): this rank's words copied in from qmaster, the others' by the in-place all-gather on the comm
 * stream (4-byte words: every tensor's bytes are a multiple of 4, worker/qlora.c). Nothing for a group
 * without quantized parameters. */
static int qz_gather(st_comm *c, z3d_slot *s, int first, int last) {
    st_z3dev *z = c->z3dev;
    const st_backend *be = z->m->be;
    st_qlora_span(z->m, first, last, &s->qa, &s->qb);
    size_t n = s->qb - s->qa;
    if (!n) return 0;
    if (n > s->qcap) {
        if (s != &z->slot[z->n_slots])
            return st_fail(ST_EINVAL, "rank %d: internal error: %zu quantized bytes exceed the stage-3 gather buffer",
                           c->rank, n);
        be->free(s->q);
        s->q = be->alloc(n);
        s->qcap = s->q ? n : 0;
        if (!s->q) return st_fail(ST_ENOMEM, "rank %d: out of %s memory gathering the quantized base", c->rank, be->name);
    }
    size_t a = s->qa / 4, b = s->qb / 4, hi = z->qlo + z->qshard;
    size_t os = a > z->qlo ? a : z->qlo, oe = b < hi ? b : hi;
    if (os < oe) be->copy(s->q + 4 * (os - a), z->qmaster + 4 * (os - z->qlo), 4 * (oe - os));
    if (!c->nccl) return 0;
    size_t parts[c->world];
    space_parts(c, z->qshard, a, b, parts);
    return st_nccl_all_gather_parts(c->nccl, (float *)s->q, parts);
}

/* A group became resident in slot s: its quantized tensors read their codes and scales there. */
static void qz_place(st_z3dev *z, const z3d_slot *s) {
    if (z->held && s->qb > s->qa) st_qlora_place(z->m, s->first, s->last, s->q, s->qa);
}

/* The most quantized bytes of one layer's base group (QLoRA quantizes inside the layers only). */
static size_t qz_group_bytes(const st_model *m) {
    size_t most = 0, a, b;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        st_qlora_span(m, st_model_layer_first_param(m, l), st_model_layer_first_param(m, l + 1), &a, &b);
        if (b - a > most) most = b - a;
    }
    return most;
}

/* QLoRA (a quantized model): which parameters are held; this rank's words of the blob copied out of the
 * whole blob, which is then freed (a sharded base, worker/qlora.h spec.sharded, has none: the zeroed words are
 * filled after, coordinator/trainer/train_qload.c); the base slots' byte capacity; on the unfused path only (the fused one has
 * no scratch) the scratch (fp32, and bf16 under precision bf16) made and handed to worker/qlora.c
 * (st_qlora_set_scratch). Without QLoRA: nothing. */
static int qz_init(st_comm *c, st_model *m, int bf16) {
    st_z3dev *z = c->z3dev;
    const st_backend *be = m->be;
    if (!m->qlora) return 0;
    z->held = calloc((size_t)m->n_params + 1, 1);
    if (!z->held) return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 quantized base", c->rank);
    for (int i = 0; i < m->n_params; i++) z->held[i] = (unsigned char)st_qlora_holds(m, i);
    uint8_t *blob;
    size_t bytes, w = (size_t)c->world;
    st_qlora_blob(m, &blob, &bytes);
    z->nq4 = bytes / 4;
    z->qshard = (z->nq4 + w - 1) / w;
    z->qlo = z->qshard * (size_t)c->rank;
    z->qmaster = z->qshard ? be->alloc(4 * z->qshard) : NULL;
    if (z->qshard && !z->qmaster)
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 quantized base", c->rank, be->name);
    if (z->qmaster) be->memset0(z->qmaster, 4 * z->qshard); /* the padding past the last word */
    size_t hi = z->qlo + z->qshard < z->nq4 ? z->qlo + z->qshard : z->nq4;
    if (blob && hi > z->qlo) be->copy(z->qmaster, blob + 4 * z->qlo, 4 * (hi - z->qlo));
    be->free(st_qlora_blob_take(m));
    z->qslot_bytes = qz_group_bytes(m);
    st_qlora_scratch_range(m, &z->scr_lo, &z->scr_hi);
    size_t n = z->scr_hi - z->scr_lo;
    if (st_qlora_fused(m)) return 0; /* no scratch: qmatmul, DoRA's panels and the readers use the placed codes */
    z->scratch = be->alloc((n ? n : 1) * sizeof(float));
    z->scratch16 = bf16 ? be->alloc((n ? n : 1) * sizeof(uint16_t)) : NULL;
    if (!z->scratch || (bf16 && !z->scratch16))
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the QLoRA scratch", c->rank, be->name);
    st_qlora_set_scratch(m, z->scratch, z->scratch16, z->scr_lo);
    return 0;
}

uint8_t *st_z3dev_qshard(const st_comm *c, size_t *a, size_t *b) {
    const st_z3dev *z = c->z3dev;
    *a = *b = 0;
    if (!z || !z->held) return NULL;
    *a = 4 * z->qlo;
    *b = 4 * (z->qlo + z->qshard);
    return z->qmaster;
}

/* Frees what qz_init made (the slots' byte buffers are freed with the slots). */
static void qz_free(st_z3dev *z) {
    const st_backend *be = z->m->be;
    if (!z->held) return;
    st_qlora_set_scratch(z->m, NULL, NULL, 0);
    be->free(z->qmaster);
    be->free(z->scratch);
    be->free(z->scratch16);
    free(z->held);
    z->held = NULL;
}

/* Enqueues the gather of one run r (space, space offset, weight offset, length, first parameter: group_runs)
 * into slot s: this rank's part copied in from its shard, the others' by an in-place all-gather on the comm
 * stream. A run held in bf16 only travels as bf16 into the slot's bf16 copy (slot_widen makes its fp32). */
static int gather_run(st_comm *c, z3d_slot *s, const size_t *r) {
    st_z3dev *z = c->z3dev;
    size_t shard = r[0] ? c->fshard : c->shard, slo = r[0] ? c->flo : c->lo, shi = slo + shard, parts[c->world];
    size_t os = r[1] > slo ? r[1] : slo, oe = r[1] + r[3] < shi ? r[1] + r[3] : shi, i = r[4];
    space_parts(c, shard, r[1], r[1] + r[3], parts);
    if (r[0] == 2) {
        uint16_t *dst = s->w16 + (r[2] - s->lo);
        if (os < oe) /* the run's parameters lie next to each other in f16 (group_runs) */
            z->m->be->copy(dst + (os - r[1]), z->f16 + z->fat[i] + (long)(os - (size_t)c->z3_foff[i]),
                           (oe - os) * sizeof(uint16_t));
        return c->nccl ? st_nccl_all_gather_parts_bf16(c->nccl, dst, parts) : 0;
    }
    float *dst = s->w + (r[2] - s->lo);
    size_t g = r[0] ? (size_t)c->z3_foff[i] : (size_t)z->m->params[i].grad_offset;
    if (os < oe) st_z3dev_part_fp32(c, (int)i, os - g, oe - os, dst + (os - r[1]), 0);
    return c->nccl ? st_nccl_all_gather_parts(c->nccl, dst, parts) : 0;
}

/* Slot s's parameters held in bf16 only arrived in its bf16 copy: their fp32 window values widened from it
 * (exact), for the readers of fp32 weights (an embedding's rows, checkpoints, generation). */
static void slot_widen(const st_z3dev *z, const z3d_slot *s) {
    for (int i = s->first; z->fb16 && s->w16 && i < s->last; i++) {
        const st_param *p = &z->m->params[i];
        size_t a = p->offset > s->lo ? p->offset : s->lo, e = p->offset + p->numel;
        size_t b = e < s->hi ? e : s->hi;
        if (z->fb16[i] && b > a) z->m->be->from_bf16(s->w + (a - s->lo), s->w16 + (a - s->lo), b - a);
    }
}

/* Enqueues the gather of [first, last) into slot s, run by run (trainable runs from the compact space's
 * master shards, frozen ones from the frozen space's): this rank's part copied in from its shard, the
 * others' parts by an in-place all-gather on the comm stream (which first waits for that copy); then the
 * slot's mark. */
static int gather_start(st_comm *c, z3d_slot *s, int first, int last) {
    st_z3dev *z = c->z3dev;
    span(z->m, z->held, first, last, &s->lo, &s->hi);
    if (s->hi - s->lo > s->cap)
        return st_fail(ST_EINVAL, "rank %d: internal error: a stage-3 group of %zu floats exceeds the gather buffer",
                       c->rank, s->hi - s->lo);
    s->first = first;
    s->last = last;
    s->blk = 0;
    int nr = group_runs(c, first, last), rc = 0;
    for (int k = 0; k < nr && !rc; k++) rc = gather_run(c, s, z->runs + 5 * k);
    if (!rc && z->held && !z->fault_qz_late) rc = qz_gather(c, s, first, last);
    rc = rc || !c->nccl ? rc : st_nccl_record(c->nccl, (int)(s - z->slot));
    if (!rc && z->held && z->fault_qz_late) rc = qz_gather(c, s, first, last); /* tests only: after the mark */
    return rc;
}

/* The compute stream waits for slot s's gather (and what was queued before it), not for later reductions. */
static int gather_wait(st_comm *c, z3d_slot *s) {
    if (!c->nccl || c->z3dev->fault_gather_wait) return 0;
    return st_nccl_wait_event(c->nccl, (int)(s - c->z3dev->slot));
}

/* Whether slot s may take group [first, first + n floats): its kind (base group / adapters and prompt) and size. */
static int slot_fits(const st_z3dev *z, const z3d_slot *s, int first, size_t n) {
    return s->small == small_group(z, first) && s->cap >= n;
}

/* A slot for a new gather of `first`'s group of n floats: a free one of its kind; a prefetched gather nobody
 * acquired is dropped (after the compute stream waited for it, so nothing writes the slot behind the next
 * use); else (outside forward and backward: all the adapters at once for final/) the spare slot, allocated
 * for it and freed by its release. NULL when none is left. */
static z3d_slot *free_slot(st_comm *c, int first, size_t n) {
    st_z3dev *z = c->z3dev;
    for (int k = 0; k < z->n_slots; k++)
        if (z->slot[k].state == 0 && slot_fits(z, &z->slot[k], first, n)) return &z->slot[k];
    for (int k = 0; k < z->n_slots; k++)
        if (z->slot[k].state == 1 && slot_fits(z, &z->slot[k], first, n)) {
            keep_rc(c, gather_wait(c, &z->slot[k]));
            z->slot[k].state = 0;
            return &z->slot[k];
        }
    z3d_slot *s = &z->slot[z->n_slots];
    if (s->state != 0) return NULL;
    s->small = small_group(z, first);
    s->w = z->m->be->alloc((n ? n : 1) * sizeof(float));
    /* a base group's parameters held in bf16 only travel into a bf16 copy */
    s->w16 = z->fb16 && !s->small ? z->m->be->alloc((n ? n : 1) * sizeof(uint16_t)) : NULL;
    if (!s->w || (z->fb16 && !s->small && !s->w16)) {
        z->m->be->free(s->w);
        z->m->be->free(s->w16);
        s->w = NULL;
        s->w16 = NULL;
        return NULL;
    }
    s->cap = n;
    return s;
}

static void z3d_prefetch(void *ctx, int first, int last) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    if (!c->nccl || !z->m->in_compute || !c->z3_prefetch) return;
    for (int k = 0; k < z->n_slots; k++) /* one in flight at a time of each kind: a layer's base, its adapters */
        if (z->slot[k].state == 1 && z->slot[k].small == small_group(z, first)) return;
    z3d_slot *s = NULL;
    size_t a, b;
    span(z->m, z->held, first, last, &a, &b);
    for (int k = 0; k < z->n_slots && !s; k++)
        if (z->slot[k].state == 0 && slot_fits(z, &z->slot[k], first, b - a)) s = &z->slot[k];
    if (!s) return;
    int rc = gather_start(c, s, first, last);
    keep_rc(c, rc);
    if (!rc) s->state = 1;
}

/* Finishes the oldest reduction in flight: the compute stream waits for its mark, its part is added into
 * shard_grads, an edge buffer is zeroed again and its gradient buffer is free. */
static void rs_finish_oldest(st_comm *c) {
    st_z3dev *z = c->z3dev;
    if (!z->n_rs) return;
    int j = z->rs_order[0];
    z3d_rs *r = &z->rs[j];
    for (int k = 1; k < z->n_rs; k++) z->rs_order[k - 1] = z->rs_order[k];
    z->n_rs--;
    r->active = 0;
    if (!z->fault_rs_wait) keep_rc(c, st_nccl_wait_event(c->nccl, Z3D_SLOTS + j));
    const st_backend *be = z->m->be;
    if (r->own) be->bias_add(c->shard_grads + (r->os - c->lo), z->recv[j], 1, (int)r->own);
    if (r->zero) be->memset0(r->zero, r->zero_n * sizeof(float));
    if (r->gb >= 0) z->gbuf[r->gb].busy = 0;
}

/* Every reduction in flight finished (the end of a micro-batch's backward). */
static void rs_finish_all(st_comm *c) {
    while (c->z3dev->n_rs) rs_finish_oldest(c);
}

/* A gradient buffer no reduction reads any more (finishing the oldest ones as needed); -1 if none. */
static int free_gbuf(st_comm *c) {
    st_z3dev *z = c->z3dev;
    for (;;) {
        for (int b = 0; b < 2; b++)
            if (!z->gbuf[b].busy || (z->fault_one_gbuf && !z->gbuf[b].live)) return b;
        if (!z->n_rs) return -1;
        rs_finish_oldest(c);
    }
}

static void z3d_acquire(void *ctx, int first, int last) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    st_model *m = z->m;
    if (last <= first) return;
    double t0 = st_now();
    z3d_slot *s = NULL;
    for (int k = 0; k < z->n_slots && !s; k++)
        if (z->slot[k].state == 1 && !z->slot[k].blk && z->slot[k].first == first && z->slot[k].last == last)
            s = &z->slot[k];
    int rc = 0;
    if (!s) {
        size_t a, b;
        span(m, z->held, first, last, &a, &b);
        s = free_slot(c, first, b - a);
        rc = s ? gather_start(c, s, first, last)
               : st_fail(ST_EINVAL, "rank %d: out of %s memory or of free stage-3 gather buffers", c->rank, m->be->name);
    }
    if (!rc && s) rc = gather_wait(c, s); /* the gather (and what came before it) done */
    keep_rc(c, rc);
    if (!s) return;
    s->state = 2;
    qz_place(z, s);
    slot_widen(z, s);
    if (s->w16 && m->in_compute) m->be->to_bf16(s->w16, s->w, s->hi - s->lo);
    size_t ga, gb_;
    grad_span(m, first, last, &ga, &gb_);
    if (z->in_bwd && is_layer_group(z, first) && gb_ > ga) { /* the layer's backward accumulates into zeros */
        int b = free_gbuf(c);
        if (b < 0) {
            keep_rc(c, st_fail(ST_EINVAL, "rank %d: internal error: no free stage-3 gradient buffer", c->rank));
        } else {
            z3d_gbuf *g = &z->gbuf[b];
            m->be->memset0(g->g, (gb_ - ga) * sizeof(float));
            g->lo = ga, g->hi = gb_, g->first = first, g->live = g->busy = 1;
        }
    }
    sync_windows(z);
    c->overlap_seconds += st_now() - t0;
}

/* Slot k is free again (its gather was waited for); the spare's buffers are freed. */
static void slot_drop(st_z3dev *z, int k) {
    z3d_slot *s = &z->slot[k];
    s->state = 0;
    s->blk = 0;
    if (k != z->n_slots) return;
    z->m->be->free(s->w);
    z->m->be->free(s->w16);
    z->m->be->free(s->q);
    s->w = NULL;
    s->w16 = NULL;
    s->q = NULL;
    s->cap = s->qcap = 0;
}

static void z3d_release(void *ctx, int first, int last) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    for (int k = 0; k <= z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (s->state == 2 && !s->blk && s->first == first && s->last == last) {
            slot_drop(z, k); /* its gradient buffer stays until grad_ready hands it to the reduction */
            break;
        }
    }
    sync_windows(z);
}

/* ---- the edges: the embedding's rows and the head's vocabulary blocks (z3d_embed_rows, z3d_head_rows) ---- */

/* Parameter i's place in its space: *sp as space_of, *at its offset there. */
static void param_space(const st_comm *c, int i, size_t *sp, size_t *at) {
    const st_param *p = &c->z3dev->m->params[i];
    *sp = space_of(c, i);
    *at = *sp ? (size_t)c->z3_foff[i] : (size_t)p->grad_offset;
}

static long head_gathers, head_passes; /* st_z3dev_head_counts: one communicator per process */

void st_z3dev_head_counts(long *gathers, long *passes) {
    *gathers = head_gathers;
    *passes = head_passes;
}

/* Enqueues the gather of the head's vocabulary rows [j0, j0 + n) into slot s (one run), then the slot's mark. */
static int block_start(st_comm *c, z3d_slot *s, size_t j0, size_t n) {
    st_z3dev *z = c->z3dev;
    const st_param *p = &z->m->params[z->head];
    size_t C = (size_t)z->m->cfg.d_model, r[5];
    param_space(c, z->head, &r[0], &r[1]);
    r[1] += j0 * C, r[2] = p->offset + j0 * C, r[3] = n * C, r[4] = (size_t)z->head;
    if (r[3] > s->cap)
        return st_fail(ST_EINVAL, "rank %d: internal error: a head block of %zu floats exceeds the gather buffer",
                       c->rank, r[3]);
    s->lo = r[2], s->hi = r[2] + r[3], s->first = z->head, s->last = z->head + 1, s->blk = 1;
    s->qa = s->qb = 0; /* nothing quantized */
    head_gathers++;
    int rc = gather_run(c, s, r);
    return rc || !c->nccl ? rc : st_nccl_record(c->nccl, (int)(s - z->slot));
}

/* The slot holding the head's weight range [lo, hi) in state `state`, else NULL. */
static z3d_slot *block_slot(st_z3dev *z, int state, size_t lo, size_t hi) {
    for (int k = 0; k <= z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (s->blk && s->state == state && s->lo == lo && s->hi == hi) return s;
    }
    return NULL;
}

/* Every head block resident or in flight dropped (a gather in flight waited for first). */
static void blocks_drop(st_comm *c, int keep_in_flight) {
    st_z3dev *z = c->z3dev;
    for (int k = 0; k <= z->n_slots; k++) {
        z3d_slot *s = &z->slot[k];
        if (!s->blk || !s->state || (s->state == 1 && keep_in_flight)) continue;
        if (s->state == 1) keep_rc(c, gather_wait(c, s));
        slot_drop(z, k);
    }
}

/* head_rows hook (worker/model.h): rows [j0, j0 + n) of the head resident (a prefetched gather finished, else
 * gathered now), the block before dropped, and the block at `next` gathered into a free base slot while this
 * one computes (one in flight, as a layer's). j0 < 0: the head released. Returns the block scratch (rows x n
 * floats, made the first time), or NULL (rows 0). */
static float *z3d_head_rows(void *ctx, int j0, int n, int next, int next_n, int rows) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    st_model *m = z->m;
    const st_backend *be = m->be;
    double t0 = st_now();
    size_t C = (size_t)m->cfg.d_model, base = m->params[z->head].offset;
    if (j0 < 0) {
        head_passes++;
        blocks_drop(c, 0);
        sync_windows(z);
        return NULL;
    }
    size_t lo = base + (size_t)j0 * C, hi = lo + (size_t)n * C;
    if (!block_slot(z, 2, lo, hi)) {
        for (int k = 0; k <= z->n_slots; k++) /* the block before */
            if (z->slot[k].blk && z->slot[k].state == 2) slot_drop(z, k);
        z3d_slot *s = block_slot(z, 1, lo, hi);
        int rc = 0;
        if (!s) {
            s = free_slot(c, z->head, hi - lo);
            rc = s ? block_start(c, s, (size_t)j0, (size_t)n)
                   : st_fail(ST_EINVAL, "rank %d: out of %s memory or of free stage-3 gather buffers", c->rank,
                             be->name);
        }
        if (!rc && s) rc = gather_wait(c, s);
        keep_rc(c, rc);
        if (s && !rc) {
            s->state = 2;
            slot_widen(z, s);
            if (s->w16) be->to_bf16(s->w16, s->w, hi - lo);
        } else if (s) {
            slot_drop(z, (int)(s - z->slot));
        }
        sync_windows(z);
    }
    size_t nlo = base + (size_t)next * C, nhi = nlo + (size_t)next_n * C;
    int flight = 0;
    for (int k = 0; k < z->n_slots; k++) flight |= z->slot[k].state == 1 && !z->slot[k].small;
    if (next >= 0 && next_n > 0 && nlo != lo && c->nccl && c->z3_prefetch && !flight) {
        z3d_slot *s = NULL;
        for (int k = 0; k < z->n_slots && !s; k++)
            if (z->slot[k].state == 0 && slot_fits(z, &z->slot[k], z->head, nhi - nlo)) s = &z->slot[k];
        int rc = s ? block_start(c, s, (size_t)next, (size_t)next_n) : 0;
        keep_rc(c, rc);
        if (s && !rc) s->state = 1;
    }
    c->overlap_seconds += st_now() - t0;
    size_t need = (size_t)rows * (size_t)n;
    if (need > z->htmp_floats) { /* the first block (the model's layout has no block scratch) */
        be->free(z->htmp);
        z->htmp = be->alloc(need * sizeof(float));
        z->htmp_floats = z->htmp ? need : 0;
        if (!z->htmp) keep_rc(c, st_fail(ST_ENOMEM, "rank %d: out of %s memory for a head block", c->rank, be->name));
    }
    return rows ? z->htmp : NULL;
}

/* The free base slot the embedding rows travel through (its gather mark), or NULL. */
static z3d_slot *rows_slot(st_z3dev *z) {
    for (int k = 0; k < z->n_slots; k++)
        if (z->slot[k].state == 0 && !z->slot[k].small && z->slot[k].cap >= (size_t)z->m->cfg.d_model)
            return &z->slot[k];
    return NULL;
}

/* Moves rows [i0, i1) of the ranks' ids (all, in rank order; this rank's from `mine`) through slot s: each
 * rank packs the elements of those rows its shard holds (row order), an uneven in-place all-gather hands
 * every rank every pack, and this rank copies its own rows' pieces out into out (row i at i - mine). */
static int rows_batch(st_comm *c, z3d_slot *s, const int32_t *all, int i0, int i1, int mine, int n, float *out) {
    st_z3dev *z = c->z3dev;
    const st_backend *be = z->m->be;
    size_t C = (size_t)z->m->cfg.d_model, V = (size_t)z->m->cfg.vocab, sp, g;
    param_space(c, 0, &sp, &g);
    size_t shard = sp ? c->fshard : c->shard, slo = sp ? c->flo : c->lo;
    int w = c->world;
    size_t parts[w], piece[w], pos[w], at = 0, total = 0;
    memset(parts, 0, sizeof parts);
    for (int i = i0; i < i1; i++) {
        if (all[i] < 0 || (size_t)all[i] >= V) continue; /* not a token: its row stays zero */
        space_parts(c, shard, g + (size_t)all[i] * C, g + (size_t)all[i] * C + C, piece);
        for (int r = 0; r < w; r++) parts[r] += piece[r];
    }
    for (int r = 0; r < w; r++) {
        pos[r] = total;
        total += parts[r];
    }
    if (!total) return 0;
    at = pos[c->rank];
    for (int i = i0; i < i1; i++) { /* this rank's pack */
        if (all[i] < 0 || (size_t)all[i] >= V) continue;
        size_t a = g + (size_t)all[i] * C, os = a > slo ? a : slo, oe = a + C < slo + shard ? a + C : slo + shard;
        if (os >= oe) continue;
        st_z3dev_part_fp32(c, 0, os - g, oe - os, s->w + at, 0);
        at += oe - os;
    }
    int k = (int)(s - z->slot), rc = st_nccl_all_gather_parts(c->nccl, s->w, parts);
    if (!rc) rc = st_nccl_record(c->nccl, k);
    if (!rc) rc = st_nccl_wait_event(c->nccl, k);
    for (int i = i0; i < i1 && !rc; i++) { /* this rank's rows out of the packs */
        if (all[i] < 0 || (size_t)all[i] >= V) continue;
        size_t a = g + (size_t)all[i] * C;
        for (int r = 0; r < w; r++) {
            size_t lo = shard * (size_t)r, os = a > lo ? a : lo, oe = a + C < lo + shard ? a + C : lo + shard;
            if (os >= oe) continue;
            if (i >= mine && i < mine + n)
                be->copy(out + (size_t)(i - mine) * C + (os - a), s->w + pos[r], (oe - os) * sizeof(float));
            pos[r] += oe - os;
        }
    }
    return rc;
}

/* embed_rows hook (worker/model.h): the rows of this rank's ids (out: device memory, n x d_model), bit for bit
 * the table's, without gathering the table: the ranks' ids are all-gathered (MPI, host), then the rows of
 * every rank travel in batches of a base slot's size (rows_batch). One rank without NCCL copies its rows.
 * Declined (0, every rank alike) when no base slot is free. */
static int z3d_embed_rows(void *ctx, const int32_t *ids, int n, float *out) {
    st_comm *c = ctx;
    st_z3dev *z = c->z3dev;
    const st_model *m = z->m;
    const st_backend *be = m->be;
    size_t C = (size_t)m->cfg.d_model, V = (size_t)m->cfg.vocab;
    z3d_slot *s = rows_slot(z);
    if (!z->rows_embed || !s) return 0;
    double t0 = st_now();
    be->memset0(out, (size_t)n * C * sizeof(float)); /* ids outside the vocabulary: zero rows */
    if (!c->nccl) { /* one rank: every row is its own */
        for (int i = 0; i < n; i++)
            if (ids[i] >= 0 && (size_t)ids[i] < V)
                st_z3dev_part_fp32(c, 0, (size_t)ids[i] * C, C, out + (size_t)i * C, 0);
        return 1;
    }
    int w = c->world, counts[w], displs[w], total = 0;
    int rc = MPI_Allgather(&n, 1, MPI_INT, counts, 1, MPI_INT, c->comm);
    for (int r = 0; r < w; r++) {
        displs[r] = total;
        total += counts[r];
    }
    int32_t *all = rc == MPI_SUCCESS ? malloc((size_t)total * sizeof *all + 1) : NULL;
    int ok = all != NULL; /* every rank has its list, or none goes on */
    if (rc == MPI_SUCCESS) rc = MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, c->comm);
    if (rc == MPI_SUCCESS && ok) rc = MPI_Allgatherv(ids, n, MPI_INT32_T, all, counts, displs, MPI_INT32_T, c->comm);
    if (rc != MPI_SUCCESS || !ok) {
        keep_rc(c, st_fail(rc != MPI_SUCCESS ? ST_ECOMM : ST_ENOMEM, "rank %d: the stage-3 embedding rows failed",
                           c->rank));
        free(all);
        return 1; /* the step reports it */
    }
    int per = (int)(s->cap / C), err = 0;
    for (int i0 = 0; i0 < total && !err; i0 += per)
        err = rows_batch(c, s, all, i0, i0 + per < total ? i0 + per : total, displs[c->rank], n, out);
    keep_rc(c, err);
    free(all);
    c->overlap_seconds += st_now() - t0;
    return 1;
}

static void z3d_progress(void *ctx) { (void)ctx; }

/* The gradients of [lo, hi) and the buffer that holds them (*edge: an edge buffer; *gb: a layer gradient
 * buffer's index, else -1). An untied embedding's shared buffer counts as its gradient buffer. */
static float *grad_source(st_z3dev *z, size_t lo, size_t hi, int *edge, int *gb) {
    *edge = 0;
    *gb = -1;
    for (int e = 0; e < Z3D_EDGES; e++)
        if (z->edge[e] && lo >= z->edge_lo[e] && hi <= z->edge_hi[e]) {
            if (e == 0 && z->edge0_shared) *gb = z->edge0_gb;
            else *edge = 1;
            return z->edge[e] + (lo - z->edge_lo[e]);
        }
    for (int b = 0; b < 2; b++) {
        z3d_gbuf *g = &z->gbuf[b];
        if (g->live && lo >= g->lo && hi <= g->hi) {
            *gb = b;
            return g->g + (lo - g->lo);
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
    int edge, gb;
    float *src = grad_source(z, lo, hi, &edge, &gb);
    if (!src) {
        keep_rc(c, st_fail(ST_EINVAL, "rank %d: internal error: stage-3 gradients [%zu, %zu) have no buffer", c->rank,
                           lo, hi));
        return;
    }
    int rc = 0, layer0 = gb >= 0 && z->gbuf[gb].live && z->gbuf[gb].first == st_model_layer_first_param(z->m, 0);
    if (gb >= 0) z->gbuf[gb].live = 0; /* no more writes: the reduction reads it until finished */
    for (size_t a = lo; a < hi && !rc; a += z->recv_floats) { /* in chunks: a receive buffer holds one rank's part */
        size_t b = hi - a < z->recv_floats ? hi : a + z->recv_floats;
        size_t os = a > c->lo ? a : c->lo, oe = b < c->hi ? b : c->hi, own = oe > os ? oe - os : 0;
        if (!c->nccl) { /* one rank: the sum is its own gradient */
            if (own) be->bias_add(c->shard_grads + (os - c->lo), src + (os - lo), 1, (int)own);
            continue;
        }
        if (z->n_rs == Z3D_RS) rs_finish_oldest(c); /* a receive buffer free */
        int j = z->rs[0].active ? 1 : 0;
        size_t parts[c->world];
        owner_parts(c, a, b, parts);
        rc = st_nccl_reduce_parts_sum(c->nccl, z->recv[j], src + (a - lo), parts);
        if (!rc) rc = st_nccl_record(c->nccl, Z3D_SLOTS + j);
        if (rc) break;
        int last = b == hi;
        z->rs[j] = (z3d_rs){1, os, own, last ? gb : -1, last && edge ? src : NULL, hi - lo};
        z->rs_order[z->n_rs++] = j;
        if (!c->z3_async) rs_finish_all(c); /* sharding.overlap false: each chunk waited for at once */
    }
    keep_rc(c, rc);
    if (!c->nccl) { /* nothing in flight: the buffers are free again */
        if (edge) be->memset0(src, (hi - lo) * sizeof(float));
        if (gb >= 0) z->gbuf[gb].busy = 0;
    }
    if (layer0 && z->edge0_shared) { /* the untied embeddings' gradients next (embedding_bwd): a free buffer */
        int e = free_gbuf(c);
        if (e < 0) {
            keep_rc(c, st_fail(ST_EINVAL, "rank %d: internal error: no gradient buffer for the embeddings", c->rank));
        } else {
            z->edge0_gb = e;
            z->edge[0] = z->gbuf[e].g;
            z->gbuf[e].busy = 1;
            be->memset0(z->edge[0], (z->edge_hi[0] - z->edge_lo[0]) * sizeof(float));
        }
    }
    sync_windows(z);
    c->overlap_seconds += st_now() - t0;
}

/* Floats of the receive buffer: one rank's part of a reduce-scattered chunk of at most ST_Z3_CHUNK. */
static size_t recv_floats(size_t shard, size_t most) {
    size_t r = shard < most ? shard : most;
    return r < ST_Z3_CHUNK ? r : ST_Z3_CHUNK;
}

/* Whether the embeddings' gradient (n floats) can live in a layer gradient buffer: untied, so nothing
 * writes it before layer 0's gradients are reduced. */
static int embed_shares(const st_model *m, size_t n, size_t layer_floats) {
    return !m->cfg.tied_embeddings && n <= layer_floats;
}

/* The trainable (compact) span of parameters [p0, p1) by goff (-1 frozen). */
static size_t trained_span(const st_model *m, const long *goff, int p0, int p1) {
    size_t ga = 0, gb = 0;
    for (int i = p0; i < p1; i++)
        if (goff[i] >= 0 && m->params[i].numel) {
            if (!gb) ga = (size_t)goff[i];
            gb = (size_t)goff[i] + m->params[i].numel;
        }
    return gb - ga;
}

/* Weight floats of group [p0, p1) (0 when empty); QLoRA's quantized parameters (held) left out: the others'
 * floats (contiguous in the quantized layout, worker/qlora.c), whichever layout the registry has. */
static size_t group_floats(const st_model *m, const unsigned char *held, int p0, int p1) {
    size_t a, b, n = 0;
    if (p1 <= p0) return 0;
    for (int i = p0; held && i < p1; i++) n += held[i] ? 0 : m->params[i].numel;
    if (held) return n;
    span(m, NULL, p0, p1, &a, &b);
    return b - a;
}

#define Z3D_HEAD_BLOCK_FLOATS (1L << 24) /* a head block holds at least this many floats (64 MiB fp32) */

/* SHARDTUNE_ZERO3_DEV_EDGES=whole (tests, A/B): the embedding and the head gathered whole, as before the
 * edges went by rows and blocks. */
static int edges_whole(void) {
    const char *e = getenv("SHARDTUNE_ZERO3_DEV_EDGES");
    return e && !strcmp(e, "whole");
}

/* Whether the forward moves the batch's rows of the embedding (z3d_embed_rows) instead of gathering the table:
 * an untied Llama-family embedding (worker/model.c asks for the rows then, st_model_forward). */
static int rows_embed(const st_model *m) {
    return !edges_whole() && !m->cfg.tied_embeddings && m->cfg.family != ST_FAMILY_GPT2 &&
           st_model_layer_first_param(m, 0) == 1;
}

/* Vocabulary rows of one block of an untied head (z3d_head_rows): as many as the largest layer group holds,
 * at least Z3D_HEAD_BLOCK_FLOATS' worth (fewer, larger gathers), a multiple of 16, the whole vocabulary when
 * that fits; SHARDTUNE_HEAD_BLOCK_ROWS (tests; worker/model.c head_vblock reads it too: every backend's head
 * runs those blocks) or SHARDTUNE_ZERO3_DEV_HEAD_ROWS (tests: only this path's) fewer. 0: a tied head
 * (the embedding's table, gathered whole) or edges_whole. */
static int head_block_rows(const st_model *m, size_t layer_group) {
    if (edges_whole() || m->cfg.tied_embeddings) return 0;
    long V = m->cfg.vocab, C = m->cfg.d_model;
    long most = (long)layer_group > Z3D_HEAD_BLOCK_FLOATS ? (long)layer_group : Z3D_HEAD_BLOCK_FLOATS;
    long rows = V * C <= most ? V : most / C / 16 * 16;
    if (rows < 16) rows = V < 16 ? V : 16;
    const char *e = getenv("SHARDTUNE_HEAD_BLOCK_ROWS"), *d = getenv("SHARDTUNE_ZERO3_DEV_HEAD_ROWS");
    if (e && atol(e) > 0 && atol(e) < rows) rows = atol(e);
    if (d && atol(d) > 0 && atol(d) < rows) rows = atol(d); /* tests: this path's blocks only */
    return (int)rows;
}

/* The largest base group in the weight space (*most: a layer; the embeddings unless their rows travel; final
 * norm + head, or the final norm and one head block of *head_rows rows, 0 when the head is gathered whole),
 * the largest adapter / prompt group (a layer's adapters, the prompt's tensors; *small), and the largest
 * layer group's trainable (compact) span (*layer_most: a layer's base parameters or its adapters); goff[i]
 * the compact offsets (-1 frozen). */
static void group_sizes(const st_model *m, const unsigned char *held, const long *goff, size_t *most, size_t *small,
                        size_t *layer_most, int *head_rows) {
    int L = m->cfg.n_layer, fn = st_model_layer_first_param(m, L), nb = st_model_base_params(m);
    *most = *small = *layer_most = 0;
    for (int l = 0; l < L; l++) {
        int p0 = st_model_layer_first_param(m, l), p1 = st_model_layer_first_param(m, l + 1), lf, ll;
        size_t n = group_floats(m, held, p0, p1), t = trained_span(m, goff, p0, p1);
        if (n > *most) *most = n;
        if (t > *layer_most) *layer_most = t;
        st_lora_layer_params(m, l, &lf, &ll);
        n = group_floats(m, held, lf, ll), t = trained_span(m, goff, lf, ll);
        if (n > *small) *small = n;
        if (t > *layer_most) *layer_most = t;
    }
    *head_rows = head_block_rows(m, *most);
    size_t n = rows_embed(m) ? 0 : group_floats(m, held, 0, st_model_layer_first_param(m, 0));
    if (n > *most) *most = n;
    n = group_floats(m, held, fn, *head_rows ? nb - 1 : nb);
    if (n > *most) *most = n;
    n = (size_t)*head_rows * (size_t)m->cfg.d_model;
    if (n > *most) *most = n;
    int pp = st_prompt_param(m);
    n = m->prompt ? group_floats(m, held, pp, pp + st_prompt_param_count(m)) : 0;
    if (n > *small) *small = n;
}

/* Trainable (compact) floats among parameters [first, last) by goff. */
static size_t trained_in(const st_model *m, const long *goff, int first, int last) {
    size_t n = 0;
    for (int i = first; i < last; i++) n += goff[i] >= 0 ? m->params[i].numel : 0;
    return n;
}

static long *model_goff(const st_model *m) {
    long *g = malloc((size_t)(m->n_params > 0 ? m->n_params : 1) * sizeof(long));
    for (int i = 0; g && i < m->n_params; i++) g[i] = m->params[i].grad_offset;
    return g;
}

void st_z3dev_floats(const st_model *m, const long *goff, int world, size_t shard, int bf16,
                     const st_qlora_spec *qs, size_t *weight_floats, size_t *grad_floats) {
    long *own = goff ? NULL : model_goff(m);
    const long *g = goff ? goff : own;
    unsigned char *held = qs ? calloc((size_t)m->n_params + 1, 1) : NULL; /* QLoRA's quantized parameters */
    *weight_floats = *grad_floats = 0;
    if (!g || (qs && !held)) {
        free(own);
        free(held);
        return;
    }
    for (int i = 0; held && i < m->n_params; i++)
        held[i] = (unsigned char)(m->qlora ? st_qlora_holds(m, i) : st_qlora_quantizable(m, i));
    size_t most, small, layer_most, e, nf = 0;
    int hrows;
    group_sizes(m, held, g, &most, &small, &layer_most, &hrows);
    int e0 = st_model_layer_first_param(m, 0), fn = st_model_layer_first_param(m, m->cfg.n_layer);
    size_t emb = trained_in(m, g, 0, e0);
    e = emb && embed_shares(m, emb, layer_most) ? 0 : emb;
    e += trained_in(m, g, fn, st_model_base_params(m));
    if (m->prompt) e += trained_in(m, g, st_prompt_param(m), st_prompt_param(m) + st_prompt_param_count(m));
    for (int i = 0; i < m->n_params; i++) nf += g[i] < 0 && !(held && held[i]) ? m->params[i].numel : 0;
    size_t fshard = (nf + (size_t)world - 1) / (size_t)world;
    size_t slots = m->cfg.tied_embeddings ? 3 : 2;
    /* slots (+ bf16 copies), the two adapter / prompt slots (fp32 only), the master shard, the frozen shard */
    *weight_floats = slots * (most + (bf16 ? (most + 1) / 2 : 0)) + 2 * small + shard + fshard;
    /* a head by blocks under fp32 (bf16 layouts have a block scratch, model.c head_vblock, as have test runs
     * with SHARDTUNE_HEAD_BLOCK_ROWS): one block of logits (dlogits) for a head chunk's rows (z3d_head_rows;
     * the most rows a chunk has) */
    if (hrows && hrows < m->cfg.vocab && !bf16 && !getenv("SHARDTUNE_HEAD_BLOCK_ROWS"))
        *weight_floats += st_model_head_chunk_floats(&m->cfg, 1, 1 << 20, 1) / (size_t)m->cfg.vocab * (size_t)hrows;
    if (qs) { /* QLoRA (qz_init): this rank's words of the blob, each base slot's bytes, the scratch (+ bf16) */
        size_t qb, fb, scratch, w16;
        st_qlora_footprint(m, qs, &qb, &fb, &scratch, &w16);
        size_t q4 = qb / 4, qshard = (q4 + (size_t)world - 1) / (size_t)world;
        *weight_floats += qshard + slots * (st_qlora_layer_bytes_max(m, qs) / 4) + scratch +
                          (bf16 ? (scratch + 1) / 2 : 0);
    }
    /* two layers' gradient buffers, the edges, shard_grads, two receive buffers */
    *grad_floats = 2 * layer_most + e + shard + (shard ? Z3D_RS * recv_floats(shard, most) : 0);
    free(own);
    free(held);
}

int st_z3dev_supported(const st_model *m) { return !m->n_w16; }

/* This rank's part [*a, *b) of frozen parameter i (element offsets; empty when it keeps none or i is not in
 * the frozen space). */
static void frozen_part(const st_comm *c, int i, size_t *a, size_t *b) {
    const st_param *p = &c->z3dev->m->params[i];
    *a = *b = 0;
    if (p->grad_offset >= 0 || c->z3_foff[i] < 0) return;
    size_t g = (size_t)c->z3_foff[i], s = g > c->flo ? g : c->flo, e = g + p->numel < c->fhi ? g + p->numel : c->fhi;
    if (e > s) *a = s - g, *b = e - g;
}

/* The frozen shard laid out with the parts of the parameters flags[i] names held in bf16 only: fat[i] of every
 * frozen parameter, each of the two buffers (bf16, fp32 with the padding past the last parameter) compacted in
 * frozen-space order. Element k of i is at fat[i] + k for every k of a run's parameters from i on (gather_run
 * counts from a run's first parameter): one starting before the shard at -(flo - its offset). Returns the
 * floats held in bf16. */
static size_t frozen_compact(const st_comm *c, const unsigned char *flags, long *fat) {
    const st_model *m = c->z3dev->m;
    size_t at16 = 0, at32 = 0, a, b;
    for (int i = 0; i < m->n_params; i++) {
        if (m->params[i].grad_offset >= 0 || c->z3_foff[i] < 0) continue;
        frozen_part(c, i, &a, &b);
        size_t *at = flags[i] ? &at16 : &at32, f = (size_t)c->z3_foff[i];
        fat[i] = (long)*at - (long)((f > c->flo ? f : c->flo) - f);
        *at += b - a;
    }
    return at16;
}

/* The load's choice (st_comm_options.frozen_bf16, made from the files' dtypes before anything is allocated):
 * the frozen parameters whose parts are read straight into bf16 (st_z3dev_put_bf16) get no fp32 place at all;
 * the ranks agree (a rank that cannot hold names none). Before the frozen shard is allocated, on a model bound
 * without weights only. 0 or ST_ENOMEM. */
static int frozen_prehold(st_comm *c, st_model *m) {
    st_z3dev *z = c->z3dev;
    const unsigned char *want = c->z3_pre16;
    int np = m->n_params, any = 0;
    c->z3_pre16 = NULL; /* the options' array: the trainer's, for this build only */
    if (!want || np < 1 || (m->weights && !m->weights_tail_only) || m->precision != ST_PRECISION_BF16 || all_train(m) || z->held) return 0;
    unsigned char ok[np];
    unsigned char *flags = malloc((size_t)np);
    for (int i = 0; i < np; i++)
        ok[i] = flags && want[i] && m->params[i].grad_offset < 0 && c->z3_foff[i] >= 0 && st_model_bf16_storable(m, i);
    if (MPI_Allreduce(MPI_IN_PLACE, ok, np, MPI_UNSIGNED_CHAR, MPI_MIN, c->comm) != MPI_SUCCESS) memset(ok, 0, (size_t)np);
    for (int i = 0; i < np; i++) any |= ok[i];
    if (!any) {
        free(flags);
        return 0;
    }
    memcpy(flags, ok, (size_t)np);
    z->fb16 = flags;
    z->n16 = frozen_compact(c, flags, z->fat);
    z->f16 = z->n16 ? m->be->alloc(z->n16 * sizeof(uint16_t)) : NULL;
    if (z->n16 && !z->f16)
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 frozen shard", c->rank, m->be->name);
    return 0;
}

/* The frozen space as CPU ranks lay it out (worker/comm.h): the frozen parameters in registry order,
 * padded to the world, this rank's [flo, fhi) of it; c->z3_foff (freed by st_comm_free). */
static int frozen_layout(st_comm *c, const st_model *m) {
    c->z3_foff = malloc((size_t)(m->n_params > 0 ? m->n_params : 1) * sizeof(long));
    if (!c->z3_foff) return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 frozen space", c->rank);
    c->nf = 0;
    for (int i = 0; i < m->n_params; i++) {
        /* QLoRA's quantized parameters: their bytes are sharded apart (qz_init) */
        c->z3_foff[i] = m->params[i].grad_offset >= 0 || st_qlora_holds(m, i) ? -1 : (long)c->nf;
        if (c->z3_foff[i] >= 0) c->nf += m->params[i].numel;
    }
    size_t w = (size_t)c->world;
    c->fshard = (c->nf + w - 1) / w;
    c->flo = c->fshard * (size_t)c->rank;
    c->fhi = c->flo + c->fshard;
    return 0;
}

/* The master shards from the whole weights m->weights (this rank's parts copied out), and where each
 * parameter's parts are kept (z->part_base). */
static void cut_shards(st_comm *c, st_model *m, const float *whole) {
    st_z3dev *z = c->z3dev;
    const st_backend *be = m->be;
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        int frozen = p->grad_offset < 0;
        if (frozen && c->z3_foff[i] < 0) { /* QLoRA's quantized: unfused its values are the scratch's (qz_init);
                                             * fused it has no storage (worker/qlora.h's readers) */
            if (z->part_base) z->part_base[i] = z->scratch ? z->scratch + (p->offset - z->scr_lo) : NULL;
            continue;
        }
        size_t g = frozen ? (size_t)c->z3_foff[i] : (size_t)p->grad_offset, lo = frozen ? c->flo : c->lo;
        size_t hi = frozen ? c->fhi : c->hi;
        float *base = frozen ? z->fmaster : z->master;
        if (frozen && !z->fb16) z->fat[i] = (long)g - (long)lo; /* else laid out already (frozen_prehold) */
        float *at = !base || (frozen && z->fb16 && z->fb16[i]) ? NULL : frozen ? base + z->fat[i] : base + g - lo;
        if (z->part_base) z->part_base[i] = at; /* element e of i: part_base[i] + e; none when held in bf16 only */
        size_t s = g > lo ? g : lo, e = g + p->numel < hi ? g + p->numel : hi;
        int unread = m->weights_tail_only && i < st_model_base_params(m); /* no base in `whole` */
        if (whole && !unread && s < e) be->copy(base + (s - lo), whole + p->offset + (s - g), (e - s) * sizeof(float));
    }
}

int st_z3dev_init(st_comm *c, st_model *m) {
    const st_backend *be = m->be;
    if (!st_z3dev_supported(m)) /* st_qlora_begin's spec.bf16: the trainer never sets it at stage 3 */
        return st_fail(ST_ECONFIG, "sharding.stage 3 on the %s backend needs the frozen base in fp32 (a QLoRA base "
                                   "held in bf16 only is a stage 0-2 layout)", be->name);
    if (m->cfg.n_layer < 1) return st_fail(ST_ECONFIG, "sharding.stage 3 on the %s backend needs a layer", be->name);
    st_z3dev *z = calloc(1, sizeof *z);
    if (!z) return st_fail(ST_ENOMEM, "out of memory");
    c->z3dev = z;
    z->m = m;
    int bf16 = m->precision == ST_PRECISION_BF16, every = all_train(m);
    long *goff = model_goff(m);
    z->runs = malloc(5 * (size_t)(m->n_params > 0 ? m->n_params : 1) * sizeof(size_t));
    z->fat = malloc((size_t)(m->n_params > 0 ? m->n_params : 1) * sizeof(long));
    if (!goff || !z->runs || !z->fat || frozen_layout(c, m)) {
        free(goff);
        return st_fail(ST_ENOMEM, "rank %d: out of memory for the stage-3 layout", c->rank);
    }
    int qrc = qz_init(c, m, bf16); /* QLoRA: before the sizes (the quantized parameters leave the groups) */
    if (qrc) {
        free(goff);
        return qrc;
    }
    group_sizes(m, z->held, goff, &z->slot_floats, &z->small_floats, &z->layer_floats, &z->head_block);
    z->rows_embed = rows_embed(m);
    z->head = z->head_block ? st_model_base_params(m) - 1 : -1;
    free(goff);
    z->n_slots = (m->cfg.tied_embeddings ? 3 : 2) + (z->small_floats > 0 ? 2 : 0);
    z->recv_floats = recv_floats(c->shard, z->slot_floats);
    int L = m->cfg.n_layer, e0 = st_model_layer_first_param(m, 0), fn = st_model_layer_first_param(m, L);
    grad_span(m, 0, e0, &z->edge_lo[0], &z->edge_hi[0]);
    grad_span(m, fn, st_model_base_params(m), &z->edge_lo[1], &z->edge_hi[1]);
    int pp = st_prompt_param(m); /* the prompt's tensors: every layer's backward may write them (prefix tuning) */
    if (m->prompt) grad_span(m, pp, pp + st_prompt_param_count(m), &z->edge_lo[2], &z->edge_hi[2]);
    /* the full gradient buffer and bf16 copy go first, the full weights once the master shards are cut */
    be->free(m->grads);
    m->grads = NULL;
    be->free(m->weights_bf16);
    m->weights_bf16 = NULL;
    z->master = c->shard ? be->alloc(c->shard * sizeof(float)) : NULL;
    int prc = frozen_prehold(c, m); /* the parts the load reads straight into bf16: no fp32 place */
    if (prc) return prc;
    size_t n32 = c->fshard - z->n16;
    z->fmaster = n32 ? be->alloc(n32 * sizeof(float)) : NULL;
    size_t np = (size_t)(m->n_params > 0 ? m->n_params : 1);
    z->part_base = every ? NULL : malloc(np * sizeof(float *));
    if ((c->shard && !z->master) || (n32 && !z->fmaster) || (!every && !z->part_base))
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 shard", c->rank, be->name);
    if (z->master) be->memset0(z->master, c->shard * sizeof(float)); /* the padding past the last parameter */
    if (z->fmaster) be->memset0(z->fmaster, n32 * sizeof(float));
    if (z->f16) be->memset0(z->f16, z->n16 * sizeof(uint16_t));
    /* m->weights NULL: built without weights (buffers_external), streamed in after; weights_tail_only: the
     * adapters' / prompt's initial values only (attached to such a model), the base streamed in after */
    cut_shards(c, m, m->weights);
    be->free(m->weights_tail_only ? m->weights + m->n_base_weights : m->weights);
    m->weights_tail_only = 0; /* from here on this rank's parts are the whole of its weights */
    /* every parameter trains: weights + offset reaches this rank's parts (see the top of the file); else
     * they are found through part_base (nothing may read m->weights) */
    m->weights = every ? z->master - c->lo : NULL;
    m->part_base = z->part_base;
    int ok = 1;
    for (int k = 0; k < z->n_slots; k++) { /* the base groups' slots, then the adapters' / prompt's (fp32 only) */
        z3d_slot *s = &z->slot[k];
        s->small = z->small_floats && k >= z->n_slots - 2;
        s->cap = s->small ? z->small_floats : z->slot_floats;
        s->w = be->alloc(s->cap * sizeof(float));
        s->w16 = bf16 && !s->small ? be->alloc(s->cap * sizeof(uint16_t)) : NULL;
        ok = ok && s->w && (!bf16 || s->small || s->w16);
        if (z->held && !s->small) { /* QLoRA: a layer's quantized bytes (qz_gather) */
            s->qcap = z->qslot_bytes;
            s->q = be->alloc(s->qcap ? s->qcap : 1);
            ok = ok && s->q;
        }
    }
    for (int b = 0; b < 2 && z->layer_floats; b++) { /* none when no layer trains (prompt learning) */
        z->gbuf[b].g = be->alloc(z->layer_floats * sizeof(float));
        ok = ok && z->gbuf[b].g;
    }
    z->edge0_shared = z->edge_hi[0] > z->edge_lo[0] && embed_shares(m, z->edge_hi[0] - z->edge_lo[0], z->layer_floats) &&
                      z->gbuf[0].g; /* the embeddings train */
    for (int e = 0; e < Z3D_EDGES; e++) {
        size_t n = z->edge_hi[e] - z->edge_lo[e];
        z->edge[e] = e == 0 && z->edge0_shared ? z->gbuf[0].g : n ? be->alloc(n * sizeof(float)) : NULL;
        ok = ok && (!n || z->edge[e]);
        if (z->edge[e]) be->memset0(z->edge[e], n * sizeof(float));
    }
    for (int j = 0; j < Z3D_RS; j++) {
        z->recv[j] = be->alloc(z->recv_floats * sizeof(float));
        ok = ok && z->recv[j];
    }
    c->shard_grads = be->alloc(c->shard * sizeof(float));
    if (!ok || !c->shard_grads)
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 gather buffers", c->rank, be->name);
    be->memset0(c->shard_grads, c->shard * sizeof(float));
    m->grads = c->shard_grads - c->lo; /* not read: gradients live in the windows and the shard */
    const char *pf = getenv("SHARDTUNE_ZERO3_PREFETCH");
    c->z3_prefetch = !(pf && strcmp(pf, "0") == 0);
    const char *fault = getenv("SHARDTUNE_ZERO3_DEV_FAULT"); /* tests only (see st_z3dev) */
    z->fault_rs_wait = fault && !strcmp(fault, "rs-wait");
    z->fault_one_gbuf = fault && !strcmp(fault, "one-grad-buffer");
    z->fault_gather_wait = fault && !strcmp(fault, "gather-wait");
    z->fault_qz_late = fault && !strcmp(fault, "qz-late");
    c->model = m;
    m->windowed = 1;
    st_model_set_residency(m, &(st_residency_hooks){.acquire = z3d_acquire,
                                                    .release = z3d_release,
                                                    .prefetch = z3d_prefetch,
                                                    .progress = z3d_progress,
                                                    .grad_ready = z3d_grad_ready,
                                                    .embed_rows = z->rows_embed ? z3d_embed_rows : NULL,
                                                    .head_rows = z->head_block ? z3d_head_rows : NULL,
                                                    .head_block = z->head_block,
                                                    .ctx = c});
    sync_windows(z);
    return 0;
}

void st_z3dev_backward(st_comm *c, int in_backward) {
    if (!c->z3dev) return;
    c->z3dev->in_bwd = in_backward;
    if (!in_backward) { /* the last reductions (the embeddings') finished: the next forward may write */
        double t0 = st_now();
        rs_finish_all(c);
        c->overlap_seconds += st_now() - t0;
    }
}

int st_z3dev_unshard(st_comm *c) {
    st_z3dev *z = c->z3dev;
    st_model *m = z->m;
    const st_backend *be = m->be;
    if (z->held) /* QLoRA's trainable set (the adapters) never changes */
        return st_fail(ST_ECONFIG, "a QLoRA run's trainable set cannot change at sharding.stage 3 on a device");
    rs_finish_all(c);
    float *whole = be->alloc((m->n_weights ? m->n_weights : 1) * sizeof(float));
    int rc = whole ? 0 : st_fail(ST_ENOMEM, "rank %d: out of %s memory gathering the weights for a new trainable set",
                                 c->rank, be->name);
    for (int i = 0; i < m->n_params && !rc; i++) { /* each parameter from its space: owners' parts, then the rest */
        const st_param *p = &m->params[i];
        int frozen = p->grad_offset < 0;
        size_t g = frozen ? (size_t)c->z3_foff[i] : (size_t)p->grad_offset, shard = frozen ? c->fshard : c->shard;
        size_t lo = frozen ? c->flo : c->lo, hi = lo + shard;
        size_t s = g > lo ? g : lo, e = g + p->numel < hi ? g + p->numel : hi;
        if (s < e) st_z3dev_part_fp32(c, i, s - g, e - s, whole + p->offset + (s - g), 0);
        if (!c->nccl || !p->numel) continue;
        size_t parts[c->world];
        space_parts(c, shard, g, g + p->numel, parts);
        rc = st_nccl_all_gather_parts(c->nccl, whole + p->offset, parts);
        if (!rc && (i % 64 == 63 || i == m->n_params - 1)) rc = st_nccl_wait_compute(c->nccl); /* a bounded queue */
    }
    if (!rc && c->nccl) rc = st_nccl_wait_compute(c->nccl);
    st_z3dev_free(c); /* waits for what is queued */
    if (rc) {
        be->free(whole);
        return rc;
    }
    m->weights = whole;
    return 0;
}

/* ---- a change of the trainable set without whole weights (st_z3dev_detach, st_z3dev_reshard) ---- */

/* n values of a frozen shard from its element k, as fp32 (out) / from fp32 (in): the only readers and writers
 * of fmaster here, so its element type is theirs to know. */
static void frozen_get(const st_z3dev *z, size_t k, float *out, size_t n) {
    z->m->be->copy(out, z->fmaster + k, n * sizeof(float));
}

static void frozen_put(st_z3dev *z, size_t k, const float *in, size_t n) {
    z->m->be->copy(z->fmaster + k, in, n * sizeof(float));
}

typedef struct { /* one sharded space as this rank holds it: its part [lo, lo + shard) */
    st_z3dev *fz;    /* the frozen space of this st_z3dev (frozen_get / frozen_put), else ... */
    float *f;        /* ... an fp32 shard (master weights, a moment) */
    size_t lo, shard;
} z3d_side;

static void side_get(const st_backend *be, const z3d_side *s, size_t at, float *out, size_t n) {
    if (s->fz) frozen_get(s->fz, at - s->lo, out, n);
    else be->copy(out, s->f + (at - s->lo), n * sizeof(float));
}

static void side_put(const st_backend *be, z3d_side *s, size_t at, const float *in, size_t n) {
    if (s->fz) frozen_put(s->fz, at - s->lo, in, n);
    else be->copy(s->f + (at - s->lo), in, n * sizeof(float));
}

/* Whether a stage change moves a piece all-gathered (SHARDTUNE_Z3DEV_MOVE=gather: every rank receives the whole
 * piece, the path before, kept for A/B) instead of owner to owner. */
static int move_by_gather(void) {
    const char *e = getenv("SHARDTUNE_Z3DEV_MOVE");
    return e && !strcmp(e, "gather");
}

/* The moves' traffic so far (st_z3dev_move_counts): one communicator per process. */
static size_t move_received, move_needed, move_moved;

void st_z3dev_move_counts(size_t *received, size_t *needed, size_t *moved) {
    *received = move_received, *needed = move_needed, *moved = move_moved;
}

/* Rank r's part [shard * r, shard * (r + 1)) of a space as a span of the piece [a, a + q) of it (offsets into the
 * piece; n 0: none of it). */
static st_nccl_span piece_part(size_t shard, int r, size_t a, size_t q) {
    size_t lo = shard * (size_t)r, hi = lo + shard;
    size_t s = a > lo ? a : lo, e = a + q < hi ? a + q : hi;
    return e > s ? (st_nccl_span){s - a, e - s} : (st_nccl_span){0, 0};
}

static st_nccl_span span_overlap(st_nccl_span x, st_nccl_span y) {
    size_t s = x.off > y.off ? x.off : y.off, e = x.off + x.n < y.off + y.n ? x.off + x.n : y.off + y.n;
    return x.n && y.n && e > s ? (st_nccl_span){s, e - s} : (st_nccl_span){0, 0};
}

/* Counts a tensor's move (n values, old space offset oa, new na): its bytes, and what this rank's new part of it
 * needs from other ranks (its new part less what its old part held), whatever the path moves. */
static void count_move(const st_comm *c, const z3d_side *from, size_t oa, const z3d_side *to, size_t na, size_t n) {
    st_nccl_span mine = piece_part(to->shard, c->rank, na, n), had = piece_part(from->shard, c->rank, oa, n);
    move_moved += n * sizeof(float);
    move_needed += (mine.n - span_overlap(mine, had).n) * sizeof(float);
}

/* A piece [a, a + q) of the old space, this rank's old part already in buf: the old owners' parts all-gathered
 * into buf (the SHARDTUNE_Z3DEV_MOVE=gather path). */
static int piece_gather(st_comm *c, float *buf, size_t oshard, size_t a, size_t q) {
    size_t parts[c->world];
    space_parts(c, oshard, a, a + q, parts);
    for (int r = 0; r < c->world; r++)
        if (r != c->rank) move_received += parts[r] * sizeof(float);
    int rc = st_nccl_all_gather_parts(c->nccl, buf, parts);
    return rc ? rc : st_nccl_wait_compute(c->nccl); /* the copy out reads what arrived */
}

/* The same piece owner to owner (at na of the new space): this rank sends each new owner the part of its old part
 * that owner's new part holds and receives from each old owner what its own new part needs, in place in buf (the
 * sends read this rank's old part only; the receives land outside it; its own overlap is already there). */
static int piece_exchange(st_comm *c, float *buf, size_t oshard, size_t a, size_t nshard, size_t na, size_t q) {
    st_nccl_span to[c->world], from[c->world];
    st_nccl_span had = piece_part(oshard, c->rank, a, q), mine = piece_part(nshard, c->rank, na, q);
    for (int r = 0; r < c->world; r++) {
        to[r] = span_overlap(had, piece_part(nshard, r, na, q));
        from[r] = span_overlap(mine, piece_part(oshard, r, a, q));
        if (r != c->rank) move_received += from[r].n * sizeof(float);
    }
    int rc = st_nccl_send_recv(c->nccl, buf, to, buf, from);
    return rc ? rc : st_nccl_wait_compute(c->nccl); /* the copy out reads what arrived */
}

/* Moves n values of one tensor from `from` (at space offset oa) to `to` (at na) in pieces of at most cap
 * floats through buf: this rank's old part of a piece copied in, what its new part needs of the others' sent
 * owner to owner (piece_exchange; SHARDTUNE_Z3DEV_MOVE=gather: the piece all-gathered), its new part copied
 * out. Collective: every rank moves the same tensors in the same order. */
static int move_values(st_comm *c, float *buf, size_t cap, const z3d_side *from, size_t oa, z3d_side *to, size_t na,
                       size_t n) {
    const st_backend *be = c->be;
    int gather = move_by_gather();
    count_move(c, from, oa, to, na, n);
    for (size_t k = 0; k < n; k += cap) {
        size_t q = n - k < cap ? n - k : cap;
        st_nccl_span had = piece_part(from->shard, c->rank, oa + k, q);
        if (had.n) side_get(be, from, oa + k + had.off, buf + had.off, had.n);
        int rc = !c->nccl ? 0
                 : gather ? piece_gather(c, buf, from->shard, oa + k, q)
                          : piece_exchange(c, buf, from->shard, oa + k, to->shard, na + k, q);
        if (rc) return rc;
        st_nccl_span mine = piece_part(to->shard, c->rank, na + k, q);
        if (mine.n) side_put(be, to, na + k + mine.off, buf + mine.off, mine.n);
    }
    return 0;
}

/* The piece buffer: the new communicator's first base slot (no group is resident during a change). */
static float *piece_buf(const st_comm *c, size_t *cap) {
    *cap = c->z3dev->slot[0].cap;
    return c->z3dev->slot[0].w;
}

static void detached_free(st_z3dev *old) {
    if (!old) return;
    old->m->be->free(old->master);
    old->m->be->free(old->fmaster);
    free(old->old_foff);
    free(old);
}

st_z3dev *st_z3dev_detach(st_comm *c, int *rc) {
    st_z3dev *z = c->z3dev, *old = NULL;
    *rc = 0;
    if (z->held) /* QLoRA's trainable set (the adapters) never changes */
        *rc = st_fail(ST_ECONFIG, "a QLoRA run's trainable set cannot change at sharding.stage 3 on a device");
    else if (!(old = calloc(1, sizeof *old)))
        *rc = st_fail(ST_ENOMEM, "out of memory");
    if (!*rc && (*rc = st_z3dev_restore_fp32(c))) /* the frozen parts move as fp32 (frozen_get); the new
                                                        communicator holds its own in bf16 again after the change */
        free(old), old = NULL;
    if (*rc) return NULL;
    rs_finish_all(c);
    old->m = z->m;
    old->master = z->master;
    old->fmaster = z->fmaster;
    z->master = NULL;
    z->fmaster = NULL;
    old->old_foff = c->z3_foff;
    c->z3_foff = NULL;
    old->old_lo = c->lo, old->old_shard = c->shard, old->old_flo = c->flo, old->old_fshard = c->fshard;
    st_z3dev_free(c); /* waits for what is queued */
    return old;
}

int st_z3dev_reshard(st_comm *c, st_z3dev *old, const long *old_off) {
    st_z3dev *z = c->z3dev;
    const st_model *m = z->m;
    size_t cap;
    float *buf = piece_buf(c, &cap);
    int rc = 0;
    for (int i = 0; i < m->n_params && !rc; i++) { /* each parameter from its old space to its new one */
        const st_param *p = &m->params[i];
        int of = old_off[i] < 0, nf = p->grad_offset < 0;
        long oa = of ? old->old_foff[i] : old_off[i], na = nf ? c->z3_foff[i] : p->grad_offset;
        if (!p->numel || oa < 0 || na < 0) continue;
        z3d_side from = {of ? old : NULL, of ? NULL : old->master, of ? old->old_flo : old->old_lo,
                         of ? old->old_fshard : old->old_shard};
        z3d_side to = {nf ? z : NULL, nf ? NULL : z->master, nf ? c->flo : c->lo, nf ? c->fshard : c->shard};
        rc = move_values(c, buf, cap, &from, (size_t)oa, &to, (size_t)na, p->numel);
    }
    if (c->nccl) { /* nothing queued still reads the old shards freed below */
        int src = st_nccl_synchronize(c->nccl);
        if (!rc) rc = src;
    }
    detached_free(old);
    return rc;
}

int st_z3dev_move_moments(st_comm *c, const long *old_off, size_t old_shard, float *old_m, float *old_v,
                          float *new_m, float *new_v) {
    const st_model *m = c->z3dev->m;
    size_t cap, old_lo = old_shard * (size_t)c->rank;
    float *buf = piece_buf(c, &cap);
    int rc = 0;
    for (int i = 0; i < m->n_params && !rc; i++) { /* trainable before and after: its moments carried over */
        const st_param *p = &m->params[i];
        if (!p->numel || p->grad_offset < 0 || old_off[i] < 0) continue;
        z3d_side fm = {NULL, old_m, old_lo, old_shard}, fv = {NULL, old_v, old_lo, old_shard};
        z3d_side tm = {NULL, new_m, c->lo, c->shard}, tv = {NULL, new_v, c->lo, c->shard};
        rc = move_values(c, buf, cap, &fm, (size_t)old_off[i], &tm, (size_t)p->grad_offset, p->numel);
        if (!rc) rc = move_values(c, buf, cap, &fv, (size_t)old_off[i], &tv, (size_t)p->grad_offset, p->numel);
    }
    if (c->nccl) { /* nothing queued still reads the old moments (freed by the caller) */
        int src = st_nccl_synchronize(c->nccl);
        if (!rc) rc = src;
    }
    return rc;
}

void st_z3dev_drop_detached(st_z3dev *old) { detached_free(old); }

void st_z3dev_free(st_comm *c) {
    st_z3dev *z = c->z3dev;
    if (!z) return;
    st_model *m = z->m;
    const st_backend *be = m->be;
    if (c->nccl) st_nccl_synchronize(c->nccl); /* nothing queued writes the buffers freed below */
    for (int k = 0; k <= z->n_slots; k++) {
        be->free(z->slot[k].w);
        be->free(z->slot[k].w16);
        be->free(z->slot[k].q);
    }
    qz_free(z);
    for (int b = 0; b < 2; b++) be->free(z->gbuf[b].g);
    for (int e = 0; e < Z3D_EDGES; e++)
        if (e || !z->edge0_shared) be->free(z->edge[e]);
    be->free(z->master);
    be->free(z->fmaster);
    be->free(z->f16);
    for (int j = 0; j < Z3D_RS; j++) be->free(z->recv[j]);
    be->free(z->htmp);
    free(z->runs);
    free(z->fat);
    free(z->fb16);
    free(z->part_base);
    m->part_base = NULL;
    /* the model keeps no weights: a device stage-3 communicator is freed at the end of a run only
     * (st_comm_reshard_optim refuses to rebuild it) */
    m->weights = NULL;
    m->grads = NULL;
    m->windowed = 0;
    m->n_wwin = m->n_gwin = 0;
    free(z);
    c->z3dev = NULL;
}

/* ---- frozen parts held in bf16 only (st_z3dev_hold_bf16) ---- */

void st_z3dev_part_fp32(const st_comm *c, int i, size_t a, size_t n, float *dst, int host) {
    const st_z3dev *z = c->z3dev;
    const st_model *m = z->m;
    const st_backend *be = m->be;
    const st_param *p = &m->params[i];
    if (!n) return;
    if (p->grad_offset < 0 && z->fb16 && z->fb16[i]) { /* widened: exact */
        const uint16_t *src = z->f16 + z->fat[i] + (long)a;
        if (!host) {
            be->from_bf16(dst, src, n);
            return;
        }
        uint16_t piece[4096];
        for (size_t k = 0; k < n; k += 4096) {
            size_t q = n - k < 4096 ? n - k : 4096;
            be->copy_to_host(piece, src + k, q * sizeof(uint16_t));
            for (size_t j = 0; j < q; j++) dst[k + j] = st_bf16_bits_to_float(piece[j]);
        }
        return;
    }
    const float *src = p->grad_offset < 0 ? z->fmaster + z->fat[i] + (long)a
                                          : z->master + ((size_t)p->grad_offset + a - c->lo);
    if (host) be->copy_to_host(dst, src, n * sizeof(float));
    else be->copy(dst, src, n * sizeof(float));
}

/* Whether this rank's fp32 part [a, b) of frozen parameter i holds bf16 values only (read a piece at a time). */
static int part_exact(const st_comm *c, int i, size_t a, size_t b, float *host, size_t cap) {
    for (size_t k = a; k < b; k += cap) {
        size_t q = b - k < cap ? b - k : cap;
        st_z3dev_part_fp32(c, i, k, q, host, 1);
        if (!st_model_bf16_exact(host, q)) return 0;
    }
    return 1;
}

size_t st_z3dev_hold_bf16(st_comm *c) {
    st_z3dev *z = c->z3dev;
    st_model *m = z->m;
    const st_backend *be = m->be;
    int np = m->n_params;
    if (z->held_checked || !np || !z->part_base) return z->n16; /* held so already (idempotent); or nothing is frozen */
    unsigned char ok[np + 1];
    size_t cap = (size_t)1 << 16, n16 = 0, a, b;
    float *host = malloc(cap * sizeof(float));
    /* the ranks agree (as on CPU ranks, worker/comm.c st_comm_drop_frozen_fp32): a frozen parameter of the
     * kinds st_model_bf16_only_candidate names whose parts are bf16 values on every rank (a rank that cannot
     * check names none); those the load read straight into bf16 (frozen_prehold) are so already */
    int fresh = 0; /* a part not held yet is */
    for (int i = 0; i < np; i++) {
        frozen_part(c, i, &a, &b);
        int was = z->fb16 && z->fb16[i];
        ok[i] = was || (host && c->z3_foff[i] >= 0 && m->params[i].grad_offset < 0 && st_model_bf16_only_candidate(m, i) &&
                        part_exact(c, i, a, b, host, cap));
    }
    int rc = MPI_Allreduce(MPI_IN_PLACE, ok, np, MPI_UNSIGNED_CHAR, MPI_MIN, c->comm), any = 0;
    for (int i = 0; i < np && rc == MPI_SUCCESS; i++) {
        frozen_part(c, i, &a, &b);
        n16 += ok[i] ? b - a : 0;
        any |= ok[i];
        fresh |= ok[i] && !(z->fb16 && z->fb16[i]);
    }
    if (rc == MPI_SUCCESS && any && !fresh) { /* the load's choice was the whole of it */
        free(host);
        z->held_checked = 1;
        return z->n16;
    }
    /* the new layout staged in host memory (the device never holds the fp32 shard and the new buffers at once):
     * the held parts rounded there (exactly), the others and the padding past the last parameter as fp32 */
    size_t n32 = c->fshard - n16;
    long *fat = any ? malloc((size_t)np * sizeof(long)) : NULL;
    uint16_t *h16 = any ? malloc(n16 * sizeof(uint16_t) + 2) : NULL;
    float *h32 = any ? calloc(n32 + 1, sizeof(float)) : NULL;
    unsigned char *flags = any ? malloc((size_t)np) : NULL;
    int good = fat && h16 && h32 && flags; /* a saving, not a need: every rank holds so, or none */
    if (any) rc = MPI_Allreduce(MPI_IN_PLACE, &good, 1, MPI_INT, MPI_MIN, c->comm);
    if (!any || rc != MPI_SUCCESS || !good) {
        free(host), free(fat), free(h16), free(h32), free(flags);
        return z->n16; /* what the load held stays so */
    }
    memcpy(flags, ok, (size_t)np);
    frozen_compact(c, flags, fat);
    for (int i = 0; i < np; i++) { /* from the old layout (st_z3dev_part_fp32 reads it) into the new */
        if (m->params[i].grad_offset >= 0 || c->z3_foff[i] < 0) continue;
        frozen_part(c, i, &a, &b);
        for (size_t k = a; ok[i] && k < b; k += cap) {
            size_t q = b - k < cap ? b - k : cap;
            st_z3dev_part_fp32(c, i, k, q, host, 1);
            for (size_t j = 0; j < q; j++) h16[fat[i] + (long)k + (long)j] = st_float_to_bf16_bits(host[j]);
        }
        if (!ok[i] && b > a) st_z3dev_part_fp32(c, i, a, b - a, h32 + fat[i] + (long)a, 1);
    }
    be->free(z->fmaster);
    be->free(z->f16);
    z->fmaster = n32 ? be->alloc(n32 * sizeof(float)) : NULL;
    z->f16 = n16 ? be->alloc(n16 * sizeof(uint16_t)) : NULL;
    if ((n32 && !z->fmaster) || (n16 && !z->f16)) /* smaller than what was just freed: the step reports it */
        keep_rc(c, st_fail(ST_ENOMEM, "rank %d: out of %s memory holding the stage-3 frozen shard in bf16", c->rank,
                           be->name));
    if (z->fmaster) be->copy_to_device(z->fmaster, h32, n32 * sizeof(float));
    if (z->f16) be->copy_to_device(z->f16, h16, n16 * sizeof(uint16_t));
    free(host), free(h16), free(h32);
    free(z->fb16);
    memcpy(z->fat, fat, (size_t)np * sizeof(long));
    free(fat);
    z->fb16 = flags;
    z->n16 = n16;
    z->held_checked = 1;
    for (int i = 0; i < np; i++) /* element e of a part kept in fp32 at part_base[i] + e; none for the others */
        if (m->params[i].grad_offset < 0 && c->z3_foff[i] >= 0)
            z->part_base[i] = flags[i] || !z->fmaster ? NULL : z->fmaster + z->fat[i];
    return n16;
}

int st_z3dev_part_held(const st_comm *c, int i) {
    const st_z3dev *z = c->z3dev;
    return z && z->fb16 && z->m->params[i].grad_offset < 0 && z->fb16[i];
}

void st_z3dev_put_bf16(st_comm *c, int i, size_t a, size_t n, const uint16_t *host) {
    st_z3dev *z = c->z3dev;
    if (n) z->m->be->copy_to_device(z->f16 + z->fat[i] + (long)a, host, n * sizeof(uint16_t));
}

int st_z3dev_restore_fp32(st_comm *c) {
    st_z3dev *z = c->z3dev;
    st_model *m = z->m;
    const st_backend *be = m->be;
    if (!z->fb16) return 0;
    /* staged in host memory, as the hold: the device never holds both layouts */
    float *h = calloc(c->fshard + 1, sizeof(float)); /* zeros: the padding past the last parameter */
    if (!h) return st_fail(ST_ENOMEM, "rank %d: out of memory restoring the stage-3 frozen shard in fp32", c->rank);
    size_t a, b;
    for (int i = 0; i < m->n_params; i++) {
        if (m->params[i].grad_offset >= 0 || c->z3_foff[i] < 0) continue;
        frozen_part(c, i, &a, &b);
        long at = c->z3_foff[i] - (long)c->flo;
        st_z3dev_part_fp32(c, i, a, b - a, h + at + (long)a, 1);
        z->fat[i] = at;
    }
    be->free(z->fmaster);
    be->free(z->f16);
    free(z->fb16);
    z->f16 = NULL;
    z->fb16 = NULL;
    z->n16 = 0;
    z->held_checked = 0;
    z->fmaster = c->fshard ? be->alloc(c->fshard * sizeof(float)) : NULL;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].grad_offset < 0 && c->z3_foff[i] >= 0)
            z->part_base[i] = z->fmaster ? z->fmaster + z->fat[i] : NULL;
    if (z->fmaster) be->copy_to_device(z->fmaster, h, c->fshard * sizeof(float));
    free(h);
    if (c->fshard && !z->fmaster)
        return st_fail(ST_ENOMEM, "rank %d: out of %s memory for the stage-3 frozen shard in fp32", c->rank, be->name);
    return 0;
}
