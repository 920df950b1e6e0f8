#!/usr/bin/env bash
# test_train_epochs.sh — train.epochs instead of train.steps (tiny Llama, 2 tasks, seq_len 16):
#   1. the step count is ceil(epochs x train sequences of one epoch / global batch), the sequences computed
#      independently (tests/integration/split_ref.py: the by-document split over h5py, then (train tokens
#      - 1) // seq_len windows per task in stream packing); global batch = micro x accum x ranks, checked at
#      1 rank (2 x 2) and 2 ranks (2 x 1 and 2 x 2). The count is printed, every metrics row records it
#      (total_steps) and the run stops there.
#   2. packing documents: the count follows the packed sequences the start prints.
#   3. resume: epochs 0.1 run to the end, then the same job with epochs 0.3 continues from its checkpoint
#      and is bit-identical to an uninterrupted 0.3-epoch run (constant schedule).
#   4. steps and epochs together are one line naming both.
source "$(dirname "$0")/ckpt_lib.sh"
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/rep.jsonl" --docs 200 --vocab 128 --seed 5 --task repeat >/dev/null
"$BIN" data pack --jsonl "$T/rep.jsonl" --out "$T/rep.h5" --vocab 128 >/dev/null
ejob() { # NAME MICRO ACCUM [overrides]: a job without train.steps
  local name=$1 micro=$2 accum=$3; shift 3
  job "$name" 1 "$micro" "$accum" "tasks=[{name: count, path: $T/train.h5}, {name: rep, path: $T/rep.h5}]" \
    train.schedule=constant "$@"
  sed -i 's/{ steps: [0-9]*, /{ /' "$T/$name.yaml"
  ! grep -q "{ steps" "$T/$name.yaml" || fail "could not drop train.steps from $T/$name.yaml"
}
expected() { # EPOCHS GLOBAL_BATCH -> the step count, computed independently
  PYTHONPATH="$SRC/tests/integration" "$PY" - "$T" "$1" "$2" <<'PYEOF'
import math, sys
from split_ref import splits, split_tokens
T, epochs, G = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
seqs = sum((split_tokens(f"{T}/{n}.h5", splits(f"{T}/{n}.h5", 7, k)[0]) - 1) // 16 for k, n in enumerate(["train", "rep"]))
print(max(1, math.ceil(epochs * seqs / G - 1e-9)))
PYEOF
}
check_run() { # NAME EXPECTED_STEPS
  local name=$1 want=$2
  grep -q "^train.epochs .* -> $want steps (" "$T/$name.out" || fail "$name: no '-> $want steps' line: $(grep -a epochs $T/$name.out)"
  "$PY" - "$T/$name/metrics.jsonl" "$want" <<'PYEOF' || fail "$name: metrics do not end at step $want"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
want = int(sys.argv[2])
assert rows[-1]["step"] == want and all(r["total_steps"] == want for r in rows), (rows[-1], want)
PYEOF
}

ejob a 2 2 train.epochs=0.3
[ "$(train 1 a)" = 0 ] || fail "1 rank: $(cat $T/a.err)"
want=$(expected 0.3 4); check_run a "$want"
echo "ok: 1 rank, global batch 4: $(grep -a '^train.epochs' $T/a.out)"
ejob b 2 1 train.epochs=0.3
[ "$(train 2 b)" = 0 ] || fail "2 ranks: $(cat $T/b.err)"
check_run b "$want"
ejob c 2 2 train.epochs=0.3
[ "$(train 2 c)" = 0 ] || fail "2 ranks x accum 2: $(cat $T/c.err)"
want8=$(expected 0.3 8); [ "$want8" != "$want" ] || fail "global batch 8 gives the same count as 4"
check_run c "$want8"
echo "ok: 2 ranks, global batch 4 and 8: $want and $want8 steps"

ejob d 2 1 train.epochs=0.5 train.packing=documents train.seq_len=32
[ "$(train 1 d)" = 0 ] || fail "documents: $(cat $T/d.err)"
seqs=$(sed -n 's/^packing: task .*: \([0-9]*\) sequences per epoch.*/\1/p' "$T/d.out" | paste -sd+ | bc)
wantd=$("$PY" -c "import math; print(max(1, math.ceil(0.5 * $seqs / 2 - 1e-9)))")
check_run d "$wantd"
echo "ok: documents packing: $seqs packed sequences per epoch -> $wantd steps"

ejob full 2 1 train.epochs=0.3
[ "$(train 1 full)" = 0 ] || fail "uninterrupted: $(cat $T/full.err)"
ejob part 2 1 train.epochs=0.1 checkpoint.every_steps=1
[ "$(train 1 part)" = 0 ] || fail "resume part 1: $(cat $T/part.err)"
[ "$(train 1 part train.epochs=0.3 checkpoint.every_steps=4)" = 0 ] || fail "resume part 2: $(cat $T/part.err)"
grep -q "resumed from step-" "$T/part.out" || fail "no resume line: $(cat $T/part.out)"
losses "$T/full" > "$T/full.loss"; losses "$T/part" > "$T/part.loss"
cmp -s "$T/full.loss" "$T/part.loss" || { diff "$T/full.loss" "$T/part.loss" | head; fail "resume: losses differ"; }
cmp -s "$T/full/final/model.safetensors" "$T/part/final/model.safetensors" || fail "resume: final weights differ"
echo "ok: epochs 0.1 then 0.3 resumed = 0.3 uninterrupted ($(wc -l < $T/full.loss) steps)"

job both 4 2 1 train.epochs=1
[ "$(train 1 both)" != 0 ] || fail "steps and epochs together were accepted"
grep -q "train.steps and train.epochs are both given: use exactly one of them" "$T/both.err" || fail "both: $(cat $T/both.err)"
echo "ok: refusal"
echo "PASS"
