/* model_io.h — a model directory (config.json + safetensors) to and from a st_model.
 *
 * The mapping is the registry's HF names plus transposes (GPT-2 Conv1D). Reading accepts fp32, fp16 and
 * bf16 tensors, GPT-2 names with or without the "transformer." prefix, and ignores buffers that HF files
 * sometimes carry (attn.bias / attn.masked_bias causal masks, rotary inv_freq, a duplicate tied
 * lm_head equal to the embeddings; a different one unties the model, as in transformers). Any other unknown tensor, a missing tensor or a shape mismatch is an error naming it. */
#ifndef ST_MODEL_IO_H
#define ST_MODEL_IO_H

#include <stdint.h>

#include "worker/model.h"

/* Reads DIR/config.json, builds the model on `be` and loads its weights. */
int st_model_load_dir(const char *dir, const st_backend *be, st_model *m);

/* Loads weights from an already-opened source into an already-built model (shapes must match). */
int st_model_load_weights(st_model *m, const char *dir);

/* Writes DIR/config.json (generated from m->cfg) and DIR/model.safetensors (sharded above max_shard_bytes;
 * 0 = 4 GB), the tensors in the config's source dtype (bfloat16 / float16 rounded to nearest even, else F32). */
int st_model_save_dir(const st_model *m, const char *dir, uint64_t max_shard_bytes);

/* What final/ and `shardtune export` write: st_model_save_dir, then config.json replaced by the source's own
 * text (config_text, when not NULL: it describes exactly this architecture) and the tokenizer / chat
 * template / generation files copied from src_dir (when not NULL; see st_model_copy_assets). */
int st_model_export_dir(const st_model *m, const char *dir, const char *src_dir, const char *config_text,
                        uint64_t max_shard_bytes);

/* Copies the source model directory's tokenizer.json, tokenizer_config.json, chat_template.jinja (.json),
 * special_tokens_map.json, generation_config.json, added_tokens.json, vocab.json, merges.txt and
 * tokenizer.model (those that exist) into dst_dir. */
int st_model_copy_assets(const char *src_dir, const char *dst_dir);

/* After st_model_load_dir: one line for the user when the load did something they should know about (a
 * tied config whose lm_head.weight differs from the embeddings was loaded untied), else NULL. */
const char *st_model_load_warning(void);

/* Copies the model's weights to a host buffer in HF layout for parameter i (numel floats). */
void st_model_param_to_hf(const st_model *m, int i, const float *host_weights, float *out);

#endif
