"""test_prompt_torch.py — prompt tuning (worker/prompt.c, checkpoints/peft_prompt.c) against the float64
PyTorch reference of tests/reference/torch_model.py (RefModel.prompt: the [V, C] prompt peft's
PeftModelForCausalLM concatenates in front of the token embeddings, positions 0..V+T-1, labels -100 on
the virtual rows).

A prompt-tuning adapter directory is written here from numpy as peft 0.21 saves one (adapter_config.json
with peft_type PROMPT_TUNING, adapter_model.safetensors with prompt_embeddings [V, C]); models: Llama GQA
(RoPE positions) and GPT-2 (learned positions: wpe[0..V-1] on the prompt rows, the real tokens' positions
start at V). T = 128 with q/k scaled x4 so attention is sharp: a prompt on the wrong positions, a missed
wpe, or real tokens not attending to the prompt are O(1) errors.

 1. tests/tools/ref_model --adapter: loss, logits of every row (virtual rows first) and the prompt's
    gradient against torch autograd; no base-weight gradient is dumped. Tolerance as test_lora_torch.py:
    max(1e-5, 4 x the error of the same torch model in float32).
 2. Refusals, one line each: num_virtual_tokens 0, a token_dim that is not the model's, a
    num_transformer_submodules of 2, an extra tensor, a prompt of the wrong shape, task_type SEQ_2_SEQ_LM.
Env (set by ctest): ST_BUILD_DIR."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from test_lora_torch import GPT2, LLAMA, check, failures, rel_err, run, run_ref, sharp_weights  # noqa: E402
from torch_model import RefModel, parse_config, weighted_ce  # noqa: E402

T, B, NV = 128, 2, 7


def write_prompt_adapter(d, c, V, rng, **over):
    os.makedirs(d, exist_ok=True)
    prompt = over.pop("tensor", rng.normal(0, 1.0, (V, c["d_model"])).astype(np.float32))
    tensors = {"prompt_embeddings": prompt}
    tensors.update(over.pop("extra", {}))
    st_io.write(os.path.join(d, "adapter_model.safetensors"), tensors)
    cfg = dict(peft_type="PROMPT_TUNING", task_type="CAUSAL_LM", num_virtual_tokens=V, token_dim=c["d_model"],
               num_transformer_submodules=1, num_attention_heads=c["n_head"], num_layers=c["n_layer"],
               prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
               inference_mode=True, base_model_name_or_path=None)
    cfg.update(over)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return prompt


def make_model(tmp, name, config, rng):
    c = parse_config(config)
    mdir = os.path.join(tmp, name)
    os.makedirs(mdir)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(config, f)
    st_io.write(os.path.join(mdir, "model.safetensors"), sharp_weights(c, rng))
    return c, mdir


def case(tmp, name, config, rng):
    print(name)
    c, mdir = make_model(tmp, name, config, rng)
    adir = os.path.join(tmp, name + "_adapter")
    prompt = write_prompt_adapter(adir, c, NV, rng)
    V = c["vocab"]
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    w = np.where(rng.random((B, T)) >= 0.3, 1.0, 0.0)
    w = (w / w.sum()).astype(np.float32)
    batch = os.path.join(tmp, name + "_batch.safetensors")
    st_io.write(batch, {"inputs": inputs, "targets": targets, "weight": w})
    ours = run_ref(mdir, batch, os.path.join(tmp, name + "_out.safetensors"), adir)

    def torch_run(dtype):
        ref = RefModel.load(mdir, dtype)
        ref.prompt = torch.tensor(prompt, dtype=dtype).requires_grad_(True)
        logits = ref.logits(torch.from_numpy(inputs).long())  # [B, NV + T, V]
        # peft: labels -100 on the virtual rows; the real rows keep the batch's (target, weight) pairs
        pad_t = np.concatenate([np.zeros((B, NV), np.int64), targets], axis=1)
        pad_w = np.concatenate([np.zeros((B, NV), np.float32), w], axis=1)
        loss, _ = weighted_ce(logits, torch.from_numpy(pad_t), torch.from_numpy(pad_w).to(dtype))
        loss.backward()
        return ref, logits.detach().numpy().reshape(-1, V), loss.item()

    ref, logits, loss = torch_run(torch.float64)
    r32, logits32, loss32 = torch_run(torch.float32)
    tol = lambda e32: max(1e-5, 4.0 * e32)  # noqa: E731
    e, e32 = abs(float(ours["loss"][0]) - loss) / abs(loss), abs(loss32 - loss) / abs(loss)
    check(f"{name} loss", e <= tol(e32), f"ours {float(ours['loss'][0]):.8f} torch {loss:.8f} rel {e:.2e} (fp32 {e32:.2e})")
    e, e32 = rel_err(ours["logits"], logits), rel_err(logits32, logits)
    check(f"{name} logits [B*(V+T), vocab]", e <= tol(e32), f"rel {e:.2e} (torch fp32 {e32:.2e})")
    grads = [k for k in ours if k.startswith("grad.")]
    check(f"{name} only the prompt has a gradient", grads == ["grad.prompt_embeddings"], f"{grads[:4]}")
    if "grad.prompt_embeddings" in ours:
        e, e32 = rel_err(ours["grad.prompt_embeddings"], ref.prompt.grad.numpy()), rel_err(r32.prompt.grad.numpy(),
                                                                                          ref.prompt.grad.numpy())
        check(f"{name} prompt gradient", e <= tol(e32), f"rel {e:.2e} (torch fp32 {e32:.2e})")
    # the prompt matters: a zero prompt gives another loss
    ref0 = RefModel.load(mdir, torch.float64)
    ref0.prompt = torch.zeros(NV, c["d_model"], dtype=torch.float64)
    pad_t = torch.from_numpy(np.concatenate([np.zeros((B, NV), np.int64), targets], axis=1))
    pad_w = torch.from_numpy(np.concatenate([np.zeros((B, NV)), w], axis=1))
    l0 = weighted_ce(ref0.logits(torch.from_numpy(inputs).long()), pad_t, pad_w)[0].item()
    check(f"{name} the prompt changes the loss", abs(l0 - loss) > 1e-3 * abs(loss), f"{l0:.6f} vs {loss:.6f}")
    return c, mdir, batch


def refusals(tmp, c, mdir, batch, rng):
    print("refusals")
    cases = [
        ("num_virtual_tokens 0", dict(num_virtual_tokens=0, tensor=np.zeros((1, c["d_model"]), np.float32)),
         "num_virtual_tokens"),
        ("token_dim", dict(token_dim=c["d_model"] + 1), "token_dim"),
        ("submodules", dict(num_transformer_submodules=2), "num_transformer_submodules"),
        ("extra tensor", dict(extra={"prompt_encoder.x": np.zeros(3, np.float32)}), "prompt_encoder.x"),
        ("wrong shape", dict(tensor=np.zeros((NV + 1, c["d_model"]), np.float32)), "prompt_embeddings has shape"),
        ("task_type", dict(task_type="SEQ_2_SEQ_LM"), "task_type"),
    ]
    for what, over, needle in cases:
        d = os.path.join(tmp, "bad_" + what.replace(" ", "_"))
        write_prompt_adapter(d, c, NV, rng, **over)
        r = run([os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "ref_model"), "--model", mdir, "--batch",
                 batch, "--out", os.path.join(tmp, "bad.safetensors"), "--adapter", d], check_rc=False)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        check(f"refuses {what}", r.returncode != 0 and len(lines) == 1 and needle in lines[0], repr(r.stderr.strip()))


def main():
    rng = np.random.default_rng(11)
    with tempfile.TemporaryDirectory() as tmp:
        c, mdir, batch = case(tmp, "llama_prompt", LLAMA, rng)
        case(tmp, "gpt2_prompt", GPT2, rng)
        refusals(tmp, c, mdir, batch, rng)
    if failures:
        print("FAILED:", failures)
        sys.exit(1)
    print("all ok")


if __name__ == "__main__":
    main()
