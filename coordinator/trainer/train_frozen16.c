/* train_frozen16.c — the load of a device rank whose frozen weights are held once, in bf16 (issue #17).
 *
 * On CPU ranks a frozen tensor's fp32 pages are given back after the load (worker/model.h
 * st_model_drop_frozen_fp32). Device memory cannot give pages back, so on a device backend under precision
 * bf16 below ZeRO-3 the choice is made before anything is allocated, from the registry, the config and the
 * source's dtypes: a base parameter that no stage of the run trains (every base parameter under LoRA / DoRA and
 * the prompt family; in `frozen` / `progressive` those outside every stage's set), that
 * st_model_bf16_storable admits and that the safetensors files store as BF16 (its bf16 copy is then its value,
 * exactly) gets no fp32 storage at all (st_model_bind_frozen_bf16: its offset lies below the fp32 allocation);
 * its values go straight into the device bf16 copy. Every other parameter is read as st_model_load_dir reads
 * it. The base checksum and the finite check are the whole load's (each tensor summed at its registry offset
 * before the layout moved it), so checkpoints and resume checks are unchanged. SHARDTUNE_FROZEN_FP32=1 (tests)
 * keeps the ordinary load.
 * At ZeRO-3 (worker/comm_zero3_dev.c) the same choice for the first stage's frozen base parameters
 * (st_trainer_z3_frozen_bf16, before the communicator is built: its frozen shard is laid out with their parts in
 * bf16 only and no fp32 place for them), then each rank reads its parts of them straight into bf16
 * (st_trainer_z3_read_bf16, a bounded piece at a time through st_safetensors_read_bf16_range), finite-checked and
 * summed like the streamed load's other parts; st_z3dev_hold_bf16 afterwards adds the frozen parts stored in
 * another dtype whose values are bf16 values, as before. */
#include "coordinator/trainer/train_internal.h"

#include <stdlib.h>
#include <string.h>

#include "common/error.h"
#include "checkpoints/ckpt.h"
#include "checkpoints/model_io.h"
#include "checkpoints/safetensors.h"
#include "worker/comm_zero3_dev.h"
#include "kernels/bf16.h"

/* Whether this run may hold frozen weights in bf16 only on its device (before the registry is read), below ZeRO-3
 * (z3 0) or at it (z3 1). */
static int wanted(const trainer *t, int z3) {
    const st_config *c = t->cfg;
    const char *keep = getenv("SHARDTUNE_FROZEN_FP32"); /* tests: 1 keeps every fp32 copy */
    if (keep && !strcmp(keep, "1")) return 0;
    return !t->be->host_memory && c->precision == ST_PRECISION_BF16 && (c->sharding.stage == 3) == z3 &&
           c->finetune.mode != ST_FINETUNE_QLORA && c->finetune.mode != ST_FINETUNE_FULL;
}

/* w16[i] = 1 for every base parameter no stage of the run trains (registry-only model m). */
static int frozen_all_run(const st_config *c, const st_model *m, unsigned char *w16) {
    for (int i = 0; i < m->n_params; i++) w16[i] = 1;
    if (c->finetune.mode == ST_FINETUNE_LORA || st_config_prompt_learning(c)) return 0; /* the adapters alone train */
    st_stage_list stages;
    int rc = st_plan_stages(c, m, &stages);
    long *goff = rc ? NULL : malloc((size_t)m->n_params * sizeof(long));
    if (!rc && !goff) rc = st_fail(ST_ENOMEM, "out of memory");
    for (int s = 0; !rc && s < stages.n; s++) {
        st_model_grad_offsets(m, stages.stages[s].layers, stages.stages[s].modules, goff);
        for (int i = 0; i < m->n_params; i++)
            if (goff[i] >= 0) w16[i] = 0;
    }
    free(goff);
    if (!rc) st_stage_list_free(&stages);
    return rc;
}

/* Reads every base parameter (one host tensor at a time) into its place: a bf16-only one into the device bf16
 * copy, the others into the fp32 weights; finite-checked and summed at its registry offset at[i]. */
static int read_all(trainer *t, st_safetensors *s, const size_t *at, uint64_t *sum) {
    st_model *m = &t->model;
    const char *dir = t->cfg->model.path;
    size_t most = 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].numel > most) most = m->params[i].numel;
    float *host = malloc(most * sizeof(float) + sizeof(float));
    uint16_t *h16 = malloc(most * sizeof(uint16_t) + sizeof(uint16_t));
    int rc = host && h16 ? 0 : st_fail(ST_ENOMEM, "out of memory loading %s", dir);
    for (int i = 0; !rc && i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        rc = st_model_read_param(s, m, i, host);
        if (!rc) rc = st_check_finite_values(host, p->numel, 0, dir, p->name);
        if (rc) break;
        *sum += st_ckpt_checksum(host, at[i], p->numel); /* partial sums add up (ckpt.h) */
        if (st_model_fp32_dropped(m, i)) { /* a BF16 source tensor: rounding is the identity */
            for (size_t k = 0; k < p->numel; k++) h16[k] = st_float_to_bf16_bits(host[k]);
            m->be->copy_to_device(m->weights_bf16 + p->offset, h16, p->numel * sizeof(uint16_t));
        } else {
            m->be->copy_to_device(m->weights + p->offset, host, p->numel * sizeof(float));
        }
    }
    free(host);
    free(h16);
    st_model_weights_changed(m);
    return rc;
}

int st_trainer_load_frozen_bf16(trainer *t, int *done) {
    const st_config *c = t->cfg;
    st_model *m = &t->model;
    *done = 0;
    if (!wanted(t, 0)) return 0;
    int rc = st_model_open_registry(c->model.path, m);
    if (rc) return rc;
    st_safetensors *s = NULL;
    unsigned char *w16 = calloc((size_t)m->n_params + 1, 1);
    size_t *at = malloc(((size_t)m->n_params + 1) * sizeof *at), n16 = 0;
    rc = w16 && at ? 0 : st_fail(ST_ENOMEM, "out of memory loading %s", c->model.path);
    if (!rc) rc = frozen_all_run(c, m, w16);
    if (!rc) rc = st_model_check_files(m, c->model.path, &s);
    for (int i = 0; !rc && i < m->n_params; i++) {
        w16[i] = w16[i] && st_model_bf16_storable(m, i) && st_model_param_dtype(s, m, i) == ST_DTYPE_BF16;
        if (w16[i]) n16 += m->params[i].numel;
        at[i] = m->params[i].offset; /* the registry's, before the layout moves them */
    }
    if (!rc && n16) {
        rc = st_model_bind_frozen_bf16(m, t->be, w16);
        uint64_t sum = 0;
        if (!rc) rc = read_all(t, s, at, &sum);
        t->base_checksum = sum ? sum : 1;
        *done = 1;
    }
    if (s) st_safetensors_close(s);
    free(w16);
    free(at);
    if (rc || !*done) st_model_free(m); /* nothing to hold in bf16 only: the ordinary load */
    if (rc) *done = 0;
    return rc;
}

/* ---- device ZeRO-3 (train_internal.h st_trainer_z3_frozen_bf16) ---- */

int st_trainer_z3_frozen_bf16(trainer *t, unsigned char **out) {
    st_model *m = &t->model;
    *out = NULL;
    if (!wanted(t, 1) || t->stages.n < 1) return 0;
    int nb = st_model_base_params(m), any = 0;
    unsigned char *w16 = calloc((size_t)m->n_params + 1, 1);
    long *goff = malloc(((size_t)m->n_params + 1) * sizeof(long));
    st_safetensors *s = NULL;
    int rc = w16 && goff ? st_model_check_files(m, t->cfg->model.path, &s) : st_fail(ST_ENOMEM, "out of memory");
    if (!rc) st_model_grad_offsets(m, t->stages.stages[0].layers, t->stages.stages[0].modules, goff); /* stage 0's */
    for (int i = 0; !rc && i < nb; i++) {
        w16[i] = goff[i] < 0 && st_model_bf16_storable(m, i) && st_model_param_dtype(s, m, i) == ST_DTYPE_BF16;
        any |= w16[i];
    }
    if (s) st_safetensors_close(s);
    free(goff);
    if (!rc && any) *out = w16;
    else free(w16);
    return rc;
}

int st_trainer_z3_read_bf16(trainer *t, uint64_t *sum) {
    st_model *m = &t->model;
    const char *dir = t->cfg->model.path;
    const size_t chunk = (size_t)1 << 20;
    int nb = st_model_base_params(m), any = 0;
    for (int i = 0; i < nb; i++) any |= st_z3dev_part_held(&t->dp, i);
    if (!any) return 0;
    st_safetensors *s = NULL;
    float *f = malloc(chunk * sizeof(float)), *whole = NULL;
    uint16_t *h = malloc(chunk * sizeof(uint16_t));
    int rc = f && h ? st_model_check_files(m, dir, &s) : st_fail(ST_ENOMEM, "out of memory loading %s", dir);
    for (int i = 0; !rc && i < nb; i++) {
        const st_param *p = &m->params[i];
        size_t a, b;
        if (!st_z3dev_part_held(&t->dp, i)) continue;
        st_comm_param_keep(&t->dp, m, i, &a, &b);
        int tr = p->ndim == 2 && p->transpose_io; /* a Conv1D tensor: read whole, transposed (model_io.c) */
        if (tr && a < b && !(whole = malloc(p->numel * sizeof(float))))
            rc = st_fail(ST_ENOMEM, "out of memory loading %s", p->name);
        if (tr && whole) rc = st_model_read_param(s, m, i, whole);
        int counts = st_comm_param_sharded(&t->dp, m, i) || t->rank == 0; /* as load_streamed */
        for (size_t k = a; !rc && k < b; k += chunk) {
            size_t n = b - k < chunk ? b - k : chunk;
            if (tr) /* a BF16 source tensor: rounding its values is the identity */
                for (size_t j = 0; j < n; j++) f[j] = whole[k + j], h[j] = st_float_to_bf16_bits(f[j]);
            else if (!(rc = st_model_read_param_bf16_range(s, m, i, k, n, h)))
                for (size_t j = 0; j < n; j++) f[j] = st_bf16_bits_to_float(h[j]);
            if (!rc) rc = st_check_finite_values(f, n, k, dir, p->name);
            if (rc) break;
            if (counts) *sum += st_ckpt_checksum(f, p->offset + k, n);
            st_z3dev_put_bf16(&t->dp, i, k, n, h);
        }
        free(whole);
        whole = NULL;
    }
    if (s) st_safetensors_close(s);
    free(f);
    free(h);
    st_model_weights_changed(m);
    return rc;
}
