#!/usr/bin/env bash
# test_slurm_srun.sh — (a) a 2-node x 2-task `srun --mpi=pmix shardtune train` on a real (local) Slurm
# cluster finishes, and every step's loss equals the same job under `mpirun -np 4` (same world size,
# same global batch: bit-identical by the determinism contract).
source "$(dirname "$0")/slurm_helpers.sh"
slurm_setup 17110
make_tiny_job
write_job "$WORK/job.yaml" "$WORK/unused" 25 2

timeout 120 srun -N2 --ntasks-per-node=2 --mpi=pmix "$ST" train "$WORK/job.yaml" run_dir="$WORK/srun" \
  > "$WORK/srun.log" 2>&1 || { cat "$WORK/srun.log"; fail "srun training failed"; }
grep -q "4 rank(s)" "$WORK/srun.log" || { cat "$WORK/srun.log"; fail "srun did not start 4 ranks"; }
[ -f "$WORK/srun/final/model.safetensors" ] || fail "no final weights from the srun job"

timeout 120 mpirun --oversubscribe -np 4 "$ST" train "$WORK/job.yaml" run_dir="$WORK/mpirun" \
  > "$WORK/mpirun.log" 2>&1 || { cat "$WORK/mpirun.log"; fail "mpirun training failed"; }

losses "$WORK/srun" > "$WORK/srun.loss"
losses "$WORK/mpirun" > "$WORK/mpirun.loss"
[ "$(wc -l < "$WORK/srun.loss")" = 25 ] || fail "expected 25 steps from srun, got $(wc -l < "$WORK/srun.loss")"
diff "$WORK/mpirun.loss" "$WORK/srun.loss" > "$WORK/loss.diff" ||
  { cat "$WORK/loss.diff"; fail "srun and mpirun losses differ"; }
first=$(head -1 "$WORK/srun.loss" | cut -d' ' -f2)
last=$(tail -1 "$WORK/srun.loss" | cut -d' ' -f2)
"$PY" -c "import sys; sys.exit(0 if float('$last') < float('$first') else 1)" ||
  fail "loss did not go down ($first -> $last)"
note "OK: srun 2x2 == mpirun -np 4 over 25 steps (final loss $last)"
