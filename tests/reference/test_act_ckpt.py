"""Activation checkpointing (memory.activation_checkpointing) end to end, with real MPI ranks.

* Llama and GPT-2, fp32 and bf16, 1 rank (ZeRO-1) and 2 ranks (ZeRO-2, and a frozen-mode Llama run whose
  backward stops above the frozen layers, and LoRA / DoRA runs): the run with checkpointing reports bit-identical per-step
  losses and gradient norms (metrics.jsonl, compared with ==) and writes a byte-identical
  final/model.safetensors (adapter_model.safetensors for LoRA), against the same run without it. The comparison can fail: a different seed
  gives different losses.
* Memory: an activation-dominated Llama job (seq 256, micro_batch 16) is trained with and without
  checkpointing; the drop in measured peak RSS (GNU time) must be within 15% of the drop `shardtune plan`
  predicts (its activation bytes), and `plan` must report the flag.
"""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from test_dp_memory import measured_rss, plan  # noqa: E402

CKPT = "memory.activation_checkpointing=true"


def same_run(job, ranks, ov, tag, root, final=True):
    runs = []
    for extra in ([], [CKPT]):
        rd = os.path.join(root, f"{tag}{'_ckpt' if extra else ''}")
        dp.train(job, ranks, ov + extra + [f"run_dir={rd}"], mpirun=ranks > 1)
        runs.append(rd)
    a, b = (dp.losses(rd) for rd in runs)
    assert len(a) == len(b) > 0, (len(a), len(b))
    for x, y in zip(a, b):
        assert x["step"] == y["step"]
        assert x["loss"] == y["loss"], f"{tag} step {x['step']}: loss {x['loss']!r} vs {y['loss']!r} with checkpointing"
        assert x["grad_norm"] == y["grad_norm"], f"{tag} step {x['step']}: grad_norm differs"
    name = "model.safetensors" if final else "adapter_model.safetensors"
    fa, fb = (open(os.path.join(rd, "final", name), "rb").read() for rd in runs)
    assert fa == fb, f"{tag}: final/{name} differs with activation checkpointing"
    print(f"  {tag}: {len(a)} steps, losses {a[0]['loss']:.6f} .. {a[-1]['loss']:.6f} identical")
    return a


def main():
    t0 = time.time()
    root = dp.tmpdir("st_act_ckpt_")
    try:
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 120, seed=1)
        models = {"llama": dp.init_model(os.path.join(root, "llama"), "llama", 3, dim=64, max_seq=64),
                  "gpt2": dp.init_model(os.path.join(root, "gpt2"), "gpt2", 3, dim=64, max_seq=64)}
        base = ["train.steps=4", "train.micro_batch=4", "train.seq_len=32"]
        ref = None
        for fam, path in models.items():
            job = dp.write_job(os.path.join(root, f"{fam}.yaml"), path, os.path.join(root, "run"),
                               [{"name": "a", "path": data}])
            for prec in ("fp32", "bf16"):
                for ranks, zero in ((1, 1), (2, 2)):
                    ov = base + [f"precision={prec}", f"sharding.stage={zero}", f"train.micro_batch={4 // ranks}"]
                    got = same_run(job, ranks, ov, f"{fam}_{prec}_r{ranks}z{zero}", root)
                    if fam == "llama" and prec == "fp32" and ranks == 1:
                        ref = got
            if fam == "llama":
                ov = base + ["sharding.stage=2", "train.micro_batch=2", "finetune.mode=frozen",
                             "finetune.train_layers=-1"]
                same_run(job, 2, ov, "llama_frozen_r2z2", root)
                # LoRA and DoRA adapters on every projection: their saved x @ A^T is recomputed too
                for dora in ("false", "true"):
                    ov = base + ["sharding.stage=2", "train.micro_batch=2", "finetune.mode=lora",
                                 "finetune.lora.r=4", f"finetune.lora.dora={dora}"]
                    same_run(job, 2, ov, f"llama_lora_dora{dora}_r2z2", root, final=False)
                # the == comparisons above can fail: another seed changes every loss
                rd = os.path.join(root, "seed")
                dp.train(job, 1, base + ["precision=fp32", "sharding.stage=1", "seed=8", f"run_dir={rd}"],
                         mpirun=False)
                other = dp.losses(rd)
                assert all(x["loss"] != y["loss"] for x, y in zip(ref, other)), "seed did not change the losses"

        # memory: activation-dominated job, the RSS drop vs the planned drop
        big = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=128, heads=4, kv=2, vocab=128, max_seq=256)
        job = dp.write_job(os.path.join(root, "big.yaml"), big, os.path.join(root, "run"),
                           [{"name": "a", "path": data}])
        ov = ["train.steps=2", "train.micro_batch=16", "train.seq_len=256", "sharding.stage=1"]
        p0, p1 = plan(job, 1, ov), plan(job, 1, ov + [CKPT])
        assert p0["activation_checkpointing"] is False and p1["activation_checkpointing"] is True
        a0 = p0["stages"][0]["ranks"][0]["bytes"]["activations"]
        a1 = p1["stages"][0]["ranks"][0]["bytes"]["activations"]
        want = p0["peak_bytes"] - p1["peak_bytes"]
        assert want == a0 - a1 > 0, (want, a0, a1)
        r0 = measured_rss(job, 1, ov + [f"run_dir={root}/m0"])[0]
        r1 = measured_rss(job, 1, ov + [CKPT, f"run_dir={root}/m1"])[0]
        got = r0 - r1
        err = (got - want) / want
        print(f"  activations planned {a0 / 2**20:.1f} -> {a1 / 2**20:.1f} MiB; peak RSS {r0 / 2**20:.1f} -> "
              f"{r1 / 2**20:.1f} MiB: drop {got / 2**20:.1f} MiB measured, {want / 2**20:.1f} MiB planned ({err:+.1%})")
        assert abs(err) <= 0.15, f"RSS drop off the plan by {err:+.1%}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_act_ckpt: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
