"""peft_generate_prompt.py — `shardtune generate --adapter` with prompt-learning adapters against the REAL
`peft` library (PyPI torch 2.x + transformers + peft; run with `scripts/pyref --torch`).

For prompt tuning (Llama, GPT-2), P-tuning (Llama MLP encoder: peft saves the encoder's output table) and
prefix tuning (Llama with GQA, GPT-2), an adapter trained 3 steps by `shardtune train` (peft_adapters.py's
models and data) generates greedily for three prompts (lengths 5, 9 and 3; --batch 2, so one batch holds
two sequences of different lengths) with KV-cache decoding, and the reference is a no-cache loop over
PeftModel.from_pretrained(base, adapter) in float64 (eager attention): every step the whole sequence
through peft's forward, the argmax of the last real position. Checked: the tokens equal token for token,
and each step's logits (--dump-logits, the raw fp32 logits each token was chosen from) equal peft's
within 1e-4 x max|logit| (fp32 against float64 over a few layers; a wrong position, a missing or
misplaced virtual token moves them by O(1)).
The same adapter generated on 2 ranks gives the same answers.
Env (set by ctest): SHARDTUNE_BIN, ST_BUILD_DIR, ST_PYTHON."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
from peft_adapters import hf_model, make_data, make_model, peft_model, real_logits, train  # noqa: E402
from test_lora_torch import GPT2, LLAMA  # noqa: E402

MAX_NEW, TOL = 8, 1e-4
CASES = [
    ("llama_prompt", LLAMA, "{ mode: prompt_tuning, prompt: { virtual_tokens: 6 } }"),
    ("gpt2_prompt", GPT2, "{ mode: prompt_tuning, prompt: { virtual_tokens: 5 } }"),
    ("llama_ptuning", LLAMA, "{ mode: p_tuning, prompt: { virtual_tokens: 4, encoder: mlp } }"),
    ("llama_prefix", LLAMA, "{ mode: prefix_tuning, prefix: { virtual_tokens: 6 } }"),
    ("gpt2_prefix", GPT2, "{ mode: prefix_tuning, prefix: { virtual_tokens: 5 } }"),
]
failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def reference(m, prompt):
    """Greedy, no cache: (tokens, logits per step) from peft's forward in float64."""
    ids, out, rows = list(prompt), [], []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            lg = real_logits(m, torch.tensor([ids]))[0, -1].numpy()
            tok = int(np.argmax(lg))
            rows.append(lg)
            out.append(tok)
            ids.append(tok)
    return out, np.array(rows)


def generate(tmp, name, mdir, adir, prompts, np_=1):
    ppath, out = os.path.join(tmp, name + "_prompts.jsonl"), os.path.join(tmp, "%s_gen%d.jsonl" % (name, np_))
    with open(ppath, "w") as f:
        for p in prompts:
            f.write(json.dumps({"input_ids": p}) + "\n")
    cmd = [dp.BIN, "generate", "--model", mdir, "--adapter", adir, "--prompts", ppath, "--out", out, "--max-new",
           str(MAX_NEW), "--batch", "2", "--backend", "cpu"]
    dump = os.path.join(tmp, name + "_logits.bin")
    if np_ == 1:
        cmd += ["--dump-logits", dump]
    else:
        cmd = ["mpirun", "--oversubscribe", "-np", str(np_)] + cmd
    r = subprocess.run(cmd, env=dp.ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    with open(out) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    logits = np.fromfile(dump, dtype=np.float32) if np_ == 1 else None
    return [r["output_ids"] for r in rows], [r["finish_reason"] for r in rows], logits


def case(tmp, name, config, finetune, rng):
    print(name)
    c, mdir = make_model(tmp, name + "_base", config, rng)
    data = make_data(os.path.join(tmp, name + "_train.h5"), c["vocab"], rng, 20, 150, 300)
    adir = train(tmp, name, mdir, data, finetune)
    prompts = [rng.integers(0, c["vocab"], n).tolist() for n in (5, 9, 3)]
    got, finish, logits = generate(tmp, name, mdir, adir, prompts)
    m = peft_model(mdir, config, adir, torch.float64, False)
    V, off = c["vocab"], 0
    for i, p in enumerate(prompts):
        ref, ref_lg = reference(m, p)
        check(f"{name} prompt {i} tokens", got[i] == ref and finish[i] == "length", f"{got[i]} vs peft {ref}")
        ours = logits[off:off + len(got[i]) * V].reshape(len(got[i]), V).astype(np.float64)
        off += len(got[i]) * V
        n = min(len(ours), len(ref_lg))
        err = np.abs(ours[:n] - ref_lg[:n]).max() / np.abs(ref_lg[:n]).max()
        check(f"{name} prompt {i} logits", err <= TOL, f"max|ours - peft| / max|peft| = {err:.2e} (<= {TOL})")
    # without the adapter the answers differ (the virtual tokens matter)
    base = hf_model(mdir, config, torch.float64)
    with torch.no_grad():
        plain = [int(np.argmax(base(input_ids=torch.tensor([p])).logits[0, -1].numpy())) for p in prompts]
    check(f"{name} adapter matters", [g[0] for g in got] != plain, f"first tokens {[g[0] for g in got]} vs base {plain}")
    got2, _, _ = generate(tmp, name, mdir, adir, prompts, np_=2)
    check(f"{name} 2 ranks", got2 == got, "the same answers on 2 ranks")


def main():
    rng = np.random.default_rng(11)
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, finetune in CASES:
            case(tmp, name, config, finetune, rng)
    if failures:
        print("FAILED:", failures)
        sys.exit(1)
    print("all prompt-learning generation checks passed")


if __name__ == "__main__":
    main()
