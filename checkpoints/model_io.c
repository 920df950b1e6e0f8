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

/* The file's tensor for a registry name (GPT-2 also under "transformer."), NULL when absent. */
static const st_st_tensor *find_named(const st_safetensors *s, const st_model *m, const char *name) {
    const st_st_tensor *t = st_safetensors_find(s, name);
    if (!t && m->cfg.family == ST_FAMILY_GPT2) {
        char alt[128];
        snprintf(alt, sizeof alt, "transformer.%s", name);
        t = st_safetensors_find(s, alt);
    }
    return t;
}

static const st_st_tensor *find_tensor(const st_safetensors *s, const st_model *m, const st_param *p) {
    const st_st_tensor *t = find_named(s, m, p->name);
    /* tied, and only lm_head.weight in the file: transformers ties the embeddings to it */
    if (!t && p == &m->params[0] && m->cfg.tied_embeddings) t = st_safetensors_find(s, "lm_head.weight");
    return t;
}

static char load_warning[512];

const char *st_model_load_warning(void) { return load_warning[0] ? load_warning : NULL; }

/* tie_word_embeddings: true, yet the file holds an lm_head.weight that differs from the embeddings:
 * transformers 5 then does not tie them (and warns), so the model is built untied. Sets *untie. */
static int check_tied_head(const char *dir, const st_model_config *cfg, int *untie) {
    *untie = 0;
    if (!cfg->tied_embeddings) return 0;
    st_safetensors *s = NULL;
    int rc = st_safetensors_open(dir, &s);
    if (rc) return rc;
    const char *emb_name = cfg->family == ST_FAMILY_GPT2 ? "wte.weight" : "model.embed_tokens.weight";
    const st_st_tensor *e = st_safetensors_find(s, emb_name), *h = st_safetensors_find(s, "lm_head.weight");
    if (!e && cfg->family == ST_FAMILY_GPT2) e = st_safetensors_find(s, "transformer.wte.weight");
    if (e && h && st_st_numel(e) == st_st_numel(h)) {
        /* compared a bounded piece at a time: the embeddings may be larger than this rank's share */
        const size_t chunk = (size_t)1 << 20;
        size_t n = (size_t)st_st_numel(e), same = 1;
        float *a = malloc(chunk * sizeof(float)), *b = malloc(chunk * sizeof(float));
        if (!a || !b) rc = st_fail(ST_ENOMEM, "out of memory comparing the embeddings with lm_head.weight");
        for (size_t at = 0; at < n && !rc && same; at += chunk) {
            size_t k = n - at < chunk ? n - at : chunk;
            rc = st_safetensors_read_f32_range(s, e, at, k, a);
            if (!rc) rc = st_safetensors_read_f32_range(s, h, at, k, b);
            if (!rc) same = memcmp(a, b, k * sizeof(float)) == 0;
        }
        if (!rc && !same) {
            *untie = 1;
            snprintf(load_warning, sizeof load_warning,
                     "%s: config.json has tie_word_embeddings: true but lm_head.weight differs from %s; using them "
                     "untied, as transformers does", dir, emb_name);
        }
        free(a);
        free(b);
    }
    st_safetensors_close(s);
    return rc;
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

/* Elements [a, b) (registry layout) of parameter p from tensor t into m->weights: ranged reads straight
 * into host weights, or through a bounded host chunk onto a device. */
static int load_range(st_model *m, st_safetensors *s, const st_st_tensor *t, const st_param *p, size_t a, size_t b) {
    float *w = st_model_part(m, (int)(p - m->params));
    if (m->be->host_memory) return st_safetensors_read_f32_range(s, t, a, b - a, w + a);
    const size_t chunk = (size_t)1 << 20;
    float *buf = malloc((b - a < chunk ? b - a : chunk) * sizeof(float));
    int rc = buf ? 0 : st_fail(ST_ENOMEM, "out of memory loading %s", p->name);
    for (size_t at = a; at < b && !rc; at += chunk) {
        size_t k = b - at < chunk ? b - at : chunk;
        rc = st_safetensors_read_f32_range(s, t, at, k, buf);
        if (!rc) m->be->copy_to_device(w + at, buf, k * sizeof(float));
    }
    free(buf);
    return rc;
}

/* A GPT-2 Conv1D tensor ([in, out] in the file): read whole, transposed, its [a, b) kept. */
static int load_transposed(st_model *m, st_safetensors *s, const st_st_tensor *t, const st_param *p, size_t a,
                           size_t b) {
    float *file = malloc(p->numel * sizeof(float)), *ours = malloc(p->numel * sizeof(float));
    int rc = file && ours ? 0 : st_fail(ST_ENOMEM, "out of memory loading %s", p->name);
    if (!rc) rc = st_safetensors_read_f32(s, t, file, p->numel);
    if (!rc) {
        transpose(ours, file, p->shape[1], p->shape[0]);
        m->be->copy_to_device(st_model_part(m, (int)(p - m->params)) + a, ours + a, (b - a) * sizeof(float));
    }
    free(file);
    free(ours);
    return rc;
}

int st_model_load_weights_part(st_model *m, const char *dir, st_model_keep_fn keep, void *ctx) {
    st_safetensors *s = NULL;
    int rc = st_safetensors_open(dir, &s);
    if (rc) return rc;
    rc = check_extras(s, m, dir);
    for (int i = 0; i < st_model_base_params(m) && !rc; i++) {
        const st_param *p = &m->params[i];
        const st_st_tensor *t = find_tensor(s, m, p);
        if (!t) { rc = st_fail(ST_EFORMAT, "%s: tensor '%s' is missing", dir, p->name); break; }
        if ((rc = check_shape(p, t, dir))) break;
        size_t a = 0, b = p->numel;
        if (keep) keep(ctx, m, i, &a, &b);
        if (b > p->numel) b = p->numel;
        if (a >= b) continue;
        rc = p->ndim == 2 && p->transpose_io ? load_transposed(m, s, t, p, a, b) : load_range(m, s, t, p, a, b);
    }
    st_model_weights_changed(m);
    st_safetensors_close(s);
    return rc;
}

int st_model_check_files(const st_model *m, const char *dir, st_safetensors **out) {
    *out = NULL;
    st_safetensors *s = NULL;
    int rc = st_safetensors_open(dir, &s);
    if (rc) return rc;
    rc = check_extras(s, m, dir);
    for (int i = 0; i < st_model_base_params(m) && !rc; i++) {
        const st_st_tensor *t = find_tensor(s, m, &m->params[i]);
        rc = t ? check_shape(&m->params[i], t, dir) : st_fail(ST_EFORMAT, "%s: tensor '%s' is missing", dir, m->params[i].name);
    }
    if (rc) st_safetensors_close(s);
    else *out = s;
    return rc;
}

int st_model_read_param(st_safetensors *s, const st_model *m, int i, float *dst) {
    const st_param *p = &m->params[i];
    const st_st_tensor *t = find_tensor(s, m, p);
    if (!t) return st_fail(ST_EFORMAT, "tensor '%s' is missing", p->name);
    if (!(p->ndim == 2 && p->transpose_io)) return st_safetensors_read_f32(s, t, dst, p->numel);
    float *file = malloc(p->numel * sizeof(float));
    int rc = file ? st_safetensors_read_f32(s, t, file, p->numel) : st_fail(ST_ENOMEM, "out of memory reading %s", p->name);
    if (!rc) transpose(dst, file, p->shape[1], p->shape[0]);
    free(file);
    return rc;
}

/* Parameter i's file tensor for a ranged read (not a transposed Conv1D one): 0, or the error naming it. */
static int ranged_tensor(const st_safetensors *s, const st_model *m, int i, const st_st_tensor **t) {
    const st_param *p = &m->params[i];
    *t = find_tensor(s, m, p);
    if (!*t) return st_fail(ST_EFORMAT, "tensor '%s' is missing", p->name);
    if (p->ndim == 2 && p->transpose_io) return st_fail(ST_EINVAL, "a ranged read of transposed tensor %s", p->name);
    return 0;
}

int st_model_read_param_range(st_safetensors *s, const st_model *m, int i, size_t a, size_t n, float *dst) {
    const st_st_tensor *t;
    int rc = ranged_tensor(s, m, i, &t);
    return rc ? rc : st_safetensors_read_f32_range(s, t, a, n, dst);
}

int st_model_param_dtype(const st_safetensors *s, const st_model *m, int i) {
    const st_st_tensor *t = find_tensor(s, m, &m->params[i]);
    return t ? t->dtype : -1;
}

int st_model_read_param_bf16_range(st_safetensors *s, const st_model *m, int i, size_t a, size_t n, uint16_t *dst) {
    const st_st_tensor *t;
    int rc = ranged_tensor(s, m, i, &t);
    return rc ? rc : st_safetensors_read_bf16_range(s, t, a, n, dst);
}

int st_model_load_weights(st_model *m, const char *dir) { return st_model_load_weights_part(m, dir, NULL, NULL); }

int st_model_open_registry(const char *dir, st_model *m) {
    st_model_config cfg;
    load_warning[0] = 0;
    int rc = st_model_config_read(dir, &cfg);
    if (rc) return rc;
    int untie = 0;
    if ((rc = check_tied_head(dir, &cfg, &untie))) return rc;
    if (untie) cfg.tied_embeddings = 0;
    rc = st_model_build_registry(m, &cfg);
    return rc ? st_fail_context(rc, "%s/config.json", dir) : 0;
}

int st_model_open_dir(const char *dir, const st_backend *be, st_model *m) {
    int rc = st_model_open_registry(dir, m);
    if (!rc && (rc = st_model_bind(m, be, 1))) {
        st_model_free(m);
        rc = st_fail_context(rc, "%s/config.json", dir);
    }
    return rc;
}

int st_model_load_dir(const char *dir, const st_backend *be, st_model *m) {
    int rc = st_model_open_dir(dir, be, m);
    if (rc) return rc;
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

/* The source's dtype (bf16 stays bf16), fp32 when it had none. */
static int save_dtype(const st_model *m) {
    return !strcmp(m->cfg.dtype, "bfloat16") ? ST_DTYPE_BF16 : !strcmp(m->cfg.dtype, "float16") ? ST_DTYPE_F16
                                                                                                 : ST_DTYPE_F32;
}

/* Writes the tensors one at a time: fetch gives parameter i in registry layout, it is put in HF layout. */
static int save_tensors(const st_model *m, const char *dir, uint64_t max_shard_bytes, st_model_fetch_fn fetch,
                        void *ctx) {
    size_t most = 0;
    for (int i = 0; i < m->n_params; i++) most = m->params[i].numel > most ? m->params[i].numel : most;
    float *reg = malloc((most ? most : 1) * sizeof(float)), *hf = malloc((most ? most : 1) * sizeof(float));
    st_st_write_item *items = calloc((size_t)m->n_params + 1, sizeof *items);
    int rc = reg && hf && items ? st_mkdirs(dir) : st_fail(ST_ENOMEM, "out of memory exporting to %s", dir);
    for (int i = 0; i < m->n_params && items; i++) {
        const st_param *p = &m->params[i];
        items[i].name = p->name;
        items[i].ndim = p->ndim;
        hf_shape(p, items[i].shape);
    }
    st_st_stream *w = NULL;
    if (!rc) rc = st_safetensors_stream_open(dir, m->n_params, items, max_shard_bytes ? max_shard_bytes : (4ULL << 30),
                                             save_dtype(m), &w);
    /* every parameter is fetched even after a failure: a collective fetch must not leave the others waiting */
    for (int i = 0; i < m->n_params; i++) {
        const st_param *p = &m->params[i];
        int frc = fetch(ctx, m, i, rc ? NULL : reg);
        if (!rc) rc = frc;
        if (rc) continue;
        if (p->ndim == 2 && p->transpose_io) transpose(hf, reg, p->shape[0], p->shape[1]);
        rc = st_safetensors_stream_put(w, p->ndim == 2 && p->transpose_io ? hf : reg);
    }
    if (w) {
        if (rc) st_safetensors_stream_abort(w);
        else rc = st_safetensors_stream_finish(w);
    }
    free(items);
    free(hf);
    free(reg);
    return rc;
}

int st_model_save_dir_streamed(const st_model *m, const char *dir, uint64_t max_shard_bytes, st_model_fetch_fn fetch,
                               void *ctx) {
    if (!dir) { /* a rank that only serves the collective fetches */
        int rc = 0;
        for (int i = 0; i < m->n_params; i++) {
            int frc = fetch(ctx, m, i, NULL);
            if (!rc) rc = frc;
        }
        return rc;
    }
    int rc = save_tensors(m, dir, max_shard_bytes, fetch, ctx);
    if (!rc) rc = st_model_config_write(dir, &m->cfg);
    return rc;
}

/* Parameter i from the model's own weights. */
static int fetch_local(void *ctx, const st_model *m, int i, float *dst) {
    (void)ctx;
    if (dst && st_model_fp32_dropped(m, i)) /* a frozen one held in bf16 only: widened, exactly */
        st_model_param_fp32_host(m, i, 0, m->params[i].numel, dst);
    else if (dst) m->be->copy_to_host(dst, m->weights + m->params[i].offset, m->params[i].numel * sizeof(float));
    return 0;
}

int st_model_save_dir(const st_model *m, const char *dir, uint64_t max_shard_bytes) {
    return st_model_save_dir_streamed(m, dir, max_shard_bytes, fetch_local, NULL);
}

/* Files of a Hugging Face model directory that are not weights or config.json: what a user needs to run
 * and serve the model (tokenizer, chat template, generation settings). */
static const char *const asset_files[] = {
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
    "special_tokens_map.json", "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt",
    "tokenizer.model", NULL};

int st_model_copy_assets(const char *src_dir, const char *dst_dir) {
    int rc = st_mkdirs(dst_dir);
    for (int i = 0; asset_files[i] && !rc; i++) {
        char from[4096], to[4096];
        if (snprintf(from, sizeof from, "%s/%s", src_dir, asset_files[i]) >= (int)sizeof from ||
            snprintf(to, sizeof to, "%s/%s", dst_dir, asset_files[i]) >= (int)sizeof to)
            return st_fail(ST_EINVAL, "path too long: %s", src_dir);
        char *text;
        size_t len;
        FILE *f = fopen(from, "rb");
        if (!f) continue; /* absent in the source: nothing to carry */
        fclose(f);
        if ((rc = st_read_file(from, &text, &len)) != 0) break;
        rc = st_write_file_atomic(to, text, len);
        free(text);
    }
    return rc;
}

int st_model_export_dir(const st_model *m, const char *dir, const char *src_dir, const char *config_text,
                        uint64_t max_shard_bytes) {
    return st_model_export_dir_streamed(m, dir, src_dir, config_text, max_shard_bytes, fetch_local, NULL);
}

int st_model_export_dir_streamed(const st_model *m, const char *dir, const char *src_dir, const char *config_text,
                                 uint64_t max_shard_bytes, st_model_fetch_fn fetch, void *ctx) {
    int rc = st_model_save_dir_streamed(m, dir, max_shard_bytes, fetch, ctx);
    if (!dir) return rc;
    if (!rc && config_text && *config_text) {
        /* the source's own config.json: every key as the user had it (rope_parameters or rope_scaling,
         * dtype, architectures, layer_types, ...); the weights were written in its dtype */
        char path[4096];
        if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
            return st_fail(ST_EINVAL, "path too long: %s", dir);
        rc = st_write_file_atomic(path, config_text, strlen(config_text));
    }
    if (!rc && src_dir && *src_dir) rc = st_model_copy_assets(src_dir, dir);
    return rc;
}
