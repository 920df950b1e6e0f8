/* peft_dir.c — PEFT adapter directories (see peft_dir.h). */
#define _DEFAULT_SOURCE /* realpath */
#include "checkpoints/peft_dir.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"
#include "checkpoints/peft_prompt.h"
#include "worker/lora.h"

#define PEFT_NAME_MAX 192

/* ---------------- save ---------------- */

static char *config_json(const st_model *m, const st_lora_spec *s, const char *base_model) {
    st_strbuf b = {0};
    int all = 1;
    for (int l = 0; l < m->cfg.n_layer; l++) all &= s->layers[l] != 0;
    st_strbuf_printf(&b, "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"base_model_name_or_path\": ");
    char abs[4096];
    /* absolute when it resolves, so export --merge finds the base from any working directory */
    if (base_model && realpath(base_model, abs)) st_strbuf_json_string(&b, abs);
    else if (base_model) st_strbuf_json_string(&b, base_model);
    else st_strbuf_printf(&b, "null");
    st_strbuf_printf(&b, ",\n  \"revision\": null,\n  \"inference_mode\": true,\n  \"r\": %d,\n", s->r);
    st_strbuf_printf(&b, "  \"lora_alpha\": %.17g,\n  \"lora_dropout\": %.17g,\n  \"target_modules\": [", s->alpha,
                     s->dropout);
    int first = 1;
    for (int i = 0; st_lora_target_names[i]; i++) {
        if (!(s->targets & (1u << i))) continue;
        st_strbuf_printf(&b, "%s\"%s\"", first ? "" : ", ", st_lora_target_names[i]);
        first = 0;
    }
    st_strbuf_printf(&b, "],\n  \"exclude_modules\": null,\n  \"fan_in_fan_out\": %s,\n",
                     m->cfg.family == ST_FAMILY_GPT2 ? "true" : "false");
    st_strbuf_printf(&b, "  \"bias\": \"none\",\n  \"use_rslora\": %s,\n  \"use_dora\": %s,\n",
                     s->rslora ? "true" : "false", s->dora ? "true" : "false");
    st_strbuf_printf(&b, "  \"modules_to_save\": null,\n  \"init_lora_weights\": true,\n  \"layers_to_transform\": ");
    if (all) {
        st_strbuf_printf(&b, "null");
    } else {
        st_strbuf_printf(&b, "[");
        first = 1;
        for (int l = 0; l < m->cfg.n_layer; l++)
            if (s->layers[l]) { st_strbuf_printf(&b, "%s%d", first ? "" : ", ", l); first = 0; }
        st_strbuf_printf(&b, "]");
    }
    st_strbuf_printf(&b, ",\n  \"layers_pattern\": null,\n  \"rank_pattern\": {},\n  \"alpha_pattern\": {},\n"
                         "  \"lora_bias\": false,\n  \"peft_version\": \"0.21.2\"\n}\n");
    if (b.failed) { st_strbuf_free(&b); return NULL; }
    return b.data;
}

int st_peft_save_dir(const st_model *m, const char *dir, const char *base_model) {
    if (m->prompt) return st_peft_prompt_save(m, dir, base_model);
    st_lora_spec spec;
    int rc = st_lora_spec_of(m, &spec);
    if (rc) return rc;
    if ((rc = st_mkdirs(dir))) return st_fail(rc, "adapter directory %s: %s", dir, st_error());
    int n = m->n_params - m->n_base_params;
    size_t floats = m->n_weights - m->n_base_weights;
    /* the adapters as written: in place on a host backend, else a host copy */
    int in_place = m->be->host_memory;
    float *host = in_place ? (float *)(m->weights + m->n_base_weights) : malloc(floats * sizeof(float) + 1);
    st_st_write_item *items = calloc((size_t)n + 1, sizeof *items);
    char (*names)[PEFT_NAME_MAX] = calloc((size_t)n + 1, PEFT_NAME_MAX);
    char *json = config_json(m, &spec, base_model);
    if (!host || !items || !names || !json) rc = st_fail(ST_ENOMEM, "out of memory writing adapter %s", dir);
    for (int k = 0; !rc && !in_place && k < n; k++) { /* each where it is (a device ZeRO-3 gather buffer too) */
        const st_param *p = &m->params[m->n_base_params + k];
        m->be->copy_to_host(host + (p->offset - m->n_base_weights), st_model_param_weights(m, m->n_base_params + k),
                            p->numel * sizeof(float));
    }
    for (int k = 0; !rc && k < n; k++) {
        const st_param *p = &m->params[m->n_base_params + k];
        st_lora_peft_name(m, m->n_base_params + k, names[k], PEFT_NAME_MAX);
        items[k].name = names[k];
        items[k].data = host + (p->offset - m->n_base_weights);
        items[k].ndim = p->ndim;
        items[k].shape[0] = p->shape[0];
        items[k].shape[1] = p->shape[1];
    }
    char path[4200];
    if (!rc) {
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        rc = st_safetensors_write(path, n, items, NULL);
    }
    if (!rc) {
        snprintf(path, sizeof path, "%s/adapter_config.json", dir);
        rc = st_write_file_atomic(path, json, strlen(json));
        if (rc) rc = st_fail(rc, "%s: %s", path, st_error());
    }
    free(json);
    free(names);
    free(items);
    if (!in_place) free(host);
    return rc;
}

/* ---------------- load ---------------- */

static int bool_field(const st_json *cfg, const char *key, int *out, const char *path) {
    const st_json *v = st_json_get(cfg, key);
    *out = 0;
    if (!v || v->type == ST_JSON_NULL) return 0;
    if (v->type != ST_JSON_BOOL) return st_fail(ST_EFORMAT, "%s: %s must be true or false", path, key);
    *out = v->boolean;
    return 0;
}

/* adapter_config.json → spec (layers into the caller's [n_layer] mask). */
static int read_spec(const st_json *cfg, const st_model *m, const char *path, st_lora_spec *s, unsigned char *layers) {
    memset(s, 0, sizeof *s);
    const char *type = st_json_get_string(cfg, "peft_type", "");
    if (strcmp(type, "LORA"))
        return st_fail(ST_EFORMAT, "%s: peft_type '%s' is not supported (only LORA)", path, type);
    int ok = 1, fifo = 0;
    s->r = (int)st_json_get_int(cfg, "r", 8, &ok);
    s->alpha = st_json_get_number(cfg, "lora_alpha", 8, &ok);
    if (!ok) return st_fail(ST_EFORMAT, "%s: r and lora_alpha must be numbers", path);
    int rc = bool_field(cfg, "use_rslora", &s->rslora, path);
    if (!rc) rc = bool_field(cfg, "use_dora", &s->dora, path);
    if (!rc) rc = bool_field(cfg, "fan_in_fan_out", &fifo, path);
    if (rc) return rc;
    /* keys that change what the adapter computes when set: refused by name rather than applied as plain LoRA */
    static const char *const unsupported[] = {"exclude_modules", "layer_replication", "modules_to_save",
                                              "trainable_token_indices", NULL};
    for (int k = 0; unsupported[k]; k++) {
        const st_json *v = st_json_get(cfg, unsupported[k]);
        if (v && v->type != ST_JSON_NULL && !((v->type == ST_JSON_ARRAY || v->type == ST_JSON_OBJECT) && !v->count))
            return st_fail(ST_EFORMAT, "%s: %s is not supported (plain LoRA on target_modules only)", path,
                           unsupported[k]);
    }
    int flag = 0;
    if (!rc) rc = bool_field(cfg, "lora_bias", &flag, path);
    if (!rc && flag) return st_fail(ST_EFORMAT, "%s: lora_bias: true is not supported (no bias on lora_B)", path);
    if (!rc) rc = bool_field(cfg, "use_qalora", &flag, path);
    if (!rc && flag) return st_fail(ST_EFORMAT, "%s: use_qalora: true is not supported", path);
    if (rc) return rc;
    const char *bias = st_json_get_string(cfg, "bias", "none");
    if (!bias || strcmp(bias, "none"))
        return st_fail(ST_EFORMAT, "%s: bias '%s' is not supported (only \"none\": no trained biases)", path,
                       bias ? bias : "(not a string)");
    if (st_json_get(cfg, "rank_pattern") && st_json_get(cfg, "rank_pattern")->count)
        return st_fail(ST_EFORMAT, "%s: rank_pattern is not supported (one rank for every module)", path);
    if (st_json_get(cfg, "alpha_pattern") && st_json_get(cfg, "alpha_pattern")->count)
        return st_fail(ST_EFORMAT, "%s: alpha_pattern is not supported (one alpha for every module)", path);
    const st_json *t = st_json_get(cfg, "target_modules");
    if (!t || t->type != ST_JSON_ARRAY)
        return st_fail(ST_EFORMAT, "%s: target_modules must be a list of module names (a regex is not supported)", path);
    for (size_t i = 0; i < t->count; i++) {
        unsigned bit = t->items[i]->type == ST_JSON_STRING ? st_lora_target_bit(t->items[i]->string) : 0;
        if (!bit)
            return st_fail(ST_EFORMAT, "%s: target_modules: %s is not a supported projection", path,
                           t->items[i]->type == ST_JSON_STRING ? t->items[i]->string : "(not a string)");
        s->targets |= bit;
    }
    const st_json *lt = st_json_get(cfg, "layers_to_transform");
    memset(layers, lt && lt->type != ST_JSON_NULL ? 0 : 1, (size_t)m->cfg.n_layer);
    if (lt && lt->type == ST_JSON_NUMBER) { /* peft also accepts a single layer index */
        if (!lt->is_integer || lt->integer < 0 || lt->integer >= m->cfg.n_layer)
            return st_fail(ST_EFORMAT, "%s: layers_to_transform %g is not a layer of the model", path, lt->number);
        layers[lt->integer] = 1;
    } else if (lt && lt->type == ST_JSON_ARRAY) {
        for (size_t i = 0; i < lt->count; i++) {
            const st_json *v = lt->items[i];
            if (v->type != ST_JSON_NUMBER || !v->is_integer || v->integer < 0 || v->integer >= m->cfg.n_layer)
                return st_fail(ST_EFORMAT, "%s: layers_to_transform: entry %zu is not a layer of the model", path, i);
            layers[v->integer] = 1;
        }
    } else if (lt && lt->type != ST_JSON_NULL) {
        return st_fail(ST_EFORMAT, "%s: layers_to_transform must be null, a layer index or a list of them", path);
    }
    s->layers = layers;
    return 0;
}

static int load_tensors(st_model *m, const char *dir) {
    char path[4200], name[PEFT_NAME_MAX];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_safetensors *st;
    int rc = st_safetensors_open(path, &st);
    if (rc) return rc;
    int n = m->n_params - m->n_base_params;
    if (st_safetensors_count(st) != n) {
        /* name the first tensor that has no adapter, or the first adapter without a tensor */
        for (int i = 0; !rc && i < st_safetensors_count(st); i++) {
            const char *tn = st_safetensors_tensor(st, i)->name;
            int found = 0;
            for (int k = 0; !found && k < n; k++) {
                st_lora_peft_name(m, m->n_base_params + k, name, sizeof name);
                found = !strcmp(name, tn);
            }
            if (!found) rc = st_fail(ST_EFORMAT, "%s: tensor %s matches no adapter of adapter_config.json", path, tn);
        }
    }
    float *host = NULL;
    for (int k = 0; !rc && k < n; k++) {
        const st_param *p = &m->params[m->n_base_params + k];
        st_lora_peft_name(m, m->n_base_params + k, name, sizeof name);
        const st_st_tensor *t = st_safetensors_find(st, name);
        if (!t) { rc = st_fail(ST_EFORMAT, "%s: tensor %s is missing", path, name); break; }
        if (t->ndim != p->ndim || t->shape[0] != p->shape[0] || (p->ndim == 2 && t->shape[1] != p->shape[1])) {
            rc = st_fail(ST_ESHAPE, "%s: %s has shape [%lld, %lld], the model needs [%lld, %lld]", path, name,
                         (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)p->shape[0],
                         (long long)p->shape[1]);
            break;
        }
        float *h = realloc(host, p->numel * sizeof(float));
        if (!h) { rc = st_fail(ST_ENOMEM, "out of memory reading %s", path); break; }
        host = h;
        rc = st_safetensors_read_f32(st, t, host, p->numel);
        if (!rc) m->be->copy_to_device(m->weights + p->offset, host, p->numel * sizeof(float));
    }
    free(host);
    st_safetensors_close(st);
    if (!rc) st_model_weights_changed(m);
    return rc;
}

int st_peft_load_dir(st_model *m, const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    char *text = NULL;
    size_t len = 0;
    int rc = st_read_file(path, &text, &len);
    if (rc) return st_fail(rc, "adapter %s: cannot read adapter_config.json: %s", dir, st_error());
    st_json *cfg = NULL;
    rc = st_json_parse(text, len, &cfg);
    free(text);
    if (rc) return st_fail_context(rc, "%s", path);
    const char *type = st_json_get_string(cfg, "peft_type", "");
    if (!strcmp(type, "PROMPT_TUNING") || !strcmp(type, "PREFIX_TUNING") || !strcmp(type, "P_TUNING")) {
        rc = st_peft_prompt_load(m, cfg, path, dir);
        st_json_free(cfg);
        return rc;
    }
    unsigned char *layers = malloc((size_t)m->cfg.n_layer);
    st_lora_spec spec;
    rc = layers ? read_spec(cfg, m, path, &spec, layers) : st_fail(ST_ENOMEM, "out of memory");
    st_json_free(cfg);
    if (!rc && (rc = st_lora_attach(m, &spec))) rc = st_fail_context(rc, "adapter %s", dir);
    free(layers);
    if (!rc) rc = load_tensors(m, dir);
    return rc;
}
