"""test_generate_bf16_device.py — generation's bf16 holding on a device backend (worker/generate.h
st_gen_hold_bf16 / st_gen_hold_load with host_memory 0), run on the fake device (tests/tools/fakedev.c --guard:
tagged "device" memory, every decode kernel's operands checked, a violation fails the run). On a bf16-source model
the matmul units are held in bf16 in device memory, the model laid out anew without fp32 storage for them, and the
run must give exactly what holding them as fp32 gives on the same backend (SHARDTUNE_DECODE_FP32=1): the same
output file byte for byte and the same --dump-logits bytes, for
 1. a Llama model with GQA and an untied head (the held units read straight from the BF16 file into device
    memory), prompts of 1..150 tokens (one-row decode steps, prefill chunks of more than 8 rows: the widened unit
    in a device scratch), --batch 1 and --batch 3, the CPU backend's answers too; seeded sampling --batch 2 on 2
    ranks (mpirun) against 1 rank with fp32 holding;
 2. --adapter with a LoRA adapter on q_proj and v_proj (read as fp32 and merged first: the q/k/v unit stays
    fp32, the rest is held by copying it into the new layout), whose answers differ from the base's;
 3. a Qwen2-like model (biases, tied head: the bf16 embedding rows and the tied head through decode_mm);
 4. a GPT-2 model (transposed Conv1D tensors read as fp32 and then held; learned positions added to the widened
    embedding rows);
 5. `compare sheet` (base vs the LoRA-tuned model): the same sheet and key;
 6. an fp32 source: nothing held, the same device bytes.
Device memory (FAKEDEV_REPORT_MEM=1: the bytes allocated when `generate` checks the device status after
generating, the model and its hold) must fall by exactly 2 bytes per held float; so must the peak (the
generation state and the widening scratch of 4 bytes per float of the largest held layer unit on top), less
that scratch; the held count (the --timing line) must equal the count computed from the safetensors file.
Env (set by ctest): SHARDTUNE_BIN, ST_BUILD_DIR."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_frozen_bf16 import to_bf16_dir  # noqa: E402
from test_generate_bf16 import check, failures, held_expected, write_lora, write_prompts  # noqa: E402

BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
FAKEDEV = os.path.join(os.environ.get("ST_BUILD_DIR", os.path.dirname(BIN)), "fakedev")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FAKEDEV_REPORT_MEM="1")
FP32 = {"SHARDTUNE_DECODE_FP32": "1"}

def run(cmd, env_extra=None, mpi=0):
    if mpi:
        cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(mpi), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(ENV, **(env_extra or {})), timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd[:3])} failed: {r.stdout}{r.stderr}"
    assert "fakedev (rank" not in r.stderr, r.stderr  # no guard violation
    return r


def device_bytes(r):
    """Rank 0's device bytes when generate checked the status (fakedev's 'between steps'), and the peak."""
    m = re.search(r"fakedev device bytes: rank 0 peak (\d+) between steps (\d+)", r.stdout)
    assert m, r.stdout
    return int(m.group(2)), int(m.group(1))


def generate(tmp, model, prompts, tag, flags, env_extra=None, mpi=0, adapter=None, cpu=False):
    """(output bytes, dump bytes or None, floats held, device bytes or None)."""
    out = os.path.join(tmp, tag + ".jsonl")
    dump = os.path.join(tmp, tag + ".bin") if not mpi else None
    args = ["generate", "--model", model, "--prompts", prompts, "--out", out, "--force", "--timing", *flags]
    args += ["--adapter", adapter] if adapter else []
    args += ["--dump-logits", dump] if dump else []
    r = run([BIN, *args, "--backend", "cpu"] if cpu else [FAKEDEV, "--guard", *args], env_extra, mpi)
    m = re.search(r"weights held in bf16: (\d+);", r.stderr)
    assert m, r.stderr
    blob = open(dump, "rb").read() if dump else None
    return open(out, "rb").read(), blob, int(m.group(1)), None if cpu else device_bytes(r)


def wide_floats(model_dir, skip_qkv=False):
    """The widening scratch: the largest held layer unit (floats)."""
    c = json.load(open(os.path.join(model_dir, "config.json")))
    C = c.get("hidden_size", c.get("n_embd"))
    H = c.get("num_attention_heads", c.get("n_head"))
    KVH = c.get("num_key_value_heads", H)
    hd = C // H
    F = c.get("intermediate_size", c.get("n_inner") or 4 * C)
    llama = "hidden_size" in c
    units = [C * H * hd, (2 * F if llama else F) * C, C * F]
    if not skip_qkv:
        units.append((H + 2 * KVH) * hd * C)
    return max(units)


def same(what, a, b, expect_held, wide, freed=0):
    """a: default holding, b: fp32 holding forced, both on the fake device; freed: floats the new layout leaves out
    besides the held ones' fp32 (a merged adapter's, which the fp32 run's weight buffer keeps)."""
    ok = a[0] == b[0] and a[1] == b[1]
    check(what, ok, f"output and logits identical ({len(a[1]) // 4 if a[1] else 0} logits)" if ok else "outputs differ")
    check(what + ": held floats", a[2] == expect_held and b[2] == 0,
          f"{a[2]} held (expected {expect_held}), {b[2]} with fp32 forced")
    want = 2 * expect_held + 4 * freed
    check(what + ": device bytes", b[3][0] - a[3][0] == want,
          f"{a[3][0]} held in bf16 vs {b[3][0]} fp32: {b[3][0] - a[3][0]} less, expected 2 x {expect_held} + 4 x "
          f"{freed} = {want}")
    if freed == 0:  # (an adapter run's peak is its fp32 load)
        check(what + ": peak device bytes", b[3][1] - a[3][1] == want - 4 * wide,
              f"{a[3][1]} vs {b[3][1]}: {b[3][1] - a[3][1]} less, expected {want} - 4 x {wide} (widening scratch)")


def main():
    tmp = tempfile.mkdtemp(prefix="st_gen_bf16_dev_")
    rng = np.random.default_rng(6)
    try:
        # 1. Llama, GQA, untied head
        src = os.path.join(tmp, "llama32")
        run([BIN, "init-model", "--family", "llama", "--layers", "2", "--dim", "256", "--heads", "4", "--kv-heads", "2",
             "--ffn", "688", "--vocab", "16000", "--max-seq", "512", "--seed", "31", "--out", src])
        llama = to_bf16_dir(src, os.path.join(tmp, "llama"))
        n_held, wide = held_expected(llama), wide_floats(llama)
        p = write_prompts(os.path.join(tmp, "p.jsonl"), [1, 6, 40, 150], 16000, rng)
        greedy = ["--max-new", "16"]
        a = generate(tmp, llama, p, "g1", greedy + ["--batch", "1"])
        same("llama greedy --batch 1", a, generate(tmp, llama, p, "g1f", greedy + ["--batch", "1"], FP32), n_held, wide)
        c = generate(tmp, llama, p, "g1c", greedy + ["--batch", "1"], cpu=True)
        check("llama: the cpu backend's answers", c[0] == a[0] and c[2] == n_held, "the same" if c[0] == a[0] else "differ")
        same("llama greedy --batch 3", generate(tmp, llama, p, "g3", greedy + ["--batch", "3"]),
             generate(tmp, llama, p, "g3f", greedy + ["--batch", "3"], FP32), n_held, wide)
        samp = ["--max-new", "16", "--temperature", "0.9", "--top-k", "200", "--top-p", "0.95", "--seed", "7",
                "--batch", "2"]
        s1f = generate(tmp, llama, p, "sf", samp, FP32)
        s2 = generate(tmp, llama, p, "s2", samp, mpi=2)
        check("llama sampling, 2 ranks held vs 1 rank fp32", s2[0] == s1f[0] and s2[2] > 0,
              "same output file" if s2[0] == s1f[0] else "outputs differ")

        # 2. a LoRA adapter on q and v, merged: the q/k/v units stay fp32, the rest moves into the bf16 layout
        cfg = json.load(open(os.path.join(llama, "config.json")))
        ad = write_lora(os.path.join(tmp, "lora"), cfg, 4, rng)
        la = generate(tmp, llama, p, "l", greedy + ["--batch", "2"], adapter=ad)
        C, hd, r = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"], 4
        lora_floats = cfg["num_hidden_layers"] * r * (2 * C + (cfg["num_attention_heads"] + cfg["num_key_value_heads"]) * hd)
        same("llama --adapter lora", la, generate(tmp, llama, p, "lf", greedy + ["--batch", "2"], FP32, adapter=ad),
             held_expected(llama, ("q_proj.weight", "k_proj.weight", "v_proj.weight")), wide_floats(llama, True),
             lora_floats)
        check("the adapter changes the answers", la[0] != a[0], "answers differ from the base's")

        # 3. Qwen2-like: q/k/v biases, tied head, widths with 16-wide and scalar tails
        src = os.path.join(tmp, "qwen32")
        run([BIN, "init-model", "--family", "llama", "--qkv-bias", "--tied", "--layers", "2", "--dim", "48", "--heads",
             "6", "--kv-heads", "3", "--ffn", "100", "--vocab", "4096", "--max-seq", "512", "--seed", "32", "--out", src])
        qwen = to_bf16_dir(src, os.path.join(tmp, "qwen"))
        pq = write_prompts(os.path.join(tmp, "pq.jsonl"), [2, 30, 90], 4096, rng)
        same("qwen2 (biases, tied) --batch 2", generate(tmp, qwen, pq, "q", greedy + ["--batch", "2"]),
             generate(tmp, qwen, pq, "qf", greedy + ["--batch", "2"], FP32), held_expected(qwen), wide_floats(qwen))

        # 4. GPT-2: Conv1D tensors read as fp32 then held, tied wte widened per row + wpe
        src = os.path.join(tmp, "gpt32")
        run([BIN, "init-model", "--family", "gpt2", "--layers", "2", "--dim", "64", "--heads", "4", "--vocab", "4096",
             "--max-seq", "512", "--seed", "33", "--out", src])
        gpt = to_bf16_dir(src, os.path.join(tmp, "gpt"))
        same("gpt2 --batch 2", generate(tmp, gpt, pq, "t", greedy + ["--batch", "2"]),
             generate(tmp, gpt, pq, "tf", greedy + ["--batch", "2"], FP32), held_expected(gpt), wide_floats(gpt))

        # 5. compare sheet: base vs LoRA-tuned, both generated on the fake device
        sheets = []
        for tag, env in (("held", None), ("fp32", FP32)):
            out = os.path.join(tmp, "sheet_" + tag)
            run([FAKEDEV, "--guard", "compare", "sheet", "--base", llama, "--tuned", llama, "--adapter", ad, "--prompts",
                 p, "--out", out, "--max-new", "8"], env)
            sheets.append([open(os.path.join(out, f), "rb").read() for f in ("sheet.html", "key.json")])
        check("compare sheet held vs fp32", sheets[0] == sheets[1], "same sheet and key" if sheets[0] == sheets[1]
              else "sheets differ")

        # 6. an fp32 source: nothing held, the same device bytes
        f, ff = (generate(tmp, os.path.join(tmp, "llama32"), p, t, greedy, e) for t, e in (("f", None), ("ff", FP32)))
        check("fp32 source: nothing held", f[2] == 0 and f[3] == ff[3] and f[0] == ff[0],
              f"{f[2]} floats held, device bytes {f[3]} vs {ff[3]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)
    print("all device bf16 holding checks passed")


if __name__ == "__main__":
    main()
