/* peft_prompt.h — PEFT prompt-learning adapter directories as peft 0.21's save_pretrained writes them:
 * adapter_model.safetensors holding one tensor "prompt_embeddings" (fp32) and adapter_config.json:
 *   PROMPT_TUNING  [num_virtual_tokens, token_dim]: PromptTuningConfig (prompt_tuning_init, ...);
 *   P_TUNING       [V, token_dim], the prompt encoder's output: PromptEncoderConfig
 *                  (encoder_reparameterization_type MLP | LSTM, encoder_hidden_size = token_dim, ...);
 *   PREFIX_TUNING  [V, num_layers * 2 * token_dim], token_dim = KVH * head_dim, num_attention_heads = KVH
 *                  (peft's grouped-query rule): PrefixTuningConfig (prefix_projection, ...).
 * All share task_type CAUSAL_LM and num_transformer_submodules 1. peft loads each as a plain table in
 * inference mode, and so does st_peft_prompt_load; a P_TUNING or PREFIX_TUNING directory that instead
 * holds the encoder's own tensors (prompt_encoder.*, worker/prompt.h's registry names) loads the encoder
 * (the reference tests check its gradients that way). checkpoints/peft_dir.c dispatches here for a model
 * with a prompt (save) and for a directory of one of these peft_types (load).
 *
 * Memory: nothing is kept after a call returns; the model owns the prompt a load attaches. */
#ifndef ST_PEFT_PROMPT_H
#define ST_PEFT_PROMPT_H

#include "common/json.h"
#include "worker/model.h"

/* Writes the model's prompt (an encoder's output) to DIR (created; both files written atomically). */
int st_peft_prompt_save(const st_model *m, const char *dir, const char *base_model);

/* Attaches a prompt of the config's shape (cfg: the parsed adapter_config.json at path) and loads it
 * from DIR/adapter_model.safetensors. Errors name the file and field or tensor: another task_type, a
 * token_dim that is not the model's, num_transformer_submodules other than 1, a missing or extra tensor,
 * a shape mismatch. */
int st_peft_prompt_load(st_model *m, const st_json *cfg, const char *path, const char *dir);

#endif
