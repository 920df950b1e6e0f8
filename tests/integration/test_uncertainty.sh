#!/usr/bin/env bash
# Multi-task with learned uncertainty weighting (loss_weighting: uncertainty) on real MPI ranks:
#  - a noisy task (random tokens) ends with a smaller weight than a learnable one (a counting rule);
#  - 1 rank and 2 ranks with the same global batch give the same losses and task weights (<= 1e-6);
#  - resume after a stop reproduces the uninterrupted losses and weights bit for bit.
set -euo pipefail
ST=${SHARDTUNE_BIN:?}; SRC=${ST_SOURCE_DIR:?}; PY=${ST_PYTHON:-/usr/bin/python3}
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
"$ST" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 256 --max-seq 64 --out "$T/m" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/easy.jsonl" --docs 300 --task count
"$PY" - "$T/hard.jsonl" <<'PYEOF'
import json, random, sys
r = random.Random(7)
with open(sys.argv[1], "w") as f:
    for _ in range(300):
        f.write(json.dumps({"input_ids": [r.randrange(255) for _ in range(r.randint(10, 40))]}) + "\n")
PYEOF
"$ST" data pack --jsonl "$T/easy.jsonl" --out "$T/easy.h5" --vocab 256 >/dev/null
"$ST" data pack --jsonl "$T/hard.jsonl" --out "$T/hard.h5" --vocab 256 >/dev/null
cat > "$T/job.yaml" <<YAML
model: { path: $T/m }
train: { steps: 40, micro_batch: 4, seq_len: 32, lr: 3.0e-3, warmup_steps: 2, schedule: constant }
tasks:
  - { name: easy, path: $T/easy.h5 }
  - { name: hard, path: $T/hard.h5 }
mixing: { strategy: weights }
loss_weighting: uncertainty
loss_weighting_lr: 0.05
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML
run() { local np=$1 dir=$2; shift 2; mpirun --oversubscribe -np "$np" "$ST" train "$T/job.yaml" run_dir="$T/$dir" "$@" >"$T/$dir.log" 2>&1 || { cat "$T/$dir.log"; return 1; }; }
run 1 one
run 2 two train.micro_batch=2
# stopped at step 20 (checkpoint at the end of a shorter run), then resumed to 40
run 1 part train.steps=20 checkpoint.every_steps=20
sed -i 's/steps: 40/steps: 40/' "$T/job.yaml"
mpirun --oversubscribe -np 1 "$ST" train "$T/job.yaml" run_dir="$T/part" resume=auto >"$T/part2.log" 2>&1 || { cat "$T/part2.log"; exit 1; }
"$PY" - "$T" <<'PYEOF'
import json, sys
t = sys.argv[1]
def load(d):
    rows = [json.loads(l) for l in open("%s/%s/metrics.jsonl" % (t, d))]
    return {r["step"]: r for r in rows}
one, two, part = load("one"), load("two"), load("part")
w = one[40]["task_weight"]
assert w["hard"] < w["easy"], "the noisy task should end with the smaller weight: %s" % w
assert one[40]["task_loss"]["hard"] > one[40]["task_loss"]["easy"], one[40]["task_loss"]
for s in range(1, 41):
    a, b = one[s], two[s]
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (s, a["loss"], b["loss"])
    for k in ("easy", "hard"):
        assert abs(a["task_weight"][k] - b["task_weight"][k]) <= 1e-6 * a["task_weight"][k], (s, k)
    c = part[s]
    assert c["loss"] == a["loss"] and c["task_weight"] == a["task_weight"], ("resume differs", s, c["loss"], a["loss"])
print("ok: task weights after 40 steps %s (hard < easy); 1 rank == 2 ranks; resume bit-identical" % w)
PYEOF
