/* model_dir.h — Hugging Face config.json <-> st_model_config, for the model directory
 * (config.json + model.safetensors or shards; see docs/model-format.md).
 *
 * Reads GPT-2 (model_type "gpt2") and the Llama family ("llama", "qwen2", "qwen3", "mistral"), with RoPE
 * settings of both transformers generations (rope_parameters, or rope_theta + rope_scaling) and sliding
 * windows, rejecting with one clear line naming the key any setting shardtune cannot reproduce exactly
 * (an unknown rope_type or rope key, biased llama attention, other activations, ...). Writes an
 * HF-compatible config.json that transformers loads, RoPE keys in the source's generation.
 * No allocations are handed to the caller. */
#ifndef ST_MODEL_DIR_H
#define ST_MODEL_DIR_H

#include <stddef.h>

#include "worker/model_config.h"

/* Reads DIR/config.json (or `dir` itself when it names a .json file). Returns 0, ST_EIO, ST_EFORMAT
 * (not JSON) or ST_ECONFIG ("config.json: key 'n_head' ...") and leaves *cfg filled only on success. */
int st_model_config_read(const char *dir, st_model_config *cfg);

/* Same, from JSON text already in memory; `source` names it in messages. */
int st_model_config_parse(const char *text, size_t len, const char *source, st_model_config *cfg);

/* Checks a config for internal consistency (positive sizes, heads divide, family-specific rules). */
int st_model_config_validate(const st_model_config *cfg);

/* Writes DIR/config.json atomically (DIR is created if needed). The dtype key and value are the source's
 * (torch_dtype "float32" when unknown); exports of a source directory write its own text instead
 * (st_model_export_dir in model_io.h). */
int st_model_config_write(const char *dir, const st_model_config *cfg);

#endif
