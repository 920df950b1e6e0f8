"""tokenize_vs_hf.py — encoding throughput of `shardtune tokenize` vs Hugging Face `tokenizers` on one
thread, side by side, on the tokenizers tests/reference/ref_tokenizer.py trains (GPT-2-style byte-level,
Llama-3, Qwen2, SentencePiece-style) and generated multilingual lines (~1.5 MB). Ids are checked equal.
Run: SHARDTUNE_BIN=build/shardtune scripts/pyref bench/tokenize_vs_hf.py [--lines N] [--repeat R]

Fairness: both sides read the same tokenizer.json file and the same text; the process (and so the
shardtune child) is pinned to one CPU, tokenizers runs with RAYON_NUM_THREADS=1 and
TOKENIZERS_PARALLELISM=false, and its batch API (encode_batch) is timed, so per-call Python overhead is
not counted against it. Our side is timed twice: the whole CLI (process start, tokenizer load, JSON
parsing of every line and JSON output), and the same minus a run on empty input (start + load), which is
what HF's timing leaves out. Best of R runs each. Times are CPU seconds (user + system: the child's from
getrusage, HF's from process_time, which counts all its threads), so a loaded machine slows both sides
alike; the wall-clock ratio is printed too. The load average is printed before and after."""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("SHARDTUNE_BIN", "build/shardtune")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import ref_tokenizer as R  # noqa: E402
from text_corpus import corpus  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(d, text):
    """(cpu seconds, wall seconds), ids of every line."""
    c0, t0 = child_cpu(), time.perf_counter()
    p = subprocess.run([os.environ["SHARDTUNE_BIN"], "tokenize", "--model", d], input=text, capture_output=True,
                       text=True, check=True)
    return (child_cpu() - c0, time.perf_counter() - t0), [json.loads(x) for x in p.stdout.split("\n")[:-1]]


def best(n, f):
    out = None
    for _ in range(n):
        t, v = f()
        if out is None or t < out[0]:
            out = (t, v)
    return out


def timed(f):
    def g():
        c0, t0 = time.process_time(), time.perf_counter()
        v = f()
        return (time.process_time() - c0, time.perf_counter() - t0), v
    return g


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="gpt2,llama3,qwen2,spm")
    a = ap.parse_args()
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # this process and the shardtune child: one CPU
    print(f"load average before: {' '.join('%.2f' % x for x in os.getloadavg())}; pinned to CPU {cpu}")
    toks = R.build()
    lines = corpus(9, a.lines)
    big = "".join(lines)
    mb = len(big.encode()) / 1e6
    print(f"{len(lines)} lines, {mb:.2f} MB; MB/s on one thread, best of {a.repeat}")
    print("MB/s of CPU time; ratio = HF time / ours (> 1: we are faster); CLI = whole process, enc = minus start+load")
    print(f"{'tokenizer':10} {'HF batch':>9} {'ours CLI':>9} {'ours enc':>9} {'ratio CLI':>9} {'ratio enc':>9} "
          f"{'wall CLI':>8} | {'HF 1 str':>9} {'ours enc':>9} {'ratio enc':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only.split(","):
            d = os.path.join(tmp, name)
            R.save(toks[name], d, False)
            ref = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))  # the very file we read
            t_start, _ = best(a.repeat, lambda: run(d, ""))
            hf_lines, enc = best(a.repeat, timed(lambda: ref.encode_batch(lines)))
            want = [e.ids for e in enc]
            text = "".join(json.dumps(x) + "\n" for x in lines)
            t_lines, got = best(a.repeat, lambda: run(d, text))
            assert got == want, f"{name}: ids differ"
            hf_big, e = best(a.repeat, timed(lambda: ref.encode(big)))
            one = json.dumps(big) + "\n"
            t_big, got_big = best(a.repeat, lambda: run(d, one))
            assert got_big == [e.ids], f"{name}: ids of the one string differ"
            st = t_start[0]
            enc_lines, enc_big = max(t_lines[0] - st, 1e-9), max(t_big[0] - st, 1e-9)
            print(f"{name:10} {mb / hf_lines[0]:9.2f} {mb / t_lines[0]:9.2f} {mb / enc_lines:9.2f} "
                  f"{hf_lines[0] / t_lines[0]:9.2f} {hf_lines[0] / enc_lines:9.2f} {hf_lines[1] / t_lines[1]:8.2f} | "
                  f"{mb / hf_big[0]:9.2f} {mb / enc_big:9.2f} {hf_big[0] / enc_big:9.2f}   "
                  f"(start+load {st * 1e3:.0f} ms CPU)", flush=True)
    print(f"load average after: {' '.join('%.2f' % x for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
