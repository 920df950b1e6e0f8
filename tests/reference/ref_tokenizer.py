"""ref_tokenizer.py — `shardtune tokenize` against Hugging Face `tokenizers` 0.23, token for token.

Tokenizers of each supported kind are trained here with `tokenizers` on a generated multilingual corpus
(tests/reference/text_corpus.py): GPT-2 byte-level BPE, Llama-3 Split regex + ByteLevel (ignore_merges,
TemplateProcessing), Qwen2 (NFC + its Split regex, string-format merges), SentencePiece-style BPE with
Metaspace (prepend_scheme first) and byte_fallback, and the legacy Prepend/Replace normalizer form; each has
added tokens (special and not, lstrip/rstrip/single_word/normalized). Held-out and hard lines are encoded
(with and without special tokens) and decoded (skipping specials or not, also random id sequences) by both.
Env: SHARDTUNE_BIN (set by ctest)."""
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_corpus import HARD, corpus  # noqa: E402

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

BIN = os.environ["SHARDTUNE_BIN"]
GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TRAIN = corpus(1, 3000)
HELD = corpus(2, 300)


def extra_added(tok):
    tok.add_tokens([AddedToken("<mask>", lstrip=True, special=False, normalized=False),
                    AddedToken("[tool]", rstrip=True, special=False, normalized=True),
                    AddedToken("foo", single_word=True, special=False)])


def byte_level(pre, specials, post=None, nfc=False, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                             show_progress=False)
    tok.train_from_iterator(TRAIN, tr)
    tok.post_processor = post or processors.ByteLevel(trim_offsets=False)
    extra_added(tok)
    return tok


def split_bl(regex):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def sentencepiece(legacy):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                         decoders.ByteFallback(), decoders.Fuse()])
    tr = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=150,
                             show_progress=False)
    tok.train_from_iterator(TRAIN, tr)
    # byte-fallback tokens live in the model vocabulary only (as in Llama-2), not among the added tokens
    d = json.loads(tok.to_str())
    n = max(d["model"]["vocab"].values()) + 1
    for b in range(256):
        d["model"]["vocab"]["<0x%02X>" % b] = n + b
    tok = Tokenizer.from_str(json.dumps(d))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra_added(tok)
    return tok


def build():
    out = {}
    out["gpt2"] = byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), ["<|endoftext|>"])
    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    post = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])])
    out["llama3"] = byte_level(split_bl(LLAMA3_RE), llama_specials, post=post, ignore_merges=True)
    out["qwen2"] = byte_level(split_bl(QWEN2_RE), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], nfc=True)
    out["gpt2_prefix"] = byte_level(pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True), ["<|endoftext|>"])
    out["spm"] = sentencepiece(False)
    out["spm_legacy"] = sentencepiece(True)
    return out


def save(tok, d, string_merges):
    os.makedirs(d, exist_ok=True)
    j = json.loads(tok.to_str())
    if string_merges:  # the older "a b" merge format
        j["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(j, f, ensure_ascii=False)
    return Tokenizer.from_file(os.path.join(d, "tokenizer.json"))


def run(d, lines, *flags):
    p = subprocess.run([BIN, "tokenize", "--model", d, *flags], input="".join(l + "\n" for l in lines),
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"tokenize {flags} failed: {p.stderr}")
    return [json.loads(l) for l in p.stdout.split("\n")[:-1]]


def main():
    rng = random.Random(3)
    failures = 0
    texts = HARD + HELD + ["x <mask> y", "a   <mask>b", "[tool]   z", "foo bar foobar foo_x (foo)", "<s>hi there</s> <unk>",
                           "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>Hello<|eot_id|>"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, tok) in enumerate(build().items()):
            d = os.path.join(tmp, name)
            ref = save(tok, d, string_merges=(name in ("qwen2", "spm_legacy")))
            lines = [json.dumps(t) for t in texts]
            for flags, special in (((), True), (("--no-special",), False)):
                got = run(d, lines, *flags)
                for t, g in zip(texts, got):
                    want = ref.encode(t, add_special_tokens=special).ids
                    if g != want:
                        failures += 1
                        if failures < 15:
                            print(f"{name} encode{flags} {t!r}:\n  want {want}\n  got  {g}")
            # decode: the reference ids of every text, plus random id sequences (broken UTF-8, specials)
            vocab = ref.get_vocab_size()
            added = [int(k) for k in ref.get_added_tokens_decoder()]
            pick = lambda: rng.choice(added) if rng.random() < 0.3 else rng.randrange(vocab)  # noqa: E731
            seqs = [ref.encode(t).ids for t in texts] + [[pick() for _ in range(rng.randint(0, 20))] for _ in range(300)]
            lines = [json.dumps(s) for s in seqs]
            for flags, skip in ((("--decode",), True), (("--decode", "--no-special"), False)):
                got = run(d, lines, *flags)
                for s, g in zip(seqs, got):
                    want = ref.decode(s, skip_special_tokens=skip)
                    if g != want:
                        failures += 1
                        if failures < 15:
                            print(f"{name} decode{flags} {s}:\n  want {want!r}\n  got  {g!r}")
            print(f"{name}: vocab {vocab}, {len(texts)} texts, {len(seqs)} id sequences compared")
        failures += normalizer_sweep(tmp)
        # refusals: an unknown regex and an unknown component, each named
        j = json.loads(build_small().to_str())
        j["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": False}
        failures += expect_refusal(tmp, j, "known patterns")
        j["pre_tokenizer"] = {"type": "Whitespace"}
        failures += expect_refusal(tmp, j, "pre_tokenizer Whitespace")
    if failures:
        print(f"FAIL: {failures} mismatches")
        sys.exit(1)
    print("ok")


def normalizer_sweep(tmp):
    """Every code point of planes 0-3 (in lines of 64, with combining marks mixed in) through NFC/NFD/
    NFKC/NFKD byte-level tokenizers and the Llama-3 / Qwen2 split regexes: our ids must equal tokenizers'
    (its normalization is Rust's unicode-normalization and its regexes Oniguruma)."""
    base = build_small()
    rng = random.Random(5)
    cps = [c for c in list(range(0x20, 0x32000)) + list(range(0xE0000, 0xE0200)) + list(range(0x10FF00, 0x110000))
           if not 0xD800 <= c <= 0xDFFF]
    marks = [0x301, 0x323, 0x308, 0x327, 0x30A, 0x3099, 0x93C, 0x5B0]
    lines = []
    for i in range(0, len(cps), 64):
        chunk = [chr(c) for c in cps[i:i + 64]]
        for _ in range(8):
            chunk.insert(rng.randrange(len(chunk) + 1), chr(rng.choice(marks)))
        lines.append("".join(chunk))
    bad = 0
    for form in ("NFC", "NFD", "NFKC", "NFKD", "llama3", "qwen2"):
        if form in ("llama3", "qwen2"):  # the split regexes' classes, code point by code point
            base.normalizer = None
            base.pre_tokenizer = split_bl(LLAMA3_RE if form == "llama3" else QWEN2_RE)
        else:
            base.normalizer = getattr(normalizers, form)()
        d = os.path.join(tmp, "norm_" + form)
        ref = save(base, d, False)
        got = run(d, [json.dumps(l) for l in lines])
        diff = [l for l, g in zip(lines, got) if g != ref.encode(l).ids]
        if diff:
            bad += len(diff)
            g, w = got[lines.index(diff[0])], ref.encode(diff[0])
            k = next((k for k in range(min(len(g), len(w.ids))) if g[k] != w.ids[k]), min(len(g), len(w.ids)))
            print(f"{form}: {len(diff)} of {len(lines)} lines differ, first {diff[0]!r}: at token {k} want "
                  f"{w.ids[k:k + 4]} {w.tokens[k:k + 4]} got {g[k:k + 4]}")
        else:
            print(f"{form}: {len(lines)} lines of 64 code points agree")
    return bad


def build_small():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(TRAIN[:50], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return tok


def expect_refusal(tmp, j, words):
    d = os.path.join(tmp, "bad")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(j, f)
    p = subprocess.run([BIN, "tokenize", "--model", d], input='"x"\n', capture_output=True, text=True, timeout=60)
    if p.returncode == 0 or words not in p.stderr:
        print(f"expected a refusal naming {words!r}, got rc={p.returncode} {p.stderr!r}")
        return 1
    return 0


if __name__ == "__main__":
    main()
