"""ref_generate_text.py — text in and out of `shardtune generate` and `compare judge`, against PyPI
tokenizers / transformers' tokenizer (chat template) and the float64 torch reference (torch_model.py).

 1. {"prompt": text}: the answer = the no-cache greedy reference on tokenizer(text).ids (special tokens
    added), and "output" = decode(output_ids, skip_special_tokens=True).
 2. {"messages": [...]} and {"prompt": s} with --chat: the prompt ids are transformers'
    apply_chat_template(messages, add_generation_prompt=True) (checked through the answers).
 3. --stop STR: generation stops at the first token whose decoded answer holds STR (finish "stop").
 4. compare judge: each item's vote equals the one computed here from the reference's next-token
    probabilities of the labels "A" / " A" vs "B" / " B" in both orders (a side wins only when both
    orders prefer it), and the score printed is the score of those votes.
Env (set by ctest): SHARDTUNE_BIN."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_generate_torch import check, failures, make_model, read_out, run  # noqa: E402
from torch_model import RefModel, greedy_generate  # noqa: E402

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "a model answers questions about cats and dogs",
          "which answer is better, A or B? Reply with one letter.", "Here is a question and two answers.",
          "Question: Answer A: Answer B: Better answer:", "fine tuning makes the answers better or worse"] * 20


def make_tokenizer(d):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return tok


def chat_ids(d, messages):
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def judge_text(q, first, second):
    return (f"Here is a question and two answers.\n\nQuestion:\n{q}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
            "Which answer is better, A or B? Reply with one letter.\nBetter answer:")


def main():
    tmp = tempfile.mkdtemp(prefix="st_gentext_")
    try:
        probe = os.path.join(tmp, "probe")
        os.makedirs(probe)
        V = make_tokenizer(probe).get_vocab_size()
        model = make_model(tmp, "m", ["--family", "llama", "--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads",
                                      "2", "--ffn", "96", "--vocab", str(V), "--max-seq", "256", "--seed", "3"],
                           qk_scale=8.0, head_scale=20.0)
        tok = make_tokenizer(model)
        eos = tok.token_to_id("</s>")
        ref = RefModel.load(model, torch.float64)
        N = 24
        texts = ["the quick brown fox", "which answer is better?", "a model answers questions about cats"]
        msgs = [[{"role": "user", "content": "cats or dogs?"}],
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"}]]
        p = os.path.join(tmp, "p.jsonl")
        with open(p, "w") as f:
            for t in texts:
                f.write(json.dumps({"prompt": t}) + "\n")
            for m in msgs:
                f.write(json.dumps({"messages": m}) + "\n")
        out = read_out(os.path.join(tmp, "o.jsonl")) if run(["generate", "--model", model, "--prompts", p, "--out",
                                                             os.path.join(tmp, "o.jsonl"), "--max-new", str(N)]) \
            else None
        want_ids = [tok.encode(t).ids for t in texts] + [chat_ids(model, m) for m in msgs]
        refs = [greedy_generate(ref, ids, N, eos=(eos,))[0] for ids in want_ids]
        got = [o["output_ids"] for o in out]
        check("text and chat prompts: greedy = reference on the tokenizer's ids", got == refs,
              f"{sum(len(r) for r in refs)} tokens" if got == refs else f"{got} vs {refs}")
        texts_ok = all(o["output"] == tok.decode(o["output_ids"], skip_special_tokens=True) for o in out)
        check("output text = decode(skip_special_tokens=True)", texts_ok, repr(out[0]["output"][:40]))
        # --chat wraps a plain prompt as one user message
        pc = os.path.join(tmp, "pc.jsonl")
        with open(pc, "w") as f:
            f.write(json.dumps({"prompt": "cats or dogs?"}) + "\n")
        run(["generate", "--model", model, "--prompts", pc, "--out", os.path.join(tmp, "oc.jsonl"), "--max-new", str(N),
             "--chat"])
        oc = read_out(os.path.join(tmp, "oc.jsonl"))
        check("--chat prompt = the messages line", oc[0]["output_ids"] == refs[3], "same answer")
        # stop strings
        full = refs[0]
        k = next((i for i in range(4, len(full)) if len(tok.decode(full[:i], skip_special_tokens=True)) >= 6), None)
        if k is None:
            check("stop string setup", False, "reference answer too short")
        else:
            stop = tok.decode(full[:k], skip_special_tokens=True)[-3:]
            n = next(i for i in range(1, len(full) + 1) if stop in tok.decode(full[:i], skip_special_tokens=True))
            ps = os.path.join(tmp, "ps.jsonl")
            with open(ps, "w") as f:
                f.write(json.dumps({"prompt": texts[0]}) + "\n")
            run(["generate", "--model", model, "--prompts", ps, "--out", os.path.join(tmp, "os.jsonl"), "--max-new",
                 str(N), "--stop", stop])
            o = read_out(os.path.join(tmp, "os.jsonl"))[0]
            check("--stop stops at the first token holding the string", o["output_ids"] == full[:n]
                  and o["finish_reason"] == "stop", f"stop {stop!r} after {len(o['output_ids'])} tokens (want {n})")
        # judge
        words = "the quick brown fox jumps over lazy dog cats and dogs answers better worse A B".split()
        rng = np.random.default_rng(4)
        items = [(f"q{i}", " ".join(rng.choice(words, 3)), " ".join(rng.choice(words, int(rng.integers(1, 6)))),
                  " ".join(rng.choice(words, int(rng.integers(1, 6))))) for i in range(16)]
        pj, ba, ta = (os.path.join(tmp, x) for x in ("pj.jsonl", "ba.jsonl", "ta.jsonl"))
        with open(pj, "w") as fp, open(ba, "w") as fb, open(ta, "w") as ft:
            for i, q, b, t in items:
                fp.write(json.dumps({"id": i, "prompt": q}) + "\n")
                fb.write(json.dumps({"id": i, "output": b}) + "\n")
                ft.write(json.dumps({"id": i, "output": t}) + "\n")
        sheet = os.path.join(tmp, "sheet")
        run(["compare", "sheet", "--prompts", pj, "--base-answers", ba, "--tuned-answers", ta, "--out", sheet])
        r = subprocess.run([os.environ.get("SHARDTUNE_BIN", "build/shardtune"), "compare", "judge", sheet, "--judge",
                            model, "--json"], capture_output=True, text=True, timeout=300)
        key = json.load(open(os.path.join(sheet, "key.json")))
        la = sorted({tok.encode("A", add_special_tokens=False).ids[0], tok.encode(" A", add_special_tokens=False).ids[0]})
        lb = sorted({tok.encode("B", add_special_tokens=False).ids[0], tok.encode(" B", add_special_tokens=False).ids[0]})

        def prefer_first(q, first, second):
            ids = tok.encode(judge_text(q, first, second)).ids
            with torch.no_grad():
                lg = ref.logits(torch.tensor([ids]))[0, -1].numpy()
            e = np.exp(lg - lg.max())
            return e[la].sum() / (e[la].sum() + e[lb].sum())

        want, wins, probs = {}, [0, 0, 0], {}
        for i, q, b, t in items:
            a_txt, b_txt = (t, b) if key[i] == "A" else (b, t)
            p0, p1 = prefer_first(q, a_txt, b_txt), prefer_first(q, b_txt, a_txt)
            probs[i] = (p0, 1 - p1)
            want[i] = "A" if p0 > 0.5 and p1 < 0.5 else "B" if p0 < 0.5 and p1 > 0.5 else "tie"
            wins[0 if want[i] == key[i] else 2 if want[i] == "tie" else 1] += 1
        jv = read_out(os.path.join(sheet, "judge_votes.jsonl"))
        got = {v["id"]: v["vote"] for v in jv}
        err = max(max(abs(v["p_a_first"] - probs[v["id"]][0]), abs(v["p_a_second"] - probs[v["id"]][1])) for v in jv)
        check("judge label probabilities = reference (both orders)", err < 1e-4 and len(jv) == len(items),
              f"max difference {err:.2e} over {len(jv)} items")
        check("judge votes = reference label probabilities, both orders", got == want, f"{got} vs {want}")
        if wins[0] + wins[1]:
            score = json.loads(r.stdout)
            check("judge score", r.returncode == 0 and [score["wins"], score["losses"], score["ties"]] == wins,
                  f"{score}")
        else:  # a random judge may only tie: then the score is undefined, and says so
            check("judge: all ties", r.returncode == 1 and "no decided votes" in r.stderr, r.stderr.strip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"FAILED: {failures}")
        sys.exit(1)
    print("all text generation checks passed")


if __name__ == "__main__":
    main()
