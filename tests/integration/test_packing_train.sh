#!/usr/bin/env bash
# test_packing_train.sh — train.packing: documents through `shardtune train` (tiny Llama, seq_len 32):
#   1. the start prints the packing efficiency line; losses are finite and differ from stream mode.
#   2. 1 rank (micro 2 x accum 2) vs 2 ranks (micro 2): the same global batch of 4 sequences, losses
#      within 1e-5 relative (only the reduction order differs).
#   3. resume mid-run (2 ranks, checkpoint at step 6) gives bit-identical losses and final weights.
#   4. refusals, one line each: an unknown packing value; documents with distill.teacher; a stream
#      checkpoint resumed under documents.
source "$(dirname "$0")/ckpt_lib.sh"
DOCS=(train.packing=documents train.seq_len=32 train.schedule=constant)

job s1 12 2 2 "${DOCS[@]}"
[ "$(train 1 s1)" = 0 ] || fail "documents, 1 rank: $(cat $T/s1.err)"
grep -q "packing: task count: .* sequences per epoch, efficiency .*% (tokens used / slots)" $T/s1.out \
  || fail "no efficiency line: $(cat $T/s1.out)"
echo "ok: $(grep -o 'packing: task.*' $T/s1.out)"
losses $T/s1 > $T/s1.loss
job st 12 2 2 train.seq_len=32 train.schedule=constant
[ "$(train 1 st)" = 0 ] || fail "stream: $(cat $T/st.err)"
losses $T/st > $T/st.loss
! cmp -s $T/s1.loss $T/st.loss || fail "documents mode trained exactly like stream mode"

job s2 12 2 1 "${DOCS[@]}"
[ "$(train 2 s2)" = 0 ] || fail "documents, 2 ranks: $(cat $T/s2.err)"
losses $T/s2 > $T/s2.loss
close_losses $T/s1.loss $T/s2.loss 1e-5 || fail "1 vs 2 ranks: losses differ by more than 1e-5"
echo "ok: 1 rank and 2 ranks agree over $(wc -l < $T/s2.loss) steps"

job r2 6 2 1 "${DOCS[@]}" checkpoint.every_steps=6
[ "$(train 2 r2)" = 0 ] || fail "resume part 1: $(cat $T/r2.err)"
[ "$(train 2 r2 train.steps=12)" = 0 ] || fail "resume part 2: $(cat $T/r2.err)"
grep -q "resumed from step-00000006.h5" $T/r2.out || fail "no resume line: $(cat $T/r2.out)"
losses $T/r2 > $T/r2.loss
cmp -s $T/s2.loss $T/r2.loss || { diff $T/s2.loss $T/r2.loss | head; fail "resume: losses differ"; }
cmp -s $T/s2/final/model.safetensors $T/r2/final/model.safetensors || fail "resume: final weights differ"
echo "ok: resume at step 6 is bit-identical"

job bad 2 2 1 train.packing=windows
[ "$(train 1 bad)" != 0 ] || fail "train.packing=windows was accepted"
grep -q "packing" $T/bad.err || fail "the error does not name train.packing: $(cat $T/bad.err)"
job kd 2 2 1 "${DOCS[@]}" distill.teacher=$T/model
[ "$(train 1 kd)" != 0 ] || fail "documents + distill.teacher was accepted"
grep -q "train.packing: documents cannot be combined with distill.teacher" $T/kd.err || fail "kd: $(cat $T/kd.err)"
job pt 2 2 1 "${DOCS[@]}" finetune.mode=prompt_tuning
[ "$(train 1 pt)" != 0 ] || fail "documents + prompt_tuning was accepted"
grep -q "train.packing: documents cannot be combined with finetune.mode prompt_tuning" $T/pt.err || fail "pt: $(cat $T/pt.err)"
job mix 4 2 1 train.seq_len=32 train.schedule=constant checkpoint.every_steps=4
[ "$(train 1 mix)" = 0 ] || fail "stream run for the mixed resume: $(cat $T/mix.err)"
[ "$(train 1 mix train.steps=8 train.packing=documents)" != 0 ] || fail "a stream checkpoint resumed under documents"
grep -q "saved with train.packing stream, the job has documents" $T/mix.err || fail "mixed resume: $(tail -3 $T/mix.err)"
echo "ok: refusals"
echo "PASS"
