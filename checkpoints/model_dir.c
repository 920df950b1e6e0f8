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

/* ---------------- RoPE settings: rope_parameters (transformers 5) or rope_theta + rope_scaling (4.x) ---------------- */

static const char *const rope_type_names[] = {"default", "linear", "dynamic", "yarn", "llama3", "longrope", NULL};

/* Keys each rope_type may carry (besides rope_type/type and rope_theta), as transformers validates them;
 * anything else changes the math in a way we would be guessing at, so it is refused by name. */
static const char *const rope_keys[][9] = {
    {NULL},
    {"factor", NULL},
    {"factor", NULL},
    {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
     "mscale_all_dim", "truncate", NULL},
    {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", NULL},
    {"short_factor", "long_factor", "original_max_position_embeddings", "attention_factor", "factor", NULL},
};

/* A number of the rope dict: absent/null leaves *out alone, unless required. */
static int rope_num(const reader *r, const char *what, const st_json *o, const char *key, int required,
                    double *out) {
    const st_json *v = st_json_get(o, key);
    if (!v || v->type == ST_JSON_NULL) {
        if (required) return st_fail(ST_ECONFIG, "%s: %s needs '%s'", r->src, what, key);
        return 0;
    }
    if (v->type != ST_JSON_NUMBER || !isfinite(v->number))
        return st_fail(ST_ECONFIG, "%s: %s key '%s' must be a number", r->src, what, key);
    *out = v->number;
    return 0;
}

static int rope_factors(const reader *r, const char *what, const st_json *o, const char *key, float *out, int *n) {
    const st_json *v = st_json_get(o, key);
    if (!v || v->type != ST_JSON_ARRAY) return st_fail(ST_ECONFIG, "%s: %s needs '%s' (a list of numbers)", r->src, what, key);
    if (v->count > ST_ROPE_MAX_FACTORS || (*n >= 0 && (int)v->count != *n))
        return st_fail(ST_ECONFIG, "%s: %s key '%s' has %zu entries (short_factor and long_factor must both have "
                       "head_dim/2)", r->src, what, key, v->count);
    for (size_t i = 0; i < v->count; i++) {
        if (v->items[i]->type != ST_JSON_NUMBER || !(v->items[i]->number > 0))
            return st_fail(ST_ECONFIG, "%s: %s key '%s' must hold positive numbers", r->src, what, key);
        out[i] = (float)v->items[i]->number;
    }
    *n = (int)v->count;
    return 0;
}

/* Reads one rope dict (rope_parameters or rope_scaling) into c->rope (and its rope_theta into c). */
static int read_rope_dict(const reader *r, const char *what, const st_json *o, st_model_config *c) {
    if (o->type != ST_JSON_OBJECT) return st_fail(ST_ECONFIG, "%s: key '%s' must be an object", r->src, what);
    const char *ty = st_json_get_string(o, "rope_type", NULL), *ty2 = st_json_get_string(o, "type", NULL);
    if (ty && ty2 && strcmp(ty, ty2) != 0)
        return st_fail(ST_ECONFIG, "%s: %s has rope_type '%.32s' but type '%.32s'", r->src, what, ty, ty2);
    if (!ty) ty = ty2 ? ty2 : "default";
    st_rope_config *rc_ = &c->rope;
    int t = -1;
    for (int i = 0; rope_type_names[i]; i++)
        if (strcmp(ty, rope_type_names[i]) == 0) t = i;
    if (t < 0)
        return st_fail(ST_ECONFIG, "%s: %s rope_type '%.32s' is not supported (shardtune implements default, linear, "
                       "dynamic, yarn, llama3, longrope)", r->src, what, ty);
    rc_->type = t;
    for (size_t i = 0; i < o->count; i++) {
        const char *k = o->keys[i];
        int ok = !strcmp(k, "rope_type") || !strcmp(k, "type") || !strcmp(k, "rope_theta");
        for (int j = 0; !ok && rope_keys[t][j]; j++) ok = strcmp(k, rope_keys[t][j]) == 0;
        if (!strcmp(k, "partial_rotary_factor")) {
            if (o->items[i]->type == ST_JSON_NUMBER && o->items[i]->number == 1.0) continue;
            return st_fail(ST_ECONFIG, "%s: %s key 'partial_rotary_factor' is not supported (only 1.0)", r->src, what);
        }
        if (!ok) return st_fail(ST_ECONFIG, "%s: %s key '%s' is not supported for rope_type '%s'", r->src, what, k, ty);
    }
    double theta = 0, omax = 0;
    int rc = rope_num(r, what, o, "rope_theta", 0, &theta);
    if (rc) return rc;
    if (theta != 0) {
        if (!(theta > 0)) return st_fail(ST_ECONFIG, "%s: %s key 'rope_theta' must be positive", r->src, what);
        c->rope_theta = (float)theta;
    }
    int need_factor = t == ST_ROPE_LINEAR || t == ST_ROPE_DYNAMIC || t == ST_ROPE_YARN || t == ST_ROPE_LLAMA3;
    if ((rc = rope_num(r, what, o, "factor", need_factor, &rc_->factor)) ||
        (rc = rope_num(r, what, o, "original_max_position_embeddings", 0, &omax)) ||
        (rc = rope_num(r, what, o, "attention_factor", 0, &rc_->attention_factor)) ||
        (rc = rope_num(r, what, o, "beta_fast", 0, &rc_->beta_fast)) ||
        (rc = rope_num(r, what, o, "beta_slow", 0, &rc_->beta_slow)) ||
        (rc = rope_num(r, what, o, "mscale", 0, &rc_->mscale)) ||
        (rc = rope_num(r, what, o, "mscale_all_dim", 0, &rc_->mscale_all_dim)))
        return rc;
    if (t == ST_ROPE_LLAMA3 && ((rc = rope_num(r, what, o, "low_freq_factor", 1, &rc_->low_freq_factor)) ||
                                (rc = rope_num(r, what, o, "high_freq_factor", 1, &rc_->high_freq_factor))))
        return rc;
    if (rc_->factor != 0 && !(rc_->factor > 0))
        return st_fail(ST_ECONFIG, "%s: %s key 'factor' must be positive", r->src, what);
    if (t == ST_ROPE_LLAMA3 && !(rc_->high_freq_factor > rc_->low_freq_factor && rc_->low_freq_factor > 0))
        return st_fail(ST_ECONFIG, "%s: %s needs 0 < low_freq_factor < high_freq_factor", r->src, what);
    if (omax != 0) {
        if (!(omax >= 1 && omax <= MAX_DIM && omax == floor(omax)))
            return st_fail(ST_ECONFIG, "%s: %s key 'original_max_position_embeddings' must be a positive integer",
                           r->src, what);
        rc_->original_max = (int)omax;
    }
    const st_json *tr = st_json_get(o, "truncate");
    if (tr && tr->type != ST_JSON_NULL) {
        if (tr->type != ST_JSON_BOOL) return st_fail(ST_ECONFIG, "%s: %s key 'truncate' must be true or false", r->src, what);
        rc_->no_truncate = !tr->boolean;
    }
    if (t == ST_ROPE_LONGROPE) {
        rc_->n_factors = -1;
        if ((rc = rope_factors(r, what, o, "short_factor", rc_->short_factor, &rc_->n_factors)) ||
            (rc = rope_factors(r, what, o, "long_factor", rc_->long_factor, &rc_->n_factors)))
            return rc;
    }
    return 0;
}

/* Both generations of RoPE settings. transformers 5 reads rope_scaling first when both are present; a
 * config with both is ambiguous to a reader, so it is refused. */
static int read_rope(const reader *r, st_model_config *c) {
    const st_json *rp = st_json_get(r->root, "rope_parameters"), *rs = st_json_get(r->root, "rope_scaling");
    int has_rp = rp && rp->type != ST_JSON_NULL, has_rs = rs && rs->type != ST_JSON_NULL;
    int rc = get_pos_float(r, "rope_theta", 10000.0, &c->rope_theta);
    if (rc) return rc;
    memset(&c->rope, 0, sizeof c->rope);
    if (has_rp && has_rs)
        return st_fail(ST_ECONFIG, "%s: both 'rope_parameters' and 'rope_scaling' are set (keep one)", r->src);
    c->rope.format = has_rp ? ST_ROPE_FMT_PARAMETERS : ST_ROPE_FMT_LEGACY;
    if (has_rp && rp->type == ST_JSON_OBJECT && st_json_get(rp, "full_attention"))
        return st_fail(ST_ECONFIG, "%s: per-layer-type 'rope_parameters' are not supported", r->src);
    if (has_rp) rc = read_rope_dict(r, "rope_parameters", rp, c);
    if (has_rs) rc = read_rope_dict(r, "rope_scaling", rs, c);
    if (rc) return rc;
    /* transformers' standardize_rope_params: a top-level original_max_position_embeddings (Phi-3 style)
     * wins for llama3/yarn/longrope; absent everywhere, it is max_position_embeddings */
    int t = c->rope.type, top = 0;
    if (t == ST_ROPE_LLAMA3 || t == ST_ROPE_YARN || t == ST_ROPE_LONGROPE) {
        if ((rc = get_pos_int(r, "original_max_position_embeddings", 0, 0, &top))) return rc;
        if (top > 0) {
            c->rope.original_max = top;
            c->rope.original_max_top = 1;
        }
        if (c->rope.original_max == 0) c->rope.original_max = c->max_seq;
    } else if (st_json_get(r->root, "original_max_position_embeddings") && t != ST_ROPE_DEFAULT) {
        return st_fail(ST_ECONFIG, "%s: key 'original_max_position_embeddings' is not used by rope_type '%s'",
                       r->src, rope_type_names[t]);
    }
    if (t == ST_ROPE_LONGROPE && c->rope.n_factors * 2 != c->head_dim)
        return st_fail(ST_ECONFIG, "%s: longrope short_factor/long_factor have %d entries, head_dim/2 is %d", r->src,
                       c->rope.n_factors, c->head_dim / 2);
    if (st_json_get(r->root, "partial_rotary_factor")) {
        const st_json *v = st_json_get(r->root, "partial_rotary_factor");
        if (!(v->type == ST_JSON_NUMBER && v->number == 1.0))
            return st_fail(ST_ECONFIG, "%s: key 'partial_rotary_factor' is not supported (only 1.0)", r->src);
    }
    return 0;
}

/* Sliding-window attention: which layers slide (layer_types, or Qwen's max_window_layers rule) and how far.
 * Only the window of the sliding layers matters to us: sequences up to it are exact (model.c refuses longer). */
static int read_sliding(const reader *r, st_model_config *c) {
    int rc, window = 0, use = 1, mwl = 0;
    int is_mistral = strcmp(c->model_type, "mistral") == 0, is_llama = strcmp(c->model_type, "llama") == 0;
    c->sliding_window = 0;
    c->window_first_layer = 0;
    if (is_llama) return 0;
    const st_json *sw = st_json_get(r->root, "sliding_window");
    if (!sw) window = 4096; /* the config classes' default */
    else if ((rc = get_pos_int(r, "sliding_window", 0, 0, &window))) return rc;
    if (!is_mistral) {
        if ((rc = get_bool(r, "use_sliding_window", 0, &use)) ||
            (rc = get_pos_int(r, "max_window_layers", 0, 28, &mwl)))
            return rc;
        if (!use) window = 0;
    }
    if (window == 0) return 0;
    const st_json *lt = st_json_get(r->root, "layer_types");
    int first = is_mistral ? 0 : mwl; /* the first sliding layer; every later one slides too */
    if (lt && lt->type != ST_JSON_NULL && !is_mistral) {
        if (lt->type != ST_JSON_ARRAY || (int)lt->count != c->n_layer)
            return st_fail(ST_ECONFIG, "%s: key 'layer_types' must list one type per layer", r->src);
        first = c->n_layer;
        for (size_t i = 0; i < lt->count; i++) {
            const st_json *v = lt->items[i];
            int sl = v->type == ST_JSON_STRING && !strcmp(v->string, "sliding_attention");
            if (!sl && !(v->type == ST_JSON_STRING && !strcmp(v->string, "full_attention")))
                return st_fail(ST_ECONFIG, "%s: layer_types entry %zu is not 'full_attention' or 'sliding_attention'",
                               r->src, i);
            if (sl && first == c->n_layer) first = (int)i;
            if (!sl && first < c->n_layer)
                return st_fail(ST_ECONFIG, "%s: layer_types: full_attention layer %zu after sliding_attention layer %d "
                               "is not supported (sliding layers must be the last ones)", r->src, i, first);
        }
    }
    if (first < c->n_layer) {
        c->sliding_window = window;
        c->window_first_layer = first;
    }
    return 0;
}

static int read_llama(const reader *r, st_model_config *c) {
    static const char *const acts[] = {"silu", NULL};
    const char *act;
    int rc;
    const char *mt = c->model_type;
    int is_qwen = !strcmp(mt, "qwen2") || !strcmp(mt, "qwen3");
    /* defaults of the config classes when a key is absent (transformers 5) */
    int kv_default = !strcmp(mt, "mistral") ? 8 : is_qwen ? 32 : 0, hd_default = !strcmp(mt, "qwen3") ? 128 : 0;
    c->family = ST_FAMILY_LLAMA;
    if ((rc = get_pos_int(r, "hidden_size", 1, 0, &c->d_model)) ||
        (rc = get_pos_int(r, "intermediate_size", 1, 0, &c->d_ff)) ||
        (rc = get_pos_int(r, "num_hidden_layers", 1, 0, &c->n_layer)) ||
        (rc = get_pos_int(r, "num_attention_heads", 1, 0, &c->n_head)) ||
        (rc = get_pos_int(r, "vocab_size", 1, 0, &c->vocab)) ||
        (rc = get_pos_int(r, "max_position_embeddings", 1, 0, &c->max_seq)) ||
        (rc = get_pos_int(r, "num_key_value_heads", 0, kv_default ? kv_default : c->n_head, &c->n_kv_head)) ||
        (rc = get_pos_int(r, "head_dim", 0, hd_default, &c->head_dim)) ||
        (rc = get_pos_float(r, "rms_norm_eps", 1e-6, &c->norm_eps)) ||
        (rc = get_bool(r, "tie_word_embeddings", 0, &c->tied_embeddings)) ||
        (rc = get_choice(r, "hidden_act", acts, &act)))
        return rc;
    if (c->head_dim == 0) {
        if (c->d_model % c->n_head != 0)
            return st_fail(ST_ECONFIG, "%s: key 'num_attention_heads' = %d does not divide hidden_size = %d "
                           "(and no head_dim is given)", r->src, c->n_head, c->d_model);
        c->head_dim = c->d_model / c->n_head;
    }
    if ((rc = read_rope(r, c))) return rc;
    c->qkv_bias = 0;
    c->qk_norm = 0;
    if (!strcmp(mt, "qwen2")) {
        c->qkv_bias = 1; /* Qwen2 always has q/k/v biases (and none on o_proj) */
    } else {
        /* llama/qwen3 attention_bias adds an o_proj bias too, which the model graph does not have */
        if ((rc = refuse_if(r, "attention_bias", 1)) || (rc = refuse_if(r, "mlp_bias", 1))) return rc;
        c->qk_norm = !strcmp(mt, "qwen3");
    }
    return read_sliding(r, c);
}

/* torch_dtype (4.x) or dtype (transformers 5): the source's storage type, kept for exports. */
static int read_dtype(const reader *r, st_model_config *c) {
    static const char *const known[] = {"float32", "bfloat16", "float16", NULL};
    const char *keys[] = {"dtype", "torch_dtype"};
    c->dtype[0] = 0;
    for (int k = 0; k < 2; k++) {
        const st_json *v = st_json_get(r->root, keys[k]);
        if (!v || v->type == ST_JSON_NULL) continue;
        if (v->type != ST_JSON_STRING) return st_fail(ST_ECONFIG, "%s: key '%s' must be a string", r->src, keys[k]);
        for (int i = 0; known[i]; i++)
            if (!strcmp(v->string, known[i])) snprintf(c->dtype, sizeof c->dtype, "%s", known[i]);
        c->dtype_key = k == 0;
        return 0; /* another dtype name (float64, ...) leaves "" (exports write float32) */
    }
    return 0;
}

int st_model_config_validate(const st_model_config *c) {
    static const char *const types[] = {"gpt2", "llama", "qwen2", "mistral", "qwen3"};
    int known = -1;
    for (int i = 0; i < 5; i++)
        if (strcmp(c->model_type, types[i]) == 0) known = i;
    if (known < 0)
        return st_fail(ST_ECONFIG, "model_type '%.32s' is not supported (gpt2, llama, qwen2, qwen3, mistral)",
                       c->model_type);
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
        if ((known == 4) != (c->qk_norm != 0))
            return st_fail(ST_ECONFIG, "model config: q/k norms are %s for model_type '%s'",
                           known == 4 ? "required" : "not supported", c->model_type);
        if (c->rope.type < ST_ROPE_DEFAULT || c->rope.type > ST_ROPE_LONGROPE)
            return st_fail(ST_ECONFIG, "model config: rope type %d is unknown", c->rope.type);
        if (c->head_dim / 2 > ST_ROPE_MAX_FACTORS * 4)
            return st_fail(ST_ECONFIG, "model config: head_dim = %d is too large for RoPE", c->head_dim);
    }
    if (c->sliding_window < 0 || c->window_first_layer < 0)
        return st_fail(ST_ECONFIG, "model config: sliding_window and its first layer must be >= 0");
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
        else if (!strcmp(mt, "llama") || !strcmp(mt, "qwen2") || !strcmp(mt, "qwen3") || !strcmp(mt, "mistral"))
            rc = read_llama(&r, &c);
        else rc = st_fail(ST_ECONFIG, "%s: model_type '%s' is not supported (gpt2, llama, qwen2, qwen3, mistral)",
                          source, mt);
    }
    if (rc == 0 && ((rc = get_token_id(&r, "bos_token_id", &c.bos_id)) == 0) &&
        (rc = get_token_id(&r, "eos_token_id", &c.eos_id)) == 0)
        rc = get_token_id(&r, "pad_token_id", &c.pad_id);
    c.has_pad = c.pad_id >= 0;
    if (rc == 0) rc = read_dtype(&r, &c);
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

/* The RoPE settings in the generation config.json had them in (st_rope_format). */
static void put_rope(st_strbuf *b, const st_model_config *c) {
    static const char *const names[] = {"default", "linear", "dynamic", "yarn", "llama3", "longrope"};
    const st_rope_config *r = &c->rope;
    int params = r->format == ST_ROPE_FMT_PARAMETERS;
    if (!params) {
        st_strbuf_printf(b, "  \"rope_theta\": ");
        put_float(b, c->rope_theta);
        st_strbuf_printf(b, ",\n");
        if (r->type == ST_ROPE_DEFAULT) {
            st_strbuf_printf(b, "  \"rope_scaling\": null,\n");
            return;
        }
    }
    st_strbuf_printf(b, "  \"%s\": {\"rope_type\": \"%s\"", params ? "rope_parameters" : "rope_scaling", names[r->type]);
    if (params) {
        st_strbuf_printf(b, ", \"rope_theta\": ");
        put_float(b, c->rope_theta);
    }
    struct { const char *k; double v; } nums[] = {{"factor", r->factor}, {"low_freq_factor", r->low_freq_factor},
        {"high_freq_factor", r->high_freq_factor}, {"beta_fast", r->beta_fast}, {"beta_slow", r->beta_slow},
        {"mscale", r->mscale}, {"mscale_all_dim", r->mscale_all_dim}, {"attention_factor", r->attention_factor}};
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++)
        if (nums[i].v != 0) st_strbuf_printf(b, ", \"%s\": %.17g", nums[i].k, nums[i].v);
    if (r->original_max > 0 && !r->original_max_top)
        st_strbuf_printf(b, ", \"original_max_position_embeddings\": %d", r->original_max);
    if (r->no_truncate) st_strbuf_printf(b, ", \"truncate\": false");
    if (r->type == ST_ROPE_LONGROPE) {
        for (int k = 0; k < 2; k++) {
            const float *f = k ? r->long_factor : r->short_factor;
            st_strbuf_printf(b, ", \"%s\": [", k ? "long_factor" : "short_factor");
            for (int i = 0; i < r->n_factors; i++) {
                if (i) st_strbuf_printf(b, ", ");
                put_float(b, f[i]);
            }
            st_strbuf_printf(b, "]");
        }
    }
    st_strbuf_printf(b, "},\n");
    if (r->original_max_top) st_strbuf_printf(b, "  \"original_max_position_embeddings\": %d,\n", r->original_max);
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
                                              {"qwen3", "Qwen3ForCausalLM"}, {"mistral", "MistralForCausalLM"}};
        const char *a = "LlamaForCausalLM";
        for (int i = 0; i < 4; i++)
            if (strcmp(c->model_type, arch[i][0]) == 0) a = arch[i][1];
        st_strbuf_printf(&b, "  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n", a, c->model_type);
        st_strbuf_printf(&b, "  \"hidden_size\": %d,\n  \"intermediate_size\": %d,\n  \"num_hidden_layers\": %d,\n",
                         c->d_model, c->d_ff, c->n_layer);
        st_strbuf_printf(&b, "  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n  \"head_dim\": %d,\n",
                         c->n_head, c->n_kv_head, c->head_dim);
        st_strbuf_printf(&b, "  \"max_position_embeddings\": %d,\n  \"vocab_size\": %d,\n", c->max_seq, c->vocab);
        st_strbuf_printf(&b, "  \"rms_norm_eps\": ");
        put_float(&b, c->norm_eps);
        st_strbuf_printf(&b, ",\n");
        put_rope(&b, c);
        st_strbuf_printf(&b, "  \"hidden_act\": \"silu\",\n");
        if (strcmp(c->model_type, "qwen2") != 0)
            st_strbuf_printf(&b, "  \"attention_bias\": false,\n  \"mlp_bias\": false,\n");
        if (!strcmp(c->model_type, "qwen2") || !strcmp(c->model_type, "qwen3")) {
            if (c->sliding_window > 0)
                st_strbuf_printf(&b, "  \"use_sliding_window\": true,\n  \"sliding_window\": %d,\n"
                                 "  \"max_window_layers\": %d,\n", c->sliding_window, c->window_first_layer);
            else st_strbuf_printf(&b, "  \"use_sliding_window\": false,\n");
        }
        if (strcmp(c->model_type, "mistral") == 0) {
            if (c->sliding_window > 0) st_strbuf_printf(&b, "  \"sliding_window\": %d,\n", c->sliding_window);
            else st_strbuf_printf(&b, "  \"sliding_window\": null,\n");
        }
    }
    put_id(&b, "bos_token_id", c->bos_id);
    put_id(&b, "eos_token_id", c->eos_id);
    if (c->has_pad) put_id(&b, "pad_token_id", c->pad_id);
    st_strbuf_printf(&b, "  \"tie_word_embeddings\": %s,\n  \"%s\": \"%s\"\n}\n", c->tied_embeddings ? "true" : "false",
                     c->dtype_key ? "dtype" : "torch_dtype", c->dtype[0] ? c->dtype : "float32");
    char path[4096];
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path) rc = st_fail(ST_EINVAL, "path too long: %s", dir);
    else if (b.failed) rc = st_fail(ST_ENOMEM, "out of memory writing %s", path);
    else rc = st_write_file_atomic(path, b.data, b.len);
    st_strbuf_free(&b);
    return rc;
}
