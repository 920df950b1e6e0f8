#!/usr/bin/env bash
# zero3_step.sh — step time of ZeRO-2 and ZeRO-3 (sharding.stage 2 / 3) against ZeRO-1 on 2 CPU ranks x 1
# thread (ZeRO-2: buckets reduce-scattered during every micro-batch's backward, no full gradient), and
# what ZeRO-2's page release costs (SHARDTUNE_ZERO2_FULL_GRADS=1: the full gradient buffer reduced once at the
# end of the step, as before), and what the prefetch (the next layer's all-gather in flight while this layer computes) buys: ZeRO-3 with
# SHARDTUNE_ZERO3_PREFETCH=0 gathers each layer with a blocking all-gather instead. Llama 8 layers x 512,
# vocab 32000, global batch 4 x 64 tokens (issue #17). Reads step_ms and comm_ms from metrics.jsonl
# (medians over the steps after SKIP), prints the load average before and after: the machine may be
# shared, so compare rows of one run only. Prints numbers only; asserts nothing.
#
# ZeRO-3 "table" gathers the whole embedding table for the forward (SHARDTUNE_ZERO3_EMBED_ROWS=0) instead of
# moving the batch's rows. CONFIGS picks the runs (default "1 on,2 on,2 off,3 on,3 table,3 off"); each ZeRO-3
# run also prints where its ranks spent their comm time (SHARDTUNE_ZERO3_PROFILE=1: acquires of the
# embeddings / layers / head, gradient reduce-scatters, the wait at backward's end; totals over all steps),
# and each round ends with ZeRO-3 / ZeRO-1 step-time ratios.
#
# Robust on a shared machine: the runs of a round go back to back and the rounds interleave; at the end
# every run gets its best and median step time over the rounds (each round's value: the median of its
# steps after SKIP), and ZeRO-3 / ZeRO-1 is printed as best / best, median / median and the median of the
# per-round ratios, with the load average and the machine's core count. BASE=OTHER_BUILD_DIR runs every
# config with that build's binary too, interleaved with this one's (A/B of two builds in one run: build the
# other commit in a separate directory, e.g. `git archive main | tar -x -C /tmp/base` and cmake there).
#
#   bench/zero3_step.sh [BUILD_DIR]     env: STEPS (default 10), SKIP (2), LAYERS (8), DIM (512),
#                                         VOCAB (32000), GB (global batch, 4), SEQ (64), ROUNDS (2),
#                                         PRECISION (fp32 or bf16), ACCUM (train.grad_accum, 1), EXTRA
#                                         (train overrides for every run, e.g. "finetune.mode=lora": the
#                                         frozen base sharded, its runs prefetched), BASE (a second build
#                                         dir, see above), THREADS (OMP_NUM_THREADS per rank, 1)
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/shardtune
PY=${ST_PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-10} SKIP=${SKIP:-2} LAYERS=${LAYERS:-8} DIM=${DIM:-512} VOCAB=${VOCAB:-32000}
GB=${GB:-4} SEQ=${SEQ:-64} ROUNDS=${ROUNDS:-2} PRECISION=${PRECISION:-fp32} ACCUM=${ACCUM:-1} EXTRA=${EXTRA:-}
BASE=${BASE:-} THREADS=${THREADS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=$THREADS
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

"$BIN" init-model --family llama --layers "$LAYERS" --dim "$DIM" --heads 8 --kv-heads 4 --vocab "$VOCAB" \
  --max-seq "$SEQ" --seed 1 --out "$T/model" >/dev/null
"$PY" - "$T/data.jsonl" "$VOCAB" <<'EOF'
import json, random, sys
random.seed(0)
V = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for _ in range(200):
        s = random.randrange(V)
        f.write(json.dumps({"input_ids": [(s + i) % V for i in range(random.randint(70, 200))]}) + "\n")
EOF
"$BIN" data pack --jsonl "$T/data.jsonl" --out "$T/data.h5" --vocab "$VOCAB" >/dev/null
cat > "$T/job.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/run
seed: 1
train: { steps: $STEPS, micro_batch: $((GB / 2)), seq_len: $SEQ, lr: 1.0e-4, warmup_steps: 0, log_every: 1000 }
tasks:
  - { name: a, path: $T/data.h5 }
eval: { every_steps: 0 }
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML

summary() { # RUN_DIR -> "step_ms comm_ms" (medians over steps after SKIP)
  "$PY" - "$1/metrics.jsonl" "$SKIP" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"{med('step_ms'):.1f} {med('comm_ms'):.1f}")
EOF
}

BINS=("$BIN"); LABELS=(this)
[ -n "$BASE" ] && BINS+=("$BASE/shardtune") && LABELS+=(base)
echo "model: llama ${LAYERS} layers x ${DIM}, vocab ${VOCAB}, ${PRECISION} ${EXTRA}; 2 ranks x ${THREADS} thread(s), global batch ${GB} x ${SEQ};" \
     "median of steps $((SKIP + 1))..${STEPS} per run; ${ROUNDS} rounds, interleaved; builds: ${LABELS[*]}"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc --all) cores; a shared machine: compare ratios of one run only)"
printf "%-6s %-5s %-26s %10s %10s %6s\n" round build run step_ms comm_ms load
CONFIGS=${CONFIGS:-1 on,2 on,2 off,3 on,3 table,3 off}
: >"$T/results"
for round in $(seq "$ROUNDS"); do
  IFS=, read -r -a cfgs <<<"$CONFIGS"
  for bi in "${!BINS[@]}"; do
  for cfg in "${cfgs[@]}"; do
    set -- $cfg
    pf=1; [ "$2" = off ] && pf=0
    rows=1; [ "$2" = table ] && rows=0
    name="ZeRO-$1"; [ "$1" = 3 ] && name="ZeRO-3 prefetch $2"
    [ "$1" = 3 ] && [ "$2" = table ] && name="ZeRO-3 table gathered"
    [ "$1" = 2 ] && name="ZeRO-2 grads released $2"
    rd="$T/r$round-$bi-$1-$2"
    SHARDTUNE_ZERO2_FULL_GRADS=$((1 - pf)) SHARDTUNE_ZERO3_PREFETCH=$pf SHARDTUNE_ZERO3_EMBED_ROWS=$rows \
      SHARDTUNE_ZERO3_PROFILE=1 mpirun --oversubscribe -np 2 "${BINS[$bi]}" train "$T/job.yaml" \
      run_dir="$rd" sharding.stage=$1 precision=$PRECISION train.grad_accum=$ACCUM \
      train.micro_batch=$((GB / 2 / ACCUM)) $EXTRA 2>"$T/err" >/dev/null
    read -r s c < <(summary "$rd")
    load=$(cut -d' ' -f1 /proc/loadavg)
    printf "%-6s %-5s %-26s %10s %10s %6s\n" "$round" "${LABELS[$bi]}" "$name" "$s" "$c" "$load"
    grep -o "rank [0-9]*: stage-3 comm ms: .*" "$T/err" | sed 's/^/         /' || true
    printf "%s\t%s\t%s\t%s\n" "$round" "${LABELS[$bi]}" "$name" "$s" >>"$T/results"
  done
  done
done
"$PY" - "$T/results" <<'EOF'
import collections, statistics, sys
runs = collections.OrderedDict()  # (build, run) -> {round: step_ms}
for line in open(sys.argv[1]):
    rnd, build, name, step = line.rstrip("\n").split("\t")
    runs.setdefault((build, name), {})[int(rnd)] = float(step)
print("summary over rounds (step_ms: best / median; ZeRO-3 / ZeRO-1 of the same build: best/best, median/median, "
      "median of the per-round ratios):")
for (build, name), v in runs.items():
    line = f"  {build:5s} {name:26s} best {min(v.values()):9.1f}  median {statistics.median(v.values()):9.1f}"
    z1 = runs.get((build, "ZeRO-1"))
    if name.startswith("ZeRO-3") and z1:
        per = [v[r] / z1[r] for r in v if r in z1]
        line += (f"   ratio {min(v.values()) / min(z1.values()):.3f}x / {statistics.median(v.values()) / statistics.median(z1.values()):.3f}x"
                 f" / {statistics.median(per):.3f}x (rounds: {' '.join(f'{x:.2f}' for x in per)})")
    print(line)
EOF
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
