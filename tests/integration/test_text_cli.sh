#!/usr/bin/env bash
# test_text_cli.sh — `shardtune tokenize` and `data pack --text`: every user error is one line naming the
# cause with the right exit code, and nothing partial is left behind. (Correctness against Hugging Face
# is in tests/reference/ref_tokenizer.py and ref_data_pack_text.py.)
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# expect RC WORDS CMD... : exit code RC and WORDS on stderr
expect() {
  local want=$1 words=$2; shift 2
  set +e; "$@" >"$T/out" 2>"$T/err"; local rc=$?; set -e
  [ "$rc" = "$want" ] || fail "$* exited $rc, want $want: $(cat "$T/err")"
  grep -qF -- "$words" "$T/err" || fail "$* stderr lacks '$words': $(cat "$T/err")"
}

mkdir -p "$T/m" "$T/empty"
cat >"$T/m/tokenizer.json" <<'JSON'
{"version": "1.0", "added_tokens": [{"id": 3, "content": "<eos>", "special": true, "normalized": false}],
 "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
 "model": {"type": "BPE", "vocab": {"h": 0, "i": 1, "hi": 2, "<eos>": 3}, "merges": ["h i"]}}
JSON
echo '{"eos_token": "<eos>"}' >"$T/m/tokenizer_config.json"

# tokenize: a good line, then a bad one: the good output stays, the error names line 2
printf '"hi"\nnot json\n"hi"\n' | { set +e; "$BIN" tokenize --model "$T/m" >"$T/out" 2>"$T/err"; echo $? >"$T/rc"; }
[ "$(cat "$T/rc")" = 1 ] || fail "tokenize on a bad line exited $(cat "$T/rc")"
[ "$(cat "$T/out")" = "[2]" ] || fail "tokenize wrote '$(cat "$T/out")' before the bad line"
grep -q "stdin line 2" "$T/err" || fail "no line number: $(cat "$T/err")"
echo '[2, 3]' | "$BIN" tokenize --model "$T/m" --decode | grep -qx '"hi"' || fail "decode skips <eos>"
echo '[2, 3]' | "$BIN" tokenize --model "$T/m" --decode --no-special | grep -qx '"hi <eos>"' || fail "decode --no-special"
expect 2 "missing --model" "$BIN" tokenize
expect 1 "tokenizer.json" "$BIN" tokenize --model "$T/empty"
echo '[1.5]' >"$T/ids"
expect 1 "not a token id" "$BIN" tokenize --model "$T/m" --decode <"$T/ids"

# data pack --text
echo '{"text": "hi"}' >"$T/ok.jsonl"
printf '{"text": "hi"}\n{"messages": [{"role": "user", "content": "x"}]}\n' >"$T/chat.jsonl"
expect 2 "--text needs --model" "$BIN" data pack --text "$T/ok.jsonl" --out "$T/o.h5"
expect 2 "--format must be" "$BIN" data pack --text "$T/ok.jsonl" --model "$T/m" --out "$T/o.h5" --format csv
expect 2 "--train-on must be" "$BIN" data pack --text "$T/ok.jsonl" --model "$T/m" --out "$T/o.h5" --train-on some
expect 2 "come from the model" "$BIN" data pack --text "$T/ok.jsonl" --model "$T/m" --out "$T/o.h5" --vocab 9
expect 1 "line 2: chat rows need a chat template" "$BIN" data pack --text "$T/chat.jsonl" --model "$T/m" --out "$T/o.h5"
[ ! -e "$T/o.h5" ] || fail "a failed pack left $T/o.h5"
expect 1 "--template nope" "$BIN" data pack --text "$T/chat.jsonl" --model "$T/m" --out "$T/o.h5" --template nope
echo '{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}' >"$T/t.jinja"
expect 1 "no assistant message" "$BIN" data pack --text "$T/chat.jsonl" --model "$T/m" --out "$T/o.h5" --template "$T/t.jinja"
echo '{% for m in messages %}{{ m.content | bogus }}{% endfor %}' >"$T/bad.jinja"
expect 1 "filter 'bogus' is not supported" "$BIN" data pack --text "$T/chat.jsonl" --model "$T/m" --out "$T/o.h5" --template "$T/bad.jinja" --train-on all
expect 1 "line 1: a chat row needs \"messages\"" "$BIN" data pack --text "$T/ok.jsonl" --model "$T/m" --out "$T/o.h5" --format chat --template "$T/t.jinja"
"$BIN" data pack --text "$T/ok.jsonl" --model "$T/m" --out "$T/o.h5" | grep -q "packed docs=1 tokens=2 trained=2" || fail "text pack summary"
echo "ok"
