#!/usr/bin/env bash
# test_first_hour.sh — what a new user meets first (issue 15, item 5).
#   1. two jobs at once on one host with the default monitor addresses: both run (free ports), each
#      writes RUN_DIR/monitor.addr; `monitor --run-dir` and `ctl ... --run-dir` find the job without ADDR.
#   2. a clean stop under mpirun (`ctl stop`, SIGUSR1 to mpirun): mpirun exits 85 (with -q no "aborted"
#      box); Ctrl-C (SIGINT to mpirun) saves the checkpoint and says that mpirun will exit 1.
#   3. the start prints the tasks' mixing probabilities, the console shows per-task loss.
source "$(dirname "$0")/ckpt_lib.sh"
MON=('monitor.publish=tcp://127.0.0.1:*' 'monitor.control=tcp://127.0.0.1:*' 'monitor.heartbeat_ms=100')
job a 100000 2 1 checkpoint.every_steps=0 "${MON[@]}" 'tasks=[{name: x, path: '$T/train.h5', weight: 1}, {name: y, path: '$T/train.h5', weight: 3}]' mixing.strategy=weights train.log_every=50
job b 100000 2 1 checkpoint.every_steps=0 "${MON[@]}"
start 2 a; A=$MP
start 1 b; B=$MP
wait_until 60 test -s $T/a/monitor.addr || fail "a: no monitor.addr: $(cat $T/a.err)"
wait_until 60 test -s $T/b/monitor.addr || fail "b: no monitor.addr: $(cat $T/b.err)"
cat $T/a/monitor.addr
wait_until 60 bash -c "[ \$(wc -l < $T/a/metrics.jsonl 2>/dev/null || echo 0) -ge 60 ]" || fail "a: too slow"
grep -q "^publish tcp://127.0.0.1:[0-9]*$" $T/a/monitor.addr || fail "monitor.addr format"
[ "$(cat $T/a/monitor.addr)" != "$(cat $T/b/monitor.addr)" ] || fail "two jobs bound the same ports"
out=$(timeout 30 "$BIN" monitor --run-dir $T/a --json --count 3 --timeout 20) || fail "monitor --run-dir: $out"
echo "$out" | grep -q '"topic"' || fail "monitor --run-dir printed nothing useful: $out"
echo "ok: two jobs on free ports; monitor --run-dir got $(echo "$out" | wc -l) messages"

# 2. clean stops: ctl stop (exit 85) and Ctrl-C (note)
"$BIN" ctl status --run-dir $T/a >/dev/null || fail "ctl status --run-dir"
"$BIN" ctl status --token-file $T/a/control.token >/dev/null || fail "ctl status --token-file (monitor.addr next to it)"
set +e; out=$("$BIN" ctl stop 2>&1); rc=$?; set -e
[ $rc = 2 ] || fail "ctl stop without ADDR or run dir: exit $rc (expected 2, a bad command line)"
echo "$out" | grep -q "missing ADDR: pass the job's monitor.control address, --run-dir DIR or --token-file F" || fail "ctl: $out"
"$BIN" ctl stop --run-dir $T/a >/dev/null || fail "ctl stop --run-dir"
set +e; wait $A; rc=$?; set -e
[ $rc = 85 ] || fail "a: mpirun exit $rc after ctl stop, expected 85"
grep -q "stopped at step [0-9]* (ctl stop): checkpointed" $T/a.out || fail "no stop line"
kill -INT $B; set +e; wait $B; rc=$?; set -e
grep -q "stopped at step [0-9]* (signal): checkpointed" $T/b.out || fail "b: Ctrl-C did not stop cleanly: $(tail -3 $T/b.err)"
grep -q "note: under mpirun, Ctrl-C / SIGTERM makes mpirun itself exit 1" $T/b.out || fail "b: no note on mpirun's exit $rc"
"$BIN" ckpt verify $T/b/checkpoints >/dev/null || fail "b: checkpoint"
echo "ok: ctl stop -> 85; Ctrl-C -> checkpoint and a note (mpirun exit $rc)"
job c 100000 2 1 checkpoint.every_steps=0 "${MON[@]}"
set +e
mpirun -q --oversubscribe -np 2 "$BIN" train $T/c.yaml $(cat $T/c.args) > $T/c.out 2> $T/c.err & C=$!; RUNPIDS+=($C)
wait_until 60 test -s $T/c/monitor.addr || fail "c: no monitor.addr"
sleep 1; kill -USR1 $C; wait $C; rc=$?
set -e
[ $rc = 85 ] || fail "c: SIGUSR1 to mpirun: exit $rc, expected 85: $(cat $T/c.err)"
! grep -q "aborted\|non-zero status" $T/c.err || fail "c: Open MPI box despite -q: $(cat $T/c.err)"
echo "ok: SIGUSR1 to mpirun -q -> 85, no Open MPI box"

# 3. the first lines
grep -q "^tasks (mixing weights): x p=0.2500, y p=0.7500$" $T/a.out || fail "no mixing line: $(head -8 $T/a.out)"
grep -q "^step .* | x [0-9.]* | y [0-9.]*" $T/a.out || fail "no per-task loss on the console: $(grep '^step' $T/a.out | head -2)"
echo "ok: mixing probabilities and per-task loss printed"
