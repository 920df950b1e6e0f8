#!/usr/bin/env bash
# test_device_failure.sh — the trainer's device paths without a GPU (tests/tools/fakedev.c):
#  1. a progressive stage change on a backend whose memory is "device" memory (host_memory 0, every copy
#     checked against the tagged allocations): no host buffer may reach a device copy, and the run matches
#     the same job on the CPU backend loss for loss (the re-sharded AdamW moments really carried over);
#  2. a kernel failure injected on one rank of two (cross_entropy, 3rd call = step 3) stops training on
#     every rank at that step's boundary: one line naming the kernel and the rank, exit 1, and the last
#     checkpoint (step 2) intact: a resume from it on the CPU backend finishes like an unbroken run.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
FAKE=${ST_BUILD_DIR:?}/fakedev
# same_losses A B: metrics.jsonl files with the same steps 1..6 and bit-identical losses
same_losses() {
  python3 - "$1" "$2" <<'PY'
import json, sys
def losses(p):
    return {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if '"loss"' in l and '"step"' in l}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert set(a) == set(b) == set(range(1, 7)), (sorted(a), sorted(b))
for s in b:
    assert a[s] == b[s], (s, a[s], b[s])
PY
}
[ -x "$FAKE" ] || fail "no $FAKE (tests/tools/fakedev.c not built)"

# --- 1. stage change with device-style allocations ---
prog=(sharding.stage=0 finetune.mode=progressive finetune.unfreeze_every=2 train.schedule=constant checkpoint.every_steps=0)
job prog 6 2 1 "${prog[@]}"
job progref 6 2 1 "${prog[@]}"
set +e
"$FAKE" --guard "$T/prog.yaml" "${prog[@]}" >"$T/prog.out" 2>"$T/prog.err"; rc=$?
set -e
[ $rc = 0 ] || fail "guarded stage-change run exited $rc: $(cat "$T/prog.err")"
! grep -q "fakedev" "$T/prog.err" || fail "a host/device mix-up: $(cat "$T/prog.err")"
grep -q '"stage":2' "$T/prog/metrics.jsonl" || fail "no stage change happened: $(cat "$T/prog/metrics.jsonl")"
[ "$(train 1 progref)" = 0 ] || fail "cpu reference: $(cat "$T/progref.err")"
same_losses "$T/prog/metrics.jsonl" "$T/progref/metrics.jsonl" || fail "fakedev and cpu losses differ"
echo "stage change on device-style memory: losses equal the cpu run over 6 steps"
# the guard itself can fail: a host buffer handed to a device-to-device copy must be reported
set +e
"$FAKE" --guard-self-test >"$T/gst.out" 2>&1; rc=$?
set -e
[ $rc = 0 ] || fail "guard self-test: $(cat "$T/gst.out")"
grep -q "copy (device to device): the destination is host memory" "$T/gst.out" || fail "guard self-test: $(cat "$T/gst.out")"

# --- 2. an injected kernel failure on rank 1 ---
job boom 6 2 1 checkpoint.every_steps=2 train.schedule=constant
set +e
mpirun --oversubscribe -np 2 "$FAKE" --fail cross_entropy:3@1 "$T/boom.yaml" checkpoint.every_steps=2 train.schedule=constant >"$T/boom.out" 2>"$T/boom.err"; rc=$?
set -e
[ $rc = 1 ] || fail "injected failure: exit $rc, expected 1: $(cat "$T/boom.err")"
line=$(grep "shardtune train: error:" "$T/boom.err" || true)
[ "$(echo "$line" | grep -c .)" = 1 ] || fail "expected one error line, got: $(cat "$T/boom.err")"
echo "$line" | grep -q "rank 1: step 3: device failure.*fakedev cross_entropy: injected failure" \
  || fail "the line does not name the step, rank and kernel: $line"
grep -q '"step":3' "$T/boom/metrics.jsonl" && fail "step 3 was reported after its failure"
grep -q '"step":2' "$T/boom/metrics.jsonl" || fail "step 2 missing from metrics.jsonl"
# the last checkpoint (step 2) is intact: resuming on the CPU backend completes the run like an unbroken one
[ "$(train 2 boom)" = 0 ] || fail "resume after the failure: $(cat "$T/boom.err")"
grep -q "resumed\|continuity" "$T/boom.out" || fail "the run did not resume from the step-2 checkpoint: $(cat "$T/boom.out")"
job ref 6 2 1 checkpoint.every_steps=2 train.schedule=constant
[ "$(train 2 ref)" = 0 ] || fail "reference: $(cat "$T/ref.err")"
same_losses "$T/boom/metrics.jsonl" "$T/ref/metrics.jsonl" || fail "resumed losses differ from the unbroken run"
echo "failure at step 3 on rank 1: stopped; resumed from step 2 equals the unbroken run"
echo "ok: device failure test passed"
