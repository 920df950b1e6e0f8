#!/usr/bin/env bash
# test_distill_zero3.sh — the distillation teacher under sharding.stage 3 is sharded like the student
# (worker/comm.h st_frozen_shard): each of 2 ranks keeps half of the teacher's weights and gathers a layer
# at a time for its forward.
#  * the losses (loss, kd_loss, ce_loss) of every step at stage 3 equal the stage-0 run's on 2 ranks within
#    1e-6 relative (fp32; bf16, whose compute copy is rounded from the same gathered values; and a Llama
#    teacher with GQA and an untied head, gathered per LM-head chunk);
#  * memory, measured (peak RSS of each rank, /usr/bin/time): what the teacher adds to a rank at stage 3
#    (run with teacher - run without) is under 0.7 x what it adds at stage 0, where it is held whole (a
#    GPT-2 teacher of ~19 MB against a small Llama student); the stage-0 addition is at least 0.8 x the
#    teacher's fp32 weights (the measurement sees it);
#  * the planner (shardtune plan --json, bytes.teacher per rank) counts the teacher sharded at stage 3:
#    ceil(n/2) floats + one gathered group + its activations (the difference from the stage-0 figure
#    computed from the teacher's safetensors header, to the byte), and each measured
#    addition stays within its planned figure + 25% + 4 MB.
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
PY=${ST_PYTHON:-/usr/bin/python3}
SRC=${ST_SOURCE_DIR:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "SKIP: no /usr/bin/time"; exit 77; }

"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/student" >/dev/null
"$BIN" init-model --family gpt2 --layers 6 --dim 256 --heads 4 --vocab 128 --max-seq 64 --seed 5 \
  --out "$T/teacher" >/dev/null
"$BIN" init-model --family llama --layers 3 --dim 96 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 9 \
  --out "$T/lteacher" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/train.jsonl" --docs 200 --vocab 128 >/dev/null
"$BIN" data pack --jsonl "$T/train.jsonl" --out "$T/train.h5" --vocab 128 >/dev/null

{
  echo "model: { path: $T/student }"
  echo "seed: 7"
  echo "train: { steps: 4, micro_batch: 2, grad_accum: 1, seq_len: 32, lr: 3.0e-3, warmup_steps: 0 }"
  echo "tasks: [ { name: count, path: $T/train.h5 } ]"
  echo "eval: { every_steps: 0 }"
  echo "checkpoint: { every_steps: 0 }"
  echo "monitor: { publish: \"\", control: \"\" }"
  echo "distill: { teacher: $T/teacher, temperature: 2.0, alpha: 0.7 }"
} > "$T/job.yaml"

run() { # run NAME STAGE [overrides...]: 2 ranks, each rank's peak RSS (kB) in NAME.rss
  local name=$1 stage=$2
  shift 2
  mpirun --oversubscribe -np 2 /usr/bin/time -f "rss %M" -a -o "$T/$name.rss" "$BIN" train "$T/job.yaml" \
    run_dir="$T/$name" sharding.stage="$stage" "$@" >/dev/null 2>"$T/$name.err" || fail "$name: $(cat "$T/$name.err")"
}
run s0 0
run s3 3
run s0_plain 0 distill.teacher= distill.alpha=0.5  # the defaults: alpha without a teacher is refused
run s3_plain 3 distill.teacher= distill.alpha=0.5
run s0_bf16 0 precision=bf16
run s3_bf16 3 precision=bf16
run s0_llama 0 distill.teacher="$T/lteacher"
run s3_llama 3 distill.teacher="$T/lteacher"
"$BIN" plan "$T/job.yaml" --ranks 2 --json sharding.stage=0 >"$T/plan0.json" 2>"$T/plan.err" || fail "plan: $(cat "$T/plan.err")"
"$BIN" plan "$T/job.yaml" --ranks 2 --json sharding.stage=3 >"$T/plan3.json" 2>"$T/plan.err" || fail "plan: $(cat "$T/plan.err")"

"$PY" - "$T" <<'PYEOF' || fail "checks"
import json, os, sys
T = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{T}/{name}/metrics.jsonl")]
def rss(name):  # the larger rank's peak, bytes
    return 1024 * max(int(l.split()[1]) for l in open(f"{T}/{name}.rss") if l.startswith("rss "))
def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)
ok = True
def check(c, msg):
    global ok
    print(("ok   " if c else "FAIL ") + msg)
    ok &= bool(c)
for p in ("", "_bf16", "_llama"):
    a, b = rows("s0" + p), rows("s3" + p)
    check(len(a) == 4 and len(b) == 4, f"{p or 'fp32'}: 4 steps each")
    for x, y in zip(a, b):
        for k in ("loss", "kd_loss", "ce_loss"):
            check(rel(y[k], x[k]) <= 1e-6, f"{p or 'fp32'} step {x['step']}: {k} stage 3 {y[k]!r} = stage 0 {x[k]!r}")
    check(all(x["kd_loss"] > 0 for x in b), f"{p or 'fp32'}: the teacher is used (kd_loss > 0)")
teacher_bytes = os.path.getsize(f"{T}/teacher/model.safetensors")
d0, d3 = rss("s0") - rss("s0_plain"), rss("s3") - rss("s3_plain")
print(f"  teacher file {teacher_bytes / 2**20:.1f} MiB; per-rank peak RSS added by the teacher: stage 0 "
      f"{d0 / 2**20:.1f} MiB, stage 3 {d3 / 2**20:.1f} MiB")
check(d0 >= 0.8 * teacher_bytes, f"stage 0 holds the teacher whole: +{d0 / 2**20:.1f} MiB")
check(d3 < 0.7 * d0, f"stage 3 shards it: +{d3 / 2**20:.1f} MiB < 0.7 x {d0 / 2**20:.1f} MiB")
def planned(path):
    p = json.load(open(path))
    return max(r["bytes"]["teacher"] for s in p["stages"] for r in s["ranks"])
p0, p3 = planned(f"{T}/plan0.json"), planned(f"{T}/plan3.json")
print(f"  planned teacher bytes per rank: stage 0 {p0 / 2**20:.1f} MiB, stage 3 {p3 / 2**20:.1f} MiB")
# from the teacher's tensors: n floats, the largest group a forward gathers (embeddings, a layer, or the
# final norm + head with a tied wte); whole at stage 0, ceil(n / 2) + that group at stage 3
with open(f"{T}/teacher/model.safetensors", "rb") as f:
    hdr = json.loads(f.read(int.from_bytes(f.read(8), "little")))
numel = {k: eval("*".join(map(str, v["shape"])) or "1") for k, v in hdr.items() if k != "__metadata__"}
n = sum(numel.values())
groups = {}
for k, v in numel.items():
    g = k.split(".")[1] if k.startswith("h.") else "head" if k.startswith("ln_f") or k.startswith("lm_head") else "embed"
    groups[g] = groups.get(g, 0) + v
if "lm_head.weight" not in numel:
    groups["head"] += numel["wte.weight"]
group = max(groups.values())
want = 4 * n - 4 * ((n + 1) // 2 + group)
check(p0 - p3 == want, f"the planner counts the teacher sharded at stage 3: stage 0 - stage 3 = {p0 - p3} bytes = "
      f"4 x (n - ceil(n/2) - largest group) = {want} (n {n}, group {group})")
check(p0 >= 4 * n, "the planner counts the whole teacher at stage 0")
for d, p, s in ((d0, p0, 0), (d3, p3, 3)):
    check(d <= 1.25 * p + 4 * 2**20, f"stage {s}: measured +{d / 2**20:.1f} MiB within the planned {p / 2**20:.1f} MiB")
sys.exit(0 if ok else 1)
PYEOF
echo "ok"
