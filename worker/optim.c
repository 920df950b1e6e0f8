/* optim.c — see optim.h. */
#include "worker/optim.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/error.h"

int st_optim_init(st_optim *o, const st_optim_config *cfg, size_t lo, size_t hi, const st_model *m,
                  const st_backend *be) {
    memset(o, 0, sizeof *o);
    o->cfg = *cfg;
    o->lo = lo;
    o->hi = hi;
    o->param_step = calloc((size_t)m->n_params + 1, sizeof(int));
    o->ranges = calloc((size_t)m->n_params + 1, sizeof *o->ranges);
    if (!o->param_step || !o->ranges) return st_fail(ST_ENOMEM, "out of memory for optimizer step counts");
    size_t n = hi > lo ? hi - lo : 0;
    if (n == 0) return 0;
    o->m = be->alloc(n * sizeof(float));
    o->v = be->alloc(n * sizeof(float));
    if (!o->m || !o->v)
        return st_fail(ST_ENOMEM, "cannot allocate %.1f MB of optimizer state", 8.0 * (double)n / 1e6);
    return 0;
}

void st_optim_free(st_optim *o, const st_backend *be) {
    if (!be) return; /* never initialized */
    be->free(o->m);
    be->free(o->v);
    free(o->ranges);
    o->m = o->v = NULL;
    o->ranges = NULL;
}

float st_lr_at(const st_optim_config *c, int step) {
    if (c->warmup_steps > 0 && step < c->warmup_steps) return c->lr * (float)(step + 1) / (float)c->warmup_steps;
    if (c->schedule == ST_SCHED_CONSTANT) return c->lr;
    int span = c->total_steps - c->warmup_steps;
    double progress = span > 0 ? (double)(step - c->warmup_steps) / (double)span : 1.0;
    if (progress > 1.0) progress = 1.0;
    if (progress < 0.0) progress = 0.0;
    double min_lr = (double)c->lr * c->min_lr_ratio;
    double shape = c->schedule == ST_SCHED_COSINE ? 0.5 * (1.0 + cos(M_PI * progress)) : 1.0 - progress;
    return (float)(min_lr + ((double)c->lr - min_lr) * shape);
}

float st_param_lr_scale(const st_model *m, const st_param *p, float decay) {
    if (decay == 1.0f) return 1.0f;
    int L = m->cfg.n_layer;
    int distance = p->layer >= 0 ? L - 1 - p->layer : (p->kind == ST_MOD_EMBED ? L : 0);
    return powf(decay, (float)distance);
}

float st_clip_scale(double grad_norm, float max_norm) {
    if (max_norm <= 0.0f) return 1.0f;
    double coef = (double)max_norm / (grad_norm + 1e-6);
    return coef < 1.0 ? (float)coef : 1.0f;
}

void st_for_each_param_range(const st_model *m, size_t lo, size_t hi, st_param_range_fn fn, void *ctx) {
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0) continue;
        size_t a = (size_t)p->grad_offset, b = a + p->numel;
        size_t s = a > lo ? a : lo, e = b < hi ? b : hi;
        if (s < e) fn(ctx, p, s, e - s);
    }
}

void st_optim_carry_over(st_optim *o, const st_model *m, const long *old_off, const int *old_steps,
                         const float *old_m, const float *old_v) {
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        if (p->grad_offset < 0 || old_off[i] < 0) continue;
        o->param_step[i] = old_steps[i];
        if (!old_m) continue;
        size_t a = (size_t)p->grad_offset, b = a + p->numel;
        size_t s = a > o->lo ? a : o->lo, e = b < o->hi ? b : o->hi;
        if (s >= e) continue;
        size_t from = (size_t)old_off[i] + (s - a);
        m->be->copy(o->m + (s - o->lo), old_m + from, (e - s) * sizeof(float));
        m->be->copy(o->v + (s - o->lo), old_v + from, (e - s) * sizeof(float));
    }
}

void st_optim_restore(st_optim *o, const st_model *m, const float *m_host, const float *v_host, const int *steps) {
    size_t n = o->hi - o->lo;
    if (n && o->m) {
        m->be->copy_to_device(o->m, m_host, n * sizeof(float));
        m->be->copy_to_device(o->v, v_host, n * sizeof(float));
    }
    for (int i = 0; i < m->n_params; i++) o->param_step[i] = m->params[i].grad_offset >= 0 ? steps[i] : 0;
}

typedef struct {
    st_optim *o;
    st_model *m;
    const float *grads;
    float lr;
    int count;
} update_ctx;

static void collect_range(void *vctx, const st_param *p, size_t start, size_t len) {
    update_ctx *c = vctx;
    st_optim *o = c->o;
    st_model *m = c->m;
    size_t k = start - o->lo, w = p->offset + (start - (size_t)p->grad_offset);
    st_adamw_range *r = &o->ranges[c->count++];
    r->param = st_model_part(m, (int)(p - m->params)) + (start - (size_t)p->grad_offset);
    r->param_bf16 = m->weights_bf16 ? m->weights_bf16 + w : NULL;
    r->grad = c->grads + k;
    int zero = o->zero_grads == ST_OPTIM_ZERO_ALL ||
               (o->zero_grads == ST_OPTIM_ZERO_UNLESS_OVERWRITTEN && !st_model_grad_overwritten(m, (int)(p - m->params)));
    r->zero_grad = zero ? (float *)(uintptr_t)r->grad : NULL; /* writable: see st_optim.zero_grads */
    r->m = o->m + k;
    r->v = o->v + k;
    r->n = len;
    r->lr = c->lr * st_param_lr_scale(m, p, o->cfg.layer_lr_decay);
    r->weight_decay = p->no_decay ? 0.0f : o->cfg.weight_decay;
    r->step = o->param_step[p - m->params];
}

void st_optim_count_step(st_optim *o, const st_model *m) {
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].grad_offset >= 0) o->param_step[i]++;
}

/* One multi-tensor AdamW call over the trainable ranges of [lo, hi); it also refreshes those ranges of
 * the bf16 weight copy (mixed precision), so the copy stays current without a repack. */
void st_optim_update_range(st_optim *o, st_model *m, const float *grads, float lr, float grad_scale, size_t lo,
                           size_t hi) {
    st_adamw_range *ranges = o->ranges;
    update_ctx c = {o, m, grads, lr, 0};
    st_for_each_param_range(m, lo > o->lo ? lo : o->lo, hi < o->hi ? hi : o->hi, collect_range, &c);
    const st_backend *be = m->be;
    if (be->adamw_multi) {
        be->adamw_multi(ranges, c.count, o->cfg.beta1, o->cfg.beta2, o->cfg.eps, grad_scale);
    } else { /* a backend without the multi-tensor entry: one call per range, then repack the copy */
        for (int i = 0; i < c.count; i++) {
            be->adamw(ranges[i].param, ranges[i].grad, ranges[i].m, ranges[i].v, ranges[i].n, ranges[i].lr,
                      o->cfg.beta1, o->cfg.beta2, o->cfg.eps, ranges[i].weight_decay, grad_scale, ranges[i].step);
            if (ranges[i].zero_grad) be->memset0(ranges[i].zero_grad, ranges[i].n * sizeof(float));
        }
        st_model_weights_changed(m);
    }
}

void st_optim_update(st_optim *o, st_model *m, const float *grads, float lr, float grad_scale) {
    st_optim_count_step(o, m);
    st_optim_update_range(o, m, grads, lr, grad_scale, o->lo, o->hi);
}
