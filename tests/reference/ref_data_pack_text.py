"""ref_data_pack_text.py — `shardtune data pack --text` against an independent Python reference built on
transformers' render_jinja_template and tokenizers' offsets.

Model directories are made here: tokenizers trained with `tokenizers` (Qwen2-style byte-level + ChatML
specials and the Qwen2.5 template; Llama-3-style + the Llama-3 template; SentencePiece-style + the Mistral
template, whose BOS comes from the template) with tokenizer_config.json and generation_config.json (eos
lists). For every row the reference renders the conversation, finds each assistant turn's span as
render(messages[:i+1]) minus render(messages[:i], add_generation_prompt=True), tokenizes the whole text
once (add_special_tokens=False, as apply_chat_template does) and marks the tokens whose start offset lies
in a span, up to the span's first end token. Tokens, masks and document boundaries must be identical.
Env: SHARDTUNE_BIN, ST_SOURCE_DIR."""
import json
import os
import subprocess
import sys
import tempfile

import h5py
from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_tokenizer as RT  # noqa: E402

BIN = os.environ["SHARDTUNE_BIN"]
TPL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_templates")


def model_dir(tmp, name, tok, template, bos, eos, gen_eos):
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"chat_template": open(os.path.join(TPL, template)).read(), "eos_token": eos}
    if bos:
        cfg["bos_token"] = bos
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))
    json.dump({"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}, open(os.path.join(d, "generation_config.json"), "w"))
    return d


def rows():
    m = lambda r, c: {"role": r, "content": c}  # noqa: E731
    return [
        {"messages": [m("user", "Hello there, how are you?"), m("assistant", "Fine, thanks! 😀")]},
        {"messages": [m("system", "Be brief."), m("user", "2+2?"), m("assistant", "4"), m("user", "Und 3+3? Größe"),
                      m("assistant", " 6 \n")]},
        {"conversations": [{"from": "human", "value": "中文 question"}, {"from": "gpt", "value": "中文 answer。"}]},
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"instruction": "Say hi", "output": "hi"},
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": [m("user", "q?")], "completion": [m("assistant", "a!")]},
        {"messages": [m("user", "first"), m("assistant", "one"), m("user", "second"), m("assistant", "two\n\nlines  ")]},
    ]


def reference(tok, cfg, gen_eos_ids, row, train_on):
    bos, eos = cfg.get("bos_token"), cfg.get("eos_token")
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    if "text" in row:
        raise ValueError
    if "messages" in row:
        msgs = row["messages"]
    elif "conversations" in row:
        role = {"human": "user", "gpt": "assistant"}
        msgs = [{"role": role[x["from"]], "content": x["value"]} for x in row["conversations"]]
    elif "instruction" in row:
        u = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        msgs = [{"role": "user", "content": u}, {"role": "assistant", "content": row["output"]}]
    else:
        p, c = row["prompt"], row["completion"]
        msgs = (p if isinstance(p, list) else [{"role": "user", "content": p}]) + \
               (c if isinstance(c, list) else [{"role": "assistant", "content": c}])

    def render(ms, agp):
        return render_jinja_template([ms], chat_template=cfg["chat_template"], add_generation_prompt=agp, **special)[0][0]

    full = render(msgs, False)
    enc = tok.encode(full, add_special_tokens=False)
    ids = enc.ids
    byte_off = [len(full[:s].encode()) for s, _ in enc.offsets]
    if train_on == "all":
        return ids, [1] * len(ids)
    asst = [i for i, x in enumerate(msgs) if x["role"] == "assistant"]
    if train_on == "last":
        asst = asst[-1:]
    mask = [0] * len(ids)
    for i in asst:
        pre, upto = render(msgs[:i], True).encode(), render(msgs[:i + 1], False).encode()
        assert upto.startswith(pre) and full.encode().startswith(upto)
        ended = False
        for k, o in enumerate(byte_off):
            if len(pre) <= o < len(upto) and not ended:
                mask[k] = 1
                ended = ids[k] in gen_eos_ids
    return ids, mask


def main():
    failures = 0
    built = RT.build()
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "qwen": model_dir(tmp, "qwen", built["qwen2"], "qwen25.jinja", None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
            "llama3": model_dir(tmp, "llama3", built["llama3"], "llama3.jinja", "<|begin_of_text|>", "<|eot_id|>",
                                ["<|end_of_text|>", "<|eot_id|>"]),
            "mistral": model_dir(tmp, "mistral", built["spm"], "mistral.jinja", "<s>", "</s>", ["</s>"]),
        }
        data = rows()
        inp = os.path.join(tmp, "in.jsonl")
        with open(inp, "w") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for name, d in models.items():
            tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
            cfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
            gen = set(json.load(open(os.path.join(d, "generation_config.json")))["eos_token_id"])
            use = [r for r in data if not (name == "mistral" and r.get("messages", [{}])[0].get("role") == "system")]
            path = os.path.join(tmp, f"{name}.jsonl")
            with open(path, "w") as f:
                for r in use:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            for train_on in ("assistant", "last", "all"):
                out = os.path.join(tmp, f"{name}_{train_on}.h5")
                p = subprocess.run([BIN, "data", "pack", "--text", path, "--model", d, "--out", out, "--train-on", train_on],
                                   capture_output=True, text=True, timeout=120)
                if p.returncode != 0:
                    print(f"{name} {train_on}: pack failed: {p.stderr}")
                    failures += 1
                    continue
                with h5py.File(out, "r") as h:
                    toks, mask, offs = h["tokens"][:].tolist(), h["loss_mask"][:].tolist(), h["doc_offsets"][:].tolist()
                    if h.attrs["eos_id"] not in gen or h.attrs["vocab_size"] != tok.get_vocab_size():
                        print(f"{name}: eos_id {h.attrs['eos_id']} / vocab_size {h.attrs['vocab_size']} wrong")
                        failures += 1
                for k, r in enumerate(use):
                    want_ids, want_mask = reference(tok, cfg, gen, r, train_on)
                    got_ids, got_mask = toks[offs[k]:offs[k + 1]], mask[offs[k]:offs[k + 1]]
                    if (got_ids, got_mask) != (want_ids, want_mask):
                        failures += 1
                        print(f"{name} {train_on} row {k}: \n  want {want_ids}\n       {want_mask}\n  got  {got_ids}\n       {got_mask}")
                    bos = cfg.get("bos_token")
                    if bos and got_ids[:2] == [tok.token_to_id(bos)] * 2:
                        failures += 1
                        print(f"{name} row {k}: double BOS")
                print(f"{name} --train-on {train_on}: {len(use)} rows, {len(toks)} tokens, {sum(mask)} trained: compared")
        # plain text rows and errors naming the line
        bad = os.path.join(tmp, "bad.jsonl")
        with open(bad, "w") as f:
            f.write(json.dumps({"text": "just text"}) + "\n\n" + json.dumps({"foo": 1}) + "\n")
        p = subprocess.run([BIN, "data", "pack", "--text", bad, "--model", models["qwen"], "--out", os.path.join(tmp, "b.h5")],
                           capture_output=True, text=True)
        if p.returncode == 0 or "line 3" not in p.stderr or "cannot tell the format" not in p.stderr:
            print(f"expected an error naming line 3, got rc={p.returncode} {p.stderr!r}")
            failures += 1
        if os.path.exists(os.path.join(tmp, "b.h5")):
            print("a failed pack left its output behind")
            failures += 1
        txt = os.path.join(tmp, "text.jsonl")
        with open(txt, "w") as f:
            f.write(json.dumps({"text": "Plain document one."}) + "\n" + json.dumps({"text": "<|begin_of_text|>Two"}) + "\n")
        out = os.path.join(tmp, "t.h5")
        p = subprocess.run([BIN, "data", "pack", "--text", txt, "--model", models["llama3"], "--out", out], capture_output=True, text=True)
        tok = Tokenizer.from_file(os.path.join(models["llama3"], "tokenizer.json"))
        eot = tok.token_to_id("<|end_of_text|>")
        with h5py.File(out, "r") as h:
            toks, offs, mask = h["tokens"][:].tolist(), h["doc_offsets"][:].tolist(), h["loss_mask"][:].tolist()
        want = [tok.encode("Plain document one.").ids + [eot], tok.encode("<|begin_of_text|>Two", add_special_tokens=False).ids + [eot]]
        got = [toks[offs[0]:offs[1]], toks[offs[1]:offs[2]]]
        if got != want or sum(mask) != len(toks):  # text rows train on every token, their end token too
            print(f"text rows: want {want} got {got} mask {mask}")
            failures += 1
        # a model without a chat template: alpaca (classic Alpaca prompt) and prompt/completion as plain text
        plain = os.path.join(tmp, "plain")
        os.makedirs(plain)
        built["gpt2"].save(os.path.join(plain, "tokenizer.json"))
        json.dump({"eos_token": "<|endoftext|>"}, open(os.path.join(plain, "tokenizer_config.json"), "w"))
        tok = Tokenizer.from_file(os.path.join(plain, "tokenizer.json"))
        eot = tok.token_to_id("<|endoftext|>")
        prow = [{"prompt": "Q: why?\nA:", "completion": " because ünïcode."}, {"instruction": "Add", "input": "2 and 3", "output": "5"},
                {"instruction": "Greet", "output": "hello"}]
        with open(os.path.join(tmp, "plain.jsonl"), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in prow))
        out = os.path.join(tmp, "p.h5")
        p = subprocess.run([BIN, "data", "pack", "--text", os.path.join(tmp, "plain.jsonl"), "--model", plain, "--out", out],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(f"plain pack failed: {p.stderr}")
            failures += 1
        else:
            with h5py.File(out, "r") as h:
                toks, offs, mask = h["tokens"][:].tolist(), h["doc_offsets"][:].tolist(), h["loss_mask"][:].tolist()
            for k, r in enumerate(prow):
                if "prompt" in r:
                    prompt, completion = r["prompt"], r["completion"]
                else:
                    head = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                            "Write a response that appropriately completes the request." if r.get("input") else
                            "Below is an instruction that describes a task. Write a response that appropriately completes the request.")
                    prompt = f"{head}\n\n### Instruction:\n{r['instruction']}\n\n"
                    if r.get("input"):
                        prompt += f"### Input:\n{r['input']}\n\n"
                    prompt += "### Response:\n"
                    completion = r["output"]
                enc = tok.encode(prompt + completion)
                full = prompt + completion
                cut = len(prompt.encode())
                want_ids = enc.ids + [eot]
                want_mask = [int(len(full[:a].encode()) >= cut) for a, _ in enc.offsets] + [1]
                got = (toks[offs[k]:offs[k + 1]], mask[offs[k]:offs[k + 1]])
                if got != (want_ids, want_mask):
                    print(f"plain row {k}: want {want_ids} {want_mask}\n  got {got}")
                    failures += 1
            print(f"no template: {len(prow)} alpaca/prompt rows compared")
        # the --jsonl path hints at --text
        p = subprocess.run([BIN, "data", "pack", "--jsonl", inp, "--out", os.path.join(tmp, "x.h5")], capture_output=True, text=True)
        if "--text" not in p.stderr:
            print(f"no --text hint: {p.stderr}")
            failures += 1
    if failures:
        print(f"FAIL: {failures}")
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
