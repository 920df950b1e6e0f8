#!/usr/bin/env bash
# test_pack_text_stream.sh — `data pack --text` streams: peak memory does not grow with the input.
#   1. two generated inputs, 8 MB and 4x that: the packer's peak RSS (getrusage of the child, VmHWM) differs
#      by less than 8 MB, where keeping the tokens in memory would add > 80 MB; the files read back with
#      h5py hold every line as a document with the token count computed independently (one merge "h i":
#      len - count("hi"), + the end token <eos> that closes each document).
#   2. `data pack --jsonl` the same: 8 MB and 32 MB of token ids, peak RSS within 8 MB (reading the file into
#      memory and building the arrays there would add > 50 MB); the tokens read back with h5py.
#   3. the progress line (lines, MB/s, tokens) goes to stderr on a terminal (a pty) and not otherwise.
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
PY=${ST_PYTHON:-/usr/bin/python3}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
mkdir -p "$T/m"
cat >"$T/m/tokenizer.json" <<'JSON'
{"version": "1.0", "added_tokens": [{"id": 3, "content": "<eos>", "special": true, "normalized": false}],
 "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
 "model": {"type": "BPE", "vocab": {"h": 0, "i": 1, "hi": 2, "<eos>": 3}, "merges": ["h i"]}}
JSON
echo '{"eos_token": "<eos>"}' >"$T/m/tokenizer_config.json"

"$PY" - "$BIN" "$T" <<'PYEOF' || fail "memory"
import json, random, resource, subprocess, sys, h5py, numpy as np
BIN, T = sys.argv[1], sys.argv[2]
def make(path, lines):
    r = random.Random(lines)
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"text": "".join(r.choice("hi") for _ in range(100 + i % 200))}) + "\n")
def peak(path, out):
    # a fresh python child measures only the packer: RUSAGE_CHILDREN of a process that ran one child
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    kb = subprocess.run([sys.executable, "-c", code, BIN, "data", "pack", "--text", path, "--model", f"{T}/m",
                         "--out", out, "--format", "text"], check=True, capture_output=True, text=True).stdout
    return int(kb) / 1024.0
res = {}
for name, lines in (("small", 40000), ("big", 160000)):
    make(f"{T}/{name}.jsonl", lines)
    mb = peak(f"{T}/{name}.jsonl", f"{T}/{name}.h5")
    want = [len(json.loads(l)["text"]) - json.loads(l)["text"].count("hi") + 1 for l in open(f"{T}/{name}.jsonl")]
    with h5py.File(f"{T}/{name}.h5", "r") as f:
        off = f["doc_offsets"][:]
        assert len(off) == lines + 1 and off[0] == 0, "documents"
        assert (np.diff(off) == np.array(want)).all(), "per-document token counts"
        tok = f["tokens"][:]
        assert len(tok) == off[-1] and (tok[off[1:] - 1] == 3).all() and tok.max() <= 3 and f["loss_mask"][:].min() == 1, "tokens"
    res[name] = (mb, int(off[-1]))
    print(f"{name}: {lines} lines, {res[name][1]} tokens, peak RSS {mb:.1f} MB")
grow = res["big"][0] - res["small"][0]
inmem = (res["big"][1] - res["small"][1]) * 5 / 2**20  # uint32 token + uint8 mask each
print(f"peak RSS grows {grow:.1f} MB for {res['big'][1] - res['small'][1]} more tokens (in memory: +{inmem:.0f} MB)")
assert inmem > 80 and grow < 8, "peak memory grows with the input"
PYEOF
echo "ok: bounded memory (--text)"

"$PY" - "$BIN" "$T" <<'PYEOF' || fail "memory (--jsonl)"
import json, random, resource, subprocess, sys, h5py, numpy as np
BIN, T = sys.argv[1], sys.argv[2]
code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
res = {}
for name, docs in (("ids_small", 8000), ("ids_big", 32000)):
    r = random.Random(docs)
    lens = []
    with open(f"{T}/{name}.jsonl", "w") as f:
        for d in range(docs):
            ids = [r.randrange(1000) for _ in range(100 + d % 200)]
            lens.append(len(ids))
            f.write(json.dumps({"input_ids": ids}) + "\n")
    kb = subprocess.run([sys.executable, "-c", code, BIN, "data", "pack", "--jsonl", f"{T}/{name}.jsonl", "--out",
                         f"{T}/{name}.h5"], check=True, capture_output=True, text=True).stdout
    with h5py.File(f"{T}/{name}.h5", "r") as f:
        assert (np.diff(f["doc_offsets"][:]) == np.array(lens)).all() and f.attrs["vocab_size"] <= 1000
        last = json.loads(open(f"{T}/{name}.jsonl").readlines()[-1])["input_ids"]
        assert list(f["tokens"][-len(last):]) == last
    res[name] = (int(kb) / 1024.0, sum(lens))
    print(f"{name}: {docs} docs, {sum(lens)} tokens, peak RSS {res[name][0]:.1f} MB")
grow = res["ids_big"][0] - res["ids_small"][0]
print(f"peak RSS grows {grow:.1f} MB for {res['ids_big'][1] - res['ids_small'][1]} more tokens")
assert grow < 8, "peak memory grows with the input"
PYEOF
echo "ok: bounded memory (--jsonl)"

"$BIN" data pack --text "$T/small.jsonl" --model "$T/m" --out "$T/x.h5" --format text 2>"$T/err" >/dev/null
[ ! -s "$T/err" ] || fail "progress on a non-terminal stderr: $(cat $T/err)"
"$PY" - "$BIN" "$T" <<'PYEOF' || fail "no progress line on a terminal"
import os, pty, subprocess, sys
BIN, T = sys.argv[1], sys.argv[2]
master, slave = pty.openpty()
p = subprocess.Popen([BIN, "data", "pack", "--text", f"{T}/small.jsonl", "--model", f"{T}/m", "--out", f"{T}/y.h5",
                      "--format", "text"], stdout=subprocess.DEVNULL, stderr=slave)
os.close(slave)
out = b""
while True:
    try: chunk = os.read(master, 4096)
    except OSError: break
    if not chunk: break
    out += chunk
assert p.wait() == 0
last = out.decode().replace("\r\n", "\n").split("\r")[-1].strip()
print("terminal:", last)
import re
assert re.fullmatch(r"packing: 40000 lines, [0-9.]+ MB/s, [0-9]+ tokens, 100%", last), last
PYEOF
echo "ok: progress line on a terminal only"
echo "PASS"
