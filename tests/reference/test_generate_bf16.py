"""test_generate_bf16.py — generation's bf16 holding (worker/generate.h st_gen_hold_bf16): `generate` on a
bf16-source model (made with the CLI in fp32, converted here to a BF16 safetensors file, round to nearest
even, as test_frozen_bf16 does) holds the matmul weights as bf16 only, and must give exactly what holding
them as fp32 gives (SHARDTUNE_DECODE_FP32=1, the path before the feature): the same output file byte for
byte and the same --dump-logits bytes (every logit bit for bit), for
 1. a Llama model with GQA and an untied head (dim 256: whole 64-wide steps), prompts of 1..150 tokens
    (one-row decode steps, prefill chunks of more than 8 rows: the widened-unit matmul path), --batch 1 and
    --batch 3 (decode steps of several rows), greedy and seeded sampling (temperature, top-k, top-p);
    2 ranks (mpirun) with sampling against 1 rank with fp32 holding;
 2. --adapter with a LoRA adapter on q_proj and v_proj (merged in memory: the q/k/v unit is no longer bf16
    values and stays fp32, the rest is held), whose answers must differ from the base's;
 3. a Qwen2-like model (q/k/v biases, tied head, dim 48, ffn 100: the kernel's 16-wide and scalar tails);
 4. a GPT-2 model (tied wte read through the bf16 embedding path with wpe, biases).
The number of floats held (the --timing line) must equal the count computed here from the safetensors file
(every matmul unit whose values are bf16 values), 0 with SHARDTUNE_DECODE_FP32=1 and 0 for the fp32 source
(its values are not bf16 values). Resident memory after decoding (VmRSS, the --timing line) must fall by 2
bytes per held float (4 given back, 2 kept) within 25%, and so must the peak (GNU time's maximum resident set:
the load reads the held units straight into bf16, never as fp32).
Env (set by ctest): SHARDTUNE_BIN."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from test_frozen_bf16 import to_bf16_dir  # noqa: E402

BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
FP32 = {"SHARDTUNE_DECODE_FP32": "1"}
MATMUL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
          "down_proj.weight", "embed_tokens.weight", "lm_head.weight", "c_attn.weight", "c_proj.weight", "c_fc.weight",
          "wte.weight")

failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def run(args, env_extra=None, mpi=0, peak=False):
    cmd = [BIN, *args]
    if peak:  # GNU time reports its child's peak: this Python's own (kept across execve) stays out of it
        cmd = ["/usr/bin/time", "-f", "peak RSS kB %M", *cmd]
    if mpi:
        cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(mpi), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(ENV, **(env_extra or {})), timeout=600)
    assert r.returncode == 0, f"shardtune {' '.join(args[:1])} failed: {r.stderr}"
    return r


def generate(tmp, model, prompts, tag, flags, env_extra=None, mpi=0, adapter=None, peak=False):
    """(output file bytes, dump bytes or None, floats held in bf16, resident MB after decoding, peak RSS MB or
    None)."""
    out = os.path.join(tmp, tag + ".jsonl")
    dump = os.path.join(tmp, tag + ".bin") if not mpi else None
    args = ["generate", "--model", model, "--prompts", prompts, "--out", out, "--force", "--backend", "cpu", "--timing",
            *flags]
    if adapter:
        args += ["--adapter", adapter]
    if dump:
        args += ["--dump-logits", dump]
    r = run(args, env_extra, mpi, peak)
    m = re.search(r"weights held in bf16: (\d+); resident MB after decoding: ([0-9.]+)", r.stderr)
    assert m, r.stderr
    with open(out, "rb") as f:
        text = f.read()
    blob = open(dump, "rb").read() if dump else None
    pk = re.search(r"peak RSS kB (\d+)", r.stderr) if peak else None
    assert pk or not peak, r.stderr
    return text, blob, int(m.group(1)), float(m.group(2)), int(pk.group(1)) * 1024 / 2**20 if pk else None


def write_prompts(path, lengths, vocab, rng):
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"input_ids": [int(t) for t in rng.integers(3, vocab, n)]}) + "\n")
    return path


def held_expected(model_dir, skip=()):
    """Floats of the matmul units (every one of them holds bf16 values in a converted dir), less `skip`'s."""
    t = st_io.read_model(model_dir)
    return sum(v.size for k, v in t.items() if k.endswith(MATMUL) and not k.endswith(skip))


def write_lora(d, c, r, rng):
    """A peft LoRA adapter on q_proj and v_proj of every layer (non-zero A and B)."""
    os.makedirs(d, exist_ok=True)
    C, hd = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    t = {}
    for l in range(c["num_hidden_layers"]):
        for mod, o in (("q_proj", c["num_attention_heads"] * hd), ("v_proj", c["num_key_value_heads"] * hd)):
            base = f"base_model.model.model.layers.{l}.self_attn.{mod}"
            t[base + ".lora_A.weight"] = rng.normal(0, 0.2, (r, C)).astype(np.float32)
            t[base + ".lora_B.weight"] = rng.normal(0, 0.2, (o, r)).astype(np.float32)
    st_io.write(os.path.join(d, "adapter_model.safetensors"), t)
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0,
               target_modules=["q_proj", "v_proj"], use_rslora=False, use_dora=False, bias="none",
               fan_in_fan_out=False, layers_to_transform=None)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def same(what, a, b, expect_held):
    """a: default holding, b: fp32 holding forced (or another run that must match)."""
    ok = a[0] == b[0] and (a[1] is None or a[1] == b[1])
    check(what, ok, "output and logits identical (%d logits)" % (len(a[1]) // 4 if a[1] else 0) if ok
          else "outputs differ")
    if expect_held is not None:
        check(what + ": held floats", a[2] == expect_held and b[2] == 0,
              f"{a[2]} held (expected {expect_held}), {b[2]} with fp32 forced")


def main():
    tmp = tempfile.mkdtemp(prefix="st_gen_bf16_")
    rng = np.random.default_rng(5)
    try:
        # 1. Llama, GQA, untied head
        src = os.path.join(tmp, "llama32")
        run(["init-model", "--family", "llama", "--layers", "2", "--dim", "256", "--heads", "4", "--kv-heads", "2",
             "--ffn", "688", "--vocab", "16000", "--max-seq", "512", "--seed", "31", "--out", src])
        llama = to_bf16_dir(src, os.path.join(tmp, "llama"))
        n_held = held_expected(llama)
        p = write_prompts(os.path.join(tmp, "p.jsonl"), [1, 6, 40, 150], 16000, rng)
        greedy = ["--max-new", "24"]
        a = generate(tmp, llama, p, "g1", greedy + ["--batch", "1"], peak=True)
        b = generate(tmp, llama, p, "g1f", greedy + ["--batch", "1"], FP32, peak=True)
        same("llama greedy --batch 1", a, b, n_held)
        saved, want = b[3] - a[3], 2.0 * n_held / 2**20
        check("llama resident memory", abs(saved - want) <= 0.25 * want,
              f"{a[3]:.1f} MB held in bf16 vs {b[3]:.1f} MB fp32: {saved:.1f} MB less, expected {want:.1f}")
        # the load reads the held units straight into bf16 (gen_run.c load_held): the peak falls by as much
        saved = b[4] - a[4]
        check("llama peak RSS (load)", abs(saved - want) <= 0.25 * want,
              f"{a[4]:.1f} MB peak held in bf16 vs {b[4]:.1f} MB fp32: {saved:.1f} MB less, expected {want:.1f}")
        same("llama greedy --batch 3", generate(tmp, llama, p, "g3", greedy + ["--batch", "3"]),
             generate(tmp, llama, p, "g3f", greedy + ["--batch", "3"], FP32), n_held)
        samp = ["--max-new", "24", "--temperature", "0.9", "--top-k", "200", "--top-p", "0.95", "--seed", "7",
                "--batch", "2"]
        s1 = generate(tmp, llama, p, "s", samp)
        s1f = generate(tmp, llama, p, "sf", samp, FP32)
        same("llama sampling --batch 2", s1, s1f, n_held)
        s2 = generate(tmp, llama, p, "s2", samp, mpi=2)
        check("llama sampling, 2 ranks held vs 1 rank fp32", s2[0] == s1f[0], "same output file" if s2[0] == s1f[0]
              else "outputs differ")
        f32 = generate(tmp, src, p, "src", greedy + ["--batch", "1"])
        check("fp32 source: nothing held", f32[2] == 0, f"{f32[2]} floats held")

        # 2. a LoRA adapter on q and v, merged in memory: the q/k/v units stay fp32
        cfg = json.load(open(os.path.join(llama, "config.json")))
        ad = write_lora(os.path.join(tmp, "lora"), cfg, 4, rng)
        la = generate(tmp, llama, p, "l", greedy + ["--batch", "2"], adapter=ad)
        lb = generate(tmp, llama, p, "lf", greedy + ["--batch", "2"], FP32, adapter=ad)
        same("llama --adapter lora", la, lb, held_expected(llama, ("q_proj.weight", "k_proj.weight", "v_proj.weight")))
        check("the adapter changes the answers", la[0] != a[0], "answers differ from the base's")

        # 3. Qwen2-like: q/k/v biases, tied head, widths with 16-wide and scalar tails
        src = os.path.join(tmp, "qwen32")
        run(["init-model", "--family", "llama", "--qkv-bias", "--tied", "--layers", "2", "--dim", "48", "--heads", "6",
             "--kv-heads", "3", "--ffn", "100", "--vocab", "4096", "--max-seq", "512", "--seed", "32", "--out", src])
        qwen = to_bf16_dir(src, os.path.join(tmp, "qwen"))
        pq = write_prompts(os.path.join(tmp, "pq.jsonl"), [2, 30, 90], 4096, rng)
        same("qwen2 (biases, tied) --batch 2", generate(tmp, qwen, pq, "q", greedy + ["--batch", "2"]),
             generate(tmp, qwen, pq, "qf", greedy + ["--batch", "2"], FP32), held_expected(qwen))

        # 4. GPT-2: tied wte through the bf16 embedding rows, learned positions, biases
        src = os.path.join(tmp, "gpt32")
        run(["init-model", "--family", "gpt2", "--layers", "2", "--dim", "64", "--heads", "4", "--vocab", "4096",
             "--max-seq", "512", "--seed", "33", "--out", src])
        gpt = to_bf16_dir(src, os.path.join(tmp, "gpt"))
        same("gpt2 --batch 2", generate(tmp, gpt, pq, "t", greedy + ["--batch", "2"]),
             generate(tmp, gpt, pq, "tf", greedy + ["--batch", "2"], FP32), held_expected(gpt))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all bf16 holding checks passed")


if __name__ == "__main__":
    main()
