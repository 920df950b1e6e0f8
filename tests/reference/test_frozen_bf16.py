"""Frozen weights of a bf16 source held once, in bf16 (worker/model.h st_model_drop_frozen_fp32).

A Llama model is made with the CLI (fp32) and converted here to a bf16 safetensors file with numpy (round to
nearest even; config.json torch_dtype bfloat16). Every job runs under precision bf16 twice: as shipped, and
with SHARDTUNE_FROZEN_FP32=1 (every fp32 copy kept: the behaviour before the feature). The two must agree
exactly: every dataset and attribute of every checkpoint (h5py), final/ byte for byte, the losses in
metrics.jsonl. Cases: frozen on 1 rank at ZeRO-0 and on 2 ranks at ZeRO-1 and ZeRO-2, progressive (a stage
change that makes held-in-bf16 layers trainable again: their fp32 masters widened back) on 2 ranks at ZeRO-1;
checkpoints written sync (from the live buffers, ZeRO-0/1) and async (the snapshot copy, ZeRO-2, progressive); and a progressive run stopped at the stage boundary and resumed; eval.generate's samples (generation reads fp32
weights: widened back for it) equal too.
The trainer's report (SHARDTUNE_REPORT_LOAD_RSS=1) must name exactly the frozen floats computed here from the
safetensors file: the untied embedding and the frozen layers' matmul weights; 0 for the fp32 source (its
values are not bf16 values: it keeps today's layout; also at ZeRO-3, where the ranks agree on it with one
all-reduce; the bf16 source at ZeRO-3 is test_frozen_bf16_zero3.py) and with the hook set. The plan's weights shrink by 4 bytes per held float. Measured peak RSS of a larger frozen run
(Llama 4 x 256, vocab 32000, 1 rank, ZeRO-1) must match the plan within 15% as in test_dp_memory, both ways,
and fall by the plan's saving within 25% of it.
"""
import json
import os
import shutil
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_dp_memory as mem  # noqa: E402

KEEP = {"SHARDTUNE_FROZEN_FP32": "1"}


def rewrite_safetensors(path, fn):
    """Rewrites safetensors file `path` tensor by tensor: fn(name, dtype, raw bytes) -> (dtype, raw bytes)."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    body, out = raw[8 + n:], {}
    blobs, at = [], 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = e["data_offsets"]
        dtype, r = fn(name, e["dtype"], body[a:b])
        out[name] = {"dtype": dtype, "shape": e["shape"], "data_offsets": [at, at + len(r)]}
        blobs.append(r)
        at += len(r)
    if meta is not None:
        out["__metadata__"] = meta
    h = json.dumps(out).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def to_bf16(name, dtype, r):
    """An F32 tensor's bytes rounded to BF16 (nearest even)."""
    assert dtype == "F32", (name, dtype)
    u = np.frombuffer(r, dtype="<u4").astype(np.uint64)
    return "BF16", ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def to_bf16_dir(src, dst):
    """Copies model dir src to dst with every F32 tensor rounded to BF16 (nearest even)."""
    shutil.copytree(src, dst)
    rewrite_safetensors(os.path.join(dst, "model.safetensors"), to_bf16)
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "bfloat16"
    json.dump(cfg, open(cfg_path, "w"))
    return dst


def held_floats(model, frozen_layers):
    """Floats the feature holds in bf16 only: the untied embedding and the frozen layers' 2-D weights."""
    t = dp.read_safetensors(os.path.join(model, "model.safetensors"))
    assert "lm_head.weight" in t, "the test model must have an untied head"
    n = t["model.embed_tokens.weight"].size
    for name, a in t.items():
        if name.startswith("model.layers.") and a.ndim == 2 and int(name.split(".")[2]) in frozen_layers:
            n += a.size
    return n


def run(job, ranks, ov, env_extra=None):
    env = dict(dp.ENV, SHARDTUNE_REPORT_LOAD_RSS="1", **(env_extra or {}))
    args = [dp.BIN, "train", job] + ov
    if ranks > 1:
        args = ["mpirun", "--oversubscribe", "-np", str(ranks)] + args
    import subprocess
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    held = {}
    for x in r.stderr.splitlines():
        if "frozen weights held in bf16 only" in x:
            rank = int(x.split("rank ")[1].split(":")[0])
            stage = int(x.split("stage ")[1].split(":")[0])
            held[(rank, stage)] = int(x.split(":")[-1].split()[0])
    return held


def same_run(a, b, what):
    """Checkpoints (h5py), final/ (bytes) and losses of run dirs a and b agree exactly."""
    la = [(m.get("step"), m.get("loss")) for m in dp.losses(a)]
    lb = [(m.get("step"), m.get("loss")) for m in dp.losses(b)]
    assert la == lb and la, f"{what}: losses differ\n{la}\n{lb}"
    ca = sorted(x for x in os.listdir(os.path.join(a, "checkpoints")) if x.endswith(".h5"))
    cb = sorted(x for x in os.listdir(os.path.join(b, "checkpoints")) if x.endswith(".h5"))
    assert ca == cb and ca, f"{what}: checkpoints {ca} vs {cb}"
    for name in ca:
        ia, ib = dp.h5_items(os.path.join(a, "checkpoints", name)), dp.h5_items(os.path.join(b, "checkpoints", name))
        ia.pop("@job_spec", None)  # names the run_dir, which differs
        ib.pop("@job_spec", None)
        assert ia.keys() == ib.keys(), f"{what} {name}: {sorted(set(ia) ^ set(ib))}"
        bad = [k for k in ia if ia[k] != ib[k]]
        assert not bad, f"{what} {name}: differ: {bad[:5]}"
    fa, fb = sorted(os.listdir(os.path.join(a, "final"))), sorted(os.listdir(os.path.join(b, "final")))
    assert fa == fb, f"{what}: final/ {fa} vs {fb}"
    for name in fa:
        assert open(os.path.join(a, "final", name), "rb").read() == open(os.path.join(b, "final", name), "rb").read(), \
            f"{what}: final/{name} differs"
    return len(ca)


def main():
    t0 = time.time()
    root = dp.tmpdir("st_frozen_bf16_")
    try:
        f32 = dp.init_model(os.path.join(root, "f32"), "llama", 4, dim=64, heads=4, kv=2, vocab=256, max_seq=64)
        b16 = to_bf16_dir(f32, os.path.join(root, "b16"))
        data = dp.make_dataset(os.path.join(root, "a.h5"), 256, 200, seed=1)
        prog = ('finetune: { mode: progressive, stages: [ {at_step: 0, train_layers: "-1"}, '
                '{at_step: 2, train_layers: "-3"} ] }\n')
        jobs = {"frozen": dp.write_job(os.path.join(root, "frozen.yaml"), b16, os.path.join(root, "x"),
                                       [{"name": "a", "path": data}],
                                       'finetune: { mode: frozen, train_layers: "-1" }\n'),
                "progressive": dp.write_job(os.path.join(root, "prog.yaml"), b16, os.path.join(root, "x"),
                                            [{"name": "a", "path": data}], prog)}
        common = ["train.steps=4", "train.seq_len=16", "train.micro_batch=4", "train.schedule=constant",
                  "train.warmup_steps=0", "precision=bf16", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
        want1 = held_floats(b16, {0, 1, 2})  # train_layers -1: layer 3, final norm and head train
        want3 = held_floats(b16, {0})        # -3: layers 1-3
        sync = ["checkpoint.async=false"]  # written from the live buffers: the bf16-only rows widened by the writer
        prompts = os.path.join(root, "prompts.jsonl")
        with open(prompts, "w") as f:
            for k in range(3):
                f.write(json.dumps({"input_ids": [(7 * k + j) % 256 for j in range(5)]}) + "\n")
        gen = ["eval.generate.every_steps=2", f"eval.generate.prompts={prompts}", "eval.generate.max_new=6"]
        for mode, ranks, zero, more in [("frozen", 1, 0, sync + gen), ("frozen", 2, 1, sync), ("frozen", 2, 2, []),
                                        ("progressive", 2, 1, ["checkpoint.async=true"])]:
            tag = f"{mode} {ranks} rank(s) ZeRO-{zero}"
            ov = common + [f"sharding.stage={zero}"] + more
            ref, new = os.path.join(root, f"ref_{mode}{zero}"), os.path.join(root, f"new_{mode}{zero}")
            held_ref = run(jobs[mode], ranks, ov + [f"run_dir={ref}"], KEEP)
            held = run(jobs[mode], ranks, ov + [f"run_dir={new}"])
            assert set(held_ref.values()) == {0}, f"{tag}: the hook kept nothing in bf16 only: {held_ref}"
            for (r, s), n in held.items():
                assert n == (want1 if s == 0 else want3), f"{tag}: rank {r} stage {s} held {n}, want {want1}/{want3}"
            assert len(held) == ranks * (2 if mode == "progressive" else 1), held
            k = same_run(ref, new, tag)
            if "eval.generate.every_steps=2" in more:  # generation reads fp32 weights: widened back for it
                sa = [json.loads(x)["output_ids"] for x in open(os.path.join(ref, "samples.jsonl"))]
                sb = [json.loads(x)["output_ids"] for x in open(os.path.join(new, "samples.jsonl"))]
                assert sa == sb and len(sa) >= 6, f"{tag}: samples differ\n{sa}\n{sb}"
                tag += ", eval.generate samples"
            print(f"  {tag}: {held[(0, 0)]} frozen floats in bf16 only; {k} checkpoints, final/, losses identical")

        # resume across the stage change: stopped at step 2 (stage 0), resumed to step 4 (stage 1)
        ov = common + ["sharding.stage=1"]
        res = os.path.join(root, "resumed")
        run(jobs["progressive"], 2, ov + [f"run_dir={res}", "train.steps=2"])
        held = run(jobs["progressive"], 2, ov + [f"run_dir={res}"])
        assert held and all(n in (want1, want3) for n in held.values()), held
        ref = os.path.join(root, "ref_progressive_sync")
        run(jobs["progressive"], 2, ov + [f"run_dir={ref}"], KEEP)
        fa = sorted(os.listdir(os.path.join(ref, "final")))
        for name in fa:
            assert open(os.path.join(ref, "final", name), "rb").read() == \
                open(os.path.join(res, "final", name), "rb").read(), f"resumed: final/{name} differs"
        last = sorted(x for x in os.listdir(os.path.join(ref, "checkpoints")) if x.endswith(".h5"))[-1]
        ia, ib = dp.h5_items(os.path.join(ref, "checkpoints", last)), dp.h5_items(os.path.join(res, "checkpoints", last))
        for k in list(ia):
            if k.startswith("model/") or k.startswith("optim/"):
                assert ia[k] == ib.get(k), f"resumed: {last} {k} differs"
        print(f"  progressive resumed at the stage change: final/ and {last}'s tensors identical")

        # what keeps today's layout: an fp32 source (ZeRO-3: test_frozen_bf16_zero3.py)
        held = run(jobs["frozen"], 1, common + ["sharding.stage=1", f"run_dir={root}/f32run", f"model.path={f32}"])
        assert set(held.values()) == {0}, f"fp32 source: {held}"
        held = run(jobs["frozen"], 2, common + ["sharding.stage=3", f"run_dir={root}/z3run", f"model.path={f32}"])
        assert set(held.values()) == {0}, f"fp32 source, ZeRO-3: {held}"
        print("  fp32 source (ZeRO-1 and ZeRO-3): nothing held in bf16 only (today's layout)")

        # the plan counts it: 4 bytes less per held float (rank weights), only for the bf16 source
        pov = common + ["sharding.stage=1"]
        p_new = mem.plan(jobs["frozen"], 1, pov)
        p_f32 = mem.plan(jobs["frozen"], 1, pov + [f"model.path={f32}"])
        w_new = p_new["stages"][0]["ranks"][0]["bytes"]["weights"]
        w_f32 = p_f32["stages"][0]["ranks"][0]["bytes"]["weights"]
        assert w_f32 - w_new == 4 * want1, (w_f32, w_new, want1)
        print(f"  plan weights: {w_f32} B (fp32 source) -> {w_new} B (bf16 source), {4 * want1} B less")

        # measured: a larger model, plan vs peak RSS within 15% (baseline as test_dp_memory), before/after
        big = to_bf16_dir(dp.init_model(os.path.join(root, "big32"), "llama", 4, dim=256, heads=4, kv=2,
                                        vocab=32000, max_seq=128), os.path.join(root, "big"))
        small = dp.init_model(os.path.join(root, "small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
        d128 = dp.make_dataset(os.path.join(root, "b.h5"), 128, 200, seed=1)
        jobs["frozen"] = dp.write_job(os.path.join(root, "rss.yaml"), big, os.path.join(root, "x"),
                                      [{"name": "a", "path": d128}], 'finetune: { mode: frozen, train_layers: "-1" }\n')
        ov = ["train.steps=2", "train.micro_batch=4", "train.seq_len=64", "sharding.stage=1", "precision=bf16"]
        bov = ov + [f"model.path={small}", f"run_dir={root}/base"]
        base = mem.measured_rss(jobs["frozen"], 1, bov)[0] - mem.plan(jobs["frozen"], 1, bov)["peak_bytes"]
        got = {}
        for name, env in (("fp32 copy kept", KEEP), ("bf16 only", {})):
            rov = ov + [f"model.path={big}", f"run_dir={root}/big_{len(env)}"]
            old = dict(dp.ENV)
            dp.ENV.update(env)
            try:
                want = mem.expected_per_rank(mem.plan(jobs["frozen"], 1, rov))[0]
                rss = mem.measured_rss(jobs["frozen"], 1, rov)[0]
            finally:
                dp.ENV.clear()
                dp.ENV.update(old)
            net = rss - base
            err = (net - want) / want
            got[name] = (want, rss)
            print(f"  frozen bf16 Llama 4 x 256 V32000 1 rank ZeRO-1, {name}: plan {want / 2**20:6.1f} MiB, "
                  f"measured {rss / 2**20:6.1f} MiB - baseline = {net / 2**20:6.1f} MiB ({err:+.1%})")
            assert abs(err) <= mem.TOL, f"{name}: estimate off by {err:+.1%}"
        saved, plan_saved = got["fp32 copy kept"][1] - got["bf16 only"][1], got["fp32 copy kept"][0] - got["bf16 only"][0]
        print(f"  peak RSS saved: {saved / 2**20:.1f} MiB (plan: {plan_saved / 2**20:.1f} MiB)")
        assert plan_saved > 0 and abs(saved - plan_saved) <= 0.25 * plan_saved, (saved, plan_saved)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_frozen_bf16: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
