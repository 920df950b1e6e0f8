#!/usr/bin/env bash
# test_slurm_requeue.sh — (b) the whole preemption dance through slurm/shardtune.sbatch on a real (local)
# Slurm cluster: a 2-node x 2-task job gets USR1 in its batch shell mid-run (what
# `#SBATCH --signal=B:USR1@120` does before the time limit); the wrapper forwards it, the ranks checkpoint
# at the next step boundary and exit 85, the wrapper requeues, the rerun (SLURM_RESTART_COUNT=1) resumes
# from `latest` and finishes with exactly the losses of an uninterrupted run.
source "$(dirname "$0")/slurm_helpers.sh"
slurm_setup 17120
make_tiny_job
STEPS=60
write_job "$WORK/job.yaml" "$WORK/run" $STEPS 2 "checkpoint: { every_steps: 0, keep_last: 2 }"

# the reference: the same job, uninterrupted, same 2 x 2 layout
timeout 120 srun -N2 --ntasks-per-node=2 --mpi=pmix "$ST" train "$WORK/job.yaml" run_dir="$WORK/ref" \
  > "$WORK/ref.log" 2>&1 || { cat "$WORK/ref.log"; fail "reference run failed"; }

cd "$WORK"
job=$(SHARDTUNE_BIN=$ST SHARDTUNE_LAUNCH=$SRC/slurm/shardtune-launch \
      timeout 30 sbatch --parsable -N2 --ntasks-per-node=2 -o "$WORK/job.out" "$SRC/slurm/shardtune.sbatch" \
      "$WORK/job.yaml") || fail "sbatch failed"
note "submitted job $job"
note "submitted"; wait_job "$job" 30 RUNNING; note running
wait_lines "$WORK/run/metrics.jsonl" 10 60
timeout 30 scancel --signal=USR1 --batch "$job" || fail "scancel --signal=USR1 --batch failed"

# checkpoint, exit 85, requeue: the job is pending again (BeginTime) with one restart
for _ in $(seq 150); do
  [ "$(job_field "$job" Restarts)" = 1 ] && [ "$(job_field "$job" JobState)" = PENDING ] && break
  sleep 0.2
done
[ "$(job_field "$job" Restarts)" = 1 ] || { cat "$WORK/job.out"; fail "job $job was not requeued"; }
grep -q "requeueing job $job" "$WORK/job.out" || { cat "$WORK/job.out"; fail "the wrapper did not requeue"; }
ls "$WORK/run/checkpoints/"step-*.h5 > /dev/null 2>&1 || fail "no checkpoint written before the requeue"
stopped_at=$(wc -l < "$WORK/run/metrics.jsonl")
[ "$stopped_at" -lt $STEPS ] || fail "the job finished before the signal reached it (raise STEPS)"
release_requeued "$job"
note "requeued after $stopped_at steps, released"

expect_completed "$job"
grep -q "job $job restart 1 " "$WORK/job.out" || { cat "$WORK/job.out"; fail "no restart 1 in the job log"; }
grep -q "resumed from" "$WORK/job.out" || { cat "$WORK/job.out"; fail "the requeued run did not resume"; }
[ -f "$WORK/run/final/model.safetensors" ] || fail "no final weights"

note "completed"
losses "$WORK/ref" > "$WORK/ref.loss"
losses "$WORK/run" > "$WORK/run.loss"
diff "$WORK/ref.loss" "$WORK/run.loss" > "$WORK/loss.diff" ||
  { head -20 "$WORK/loss.diff"; fail "losses after requeue + resume differ from the uninterrupted run"; }
note "OK: stopped after $stopped_at of $STEPS steps, requeued, resumed; all $STEPS losses equal the reference" \
     "(final $(tail -1 "$WORK/run.loss" | cut -d' ' -f2))"
