#!/usr/bin/env bash
# test_watchdog.sh — a hung peer does not hang the job (issue 15, item 6).
# Rank 1 of a 2-rank job is stopped with SIGSTOP mid-run; with train.collective_timeout_s=3 rank 0 names
# the phase and the rank that never arrived, the job aborts with exit 86 within seconds (not >= 180 s),
# the last checkpoint verifies and the job resumes from it. Then kill -9 of rank 1 under
# `mpirun --enable-recovery` (a launcher that does not tear the job down): the job still ends in seconds
# with the same line (mpirun itself exits 0 in that mode, whatever the ranks return).
source "$(dirname "$0")/ckpt_lib.sh"
job w 100000 2 1 checkpoint.every_steps=10 train.collective_timeout_s=3 train.log_every=1000 \
  'monitor.publish=tcp://127.0.0.1:*' 'monitor.control=tcp://127.0.0.1:*' monitor.heartbeat_ms=100
start 2 w
wait_until 60 bash -c "[ \$(wc -l < $T/w/metrics.jsonl 2>/dev/null || echo 0) -ge 25 ]" || fail "job too slow: $(cat $T/w.err)"
victim=""
for p in $(pgrep -P $MP); do
  grep -qz '^OMPI_COMM_WORLD_RANK=1$' /proc/$p/environ && victim=$p
done
[ -n "$victim" ] || fail "rank 1 not found"
t0=$SECONDS
kill -STOP $victim
set +e; timeout 60 tail --pid=$MP -f /dev/null; wait $MP; rc=$?; set -e
took=$((SECONDS - t0))
kill -9 $victim 2>/dev/null || true
[ $rc = 86 ] || fail "exit $rc after a stopped rank, expected 86 (took ${took}s): $(tail -5 $T/w.err)"
[ $took -le 30 ] || fail "took ${took}s"
grep "collective timeout" $T/w.err | head -2
grep -q "error: rank 0: collective timeout: [a-z]* of step [0-9]* not complete after [0-9]* s (train.collective_timeout_s 3); rank that never arrived: 1 (host" $T/w.err ||
  fail "no clear line from rank 0: $(cat $T/w.err)"
"$BIN" ckpt verify $T/w/checkpoints >/dev/null || fail "last checkpoint damaged"
at=$(cat $T/w/checkpoints/latest | sed 's/step-0*\([0-9]*\).h5/\1/')
[ "$(train 2 w train.steps=$((at + 3)))" = 0 ] || fail "resume after the abort: $(tail -3 $T/w.err)"
grep -q "resumed from step-0*$at.h5" $T/w.out || fail "did not resume from $at"
echo "ok: stopped rank -> exit 86 in ${took}s naming rank 1; resumed from step $at"

job k 100000 2 1 checkpoint.every_steps=10 train.collective_timeout_s=3 train.log_every=1000 \
  'monitor.publish=tcp://127.0.0.1:*' 'monitor.control=tcp://127.0.0.1:*' monitor.heartbeat_ms=100
mpirun --enable-recovery --oversubscribe -np 2 "$BIN" train "$T/k.yaml" $(cat $T/k.args) > $T/k.out 2> $T/k.err & MP=$!
RUNPIDS+=($MP)
wait_until 60 bash -c "[ \$(wc -l < $T/k/metrics.jsonl 2>/dev/null || echo 0) -ge 25 ]" || fail "k: too slow: $(cat $T/k.err)"
for p in $(pgrep -P $MP); do grep -qz '^OMPI_COMM_WORLD_RANK=1$' /proc/$p/environ && kill -9 $p; done
t0=$SECONDS
set +e; timeout 60 tail --pid=$MP -f /dev/null; wait $MP; set -e
took=$((SECONDS - t0))
[ $took -le 30 ] || fail "k: the job hung ${took}s after kill -9 of rank 1"
grep -q "error: rank 0: collective timeout: .*rank that never arrived: 1 (host" $T/k.err || fail "k: no line: $(cat $T/k.err)"
"$BIN" ckpt verify $T/k/checkpoints >/dev/null || fail "k: last checkpoint damaged"
echo "ok: kill -9 of rank 1 under mpirun --enable-recovery -> ended in ${took}s naming rank 1"
