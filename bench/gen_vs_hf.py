#!/usr/bin/env python3
"""gen_vs_hf.py — `shardtune generate` against transformers' `generate` side by side on the CPU: the same
random-init Llama model directory, fp32, batch 1, greedy, the same prompt and thread count. Prints the
decode tokens/s of both and their ratio, and each one's prefill GFLOP/s as a fraction of the machine's
sgemm peak measured in the same run (build/sgemm_peak, the better of before and after). Runs alternate
(shardtune, transformers, shardtune, ...) and the best of --reps is kept for each, so a burst of load
from other users of the machine hits both alike; the load average is printed before and after.

  PY=$(bench/torch_venv.sh); $PY bench/gen_vs_hf.py [--build build] [--threads 1] [--reps 3]
      [--prompt 512] [--new 128] [--layers 8 --dim 512 --heads 8 --kv-heads 4 --ffn 1376 --vocab 32000]
  $PY bench/gen_vs_hf.py --sweep all --threads 1,2     # SIZES below x thread counts, one table

--sweep: per model size and thread count, one line: both sides' decode tok/s (wall; CPU time too at 1
thread), the ratio, the memory floor at that thread count and each side's fraction of it, the largest
ratio the floor leaves against transformers' rate (floor / transformers), and at 2+ threads shardtune with
SHARDTUNE_DECODE_TEAM=full (every step on the whole team) beside the default auto (worker/generate.c).
--wait-policy passive sets OMP_WAIT_POLICY for both sides (shardtune's and torch's libgomp): waiting threads
sleep instead of spinning, which on a loaded machine keeps a spinning thread from taking the core its
descheduled partner needs.

Prefill FLOPs: 2 x tokens x (the layers' matmul weights) + the causal attention's 4 x L x H x hd x
T(T+1)/2 (scores and weighted values); the head runs on the last position only (both sides). Decode
tokens/s counts the tokens after the first (the first comes out of prefill); transformers' decode time is
generate(new) - generate(1) with min_new_tokens set so neither side stops early.

Each rate is given twice: by wall time, and by CPU time (the process's CPU seconds, every thread: with
one thread, the time it actually ran, which on a machine shared with other jobs is the time a quiet
machine would take, up to memory and cache contention). shardtune's --timing prints its CPU seconds;
transformers' are time.process_time() around generate; the sgemm peak by CPU time is the FLOPs of
sgemm_peak's 6 calls over its CPU seconds (matrix set-up included: a slight underestimate), or its wall
peak when that is higher. Decode at batch 1 streams every weight (and the KV cache) once per token, so
its ceiling is the machine's read bandwidth: the run measures a 256 MB torch sum with the same thread count
(best of 5 by CPU time per thread, i.e. as if the threads ran side by side; by wall time too) and prints
bytes-per-token / bandwidth as the decode floor. The CPU-time columns are the load-insensitive ones at 1 thread; with more
threads CPU seconds also count threads waiting at barriers, so only the wall columns mean a rate. Numbers
only.

--source bf16: the model directory is the same random-init model saved by transformers in bf16
(save_pretrained after .to(torch.bfloat16): BF16 safetensors, as Llama / Qwen / Mistral checkpoints ship);
transformers loads it with dtype=torch.float32 and shardtune holds its matmul weights as bf16 (the values
are bf16 values: worker/generate.h st_gen_hold_bf16), so both compute in fp32 on the same values and should
agree token for token. shardtune's floor then counts 2 bytes per weight (the KV cache stays fp32),
transformers' 4; "max ratio" is shardtune's floor over transformers' rate."""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time


def run(cmd, env=None):
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit("gen_vs_hf: command failed (%d): %s\n%s" % (p.returncode, " ".join(cmd), p.stdout[-3000:]))
    return p.stdout


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def prefill_flops(a, T):
    hd = a.dim // a.heads
    qkv = a.dim * (a.heads + 2 * a.kv_heads) * hd
    per_layer = qkv + a.heads * hd * a.dim + 3 * a.dim * a.ffn
    return 2.0 * T * a.layers * per_layer + 4.0 * a.layers * a.heads * hd * T * (T + 1) / 2 + 2.0 * a.dim * a.vocab


def decode_bytes(a, wbytes=4):
    """Bytes one decode step reads: every layer's matmul weights and the LM head (wbytes each: 4 fp32, 2 held
    as bf16), and the fp32 keys and values cached so far (at the middle of the generation)."""
    hd = a.dim // a.heads
    per_layer = a.dim * (a.heads + 2 * a.kv_heads) * hd + a.heads * hd * a.dim + 3 * a.dim * a.ffn
    kv = 2 * a.layers * (a.prompt + a.new // 2) * a.kv_heads * hd
    return wbytes * (a.layers * per_layer + a.vocab * a.dim) + 4.0 * kv


def read_bandwidth(torch, threads):
    """GB/s of a sum over 256 MB with `threads` torch threads, best of 5: (by CPU time per thread, by wall
    time). With one thread the CPU-time figure is load-insensitive; with more it assumes the threads ran
    side by side (the wall figure is then the one a loaded machine gave)."""
    torch.set_num_threads(threads)
    x = torch.ones(64 << 20, dtype=torch.float32)
    best_c = best_w = 1e30
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        float(x.sum())
        best_c = min(best_c, (time.process_time() - c0) / threads)
        best_w = min(best_w, time.perf_counter() - t0)
    return x.numel() * 4 / best_c / 1e9, x.numel() * 4 / best_w / 1e9


def shardtune_once(st, model, prompts, out, a, env):
    text = run([st, "generate", "--model", model, "--prompts", prompts, "--out", out, "--force", "--max-new", str(a.new),
                "--batch", "1", "--backend", "cpu", "--timing"], env=env)
    line = [ln for ln in text.splitlines() if ln.startswith("timing")][0]
    # timing (rank 0): prefill P tokens in X s = ... tokens/s; decode D tokens in Y s = ... tokens/s
    m = re.search(r"prefill (\d+) tokens in ([0-9.e+-]+) s.*decode (\d+) tokens in ([0-9.e+-]+) s.*"
                  r"cpu seconds: prefill ([0-9.e+-]+), decode ([0-9.e+-]+)", line)
    pre_s, dec_tok, dec_s = float(m.group(2)), int(m.group(3)), float(m.group(4))
    pre_c, dec_c = float(m.group(5)), float(m.group(6))
    one = re.search(r"decode steps on one thread: (\d+) of (\d+)", line)
    return (pre_s, dec_tok / dec_s if dec_s > 0 else 0.0, pre_c, dec_tok / dec_c if dec_c > 0 else 0.0,
            "%s/%s" % one.groups() if one else "?")


# --sweep model sizes (Llama, fp32): name -> (layers, dim, heads, kv_heads, ffn, vocab). Weights per decode
# token: xs ~3.5 MB and s ~20 MB fit the 48 MB L3, m ~45 MB about fills it, ml ~88 MB and l ~164 MB stream
# from memory (plus the KV cache).
SIZES = {"xs": (2, 128, 4, 2, 344, 4096), "s": (4, 256, 4, 2, 688, 8192), "m": (4, 256, 4, 2, 688, 32000),
         "ml": (6, 384, 6, 3, 1024, 32000), "l": (8, 512, 8, 4, 1376, 32000)}
SHAPE_KEYS = ("layers", "dim", "heads", "kv_heads", "ffn", "vocab")


def measure_peak(a, threads):
    """sgemm_peak at `threads`: (GFLOP/s by wall time, by CPU time or wall when higher)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = run([os.path.join(a.build, "sgemm_peak"), str(threads), "2048", "5"])
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = float(out.split("gflops=")[1].split()[0])
    cpu_s = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return wall, max(wall, 6 * 2.0 * 2048 ** 3 / cpu_s / 1e9 if cpu_s > 0 else 0.0)


def measure(a, threads, torch, transformers, tmp):
    """One model (a's shape) at `threads` on both sides: best-of-reps rates, runs alternating."""
    st = os.path.join(a.build, "shardtune")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    torch.set_num_threads(threads)
    model = os.path.join(tmp, "model_L%d_C%d_V%d" % (a.layers, a.dim, a.vocab))
    if not os.path.isdir(model):
        run([st, "init-model", "--family", "llama", "--layers", str(a.layers), "--dim", str(a.dim), "--heads",
             str(a.heads), "--kv-heads", str(a.kv_heads), "--ffn", str(a.ffn), "--vocab", str(a.vocab),
             "--max-seq", str(max(2048, a.prompt + a.new)), "--seed", "1", "--out", model])
    if a.source == "bf16":  # saved by transformers in bf16; read back below as float32
        b16 = model + "_bf16"
        if not os.path.isdir(b16):
            transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(
                torch.bfloat16).save_pretrained(b16)
        model = b16
    import random
    rnd = random.Random(3)
    ids = [rnd.randrange(3, a.vocab) for _ in range(a.prompt)]
    prompts = os.path.join(tmp, "p.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"input_ids": ids}) + "\n")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def hf_gen(n):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            o = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, time.process_time() - c0, o[0, len(ids):].tolist()

    hf_gen(2)  # warm-up (first-call allocations)
    best = {k: 1e30 if k.endswith("pre") else 0.0 for k in ("st_pre", "st_dec", "hf_pre", "hf_dec", "st_cpre",
                                                             "st_cdec", "hf_cpre", "hf_cdec", "sf_dec")}

    def keep(key, v):
        best[key] = min(best[key], v) if key.endswith("pre") else max(best[key], v)

    same = None
    for _ in range(a.reps):
        pre_s, dec, pre_c, dec_c, best["team1"] = shardtune_once(st, model, prompts, os.path.join(tmp, "o.jsonl"), a,
                                                                 env)
        keep("st_pre", pre_s), keep("st_dec", dec), keep("st_cpre", pre_c), keep("st_cdec", dec_c)
        if threads > 1:  # the team kept on every step (SHARDTUNE_DECODE_TEAM=full), beside the default auto
            keep("sf_dec", shardtune_once(st, model, prompts, os.path.join(tmp, "of.jsonl"), a,
                                          dict(env, SHARDTUNE_DECODE_TEAM="full"))[1])
        t1, c1, _ = hf_gen(1)
        tn, cn, hf_ids = hf_gen(a.new)
        keep("hf_pre", t1), keep("hf_dec", (a.new - 1) / max(tn - t1, 1e-9))
        keep("hf_cpre", c1), keep("hf_cdec", (a.new - 1) / max(cn - c1, 1e-9))
        with open(os.path.join(tmp, "o.jsonl")) as f:
            ours = json.loads(f.readline())["output_ids"]
        k = 0
        while k < min(len(ours), len(hf_ids)) and ours[k] == hf_ids[k]:
            k += 1
        same = k
    best["same"] = same
    return best


def report_one(a, threads, best, peak, peak_cpu, bw, torch, transformers):
    """The single-model output (no --sweep)."""
    fl = prefill_flops(a, a.prompt)
    print("model: llama L=%d C=%d H=%d KVH=%d F=%d V=%d, fp32, batch 1, prompt %d tokens, %d new, %d thread(s), "
          "torch %s, transformers %s" % (a.layers, a.dim, a.heads, a.kv_heads, a.ffn, a.vocab, a.prompt, a.new,
                                         threads, torch.__version__, transformers.__version__))
    print("sgemm peak: %.1f GFLOP/s by wall time, %.1f by CPU time (better of before / after)" % (peak, peak_cpu))
    print("%-13s %-5s %14s %14s %16s" % ("", "time", "decode tok/s", "prefill GF/s", "prefill % peak"))
    for name, k in (("shardtune", "st"), ("transformers", "hf")):
        for clock, pre, dec, pk in (("wall", best[k + "_pre"], best[k + "_dec"], peak),
                                    ("cpu", best[k + "_cpre"], best[k + "_cdec"], peak_cpu)):
            g = fl / pre / 1e9
            print("%-13s %-5s %14.1f %14.1f %15.0f%%" % (name, clock, dec, g, 100 * g / pk))
    print("decode speed-up: %.2fx by wall time, %.2fx by CPU time (target >= 3x); greedy tokens agreeing with "
          "transformers: %d of %d" % (best["st_dec"] / best["hf_dec"], best["st_cdec"] / best["hf_cdec"],
                                      best["same"], a.new))
    floor = bw * 1e9 / decode_bytes(a, 2 if a.source == "bf16" else 4)
    # 1 thread: CPU-time rates against the CPU-time floor; more threads: wall rates (CPU seconds then count
    # threads waiting at barriers)
    clk = "cdec" if threads == 1 else "dec"
    print("decode memory floor: %.1f MB per token / %.1f GB/s read (%d thread(s), CPU time per thread) = %.1f tok/s "
          "at most; shardtune at %.0f%% of it (%s), transformers at %.0f%%" % (
              decode_bytes(a) / 1e6, bw, threads, floor, 100 * best["st_" + clk] / floor,
              "CPU time" if threads == 1 else "wall time", 100 * best["hf_" + clk] / floor))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--threads", default="1", help="thread count, or a list (1,2) for --sweep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--wait-policy", default="", choices=("", "active", "passive"),
                    help="OMP_WAIT_POLICY for both sides (torch's libgomp too; default: unset, libgomp spins a while)")
    ap.add_argument("--source", default="fp32", choices=("fp32", "bf16"),
                    help="the model directory's weights: fp32, or saved by transformers in bf16 (see above)")
    ap.add_argument("--sweep", default="", help="comma-separated model sizes (%s), or 'all'" % ",".join(SIZES))
    for k, v in zip(SHAPE_KEYS, SIZES["l"]):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    sizes = list(SIZES) if a.sweep == "all" else [z for z in a.sweep.split(",") if z]
    for z in sizes:
        if z not in SIZES:
            sys.exit("gen_vs_hf: unknown size %s (known: %s)" % (z, ", ".join(SIZES)))
    if not sizes and len(threads) != 1:
        sys.exit("gen_vs_hf: a list of thread counts needs --sweep")
    os.environ["OMP_NUM_THREADS"] = str(max(threads))
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    if a.wait_policy:  # before torch loads its OpenMP runtime, which reads it once
        os.environ["OMP_WAIT_POLICY"] = a.wait_policy
    import torch
    import transformers
    print("load average before: %s (2 cores shared with other users of the machine); OMP_WAIT_POLICY %s" % (
        loadavg(), a.wait_policy or "unset"))
    tmp = tempfile.mkdtemp(prefix="gen_vs_hf_")
    # the read bandwidth at each thread count, before and after (the better of the two: load only lowers it)
    bws = {t: read_bandwidth(torch, t) for t in threads}
    if not sizes:
        t = threads[0]
        peak, peak_cpu = measure_peak(a, t)
        best = measure(a, t, torch, transformers, tmp)
        p2, p2c = measure_peak(a, t)
        bw2 = read_bandwidth(torch, t)
        report_one(a, t, best, max(peak, p2), max(peak_cpu, p2c), max(bws[t][0], bw2[0]), torch, transformers)
    else:
        rows = []
        for z in sizes:
            for k, v in zip(SHAPE_KEYS, SIZES[z]):
                setattr(a, k, v)
            for t in threads:
                b = measure(a, t, torch, transformers, tmp)
                b["st_bytes"] = decode_bytes(a, 2 if a.source == "bf16" else 4)
                rows.append((z, t, decode_bytes(a), b, loadavg()))
                print("  measured %s at %d thread(s), load average %s" % (z, t, rows[-1][4]), flush=True)
        for t in threads:
            b2 = read_bandwidth(torch, t)
            bws[t] = (max(bws[t][0], b2[0]), max(bws[t][1], b2[1]))
        report_sweep(a, rows, bws, torch, transformers)
    print("load average after: %s" % loadavg())
    subprocess.run(["rm", "-rf", tmp])


def report_sweep(a, rows, bws, torch, transformers):
    """One line per (size, threads): both sides' decode tok/s (wall; CPU time at 1 thread), the ratio, each
    side's fraction of the memory floor, and the ratio the floor allows given transformers' rate."""
    print("decode sweep: llama, %s, batch 1, greedy, prompt %d tokens, %d new, best of %d, runs alternating; "
          "torch %s, transformers %s" % ("fp32" if a.source == "fp32" else
                                         "bf16 source (transformers computes in fp32 on it, shardtune holds bf16)",
                                         a.prompt, a.new, a.reps, torch.__version__, transformers.__version__))
    for t in sorted(bws):
        print("read bandwidth, %d thread(s): %.1f GB/s by CPU time per thread, %.1f by wall time (256 MB torch sum, "
              "best of 5, better of before / after)" % (t, bws[t][0], bws[t][1]))
    print("MB/tok, floor: shardtune's MB per token and that / read bandwidth (CPU-time figure; hf %flr against "
          "transformers' own fp32 floor); rates: wall time, and CPU time at 1 thread "
          "(the load-insensitive one); max ratio = floor / transformers' rate: no decoder can beat it when the "
          "weights stream from memory")
    print("shardtune: the default SHARDTUNE_DECODE_TEAM=auto (1-thr: its decode steps on one thread, last run); "
          "st full: every step on the whole team")
    print("%-4s %7s %3s %5s %10s %10s %7s %9s %8s %8s %9s %8s %8s %7s" % (
        "size", "MB/tok", "thr", "clock", "shardtune", "transf.", "ratio", "floor", "st %flr", "hf %flr",
        "max ratio", "st full", "1-thr", "same"))
    for z, t, nbytes, b, _ in rows:
        floor = bws[t][0] * 1e9 / nbytes  # transformers' (fp32 weights); shardtune's below
        st_floor = bws[t][0] * 1e9 / b["st_bytes"]
        clocks = (("wall", "dec"), ("cpu", "cdec")) if t == 1 else (("wall", "dec"),)
        for clock, k in clocks:
            st, hf = b["st_" + k], b["hf_" + k]
            print("%-4s %7.1f %3d %5s %10.1f %10.1f %6.2fx %9.1f %7.0f%% %7.0f%% %8.2fx %8s %8s %7s" % (
                z, b["st_bytes"] / 1e6, t, clock, st, hf, st / hf, st_floor, 100 * st / st_floor, 100 * hf / floor,
                st_floor / hf,
                "%.1f" % b["sf_dec"] if t > 1 and clock == "wall" else "-", b["team1"], "%d/%d" % (b["same"], a.new)))


if __name__ == "__main__":
    main()
