/* peft_prompt.c — PEFT prompt-tuning adapter directories (see peft_prompt.h). */
#define _DEFAULT_SOURCE /* realpath */
#include "checkpoints/peft_prompt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoints/safetensors.h"
#include "common/error.h"
#include "common/util.h"
#include "worker/prompt.h"

static void path_field(st_strbuf *b, const char *path) {
    char abs[4096];
    if (path && realpath(path, abs)) st_strbuf_json_string(b, abs);
    else if (path) st_strbuf_json_string(b, path);
    else st_strbuf_printf(b, "null");
}

/* PrefixTuningConfig.to_dict() as peft 0.21 saves it: token_dim and num_attention_heads are the key/value
 * width and heads (peft's grouped-query adjustment), encoder_hidden_size defaults to token_dim. */
static void prefix_fields(st_strbuf *b, const st_model *m) {
    const st_model_config *c = &m->cfg;
    int kvd = c->n_kv_head * c->head_dim;
    st_strbuf_printf(b, "  \"encoder_hidden_size\": %d,\n  \"inference_mode\": true,\n  \"init_weights\": null,\n", kvd);
    st_strbuf_printf(b, "  \"modules_to_save\": null,\n  \"num_attention_heads\": %d,\n  \"num_layers\": %d,\n",
                     c->n_kv_head, c->n_layer);
    st_strbuf_printf(b, "  \"num_transformer_submodules\": 1,\n  \"num_virtual_tokens\": %d,\n", st_prompt_tokens(m));
    st_strbuf_printf(b, "  \"peft_type\": \"PREFIX_TUNING\",\n  \"peft_version\": \"0.21.2\",\n"
                        "  \"prefix_projection\": %s,\n  \"revision\": null,\n  \"task_type\": \"CAUSAL_LM\",\n"
                        "  \"token_dim\": %d\n}\n", st_prompt_has_encoder(m) ? "true" : "false", kvd);
}

/* PromptEncoderConfig.to_dict() (P-tuning, MLP encoder, hidden size = token_dim) as peft 0.21 saves it. */
static void ptuning_fields(st_strbuf *b, const st_model *m) {
    const st_model_config *c = &m->cfg;
    st_strbuf_printf(b, "  \"encoder_dropout\": 0.0,\n  \"encoder_hidden_size\": %d,\n  \"encoder_num_layers\": 2,\n"
                        "  \"encoder_reparameterization_type\": \"%s\",\n  \"inference_mode\": true,\n", c->d_model,
                     st_prompt_is_lstm(m) ? "LSTM" : "MLP");
    st_strbuf_printf(b, "  \"modules_to_save\": null,\n  \"num_attention_heads\": %d,\n  \"num_layers\": %d,\n",
                     c->n_head, c->n_layer);
    st_strbuf_printf(b, "  \"num_transformer_submodules\": 1,\n  \"num_virtual_tokens\": %d,\n", st_prompt_tokens(m));
    st_strbuf_printf(b, "  \"peft_type\": \"P_TUNING\",\n  \"peft_version\": \"0.21.2\",\n  \"revision\": null,\n"
                        "  \"task_type\": \"CAUSAL_LM\",\n  \"token_dim\": %d\n}\n", c->d_model);
}

/* PromptTuningConfig.to_dict() as peft saves it (inference_mode true, as save_pretrained sets). */
static char *config_json(const st_model *m, const char *base_model) {
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\n  \"auto_mapping\": null,\n  \"base_model_name_or_path\": ");
    path_field(&b, base_model);
    st_strbuf_printf(&b, ",\n");
    if (st_prompt_is_prefix(m) || st_prompt_is_ptuning(m)) {
        if (st_prompt_is_prefix(m)) prefix_fields(&b, m);
        else ptuning_fields(&b, m);
        if (b.failed) { st_strbuf_free(&b); return NULL; }
        return b.data;
    }
    st_strbuf_printf(&b, "  \"inference_mode\": true,\n  \"modules_to_save\": null,\n");
    st_strbuf_printf(&b, "  \"num_attention_heads\": %d,\n  \"num_layers\": %d,\n", m->cfg.n_head, m->cfg.n_layer);
    st_strbuf_printf(&b, "  \"num_transformer_submodules\": 1,\n  \"num_virtual_tokens\": %d,\n", st_prompt_tokens(m));
    const char *text = st_prompt_init_text(m), *tok = st_prompt_tokenizer_dir(m);
    st_strbuf_printf(&b, "  \"peft_type\": \"PROMPT_TUNING\",\n  \"peft_version\": \"0.21.2\",\n"
                         "  \"prompt_tuning_init\": \"%s\",\n  \"prompt_tuning_init_text\": ", text ? "TEXT" : "RANDOM");
    if (text) st_strbuf_json_string(&b, text);
    else st_strbuf_printf(&b, "null");
    st_strbuf_printf(&b, ",\n  \"revision\": null,\n  \"task_type\": \"CAUSAL_LM\",\n");
    st_strbuf_printf(&b, "  \"token_dim\": %d,\n  \"tokenizer_kwargs\": null,\n  \"tokenizer_name_or_path\": ", m->cfg.d_model);
    /* peft's PromptTuningConfig requires it with TEXT init (inference_mode skips the init on load) */
    path_field(&b, tok);
    st_strbuf_printf(&b, "\n}\n");
    if (b.failed) { st_strbuf_free(&b); return NULL; }
    return b.data;
}

int st_peft_prompt_save(const st_model *m, const char *dir, const char *base_model) {
    int pi = st_prompt_param(m);
    if (pi < 0) return st_fail(ST_EINVAL, "the model has no prompt to save");
    int rc = st_mkdirs(dir);
    if (rc) return st_fail(rc, "adapter directory %s: %s", dir, st_error());
    const st_param *p = &m->params[pi];
    /* P-tuning: peft saves the encoder's output (get_prompt_embedding_to_save), [V, C] */
    int64_t d0 = p->shape[0], d1 = st_prompt_table_width(m);
    float *host = malloc((size_t)d0 * d1 * sizeof(float));
    char *json = config_json(m, base_model);
    if (!host || !json) rc = st_fail(ST_ENOMEM, "out of memory writing adapter %s", dir);
    char path[4200];
    if (!rc) {
        if (st_prompt_has_encoder(m)) st_prompt_encode(m, host);
        else m->be->copy_to_host(host, st_model_param_weights(m, pi), p->numel * sizeof(float));
        st_st_write_item it = {.name = "prompt_embeddings", .data = host, .ndim = 2};
        it.shape[0] = d0;
        it.shape[1] = d1;
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        rc = st_safetensors_write(path, 1, &it, NULL);
    }
    if (!rc) {
        snprintf(path, sizeof path, "%s/adapter_config.json", dir);
        rc = st_write_file_atomic(path, json, strlen(json));
        if (rc) rc = st_fail(rc, "%s: %s", path, st_error());
    }
    free(json);
    free(host);
    return rc;
}

static int int_field(const st_json *cfg, const char *key, const char *path, int64_t *out) {
    int ok = 1;
    *out = st_json_get_int(cfg, key, -1, &ok);
    if (!ok || *out < 0) return st_fail(ST_EFORMAT, "%s: %s must be a non-negative integer", path, key);
    return 0;
}

/* Reads the prompt's registry entries from DIR/adapter_model.safetensors, each under its registry name
 * (prompt_embeddings, or a P-tuning encoder's prompt_encoder.* tensors); any other tensor is refused. */
static int read_tensors(st_model *m, const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_safetensors *st;
    int rc = st_safetensors_open(path, &st);
    if (rc) return rc;
    int first = st_prompt_param(m), n = st_prompt_param_count(m);
    for (int i = 0; !rc && i < st_safetensors_count(st); i++) {
        const char *name = st_safetensors_tensor(st, i)->name;
        int k = st_model_find(m, name);
        if (k < first || k >= first + n)
            rc = st_fail(ST_EFORMAT, "%s: tensor %s is not part of a prompt-learning adapter", path, name);
    }
    for (int k = first; !rc && k < first + n; k++) {
        const st_param *p = &m->params[k];
        const st_st_tensor *t = st_safetensors_find(st, p->name);
        int64_t d1 = p->ndim > 1 ? p->shape[1] : 0;
        if (!t) rc = st_fail(ST_EFORMAT, "%s: tensor %s is missing", path, p->name);
        else if (t->ndim != p->ndim || t->shape[0] != p->shape[0] || (p->ndim > 1 && t->shape[1] != d1))
            rc = st_fail(ST_ESHAPE, "%s: %s has shape [%lld, %lld], adapter_config.json says [%lld, %lld]", path, p->name,
                         (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)p->shape[0],
                         (long long)d1);
        float *host = rc ? NULL : malloc(p->numel * sizeof(float));
        if (!rc && !host) rc = st_fail(ST_ENOMEM, "out of memory reading %s", path);
        if (!rc) rc = st_safetensors_read_f32(st, t, host, p->numel);
        if (!rc) m->be->copy_to_device(m->weights + p->offset, host, p->numel * sizeof(float));
        free(host);
    }
    st_safetensors_close(st);
    if (!rc) st_model_weights_changed(m);
    return rc;
}

/* Does DIR/adapter_model.safetensors hold a P-tuning encoder's training state (prompt_encoder.* tensors)
 * rather than the encoder's output? */
static int has_encoder_state(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_safetensors *st;
    if (st_safetensors_open(path, &st)) return 0;
    int yes = st_safetensors_find(st, "prompt_encoder.embedding.weight") != NULL;
    st_safetensors_close(st);
    return yes;
}

/* PREFIX_TUNING: token_dim / num_attention_heads are the key/value width and heads (peft's GQA rule). A
 * saved adapter holds the prefix itself whether or not it trained with prefix_projection (peft saves the
 * projection's output and loads it into a plain table in inference mode). */
static int prefix_load(st_model *m, const st_json *cfg, const char *path, const char *dir, int64_t V, int64_t dim) {
    const st_model_config *c = &m->cfg;
    int64_t heads, layers;
    int rc = int_field(cfg, "num_attention_heads", path, &heads);
    if (!rc) rc = int_field(cfg, "num_layers", path, &layers);
    if (rc) return rc;
    if (dim != (int64_t)c->n_kv_head * c->head_dim || heads != c->n_kv_head)
        return st_fail(ST_ESHAPE, "%s: token_dim %lld / num_attention_heads %lld are not the model's key/value width %d / "
                       "heads %d", path, (long long)dim, (long long)heads, c->n_kv_head * c->head_dim, c->n_kv_head);
    if (layers != c->n_layer)
        return st_fail(ST_ESHAPE, "%s: num_layers %lld is not the model's %d", path, (long long)layers, c->n_layer);
    /* a directory with the projection's own tensors (prompt_encoder.*) loads the projection */
    int proj = has_encoder_state(dir);
    if (proj && st_json_get_int(cfg, "encoder_hidden_size", dim, &(int){1}) != dim)
        return st_fail(ST_EFORMAT, "%s: a prefix projection with encoder_hidden_size other than token_dim is not supported",
                       path);
    if ((rc = st_prefix_attach(m, (int)V, proj, 0))) return st_fail_context(rc, "adapter %s", dir);
    return read_tensors(m, dir);
}

int st_peft_prompt_load(st_model *m, const st_json *cfg, const char *path, const char *dir) {
    const char *task = st_json_get_string(cfg, "task_type", "");
    if (strcmp(task, "CAUSAL_LM"))
        return st_fail(ST_EFORMAT, "%s: task_type \"%s\" is not supported (CAUSAL_LM only)", path, task);
    int64_t V, dim, subs;
    int rc = int_field(cfg, "num_virtual_tokens", path, &V);
    if (!rc) rc = int_field(cfg, "token_dim", path, &dim);
    if (!rc) rc = int_field(cfg, "num_transformer_submodules", path, &subs);
    if (rc) return rc;
    if (V < 1 || V > 1000000) return st_fail(ST_EFORMAT, "%s: num_virtual_tokens %lld must be >= 1", path, (long long)V);
    const st_json *mts = st_json_get(cfg, "modules_to_save"); /* full module copies: not a prompt's computation */
    if (mts && mts->type != ST_JSON_NULL && !(mts->type == ST_JSON_ARRAY && !mts->count))
        return st_fail(ST_EFORMAT, "%s: modules_to_save is not supported (the prompt alone)", path);
    if (subs != 1)
        return st_fail(ST_EFORMAT, "%s: num_transformer_submodules %lld (a decoder-only model has 1)", path, (long long)subs);
    if (!strcmp(st_json_get_string(cfg, "peft_type", ""), "PREFIX_TUNING")) return prefix_load(m, cfg, path, dir, V, dim);
    if (dim != m->cfg.d_model)
        return st_fail(ST_ESHAPE, "%s: token_dim %lld is not the model's hidden size %d", path, (long long)dim, m->cfg.d_model);
    /* P_TUNING: peft's saved adapter is the encoder's output, a plain table; a directory with the
     * encoder's own tensors (MLP, hidden size = token_dim) loads the encoder */
    int enc = !strcmp(st_json_get_string(cfg, "peft_type", ""), "P_TUNING") && has_encoder_state(dir);
    const char *kind = st_json_get_string(cfg, "encoder_reparameterization_type", "MLP");
    int lstm = !strcmp(kind, "LSTM");
    if (enc && ((!lstm && strcmp(kind, "MLP")) || st_json_get_int(cfg, "encoder_hidden_size", dim, &(int){1}) != dim ||
                (lstm && st_json_get_int(cfg, "encoder_num_layers", 2, &(int){1}) != 2)))
        return st_fail(ST_EFORMAT, "%s: a P-tuning encoder other than MLP or a 2-layer LSTM with encoder_hidden_size = "
                       "token_dim is not supported", path);
    if ((rc = enc ? st_ptuning_attach(m, (int)V, lstm, 0) : st_prompt_attach(m, (int)V, 0)))
        return st_fail_context(rc, "adapter %s", dir);
    return read_tensors(m, dir);
}
