/* model_io.h — a model directory (config.json + safetensors) to and from a st_model.
 *
 * The mapping is the registry's HF names plus transposes (GPT-2 Conv1D). Reading accepts fp32, fp16 and
 * bf16 tensors, GPT-2 names with or without the "transformer." prefix, and ignores buffers that HF files
 * sometimes carry (attn.bias / attn.masked_bias causal masks, rotary inv_freq, a duplicate tied
 * lm_head). Any other unknown tensor, a missing tensor or a shape mismatch is an error naming it. */
#ifndef ST_MODEL_IO_H
#define ST_MODEL_IO_H

#include <stdint.h>

#include "worker/model.h"

/* Reads DIR/config.json, builds the model on `be` and loads its weights. */
int st_model_load_dir(const char *dir, const st_backend *be, st_model *m);

/* Loads weights from an already-opened source into an already-built model (shapes must match). */
int st_model_load_weights(st_model *m, const char *dir);

/* Writes DIR/config.json and DIR/model.safetensors (sharded above max_shard_bytes; 0 = 4 GB). */
int st_model_save_dir(const st_model *m, const char *dir, uint64_t max_shard_bytes);

/* Copies the model's weights to a host buffer in HF layout for parameter i (numel floats). */
void st_model_param_to_hf(const st_model *m, int i, const float *host_weights, float *out);

#endif
