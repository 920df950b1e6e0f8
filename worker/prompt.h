/* prompt.h — prompt learning: prompt tuning (finetune.mode: prompt_tuning), P-tuning (p_tuning) and prefix
 * tuning (prefix_tuning), each as peft applies it. Prompt tuning: V trainable virtual token embeddings
 * prepended to every sequence, as peft's PromptEmbedding / PeftModelForCausalLM apply them.
 *
 * peft concatenates the prompt [V, C] in front of the token embeddings and passes no position_ids, so
 * the model sees one sequence of V + T positions: Llama's RoPE positions and GPT-2's learned positions
 * (wpe[0..V-1] added to the prompt rows) run 0..V+T-1, every real token attends to the whole prompt
 * (causal mask over the concatenation), and the virtual positions carry label -100. Here the model is
 * allocated with T + V positions (st_model_alloc_activations adds V); st_model_forward takes the caller's
 * [B, T] inputs/targets/weights and widens them (virtual rows: token 0, weight 0), then overwrites the
 * virtual rows of the embedding output with the prompt. Backward takes the prompt's gradient from the
 * residual gradient of those rows; no base weight trains. loss_per_pos holds the caller's [B, T] real
 * positions (the first B x T floats); capture_logits is B x (V + T) rows, the prompt rows first in each
 * sequence.
 *
 * The prompt is one registry entry "prompt_embeddings" [V, C] (kind ST_MOD_PROMPT, layer -1) appended
 * after the base parameters with its floats appended to the weight buffer, so gradients, the ZeRO shard
 * map, optimizer and checkpoints treat it as any trainable tensor (module mask ST_MOD_PROMPT).
 *
 * Memory: st_prompt_attach allocates the table (owned by the model, freed through st_prompt_free by
 * st_model_free) and the widened host batch buffers (st_prompt_reserve). */
#ifndef ST_PROMPT_H
#define ST_PROMPT_H

#include <stdint.h>

#include "worker/model.h"

typedef struct st_prompt st_prompt;

/* Appends the prompt [V, C] initialized as peft's RANDOM init (torch.nn.Embedding: N(0, 1)) from seed.
 * Must precede st_model_set_trainable, st_model_alloc_activations and st_model_set_precision (under bf16 the
 * prompt and encoders stay fp32 and compute in fp32; the bf16 copy covers them). ST_EINVAL: bf16 weights
 * already set, adapters already attached; ST_ECONFIG: V < 1, a non-host backend. */
int st_prompt_attach(st_model *m, int virtual_tokens, uint64_t seed);
void st_prompt_free(st_prompt *p);

/* Prefix tuning (finetune.mode: prefix_tuning): the same widened sequence, but the table is
 * prompt_embeddings [V, L*2*KVH*hd] (peft's PrefixEncoder without projection, viewed [V, L*2, KVH, hd]:
 * row 2l the keys, 2l+1 the values of layer l) and the virtual rows carry no prompt: in every layer
 * st_prefix_layer_forward overwrites the virtual rows' keys and values (after RoPE / qk-norm, as peft's
 * past_key_values enter the cache) with layer l's prefix. The real tokens then sit at positions V..V+T-1
 * and attend to every prefix row, exactly as transformers runs a V-long past_key_values cache with the
 * attention mask peft widens by V ones. st_prefix_layer_backward takes the prefix gradient from the
 * attention's dqkv and zeroes those slices (the virtual rows' own residual stream gets no gradient).
 * Init: N(0, 1) (torch.nn.Embedding), from seed. With projection (peft's prefix_projection): the table is
 * the output of an encoder like P-tuning's (below): prompt_encoder.embedding.weight [V, D] (D = KVH*hd),
 * prompt_encoder.transform.0 (Linear D -> D), Tanh, prompt_encoder.transform.2 (Linear D -> L*2*D). */
int st_prefix_attach(st_model *m, int virtual_tokens, int projection, uint64_t seed);
int st_prompt_is_prefix(const st_model *m);
int st_prefix_width(const st_model_config *c); /* L * 2 * KVH * hd */
void st_prefix_layer_forward(st_model *m, int l, float *qkv);
void st_prefix_layer_backward(st_model *m, int l, float *dqkv);

/* P-tuning (finetune.mode: p_tuning, encoder mlp): peft's PromptEncoder with its MLP head. The registry
 * holds 7 entries from st_prompt_param on: prompt_encoder.embedding.weight [V, C] and
 * prompt_encoder.mlp_head.{0,2,4}.{weight,bias} (Linear C->H, ReLU, Linear H->H, ReLU, Linear H->C, H = C,
 * peft's default encoder_hidden_size = token_dim). Every forward computes the table [V, C] from them
 * (st_prompt_encode) and uses it as prompt tuning uses prompt_embeddings; backward runs the MLP's backward.
 * peft saves (and loads, in inference mode) the encoder's output as prompt_embeddings: a P_TUNING adapter
 * directory loads as a plain prompt table. */
int st_ptuning_attach(st_model *m, int virtual_tokens, int lstm, uint64_t seed);
/* encoder lstm: prompt_encoder.embedding.weight, the 16 prompt_encoder.lstm_head.* tensors of a 2-layer
 * bidirectional torch.nn.LSTM (worker/prompt_lstm.h), then prompt_encoder.mlp_head.{0,2}.{weight,bias}
 * (Linear 2H -> 2H, ReLU, Linear 2H -> C), as peft's PromptEncoder with encoder_reparameterization_type
 * LSTM builds it (21 registry entries). */
int st_prompt_is_lstm(const st_model *m);
int st_prompt_is_ptuning(const st_model *m);
void st_prompt_encode(const st_model *m, float *out); /* the encoder's output [V, width] into host memory
                                                          (a device backend: through the encoder's table) */
int st_prompt_has_encoder(const st_model *m);         /* P-tuning or prefix projection */
int st_prompt_table_width(const st_model *m);         /* C, or L*2*KVH*hd for a prefix */

/* Registry entries of the prompt from st_prompt_param (1; 7 with a P-tuning MLP encoder, 21 with its LSTM
 * encoder, 5 with a prefix projection). */
int st_prompt_param_count(const st_model *m);

/* Number of virtual tokens (0 without a prompt). */
int st_prompt_tokens(const st_model *m);

/* Registry index of prompt_embeddings, -1 without a prompt. */
int st_prompt_param(const st_model *m);

/* TEXT init: the prompt's rows are the embeddings of ids[0..n-1] repeated to V rows (peft's
 * PromptTuningInit.TEXT: the ids repeated then truncated to V). text and tokenizer_dir are kept for the
 * adapter config (prompt_tuning_init_text, tokenizer_name_or_path). */
int st_prompt_init_ids(st_model *m, const int32_t *ids, int n, const char *text, const char *tokenizer_dir);

/* The TEXT init's text and tokenizer directory (NULL for RANDOM init). */
const char *st_prompt_init_text(const st_model *m);
const char *st_prompt_tokenizer_dir(const st_model *m);

/* Sizes the widened batch buffers for B sequences of T real tokens (st_model_alloc_activations). */
int st_prompt_reserve(st_model *m, int B, int T);

/* Widens the caller's [B, T] batch into [B, V + T]; the returned pointers stay owned by the table. */
void st_prompt_widen(st_model *m, const int32_t *in, const int32_t *tg, const float *w, const int32_t **in_out,
                     const int32_t **tg_out, const float **w_out);

/* Overwrites the virtual rows of the embedding output x [B*(V+T), C] with the prompt (+ wpe for GPT-2). */
void st_prompt_forward(st_model *m, float *x);

/* Accumulates the prompt's gradient from the residual gradient dx [B*(V+T), C] of the embedding output. */
void st_prompt_backward(st_model *m, const float *dx);

/* Compacts a [B, V + T] per-position array in place to the real positions [B, T] (the first B x T). */
void st_prompt_real_rows(const st_model *m, float *x);

#endif
