# slurm_helpers.sh — shared by tests/integration/test_slurm_*.sh (sourced, not a test itself).
#
# Each test starts its own local cluster (slurm/local-cluster) in its own state directory and port range,
# so Slurm tests may run in parallel; `slurm_setup` registers the teardown. A test SKIPs (exit 77, which ctest
# reports as skipped) only when Slurm is not installed or the cluster cannot start, and only when Slurm was
# not asked for: with SHARDTUNE_WITH_SLURM=1 (`./run test`, CI) those are failures. Everything after that
# must pass. tests/tests.cmake runs these tests once more after a failure (the throw-away cluster).
#
# Provides: ST, SRC, PY, WORK (scratch dir), SLURM_CONF; slurm_setup PORT, make_tiny_job, losses,
# job_field, wait_job, release_requeued, expect_completed, fail.

set -uo pipefail
ST=${SHARDTUNE_BIN:?SHARDTUNE_BIN must point at the shardtune binary}
SRC=${ST_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PY=${ST_PYTHON:-/usr/bin/python3}
TEST_NAME=$(basename "$0" .sh)

fail() { echo "FAIL ($TEST_NAME): $*" >&2; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }
# unavailable REASON: skipped, or a failure where the Slurm tests were asked for (SHARDTUNE_WITH_SLURM=1)
unavailable() {
  [ "${SHARDTUNE_WITH_SLURM:-0}" = 1 ] && fail "$* (SHARDTUNE_WITH_SLURM=1: the Slurm tests must run)"
  skip "$*"
}
note() { echo "$TEST_NAME [${SECONDS}s]: $*"; }

# A test inherits nothing from an allocation it might be running in.
for v in $(env | sed -n 's/^\(SLURM_[A-Za-z_]*\)=.*/\1/p'); do unset "$v"; done
unset SLURMD_NODENAME

slurm_cleanup() {
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 77 ] && [ -n "${SHARDTUNE_SLURM_DIR:-}" ]; then
    tail -n 15 "$SHARDTUNE_SLURM_DIR"/log/*.log >&2 2>/dev/null || true
  fi
  [ -n "${SHARDTUNE_SLURM_DIR:-}" ] && "$SRC/slurm/local-cluster" down >/dev/null 2>&1
  if [ $rc -ne 0 ] && [ $rc -ne 77 ] && [ -n "${WORK:-}" ]; then
    echo "$TEST_NAME: kept $WORK for inspection" >&2
  elif [ -n "${WORK:-}" ]; then
    rm -rf "$WORK"
  fi
  exit $rc
}

# slurm_setup PORT: a 2-node x 4-CPU cluster on ports PORT.. and a scratch directory WORK.
slurm_setup() {
  local port=$1
  for t in munged slurmctld slurmd srun sbatch scontrol; do
    command -v "$t" >/dev/null 2>&1 ||
      unavailable "Slurm is not installed ($t missing; SHARDTUNE_WITH_SLURM=1 bash scripts/setup.sh installs slurm-wlm munge)"
  done
  export SHARDTUNE_SLURM_DIR=/tmp/shardtune-slurm-$TEST_NAME SHARDTUNE_SLURM_PORT=$port
  WORK=$(mktemp -d "/tmp/$TEST_NAME.XXXXXX")
  trap slurm_cleanup EXIT
  local out
  if ! out=$("$SRC/slurm/local-cluster" up --nodes 2 --cpus 4 2>"$WORK/cluster.err"); then
    cat "$WORK/cluster.err" >&2
    tail -5 "$SHARDTUNE_SLURM_DIR"/log/*.log 2>/dev/null >&2
    unavailable "the local Slurm cluster could not start (see above)"
  fi
  eval "$out"
  export SLURM_CONF OMP_NUM_THREADS=1
  [ -f "$SLURM_CONF" ] || fail "local-cluster up printed no usable SLURM_CONF ($out)"
}

# make_tiny_job: a tiny Llama-style model and a packed dataset in $WORK (model/, train.h5).
make_tiny_job() {
  "$ST" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 256 --max-seq 128 \
        --seed 3 --out "$WORK/model" >/dev/null || fail "init-model failed"
  "$PY" "$SRC/scripts/make_demo_data.py" --out "$WORK/train.jsonl" --docs 300 --vocab 256 >/dev/null ||
    fail "make_demo_data.py failed"
  "$ST" data pack --jsonl "$WORK/train.jsonl" --out "$WORK/train.h5" --vocab 256 >/dev/null || fail "data pack failed"
}

# write_job FILE RUN_DIR STEPS MICRO [extra yaml lines]
write_job() {
  cat > "$1" <<YAML
model: { path: $WORK/model }
run_dir: $2
seed: 7
train: { steps: $3, micro_batch: $4, seq_len: 32, lr: 3.0e-3, warmup_steps: 3, schedule: cosine, log_every: 10 }
sharding: { stage: 1 }
tasks:
  - { name: count, path: $WORK/train.h5 }
eval: { every_steps: 0 }
monitor: { publish: "", control: "" }
${5:-}
YAML
}

source "$(dirname "${BASH_SOURCE[0]}")/metrics_lib.sh" # losses, close_losses

# job_field JOB KEY: one field of `scontrol show job` (JobState, Restarts, ExitCode, ...).
job_field() {
  scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1
}

# wait_job JOB SECONDS STATE...: until the job's state is one of STATE (fails on timeout).
wait_job() {
  local job=$1 secs=$2 s
  shift 2
  for _ in $(seq $((secs * 5))); do
    s=$(job_field "$job" JobState)
    for want in "$@"; do [ "$s" = "$want" ] && return 0; done
    sleep 0.2
  done
  fail "job $job still '$s' after ${secs}s (wanted $*)"
}

# wait_lines FILE N SECONDS: until FILE has at least N lines.
wait_lines() {
  for _ in $(seq $(($3 * 10))); do
    [ -f "$1" ] && [ "$(wc -l < "$1")" -ge "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 has fewer than $2 lines after $3 s"
}

# release_requeued JOB: lets a requeued (pending) job start now. Slurm revokes the old incarnation's job
# credential at the requeue; a restart scheduled within that same second is refused ("Job credential
# revoked") and the job ends FAILED. Real requeues wait ~2 min (BeginTime); a test waits past the second.
release_requeued() {
  sleep 2
  timeout 30 scontrol update JobId="$1" StartTime=now || fail "scontrol update StartTime=now failed"
}

# expect_completed JOB: waits for the job to end and fails (printing its log) unless it COMPLETED.
expect_completed() {
  wait_job "$1" 120 COMPLETED FAILED CANCELLED TIMEOUT
  local state
  state=$(job_field "$1" JobState)
  [ "$state" = COMPLETED ] || { cat "$WORK/job.out"; fail "job $1 ended $state"; }
}
