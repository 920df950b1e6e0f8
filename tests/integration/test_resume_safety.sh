#!/usr/bin/env bash
# test_resume_safety.sh — a checkpoint that exists but cannot continue this job stops it (issue 15, item 2).
# Changed seed / seq_len / split, a checkpoint beyond train.steps, a checkpoint of a model with more
# layers, and one of another base model with the same shapes: each run exits 1 with one line naming what
# differs (old and new values) and how to proceed; the checkpoint and metrics.jsonl are left untouched and
# nothing starts over at step 0.
source "$(dirname "$0")/ckpt_lib.sh"

job r 10 2 1 checkpoint.every_steps=5
[ "$(train 1 r train.steps=5)" = 0 ] || fail "first part: $(cat $T/r.err)"
grep -q "resume: auto -> no checkpoint" $T/r.out || fail "no start line: $(cat $T/r.out)"
sum() { md5sum $T/r/checkpoints/step-00000005.h5 $T/r/metrics.jsonl | cut -c1-32 | tr -d '\n'; }
before=$(sum)

refused() { # refused WHAT PATTERN override...: the run must exit 1 with PATTERN and touch nothing
  local what=$1 pat=$2; shift 2
  : > $T/r.err; : > $T/r.out
  local rc; rc=$(train 1 r "$@")
  [ "$rc" = 1 ] || fail "$what: exit $rc, expected 1: $(tail -3 $T/r.err)"
  grep -q -- "$pat" $T/r.err || fail "$what: message does not match '$pat': $(cat $T/r.err)"
  grep -q "resume: none" $T/r.err || fail "$what: message does not say how to proceed: $(cat $T/r.err)"
  ! grep -q "falling back\|starting from step 0" $T/r.err $T/r.out || fail "$what: started over"
  [ "$(sum)" = "$before" ] || fail "$what: checkpoint or metrics changed"
  echo "ok: $what: $(grep -o 'error: .*' $T/r.err | cut -c1-150)"
}
refused "seed" "belongs to another run: seed 7 -> 8" seed=8
refused "seq_len" "train.seq_len 16 -> 32" train.seq_len=32
refused "split" "split \[0.8, 0.1, 0.1\] -> \[0.5," split=[0.5,0.25,0.25]
grep -q "resume: auto -> 1 checkpoint(s) in .*trying step-00000005.h5" $T/r.out || fail "no 'found' line"
refused "steps" "is at step 5, beyond train.steps 3" train.steps=3

# a checkpoint of a 3-layer model resumed with the 2-layer one; another base with equal shapes
"$BIN" init-model --family llama --layers 3 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/model3" >/dev/null
"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 4 \
  --out "$T/other" >/dev/null
job m 4 2 1 model.path=$T/model3 checkpoint.every_steps=2
[ "$(train 1 m train.steps=2)" = 0 ] || fail "3-layer part: $(cat $T/m.err)"
rc=$(train 1 m model.path=$T/model)
[ "$rc" = 1 ] || fail "more layers: exit $rc"
grep -q "is of another model: config.json num_hidden_layers is 3 there, 2 in" $T/m.err || fail "more layers: $(cat $T/m.err)"
echo "ok: more layers refused"
: > $T/r.err
refused "another base" "trained from another base model" model.path=$T/other
# the same job still resumes
[ "$(train 1 r)" = 0 ] || fail "plain resume: $(cat $T/r.err)"
grep -q "resumed from step-00000005.h5 at step 5" $T/r.out || fail "did not resume"
grep -q '"step":6,.*"resumed":true' $T/r/metrics.jsonl || fail "the first row after the resume is not marked (plot)"
echo "ok: unchanged job resumes"
