#!/usr/bin/env bash
# test_strict_inputs.sh — every bad input a user can give ends with one line naming it (issue 15, item 4).
# CLI numbers (init-model, eval, monitor, ctl), config ranges (threads, int64 steps, micro_batch overflow,
# train_layers in full mode), NaN/Inf weights at load, an all-masked dataset, one monitor socket off.
source "$(dirname "$0")/ckpt_lib.sh"

# bad CMD... -- PATTERN: exits non-zero within 10 s, stderr matches PATTERN, nothing but one error line
bad() {
  local pat=${*: -1}; local cmd=("${@:1:$#-1}")
  set +e; local err; err=$(timeout 10 "${cmd[@]}" 2>&1 >/dev/null); local rc=$?; set -e
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "${cmd[*]}: exit $rc (expected a clean failure)"
  echo "$err" | grep -q -- "$pat" || fail "${cmd[*]}: message '$err' lacks '$pat'"
  [ "$(echo "$err" | wc -l)" = 1 ] || fail "${cmd[*]}: more than one line: $err"
  echo "ok: ${cmd[1]} ${cmd[2]} ${cmd[3]}: $err"
}
IM=(init-model --family llama --dim 64 --heads 4 --vocab 128 --out $T/x)
bad "$BIN" "${IM[@]}" --layers foo "init-model: error: --layers: expected an integer in 1..4096, got 'foo'"
bad "$BIN" "${IM[@]}" --layers 2 --seed abc "--seed: expected an integer in 0..9223372036854775807, got 'abc'"
bad "$BIN" "${IM[@]}" --layers 2 --heads 4x "--heads: expected an integer in 1..1024, got '4x'"
bad "$BIN" "${IM[@]}" --layers 2 --rope-theta nan "--rope-theta: expected a number"
bad "$BIN" eval --model $T/model --data $T/train.h5 --seq-len 16x "eval: error: --seq-len: expected an integer"
bad "$BIN" monitor tcp://127.0.0.1:1 --timeout nan "monitor: error: --timeout: expected a number in \[0, 1e+09\], got 'nan'"
bad "$BIN" ctl tcp://127.0.0.1:1 status --timeout -1 "ctl: error: --timeout: expected a number"

job j 2 2 1
bad "$BIN" train $T/j.yaml threads=100000 "threads: expected an integer in 0..1024, got '100000'"
bad "$BIN" train $T/j.yaml train.steps=4294967299 "train.steps: expected an integer in 1..2147483647, got '4294967299'"
bad "$BIN" train $T/j.yaml train.micro_batch=2147483647 "train.micro_batch x train.seq_len = "
bad "$BIN" train $T/j.yaml finetune.train_layers=0-1 "finetune.train_layers: '0-1' has no effect in finetune.mode full"

# NaN / Inf weights: refused at load naming the tensor (train and eval)
cp -r $T/model $T/nanmodel
"$PY" - $T/nanmodel/model.safetensors <<'PYEOF'
import json, struct, sys
p = sys.argv[1]; b = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
name = "model.layers.1.mlp.up_proj.weight"; s = h[name]["data_offsets"][0] + 8 + n
b[s + 4 * 5:s + 4 * 6] = struct.pack("<f", float("inf"))
open(p, "wb").write(b)
PYEOF
bad "$BIN" eval --model $T/nanmodel --data $T/train.h5 --seq-len 16 "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value (inf at element 5)"
bad "$BIN" train $T/j.yaml model.path=$T/nanmodel "tensor model.layers.1.mlp.up_proj.weight holds a non-finite value"

# an all-masked dataset
"$PY" - $T/masked.jsonl <<'PYEOF'
import json, sys
with open(sys.argv[1], "w") as f:
    for d in range(20):
        ids = [(d * 7 + i) % 100 + 1 for i in range(40)]
        f.write(json.dumps({"input_ids": ids, "labels": [-100] * 40}) + "\n")
PYEOF
"$BIN" data pack --jsonl $T/masked.jsonl --out $T/masked.h5 --vocab 128 >/dev/null
bad "$BIN" train $T/j.yaml tasks.0.path=$T/masked.h5 "every token of $T/masked.h5 is masked"
bad "$BIN" eval --model $T/model --data $T/masked.h5 --seq-len 16 "no unmasked target token"

# one monitor socket off: works (the other still serves)
[ "$(train 1 j 'monitor.publish=""' 'monitor.control=tcp://127.0.0.1:*')" = 0 ] || fail "publish off: $(tail -2 $T/j.err)"
[ "$(train 1 j 'monitor.control=""' 'monitor.publish=tcp://127.0.0.1:*' resume=none)" = 0 ] || fail "control off: $(tail -2 $T/j.err)"
echo "ok: one monitor socket off works"
