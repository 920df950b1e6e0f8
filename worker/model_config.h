/* model_config.h — the architecture of a decoder-only model, as read from / written to config.json.
 *
 * One struct covers GPT-2 (LayerNorm, learned positions, GELU-tanh, biases, tied head) and the Llama
 * family (RMSNorm, RoPE, SwiGLU, GQA; Qwen2 adds q/k/v biases; Mistral is Llama-shaped). Plain data. */
#ifndef ST_MODEL_CONFIG_H
#define ST_MODEL_CONFIG_H

typedef enum { ST_FAMILY_GPT2 = 0, ST_FAMILY_LLAMA = 1 } st_family;

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
    int tied_embeddings; /* lm_head shares wte */
    int qkv_bias;        /* q/k/v projections have biases (GPT-2, Qwen2) */
    int bos_id, eos_id;  /* -1 when unknown */
} st_model_config;

#endif
