#!/usr/bin/env bash
# test_slurm_cancel.sh — (d) cancelling never costs more than the work since the last checkpoint:
#  1. a plain `scancel` while a checkpoint is being written (a *.partial file exists): srun turns the
#     SIGTERM into SIGKILL for the ranks, so the save dies half-way; the job is not requeued, and
#     `shardtune ckpt verify` accepts the checkpoint directory's latest;
#  2. a resubmission resumes from it, then `scancel --signal=TERM --batch` stops it gracefully: the
#     wrapper asks for a checkpoint, the ranks exit 85 and the job ends without a requeue;
#  3. srun resumes from that and finishes with exactly the losses of an uninterrupted run.
source "$(dirname "$0")/slurm_helpers.sh"
slurm_setup 17140
make_tiny_job
STEPS=60
write_job "$WORK/job.yaml" "$WORK/run" $STEPS 2 "checkpoint: { every_steps: 0, keep_last: 2 }"

timeout 120 srun -N2 --ntasks-per-node=2 --mpi=pmix "$ST" train "$WORK/job.yaml" run_dir="$WORK/ref" \
  > "$WORK/ref.log" 2>&1 || { cat "$WORK/ref.log"; fail "reference run failed"; }

submit() { # NAME [overrides]
  local name=$1
  shift
  SHARDTUNE_BIN=$ST SHARDTUNE_LAUNCH=$SRC/slurm/shardtune-launch \
    timeout 30 sbatch --parsable -N2 --ntasks-per-node=2 -o "$WORK/$name.out" "$SRC/slurm/shardtune.sbatch" \
    "$WORK/job.yaml" "$@" || fail "sbatch failed"
}
cd "$WORK"

# --- 1. scancel during a save (a checkpoint every 2 steps, so one is nearly always being written) ---
job=$(submit job1 checkpoint.every_steps=2)
wait_job "$job" 30 RUNNING
wait_lines "$WORK/run/metrics.jsonl" 5 60
during=no
for _ in $(seq 400); do
  if compgen -G "$WORK/run/checkpoints/*.partial" > /dev/null; then during=yes; break; fi
  sleep 0.02
done
timeout 30 scancel "$job" || fail "scancel failed"
wait_job "$job" 60 CANCELLED COMPLETED FAILED
[ "$(job_field "$job" JobState)" = CANCELLED ] || { cat "$WORK/job1.out"; fail "job $job did not end CANCELLED"; }
[ "$(job_field "$job" Restarts)" = 0 ] || { cat "$WORK/job1.out"; fail "a cancelled job was requeued"; }
note "cancelled job $job (a save was in progress: $during); checkpoints: $(ls "$WORK/run/checkpoints" | tr '\n' ' ')"
"$ST" ckpt verify "$WORK/run/checkpoints" > "$WORK/verify1.log" 2>&1 ||
  { cat "$WORK/verify1.log"; fail "ckpt verify rejects the checkpoint left by scancel"; }
first_stop=$(wc -l < "$WORK/run/metrics.jsonl")

# --- 2. resubmit, resume, graceful stop ---
job=$(submit job2)
wait_job "$job" 30 RUNNING
wait_lines "$WORK/job2.out" 1 30
for _ in $(seq 300); do grep -q "resumed from" "$WORK/job2.out" && break; sleep 0.1; done
grep -q "resumed from" "$WORK/job2.out" || { cat "$WORK/job2.out"; fail "the resubmitted job did not resume"; }
wait_lines "$WORK/run/metrics.jsonl" $((first_stop + 4)) 60
timeout 30 scancel --signal=TERM --batch "$job" || fail "scancel --signal=TERM --batch failed"
wait_job "$job" 60 FAILED COMPLETED CANCELLED
grep -q "not requeueing" "$WORK/job2.out" || { cat "$WORK/job2.out"; fail "the wrapper did not stop without requeue"; }
grep -q "exit 85" "$WORK/job2.out" || { cat "$WORK/job2.out"; fail "the ranks did not checkpoint and exit 85"; }
[ "$(job_field "$job" ExitCode)" = "85:0" ] || fail "job $job exit code $(job_field "$job" ExitCode), expected 85:0"
[ "$(job_field "$job" Restarts)" = 0 ] || fail "a stopped job was requeued"
"$ST" ckpt verify "$WORK/run/checkpoints" > "$WORK/verify2.log" 2>&1 ||
  { cat "$WORK/verify2.log"; fail "ckpt verify rejects the checkpoint of the graceful stop"; }
note "stopped job $job gracefully at step $(wc -l < "$WORK/run/metrics.jsonl")"

# --- 3. finish under srun ---
timeout 120 srun -N2 --ntasks-per-node=2 --mpi=pmix "$ST" train "$WORK/job.yaml" > "$WORK/final.log" 2>&1 ||
  { cat "$WORK/final.log"; fail "the final resume failed"; }
grep -q "resumed from" "$WORK/final.log" || { cat "$WORK/final.log"; fail "the final run did not resume"; }
losses "$WORK/ref" > "$WORK/ref.loss"
losses "$WORK/run" > "$WORK/run.loss"
diff "$WORK/ref.loss" "$WORK/run.loss" > "$WORK/loss.diff" ||
  { head -20 "$WORK/loss.diff"; fail "losses after cancel + stop + resume differ from the uninterrupted run"; }
note "OK: all $STEPS losses equal the uninterrupted run (final $(tail -1 "$WORK/run.loss" | cut -d' ' -f2))"
