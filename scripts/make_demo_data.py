#!/usr/bin/env python3
"""Writes a small synthetic instruction-style JSONL dataset for demos and tests (stdlib only).

Each document is a "prompt" (a start token, a stride and a length) followed by the "answer": the
arithmetic sequence it describes, modulo the vocabulary. Prompt positions are masked with -100 in
`labels`, as in supervised fine-tuning, so only answers are learned. A model can learn the rule,
so the loss falls quickly and visibly."""
import argparse
import json
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", choices=["count", "repeat"], default="count")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    sep = a.vocab - 1  # separator between prompt and answer
    with open(a.out, "w") as f:
        for _ in range(a.docs):
            n = rng.randint(8, 40)
            start = rng.randrange(a.vocab - 1)
            if a.task == "count":
                stride = rng.randint(1, 4)
                prompt = [start, stride, sep]
                answer = [(start + stride * i) % (a.vocab - 1) for i in range(n)]
            else:
                motif = [rng.randrange(a.vocab - 1) for _ in range(rng.randint(2, 5))]
                prompt = motif + [sep]
                answer = (motif * n)[:n]
            ids = prompt + answer
            labels = [-100] * len(prompt) + answer
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


if __name__ == "__main__":
    main()
