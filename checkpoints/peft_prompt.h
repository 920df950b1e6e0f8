/* peft_prompt.h — PEFT prompt-tuning adapter directories (peft_type PROMPT_TUNING), as peft 0.21's
 * save_pretrained writes them: adapter_model.safetensors holding one tensor "prompt_embeddings"
 * [num_virtual_tokens, token_dim] (fp32) and a PromptTuningConfig adapter_config.json (task_type CAUSAL_LM,
 * num_virtual_tokens, token_dim, num_transformer_submodules 1, num_attention_heads, num_layers,
 * prompt_tuning_init, ...). checkpoints/peft_dir.c dispatches here for a model with a prompt (save) and
 * for a directory whose peft_type is PROMPT_TUNING (load).
 *
 * Memory: nothing is kept after a call returns; the model owns the prompt a load attaches. */
#ifndef ST_PEFT_PROMPT_H
#define ST_PEFT_PROMPT_H

#include "common/json.h"
#include "worker/model.h"

/* Writes the model's prompt to DIR (created; both files written atomically). */
int st_peft_prompt_save(const st_model *m, const char *dir, const char *base_model);

/* Attaches a prompt of the config's shape (cfg: the parsed adapter_config.json at path) and loads it
 * from DIR/adapter_model.safetensors. Errors name the file and field or tensor: another task_type, a
 * token_dim that is not the model's, num_transformer_submodules other than 1, a missing or extra tensor,
 * a shape mismatch. */
int st_peft_prompt_load(st_model *m, const st_json *cfg, const char *path, const char *dir);

#endif
