"""Streaming load, final/ and export (ZeRO-3): the files against independent readers, and the memory.

* Source: a Llama (3 layers, dim 64, vocab 512) from init-model, rewritten here with numpy as a bf16 model in
  two safetensors shards with model.safetensors.index.json (config dtype bfloat16, tensors in another order
  than the registry's); the same for a GPT-2 in fp32 (its Conv1D tensors are stored transposed).
* Weights as loaded: stage 3 on 3 ranks (each rank reads only its parts) trains to the same losses as
  stage 0 on 1 rank (1e-6 relative; the global batch is the same, only the reduction order differs).
* Bytes: with lr 1e-30 (every update rounds away in fp32, so the weights stay those loaded), final/ of the
  3-rank stage-3 run (streamed: one tensor gathered at a time on rank 0), final/ of the 1-rank stage-0 run,
  `shardtune export` of the source directory and `shardtune export` of the stage-3 run's checkpoint are the
  same model.safetensors byte for byte; its tensors as the safetensors library parses them (its
  deserialize: dtype, shape, raw bytes) and as a numpy reader written here reads them equal the source's
  bits (bf16 stays bf16), with the source's shapes.
* Planner: Llama-2-7B on 8 ranks and Llama-2-70B on 64 (full fine-tune, bf16, seq 2048, micro_batch 1,
  ZeRO-3 + activation checkpointing) fit 24 and 40 GiB per rank at every phase (load, step, checkpoint,
  final/, and a resume) and `plan --device-mem` says so; a ZeRO-2 job without checkpointing does not fit, and the
  changes it names together do.
* Memory (4 layers x 256, vocab 32000, 2 MPI ranks, ZeRO-3, with and without activation checkpointing):
  each rank's peak RSS (GNU time) minus the fixed process overhead is within 15% of `shardtune plan`'s
  per-rank peak (load, step, checkpoint, final/); the load phase alone (each rank's peak RSS right after
  loading, reported in-process by getrusage under SHARDTUNE_REPORT_LOAD_RSS=1, minus the same for a tiny
  model on as many ranks) is within 15% of the plan's at_load and about 1/ranks of the model on 2 and 4
  ranks: each rank read only its shard; `shardtune export` of that model holds one tensor at a time: its
  RSS minus the overhead of exporting a tiny model is within 15% of the plan's export bytes.
* The same load check for DoRA and a prompt TEXT init, which read the base after the streamed load
  (check_load_from_base; `ref_stream_io.py load_from_base` runs it alone).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from test_dp_memory import measured_rss, plan  # noqa: E402

TOL = 1e-6
MEM_TOL = 0.15


def to_bf16_bits(x):
    """fp32 -> bf16 bit patterns, round to nearest even (numpy, independent of the C code)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u >> 16) & 1) + 0x7FFF
    return ((u + r) >> 16).astype(np.uint16)


def write_st(path, tensors):
    """A safetensors file from {name: (dtype_name, array)} in the dict's order."""
    header, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def resave_sharded(src, dst, bf16):
    """src (init-model output) as two shards + index.json, reversed order, bf16 or fp32 (all-zero tensors
    filled with random values)."""
    os.makedirs(dst, exist_ok=True)
    t = dict(dp.read_safetensors(os.path.join(src, "model.safetensors")))
    rng = np.random.default_rng(5)
    for n in t:  # zero-initialised biases would move under any lr: give them values the tiny lr cannot move
        if not np.any(t[n]):
            t[n] = rng.normal(0, 0.02, t[n].shape).astype("<f4")
    names = list(reversed(sorted(t)))
    conv = {n: (("BF16", to_bf16_bits(t[n])) if bf16 else ("F32", t[n].astype("<f4"))) for n in names}
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, part in shards.items():
        write_st(os.path.join(dst, fname), {n: conv[n] for n in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": {n: fn for fn, p in shards.items() for n in p}}, f)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["torch_dtype"] = "bfloat16" if bf16 else "float32"
    cfg.pop("dtype", None)
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return conv


def check_files(root, data, family, bf16):
    base = dp.init_model(os.path.join(root, f"{family}0"), family, 3, dim=64, heads=4, kv=2, vocab=512, max_seq=64)
    src = os.path.join(root, f"{family}_src")
    want = resave_sharded(base, src, bf16)
    job = dp.write_job(os.path.join(root, f"{family}.yaml"), src, os.path.join(root, "run"),
                       [{"name": "a", "path": data}])
    # losses: the weights each rank streamed in are the weights a whole load gives
    l0 = dp.losses(run(job, 1, ["train.micro_batch=6", "sharding.stage=0"], os.path.join(root, f"{family}_l0")))
    l3 = dp.losses(run(job, 3, ["train.micro_batch=2", "sharding.stage=3"], os.path.join(root, f"{family}_l3")))
    assert len(l0) == len(l3) == 8
    for a, b in zip(l3, l0):
        assert abs(a["loss"] - b["loss"]) <= TOL * abs(b["loss"]), (family, a, b)
    # bytes: lr 1e-30 keeps the weights as loaded
    frozen = ["train.lr=1e-30", "train.steps=2", "checkpoint.every_steps=1"]
    r0 = run(job, 1, frozen + ["train.micro_batch=6", "sharding.stage=0"], os.path.join(root, f"{family}_b0"))
    r3 = run(job, 3, frozen + ["train.micro_batch=2", "sharding.stage=3"], os.path.join(root, f"{family}_b3"))
    e_src, e_ck = os.path.join(root, f"{family}_esrc"), os.path.join(root, f"{family}_eck")
    dp.sh([dp.BIN, "export", src, "--out", e_src])
    dp.sh([dp.BIN, "export", os.path.join(r3, "checkpoints"), "--out", e_ck])
    files = [os.path.join(d, "model.safetensors") for d in (os.path.join(r3, "final"), os.path.join(r0, "final"),
                                                            e_src, e_ck)]
    blobs = [open(f, "rb").read() for f in files]
    for f, b in zip(files[1:], blobs[1:]):
        assert b == blobs[0], f"{family}: {f} differs from the streamed final/ ({len(b)} vs {len(blobs[0])} bytes)"
    # the safetensors library's own parser (raw bytes per tensor: numpy has no bfloat16) and ours
    from safetensors import deserialize
    lib = {n: e for n, e in deserialize(blobs[0])}
    ours = dp.read_safetensors(files[0])
    assert sorted(lib) == sorted(ours) == sorted(want), family
    for n, (dt, a) in want.items():
        e = lib[n]
        assert e["dtype"] == dt and list(e["shape"]) == list(a.shape), (family, n, e["dtype"], e["shape"], a.shape)
        assert bytes(e["data"]) == np.ascontiguousarray(a).tobytes(), f"{family}: {n} differs from the source"
        assert np.array_equal(ours[n].reshape(-1).view(a.dtype), a.reshape(-1)), n
    print(f"  {family} ({'bf16' if bf16 else 'fp32'}, 2 source shards): stage 3 on 3 ranks = stage 0 losses; "
          f"final/ (streamed) = final/ (stage 0) = export of the source = export of the checkpoint, "
          f"{len(blobs[0])} bytes; {len(want)} tensors = the source's")


def run(job, ranks, ov, rd):
    dp.train(job, ranks, ov + [f"run_dir={rd}"], mpirun=ranks > 1, timeout=300)
    return rd


def export_rss(src, out):
    r = subprocess.run(["/usr/bin/time", "-f", "%M", dp.BIN, "export", src, "--out", out], env=dp.ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.strip().split()[-1]) * 1024


def load_rss(job, ranks, ov):
    """Each rank's peak RSS right after the model is loaded (the trainer reports getrusage's maximum when
    SHARDTUNE_REPORT_LOAD_RSS=1), in bytes."""
    env = dict(dp.ENV, SHARDTUNE_REPORT_LOAD_RSS="1")
    r = subprocess.run(["mpirun", "--oversubscribe", "-np", str(ranks), dp.BIN, "train", job] + ov, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = {}
    for line in r.stderr.splitlines():
        if "peak RSS after loading the model:" in line:
            rank = int(line.split("rank ")[1].split(":")[0])
            got[rank] = int(line.split(":")[-1].split()[0]) * 1024
    assert sorted(got) == list(range(ranks)), r.stderr
    return [got[i] for i in range(ranks)]


def check_memory(root, data):
    big = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000, max_seq=128)
    small = dp.init_model(os.path.join(root, "small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
    job = dp.write_job(os.path.join(root, "big.yaml"), big, os.path.join(root, "run"), [{"name": "a", "path": data}])
    common = ["train.steps=2", "train.micro_batch=2", "train.seq_len=64"]
    ov = common + [f"model.path={small}", "sharding.stage=1", f"run_dir={root}/base"]
    base = measured_rss(job, 1, ov)[0] - plan(job, 1, ov)["peak_bytes"]
    assert 0 < base < 200 * 2**20, f"implausible baseline {base}"
    # the run's one save is its last: async holds the snapshot copy then; a sync save at stage 3 copies the share too
    for ckpt, save in (("false", "true"), ("true", "true"), ("false", "false")):
        ov = common + ["sharding.stage=3", f"memory.activation_checkpointing={ckpt}", f"checkpoint.async={save}",
                       f"run_dir={root}/m{ckpt}{save}"]
        p = plan(job, 2, ov)
        got = measured_rss(job, 2, ov)
        for r in range(2):
            want, net = p["rank_peak_bytes"][r], got[r] - base
            err = (net - want) / want
            print(f"  stage 3, 2 ranks, activation checkpointing {ckpt}, async save {save}, rank {r}: plan peak {want / 2**20:.1f} MiB "
                  f"(step {p['stages'][0]['ranks'][r]['bytes']['total'] / 2**20:.1f}), measured {net / 2**20:.1f} "
                  f"MiB over the baseline ({err:+.1%})")
            assert abs(err) <= MEM_TOL, f"rank {r}: estimate off by {err:+.1%}"
    # the load phase: each rank holds its shard of a model larger than the shard (2 and 4 ranks), measured
    # in-process against the same run of a tiny model on as many ranks
    whole = plan(job, 1, common)["model"]["n_weights"] * 4
    for ranks in (2, 4):
        ov = common + ["sharding.stage=3", "train.steps=1"]
        sp = plan(job, ranks, ov + [f"model.path={small}"])
        base_load = [x - sp["stages"][0]["ranks"][i]["bytes"]["at_load"]
                     for i, x in enumerate(load_rss(job, ranks, ov + [f"model.path={small}", f"run_dir={root}/ls{ranks}"]))]
        p = plan(job, ranks, ov)
        got = load_rss(job, ranks, ov + [f"run_dir={root}/lb{ranks}"])
        for r in range(ranks):
            want, net = p["stages"][0]["ranks"][r]["bytes"]["at_load"], got[r] - base_load[r]
            err = (net - want) / want
            print(f"  load, stage 3, {ranks} ranks, rank {r}: plan {want / 2**20:.1f} MiB, measured {net / 2**20:.1f} "
                  f"MiB over a tiny model's load ({err:+.1%}); the whole model is {whole / 2**20:.1f} MiB")
            assert abs(err) <= MEM_TOL, f"load, rank {r}: estimate off by {err:+.1%}"
            assert net < whole * (1.5 / ranks), f"load, rank {r}: {net} bytes is not a 1/{ranks} share of {whole}"
    # export: one tensor at a time
    p = plan(job, 1, common)
    e_base = export_rss(small, os.path.join(root, "e_small"))
    e_big = export_rss(big, os.path.join(root, "e_big")) - e_base
    err = (e_big - p["export_bytes"]) / p["export_bytes"]
    print(f"  export of the 4 x 256 model ({p['model']['n_weights'] * 4 / 2**20:.1f} MiB fp32): RSS over a tiny "
          f"model's export {e_big / 2**20:.1f} MiB, plan {p['export_bytes'] / 2**20:.1f} MiB ({err:+.1%})")
    assert abs(err) <= MEM_TOL, f"export: estimate off by {err:+.1%}"


def write_tokenizer(model_dir):
    """A small BPE tokenizer.json (ids below 10, in every vocabulary here) for a TEXT init."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {ch: i for i, ch in enumerate("abcdefgh")}
    vocab["ab"] = 8
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.save(os.path.join(model_dir, "tokenizer.json"))


def check_load_from_base(root, data):
    """The streamed loads that read the base while setting up (after the load, collective): DoRA (every
    projection: its magnitudes from each base weight gathered whole in turn) and prompt tuning with a TEXT
    init (its rows assembled from the ranks' parts of the embeddings). On 2 ranks each rank's peak RSS right
    after loading (over the same run of a tiny model) is within 15% of the plan's at_load, and about half
    of the model: no rank read the whole base."""
    big = dp.init_model(os.path.join(root, "fb_big"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000, max_seq=128)
    small = dp.init_model(os.path.join(root, "fb_small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
    for d in (big, small):
        write_tokenizer(d)
    whole = plan(dp.write_job(os.path.join(root, "fb.yaml"), big, os.path.join(root, "run"),
                              [{"name": "a", "path": data}]), 1, [])["model"]["n_weights"] * 4
    cases = (("dora", "finetune: { mode: lora, lora: { r: 4, alpha: 8, dora: true, targets: [q_proj, k_proj, v_proj, "
                      "o_proj, gate_proj, up_proj, down_proj] } }\n"),
             ("prompt text", 'finetune: { mode: prompt_tuning, prompt: { virtual_tokens: 8, init_text: "ab c abd" } }\n'))
    common = ["train.steps=1", "train.micro_batch=2", "train.seq_len=64", "sharding.stage=3"]
    for k, (name, ft) in enumerate(cases):
        job = dp.write_job(os.path.join(root, f"fb{k}.yaml"), big, os.path.join(root, "run"),
                           [{"name": "a", "path": data}], ft)
        sp = plan(job, 2, common + [f"model.path={small}"])
        base_load = [x - sp["stages"][0]["ranks"][i]["bytes"]["at_load"]
                     for i, x in enumerate(load_rss(job, 2, common + [f"model.path={small}", f"run_dir={root}/fbs{k}"]))]
        p = plan(job, 2, common)
        assert "streamed" in subprocess.run([dp.BIN, "plan", job, "--ranks", "2"] + common, env=dp.ENV,
                                            capture_output=True, text=True).stdout
        got = load_rss(job, 2, common + [f"run_dir={root}/fbb{k}"])
        for r in range(2):
            want, net = p["stages"][0]["ranks"][r]["bytes"]["at_load"], got[r] - base_load[r]
            err = (net - want) / want
            print(f"  load, stage 3, {name}, 2 ranks, rank {r}: plan {want / 2**20:.1f} MiB, measured {net / 2**20:.1f} "
                  f"MiB over a tiny model's load ({err:+.1%}); the whole model is {whole / 2**20:.1f} MiB")
            assert abs(err) <= MEM_TOL, f"{name} load, rank {r}: estimate off by {err:+.1%}"
            assert net < whole * 0.75, f"{name} load, rank {r}: {net} bytes is not about half of {whole}"


LLAMA2 = {"7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     num_hidden_layers=32),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                      num_hidden_layers=80)}


def check_planner(root):
    """The issue's targets, from config.json alone: Llama-2-7B (8 ranks, <= 24 GiB) and 70B (64 ranks,
    <= 40 GiB), full fine-tune, bf16, seq 2048, micro_batch 1, ZeRO-3 + activation checkpointing, at every
    phase; --device-mem says so, and for a ZeRO-2 job without checkpointing names what to change."""
    for size, ranks, limit in (("7b", 8, 24), ("70b", 64, 40)):
        d = os.path.join(root, "llama2-" + size)
        os.makedirs(d)
        cfg = dict(LLAMA2[size], architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                   max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                   torch_dtype="float16", hidden_act="silu")
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        job = dp.write_job(os.path.join(root, size + ".yaml"), d, os.path.join(root, "run"),
                           [{"name": "a", "path": os.path.join(root, "none.h5")}])
        # GPU memory per rank (backend cuda: the checkpoint.async snapshot is host memory, reported apart)
        ov = ["train.micro_batch=1", "train.seq_len=2048", "precision=bf16", "sharding.stage=3",
              "memory.activation_checkpointing=true", "backend=cuda"]
        p = plan(job, ranks, ov)
        for r in range(ranks):
            b = p["stages"][0]["ranks"][r]["bytes"]
            for phase in ("at_load", "total", "at_ckpt", "at_save", "at_resume"):
                assert b[phase] <= limit * 2**30, (size, r, phase, b[phase])
        assert p["peak_bytes"] <= limit * 2**30 and p["export_bytes"] <= limit * 2**30
        assert p["stages"][0]["ranks"][0]["bytes"]["host_snapshot"] > 0  # reported, not hidden
        gib = {k: p["stages"][0]["ranks"][0]["bytes"][k] / 2**30 for k in ("at_load", "total", "at_ckpt", "at_save")}
        print(f"  Llama-2-{size} on {ranks} ranks (bf16, ZeRO-3, act. ckpt, seq 2048, micro 1): rank 0 load "
              f"{gib['at_load']:.2f}, step {gib['total']:.2f}, checkpoint {gib['at_ckpt']:.2f}, final/ "
              f"{gib['at_save']:.2f} GiB; peak {p['peak_bytes'] / 2**30:.2f} GiB <= {limit}; export "
              f"{p['export_bytes'] / 2**30:.2f} GiB")
        text = dp.sh([dp.BIN, "plan", job, "--ranks", str(ranks), "--device-mem", str(limit)] + ov).stdout
        assert "  fits: every rank's peak" in text, text[-600:]
        bad = ov[:3] + ["backend=cuda", "sharding.stage=2", "memory.activation_checkpointing=false"]
        text = dp.sh([dp.BIN, "plan", job, "--ranks", str(ranks), "--device-mem", str(limit)] + bad).stdout
        assert "rank 0 does not fit" in text and "sharding.stage=3:" in text, text[-900:]
        tail = [x for x in text.splitlines() if x.startswith("    together:")]
        assert len(tail) == 1 and "sharding.stage=3 memory.activation_checkpointing=true" in tail[0] and "(fits)" in tail[0], text
    r = subprocess.run([dp.BIN, "plan", job, "--ranks", "8", "--device-mem", "x"], env=dp.ENV, capture_output=True,
                       text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--device-mem 'x'" in r.stderr, r.stderr


def check_qlora_planner(root):
    """Issue 18's QLoRA target, from config.json alone: Llama-3-8B, nf4 + double quantization, r 16 on all 7
    projections, bf16, seq 2048, micro_batch 1, activation checkpointing (kept inputs bf16), 1 GPU: every
    phase's device memory <= 8 GiB, the host memory (async snapshot, final/'s adapter copy, resume's image)
    reported apart."""
    d = os.path.join(root, "llama3-8b")
    os.makedirs(d)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
               torch_dtype="bfloat16", hidden_act="silu")
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    job = dp.write_job(os.path.join(root, "l3.yaml"), d, os.path.join(root, "run"),
                       [{"name": "a", "path": os.path.join(root, "none.h5")}])
    ov = ["train.micro_batch=1", "train.seq_len=2048", "precision=bf16", "memory.activation_checkpointing=true",
          "memory.checkpoint_dtype=bf16", "backend=cuda", "finetune.mode=qlora", "finetune.lora.r=16",
          "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    p = plan(job, 1, ov)
    b = p["stages"][0]["ranks"][0]["bytes"]
    for phase in ("at_load", "total", "at_ckpt", "at_save", "at_resume"):
        assert b[phase] <= 8 * 2**30, (phase, b[phase])
    adapters = 32 * 2 * 16 * (3 * 4096 + 2 * 1024 + 2 * 4096 + 14336 + 4096) * 4  # A and B of 7 projections, fp32
    assert b["host_save"] == adapters and b["host_snapshot"] >= 3 * adapters and b["host_resume"] >= 3 * adapters, b
    print(f"  Llama-3-8B QLoRA on 1 GPU (bf16, act. ckpt, kept inputs bf16): load {b['at_load'] / 2**20:.0f}, step "
          f"{b['total'] / 2**20:.0f}, checkpoint {b['at_ckpt'] / 2**20:.0f}, final/ {b['at_save'] / 2**20:.0f}, resume "
          f"{b['at_resume'] / 2**20:.0f} MiB <= 8 GiB; host apart: snapshot {b['host_snapshot'] / 2**20:.0f}, final/ "
          f"{b['host_save'] / 2**20:.0f}, resume {b['host_resume'] / 2**20:.0f} MiB")


def main():
    t0 = time.time()
    root = dp.tmpdir("st_stream_")
    try:
        if sys.argv[1:] == ["load_from_base"]:  # this part alone
            check_load_from_base(root, dp.make_dataset(os.path.join(root, "b.h5"), 128, 200, seed=1))
            return
        if sys.argv[1:] == ["planner"]:  # the planner targets alone (config.json only, no run)
            check_planner(root)
            check_qlora_planner(root)
            return
        check_planner(root)
        check_qlora_planner(root)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 512, 200, seed=3)
        check_files(root, data, "llama", True)
        check_files(root, data, "gpt2", False)
        big_data = dp.make_dataset(os.path.join(root, "b.h5"), 128, 200, seed=1)  # in both vocabularies
        check_memory(root, big_data)
        check_load_from_base(root, big_data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"ref_stream_io: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
