/* model_config.h — the architecture of a decoder-only model, as read from / written to config.json.
 *
 * One struct covers GPT-2 (LayerNorm, learned positions, GELU-tanh, biases, tied head) and the Llama
 * family (RMSNorm, RoPE, SwiGLU, GQA; Qwen2 adds q/k/v biases; Qwen3 adds per-head q/k RMSNorm;
 * Mistral is Llama-shaped). Plain data: zero-filled fields mean "absent / default" everywhere. */
#ifndef ST_MODEL_CONFIG_H
#define ST_MODEL_CONFIG_H

typedef enum { ST_FAMILY_GPT2 = 0, ST_FAMILY_LLAMA = 1 } st_family;

/* RoPE variants, as transformers' modeling_rope_utils names them (rope_type). */
typedef enum {
    ST_ROPE_DEFAULT = 0,
    ST_ROPE_LINEAR,
    ST_ROPE_DYNAMIC,
    ST_ROPE_YARN,
    ST_ROPE_LLAMA3,
    ST_ROPE_LONGROPE,
} st_rope_type;

/* How config.json spelled the RoPE settings, so an export writes them back the same way. */
typedef enum {
    ST_ROPE_FMT_LEGACY = 0, /* top-level rope_theta (+ rope_scaling when not default): transformers 4.x */
    ST_ROPE_FMT_PARAMETERS, /* rope_parameters {rope_theta, rope_type, ...}: transformers 5 */
} st_rope_format;

#define ST_ROPE_MAX_FACTORS 256 /* longrope short/long factors: head_dim / 2 each */

/* Parameters of the RoPE variant (st_model_rope_tables in worker/model.h computes the tables). A 0 means
 * "absent" for the optional ones; the builder applies transformers' defaults. */
typedef struct {
    int type;               /* st_rope_type */
    int format;             /* st_rope_format */
    double factor;          /* linear, dynamic, yarn, llama3, longrope (yarn/longrope: 0 = derived) */
    int original_max;       /* original_max_position_embeddings (yarn, llama3, longrope) */
    int original_max_top;   /* longrope/Phi-3 style: original_max_position_embeddings was a top-level key */
    double low_freq_factor, high_freq_factor; /* llama3 */
    double beta_fast, beta_slow;              /* yarn (0 = 32 / 1) */
    double mscale, mscale_all_dim;            /* yarn (0 = absent) */
    double attention_factor;                  /* yarn, longrope (0 = derived from factor) */
    int no_truncate;                          /* yarn: "truncate": false */
    int n_factors;                            /* longrope: entries of short_factor and long_factor */
    float short_factor[ST_ROPE_MAX_FACTORS], long_factor[ST_ROPE_MAX_FACTORS];
} st_rope_config;

typedef struct {
    st_family family;
    char model_type[32]; /* HF model_type: "gpt2", "llama", "qwen2", "mistral" */
    int n_layer;
    int d_model;   /* hidden size C */
    int n_head;    /* query heads H */
    int n_kv_head; /* key/value heads KVH (== n_head for GPT-2) */
    int head_dim;  /* C / H unless config.json says otherwise */
    int d_ff;      /* MLP inner size (GPT-2: n_inner or 4*C) */
    int vocab;
    int max_seq;   /* n_positions / max_position_embeddings */
    float norm_eps;
    float rope_theta;    /* Llama family only */
    st_rope_config rope; /* Llama family only: the RoPE variant (type 0 = default) */
    int qk_norm;         /* Qwen3: RMSNorm over head_dim of every q and k head, before RoPE */
    int sliding_window;  /* window of the layers that slide (Mistral; Qwen2/3 with use_sliding_window), 0 =
                          * none: layers >= window_first_layer attend to the keys j with i - j < window */
    int window_first_layer; /* Mistral: 0; Qwen2/3: max_window_layers (or the first sliding layer_types) */
    int has_pad, pad_id; /* pad_token_id when has_pad (kept for exports) */
    char dtype[16];      /* the source's torch_dtype / dtype ("float32", "bfloat16", "float16"; "" = float32) */
    int dtype_key;       /* 0: written as "torch_dtype" (4.x), 1: "dtype" (transformers 5) */
    int tied_embeddings; /* lm_head shares wte */
    int qkv_bias;        /* q/k/v projections have biases (GPT-2, Qwen2) */
    int bos_id, eos_id;  /* -1 when unknown */
} st_model_config;

#endif
