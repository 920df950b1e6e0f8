#!/usr/bin/env bash
# test_faults.sh — crashes and a full disk never lose the last good checkpoint.
#   1. disk full (ulimit -f with SIGXFSZ ignored, so writes fail with EFBIG): saves fail with one clear
#      warning line, training goes on with unchanged losses, `latest` and the previous checkpoint stay
#      valid, no *.partial is left behind; the job still fails (exit 1) because its last checkpoint failed;
#      checkpoint.max_failures saves failing in a row stop it; a failed final/ leaves no final.partial/.
#   2. 10 seeded trials of kill -9 of one rank or of all ranks at random moments (checkpoints every
#      step, so many land inside a write): auto-resume always succeeds from the newest complete
#      checkpoint and ends with the uninterrupted run's losses and final weights, bit for bit.
source "$(dirname "$0")/ckpt_lib.sh"
STEPS=60  # long enough that a kill after <= 1 s always lands mid-run, also on a quiet machine
job ref $STEPS 2 1 checkpoint.every_steps=1 checkpoint.keep_last=2
[ "$(train 2 ref)" = 0 ] || fail "reference: $(cat $T/ref.err)"
losses $T/ref > $T/ref.loss

# --- 1. disk full ---
job full 8 2 1 checkpoint.every_steps=2 train.schedule=constant
[ "$(train 2 full train.steps=4)" = 0 ] || fail "first part: $(cat $T/full.err)"
set +e
# the limit applies to the ranks only (mpirun's PMIx segments are larger); TCP instead of shared memory
# for the same reason
OMPI_MCA_btl=self,tcp mpirun --oversubscribe -np 2 bash -c 'trap "" XFSZ; ulimit -f 1000; exec "$0" "$@"' \
  "$BIN" train "$T/full.yaml" $(cat $T/full.args) >>"$T/full.out" 2>>"$T/full.err"
rc=$?
set -e
[ $rc -eq 1 ] || fail "disk full: training should continue to the end and then fail, exit $rc: $(cat $T/full.err)"
grep -q "warning: checkpoint at step 6 failed (periodic): .*step-00000006.h5.partial.* (1 in a row; the job stops at 3" $T/full.err ||
  fail "no clear failure line: $(cat $T/full.err)"
grep -q "error: the checkpoint at the end (step 8) failed; final/ is written" $T/full.err || fail "no end failure line: $(cat $T/full.err)"
grep "warning: checkpoint at step 6" $T/full.err | head -1
[ "$(cat $T/full/checkpoints/latest)" = step-00000004.h5 ] || fail "latest moved: $(cat $T/full/checkpoints/latest)"
"$BIN" ckpt verify $T/full/checkpoints >/dev/null || fail "previous checkpoint damaged"
! ls $T/full/checkpoints | grep -q partial || fail "partial file left: $(ls $T/full/checkpoints)"
job ref8 8 2 1 checkpoint.every_steps=2 train.schedule=constant; [ "$(train 2 ref8)" = 0 ] || fail "ref8"
losses $T/ref8 > $T/ref8.loss; losses $T/full > $T/full.loss
cmp -s $T/ref8.loss $T/full.loss || fail "losses changed by failed saves"
echo "ok: disk full: saves failed cleanly, training state and step-4 checkpoint intact, exit 1"

# checkpoint.max_failures in a row stop the job; a final/ that cannot be written leaves nothing behind
full_run() { # full_run NAME KB [overrides...]
  local name=$1 kb=$2; shift 2
  set +e
  OMPI_MCA_btl=self,tcp mpirun --oversubscribe -np 2 bash -c "trap '' XFSZ; ulimit -f $kb; exec \"\$0\" \"\$@\"" \
    "$BIN" train "$T/$name.yaml" $(cat $T/$name.args) "$@" >>"$T/$name.out" 2>>"$T/$name.err"
  echo $?
  set -e
}
job stop 8 2 1 checkpoint.every_steps=1 train.schedule=constant checkpoint.max_failures=2
[ "$(train 2 stop train.steps=4)" = 0 ] || fail "stop: first part"
rc=$(full_run stop 1000)
[ "$rc" = 1 ] || fail "max_failures: exit $rc: $(cat $T/stop.err)"
grep -q "error: 2 checkpoint saves in a row failed (checkpoint.max_failures 2); stopping" $T/stop.err || fail "no stop line: $(cat $T/stop.err)"
[ "$(losses $T/stop | tail -1 | cut -d' ' -f1)" = 6 ] || fail "did not stop at step 6: $(losses $T/stop | tail -1)"
[ "$(cat $T/stop/checkpoints/latest)" = step-00000004.h5 ] || fail "latest moved"
job fin 2 2 1 checkpoint.every_steps=0
rc=$(full_run fin 200)
[ "$rc" = 1 ] || fail "final: exit $rc"
grep -q "writing final weights" $T/fin.err || fail "no final error line: $(cat $T/fin.err)"
[ ! -e $T/fin/final.partial ] || fail "final.partial/ left behind"
echo "ok: max_failures stops the job at step 6; a failed final/ leaves no final.partial/"

# --- 2. kill -9 trials ---
RANDOM=20240607
for trial in $(seq 1 ${ST_FAULT_TRIALS:-10}); do
  name=kill$trial
  job $name $STEPS 2 1 checkpoint.every_steps=1 checkpoint.keep_last=2
  start 2 $name
  wait_until 60 test -s "$T/$name/metrics.jsonl" || fail "$name never started"
  sleep "0.$(( RANDOM % 9 ))$(( RANDOM % 10 ))"
  if (( trial % 2 )); then
    victims=$(pgrep -P $MP | shuf -n 1 --random-source=<(yes $trial) || true); what="one rank"
  else
    victims=$(pgrep -P $MP || true); what="all ranks"
  fi
  [ -n "$victims" ] || fail "$name: the job ended before the kill (no rank to kill)"
  for v in $victims; do kill -9 $v 2>/dev/null || true; done
  [ "$what" = "all ranks" ] && kill -9 $MP 2>/dev/null
  set +e; timeout 60 tail --pid=$MP -f /dev/null; set -e
  kill9_all $MP
  at=$(cat $T/$name/checkpoints/latest 2>/dev/null || echo none)
  [ "$(train 2 $name)" = 0 ] || fail "$name: resume failed: $(tail -3 $T/$name.err)"
  losses $T/$name > $T/$name.loss
  cmp -s $T/ref.loss $T/$name.loss || fail "$name: losses differ from the uninterrupted run"
  cmp -s $T/ref/final/model.safetensors $T/$name/final/model.safetensors || fail "$name: final weights differ"
  ! ls $T/$name/checkpoints | grep -q partial || fail "$name: partial file left behind"
  echo "ok: trial $trial: kill -9 of $what, latest was $at: $(grep -o 'resumed from [^ ]* at step [0-9]*' $T/$name.out || echo 'fresh start'), same result"
done
echo PASS
