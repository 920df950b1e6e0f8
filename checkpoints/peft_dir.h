/* peft_dir.h — Hugging Face PEFT adapter directories (adapter_config.json + adapter_model.safetensors).
 *
 * The layout is what the `peft` library's save_pretrained writes for a LoRA adapter: tensor names
 * base_model.model.<module path>.lora_A.weight [r, in] and .lora_B.weight [out, r] (fp32; DoRA adds
 * .lora_magnitude_vector [out]), and a
 * LoraConfig JSON (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, use_rslora, use_dora,
 * layers_to_transform, fan_in_fan_out for GPT-2's Conv1D, ...). docs/finetune.md lists the fields.
 *
 * Memory: nothing is kept after a call returns; the model owns the adapters a load attaches. */
#ifndef ST_PEFT_DIR_H
#define ST_PEFT_DIR_H

#include "worker/model.h"

/* Writes the model's LoRA adapters to DIR (created; both files written atomically). base_model is
 * recorded as base_model_name_or_path (may be NULL). Host copy of the adapters only. */
int st_peft_save_dir(const st_model *m, const char *dir, const char *base_model);

/* Reads DIR/adapter_config.json, attaches adapters of that shape to a base model (worker/lora.h) and
 * loads their weights from DIR/adapter_model.safetensors. Errors name the file and the field or tensor:
 * another peft_type, a regex target_modules, a target the model has not, a missing or extra
 * tensor, a shape mismatch. */
int st_peft_load_dir(st_model *m, const char *dir);

#endif
