#!/usr/bin/env bash
# z3dev_head_outer.sh — what the blocks-outermost LM-head loss (worker/model.c head_forward_outer) costs in CPU
# time against the row-chunk loop (SHARDTUNE_HEAD_OUTER=0) on the fake device (tests/tools/fakedev --guard, 2
# ranks x 1 thread, device ZeRO-3): the extra head matmul (the logits recomputed in pass 2) against fewer head
# block gathers (counted by the fake device: FAKEDEV_REPORT_MEM). Llama 2 layers x DIM, vocabulary VOCAB,
# micro-batch MB x SEQ tokens, the head cut into blocks of HEAD_ROWS rows (SHARDTUNE_ZERO3_DEV_HEAD_ROWS) and the
# batch into head chunks of CHUNK rows (SHARDTUNE_HEAD_CHUNK_ROWS). Rounds alternate A and B; each run's CPU
# time (user + sys of mpirun and its ranks, getrusage of the children) is printed with the load average. Prints
# numbers only; asserts nothing. CPU_RANKS=1 runs the CPU ranks' stage 3 instead (`shardtune train`, the head
# resident whole and cut into the same blocks by SHARDTUNE_HEAD_BLOCK_ROWS, SHARDTUNE_HEAD_OUTER=1 vs 0): no gathers,
# so the difference is the extra matmul less the row-chunk loop's block copies.
#
#   bench/z3dev_head_outer.sh [BUILD_DIR]   env: DIM (256), VOCAB (16384), MB (4), SEQ (128), HEAD_ROWS (4096),
#                                             CHUNK (128), STEPS (4), ROUNDS (3), PRECISION (fp32), CPU_RANKS (0)
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/shardtune FAKE=$BUILD/fakedev
PY=${ST_PYTHON:-/usr/bin/python3}
DIM=${DIM:-256} VOCAB=${VOCAB:-16384} MB=${MB:-4} SEQ=${SEQ:-128} HEAD_ROWS=${HEAD_ROWS:-4096} CHUNK=${CHUNK:-128}
STEPS=${STEPS:-4} ROUNDS=${ROUNDS:-3} PRECISION=${PRECISION:-fp32} CPU_RANKS=${CPU_RANKS:-0}
cmd=("$FAKE" --guard) blk=SHARDTUNE_ZERO3_DEV_HEAD_ROWS
[ "$CPU_RANKS" = 1 ] && cmd=("$BIN" train) blk=SHARDTUNE_HEAD_BLOCK_ROWS
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$BIN" init-model --family llama --layers 2 --dim "$DIM" --heads 4 --kv-heads 2 --vocab "$VOCAB" --max-seq "$SEQ" \
  --seed 3 --out "$T/model" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/d.jsonl" --docs 400 --vocab "$VOCAB" >/dev/null
"$BIN" data pack --jsonl "$T/d.jsonl" --out "$T/d.h5" --vocab "$VOCAB" >/dev/null
cat > "$T/job.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/run
seed: 7
train: { steps: $STEPS, micro_batch: $MB, seq_len: $SEQ, lr: 1.0e-4, log_every: 1000 }
sharding: { stage: 3 }
precision: $PRECISION
tasks: [ { name: a, path: $T/d.h5 } ]
eval: { every_steps: 0 }
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)  cores: $(nproc)"
# run LABEL OUTER: one run; prints its CPU seconds (children's user + sys) and the fake device's head gathers
run() {
  rm -rf "$T/run"
  env SHARDTUNE_HEAD_OUTER="$2" "$blk=$HEAD_ROWS" SHARDTUNE_HEAD_CHUNK_ROWS="$CHUNK" FAKEDEV_REPORT_MEM=1 \
    "$PY" - "$T" "${cmd[@]}" <<'PY' > "$T/$1.cpu"
import re, resource, subprocess, sys
t, cmd = sys.argv[1], sys.argv[2:]
out = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", *cmd, f"{t}/job.yaml"], capture_output=True, text=True)
if out.returncode: sys.exit(out.stderr[-2000:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
g = re.findall(r"head blocks gathered (\d+) in (\d+) head passes", out.stdout)
print(f"{r.ru_utime + r.ru_stime:.2f} " + (f"{g[0][0]}/{g[0][1]}" if g else "-"))
PY
  echo "$1 $(cat "$T/$1.cpu")"
}
for r in $(seq 1 "$ROUNDS"); do
  a=$(run outer 1) b=$(run rowloop 0)
  echo "round $r: blocks outermost cpu_s gathers/passes ${a#outer } | row-chunk loop ${b#rowloop }"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
