/* model_dir.c — config.json reader/writer for GPT-2 and Llama-family models (see model_dir.h).
 *
 * Every accepted key maps onto one st_model_config field; settings that would change the model's
 * function in ways shardtune does not implement are refused rather than silently ignored. */
#include "checkpoints/model_dir.h"
#include "common/error.h"
#include "common/json.h"
#include "common/util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIM (1 << 30) /* sanity bound: larger sizes are corrupt input, and would overflow int math */

typedef struct {
    const st_json *root;
    const char *src;
} reader;

/* Positive integer key. Absent or null: error when required, else dflt. */
static int get_pos_int(const reader *r, const char *key, int required, int dflt, int *out) {
    const st_json *v = st_json_get(r->root, key);
    if (!v || v->type == ST_JSON_NULL) {
        if (required) return st_fail(ST_ECONFIG, "%s: missing key '%s'", r->src, key);
        *out = dflt;
        return 0;
    }
    if (v->type != ST_JSON_NUMBER || !v->is_integer)
        return st_fail(ST_ECONFIG, "%s: key '%s' must be an integer", r->src, key);
    if (v->integer < 1 || v->integer > MAX_DIM)
        return st_fail(ST_ECONFIG, "%s: key '%s' = %lld must be a positive integer (at most %d)", r->src, key,
                       (long long)v->integer, MAX_DIM);
    *out = (int)v->integer;
    return 0;
}

static int get_pos_float(const reader *r, const char *key, double dflt, float *out) {
    const st_json *v = st_json_get(r->root, key);
    if (!v || v->type == ST_JSON_NULL) {
        *out = (float)dflt;
        return 0;
    }
    if (v->type != ST_JSON_NUMBER || !(v->number > 0) || !isfinite((float)v->number))
        return st_fail(ST_ECONFIG, "%s: key '%s' must be a positive number", r->src, key);
    *out = (float)v->number;
    return 0;
}

static int get_bool(const reader *r, const char *key, int dflt, int *out) {
    const st_json *v = st_json_get(r->root, key);
    if (!v || v->type == ST_JSON_NULL) {
        *out = dflt;
        return 0;
    }
    if (v->type != ST_JSON_BOOL) return st_fail(ST_ECONFIG, "%s: key '%s' must be true or false", r->src, key);
    *out = v->boolean;
    return 0;
}

/* bos/eos ids: an integer, null (unknown: -1) or an array of integers (first one is used). */
static int get_token_id(const reader *r, const char *key, int *out) {
    const st_json *v = st_json_get(r->root, key);
    *out = -1;
    if (v && v->type == ST_JSON_ARRAY) v = v->count ? v->items[0] : NULL;
    if (!v || v->type == ST_JSON_NULL) return 0;
    if (v->type != ST_JSON_NUMBER || !v->is_integer || v->integer < 0 || v->integer > MAX_DIM)
        return st_fail(ST_ECONFIG, "%s: key '%s' must be a non-negative integer token id", r->src, key);
    *out = (int)v->integer;
    return 0;
}

/* Only these string values are accepted (absent: the first). */
static int get_choice(const reader *r, const char *key, const char *const *allowed, const char **out) {
    const st_json *v = st_json_get(r->root, key);
    *out = allowed[0];
    if (!v || v->type == ST_JSON_NULL) return 0;
    if (v->type != ST_JSON_STRING) return st_fail(ST_ECONFIG, "%s: key '%s' must be a string", r->src, key);
    for (int i = 0; allowed[i]; i++)
        if (strcmp(v->string, allowed[i]) == 0) {
            *out = allowed[i];
            return 0;
        }
    return st_fail(ST_ECONFIG, "%s: %s '%.64s' is not supported (shardtune implements %s%s%s)", r->src, key,
                   v->string, allowed[0], allowed[1] ? " or " : "", allowed[1] ? allowed[1] : "");
}

/* Keys whose non-default value changes the model in a way shardtune does not implement. */
static int refuse_if(const reader *r, const char *key, int truthy_is_bad) {
    const st_json *v = st_json_get(r->root, key);
    if (!v || v->type == ST_JSON_NULL) return 0;
    int truthy = v->type == ST_JSON_BOOL ? v->boolean : 1;
    if (truthy == truthy_is_bad)
        return st_fail(ST_ECONFIG, "%s: key '%s' = %s is not supported", r->src, key,
                       v->type == ST_JSON_BOOL ? (v->boolean ? "true" : "false") : "(set)");
    return 0;
}

static int read_gpt2(const reader *r, st_model_config *c) {
    static const char *const acts[] = {"gelu_new", "gelu_pytorch_tanh", NULL};
    const char *act;
    int rc;
    c->family = ST_FAMILY_GPT2;
    if ((rc = get_pos_int(r, "n_embd", 1, 0, &c->d_model)) || (rc = get_pos_int(r, "n_layer", 1, 0, &c->n_layer)) ||
        (rc = get_pos_int(r, "n_head", 1, 0, &c->n_head)) || (rc = get_pos_int(r, "vocab_size", 1, 0, &c->vocab)))
        return rc;
    const st_json *np = st_json_get(r->root, "n_positions");
    if ((rc = get_pos_int(r, (np && np->type != ST_JSON_NULL) ? "n_positions" : "n_ctx", 0, 0, &c->max_seq)))
        return rc;
    if (c->max_seq == 0) return st_fail(ST_ECONFIG, "%s: missing key 'n_positions' (or 'n_ctx')", r->src);
    if ((rc = get_pos_int(r, "n_inner", 0, 0, &c->d_ff))) return rc;
    if (c->d_ff == 0) {
        if (c->d_model > MAX_DIM / 4) return st_fail(ST_ECONFIG, "%s: key 'n_embd' is too large", r->src);
        c->d_ff = 4 * c->d_model;
    }
    if ((rc = get_pos_float(r, "layer_norm_epsilon", 1e-5, &c->norm_eps)) ||
        (rc = get_choice(r, "activation_function", acts, &act)) ||
        (rc = get_bool(r, "tie_word_embeddings", 1, &c->tied_embeddings)) ||
        (rc = refuse_if(r, "scale_attn_by_inverse_layer_idx", 1)) || (rc = refuse_if(r, "scale_attn_weights", 0)) ||
        (rc = refuse_if(r, "reorder_and_upcast_attn", 1)))
        return rc;
    if (c->d_model % c->n_head != 0)
        return st_fail(ST_ECONFIG, "%s: key 'n_head' = %d does not divide n_embd = %d", r->src, c->n_head, c->d_model);
    c->n_kv_head = c->n_head;
    c->head_dim = c->d_model / c->n_head;
    c->qkv_bias = 1;
    c->rope_theta = 0;
    return 0;
}

static int read_llama(const reader *r, st_model_config *c) {
    static const char *const acts[] = {"silu", NULL};
    const char *act;
    int rc;
    c->family = ST_FAMILY_LLAMA;
    if ((rc = get_pos_int(r, "hidden_size", 1, 0, &c->d_model)) ||
        (rc = get_pos_int(r, "intermediate_size", 1, 0, &c->d_ff)) ||
        (rc = get_pos_int(r, "num_hidden_layers", 1, 0, &c->n_layer)) ||
        (rc = get_pos_int(r, "num_attention_heads", 1, 0, &c->n_head)) ||
        (rc = get_pos_int(r, "vocab_size", 1, 0, &c->vocab)) ||
        (rc = get_pos_int(r, "max_position_embeddings", 1, 0, &c->max_seq)) ||
        (rc = get_pos_int(r, "num_key_value_heads", 0, c->n_head, &c->n_kv_head)) ||
        (rc = get_pos_int(r, "head_dim", 0, 0, &c->head_dim)) ||
        (rc = get_pos_float(r, "rms_norm_eps", 1e-6, &c->norm_eps)) ||
        (rc = get_pos_float(r, "rope_theta", 10000.0, &c->rope_theta)) ||
        (rc = get_bool(r, "tie_word_embeddings", 0, &c->tied_embeddings)) ||
        (rc = get_choice(r, "hidden_act", acts, &act)))
        return rc;
    const st_json *rs = st_json_get(r->root, "rope_scaling");
    if (rs && rs->type != ST_JSON_NULL)
        return st_fail(ST_ECONFIG, "%s: key 'rope_scaling' is set: RoPE scaling is not supported", r->src);
    if (c->head_dim == 0) {
        if (c->d_model % c->n_head != 0)
            return st_fail(ST_ECONFIG, "%s: key 'num_attention_heads' = %d does not divide hidden_size = %d "
                           "(and no head_dim is given)", r->src, c->n_head, c->d_model);
        c->head_dim = c->d_model / c->n_head;
    }
    c->qkv_bias = 0;
    if (strcmp(c->model_type, "qwen2") == 0) {
        c->qkv_bias = 1; /* Qwen2 always has q/k/v biases (and none on o_proj) */
        if ((rc = refuse_if(r, "use_sliding_window", 1))) return rc;
    } else {
        /* HF llama's attention_bias adds an o_proj bias too, which the model graph does not have */
        if ((rc = refuse_if(r, "attention_bias", 1)) || (rc = refuse_if(r, "mlp_bias", 1))) return rc;
    }
    if (strcmp(c->model_type, "mistral") == 0) {
        /* Sliding-window attention equals full causal attention for sequences no longer than the window,
         * so a windowed Mistral is used with max_seq capped at the window. */
        int window = 0;
        if ((rc = get_pos_int(r, "sliding_window", 0, 0, &window))) return rc;
        if (window > 0 && window < c->max_seq) c->max_seq = window;
    }
    return 0;
}

int st_model_config_validate(const st_model_config *c) {
    static const char *const types[] = {"gpt2", "llama", "qwen2", "mistral"};
    int known = -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(c->model_type, types[i]) == 0) known = i;
    if (known < 0) return st_fail(ST_ECONFIG, "model_type '%.32s' is not supported (gpt2, llama, qwen2, mistral)", c->model_type);
    if ((known == 0) != (c->family == ST_FAMILY_GPT2))
        return st_fail(ST_ECONFIG, "model_type '%s' does not match the model family", c->model_type);
    struct { const char *name; int v; } dims[] = {{"n_layer", c->n_layer}, {"d_model", c->d_model},
        {"n_head", c->n_head}, {"n_kv_head", c->n_kv_head}, {"head_dim", c->head_dim}, {"d_ff", c->d_ff},
        {"vocab", c->vocab}, {"max_seq", c->max_seq}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v < 1 || dims[i].v > MAX_DIM)
            return st_fail(ST_ECONFIG, "model config: %s = %d must be a positive integer", dims[i].name, dims[i].v);
    if (!(c->norm_eps > 0) || !isfinite(c->norm_eps))
        return st_fail(ST_ECONFIG, "model config: norm_eps = %g must be positive", (double)c->norm_eps);
    if (c->n_head % c->n_kv_head != 0)
        return st_fail(ST_ECONFIG, "model config: n_head = %d is not a multiple of n_kv_head = %d", c->n_head,
                       c->n_kv_head);
    if (c->family == ST_FAMILY_GPT2) {
        if (c->n_kv_head != c->n_head || (long long)c->head_dim * c->n_head != c->d_model || !c->qkv_bias)
            return st_fail(ST_ECONFIG, "model config: gpt2 needs n_kv_head == n_head, head_dim * n_head == d_model "
                           "and q/k/v biases");
    } else {
        if (c->head_dim % 2 != 0)
            return st_fail(ST_ECONFIG, "model config: head_dim = %d must be even for RoPE", c->head_dim);
        if (!(c->rope_theta > 0) || !isfinite(c->rope_theta))
            return st_fail(ST_ECONFIG, "model config: rope_theta = %g must be positive", (double)c->rope_theta);
        if ((known == 2) != (c->qkv_bias != 0))
            return st_fail(ST_ECONFIG, "model config: q/k/v biases are %s for model_type '%s'",
                           known == 2 ? "required" : "not supported", c->model_type);
    }
    return 0;
}

int st_model_config_parse(const char *text, size_t len, const char *source, st_model_config *out) {
    st_json *root = NULL;
    int rc = st_json_parse(text, len, &root);
    if (rc) return st_fail_context(rc, "%s", source);
    reader r = {root, source};
    st_model_config c;
    memset(&c, 0, sizeof c);
    const char *mt = st_json_get_string(root, "model_type", NULL);
    if (root->type != ST_JSON_OBJECT) rc = st_fail(ST_ECONFIG, "%s: not a JSON object", source);
    else if (!mt) rc = st_fail(ST_ECONFIG, "%s: missing key 'model_type'", source);
    else if (strlen(mt) >= sizeof c.model_type)
        rc = st_fail(ST_ECONFIG, "%s: model_type '%.32s...' is not supported", source, mt);
    else {
        strcpy(c.model_type, mt);
        if (strcmp(mt, "gpt2") == 0) rc = read_gpt2(&r, &c);
        else if (!strcmp(mt, "llama") || !strcmp(mt, "qwen2") || !strcmp(mt, "mistral")) rc = read_llama(&r, &c);
        else rc = st_fail(ST_ECONFIG, "%s: model_type '%s' is not supported (gpt2, llama, qwen2, mistral)", source, mt);
    }
    if (rc == 0 && ((rc = get_token_id(&r, "bos_token_id", &c.bos_id)) == 0))
        rc = get_token_id(&r, "eos_token_id", &c.eos_id);
    if (rc == 0 && (rc = st_model_config_validate(&c)) != 0) rc = st_fail_context(rc, "%s", source);
    st_json_free(root);
    if (rc == 0) *out = c;
    return rc;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

int st_model_config_read(const char *dir, st_model_config *cfg) {
    char path[4096];
    int k = ends_with(dir, ".json") ? snprintf(path, sizeof path, "%s", dir)
                                    : snprintf(path, sizeof path, "%s/config.json", dir);
    if (k < 0 || (size_t)k >= sizeof path) return st_fail(ST_EINVAL, "path too long: %s", dir);
    char *text;
    size_t len;
    int rc = st_read_file(path, &text, &len);
    if (rc) return rc;
    rc = st_model_config_parse(text, len, path, cfg);
    free(text);
    return rc;
}

/* Shortest decimal that reads back as the same float (1e-05, not 9.99999975e-06). */
static void put_float(st_strbuf *b, float f) {
    char buf[32];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    st_strbuf_printf(b, "%s", buf);
    if (!strpbrk(buf, ".eEn")) st_strbuf_printf(b, ".0"); /* keep it a float in Python's json */
}

static void put_id(st_strbuf *b, const char *key, int id) {
    if (id >= 0) st_strbuf_printf(b, "  \"%s\": %d,\n", key, id);
    else st_strbuf_printf(b, "  \"%s\": null,\n", key);
}

int st_model_config_write(const char *dir, const st_model_config *c) {
    int rc = st_model_config_validate(c);
    if (rc) return st_fail_context(rc, "%s/config.json", dir);
    if ((rc = st_mkdirs(dir)) != 0) return rc;
    st_strbuf b = {0};
    st_strbuf_printf(&b, "{\n");
    if (c->family == ST_FAMILY_GPT2) {
        st_strbuf_printf(&b, "  \"architectures\": [\"GPT2LMHeadModel\"],\n  \"model_type\": \"gpt2\",\n");
        st_strbuf_printf(&b, "  \"n_embd\": %d,\n  \"n_layer\": %d,\n  \"n_head\": %d,\n", c->d_model, c->n_layer,
                         c->n_head);
        st_strbuf_printf(&b, "  \"n_positions\": %d,\n  \"n_ctx\": %d,\n  \"n_inner\": %d,\n", c->max_seq,
                         c->max_seq, c->d_ff);
        st_strbuf_printf(&b, "  \"vocab_size\": %d,\n  \"layer_norm_epsilon\": ", c->vocab);
        put_float(&b, c->norm_eps);
        st_strbuf_printf(&b, ",\n  \"activation_function\": \"gelu_new\",\n");
    } else {
        static const char *const arch[][2] = {{"llama", "LlamaForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"},
                                              {"mistral", "MistralForCausalLM"}};
        const char *a = "LlamaForCausalLM";
        for (int i = 0; i < 3; i++)
            if (strcmp(c->model_type, arch[i][0]) == 0) a = arch[i][1];
        st_strbuf_printf(&b, "  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n", a, c->model_type);
        st_strbuf_printf(&b, "  \"hidden_size\": %d,\n  \"intermediate_size\": %d,\n  \"num_hidden_layers\": %d,\n",
                         c->d_model, c->d_ff, c->n_layer);
        st_strbuf_printf(&b, "  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n  \"head_dim\": %d,\n",
                         c->n_head, c->n_kv_head, c->head_dim);
        st_strbuf_printf(&b, "  \"max_position_embeddings\": %d,\n  \"vocab_size\": %d,\n", c->max_seq, c->vocab);
        st_strbuf_printf(&b, "  \"rms_norm_eps\": ");
        put_float(&b, c->norm_eps);
        st_strbuf_printf(&b, ",\n  \"rope_theta\": ");
        put_float(&b, c->rope_theta);
        st_strbuf_printf(&b, ",\n  \"rope_scaling\": null,\n  \"hidden_act\": \"silu\",\n");
        if (strcmp(c->model_type, "llama") == 0)
            st_strbuf_printf(&b, "  \"attention_bias\": false,\n  \"mlp_bias\": false,\n");
        if (strcmp(c->model_type, "qwen2") == 0) st_strbuf_printf(&b, "  \"use_sliding_window\": false,\n");
        if (strcmp(c->model_type, "mistral") == 0) st_strbuf_printf(&b, "  \"sliding_window\": null,\n");
    }
    put_id(&b, "bos_token_id", c->bos_id);
    put_id(&b, "eos_token_id", c->eos_id);
    st_strbuf_printf(&b, "  \"tie_word_embeddings\": %s,\n  \"torch_dtype\": \"float32\"\n}\n",
                     c->tied_embeddings ? "true" : "false");
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path) rc = st_fail(ST_EINVAL, "path too long: %s", dir);
    else if (b.failed) rc = st_fail(ST_ENOMEM, "out of memory writing %s", path);
    else rc = st_write_file_atomic(path, b.data, b.len);
    st_strbuf_free(&b);
    return rc;
}
