#!/usr/bin/env bash
# test_bf16_train.sh — mixed precision (precision: bf16) through the real trainer on MPI ranks.
#   1. bf16 on 2 ranks (ZeRO-1) resumed from a checkpoint at step 8 is bit-identical to the uninterrupted
#      bf16 run: losses and final weights (the bf16 weight copy is rebuilt from the restored fp32 masters).
#   2. bf16 differs from the fp32 run (the setting reaches the model) while learning the same; D, the
#      largest relative loss difference between them over the run, is the whole effect of the bf16
#      arithmetic on the losses.
#   3. bf16 on 1, 2 (ZeRO-1 and 2) and 3 ranks with the same global batch agree within 2 D. The rank count
#      changes only the order of fp32 sums (fp32 runs agree within 1e-6: test_dp_equivalence.py); in bf16
#      that flips the rare roundings of values at a rounding midpoint, each by one bf16 ulp, at most twice
#      a rounding error, so the runs drift apart by at most twice what bf16 does as a whole (the argument
#      of test_bf16_torch.py (a); measured: 0.13 .. 0.48 D over the default, Haswell and SkylakeX OpenBLAS
#      kernels and 6 training seeds). A tolerance of its own (it was 5e-4) holds on one machine and not on
#      another; D is measured in the same run. A reduction bug moves the losses by far more (D ~ 3e-4).
# The arithmetic itself is checked against PyTorch in tests/reference/test_bf16_torch.py.
#   Every run also checks after each step that the bf16 weight copy equals the fp32 weights rounded
#   (SHARDTUNE_CHECK_BF16_COPY=1): the multi-tensor AdamW refreshes the owned ranges, the ZeRO parameter
#   all-gather the others, without a repack.
source "$(dirname "$0")/ckpt_lib.sh"
export SHARDTUNE_CHECK_BF16_COPY=1

common=(precision=bf16 train.schedule=constant checkpoint.every_steps=8)
# --- 1. resume, same world size ---
job full 16 3 1 "${common[@]}"
[ "$(train 2 full)" = 0 ] || fail "bf16 2 ranks: $(cat $T/full.err)"
losses $T/full > $T/full.loss
[ "$(wc -l < $T/full.loss)" = 16 ] || fail "bf16 run logged $(wc -l < $T/full.loss) steps"
job part 8 3 1 "${common[@]}"
[ "$(train 2 part)" = 0 ] || fail "bf16 first part: $(cat $T/part.err)"
[ "$(train 2 part train.steps=16)" = 0 ] || fail "bf16 resume: $(cat $T/part.err)"
grep -q "resumed from step-00000008.h5 at step 8" $T/part.out || fail "no resume line: $(cat $T/part.out)"
losses $T/part > $T/part.loss
cmp -s $T/full.loss $T/part.loss || { diff $T/full.loss $T/part.loss | head; fail "bf16 resume: losses differ"; }
cmp -s $T/full/final/model.safetensors $T/part/final/model.safetensors || fail "bf16 resume: final weights differ"
echo "ok: bf16 resume at step 8 (2 ranks) is bit-identical over 16 steps"

# --- 2. not the fp32 run, but learning like it; D ---
job one 16 6 1 "${common[@]}"
[ "$(train 1 one)" = 0 ] || fail "bf16 1 rank: $(cat $T/one.err)"
losses $T/one > $T/one.loss
job fp32 16 6 1 train.schedule=constant checkpoint.every_steps=8
[ "$(train 1 fp32)" = 0 ] || fail "fp32 1 rank: $(cat $T/fp32.err)"
losses $T/fp32 > $T/fp32.loss
"$PY" - $T/fp32.loss $T/one.loss $T/D <<'PYEOF' || fail "bf16 vs fp32"
import sys
a = [float(l.split()[1]) for l in open(sys.argv[1])]
b = [float(l.split()[1]) for l in open(sys.argv[2])]
d = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"bf16 vs fp32: max relative loss difference {d:.2e}; final {b[-1]:.4f} vs {a[-1]:.4f}")
assert 0 < d < 2e-2, "bf16 must differ from fp32 (it is another arithmetic) but stay close"
assert b[-1] < 0.9 * b[0], "bf16 did not learn"
open(sys.argv[3], "w").write(repr(d))
PYEOF
echo "ok: bf16 differs from fp32 and learns like it"

# --- 3. 1 rank == 2 ranks (ZeRO-1, ZeRO-2) == 3 ranks within 2 D, global batch 6 ---
TOL=$("$PY" -c "import sys; print(2 * float(sys.argv[1]))" "$(cat $T/D)")
close_losses $T/one.loss $T/full.loss $TOL || fail "bf16: 1 rank vs 2 ranks (ZeRO-1) differ"
job z2 16 3 1 "${common[@]}" sharding.stage=2
[ "$(train 2 z2)" = 0 ] || fail "bf16 ZeRO-2: $(cat $T/z2.err)"
losses $T/z2 > $T/z2.loss
close_losses $T/one.loss $T/z2.loss $TOL || fail "bf16: 1 rank vs 2 ranks ZeRO-2 differ"
job three 16 2 1 "${common[@]}"
[ "$(train 3 three)" = 0 ] || fail "bf16 3 ranks: $(cat $T/three.err)"
losses $T/three > $T/three.loss
close_losses $T/one.loss $T/three.loss $TOL || fail "bf16: 1 rank vs 3 ranks differ"
echo "ok: bf16 on 1, 2 (ZeRO-1 and 2) and 3 ranks agree within 2 D = $TOL (D: bf16 vs fp32)"

