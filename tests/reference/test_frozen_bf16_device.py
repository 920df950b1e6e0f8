"""Frozen weights of a bf16 source held once, in bf16, on a device backend (issue #17; worker/model.h
st_model_bind_frozen_bf16, coordinator/trainer/train_frozen16.c).

The device path runs on the fake device (tests/tools/fakedev.c --guard: the CUDA backend's code paths, host_memory 0,
every copy and kernel operand checked against the tagged device allocations, several ranks through the fake NCCL).
A Llama model made with the CLI (fp32) is converted to a bf16 safetensors file with numpy (round to nearest even);
every job runs under precision bf16 twice on fakedev, as shipped and with SHARDTUNE_FROZEN_FP32=1 (every fp32 copy
kept: the layout before). The two must agree exactly: every dataset and attribute of every checkpoint (h5py),
final/ byte for byte (the PEFT adapter directory, or mode frozen's whole model: its frozen tensors widened from the
bf16 copy), the losses, eval.generate's samples (LoRA: the merged view; mode frozen: a view of its own, the
bf16-only part widened; generation with a prompt runs on the CPU backend only) and `export --merge` of the last checkpoint. Cases: LoRA, DoRA, prompt
tuning, P-tuning (LSTM encoder) and mode frozen (the last layer trains) at ZeRO-0 on 1 rank and ZeRO-2 on 2 ranks,
progressive (layer 0 joins at step 2: only what no stage trains is held in bf16 only, so nothing has to widen); a
LoRA and a mode-frozen run stopped at step 2 and resumed to step 4 (the checkpoint's base checksum checked against
the base held in bf16 only) equal to the uninterrupted run. The trainer's report (SHARDTUNE_REPORT_LOAD_RSS=1) must
name exactly the floats computed here from the safetensors file; the device bytes held between steps
(FAKEDEV_REPORT_MEM=1) must fall by exactly 4 bytes per such float, and so must the plan's device weights
(`shardtune plan backend=cuda`).
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_dp_memory as mem  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402
import test_frozen_bf16_peft as fbp  # noqa: E402

FAKE = os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "fakedev")
LORA = "finetune: { mode: lora, lora: { r: 4, alpha: 8, targets: [q_proj, v_proj, o_proj, up_proj, down_proj] } }\n"
DORA = LORA.replace("alpha: 8,", "alpha: 8, dora: true,")
PROMPT = "finetune: { mode: prompt_tuning, prompt: { virtual_tokens: 5 } }\n"
PTUNING = "finetune: { mode: p_tuning, prompt: { virtual_tokens: 4, encoder: lstm } }\n"
FROZEN = "finetune: { mode: frozen, train_layers: \"-1\" }\n"
PROGRESSIVE = ('finetune: { mode: progressive, stages: [ {at_step: 0, train_layers: "-1"}, '
               '{at_step: 2, train_layers: "-2", train_modules: [attn, mlp, norm, head]} ] }\n')


def run(job, ranks, ov, env_extra=None, stage=0, loads=None, peaks=None):
    """A guarded fakedev run; returns ({rank: floats held in bf16 only at `stage`; stage None: {(rank, stage): ...}},
    {rank: device bytes between steps}); loads (a dict) gets {rank: device peak when the status was first asked}
    (at device ZeRO-3 the load's), peaks {rank: ... second asked} (there, resuming, the resume's)."""
    env = dict(dp.ENV, SHARDTUNE_REPORT_LOAD_RSS="1", FAKEDEV_REPORT_MEM="1", **(env_extra or {}))
    args = [FAKE, "--guard", job] + ov
    if ranks > 1:
        args = ["mpirun", "--oversubscribe", "-np", str(ranks)] + args
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    assert "fakedev (rank" not in r.stderr and "stream order violated" not in r.stderr, r.stderr
    held, dev = {}, {}
    for x in r.stderr.splitlines():
        if "frozen weights held in bf16 only" in x:
            rank, s = int(x.split("rank ")[1].split(":")[0]), int(x.split("stage ")[1].split(":")[0])
            if stage is None or s == stage:
                held[rank if stage is not None else (rank, s)] = int(x.split(":")[-1].split()[0])
    for x in r.stdout.splitlines():
        if x.startswith("fakedev device bytes: rank "):
            dev[int(x.split("rank ")[1].split()[0])] = int(x.split("between steps ")[1].split(";")[0])
            if peaks is not None:
                peaks[int(x.split("rank ")[1].split()[0])] = int(x.split("at the second ")[1].split()[0])
            if loads is not None:
                loads[int(x.split("rank ")[1].split()[0])] = int(x.split("peak at the first status ")[1].split(",")[0])
    return held, dev


def plan_weights(job, ranks, ov, env_extra, key="weights"):
    """Each rank's planned weights (bytes; or another of its bytes, `key`) of the first stage, `shardtune plan` run
    with env_extra set."""
    old = dict(dp.ENV)
    dp.ENV.update(env_extra)
    try:
        p = mem.plan(job, ranks, ov)
    finally:
        dp.ENV.clear()
        dp.ENV.update(old)
    return [r["bytes"][key] for r in p["stages"][0]["ranks"]]


def main():
    t0 = time.time()
    if not os.access(FAKE, os.X_OK):
        print(f"no {FAKE} (tests/tools/fakedev.c not built)")
        sys.exit(1)
    root = dp.tmpdir("st_frozen_bf16_device_")
    try:
        _, b16, jobs = fbp.make_jobs(root, (("lora", LORA), ("dora", DORA), ("prompt", PROMPT), ("ptuning", PTUNING),
                                            ("frozen", FROZEN), ("progressive", PROGRESSIVE)))
        t = dp.read_safetensors(os.path.join(b16, "model.safetensors"))
        base = fb.held_floats(b16, {0, 1}) + t["lm_head.weight"].size  # embedding, layers' 2-D weights, head
        want = {m: base for m in jobs}
        want["frozen"] = fb.held_floats(b16, {0})  # train_layers -1: layer 1, the final norm and the head train
        want["progressive"] = fb.held_floats(b16, set())  # layer 0 trains from step 2: the embedding alone is held
        common = ["train.steps=4", "train.seq_len=16", "train.micro_batch=4", "train.schedule=constant",
                  "train.warmup_steps=0", "precision=bf16", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
        prompts = os.path.join(root, "prompts.jsonl")
        with open(prompts, "w") as f:
            for k in range(3):
                f.write(json.dumps({"input_ids": [(7 * k + j) % 256 for j in range(5)]}) + "\n")
        gen = ["eval.generate.every_steps=2", f"eval.generate.prompts={prompts}", "eval.generate.max_new=6"]
        sync, asyn = ["checkpoint.async=false"], ["checkpoint.async=true"]
        cases = [("lora", 1, 0, sync + gen), ("lora", 2, 2, asyn), ("dora", 1, 0, asyn), ("dora", 2, 2, sync),
                 ("prompt", 1, 0, sync), ("ptuning", 2, 2, asyn), ("frozen", 1, 0, sync + gen),
                 ("frozen", 2, 2, asyn), ("progressive", 1, 0, sync)]
        for mode, ranks, zero, more in cases:
            tag = f"{mode} {ranks} rank(s) ZeRO-{zero}"
            ov = common + [f"sharding.stage={zero}"] + more
            ref, new = os.path.join(root, f"ref_{mode}{zero}"), os.path.join(root, f"new_{mode}{zero}")
            held_ref, dev_ref = run(jobs[mode], ranks, ov + [f"run_dir={ref}"], fb.KEEP)
            held, dev = run(jobs[mode], ranks, ov + [f"run_dir={new}"])
            assert set(held_ref.values()) == {0}, f"{tag}: SHARDTUNE_FROZEN_FP32=1 held some in bf16 only: {held_ref}"
            assert len(held) == ranks and set(held.values()) == {want[mode]}, f"{tag}: held {held}, want {want[mode]}"
            saved = {r: dev_ref[r] - dev[r] for r in dev_ref}
            assert len(saved) == ranks and set(saved.values()) == {4 * want[mode]}, \
                f"{tag}: device bytes between steps {dev_ref} -> {dev}, want {4 * want[mode]} less"
            k = fb.same_run(ref, new, tag)
            tag = fbp.same_extras(ref, new, mode, more, tag)  # eval.generate samples, export --merge
            print(f"  {tag}: {want[mode]} floats in bf16 only, {4 * want[mode]} device bytes less; "
                  f"{k} checkpoints, final/, losses identical")

        # resume: stopped at step 2, resumed to step 4 = the uninterrupted runs above
        for mode in ("lora", "frozen"):
            ov = common + ["sharding.stage=2", "checkpoint.async=false"]
            res = os.path.join(root, f"resumed_{mode}")
            run(jobs[mode], 2, ov + [f"run_dir={res}", "train.steps=2"])
            held, _ = run(jobs[mode], 2, ov + [f"run_dir={res}"])
            assert held and set(held.values()) == {want[mode]}, held
            ref = os.path.join(root, f"ref_{mode}2")
            la = [(m.get("step"), m.get("loss")) for m in dp.losses(ref) if m.get("step", 0) > 2]
            lb = [(m.get("step"), m.get("loss")) for m in dp.losses(res) if m.get("step", 0) > 2 and "loss" in m]
            assert la and la == lb, f"resumed {mode}: losses differ\n{la}\n{lb}"
            for name in sorted(os.listdir(os.path.join(ref, "final"))):
                assert open(os.path.join(ref, "final", name), "rb").read() == \
                    open(os.path.join(res, "final", name), "rb").read(), f"resumed {mode}: final/{name} differs"
            last = sorted(x for x in os.listdir(os.path.join(ref, "checkpoints")) if x.endswith(".h5"))[-1]
            ia = dp.h5_items(os.path.join(ref, "checkpoints", last))
            ib = dp.h5_items(os.path.join(res, "checkpoints", last))
            for k in list(ia):
                if k.startswith("model/") or k.startswith("optim/") or "checksum" in k:
                    assert ia[k] == ib.get(k), f"resumed {mode}: {last} {k} differs"
            print(f"  {mode} resumed on 2 fake devices at ZeRO-2: losses, final/ and {last}'s tensors identical")

        # the plan's device weights shrink by exactly the floats held in bf16 only (4 bytes each)
        for mode in ("lora", "frozen"):
            pov = common + ["sharding.stage=1", "backend=cuda"]
            w_ref, w_new = plan_weights(jobs[mode], 8, pov, fb.KEEP)[0], plan_weights(jobs[mode], 8, pov, {})[0]
            assert w_ref - w_new == 4 * want[mode], (mode, w_ref, w_new, want[mode])
            print(f"  plan (backend=cuda, {mode}) device weights: {w_ref} B -> {w_new} B, {4 * want[mode]} B less")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_frozen_bf16_device: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
