#!/usr/bin/env bash
# test_divergence.sh — a diverging run never loses the good state (issue 15, item 1).
#   1. train.lr=1e20 after 4 good steps, keep_last 3, a checkpoint every step: the job stops with exit 3
#      and one "diverged" line; no checkpoint or final/ from the bad state; every checkpoint left passes
#      `ckpt verify` (which checks finiteness); metrics.jsonl is valid JSON (no nan).
#   2. on_nonfinite=skip: bad steps are skipped (a "skipped" metrics row, a warning line) and the run stops
#      after train.max_nonfinite_skips in a row.
#   3. ckpt verify trusts nothing resume trusts: a NaN in a tensor (with a matching checksum) and an
#      optimizer step beyond the checkpoint's step both fail verify, naming the tensor.
source "$(dirname "$0")/ckpt_lib.sh"

valid_json() {
  "$PY" - "$1" <<'PYEOF'
import json, math, sys
for n, line in enumerate(open(sys.argv[1]), 1):
    r = json.loads(line, parse_constant=lambda c: sys.exit(f"line {n}: {c} is not JSON"))
PYEOF
}

# --- 1. stop (the default) ---
job div 12 2 1 checkpoint.every_steps=1 checkpoint.keep_last=3
[ "$(train 2 div train.steps=4)" = 0 ] || fail "good part: $(cat $T/div.err)"
good_final=$(md5sum < $T/div/final/model.safetensors)
rc=$(train 2 div train.lr=1e20)
[ "$rc" = 3 ] || fail "diverging run: exit $rc, expected 3: $(tail -3 $T/div.err)"
grep -q "error: step [0-9]* diverged (non-finite" $T/div.err || fail "no clear diverged line: $(cat $T/div.err)"
grep "diverged" $T/div.err
[ "$(md5sum < $T/div/final/model.safetensors)" = "$good_final" ] || fail "final/ overwritten by a diverged run"
for f in $T/div/checkpoints/step-*.h5; do
  "$BIN" ckpt verify "$f" >/dev/null || fail "checkpoint $f left from the bad state: $("$BIN" ckpt verify "$f" 2>&1)"
done
ls $T/div/checkpoints | grep -q step-00000004.h5 || fail "the last checkpoint of the good run was rotated out: $(ls $T/div/checkpoints)"
valid_json $T/div/metrics.jsonl || fail "metrics.jsonl is not valid JSON"
grep -q '"loss":null' $T/div/metrics.jsonl || fail "the bad step's row is missing"
cp $T/div/checkpoints/step-00000004.h5 $T/good.h5
# and it resumes from what is there with a sane lr
[ "$(train 2 div)" = 0 ] || fail "resume after divergence: $(tail -3 $T/div.err)"
echo "ok: stop policy: exit 3, checkpoints verify, metrics valid JSON, resumable"

# a checkpoint whose weights diverge on the first step after resuming it is set aside too (the run that
# saved it may have died before a good step proved it)
job div2 12 2 1 checkpoint.every_steps=1 checkpoint.keep_last=3
mkdir -p $T/div2/checkpoints
cp $T/good.h5 $T/div2/checkpoints/step-00000004.h5
cp $T/div/checkpoints/step-00000005.h5.diverged $T/div2/checkpoints/step-00000005.h5
echo step-00000005.h5 > $T/div2/checkpoints/latest
rc=$(train 2 div2)
[ "$rc" = 3 ] || fail "div2: exit $rc: $(tail -3 $T/div2.err)"
grep -q "step-00000005.h5 holds the weights that diverged: moved aside" $T/div2.err || fail "div2: $(cat $T/div2.err)"
[ "$(cat $T/div2/checkpoints/latest)" = step-00000004.h5 ] || fail "div2: latest not moved back"
echo "ok: a resumed checkpoint that diverges at once is set aside"

# --- 2. skip ---
job skip 12 2 1 checkpoint.every_steps=0 train.on_nonfinite=skip train.max_nonfinite_skips=3 train.lr=1e20
rc=$(train 2 skip)
[ "$rc" = 3 ] || fail "skip run: exit $rc, expected 3: $(tail -3 $T/skip.err)"
[ "$(grep -c 'warning: step [0-9]* skipped' $T/skip.err)" = 2 ] || fail "expected 2 skip warnings: $(cat $T/skip.err)"
grep -q "3 steps in a row skipped" $T/skip.err || fail "no stop line: $(cat $T/skip.err)"
[ "$(grep -c '"skipped"' $T/skip/metrics.jsonl)" = 3 ] || fail "expected 3 skipped rows"
valid_json $T/skip/metrics.jsonl || fail "metrics.jsonl is not valid JSON"
[ ! -e $T/skip/final ] || fail "final/ written"
echo "ok: skip policy: 2 skipped, stopped at the 3rd"

# --- 3. verify checks values and attributes ---
ck=$T/good.h5
cp $ck $T/nan.h5; cp $ck $T/stepattr.h5
"$PY" - $T/nan.h5 $T/stepattr.h5 <<'PYEOF'
import h5py, numpy as np, sys
M = (1 << 64) - 1
def splitmix(z):
    z ^= z >> 30; z = (z * 0xBF58476D1CE4E5B9) & M
    z ^= z >> 27; z = (z * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)
def checksum(x):
    bits = x.astype(np.float32).ravel().view(np.uint32)
    return sum(splitmix(((k * 0x9E3779B97F4A7C15) & M) ^ int(b)) for k, b in enumerate(bits)) & M
with h5py.File(sys.argv[1], "r+") as f:
    d = f["model/model.norm.weight"]
    x = d[...]; x[0] = np.nan; d[...] = x
    d.attrs["checksum"] = np.uint64(checksum(x))
with h5py.File(sys.argv[2], "r+") as f:
    f["optim/model.norm.weight/exp_avg_sq"].attrs["step"] = np.int64(288230376151711754)
PYEOF
out=$("$BIN" ckpt verify $T/nan.h5 2>&1) && fail "verify passed a NaN weight"
echo "$out" | grep -q "model/model.norm.weight holds a non-finite value" || fail "verify message: $out"
out=$("$BIN" ckpt verify $T/stepattr.h5 2>&1) && fail "verify passed an optimizer step out of range"
echo "$out" | grep -q "optim/model.norm.weight/exp_avg_sq step 288230376151711754 out of range" || fail "verify message: $out"
echo "ok: verify refuses a NaN tensor and an out-of-range optimizer step"
