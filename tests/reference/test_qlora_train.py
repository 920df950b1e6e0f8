"""QLoRA training across ranks (finetune.mode: qlora), with real MPI ranks (mpirun, OMP_NUM_THREADS=1).

For a 2-layer Llama, adapters on all seven projections, base NF4 with double quantization (block 64), and int8:
  * a QLoRA run equals a LoRA run over the dequantized base (computed here by numpy, test_qlora_torch's
    independent implementation of the format, written as an fp32 model directory): per-step losses within
    1e-6 relative, final adapters within lr/10 — the quantized base changes what the model computes exactly as
    the format says, and nothing else;
  * the same global batch of 12 sequences as 1 rank ZeRO-0, 2 ranks ZeRO-1 and 2 ranks x 2 micro-batches
    ZeRO-2: losses within 1e-6 relative, adapters within lr/10; the loss goes down;
  * RUN_DIR/final/ is a peft adapter directory: the tensor names and shapes peft saves (as test_lora_train)
    and adapter_config.json's LoraConfig fields (peft records no quantization in it: that is the base's);
    checkpoints hold the adapters only and adapter_base_checksum;
  * `export CKPT --format peft` equals final/; `export CKPT --merge` equals `export final --merge --model
    <numpy-dequantized base>` (QLoRA merges onto the dequantized base);
  * resume: 3 steps on 2 ranks, resumed to 6 on 1 rank, equals 6 uninterrupted steps;
  * DoRA over the nf4 base equals DoRA over the dequantized base (magnitudes from the dequantized weights);
  * memory: peak RSS of 1-rank training on a 4 x 256 Llama, QLoRA nf4 vs LoRA (printed; QLoRA must be lower);
  * refusals with one line naming the cause: an unknown qlora.quant (precision bf16 trains:
    tests/reference/test_peft_bf16.py; sharding.stage 3 trains: tests/reference/test_zero3.py).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import st_io  # noqa: E402
from test_lora_train import LLAMA_T, adapters_only_checkpoint, expected_adapter  # noqa: E402
from test_qlora_torch import quant_dequant  # noqa: E402

TOL, LR = 1e-6, 1e-2
SPLITS = [(1, 12, 1, 0), (2, 6, 1, 1), (2, 3, 2, 2)]


def job_text(mode, qlora, lora="{ r: 4, alpha: 8 }"):
    return ("finetune: { mode: " + mode + ", lora: " + lora + ", qlora: " + qlora + " }\n"
            "train: { steps: 6, micro_batch: 12, grad_accum: 1, seq_len: 16, lr: 1.0e-2, warmup_steps: 0, "
            "schedule: constant, weight_decay: 0.0, grad_clip: 1.0, log_every: 100 }\n")


def make_job(base, model, data, mode, qlora="{ quant: nf4 }", lora="{ r: 4, alpha: 8 }"):
    os.makedirs(base, exist_ok=True)
    job = dp.write_job(os.path.join(base, "job.yaml"), model, os.path.join(base, "run"),
                       [{"name": "a", "path": data}], job_text(mode, qlora, lora))
    text = [l for l in open(job).read().splitlines() if not (l.startswith("train:") and "lr: 3.0e-3" in l)]
    open(job, "w").write("\n".join(text) + "\n")
    return job


def run_split(job, rd, split, steps=6, more=()):
    n, mb, acc, zero = split
    dp.train(job, n, [f"run_dir={rd}", f"train.steps={steps}", f"train.micro_batch={mb}", f"train.grad_accum={acc}",
                      f"sharding.stage={zero}"] + list(more))
    return [r["loss"] for r in dp.losses(rd)]


def bf16_rounded(x):
    """fp32 values rounded to the nearest bf16 (ties to even, on the bits), as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32)).view(np.float32)


def dequantized_copy(model, out, quant, dq, block, bf16_frozen=False):
    """The model with its layer weights as QLoRA dequantizes them; bf16_frozen: the token embedding and the
    LM head rounded to bf16 too (QLoRA under precision bf16 holds them in bf16 only, worker/qlora.h)."""
    shutil.copytree(model, out)
    w = dp.read_safetensors(os.path.join(model, "model.safetensors"))
    for k in w:
        if w[k].ndim == 2 and k.startswith("model.layers."):
            w[k] = quant_dequant(w[k].astype(np.float32), quant, dq, block)
        elif bf16_frozen and k in ("model.embed_tokens.weight", "lm_head.weight"):
            w[k] = bf16_rounded(w[k])
    st_io.write(os.path.join(out, "model.safetensors"), {k: np.asarray(v, np.float32) for k, v in w.items()})
    return out


def compare(name, ref, ref_w, got, w):
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    wdiff = max(float(np.max(np.abs(ref_w[t].astype(np.float64) - w[t]))) for t in w)
    assert len(got) == len(ref) and worst <= TOL, f"{name}: losses differ by {worst:.3g}\n ref {ref}\n got {got}"
    assert set(w) == set(ref_w) and wdiff <= 0.1 * LR, f"{name}: adapters differ by {wdiff:.3g}"
    print(f"  {name}: loss diff {worst:.2e}, adapter diff {wdiff:.2e}")


def final_w(rd):
    return dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))


def quant_case(root, model, data, name, qlora, quant, dq, block):
    base = os.path.join(root, name)
    job = make_job(base, model, data, "qlora", qlora)
    deq = dequantized_copy(model, os.path.join(root, name + "_deq"), quant, dq, block)
    ljob = make_job(base + "_lora", deq, data, "lora")
    ref = run_split(ljob, os.path.join(base, "lora_on_deq"), SPLITS[0])
    ref_w = final_w(os.path.join(base, "lora_on_deq"))
    first = None
    for split in SPLITS:
        rd = os.path.join(base, "r%dx%dx%dz%d" % split)
        got = run_split(job, rd, split)
        compare(f"{name} {'%d rank(s) x micro %d x accum %d ZeRO-%d' % split} vs LoRA on the dequantized base",
                ref, ref_w, got, final_w(rd))
        first = first or (rd, got)
    rd, got = first
    assert got[-1] < got[0] - 0.02, f"{name}: no learning {got}"
    return job, deq, rd, got


def dora_case(root, model, data, deq):
    """DoRA over the quantized base: magnitudes start at the dequantized weights' row norms (as peft on a
    4-bit base), so the run equals DoRA over the dequantized fp32 base."""
    lora = "{ r: 2, alpha: 4, dora: true, targets: [q_proj, v_proj, down_proj] }"
    job = make_job(os.path.join(root, "dora"), model, data, "qlora", "{ quant: nf4, double_quant: true }", lora)
    ljob = make_job(os.path.join(root, "dora_lora"), deq, data, "lora", lora=lora)
    ref = run_split(ljob, os.path.join(root, "dora_lora", "run"), SPLITS[0])
    got = run_split(job, os.path.join(root, "dora", "run"), SPLITS[0])
    compare("DoRA over nf4 + dq vs DoRA on the dequantized base", ref, final_w(os.path.join(root, "dora_lora", "run")),
            got, final_w(os.path.join(root, "dora", "run")))


def final_dir_checks(model, rd, deq, name):
    cfg = json.load(open(os.path.join(model, "config.json")))
    w = final_w(rd)
    want = expected_adapter(cfg, LLAMA_T, 4, {0, 1})
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    assert shapes == want, f"{name}: adapter tensors {sorted(shapes.items())} != peft's {sorted(want.items())}"
    ac = json.load(open(os.path.join(rd, "final", "adapter_config.json")))
    exp = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_rslora": False,
           "use_dora": False, "bias": "none", "fan_in_fan_out": False, "layers_to_transform": None}
    for k, v in exp.items():
        assert ac.get(k) == v, f"{name}: adapter_config.json {k} = {ac.get(k)!r}, want {v!r}"
    assert sorted(ac["target_modules"]) == sorted(LLAMA_T), f"{name}: target_modules {ac['target_modules']}"
    assert not os.path.exists(os.path.join(rd, "final", "model.safetensors")), f"{name}: final/ holds a base model"
    ck = os.path.join(rd, "checkpoints")
    dp.sh([dp.BIN, "export", ck, "--format", "peft", "--out", os.path.join(rd, "x_peft")])
    x = dp.read_safetensors(os.path.join(rd, "x_peft", "adapter_model.safetensors"))
    assert set(x) == set(w) and all(np.array_equal(x[k], w[k]) for k in w), f"{name}: export --format peft"
    dp.sh([dp.BIN, "export", ck, "--merge", "--out", os.path.join(rd, "x_m1")])
    dp.sh([dp.BIN, "export", os.path.join(rd, "final"), "--merge", "--model", deq, "--out", os.path.join(rd, "x_m2")])
    a = dp.read_safetensors(os.path.join(rd, "x_m1", "model.safetensors"))
    b = dp.read_safetensors(os.path.join(rd, "x_m2", "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), f"{name}: merged exports differ"
    print(f"  {name}: final/ as peft, adapter-only checkpoint, exports (peft, merged onto the dequantized base)")


def resume_case(root, job, ref, ref_w):
    rd = os.path.join(root, "resume")
    run_split(job, rd, (2, 6, 1, 2), steps=3, more=["checkpoint.every_steps=3"])
    got = run_split(job, rd, (1, 12, 1, 0), steps=6, more=["resume=auto"])
    compare("resume 2 ranks -> 1 rank at step 3", ref, ref_w, got, final_w(rd))


def peak_rss_kb(job, rd, mode):
    # full mode: the job's lora keys back at their defaults (a changed key of another mode is refused by name)
    reset = ["finetune.lora.r=16", "finetune.lora.alpha=32"] if mode == "full" else []
    r = subprocess.run(["/usr/bin/time", "-f", "%M", dp.BIN, "train", job, f"run_dir={rd}", f"finetune.mode={mode}",
                        "train.steps=2"] + reset, env=dp.ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.strip().splitlines()[-1])


def memory_case(root):
    model = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=256, heads=4, kv=4, vocab=128)
    data = dp.make_dataset(os.path.join(root, "big.h5"), 128, 60, seed=2)
    job = make_job(os.path.join(root, "mem"), model, data, "qlora", "{ quant: nf4, double_quant: true }")
    rss = {m: peak_rss_kb(job, os.path.join(root, "mem_" + m), m) for m in ("qlora", "lora", "full")}
    print(f"  peak RSS, 1 rank, Llama 4 x 256 (d_ff {json.load(open(os.path.join(model, 'config.json')))['intermediate_size']}):"
          f" qlora nf4+dq {rss['qlora']} kB, lora {rss['lora']} kB, full {rss['full']} kB")
    assert rss["qlora"] < rss["lora"], f"QLoRA peak RSS {rss['qlora']} kB not below LoRA's {rss['lora']} kB"


def refusals(job):
    for override, needle in [("finetune.qlora.quant=fp8", "fp8")]:
        r = dp.sh([dp.BIN, "train", job, override, "run_dir=" + os.path.dirname(job) + "/refused"], check=False)
        lines = [x for x in r.stderr.strip().splitlines() if x]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], \
            f"{override}: rc {r.returncode}, stderr {r.stderr!r}"
        print(f"  refuses {override}: {lines[0]}")


def main():
    root = dp.tmpdir("st_qlora_train_")
    try:
        ll = dp.init_model(os.path.join(root, "llama"), "llama", 2)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1, step=1)
        job, deq, rd, ref = quant_case(root, ll, data, "nf4_dq", "{ quant: nf4, double_quant: true, block: 64 }",
                                       "nf4", True, 64)
        final_dir_checks(ll, rd, deq, "nf4_dq")
        adapters_only_checkpoint(rd, final_w(rd), "nf4_dq")
        resume_case(root, job, ref, final_w(rd))
        dora_case(root, ll, data, deq)
        quant_case(root, ll, data, "int8", "{ quant: int8, double_quant: false, block: 32 }", "int8", False, 32)
        refusals(job)
        memory_case(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("QLoRA training checks passed")


if __name__ == "__main__":
    main()
