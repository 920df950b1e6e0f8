#!/usr/bin/env bash
# `shardtune export MODEL_DIR --out DIR` (DESIGN.md: SRC may be a model directory): the written directory
# holds the same tensors (bit-identical file for an fp32 source), the source's config.json text and its
# tokenizer / generation files, and evaluates to the same loss; a missing source is one line, exit 1.
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --seed 3 --out "$T/m" >/dev/null
echo '{"eos_token_id": [1, 2]}' > "$T/m/generation_config.json"
echo '{"chat_template": "{{ messages }}"}' > "$T/m/tokenizer_config.json"
/usr/bin/python3 -c 'import json, random; random.seed(1); print(json.dumps({"input_ids": [random.randrange(128) for _ in range(300)]}))' > "$T/d.jsonl"
"$BIN" data pack --jsonl "$T/d.jsonl" --out "$T/d.h5" --vocab 128 >/dev/null
"$BIN" export "$T/m" --out "$T/out" >/dev/null || fail "export of a model directory"
cmp -s "$T/m/model.safetensors" "$T/out/model.safetensors" || fail "weights differ from the source"
for f in config.json generation_config.json tokenizer_config.json; do
  cmp -s "$T/m/$f" "$T/out/$f" || fail "$f not carried verbatim"
done
a=$("$BIN" eval --model "$T/m" --data "$T/d.h5" --seq-len 32)
b=$("$BIN" eval --model "$T/out" --data "$T/d.h5" --seq-len 32)
[ "$a" = "$b" ] || fail "eval differs: $a vs $b"
set +e; out=$("$BIN" export "$T/nothing" --out "$T/o2" 2>&1); rc=$?; set -e
[ $rc -eq 1 ] && [ "$(echo "$out" | wc -l)" -eq 1 ] || fail "missing source: rc $rc: $out"
[ ! -e "$T/o2" ] || fail "a failed export left $T/o2"
echo "ok: export of a model directory ($a)"
