#!/usr/bin/env bash
# test_slurm_resize.sh — (c) a job requeued onto fewer tasks resumes: a 2-node x 2-task sbatch job is
# signalled, checkpoints and requeues; while it waits, the job is shrunk to 1 node x 2 tasks
# (scontrol update NumNodes=1 NumTasks=2) and train.micro_batch is doubled in JOB.yaml so the global batch
# stays 8 sequences. The rerun resumes on 2 ranks from the 4-rank checkpoint and ends with the losses of
# an uninterrupted 4-rank run: identical before the stop, equal to float tolerance after it (the gradient
# sums of 2 and 4 ranks add in a different order).
source "$(dirname "$0")/slurm_helpers.sh"
slurm_setup 17130
make_tiny_job
STEPS=50
write_job "$WORK/job.yaml" "$WORK/run" $STEPS 2

timeout 120 srun -N2 --ntasks-per-node=2 --mpi=pmix "$ST" train "$WORK/job.yaml" run_dir="$WORK/ref" \
  > "$WORK/ref.log" 2>&1 || { cat "$WORK/ref.log"; fail "reference run failed"; }

cd "$WORK"
job=$(SHARDTUNE_BIN=$ST SHARDTUNE_LAUNCH=$SRC/slurm/shardtune-launch \
      timeout 30 sbatch --parsable -N2 --ntasks-per-node=2 -o "$WORK/job.out" "$SRC/slurm/shardtune.sbatch" \
      "$WORK/job.yaml") || fail "sbatch failed"
note "submitted job $job"
wait_job "$job" 30 RUNNING
wait_lines "$WORK/run/metrics.jsonl" 10 60
timeout 30 scancel --signal=USR1 --batch "$job" || fail "scancel --signal=USR1 --batch failed"
for _ in $(seq 150); do
  [ "$(job_field "$job" Restarts)" = 1 ] && [ "$(job_field "$job" JobState)" = PENDING ] && break
  sleep 0.2
done
[ "$(job_field "$job" JobState)" = PENDING ] || { cat "$WORK/job.out"; fail "job $job was not requeued"; }
stopped_at=$(wc -l < "$WORK/run/metrics.jsonl")
[ "$stopped_at" -lt $STEPS ] || fail "the job finished before the signal reached it (raise STEPS)"

# shrink: half the ranks, twice the micro-batch (the job file is read again on every restart)
write_job "$WORK/job.yaml" "$WORK/run" $STEPS 4
timeout 30 scontrol update JobId="$job" NumNodes=1 NumTasks=2 || fail "scontrol update NumNodes=1 NumTasks=2 failed"
release_requeued "$job"
note "requeued after $stopped_at steps, shrunk to 1 x 2 and released"
expect_completed "$job"
grep -q "resumed from" "$WORK/job.out" || { cat "$WORK/job.out"; fail "the shrunk run did not resume"; }
grep -q "2 rank(s)" "$WORK/job.out" || { cat "$WORK/job.out"; fail "the rerun did not run on 2 ranks"; }

losses "$WORK/ref" > "$WORK/ref.loss"
losses "$WORK/run" > "$WORK/run.loss"
"$PY" - "$WORK/ref.loss" "$WORK/run.loss" "$stopped_at" <<'EOF' || fail "losses after the shrink do not match the 4-rank run"
import sys
ref = dict(l.split() for l in open(sys.argv[1]))
run = dict(l.split() for l in open(sys.argv[2]))
stopped = int(sys.argv[3])
assert sorted(ref, key=int) == sorted(run, key=int), f"steps differ: {len(ref)} vs {len(run)}"
worst = 0.0
for s in sorted(ref, key=int):
    a, b = float(ref[s]), float(run[s])
    if int(s) <= stopped - 1:   # before the stop: the same 4 ranks, bit-identical
        assert ref[s] == run[s], f"step {s}: {ref[s]} != {run[s]} before the stop"
    rel = abs(a - b) / abs(a)
    worst = max(worst, rel)
    assert rel < 1e-4, f"step {s}: {a} vs {b} (relative {rel:.2e})"
print(f"max relative loss difference after the shrink: {worst:.2e}")
EOF
note "OK: 4 ranks -> 2 ranks after $stopped_at of $STEPS steps; final $(tail -1 "$WORK/run.loss" | cut -d' ' -f2)" \
     "vs reference $(tail -1 "$WORK/ref.loss" | cut -d' ' -f2)"
