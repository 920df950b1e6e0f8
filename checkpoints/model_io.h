/* model_io.h — a model directory (config.json + safetensors) to and from a st_model.
 *
 * The mapping is the registry's HF names plus transposes (GPT-2 Conv1D). Reading accepts fp32, fp16 and
 * bf16 tensors, GPT-2 names with or without the "transformer." prefix, and ignores buffers that HF files
 * sometimes carry (attn.bias / attn.masked_bias causal masks, rotary inv_freq, a duplicate tied
 * lm_head equal to the embeddings; a different one unties the model, as in transformers). Any other unknown tensor, a missing tensor or a shape mismatch is an error naming it. */
#ifndef ST_MODEL_IO_H
#define ST_MODEL_IO_H

#include <stdint.h>

#include "checkpoints/safetensors.h"
#include "worker/model.h"

/* Reads DIR/config.json, builds the model on `be` and loads its weights. */
int st_model_load_dir(const char *dir, const st_backend *be, st_model *m);

/* Reads DIR/config.json and builds the model on `be` without loading its weights (they read as zero;
 * on the CPU backend no page of them is resident yet): st_model_load_weights_part follows. */
int st_model_open_dir(const char *dir, const st_backend *be, st_model *m);

/* Reads DIR/config.json into a registry-only model (st_model_build_registry; a tied head the files untie
 * comes untied): st_model_bind and a load follow (the QLoRA load quantizes tensor by tensor). */
int st_model_open_registry(const char *dir, st_model *m);

/* Loads weights from DIR into an already-built model (shapes must match), a tensor at a time with ranged
 * reads and per-piece dtype conversion (no whole-model host copy). */
int st_model_load_weights(st_model *m, const char *dir);

/* Opens DIR's safetensors for a model built from its config (st_model_open_dir) and checks them as a load
 * does (every tensor present with its shape, nothing unexpected); *out is the open handle (caller closes
 * it with st_safetensors_close). */
int st_model_check_files(const st_model *m, const char *dir, st_safetensors **out);
/* Parameter i of m from those files, fp32 in registry layout (numel floats; a Conv1D tensor transposed). */
int st_model_read_param(st_safetensors *s, const st_model *m, int i, float *dst);
/* Elements [a, a + n) of it (not for a transposed Conv1D tensor: ST_EINVAL). */
int st_model_read_param_range(st_safetensors *s, const st_model *m, int i, size_t a, size_t n, float *dst);
/* The dtype of parameter i's tensor in those files (ST_DTYPE_*), -1 when absent: a BF16 one's values are bf16
 * values by construction, so a load may put it into the bf16 copy only (train.c load_late, gen_run.c load_held;
 * on a device train_frozen16.c, worker/model.h st_model_bind_frozen_bf16). */
int st_model_param_dtype(const st_safetensors *s, const st_model *m, int i);
/* Elements [a, a + n) of parameter i's BF16 tensor as bf16 bits into dst (st_safetensors_read_bf16_range; not
 * for a transposed Conv1D tensor or another dtype: ST_EINVAL). */
int st_model_read_param_bf16_range(st_safetensors *s, const st_model *m, int i, size_t a, size_t n, uint16_t *dst);

/* Which elements of parameter i (registry layout, [0, numel)) this rank keeps: sets [*a, *b) (empty when
 * a >= b). */
typedef void (*st_model_keep_fn)(void *ctx, const st_model *m, int i, size_t *a, size_t *b);

/* Streaming load: like st_model_load_weights, but only the elements `keep` selects are read (ranged preads
 * of those bytes, converted from F32 / F16 / BF16 piece by piece; single or sharded safetensors), the rest
 * of m->weights is left untouched. Every tensor's presence and shape is still checked. GPT-2 Conv1D
 * tensors (stored transposed) are read whole, one at a time. keep NULL = everything. */
int st_model_load_weights_part(st_model *m, const char *dir, st_model_keep_fn keep, void *ctx);

/* Writes DIR/config.json (generated from m->cfg) and DIR/model.safetensors (sharded above max_shard_bytes;
 * 0 = 4 GB), the tensors in the config's source dtype (bfloat16 / float16 rounded to nearest even, else F32),
 * one tensor at a time (st_model_save_dir_streamed over the model's own weights). */
int st_model_save_dir(const st_model *m, const char *dir, uint64_t max_shard_bytes);

/* Parameter i's fp32 values in registry layout into dst (numel floats); dst NULL on ranks that do not
 * write (or after a failure): the call still takes part in whatever collective stands behind it. */
typedef int (*st_model_fetch_fn)(void *ctx, const st_model *m, int i, float *dst);

/* st_model_save_dir with the values coming from fetch, one parameter at a time in registry order (the
 * layout and headers come from the shapes first): the writer holds one tensor (two for a transposed one),
 * never the model. fetch is called exactly once per parameter, in order, whatever fails. dir NULL: write
 * nothing, only call fetch(.., NULL) for every parameter (the other ranks of a collective write). */
int st_model_save_dir_streamed(const st_model *m, const char *dir, uint64_t max_shard_bytes, st_model_fetch_fn fetch,
                               void *ctx);

/* What final/ and `shardtune export` write: st_model_save_dir, then config.json replaced by the source's own
 * text (config_text, when not NULL: it describes exactly this architecture) and the tokenizer / chat
 * template / generation files copied from src_dir (when not NULL; see st_model_copy_assets). */
int st_model_export_dir(const st_model *m, const char *dir, const char *src_dir, const char *config_text,
                        uint64_t max_shard_bytes);
/* The same through st_model_save_dir_streamed (dir NULL: only serve the fetches). */
int st_model_export_dir_streamed(const st_model *m, const char *dir, const char *src_dir, const char *config_text,
                                 uint64_t max_shard_bytes, st_model_fetch_fn fetch, void *ctx);

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
