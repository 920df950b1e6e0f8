#!/usr/bin/env bash
# test_eval_split.sh — `shardtune eval --split train|val|test --job JOB.yaml` (tiny Llama, 2 tasks):
#   1. after a 4-step run that evaluates the whole val split at step 4, `eval --split val --job` on
#      RUN_DIR/final equals the trainer's own val_loss of each task in metrics.jsonl (stream and documents
#      packing; 1e-6 relative: the same windows, the same weights, only the batch layout may differ).
#   2. an independent Python reimplementation of the by-document split (xoshiro256** seeded by splitmix64,
#      Fisher-Yates, llround sizes) over the dataset read with h5py: the test docs are exactly those that
#      neither train nor val hold; each split's docs written alone to a file and evaluated with the plain
#      `eval --data` path give the same loss and token count as `eval --split` (stream packing).
#   3. --json shape; refusals: --split without --job, --job without --split, a bad split name, --data
#      with --job, overrides without --job; an empty split is one line naming it.
source "$(dirname "$0")/ckpt_lib.sh"
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/rep.jsonl" --docs 200 --vocab 128 --seed 5 --task repeat >/dev/null
"$BIN" data pack --jsonl "$T/rep.jsonl" --out "$T/rep.h5" --vocab 128 >/dev/null

twotask() { # NAME [overrides]: 4 steps, the whole val split evaluated at step 4
  local name=$1; shift
  job "$name" 4 2 1 eval.every_steps=4 eval.batches=100000 "tasks=[{name: count, path: $T/train.h5}, {name: rep, path: $T/rep.h5}]" "$@"
}
# the trainer's val_loss of the last metrics row vs eval --split val --json on final/
same_as_trainer() {
  local name=$1; shift
  local args=(); mapfile -t args < <(grep . "$T/$name.args" || true)
  "$BIN" eval --split val --job "$T/$name.yaml" --model "$T/$name/final" --json "${args[@]}" > "$T/$name.eval" \
    2> "$T/$name.eval.err" || fail "eval --split val: $(cat $T/$name.eval.err)"
  "$PY" - "$T/$name/metrics.jsonl" "$T/$name.eval" <<'PYEOF' || fail "$name: eval --split val differs from the trainer"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
val = rows[-1]["val_loss"]
ev = json.loads(open(sys.argv[2]).read())
assert ev["split"] == "val" and set(ev["tasks"]) == set(val), (ev, val)
num = den = 0.0
for k, v in val.items():
    mine = ev["tasks"][k]["loss"]
    rel = abs(mine - v) / abs(v)
    print(f"  {k}: trainer {v:.9g} eval {mine:.9g} rel {rel:.2g} tokens {ev['tasks'][k]['tokens']} docs {ev['tasks'][k]['docs']}")
    assert rel <= 1e-6, k
    num += mine * ev["tasks"][k]["tokens"]; den += ev["tasks"][k]["tokens"]
assert abs(ev["loss"] - num / den) <= 1e-7 * abs(ev["loss"]) and ev["tokens"] == den, ("overall", ev)
PYEOF
}

twotask sv
[ "$(train 1 sv)" = 0 ] || fail "train (stream): $(cat $T/sv.err)"
same_as_trainer sv
echo "ok: stream packing: eval --split val = the trainer's val loss"
twotask dv train.packing=documents train.seq_len=32
[ "$(train 1 dv)" = 0 ] || fail "train (documents): $(cat $T/dv.err)"
same_as_trainer dv
echo "ok: documents packing: eval --split val = the trainer's val loss"

# 2. the split, reimplemented; each split's docs alone through `eval --data`
PYTHONPATH="$SRC/tests/integration" "$PY" - "$T" <<'PYEOF' || fail "independent split"
import sys, h5py, numpy as np
from split_ref import read, splits
T = sys.argv[1]
for k, name in enumerate(["train", "rep"]):
    tok, mask, off, attrs = read(f"{T}/{name}.h5")
    D = len(off) - 1
    parts = splits(f"{T}/{name}.h5", 7, k)
    assert parts[2] == sorted(set(range(D)) - set(parts[0]) - set(parts[1])), "test != neither train nor val"
    for s, docs in zip(["train", "val", "test"], parts):
        with h5py.File(f"{T}/{name}.{s}.h5", "w") as g:
            idx = np.concatenate([np.arange(off[d], off[d + 1], dtype=np.int64) for d in docs] + [np.zeros(0, np.int64)])
            g["tokens"] = tok[idx].astype(np.uint32)
            if mask is not None: g["loss_mask"] = mask[idx].astype(np.uint8)
            g["doc_offsets"] = np.concatenate([[0], np.cumsum([off[d + 1] - off[d] for d in docs])]).astype(np.uint64)
            g.attrs["vocab_size"] = np.int64(attrs["vocab_size"]); g.attrs["eos_id"] = np.int64(attrs["eos_id"])
        print(f"{name}.{s}: {len(docs)} docs")
PYEOF
mapfile -t SVARGS < <(grep . "$T/sv.args")
for s in train val test; do
  "$BIN" eval --split $s --job "$T/sv.yaml" --model "$T/sv/final" --json "${SVARGS[@]}" > "$T/split.$s" 2>"$T/split.err" \
    || fail "eval --split $s: $(cat $T/split.err)"
  for task in count:train rep:rep; do
    "$BIN" eval --model "$T/sv/final" --data "$T/${task#*:}.$s.h5" --seq-len 16 --batch 2 --json > "$T/plain" \
      || fail "plain eval of ${task#*:}.$s.h5"
    "$PY" - "$T/split.$s" "$T/plain" "${task%%:*}" <<'PYEOF' || fail "split $s task $task: --split differs from the independent split"
import json, sys
a = json.load(open(sys.argv[1]))["tasks"][sys.argv[3]]; b = json.load(open(sys.argv[2]))
assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)
PYEOF
  done
done
echo "ok: train/val/test splits equal the independent reimplementation (test = neither train nor val)"

# 3. text output and refusals
"$BIN" eval --split test --job "$T/sv.yaml" "${SVARGS[@]}" > "$T/txt" || fail "text output"
grep -q "^task=count split=test docs=[0-9]* loss=[0-9.]* tokens=[0-9]*$" "$T/txt" || fail "per-task line: $(cat $T/txt)"
tail -1 "$T/txt" | grep -q "^loss=[0-9.]* tokens=[0-9]*$" || fail "overall line: $(cat $T/txt)"
refuse() { # MESSAGE ARGS...
  local msg=$1; shift
  set +e; "$BIN" eval "$@" > /dev/null 2> "$T/ref.err"; local rc=$?; set -e
  [ $rc != 0 ] || fail "accepted: eval $*"
  grep -q -- "$msg" "$T/ref.err" || fail "eval $*: expected '$msg', got: $(cat $T/ref.err)"
}
refuse "--split needs --job JOB.yaml" --split val --model "$T/model" --data "$T/train.h5" --seq-len 16
refuse "--job needs --split train|val|test" --job "$T/sv.yaml"
refuse "--split must be train, val or test" --split dev --job "$T/sv.yaml"
refuse "--data and --seq-len come from the job" --split val --job "$T/sv.yaml" --data "$T/train.h5"
refuse "key=value overrides go with --job" --model "$T/model" --data "$T/train.h5" --seq-len 16 train.seq_len=8
refuse "the val split of the job's tasks holds no target token" --split val --job "$T/sv.yaml" "${SVARGS[@]}" "split=[0.9, 0.0, 0.1]"
refuse "train.steps and train.epochs are both given" --split val --job "$T/sv.yaml" train.epochs=1
echo "ok: refusals"
echo "PASS"
