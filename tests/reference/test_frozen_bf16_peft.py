"""The adapter modes' frozen base of a bf16 source held once, in bf16 (worker/model.h st_model_drop_frozen_fp32).

As tests/reference/test_frozen_bf16.py, for LoRA, DoRA and the prompt family, whose whole base is frozen: a Llama
model made with the CLI (fp32), converted here to a bf16 safetensors file with numpy (round to nearest even);
every job runs under precision bf16 twice, as shipped and with SHARDTUNE_FROZEN_FP32=1 (every fp32 copy kept:
the behaviour before). The two must agree exactly: every dataset and attribute of every checkpoint (h5py: the
adapters, their optimizer state, adapter_base_checksum summed from the widened base), final/ (the PEFT adapter
directory) byte for byte, the losses. Cases: LoRA and DoRA on 1 rank at ZeRO-0 (checkpoints written sync; LoRA
with eval.generate's samples: the merged view widens the base group by group) and on 2 ranks at ZeRO-2 (async
snapshot); prompt tuning, prefix tuning and P-tuning (LSTM encoder) on 1 rank; a LoRA run stopped at step 2 and resumed (the checkpoint's
base checksum checked against the base held in bf16 only); `export --merge` of the last checkpoint equal. The
trainer's report (SHARDTUNE_REPORT_LOAD_RSS=1) must name exactly the floats computed here from the safetensors
file (the untied embedding, every layer's 2-D weight and the untied head); ZeRO-3 is
test_frozen_bf16_zero3.py. The plan's weights shrink by 4 bytes per held float; measured peak RSS of a larger LoRA run (Llama
4 x 256, vocab 32000, 1 rank, ZeRO-1) matches the plan within 15% both ways and falls by the plan's saving
within 25% of it. The load phase of that run (read after the adapters are attached, the frozen BF16 tensors
straight into the bf16 copy, train.c load_late; with SHARDTUNE_FROZEN_FP32=1 every tensor as fp32) matches the
plan's at_load within 15% both ways, and is below 60% of the fp32 model with bf16 only; a resume of it (the
adapters read alone, the base only checked) matches the plan's peak with the resume phase within 15%.
"""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_dp_memory as mem  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402

LORA = "finetune: { mode: lora, lora: { r: 4, alpha: 8, targets: [q_proj, v_proj, o_proj, up_proj, down_proj] } }\n"
DORA = LORA.replace("alpha: 8,", "alpha: 8, dora: true,")
PROMPT = "finetune: { mode: prompt_tuning, prompt: { virtual_tokens: 5 } }\n"
PREFIX = "finetune: { mode: prefix_tuning, prefix: { virtual_tokens: 4 } }\n"
PTUNING = "finetune: { mode: p_tuning, prompt: { virtual_tokens: 4, encoder: lstm } }\n"


def base_floats(model):
    """Floats held in bf16 only under adapters: the untied embedding, every layer's 2-D weight, the head."""
    t = dp.read_safetensors(os.path.join(model, "model.safetensors"))
    return fb.held_floats(model, set(range(64))) + t["lm_head.weight"].size


def merged(rd, out):
    ck = sorted(x for x in os.listdir(os.path.join(rd, "checkpoints")) if x.endswith(".h5"))[-1]
    dp.sh([dp.BIN, "export", os.path.join(rd, "checkpoints", ck), "--merge", "--out", out])
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}


def make_jobs(root, texts):
    """The test model (Llama 2 x 64, vocab 256: fp32, and its bf16 copy), a dataset and a job over the bf16 model
    per (name, finetune section) of texts. Returns (fp32 dir, bf16 dir, {name: job path})."""
    f32 = dp.init_model(os.path.join(root, "f32"), "llama", 2, dim=64, heads=4, kv=2, vocab=256, max_seq=64)
    b16 = fb.to_bf16_dir(f32, os.path.join(root, "b16"))
    data = dp.make_dataset(os.path.join(root, "a.h5"), 256, 200, seed=1)
    return f32, b16, {name: dp.write_job(os.path.join(root, name + ".yaml"), b16, os.path.join(root, "x"),
                                         [{"name": "a", "path": data}], text) for name, text in texts}


def same_extras(ref, new, mode, more, tag):
    """eval.generate's samples (when the run made them) and, for LoRA / DoRA, `export --merge` of the last
    checkpoint of runs ref and new agree; returns tag with what was compared."""
    if "eval.generate.every_steps=2" in more:  # the merged view widens the base held in bf16 only
        sa = [json.loads(x)["output_ids"] for x in open(os.path.join(ref, "samples.jsonl"))]
        sb = [json.loads(x)["output_ids"] for x in open(os.path.join(new, "samples.jsonl"))]
        assert sa == sb and len(sa) >= 6, f"{tag}: samples differ\n{sa}\n{sb}"
        tag += ", eval.generate samples"
    if mode in ("lora", "dora"):
        ma, mb = merged(ref, os.path.join(ref, "xm")), merged(new, os.path.join(new, "xm"))
        assert ma == mb and ma, f"{tag}: export --merge differs"
        tag += ", export --merge"
    return tag


def main():
    t0 = time.time()
    root = dp.tmpdir("st_frozen_bf16_peft_")
    try:
        f32, b16, jobs = make_jobs(root, (("lora", LORA), ("dora", DORA), ("prompt", PROMPT), ("prefix", PREFIX),
                                          ("ptuning", PTUNING)))
        common = ["train.steps=4", "train.seq_len=16", "train.micro_batch=4", "train.schedule=constant",
                  "train.warmup_steps=0", "precision=bf16", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
        want = base_floats(b16)
        sync, asyn = ["checkpoint.async=false"], ["checkpoint.async=true"]
        prompts = os.path.join(root, "prompts.jsonl")
        with open(prompts, "w") as f:
            for k in range(3):
                f.write(json.dumps({"input_ids": [(7 * k + j) % 256 for j in range(5)]}) + "\n")
        gen = ["eval.generate.every_steps=2", f"eval.generate.prompts={prompts}", "eval.generate.max_new=6"]
        cases = [("lora", 1, 0, sync + gen), ("dora", 1, 0, sync), ("lora", 2, 2, asyn), ("dora", 2, 2, asyn),
                 ("prompt", 1, 1, sync), ("prefix", 1, 1, asyn), ("ptuning", 1, 0, asyn)]
        for mode, ranks, zero, more in cases:
            tag = f"{mode} {ranks} rank(s) ZeRO-{zero}"
            ov = common + [f"sharding.stage={zero}"] + more
            ref, new = os.path.join(root, f"ref_{mode}{zero}"), os.path.join(root, f"new_{mode}{zero}")
            held_ref = fb.run(jobs[mode], ranks, ov + [f"run_dir={ref}"], fb.KEEP)
            held = fb.run(jobs[mode], ranks, ov + [f"run_dir={new}"])
            assert set(held_ref.values()) == {0}, f"{tag}: the hook kept nothing in bf16 only: {held_ref}"
            assert len(held) == ranks and set(held.values()) == {want}, f"{tag}: held {held}, want {want}"
            k = fb.same_run(ref, new, tag)
            tag = same_extras(ref, new, mode, more, tag)
            print(f"  {tag}: {want} base floats in bf16 only; {k} checkpoints, final/, losses identical")

        # resume: stopped at step 2, resumed to step 4 (check_base sums the base held in bf16 only)
        ov = common + ["sharding.stage=2", "checkpoint.async=false"]
        res = os.path.join(root, "resumed")
        fb.run(jobs["lora"], 2, ov + [f"run_dir={res}", "train.steps=2"])
        held = fb.run(jobs["lora"], 2, ov + [f"run_dir={res}"])
        assert held and set(held.values()) == {want}, held
        ref = os.path.join(root, "ref_lora_resume")
        fb.run(jobs["lora"], 2, ov + [f"run_dir={ref}"], fb.KEEP)
        for name in sorted(os.listdir(os.path.join(ref, "final"))):
            assert open(os.path.join(ref, "final", name), "rb").read() == \
                open(os.path.join(res, "final", name), "rb").read(), f"resumed: final/{name} differs"
        last = sorted(x for x in os.listdir(os.path.join(ref, "checkpoints")) if x.endswith(".h5"))[-1]
        ia = dp.h5_items(os.path.join(ref, "checkpoints", last))
        ib = dp.h5_items(os.path.join(res, "checkpoints", last))
        for k in list(ia):
            if k.startswith("model/") or k.startswith("optim/") or k == "@adapter_base_checksum":
                assert ia[k] == ib.get(k), f"resumed: {last} {k} differs"
        assert "@adapter_base_checksum" in ia, sorted(ia)[:10]
        print(f"  LoRA resumed on 2 ranks at ZeRO-2: final/ and {last}'s tensors and base checksum identical")

        # the plan counts it: 4 bytes less per held float, only for the bf16 source
        pov = common + ["sharding.stage=1"]
        w_new = mem.plan(jobs["lora"], 1, pov)["stages"][0]["ranks"][0]["bytes"]["weights"]
        w_f32 = mem.plan(jobs["lora"], 1, pov + [f"model.path={f32}"])["stages"][0]["ranks"][0]["bytes"]["weights"]
        assert w_f32 - w_new == 4 * want, (w_f32, w_new, want)
        print(f"  plan weights (LoRA): {w_f32} B (fp32 source) -> {w_new} B (bf16 source), {4 * want} B less")

        # measured: a larger LoRA run, plan vs peak RSS within 15% (baseline as test_dp_memory), before/after
        big = fb.to_bf16_dir(dp.init_model(os.path.join(root, "big32"), "llama", 4, dim=256, heads=4, kv=2,
                                           vocab=32000, max_seq=128), os.path.join(root, "big"))
        small = dp.init_model(os.path.join(root, "small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
        d128 = dp.make_dataset(os.path.join(root, "b.h5"), 128, 200, seed=1)
        job = dp.write_job(os.path.join(root, "rss.yaml"), big, os.path.join(root, "x"), [{"name": "a", "path": d128}],
                           LORA)
        ov = ["train.steps=2", "train.micro_batch=4", "train.seq_len=64", "sharding.stage=1", "precision=bf16"]
        bov = ov + [f"model.path={small}", f"run_dir={root}/base"]
        base = mem.measured_rss(job, 1, bov)[0] - mem.plan(job, 1, bov)["peak_bytes"]
        # and the load phase (train.c load_late: the frozen BF16 tensors read straight into the bf16 copy): what
        # loading adds to the resident set (the trainer's reports, test_dp_memory.load_rss) against the plan's
        # at_load within 15%, near 2 bytes per held float, far below the fp32 model the load held before
        got, loads = {}, {}
        for name, env in (("fp32 copy kept", fb.KEEP), ("bf16 only", {})):
            rov = ov + [f"model.path={big}", f"run_dir={root}/big_{len(env)}"]
            old = dict(dp.ENV)
            dp.ENV.update(env)
            try:
                p = mem.plan(job, 1, rov)
                plan_b = mem.expected_per_rank(p)[0]
                rss = mem.measured_rss(job, 1, rov)[0]
                load = mem.load_rss(job, ov + [f"model.path={big}", f"run_dir={root}/load_{len(env)}"])
            finally:
                dp.ENV.clear()
                dp.ENV.update(old)
            net = rss - base
            err = (net - plan_b) / plan_b
            got[name] = (plan_b, rss)
            print(f"  LoRA bf16 Llama 4 x 256 V32000 1 rank ZeRO-1, {name}: plan {plan_b / 2**20:6.1f} MiB, "
                  f"measured {rss / 2**20:6.1f} MiB - baseline = {net / 2**20:6.1f} MiB ({err:+.1%})")
            assert abs(err) <= mem.TOL, f"{name}: estimate off by {err:+.1%}"
            want = p["stages"][0]["ranks"][0]["bytes"]["at_load"]
            err = (load - want) / want
            loads[name] = (want, load, p["model"]["n_weights"] * 4)
            print(f"  load phase, {name}: plan {want / 2**20:6.1f} MiB, measured {load / 2**20:6.1f} MiB ({err:+.1%}); "
                  f"fp32 model {loads[name][2] / 2**20:.1f} MiB")
            assert abs(err) <= mem.TOL, f"load phase, {name}: estimate off by {err:+.1%}"
        saved = got["fp32 copy kept"][1] - got["bf16 only"][1]
        plan_saved = got["fp32 copy kept"][0] - got["bf16 only"][0]
        print(f"  peak RSS saved: {saved / 2**20:.1f} MiB (plan: {plan_saved / 2**20:.1f} MiB)")
        assert plan_saved > 0 and abs(saved - plan_saved) <= 0.25 * plan_saved, (saved, plan_saved)
        want, load, f32_bytes = loads["bf16 only"]
        assert want < 0.6 * f32_bytes and load < 0.6 * f32_bytes, loads

        # a resume (train_ckpt.c own_base): the adapters read into an image of their own, the base only checked
        # against adapter_base_checksum a piece at a time; its peak against the plan's (resume phase included)
        rov = ov + [f"model.path={big}", f"run_dir={root}/res", "checkpoint.every_steps=2", "checkpoint.async=false"]
        mem.measured_rss(job, 1, rov)
        p = mem.plan(job, 1, rov + ["train.steps=3"])
        want = max(p["rank_peak_bytes"][0], p["stages"][0]["ranks"][0]["bytes"]["at_resume"])
        net = mem.measured_rss(job, 1, rov + ["train.steps=3"])[0] - base
        err = (net - want) / want
        print(f"  resumed, bf16 only: plan {want / 2**20:6.1f} MiB, measured - baseline {net / 2**20:6.1f} MiB ({err:+.1%})")
        assert abs(err) <= mem.TOL, f"resume: estimate off by {err:+.1%}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_frozen_bf16_peft: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
