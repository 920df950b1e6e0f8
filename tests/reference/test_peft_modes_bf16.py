"""DoRA, DoRA with LoRA dropout, prompt tuning, P-tuning (MLP and LSTM encoders) and prefix tuning (with and
without projection) under precision: bf16, through the real trainer on MPI ranks (mpirun, OMP_NUM_THREADS=1):
the frozen base computes from its bf16 copy, the adapters (DoRA's magnitudes, the prompts, prefixes and
encoders) and their AdamW state stay fp32 (their arithmetic against a float64 emulation of the bf16 path:
test_bf16_torch.py section 3; against the real peft in fp32: peft_adapters.py).

For a 2-layer Llama (GPT-2 for one prompt mode), 6 steps of a 12-sequence global batch, per mode:
  * D, the largest relative loss difference between the bf16 and the fp32 run on 1 rank, is the whole effect
    of the bf16 arithmetic on the losses: 0 < D < 2e-2, step 1 differs from fp32 (the base is in bf16), and
    the bf16 run learns (DoRA: the loss falls by 0.02 in 6 steps; a prompt on this random base model moves
    the loss little, so there: the losses differ from a bf16 run with lr 1e-12, the adapter held at its
    init, by more than 10 D: the bf16 gradients reach the prompt, prefix or encoder);
  * 1 rank, 2 ranks ZeRO-1, 2 ranks x 2 micro-batches ZeRO-2 and 2 ranks ZeRO-3 agree within 2 D: the rank count changes only the order of fp32 sums,
    which flips rare bf16 roundings by one ulp, at most twice a rounding error (test_peft_bf16.py's argument);
  * DoRA with dropout: the masks are keyed by the global sample (worker/lora.h), so in fp32 1 rank and 2 ranks
    x 2 micro-batches agree within 1e-6 (test_lora_train.py's bound), dropout changes the losses after step 1,
    and step 1 (B = 0, m = ||W||: the base model) equals the run without dropout;
  * with activation checkpointing the bf16 run is bit-identical (the recomputed layer rounds, drops and
    overwrites as the first forward did);
  * final/ of a bf16 DoRA run is peft's DORA layout (fp32, use_dora), and eval --adapter equals eval of the
    merged export (fp32 eval, 1e-6);
"""
import json
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from test_peft_bf16 import BF16, SPLITS, ckpt_same, rel  # noqa: E402
from test_qlora_train import final_w, run_split  # noqa: E402

TOL = 1e-6
TRAIN = ("train: { steps: 6, micro_batch: 12, grad_accum: 1, seq_len: 16, lr: %s, warmup_steps: 0, "
         "schedule: constant, weight_decay: 0.0, grad_clip: 1.0, log_every: 100 }\n")
DORA = "{ mode: lora, lora: { r: 4, alpha: 8, dora: true, targets: [q_proj, v_proj, o_proj, up_proj, down_proj] } }"
DORA_DROP = DORA.replace("dora: true", "dora: true, dropout: 0.2")
# name, family, finetune, lr
MODES = [
    ("dora", "llama", DORA, "1.0e-2"),
    ("dora_dropout", "llama", DORA_DROP, "1.0e-2"),
    ("prompt", "llama", "{ mode: prompt_tuning, prompt: { virtual_tokens: 5 } }", "1.0e-1"),
    ("ptuning_mlp", "gpt2", "{ mode: p_tuning, prompt: { virtual_tokens: 5, encoder: mlp } }", "1.0e-2"),
    ("ptuning_lstm", "llama", "{ mode: p_tuning, prompt: { virtual_tokens: 4, encoder: lstm } }", "1.0e-2"),
    ("prefix", "llama", "{ mode: prefix_tuning, prefix: { virtual_tokens: 5 } }", "1.0e-1"),
    ("prefix_proj", "llama", "{ mode: prefix_tuning, prefix: { virtual_tokens: 4, projection: true } }", "1.0e-2"),
]


def make_job(base, model, data, finetune, lr):
    os.makedirs(base, exist_ok=True)
    job = dp.write_job(os.path.join(base, "job.yaml"), model, os.path.join(base, "run"), [{"name": "a", "path": data}],
                       "finetune: " + finetune + "\n" + TRAIN % lr)
    text = [l for l in open(job).read().splitlines() if not (l.startswith("train:") and "lr: 3.0e-3" in l)]
    open(job, "w").write("\n".join(text) + "\n")  # dp's default train line gives way to ours
    return job


def bf16_effect(name, job, root, learns):
    """The fp32 and bf16 runs of `job` on 1 rank: D and the bf16 losses."""
    f32 = run_split(job, os.path.join(root, name + "_fp32"), SPLITS[0])
    b16 = run_split(job, os.path.join(root, name + "_bf16"), SPLITS[0], more=BF16)
    d = rel(f32, b16)
    assert 0 < d < 2e-2, f"{name}: bf16 must differ from fp32 but stay close (D = {d:.3g})"
    assert b16[0] != f32[0], f"{name}: step 1 (the base model) is the same in bf16 and fp32: the base is not in bf16"
    if learns:
        assert b16[-1] < b16[0] - 0.02, f"{name}: bf16 did not learn {b16}"
        how = f"losses {b16[0]:.4f} -> {b16[-1]:.4f}"
    else:
        still = run_split(job, os.path.join(root, name + "_still"), SPLITS[0], more=BF16 + ["train.lr=1e-12"])
        moved = rel(still, b16)
        assert moved > 10 * d, f"{name}: bf16 training moves the losses by {moved:.3g} <= 10 D = {10 * d:.3g}"
        how = f"training moves the losses by {moved:.2e} > 10 D"
    print(f"  {name}: bf16 vs fp32 max relative loss difference D = {d:.2e}; {how}")
    return d, b16


def ranks_agree(name, job, root, ref, d, splits):
    worst_all = 0.0
    for split in splits:
        got = run_split(job, os.path.join(root, name + "_r%dx%dx%dz%d" % split), split, more=BF16)
        worst = rel(ref, got)
        assert worst <= 2 * d, f"{name} {split}: bf16 losses differ from 1 rank by {worst:.3g} > 2 D = {2 * d:.3g}"
        worst_all = max(worst_all, worst)
    label = ", ".join("%dx%dx%d ZeRO-%d" % s for s in splits)
    print(f"  {name}: bf16 on {label} vs 1 rank: worst {worst_all:.2e} <= 2 D = {2 * d:.2e}")


def dropout_fp32(job, root):
    one = run_split(job, os.path.join(root, "dd_fp32_1"), SPLITS[0])
    two = run_split(job, os.path.join(root, "dd_fp32_2"), SPLITS[2])
    none = run_split(job, os.path.join(root, "dd_fp32_none"), SPLITS[0], more=["finetune.lora.dropout=0"])
    worst = rel(one, two)
    assert worst <= TOL, f"dora dropout fp32: 1 rank vs 2 ranks x 2 micro-batches differ by {worst:.3g}\n {one}\n {two}"
    assert abs(one[0] - none[0]) <= TOL * abs(one[0]), f"dora dropout: step 1 {one[0]} != no dropout {none[0]}"
    assert all(abs(x - y) > 1e-7 for x, y in zip(one[1:], none[1:])), f"dora dropout changes nothing {one} {none}"
    print(f"  dora_dropout fp32: 1 vs 2 ranks x 2 micro-batches {worst:.2e}, step 1 == no dropout, "
          f"losses {one[0]:.4f} -> {one[-1]:.4f} (no dropout -> {none[-1]:.4f})")


def dora_final(model, data, rd):
    w = final_w(rd)
    assert any(k.endswith("lora_magnitude_vector") for k in w), f"dora bf16 final/: no magnitudes {sorted(w)[:4]}"
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in w.values()), "dora bf16: adapters not fp32"
    ac = json.load(open(os.path.join(rd, "final", "adapter_config.json")))
    assert ac["peft_type"] == "LORA" and ac.get("use_dora") is True, f"dora bf16: adapter_config {ac}"
    merged = os.path.join(rd, "merged")
    dp.sh([dp.BIN, "export", os.path.join(rd, "final"), "--merge", "--model", model, "--out", merged])

    def ev(extra):
        return json.loads(dp.sh([dp.BIN, "eval", "--data", data, "--seq-len", "16", "--json"] + extra).stdout)["loss"]
    e1, e2 = ev(["--model", model, "--adapter", os.path.join(rd, "final")]), ev(["--model", merged])
    assert abs(e1 - e2) <= 1e-6 * abs(e2), f"dora bf16: eval --adapter {e1} != merged {e2}"
    print(f"  dora: bf16 final/ is peft's DoRA layout (fp32), eval --adapter == merged ({e1:.6f})")


def main():
    root = dp.tmpdir("st_peft_modes_bf16_")
    only = os.environ.get("ST_PEFT_CASES", "")
    try:
        models = {"llama": dp.init_model(os.path.join(root, "llama"), "llama", 2),
                  "gpt2": dp.init_model(os.path.join(root, "gpt2"), "gpt2", 2, seed=3)}
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1, step=1)
        for name, family, finetune, lr in MODES:
            if only and name not in only.split(","):
                continue
            job = make_job(os.path.join(root, name), models[family], data, finetune, lr)
            if name == "dora_dropout":
                dropout_fp32(job, root)
            d, ref = bf16_effect(name, job, root, name.startswith("dora"))
            ranks_agree(name, job, root, ref, d, SPLITS[1:])
            ckpt_same(name, job, root, ref)
            if name == "dora":
                dora_final(models[family], data, os.path.join(root, name + "_bf16"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("DoRA / prompt-learning bf16 training checks passed")


if __name__ == "__main__":
    main()
