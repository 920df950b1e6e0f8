#!/usr/bin/env bash
# test_ckpt_resume.sh — resume is exact at the same world size and continuous at another one.
#   1. 2 ranks, stopped by SIGUSR1 (checkpoint.signal) mid-run: exit 85, then resume: every step's loss
#      and the final weights are bit-identical to an uninterrupted run.
#   2. 2 ranks, kill -9 after a checkpoint: auto-resume from it, again bit-identical.
#   3. 4 -> 2 ranks and 2 -> 3 ranks (same global batch): losses within 1e-5 relative of the
#      uninterrupted run, and the final loader state / tokens_seen equal (no sample skipped or repeated).
#   4. resume: none starts fresh and says so; resume: PATH with a mismatched model names the tensor.
source "$(dirname "$0")/ckpt_lib.sh"
STEPS=40

# --- uninterrupted references ---
job base2 $STEPS 2 2;  [ "$(train 2 base2)" = 0 ] || fail "baseline 2 ranks: $(cat $T/base2.err)"
losses $T/base2 > $T/base2.loss
[ "$(wc -l < $T/base2.loss)" = $STEPS ] || fail "baseline has $(wc -l < $T/base2.loss) steps"

# --- 1. signal stop + resume, same world size ---
# a longer run of its own (SIG_STEPS), so that even an idle machine cannot finish it between the check
# below and the signal; compared with an uninterrupted run of the same length
SIG_STEPS=400
job basesig $SIG_STEPS 2 2 checkpoint.every_steps=0;  [ "$(train 2 basesig)" = 0 ] || fail "baseline $SIG_STEPS steps: $(cat $T/basesig.err)"
losses $T/basesig > $T/basesig.loss
job sig $SIG_STEPS 2 2 checkpoint.every_steps=0 checkpoint.signal=USR1
start 2 sig
wait_until 60 test -s "$T/sig/metrics.jsonl" || fail "signal run never started a step: $(cat $T/sig.err)"
while [ "$(wc -l < $T/sig/metrics.jsonl)" -lt 5 ]; do sleep 0.02; done
# freeze the ranks first, so a fast machine cannot finish the run between the check above and the signal;
# the signal stays pending and is taken at the next step boundary once they continue
ranks=$(pgrep -P $MP)
kill -STOP $ranks
[ "$(wc -l < $T/sig/metrics.jsonl)" -lt $SIG_STEPS ] || fail "signal run finished before the signal could be sent"
kill -USR1 $ranks
kill -CONT $ranks
set +e; wait $MP; rc=$?; set -e
[ $rc -eq 85 ] || fail "signal stop: exit $rc (want 85): $(cat $T/sig.err)"
grep -q "stopped at step" "$T/sig.out" || fail "no stop line: $(cat $T/sig.out)"
stopped=$(ls $T/sig/checkpoints | grep -c 'step-.*\.h5$')
[ "$stopped" -eq 1 ] || fail "expected one checkpoint after the stop, found $stopped"
[ "$(train 2 sig)" = 0 ] || fail "resume after signal: $(cat $T/sig.err)"
grep -q "resumed from step-" "$T/sig.out" || fail "no 'resumed from' line"
grep -q "continuity: first loss after resume" "$T/sig.out" || fail "no continuity line"
losses $T/sig > $T/sig.loss
cmp -s $T/basesig.loss $T/sig.loss || { diff $T/basesig.loss $T/sig.loss | head; fail "signal resume: losses differ"; }
cmp -s $T/basesig/final/model.safetensors $T/sig/final/model.safetensors || fail "signal resume: final weights differ"
echo "ok: signal stop at step $(sed -n 's/.*stopped at step \([0-9]*\).*/\1/p' $T/sig.out) + resume is bit-identical"

# --- 2. kill -9 after a checkpoint ---
job k9 $SIG_STEPS 2 2 # long enough that it cannot finish between the checkpoint check and the kill
start 2 k9
wait_until 60 test -f "$T/k9/checkpoints/step-00000008.h5" || fail "no checkpoint at step 8"
kill9_all $MP
[ ! -f "$T/k9/final/model.safetensors" ] || fail "the run finished before kill -9 (too fast)"
[ "$(train 2 k9)" = 0 ] || fail "resume after kill -9: $(cat $T/k9.err)"
losses $T/k9 > $T/k9.loss
cmp -s $T/basesig.loss $T/k9.loss || { diff $T/basesig.loss $T/k9.loss | head; fail "kill -9 resume: losses differ"; }
cmp -s $T/basesig/final/model.safetensors $T/k9/final/model.safetensors || fail "kill -9 resume: final weights differ"
echo "ok: kill -9 + auto-resume ($(grep -o 'resumed from [^ ]*' $T/k9.out)) is bit-identical"

# --- 3. other world sizes: 4 -> 2 (global batch 8) and 2 -> 3 (global batch 6) ---
# (constant schedule: the first part runs 8 of 16 steps, and a cosine schedule would depend on train.steps)
check_ws() { # from to micro_from micro_to
  local a=$1 b=$2 ma=$3 mb=$4 name=ws$1to$2
  job ref$name 16 $ma 1 checkpoint.every_steps=8 train.schedule=constant
  [ "$(train $a ref$name)" = 0 ] || fail "reference $a ranks: $(cat $T/ref$name.err)"
  job $name 8 $ma 1 checkpoint.every_steps=8 train.schedule=constant
  [ "$(train $a $name)" = 0 ] || fail "$name first part: $(cat $T/$name.err)"
  [ "$(train $b $name train.steps=16 train.micro_batch=$mb)" = 0 ] || fail "$name resume on $b ranks: $(cat $T/$name.err)"
  grep -q "resumed from step-00000008.h5 at step 8 (saved by $a ranks)" $T/$name.out || fail "$name: resume line: $(cat $T/$name.out)"
  losses $T/ref$name > $T/ref$name.loss; losses $T/$name > $T/$name.loss
  close_losses $T/ref$name.loss $T/$name.loss 1e-5 || fail "$name: losses differ by more than 1e-5"
  local p1 p2
  p1=$(ckpt_position $T/ref$name/checkpoints/step-00000016.h5); p2=$(ckpt_position $T/$name/checkpoints/step-00000016.h5)
  [ "$p1" = "$p2" ] || fail "$name: sample accounting differs: $p1 vs $p2"
  echo "ok: $a -> $b ranks: losses within 1e-5, same position (step tokens loader) $p2"
}
check_ws 4 2 2 4
check_ws 2 3 3 2

# --- 4. resume: none, and a mismatched model ---
[ "$(train 2 k9 resume=none train.steps=1 run_dir=$T/fresh)" = 0 ] || fail "resume none: $(cat $T/k9.err)"
grep -q "resume: none -> starting from step 0" $T/k9.out || fail "resume none not announced"
"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --ffn 128 --vocab 128 --max-seq 64 \
  --out "$T/model2" >/dev/null
rc=$(train 1 k9 model.path=$T/model2 resume=$T/k9/checkpoints run_dir=$T/other)
[ "$rc" = 1 ] || fail "mismatched model: exit $rc"
grep -q "tensor model/model.layers.0.mlp.gate_proj.weight has shape \[192, 64\], the model expects \[128, 64\]" $T/k9.err ||
  fail "mismatched model message: $(tail -2 $T/k9.err)"
echo "ok: resume none announced; mismatched model refused naming the tensor"
echo PASS
