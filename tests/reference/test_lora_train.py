"""LoRA training across ranks (finetune.mode: lora), with real MPI ranks (mpirun, OMP_NUM_THREADS=1).

Checked, for a Llama model with adapters on all seven projections and a GPT-2 model with c_attn/c_proj/c_fc
adapters on its last layer only (rsLoRA):
  * the same global batch of 12 sequences split as 1 rank ZeRO-0, 2 ranks ZeRO-1 and 2 ranks x 2
    micro-batches ZeRO-2 gives per-step losses within 1e-6 relative and final adapters within lr/10
    (AdamW's per-element sqrt(v) division amplifies fp32 noise in tiny gradients, as test_dp_equivalence
    explains; the losses are the tight check), and the loss goes down;
  * RUN_DIR/final/ is a peft adapter directory: exactly the tensor names and shapes peft's
    get_peft_model_state_dict gives for this model and config (derived here from the HF module tree:
    base_model.model.<module>.lora_A.weight [r, in], lora_B.weight [out, r]; GPT-2 modules under
    transformer., Conv1D in/out from its [in, out] weight), and adapter_config.json's LoraConfig fields;
    every lora_B trained away from its zero init;
  * `export CKPT --format peft` equals final/ bit for bit; `export CKPT --merge` equals `export final --merge`;
  * checkpoints hold the adapters only (/model/<name>.lora_A/B.weight, their AdamW moments) and the base
    model's checksum (root attribute adapter_base_checksum), not the base tensors;
  * resume at another world size: 3 steps on 2 ranks, then resumed to 6 steps on 1 rank, equals 6
    uninterrupted steps on 1 rank (losses 1e-6 relative, adapters lr/10);
  * the base stays bit-unchanged: resuming verifies adapter_base_checksum (every base tensor's bits, as the 2-rank
    run held them when it saved) against model.path's weights, and it passes; the same resume against a
    copy of the base with one weight changed by one ulp is refused with one line;
  * DoRA (dora: true, Llama q/v/down): the same 1 vs 2 ranks equality, lora_magnitude_vector [out] tensors;
  * lora.dropout 0.2 (masks keyed by seed, step and global sample, worker/lora.h): two runs with one seed give
    bit-identical losses and adapters; 1 rank and 2 ranks x 2 micro-batches (ZeRO-2) give the same losses
    (1e-6) since the masks do not depend on the split; another seed and dropout 0 give other losses after
    step 1 (step 1 is the base model: B = 0); final/'s adapter_config.json says lora_dropout 0.2, and `eval
    --adapter` equals the merged model's eval (dropout is off in eval; reference.peft_adapters checks the
    same adapter against peft in eval mode);
  * refusals with one line naming the key: r: 0, an unknown target, a GPT-2 target on Llama, dropout with
    dora, layers outside the model.
"""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402

TOL, LR = 1e-6, 1e-2
SPLITS = [(1, 12, 1, 0), (2, 6, 1, 1), (2, 3, 2, 2)]
LLAMA_T = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def expected_adapter(cfg, targets, r, layers, dora=False):
    """peft's state-dict names and shapes for a LoRA on this HF config (independent of shardtune); DoRA adds
    <module>.lora_magnitude_vector [out] (peft saves it without ".weight")."""
    out = expected_lora(cfg, targets, r, layers)
    if dora:
        for k, shp in list(out.items()):
            if k.endswith(".lora_B.weight"):
                out[k[: -len(".lora_B.weight")] + ".lora_magnitude_vector"] = (shp[0],)
    return out


def expected_lora(cfg, targets, r, layers):
    out = {}
    if cfg["model_type"] == "gpt2":
        C = cfg["n_embd"]
        F = cfg.get("n_inner") or 4 * C
        mods = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, F), "mlp.c_proj": (F, C)}
        for l in range(cfg["n_layer"]):
            for mod, (i, o) in mods.items():
                if l in layers and mod.split(".")[1] in targets:
                    p = f"base_model.model.transformer.h.{l}.{mod}"
                    out[p + ".lora_A.weight"], out[p + ".lora_B.weight"] = (r, i), (o, r)
        return out
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or C // H
    KV, F = cfg.get("num_key_value_heads") or H, cfg["intermediate_size"]
    mods = {"q_proj": ("self_attn", C, H * hd), "k_proj": ("self_attn", C, KV * hd), "v_proj": ("self_attn", C, KV * hd),
            "o_proj": ("self_attn", H * hd, C), "gate_proj": ("mlp", C, F), "up_proj": ("mlp", C, F),
            "down_proj": ("mlp", F, C)}
    for l in range(cfg["num_hidden_layers"]):
        for t in targets:
            if l in layers:
                blk, i, o = mods[t]
                p = f"base_model.model.model.layers.{l}.{blk}.{t}"
                out[p + ".lora_A.weight"], out[p + ".lora_B.weight"] = (r, i), (o, r)
    return out


def job_text(model, lora):
    return ("finetune: { mode: lora, lora: " + lora + " }\n"
            "train: { steps: 6, micro_batch: 12, grad_accum: 1, seq_len: 16, lr: 1.0e-2, warmup_steps: 0, "
            "schedule: constant, weight_decay: 0.0, grad_clip: 1.0, log_every: 100 }\n")


def run_split(job, rd, split, steps=6, more=()):
    n, mb, acc, zero = split
    dp.train(job, n, [f"run_dir={rd}", f"train.steps={steps}", f"train.micro_batch={mb}", f"train.grad_accum={acc}",
                      f"sharding.stage={zero}"] + list(more))
    return [r["loss"] for r in dp.losses(rd)]


def adapters_only_checkpoint(rd, adapter, name):
    ck = os.path.join(rd, "checkpoints")
    last = sorted(f for f in os.listdir(ck) if f.endswith(".h5"))[-1]
    want = {k[len("base_model.model."):] for k in adapter}
    want = {k[len("transformer."):] if k.startswith("transformer.") else k for k in want}
    with h5py.File(os.path.join(ck, last), "r") as f:
        assert set(f["model"].keys()) == want, f"{name}: checkpoint /model holds {sorted(f['model'].keys())}"
        assert set(f["optim"].keys()) == want, f"{name}: checkpoint /optim holds {sorted(f['optim'].keys())}"
        assert "adapter_base_checksum" in f.attrs, f"{name}: no adapter_base_checksum attribute"


def export_checks(rd, final_w, name):
    """export of the run's last checkpoint: --format peft gives final/'s adapter bit for bit; --merge of the
    checkpoint and of final/ give the same merged model."""
    ck = os.path.join(rd, "checkpoints")
    dp.sh([dp.BIN, "export", ck, "--format", "peft", "--out", os.path.join(rd, "x_peft")])
    w = dp.read_safetensors(os.path.join(rd, "x_peft", "adapter_model.safetensors"))
    assert set(w) == set(final_w) and all(np.array_equal(w[k], final_w[k]) for k in w), f"{name}: export --format peft"
    dp.sh([dp.BIN, "export", ck, "--merge", "--out", os.path.join(rd, "x_m1")])
    dp.sh([dp.BIN, "export", os.path.join(rd, "final"), "--merge", "--out", os.path.join(rd, "x_m2")])
    a = dp.read_safetensors(os.path.join(rd, "x_m1", "model.safetensors"))
    b = dp.read_safetensors(os.path.join(rd, "x_m2", "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), f"{name}: merged exports differ"


def check_case(root, name, model, data, lora, targets, r, alpha, rslora, layers, dora=False):
    base = os.path.join(root, name)
    os.makedirs(base)
    job = dp.write_job(os.path.join(base, "job.yaml"), model, os.path.join(base, "run"),
                       [{"name": "a", "path": data}], job_text(model, lora))
    # write_job's train line comes first; ours (later in the file) would be a duplicate key: drop theirs
    text = open(job).read().splitlines()
    text = [l for l in text if not (l.startswith("train:") and "lr: 3.0e-3" in l)]
    open(job, "w").write("\n".join(text) + "\n")
    cfg = json.load(open(os.path.join(model, "config.json")))
    ref = ref_w = None
    for split in SPLITS:
        rd = os.path.join(base, "r%dx%dx%dz%d" % split)
        got = run_split(job, rd, split)
        w = dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))
        if ref is None:
            ref, ref_w = got, w
            assert got[-1] < got[0] - 0.02, f"{name}: no learning {got}"
            want = expected_adapter(cfg, targets, r, layers, dora)
            shapes = {k: tuple(v.shape) for k, v in w.items()}
            assert shapes == want, f"{name}: adapter tensors {sorted(shapes.items())} != peft's {sorted(want.items())}"
            for k, v in w.items():
                if k.endswith("lora_B.weight"):
                    assert np.abs(v).max() > 0, f"{name}: {k} never trained"
            ac = json.load(open(os.path.join(rd, "final", "adapter_config.json")))
            exp = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
                   "use_dora": dora, "bias": "none", "fan_in_fan_out": cfg["model_type"] == "gpt2",
                   "layers_to_transform": None if len(layers) == (cfg.get("n_layer") or cfg.get("num_hidden_layers"))
                   else sorted(layers)}
            for k, v in exp.items():
                assert ac.get(k) == v, f"{name}: adapter_config.json {k} = {ac.get(k)!r}, want {v!r}"
            assert sorted(ac["target_modules"]) == sorted(targets), f"{name}: target_modules {ac['target_modules']}"
            adapters_only_checkpoint(rd, w, name)
            export_checks(rd, w, name)
            print(f"  {name}: adapter names/shapes/config as peft, adapter-only checkpoint, losses {got[0]:.4f} -> {got[-1]:.4f}")
            continue
        worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
        wdiff = max(float(np.max(np.abs(ref_w[t].astype(np.float64) - w[t]))) for t in w)
        assert worst <= TOL, f"{name} {split}: losses differ by {worst:.3g}\n ref {ref}\n got {got}"
        assert wdiff <= 0.1 * LR, f"{name} {split}: adapters differ by {wdiff:.3g}"
        print(f"  {name} %d rank(s) x micro %d x accum %d ZeRO-%d: loss diff {worst:.2e}, adapter diff {wdiff:.2e}" % split)
    return job, ref, ref_w


def resume_case(root, job, model, ref, ref_w):
    # ref: 6 uninterrupted steps on 1 rank. Here 3 steps on 2 ranks (ZeRO-2), then 1 rank resumes to 6.
    rd = os.path.join(root, "resume")
    run_split(job, rd, (2, 6, 1, 2), steps=3, more=["checkpoint.every_steps=3"])
    # another base (one weight one ulp away): an explicit resume is refused by adapter_base_checksum (resume: auto
    # would warn and start fresh)
    other = os.path.join(root, "other_base")
    shutil.copytree(model, other)
    t = dp.read_safetensors(os.path.join(other, "model.safetensors"))
    raw = bytearray(open(os.path.join(other, "model.safetensors"), "rb").read())
    raw[-4] ^= 1  # lowest mantissa bit of the last element of the last tensor
    open(os.path.join(other, "model.safetensors"), "wb").write(bytes(raw))
    assert len(t) > 0
    r = dp.sh([dp.BIN, "train", job, f"run_dir={rd}", f"model.path={other}", "train.steps=6", "train.micro_batch=12",
               "sharding.stage=0", f"resume={rd}/checkpoints/step-00000003.h5"], check=False)
    lines = [x for x in r.stderr.strip().splitlines() if x]
    assert r.returncode != 0 and len(lines) == 1 and "another base model" in lines[0], f"other base: {r.stderr!r}"
    print(f"  refuses a resume on another base: {lines[0]}")
    got = run_split(job, rd, (1, 12, 1, 0), steps=6, more=["resume=auto"])
    assert len(got) == 6, f"resume: {len(got)} metrics rows"
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    w = dp.read_safetensors(os.path.join(rd, "final", "adapter_model.safetensors"))
    wdiff = max(float(np.max(np.abs(ref_w[t].astype(np.float64) - w[t]))) for t in w)
    assert worst <= TOL and wdiff <= 0.1 * LR, f"resume: loss diff {worst:.3g}, adapter diff {wdiff:.3g}"
    print(f"  resume 2 ranks -> 1 rank at step 3: loss diff {worst:.2e}, adapter diff {wdiff:.2e}")


def refusals(job):
    for override, needle in [("finetune.lora.r=0", "finetune.lora.r"), ("finetune.lora.targets=[qq_proj]", "qq_proj"),
                             ("finetune.lora.targets=[c_attn]", "c_attn"),
                             ("finetune.lora.layers=7-9", "finetune.lora.layers")]:
        r = dp.sh([dp.BIN, "train", job, *override.split(), "run_dir=" + os.path.dirname(job) + "/refused"], check=False)
        lines = [x for x in r.stderr.strip().splitlines() if x]
        assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], \
            f"{override}: rc {r.returncode}, stderr {r.stderr!r}"
        print(f"  refuses {override}: {lines[0]}")


def dropout_case(root, job):
    runs = {}
    for name, split, more in [("a", (1, 12, 1, 0), []), ("again", (1, 12, 1, 0), []), ("split", (2, 3, 2, 2), []),
                              ("seed", (1, 12, 1, 0), ["seed=8"])]:
        rd = os.path.join(root, "dropout_" + name)
        runs[name] = (run_split(job, rd, split, more=["finetune.lora.dropout=0.2"] + more), rd)
    none = run_split(job, os.path.join(root, "dropout_none"), (1, 12, 1, 0))
    (a, ra), (again, rg) = runs["a"], runs["again"]
    wa = dp.read_safetensors(os.path.join(ra, "final", "adapter_model.safetensors"))
    wg = dp.read_safetensors(os.path.join(rg, "final", "adapter_model.safetensors"))
    assert a == again and all(np.array_equal(wa[k], wg[k]) for k in wa), f"dropout: one seed, two results {a} {again}"
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, runs["split"][0]))
    assert worst <= TOL, f"dropout: 1 rank vs 2 ranks x 2 micro-batches differ by {worst:.3g}\n {a}\n {runs['split'][0]}"
    other = runs["seed"][0]
    assert abs(a[0] - none[0]) <= TOL * abs(a[0]), f"dropout: step 1 (B = 0) {a[0]} != no dropout {none[0]}"
    assert all(abs(x - y) > 1e-7 for x, y in zip(a[1:], none[1:])), f"dropout changes nothing: {a} {none}"
    assert any(abs(x - y) > 1e-7 for x, y in zip(a[1:], other[1:])), f"dropout: another seed, same losses {a}"
    ac = json.load(open(os.path.join(ra, "final", "adapter_config.json")))
    assert ac["lora_dropout"] == 0.2, f"adapter_config.json lora_dropout {ac['lora_dropout']}"
    cfg_model = [l.split("path:")[1].strip(" }\n") for l in open(job) if l.startswith("model:")][0]
    merged = os.path.join(ra, "merged")
    dp.sh([dp.BIN, "export", os.path.join(ra, "final"), "--merge", "--out", merged])
    data = [l.split("path:")[1].strip(" }\n") for l in open(job) if "path:" in l and l.strip().startswith("-")][0]

    def ev(extra):
        r = dp.sh([dp.BIN, "eval", "--data", data, "--seq-len", "16", "--json"] + extra)
        return json.loads(r.stdout)["loss"]
    e1, e2 = ev(["--model", cfg_model, "--adapter", os.path.join(ra, "final")]), ev(["--model", merged])
    assert abs(e1 - e2) <= 1e-6 * abs(e2), f"dropout: eval --adapter {e1} != merged {e2}"
    print(f"  dropout 0.2: reproducible, 1 vs 2 ranks {worst:.2e}, losses {a[0]:.4f} -> {a[-1]:.4f} "
          f"(no dropout -> {none[-1]:.4f}), eval --adapter == merged ({e1:.6f})")


def main():
    root = dp.tmpdir("st_lora_train_")
    try:
        ll = dp.init_model(os.path.join(root, "llama"), "llama", 2)
        g2 = dp.init_model(os.path.join(root, "gpt2"), "gpt2", 2, seed=3)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1, step=1)
        job, ref, ref_w = check_case(root, "llama_all", ll, data, "{ r: 4, alpha: 8 }", LLAMA_T, 4, 8, False, {0, 1})
        check_case(root, "gpt2_last_rslora", g2, data,
                   '{ r: 2, alpha: 4, rslora: true, layers: "-1", targets: [c_attn, c_proj, c_fc] }',
                   ["c_attn", "c_proj", "c_fc"], 2, 4, True, {1})
        _, dref, _ = check_case(root, "llama_dora", ll, data,
                                "{ r: 2, alpha: 4, dora: true, targets: [q_proj, v_proj, down_proj] }",
                                ["q_proj", "v_proj", "down_proj"], 2, 4, False, {0, 1}, dora=True)
        # init as peft: B = 0 and m = ||W||_row make step 1 the base model, for LoRA and DoRA alike
        assert abs(dref[0] - ref[0]) <= TOL * abs(ref[0]), f"DoRA step-1 loss {dref[0]} != LoRA's {ref[0]}"
        resume_case(root, job, ll, ref, ref_w)
        dropout_case(root, job)
        refusals(job)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("LoRA training checks passed")


if __name__ == "__main__":
    main()
