"""LoRA and QLoRA under precision: bf16 (the frozen base computes from its bf16 copy, the adapters and their
AdamW state stay fp32), through the real trainer on MPI ranks (mpirun, OMP_NUM_THREADS=1).

For a 2-layer Llama with adapters on all seven projections (r 4), 6 steps of a 12-sequence global batch:
  * D_lora, the largest relative loss difference between the bf16 and the fp32 LoRA run, is the whole effect
    of the bf16 arithmetic on the losses: it must be > 0 (the setting reaches the base matmuls) and < 2e-2,
    and the bf16 run learns. Step 1 (B = 0: the base model) must differ from fp32 too.
  * 1 rank, 2 ranks ZeRO-1, 2 ranks x 2 micro-batches ZeRO-2 and 2 ranks ZeRO-3 (the adapters sharded, the
    base's bf16 copy made per acquired layer) agree within 2 D: the rank count changes
    only the order of fp32 sums, which flips rare bf16 roundings by one ulp, at most twice a rounding
    error (the argument of tests/integration/test_bf16_train.sh and test_bf16_torch.py (a)).
  * QLoRA nf4 + double quantization in bf16 equals bf16 LoRA over the numpy-dequantized base (written as an
    fp32 model: test_qlora_torch's independent implementation of the format; its token embedding and LM head
    rounded to bf16, as QLoRA under bf16 holds them in bf16 only) within 2 D_q, D_q being the
    QLoRA bf16-vs-fp32 difference: both round the same dequantized values to bf16 for every base matmul,
    so only evaluation order can differ (measured: printed, typically 0). QLoRA bf16 on 1 vs 2 ranks
    (ZeRO-1) within 2 D_q.
  * bf16 LoRA and QLoRA with activation checkpointing is bit-identical to without (the recomputed layer rounds the
    adapter inputs as the first forward did).
  * final/ is the same peft adapter directory as under fp32 (tensor names and shapes peft saves, adapter
    config), `eval --adapter final/` runs and equals eval of the merged export (fp32 eval, 1e-6).
  * QLoRA + DoRA under bf16 (its magnitudes the fp32 dequantized rows' norms, its W the acquired layer's bf16
    copy) equals bf16 LoRA + DoRA over the same numpy-dequantized base within 2 D_qd (D_qd its bf16-vs-fp32
    difference; the same argument; LoRA's DoRA under bf16: test_peft_modes_bf16.py).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from test_lora_train import LLAMA_T, expected_adapter  # noqa: E402
from test_qlora_train import dequantized_copy, final_w, make_job, run_split  # noqa: E402

LR = 1e-2
SPLITS = [(1, 12, 1, 0), (2, 6, 1, 1), (2, 3, 2, 2), (2, 6, 1, 3)]
BF16 = ["precision=bf16"]


def rel(a, b):
    assert len(a) == len(b), f"{len(a)} vs {len(b)} steps"
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def bf16_effect(name, job, root):
    """The fp32 and bf16 runs of `job` on 1 rank: D and the bf16 losses."""
    f32 = run_split(job, os.path.join(root, name + "_fp32"), SPLITS[0])
    b16 = run_split(job, os.path.join(root, name + "_bf16"), SPLITS[0], more=BF16)
    d = rel(f32, b16)
    print(f"  {name}: bf16 vs fp32 max relative loss difference D = {d:.2e}; losses {b16[0]:.4f} -> {b16[-1]:.4f} "
          f"(fp32 {f32[0]:.4f} -> {f32[-1]:.4f})")
    assert 0 < d < 2e-2, f"{name}: bf16 must differ from fp32 but stay close (D = {d:.3g})"
    assert b16[0] != f32[0], f"{name}: step 1 (the base model) is the same in bf16 and fp32: the base is not in bf16"
    assert b16[-1] < b16[0] - 0.02, f"{name}: bf16 did not learn {b16}"
    return d, b16


def ranks_agree(name, job, root, ref, d, splits):
    for split in splits:
        got = run_split(job, os.path.join(root, name + "_r%dx%dx%dz%d" % split), split, more=BF16)
        worst = rel(ref, got)
        assert worst <= 2 * d, f"{name} {split}: bf16 losses differ from 1 rank by {worst:.3g} > 2 D = {2 * d:.3g}"
        print(f"  {name}: bf16 {'%d rank(s) x micro %d x accum %d ZeRO-%d' % split} vs 1 rank {worst:.2e} "
              f"<= 2 D = {2 * d:.2e}")


def ckpt_same(name, job, root, ref):
    got = run_split(job, os.path.join(root, name + "_ckpt"), SPLITS[0], more=BF16 + ["memory.activation_checkpointing=true"])
    assert got == ref, f"{name} bf16: activation checkpointing changes the losses\n {got}\n {ref}"
    print(f"  {name}: bf16 with activation checkpointing is bit-identical")


def against_deq(name, lname, deq, data, root, qref, dq, lora="{ r: 4, alpha: 8 }"):
    """The bf16 QLoRA run `name` (losses qref, bf16-vs-fp32 difference dq) against bf16 LoRA with the same
    adapters over the numpy-dequantized base deq: losses within 2 dq, final adapters within 0.1 LR."""
    ljob = make_job(os.path.join(root, lname), deq, data, "lora", lora=lora)
    on_deq = run_split(ljob, os.path.join(root, lname + "_bf16"), SPLITS[0], more=BF16)
    worst = rel(on_deq, qref)
    assert worst <= 2 * dq, f"{name} bf16 vs bf16 LoRA on the dequantized base: {worst:.3g} > 2 D = {2 * dq:.3g}"
    wq, wl = final_w(os.path.join(root, name + "_bf16")), final_w(os.path.join(root, lname + "_bf16"))
    wdiff = max(float(np.max(np.abs(wq[k].astype(np.float64) - wl[k]))) for k in wq)
    assert set(wq) == set(wl) and wdiff <= 0.1 * LR, f"{name} bf16: adapters differ from LoRA on deq by {wdiff:.3g}"
    print(f"  {name} bf16 vs bf16 LoRA with the same adapters on the numpy-dequantized base: losses {worst:.2e} "
          f"(<= 2 D = {2 * dq:.2e}), adapters {wdiff:.2e}")


def final_checks(name, model, data, rd):
    cfg = json.load(open(os.path.join(model, "config.json")))
    w = final_w(rd)
    shapes = {k: tuple(v.shape) for k, v in w.items()}
    want = expected_adapter(cfg, LLAMA_T, 4, {0, 1})
    assert shapes == want, f"{name}: adapter tensors {sorted(shapes.items())} != peft's {sorted(want.items())}"
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in w.values()), f"{name}: adapters not fp32"
    ac = json.load(open(os.path.join(rd, "final", "adapter_config.json")))
    assert ac["peft_type"] == "LORA" and ac["r"] == 4 and ac["lora_alpha"] == 8, f"{name}: adapter_config {ac}"
    merged = os.path.join(rd, "merged")
    dp.sh([dp.BIN, "export", os.path.join(rd, "final"), "--merge", "--model", model, "--out", merged])

    def ev(extra):
        return json.loads(dp.sh([dp.BIN, "eval", "--data", data, "--seq-len", "16", "--json"] + extra).stdout)["loss"]
    e1, e2 = ev(["--model", model, "--adapter", os.path.join(rd, "final")]), ev(["--model", merged])
    assert abs(e1 - e2) <= 1e-6 * abs(e2), f"{name}: eval --adapter {e1} != merged {e2}"
    print(f"  {name}: final/ is peft's adapter layout (fp32), eval --adapter == merged ({e1:.6f})")


def main():
    root = dp.tmpdir("st_peft_bf16_")
    try:
        ll = dp.init_model(os.path.join(root, "llama"), "llama", 2)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1, step=1)
        # LoRA
        job = make_job(os.path.join(root, "lora"), ll, data, "lora")
        d, ref = bf16_effect("lora", job, root)
        ranks_agree("lora", job, root, ref, d, SPLITS[1:])
        final_checks("lora", ll, data, os.path.join(root, "lora_bf16"))
        ckpt_same("lora", job, root, ref)
        # QLoRA: nf4 with double quantization, block 64
        qjob = make_job(os.path.join(root, "qlora"), ll, data, "qlora", "{ quant: nf4, double_quant: true, block: 64 }")
        dq, qref = bf16_effect("qlora", qjob, root)
        deq = dequantized_copy(ll, os.path.join(root, "deq"), "nf4", True, 64, bf16_frozen=True)
        against_deq("qlora", "deq_lora", deq, data, root, qref, dq)
        ranks_agree("qlora", qjob, root, qref, dq, SPLITS[1:2])
        # resume: the checkpoint's adapter_base_checksum covers the bf16-only embedding / head by their load-time
        # sums (no fp32 values exist), and resuming restores the fp32 part of the buffer only
        rrd = os.path.join(root, "qlora_resume")
        run_split(qjob, rrd, SPLITS[1], steps=3, more=BF16 + ["checkpoint.every_steps=3"])
        got = run_split(qjob, rrd, SPLITS[0], steps=6, more=BF16 + ["resume=auto"])
        worst = rel(got, qref)
        assert len(got) == len(qref) and worst <= 2 * dq, f"qlora bf16 resume 2 -> 1 rank: {worst:.3g} > 2 D_q"
        print(f"  qlora: bf16 resume 2 ranks -> 1 rank at step 3 vs uninterrupted {worst:.2e} <= 2 D_q")
        ckpt_same("qlora", qjob, root, qref)
        # the LM head in vocabulary blocks (worker/model.c head_vblock; by default only heads above 16 Mi
        # floats, e.g. Llama-3-8B's): the same losses up to the order of dlnf's fp32 sums, within 2 D_q
        env = dict(dp.ENV, SHARDTUNE_HEAD_WIDEN_FLOATS="4096")
        brd = os.path.join(root, "qlora_blocked")
        n, mb, acc, zero = SPLITS[0]
        r = subprocess.run([dp.BIN, "train", qjob, f"run_dir={brd}", "train.steps=6", f"train.micro_batch={mb}",
                            f"train.grad_accum={acc}", f"sharding.stage={zero}"] + BF16,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        blocked = [x["loss"] for x in dp.losses(brd)]
        worst = rel(blocked, qref)
        assert len(blocked) == len(qref) and worst <= 2 * dq, f"qlora bf16, blocked head: {worst:.3g} > 2 D_q"
        print(f"  qlora: bf16 with the LM head in vocabulary blocks of 4096 floats vs whole {worst:.2e} <= 2 D_q")
        final_checks("qlora", ll, data, os.path.join(root, "qlora_bf16"))
        # QLoRA + DoRA: the same comparison
        dlora = "{ r: 4, alpha: 8, dora: true }"
        djob = make_job(os.path.join(root, "qdora"), ll, data, "qlora", "{ quant: nf4, double_quant: true, block: 64 }",
                        dlora)
        dd, dref = bf16_effect("qlora_dora", djob, root)
        against_deq("qlora_dora", "deq_dora", deq, data, root, dref, dd, lora=dlora)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("LoRA / QLoRA bf16 training checks passed")


if __name__ == "__main__":
    main()
