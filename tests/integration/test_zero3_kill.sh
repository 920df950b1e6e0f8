#!/usr/bin/env bash
# test_zero3_kill.sh — kill -9 of one rank under ZeRO-3 (sharding.stage 3) loses nothing.
#   References: the uninterrupted 2-rank stage-3 run and the 1-rank ZeRO-0 run of the same job (global
#   batch 6): their losses agree within 1e-5 relative (stage 3 sums the gradients in another order).
#   1. 2 ranks, stage 3: one rank is killed with SIGKILL after the checkpoint at step 8 (the ranks are
#      frozen first, so the run cannot finish before the kill); auto-resume on 2 ranks gives every step's
#      loss and the final weights bit-identical to the uninterrupted stage-3 run.
#   2. The same kill, resumed on 3 ranks (micro_batch 2: the same global batch): every step's loss within
#      1e-5 relative of both references (the checkpoint holds logical tensors, not per-rank shards).
source "$(dirname "$0")/ckpt_lib.sh"
STEPS=100 # long enough that the run is still going when the checkpoint at step 8 appears
Z3=(sharding.stage=3 checkpoint.every_steps=4 checkpoint.keep_last=0)

job ref0 $STEPS 6 1 sharding.stage=0 checkpoint.every_steps=0
[ "$(train 1 ref0)" = 0 ] || fail "ZeRO-0 reference: $(cat $T/ref0.err)"
job ref3 $STEPS 3 1 "${Z3[@]}"
[ "$(train 2 ref3)" = 0 ] || fail "stage-3 reference: $(cat $T/ref3.err)"
losses $T/ref0 > $T/ref0.loss; losses $T/ref3 > $T/ref3.loss
[ "$(wc -l < $T/ref3.loss)" = $STEPS ] || fail "stage-3 reference has $(wc -l < $T/ref3.loss) steps"
close_losses $T/ref0.loss $T/ref3.loss 1e-5 || fail "stage 3 on 2 ranks vs ZeRO-0: losses differ by more than 1e-5"

# kill_one NAME: starts the 2-rank stage-3 run NAME, freezes it once step 8's checkpoint exists, and
# kill -9s its second rank (mpirun then ends the other one)
kill_one() {
  local name=$1
  job $name $STEPS 3 1 "${Z3[@]}"
  start 2 $name
  wait_until 120 test -f "$T/$name/checkpoints/step-00000008.h5" || fail "$name: no checkpoint at step 8: $(cat $T/$name.err)"
  local ranks; ranks=$(pgrep -P $MP | sort -n)
  kill -STOP $ranks
  [ ! -f "$T/$name/final/model.safetensors" ] || fail "$name: the run finished before the kill (too fast)"
  kill -9 $(echo "$ranks" | tail -1)
  kill -CONT $ranks 2>/dev/null || true
  set +e; wait $MP; local rc=$?; set -e
  [ $rc -ne 0 ] || fail "$name: mpirun exited 0 after a rank was killed"
  kill9_all $MP
  [ ! -f "$T/$name/final/model.safetensors" ] || fail "$name: final/ written after the kill"
}

# --- 1. same world size: bit-identical ---
kill_one k2
[ "$(train 2 k2)" = 0 ] || fail "resume on 2 ranks after kill -9: $(cat $T/k2.err)"
grep -q "resumed from step-" $T/k2.out || fail "k2: no resume line: $(cat $T/k2.out)"
losses $T/k2 > $T/k2.loss
cmp -s $T/ref3.loss $T/k2.loss || { diff $T/ref3.loss $T/k2.loss | head; fail "kill -9 resume on 2 ranks: losses differ"; }
cmp -s $T/ref3/final/model.safetensors $T/k2/final/model.safetensors || fail "kill -9 resume: final weights differ"
echo "ok: stage 3, kill -9 of rank 1 + auto-resume on 2 ranks ($(grep -o 'resumed from [^ ]*' $T/k2.out)) is bit-identical"

# --- 2. resumed on 3 ranks ---
kill_one k3
[ "$(train 3 k3 train.micro_batch=2)" = 0 ] || fail "resume on 3 ranks after kill -9: $(cat $T/k3.err)"
grep -q "saved by 2 ranks" $T/k3.out || fail "k3: resume line: $(cat $T/k3.out)"
losses $T/k3 > $T/k3.loss
close_losses $T/ref3.loss $T/k3.loss 1e-5 || fail "kill -9 resume on 3 ranks: losses differ from the uninterrupted run"
close_losses $T/ref0.loss $T/k3.loss 1e-5 || fail "kill -9 resume on 3 ranks: losses differ from ZeRO-0"
echo "ok: stage 3, kill -9 on 2 ranks, resumed on 3 ($(grep -o 'resumed from [^(]*' $T/k3.out | head -1)): losses within 1e-5"
