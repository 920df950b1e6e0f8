"""Prompt-tuning training across ranks (finetune.mode: prompt_tuning), with real MPI ranks (mpirun,
OMP_NUM_THREADS=1). The arithmetic of the prompt (positions, attention over it, its gradient) is checked
against torch in test_prompt_torch.py; here, for a Llama and a GPT-2 model:
  * the same global batch of 12 sequences split as 1 rank ZeRO-0, 2 ranks ZeRO-1 and 2 ranks x 2
    micro-batches ZeRO-2 gives per-step losses within 1e-6 relative and final prompts within lr/10
    (as test_lora_train.py argues);
  * RUN_DIR/final/ is a peft prompt-tuning adapter directory: one tensor prompt_embeddings [V, C] and
    adapter_config.json's PromptTuningConfig fields (peft_type PROMPT_TUNING, task_type CAUSAL_LM,
    num_virtual_tokens, token_dim, num_transformer_submodules 1, num_layers, num_attention_heads);
  * checkpoints hold the prompt only (/model/prompt_embeddings, its AdamW moments) and the base's checksum;
    `export CKPT --format peft` equals final/ bit for bit; `export CKPT --merge` is refused (one line);
  * resume at another world size: 3 steps on 2 ranks then 1 rank to 6 equals 6 uninterrupted steps;
  * `eval --adapter final` runs and differs from the base model's eval;
  * prefix_tuning (Llama, with and without projection) and p_tuning (GPT-2 MLP encoder, Llama LSTM encoder): 1 rank vs 2 ranks x 2 micro-batches ZeRO-2,
    final/ (PREFIX_TUNING [V, L*2*KVH*hd] / P_TUNING [V, C]), checkpoints holding the prefix or the encoder's
    7 tensors, export --format peft == final/, resume 2 -> 1 rank (their arithmetic against the real peft:
    peft_adapters.py);
  * refusals with one line: virtual_tokens 0, p_tuning with init_text, distill.teacher (every prompt
    mode trains under sharding.stage 3: tests/reference/test_zero3.py) (TEXT init: ref_prompt_text_init.py;
    precision bf16: test_peft_modes_bf16.py).
"""
import json
import os
import shutil
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from test_lora_train import SPLITS, run_split  # noqa: E402

TOL, LR, NV = 1e-6, 1e-1, 5


def job_text(v):
    return ("finetune: { mode: prompt_tuning, prompt: { virtual_tokens: %d } }\n" % v +
            "train: { steps: 6, micro_batch: 12, grad_accum: 1, seq_len: 16, lr: 1.0e-1, warmup_steps: 0, "
            "schedule: constant, weight_decay: 0.0, grad_clip: 1.0, log_every: 100 }\n")


def make_job(base, model, data):
    os.makedirs(base)
    job = dp.write_job(os.path.join(base, "job.yaml"), model, os.path.join(base, "run"),
                       [{"name": "a", "path": data}], job_text(NV))
    text = [l for l in open(job).read().splitlines() if not (l.startswith("train:") and "lr: 3.0e-3" in l)]
    open(job, "w").write("\n".join(text) + "\n")
    return job


def check_case(root, name, model, data):
    base = os.path.join(root, name)
    job = make_job(base, model, data)
    cfg = json.load(open(os.path.join(model, "config.json")))
    C = cfg.get("hidden_size") or cfg.get("n_embd")
    ref = ref_w = None
    for split in SPLITS:
        rd = os.path.join(base, "r%dx%dx%dz%d" % split)
        got = run_split(job, rd, split)
        w = dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))
        if ref is None:
            ref, ref_w = got, w
            # no "loss goes down" check: on a random-init base (near-uniform outputs) a 5-token prompt moves
            # the loss less than the batch-to-batch noise; its gradient is test_prompt_torch.py's check
            shapes = {k: tuple(v.shape) for k, v in w.items()}
            assert shapes == {"prompt_embeddings": (NV, C)}, f"{name}: adapter tensors {shapes}"
            ac = json.load(open(os.path.join(rd, "final", "adapter_config.json")))
            exp = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": NV, "token_dim": C,
                   "num_transformer_submodules": 1, "num_layers": cfg.get("num_hidden_layers") or cfg.get("n_layer"),
                   "num_attention_heads": cfg.get("num_attention_heads") or cfg.get("n_head"),
                   "prompt_tuning_init": "RANDOM"}
            for k, v in exp.items():
                assert ac.get(k) == v, f"{name}: adapter_config.json {k} = {ac.get(k)!r}, want {v!r}"
            ck = os.path.join(rd, "checkpoints")
            last = sorted(f for f in os.listdir(ck) if f.endswith(".h5"))[-1]
            with h5py.File(os.path.join(ck, last), "r") as f:
                assert set(f["model"].keys()) == {"prompt_embeddings"}, f"{name}: /model holds {list(f['model'])}"
                assert set(f["optim"].keys()) == {"prompt_embeddings"}, f"{name}: /optim holds {list(f['optim'])}"
                assert "adapter_base_checksum" in f.attrs, f"{name}: no adapter_base_checksum"
            dp.sh([dp.BIN, "export", ck, "--format", "peft", "--out", os.path.join(rd, "x_peft")])
            x = dp.read_safetensors(os.path.join(rd, "x_peft", "adapter_model.safetensors"))
            assert set(x) == set(w) and np.array_equal(x["prompt_embeddings"], w["prompt_embeddings"]), \
                f"{name}: export --format peft differs from final/"
            r = dp.sh([dp.BIN, "export", ck, "--merge", "--out", os.path.join(rd, "x_m")], check=False)
            assert r.returncode != 0 and "prompt-tuning adapter cannot be merged" in r.stderr, r.stderr
            print(f"  {name}: final/ as peft writes it, prompt-only checkpoint, losses {got[0]:.4f} -> {got[-1]:.4f}")
            continue
        worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
        wdiff = float(np.max(np.abs(ref_w["prompt_embeddings"].astype(np.float64) - w["prompt_embeddings"])))
        assert worst <= TOL, f"{name} {split}: losses differ by {worst:.3g}\n ref {ref}\n got {got}"
        assert wdiff <= 0.1 * LR, f"{name} {split}: prompts differ by {wdiff:.3g}"
        print(f"  {name} %d rank(s) x micro %d x accum %d ZeRO-%d: loss diff {worst:.2e}, prompt diff {wdiff:.2e}" % split)
    return job, ref, ref_w


ENCODER = {"prompt_encoder.embedding.weight", "prompt_encoder.mlp_head.0.weight", "prompt_encoder.mlp_head.0.bias",
           "prompt_encoder.mlp_head.2.weight", "prompt_encoder.mlp_head.2.bias", "prompt_encoder.mlp_head.4.weight",
           "prompt_encoder.mlp_head.4.bias"}


def other_mode(root, name, model, data, finetune, ptype, width, ckpt_keys):
    """prefix_tuning / p_tuning: 1 rank ZeRO-0 vs 2 ranks x 2 micro-batches ZeRO-2 (losses 1e-6, final/ lr/10),
    final/ = one prompt_embeddings [V, width] with peft_type ptype, checkpoints hold ckpt_keys (the prefix,
    or the P-tuning encoder's 7 tensors), export --format peft equals final/, and a resume 2 -> 1 rank at
    step 3 equals the uninterrupted run."""
    base = os.path.join(root, name)
    os.makedirs(base)
    job = dp.write_job(os.path.join(base, "job.yaml"), model, os.path.join(base, "run"), [{"name": "a", "path": data}],
                       job_text(NV).replace("{ mode: prompt_tuning, prompt: { virtual_tokens: %d } }" % NV, finetune))
    text = [l for l in open(job).read().splitlines() if not (l.startswith("train:") and "lr: 3.0e-3" in l)]
    open(job, "w").write("\n".join(text) + "\n")
    runs = []
    for split in (SPLITS[0], SPLITS[2]):
        rd = os.path.join(base, "r%dx%dx%dz%d" % split)
        runs.append((run_split(job, rd, split), dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors")), rd))
    (l1, w1, rd1), (l2, w2, _) = runs
    worst = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
    wdiff = float(np.max(np.abs(w1["prompt_embeddings"].astype(np.float64) - w2["prompt_embeddings"])))
    assert worst <= TOL and wdiff <= 0.1 * LR, f"{name}: 1 vs 2 ranks: loss diff {worst:.3g}, final diff {wdiff:.3g}"
    assert {k: v.shape for k, v in w1.items()} == {"prompt_embeddings": (NV, width)}, f"{name}: final/ {list(w1)}"
    ac = json.load(open(os.path.join(rd1, "final", "adapter_config.json")))
    assert ac["peft_type"] == ptype and ac["num_virtual_tokens"] == NV, f"{name}: adapter_config.json {ac}"
    ck = os.path.join(rd1, "checkpoints")
    last = sorted(f for f in os.listdir(ck) if f.endswith(".h5"))[-1]
    with h5py.File(os.path.join(ck, last), "r") as f:
        assert set(f["model"].keys()) == ckpt_keys and set(f["optim"].keys()) == ckpt_keys, f"{name}: {list(f['model'])}"
    dp.sh([dp.BIN, "export", ck, "--format", "peft", "--out", os.path.join(rd1, "x_peft")])
    x = dp.read_safetensors(os.path.join(rd1, "x_peft", "adapter_model.safetensors"))
    assert np.array_equal(x["prompt_embeddings"], w1["prompt_embeddings"]), f"{name}: export --format peft != final/"
    rd = os.path.join(base, "resume")
    run_split(job, rd, (2, 6, 1, 2), steps=3, more=["checkpoint.every_steps=3"])
    got = run_split(job, rd, (1, 12, 1, 0), steps=6, more=["resume=auto"])
    rworst = max(abs(a - b) / abs(a) for a, b in zip(l1, got))
    assert len(got) == 6 and rworst <= TOL, f"{name}: resume loss diff {rworst:.3g}"
    print(f"  {name}: 1 vs 2 ranks {worst:.2e} (final {wdiff:.2e}), resume 2 -> 1 {rworst:.2e}, final/ {ptype}, "
          f"checkpoint {len(ckpt_keys)} tensor(s), losses {l1[0]:.4f} -> {l1[-1]:.4f}")


def resume_case(root, job, ref, ref_w):
    rd = os.path.join(root, "resume")
    run_split(job, rd, (2, 6, 1, 2), steps=3, more=["checkpoint.every_steps=3"])
    got = run_split(job, rd, (1, 12, 1, 0), steps=6, more=["resume=auto"])
    assert len(got) == 6, f"resume: {len(got)} metrics rows"
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    w = dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))
    wdiff = float(np.max(np.abs(ref_w["prompt_embeddings"].astype(np.float64) - w["prompt_embeddings"])))
    assert worst <= TOL and wdiff <= 0.1 * LR, f"resume: loss diff {worst:.3g}, prompt diff {wdiff:.3g}"
    print(f"  resume 2 ranks -> 1 rank at step 3: loss diff {worst:.2e}, prompt diff {wdiff:.2e}")


def eval_case(model, data, final):
    def ev(extra):
        r = dp.sh([dp.BIN, "eval", "--model", model, "--data", data, "--seq-len", "16", "--json"] + extra)
        return json.loads(r.stdout)
    a, b = ev([]), ev(["--adapter", final])
    assert a["tokens"] == b["tokens"], f"eval --adapter counts {b['tokens']} tokens, the base {a['tokens']}"
    assert abs(a["loss"] - b["loss"]) > 1e-4, f"eval --adapter equals the base: {a} {b}"
    print(f"  eval: base {a['loss']:.5f}, with the prompt {b['loss']:.5f} over {b['tokens']:.0f} real tokens")


def refusals(job):
    for override, needle in [("finetune.prompt.virtual_tokens=0", "virtual_tokens"),
                             ("finetune.mode=p_tuning finetune.prompt.init_text=hi", "init_text"),
                             ("distill.teacher=" + os.path.dirname(os.path.dirname(job)) + "/llama", "distill.teacher")]:
        r = dp.sh([dp.BIN, "train", job, *override.split(), "run_dir=" + os.path.dirname(job) + "/refused"], check=False)
        lines = [x for x in r.stderr.strip().splitlines() if x]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], \
            f"{override}: rc {r.returncode}, stderr {r.stderr!r}"
        print(f"  refuses {override}: {lines[0]}")


def main():
    root = dp.tmpdir("st_prompt_train_")
    try:
        ll = dp.init_model(os.path.join(root, "llama"), "llama", 2)
        g2 = dp.init_model(os.path.join(root, "gpt2"), "gpt2", 2, seed=3)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1, step=1)
        job, ref, ref_w = check_case(root, "llama_prompt", ll, data)
        check_case(root, "gpt2_prompt", g2, data)
        resume_case(root, job, ref, ref_w)
        eval_case(ll, data, os.path.join(root, "llama_prompt", "r1x12x1z0", "final"))
        other_mode(root, "llama_prefix", ll, data, "{ mode: prefix_tuning, prefix: { virtual_tokens: %d } }" % NV,
                   "PREFIX_TUNING", 2 * 2 * 2 * 16, {"prompt_embeddings"})  # L * 2 * KVH * hd
        other_mode(root, "gpt2_ptuning", g2, data, "{ mode: p_tuning, prompt: { virtual_tokens: %d } }" % NV,
                   "P_TUNING", 64, ENCODER)
        lstm = {"prompt_encoder.lstm_head.%s_l%d%s" % (k, l, r) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                for l in (0, 1) for r in ("", "_reverse")}
        other_mode(root, "llama_ptuning_lstm", ll, data,
                   "{ mode: p_tuning, prompt: { virtual_tokens: %d, encoder: lstm } }" % NV, "P_TUNING", 64,
                   lstm | {"prompt_encoder.embedding.weight", "prompt_encoder.mlp_head.0.weight",
                           "prompt_encoder.mlp_head.0.bias", "prompt_encoder.mlp_head.2.weight",
                           "prompt_encoder.mlp_head.2.bias"})
        other_mode(root, "llama_prefix_proj", ll, data,
                   "{ mode: prefix_tuning, prefix: { virtual_tokens: %d, projection: true } }" % NV, "PREFIX_TUNING",
                   128, {"prompt_encoder.embedding.weight", "prompt_encoder.transform.0.weight",
                         "prompt_encoder.transform.0.bias", "prompt_encoder.transform.2.weight",
                         "prompt_encoder.transform.2.bias"})
        refusals(job)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("prompt-tuning training checks passed")


if __name__ == "__main__":
    main()
