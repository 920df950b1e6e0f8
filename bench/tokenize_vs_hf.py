"""tokenize_vs_hf.py — encoding throughput of `shardtune tokenize` vs Hugging Face `tokenizers` on one
thread, side by side, on the tokenizers tests/reference/ref_tokenizer.py trains (GPT-2, Llama-3, Qwen2,
SentencePiece-style) and 20k generated multilingual lines (~1.5 MB). Ids are checked equal.
Run: SHARDTUNE_BIN=build/shardtune scripts/pyref bench/tokenize_vs_hf.py
Our side is the whole CLI (process start, tokenizer load, JSON in and out); HF's is the encode calls only."""
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("SHARDTUNE_BIN", "build/shardtune")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import ref_tokenizer as R  # noqa: E402
from text_corpus import corpus  # noqa: E402


def run(d, text):
    t0 = time.perf_counter()
    p = subprocess.run([os.environ["SHARDTUNE_BIN"], "tokenize", "--model", d], input=text, capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, [json.loads(x) for x in p.stdout.split("\n")[:-1]]


def main():
    toks = R.build()
    lines = corpus(9, 20000)
    big = "".join(lines)
    mb = len(big.encode()) / 1e6
    print(f"{len(lines)} lines, {mb:.2f} MB; MB/s, one thread")
    print(f"{'tokenizer':10} {'HF per line':>12} {'ours per line':>14} {'ratio':>6} {'HF 1 string':>12} {'ours 1 string':>14} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt2", "llama3", "qwen2", "spm"):
            d = os.path.join(tmp, name)
            ref = R.save(toks[name], d, False)
            t0 = time.perf_counter()
            want = [ref.encode(l).ids for l in lines]
            hf_lines = time.perf_counter() - t0
            t_lines, got = run(d, "".join(json.dumps(l) + "\n" for l in lines))
            assert got == want
            t0 = time.perf_counter()
            want_big = ref.encode(big).ids
            hf_big = time.perf_counter() - t0
            t_big, got_big = run(d, json.dumps(big) + "\n")
            assert got_big == [want_big]
            print(f"{name:10} {mb / hf_lines:12.2f} {mb / t_lines:14.2f} {hf_lines / t_lines:6.2f} {mb / hf_big:12.2f} "
                  f"{mb / t_big:14.2f} {hf_big / t_big:6.2f}")


if __name__ == "__main__":
    main()
