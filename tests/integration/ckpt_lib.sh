# ckpt_lib.sh — shared setup for the checkpoint/resume/fault tests (sourced; not a test itself).
# Makes a tiny Llama model and dataset in $T, and helpers to write jobs, run them and read losses.
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
PY=${ST_PYTHON:-/usr/bin/python3}
SRC=${ST_SOURCE_DIR:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
RUNPIDS=()
cleanup() {
  for p in "${RUNPIDS[@]}"; do
    for c in $(pgrep -P "$p" 2>/dev/null); do kill -9 "$c" 2>/dev/null || true; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$T"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/model" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/train.jsonl" --docs 300 --vocab 128 >/dev/null
"$BIN" data pack --jsonl "$T/train.jsonl" --out "$T/train.h5" --vocab 128 >/dev/null

# job NAME STEPS MICRO ACCUM [a.b=value ...]: writes $T/NAME.yaml with run_dir $T/NAME; the overrides
# are stored in $T/NAME.args and passed by train/start on every run of that job
job() {
  local name=$1 steps=$2 micro=$3 accum=$4; shift 4
  {
    echo "model: { path: $T/model }"
    echo "run_dir: $T/$name"
    echo "seed: 7"
    echo "train: { steps: $steps, micro_batch: $micro, grad_accum: $accum, seq_len: 16, lr: 3.0e-3, warmup_steps: 2, log_every: 1000 }"
    echo "sharding: { stage: 1 }"
    echo "tasks: [ { name: count, path: $T/train.h5 } ]"
    echo "eval: { every_steps: 0 }"
    echo "checkpoint: { every_steps: 4, keep_last: 0 }"
    echo "monitor: { publish: \"\", control: \"\" }"
  } > "$T/$name.yaml"
  printf '%s\n' "$@" > "$T/$name.args"
}

# train NP NAME [overrides...]: runs to completion in the foreground; prints rc
train() {
  local np=$1 name=$2; shift 2
  set +e
  local args=(); mapfile -t args < <(grep . "$T/$name.args" || true)
  mpirun --oversubscribe -np "$np" "$BIN" train "$T/$name.yaml" "${args[@]}" "$@" >>"$T/$name.out" 2>>"$T/$name.err"
  local rc=$?
  set -e
  echo $rc
}

# start NP NAME [overrides...]: like train, in the background; sets MP to mpirun's pid
start() {
  local np=$1 name=$2; shift 2
  local args=(); mapfile -t args < <(grep . "$T/$name.args" || true)
  mpirun --oversubscribe -np "$np" "$BIN" train "$T/$name.yaml" "${args[@]}" "$@" >>"$T/$name.out" 2>>"$T/$name.err" &
  MP=$!
  RUNPIDS+=($MP)
}

source "$(dirname "${BASH_SOURCE[0]}")/metrics_lib.sh"

# wait_for FILE_TEST ARG TIMEOUT_S: polls a condition command
wait_until() {
  local timeout=$1; shift
  local end=$((SECONDS + timeout))
  until "$@"; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.05
  done
}

# kill9 PID: kill -9 an mpirun and its rank processes (by pid; children first)
kill9_all() {
  local p=$1
  for c in $(pgrep -P "$p" 2>/dev/null); do kill -9 "$c" 2>/dev/null || true; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}

# the loader state words and tokens_seen of a checkpoint file
ckpt_position() {
  "$PY" - "$1" <<'PYEOF'
import h5py, sys
f = h5py.File(sys.argv[1], "r")
print(int(f.attrs["step"]), int(f.attrs["tokens_seen"]), list(map(int, f.attrs["loader_state"])))
PYEOF
}
