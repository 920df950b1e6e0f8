/* model_io.c — see model_io.h. */
#include "checkpoints/model_io.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/model_dir.h"
#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "common/util.h"

static void transpose(float *dst, const float *src, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * rows + r] = src[r * cols + c];
}

/* HF shape of parameter p (Conv1D tensors are [in, out]). */
static void hf_shape(const st_param *p, int64_t shape[2]) {
    if (p->ndim == 2 && p->transpose_io) { shape[0] = p->shape[1]; shape[1] = p->shape[0]; }
    else { shape[0] = p->shape[0]; shape[1] = p->shape[1]; }
}

static const st_st_tensor *find_tensor(const st_safetensors *s, const st_model *m, const st_param *p) {
    const st_st_tensor *t = st_safetensors_find(s, p->name);
    if (!t && m->cfg.family == ST_FAMILY_GPT2) {
        char alt[128];
        snprintf(alt, sizeof alt, "transformer.%s", p->name);
        t = st_safetensors_find(s, alt);
    }
    return t;
}

static int ignorable(const st_model *m, const char *name) {
    size_t n = strlen(name);
#define ENDS(suf) (n >= strlen(suf) && strcmp(name + n - strlen(suf), suf) == 0)
    if (ENDS(".attn.bias") || ENDS(".attn.masked_bias") || ENDS("rotary_emb.inv_freq")) return 1;
#undef ENDS
    return m->cfg.tied_embeddings && strcmp(name, "lm_head.weight") == 0;
}

static int check_shape(const st_param *p, const st_st_tensor *t, const char *dir) {
    int64_t want[2];
    hf_shape(p, want);
    int ok = t->ndim == p->ndim && t->shape[0] == want[0] && (p->ndim == 1 || t->shape[1] == want[1]);
    if (ok) return 0;
    char got[128] = "", exp[64];
    size_t k = 0;
    for (int d = 0; d < t->ndim && k < sizeof got - 24; d++)
        k += (size_t)snprintf(got + k, sizeof got - k, "%s%lld", d ? ", " : "", (long long)t->shape[d]);
    if (p->ndim == 2) snprintf(exp, sizeof exp, "%lld, %lld", (long long)want[0], (long long)want[1]);
    else snprintf(exp, sizeof exp, "%lld", (long long)want[0]);
    return st_fail(ST_ESHAPE, "%s: tensor '%s' has shape [%s] but config.json implies [%s]", dir, p->name, got, exp);
}

static int check_extras(const st_safetensors *s, const st_model *m, const char *dir) {
    for (int i = 0; i < st_safetensors_count(s); i++) {
        const char *name = st_safetensors_tensor(s, i)->name;
        const char *bare = strncmp(name, "transformer.", 12) == 0 ? name + 12 : name;
        if (st_model_find(m, name) >= 0 || st_model_find(m, bare) >= 0 || ignorable(m, name)) continue;
        return st_fail(ST_EFORMAT, "%s: unexpected tensor '%s' (not part of a %s model with this config.json)",
                       dir, name, m->cfg.model_type);
    }
    return 0;
}

int st_model_load_weights(st_model *m, const char *dir) {
    st_safetensors *s = NULL;
    int rc = st_safetensors_open(dir, &s);
    if (rc) return rc;
    float *host = malloc(m->n_weights * sizeof(float));
    float *tmp = NULL;
    size_t tmp_n = 0;
    if (!host) { st_safetensors_close(s); return st_fail(ST_ENOMEM, "out of memory loading %s", dir); }
    rc = check_extras(s, m, dir);
    for (int i = 0; i < m->n_params && !rc; i++) {
        const st_param *p = &m->params[i];
        const st_st_tensor *t = find_tensor(s, m, p);
        if (!t) { rc = st_fail(ST_EFORMAT, "%s: tensor '%s' is missing", dir, p->name); break; }
        if ((rc = check_shape(p, t, dir))) break;
        float *dst = host + p->offset;
        if (p->ndim == 2 && p->transpose_io) {
            if (tmp_n < p->numel) {
                free(tmp);
                tmp = malloc(p->numel * sizeof(float));
                tmp_n = tmp ? p->numel : 0;
                if (!tmp) { rc = st_fail(ST_ENOMEM, "out of memory loading %s", p->name); break; }
            }
            if ((rc = st_safetensors_read_f32(s, t, tmp, p->numel))) break;
            transpose(dst, tmp, p->shape[1], p->shape[0]);
        } else {
            rc = st_safetensors_read_f32(s, t, dst, p->numel);
        }
    }
    if (!rc) m->be->copy_to_device(m->weights, host, m->n_weights * sizeof(float));
    st_model_weights_changed(m);
    free(tmp);
    free(host);
    st_safetensors_close(s);
    return rc;
}

int st_model_load_dir(const char *dir, const st_backend *be, st_model *m) {
    st_model_config cfg;
    int rc = st_model_config_read(dir, &cfg);
    if (rc) return rc;
    rc = st_model_build(m, &cfg, be);
    if (rc) return st_fail_context(rc, "%s/config.json", dir);
    rc = st_model_load_weights(m, dir);
    if (rc) st_model_free(m);
    return rc;
}

void st_model_param_to_hf(const st_model *m, int i, const float *host_weights, float *out) {
    const st_param *p = &m->params[i];
    const float *src = host_weights + p->offset;
    if (p->ndim == 2 && p->transpose_io) transpose(out, src, p->shape[0], p->shape[1]);
    else memcpy(out, src, p->numel * sizeof(float));
}

int st_model_save_dir(const st_model *m, const char *dir, uint64_t max_shard_bytes) {
    int rc = st_mkdirs(dir);
    if (rc) return rc;
    float *host = malloc(m->n_weights * sizeof(float));
    float *hf = malloc(m->n_weights * sizeof(float));
    st_st_write_item *items = calloc((size_t)m->n_params, sizeof *items);
    if (!host || !hf || !items) {
        free(host); free(hf); free(items);
        return st_fail(ST_ENOMEM, "out of memory exporting to %s", dir);
    }
    m->be->copy_to_host(host, m->weights, m->n_weights * sizeof(float));
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        st_model_param_to_hf(m, i, host, hf + p->offset);
        items[i].name = p->name;
        items[i].data = hf + p->offset;
        items[i].ndim = p->ndim;
        hf_shape(p, items[i].shape);
    }
    rc = st_safetensors_write_sharded(dir, m->n_params, items, max_shard_bytes ? max_shard_bytes : (4ULL << 30));
    if (!rc) rc = st_model_config_write(dir, &m->cfg);
    free(items);
    free(hf);
    free(host);
    return rc;
}
