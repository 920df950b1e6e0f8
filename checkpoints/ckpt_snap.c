/* ckpt_snap.c — the snapshot half of a checkpoint save (see ckpt.h): which element ranges this rank
 * writes, a host copy of them (device-to-host through the backend's copy_to_host), the checksums
 * summed across ranks and a deep copy of the metadata. After it, the write needs neither the model
 * nor the optimizer, so it can run in the background while training changes both. */
#include <stdlib.h>
#include <string.h>

#include "checkpoints/ckpt.h"
#include "checkpoints/ckpt_internal.h"
#include "common/error.h"
#include "worker/qlora.h"

/* The rank's write range of parameter p in /optim, param-relative, or a == b when it owns nothing:
 * its even share [share_lo, share_hi) of the padded compact space, intersected with p. */
static void optim_part(const st_param *p, uint64_t share_lo, uint64_t share_hi, uint64_t *a, uint64_t *b) {
    uint64_t s = (uint64_t)p->grad_offset, e = s + p->numel;
    uint64_t lo = s > share_lo ? s : share_lo, hi = e < share_hi ? e : share_hi;
    if (lo >= hi) { *a = *b = 0; return; }
    *a = lo - s;
    *b = hi - s;
}

static void *dup_bytes(const void *src, size_t n, int *bad) {
    if (!n) return NULL;
    void *d = malloc(n);
    if (!d) { *bad = 1; return NULL; }
    memcpy(d, src, n);
    return d;
}

static int copy_meta(st_ckpt_snap *s, const st_ckpt_meta *in) {
    int bad = 0;
    s->meta = *in;
    s->job_spec = dup_bytes(in->job_spec ? in->job_spec : "", strlen(in->job_spec ? in->job_spec : "") + 1, &bad);
    s->model_config = dup_bytes(in->model_config ? in->model_config : "",
                                strlen(in->model_config ? in->model_config : "") + 1, &bad);
    s->loader_state = dup_bytes(in->loader_state, in->loader_words * sizeof(uint64_t), &bad);
    int nt = in->n_tasks > 0 ? in->n_tasks : 0;
    s->task_checksums = dup_bytes(in->task_checksums, (size_t)nt * sizeof(uint64_t), &bad);
    s->task_weighting = dup_bytes(in->task_weighting, (size_t)(in->task_weighting_len > 0 ? in->task_weighting_len : 0) *
                                  sizeof(double), &bad);
    if (nt) {
        s->names_block = calloc((size_t)nt, 128);
        s->task_names = calloc((size_t)nt, sizeof(char *));
        bad |= !s->names_block || !s->task_names;
        for (int k = 0; !bad && k < nt; k++) {
            snprintf(s->names_block + 128 * k, 128, "%s", in->task_names[k]);
            s->task_names[k] = s->names_block + 128 * k;
        }
    }
    s->meta.job_spec = s->job_spec;
    s->meta.model_config = s->model_config;
    s->meta.loader_state = s->loader_state;
    s->meta.task_checksums = s->task_checksums;
    s->meta.task_weighting = s->task_weighting;
    s->meta.task_names = (const char *const *)s->task_names;
    return bad ? st_fail(ST_ENOMEM, "out of memory copying checkpoint metadata") : 0;
}

/* Ranges, sizes and flags of every tensor; the copy's size in floats. */
static size_t plan(st_ckpt_snap *s, const st_model *m, const st_optim *o, uint64_t share_lo, uint64_t share_hi) {
    size_t total = 0;
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        st_ckpt_snap_param *q = &s->p[i];
        snprintf(q->name, sizeof q->name, "%s", p->name);
        q->ndim = p->ndim;
        q->shape[0] = p->shape[0];
        q->shape[1] = p->shape[1];
        q->transposed = p->ndim == 2 && p->transpose_io;
        q->skip = st_ckpt_skips_tensor(m, i);
        q->trainable = p->grad_offset >= 0;
        q->step = q->trainable ? o->param_step[i] : -1;
        st_ckpt_model_part(p->ndim, p->shape, s->world, s->rank, i, &q->ma, &q->mb);
        if (q->trainable) optim_part(p, share_lo, share_hi, &q->oa, &q->ob);
        if (!q->skip) total += q->mb - q->ma;
        total += 2 * (q->ob - q->oa);
    }
    return total;
}

/* The checksum of parameter i's elements [a, a + n) held in bf16 only (st_model_drop_frozen_fp32: a frozen
 * base tensor under adapters), widened piece by piece: the fp32 values it stands for, exactly. */
static uint64_t sum_w16(const st_model *m, int i, size_t a, size_t n) {
    float piece[4096];
    uint64_t sum = 0;
    for (size_t k = 0; k < n; k += 4096) {
        size_t c = n - k < 4096 ? n - k : 4096;
        st_model_param_fp32_host(m, i, a + k, c, piece); /* host memory; a device's copy widened on the host */
        sum += st_ckpt_checksum(piece, a + k, c); /* partial sums add up (ckpt.h) */
    }
    return sum;
}

/* Copies (or points at) the data of every range. Only the checksums of the tensors left out (the frozen
 * base under adapters: not copied) are summed here; the others are the write's work (ckpt_write.c, each range just before it is written),
 * off the training's critical path. */
static void fill(st_ckpt_snap *s, const st_model *m, const st_optim *o, int borrow) {
    const st_backend *be = m->be;
    float *at = s->buf;
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        st_ckpt_snap_param *q = &s->p[i];
        size_t nw = q->mb - q->ma, no = q->ob - q->oa;
        st_model_acquire(m, i, i + 1); /* ZeRO-3: one tensor gathered at a time */
        const float *live = st_model_param_weights(m, i) + q->ma; /* a device ZeRO-3 gather buffer too */
        int w16 = st_model_fp32_dropped(m, i); /* frozen, in bf16 only: its fp32 value widened, exactly */
        if (borrow && w16) q->w16 = m->weights_bf16 + p->offset + q->ma;
        else if (borrow) q->w = live;
        else if (q->skip) q->w = NULL;
        else if (w16) {
            st_model_param_fp32_host(m, i, q->ma, nw, at); /* host memory; a device's copy widened on the host */
            q->w = at;
            at += nw;
        } else {
            be->copy_to_host(at, live, nw * sizeof(float));
            q->w = at;
            at += nw;
        }
        /* a skipped (frozen base) tensor still counts in base_checksum: summed from the live buffer (QLoRA: a
         * quantized one does not count; one held in bf16 only has its load-time sum, counted once) */
        if (q->skip && st_qlora_holds(m, i)) q->sum_w = 0;
        else if (q->skip && st_qlora_bf16_only(m, i)) q->sum_w = s->rank == 0 ? st_qlora_sum(m, i) : 0;
        else if (q->skip && w16) q->sum_w = sum_w16(m, i, q->ma, nw);
        else if (q->skip && !borrow) {
            float piece[4096];
            q->sum_w = 0;
            for (size_t k = 0; k < nw; k += 4096) {
                size_t c = nw - k < 4096 ? nw - k : 4096;
                be->copy_to_host(piece, live + k, c * sizeof(float));
                q->sum_w += st_ckpt_checksum(piece, q->ma + k, c); /* partial sums add up (ckpt.h) */
            }
        } else if (q->skip) q->sum_w = st_ckpt_checksum(q->w, q->ma, nw);
        st_model_release(m, i, i + 1);
        if (!q->trainable) continue;
        size_t off = (size_t)p->grad_offset + q->oa - o->lo;
        if (borrow) {
            q->m = o->m + off;
            q->v = o->v + off;
        } else {
            if (no) {
                be->copy_to_host(at, o->m + off, no * sizeof(float));
                be->copy_to_host(at + no, o->v + off, no * sizeof(float));
            }
            q->m = at;
            q->v = at + no;
            at += 2 * no;
        }
    }
}

/* The frozen base's checksums (adapters only), summed across the ranks, and their combination. */
static int sum_base(st_ckpt_snap *s, const st_model *m, MPI_Comm comm) {
    s->adapters = m->lora || m->prompt;
    if (!s->adapters) return 0;
    uint64_t *sums = calloc(3 * (size_t)s->n + 1, sizeof(uint64_t));
    int rc = sums ? 0 : st_fail(ST_ENOMEM, "out of memory staging a checkpoint"), worst;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MIN, comm);
    if (worst) { free(sums); return rc ? rc : st_fail(ST_ENOMEM, "out of memory staging a checkpoint on another rank"); }
    for (int i = 0; i < s->n; i++) sums[3 * i] = s->p[i].skip ? s->p[i].sum_w : 0;
    MPI_Allreduce(MPI_IN_PLACE, sums, 3 * s->n, MPI_UINT64_T, MPI_SUM, comm);
    for (int i = 0; i < s->n; i++)
        if (s->p[i].skip) s->p[i].sum_w = sums[3 * i];
    s->adapter_base_checksum = st_ckpt_base_checksum(m, sums, 3);
    free(sums);
    return 0;
}

int st_ckpt_snapshot(MPI_Comm comm, const st_model *m, const st_optim *o, const st_ckpt_meta *meta, int copy,
                     st_ckpt_snap **out) {
    return st_ckpt_snapshot_reuse(comm, m, o, meta, copy, NULL, NULL, out);
}

int st_ckpt_snapshot_reuse(MPI_Comm comm, const st_model *m, const st_optim *o, const st_ckpt_meta *meta, int copy,
                           float **keep, size_t *keep_cap, st_ckpt_snap **out) {
    *out = NULL;
    st_ckpt_snap *s = calloc(1, sizeof *s);
    int rc = s ? 0 : st_fail(ST_ENOMEM, "out of memory staging a checkpoint");
    int rank = 0, world = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &world);
    if (s) {
        s->rank = rank;
        s->world = world;
        s->n = m->n_params;
        s->n_weights = m->n_weights;
        s->n_grads = m->n_grads;
        s->p = calloc((size_t)m->n_params + 1, sizeof *s->p);
        if (!s->p) rc = st_fail(ST_ENOMEM, "out of memory staging a checkpoint");
        if (!rc) rc = copy_meta(s, meta);
    }
    /* this rank's even share of the padded compact space: inside its optimizer range at every stage */
    uint64_t shard = m->grad_alloc / (uint64_t)world, share_lo = shard * (uint64_t)rank, share_hi = share_lo + shard;
    if (!rc && m->n_grads && (share_lo < o->lo || share_hi > o->hi))
        rc = st_fail(ST_EINVAL, "checkpoint: rank %d optimizer range [%zu,%zu) does not hold its share", rank, o->lo, o->hi);
    /* on the host backend without residency the live buffers can be written in place (sync saves) */
    int borrow = !copy && m->be->host_memory && !m->acquire && !m->qlora && (o->m || o->hi == o->lo);
    if (!rc) {
        size_t n = plan(s, m, o, share_lo, share_hi);
        if (!borrow && keep && *keep_cap >= n && *keep) {
            s->buf = *keep; /* already faulted in by an earlier save: no page faults on the critical path */
            s->buf_borrowed = 1;
        } else if (!borrow) {
            s->buf = malloc((n ? n : 1) * sizeof(float));
            if (!s->buf) rc = st_fail(ST_ENOMEM, "out of memory staging a checkpoint (%.1f MB of host memory)", n * 4e-6);
            else if (keep) { /* the caller keeps it for the next snapshot */
                free(*keep);
                *keep = s->buf;
                *keep_cap = n;
                s->buf_borrowed = 1;
            }
        }
        s->copied = n;
    }
    int worst = rc;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MIN, comm);
    if (worst) {
        st_ckpt_snap_free(s);
        return rc ? rc : st_fail(worst, "staging a checkpoint failed on another rank");
    }
    fill(s, m, o, borrow);
    rc = sum_base(s, m, comm);
    if (rc) { st_ckpt_snap_free(s); return rc; }
    *out = s;
    return 0;
}

size_t st_ckpt_snap_bytes(const st_ckpt_snap *s) { return s && s->buf ? s->copied * sizeof(float) : 0; }

void st_ckpt_snap_free(st_ckpt_snap *s) {
    if (!s) return;
    free(s->p);
    if (!s->buf_borrowed) free(s->buf);
    free(s->job_spec);
    free(s->model_config);
    free(s->names_block);
    free(s->task_names);
    free(s->loader_state);
    free(s->task_checksums);
    free(s->task_weighting);
    free(s);
}
