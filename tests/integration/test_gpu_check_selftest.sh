#!/usr/bin/env bash
# gpu_check without a GPU:
#  - `gpu_check --self-test` (backend under test: the CPU backend with noisy matmuls; small sizes) exits 0,
#    prints every kernel line, the bf16 storage and matmul_bf16 lines, the training-step lines of both
#    precisions (per-step losses, the loss agreement, tokens/s and MFU), shows non-zero (noise) errors
#    within tolerance, and shows that perturbed results are caught; the int8 teacher's matmul (bit-exact
#    against the CPU twin, within the quantization bound of the fp64 product);
#  - plain `gpu_check` on a machine without a usable CUDA device exits 2 with one line naming the reason.
set -euo pipefail
BIN=${ST_BUILD_DIR:?}/gpu_check
[ -x "$BIN" ] || { echo "no $BIN (tests/tools/gpu_check.c not built)"; exit 1; }
export OMP_NUM_THREADS=2
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*"; echo "---- output:"; cat "$T/out"; exit 1; }

rc=0
"$BIN" --self-test --layers 2 --dim 128 --heads 4 --kv-heads 2 --ff 344 --vocab 2048 --seq 64 --batch 2 \
    --steps 3 --peak-size 384 >"$T/out" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || fail "gpu_check --self-test exited $rc"

# every kernel of the table has an ok line
for k in matmul_NN matmul_NT matmul_TN matmul_TT to_bf16 from_bf16 bias_add bias_bwd sumsq \
         layernorm_fwd layernorm_bwd rmsnorm_fwd rmsnorm_bwd rope_fwd rope_bwd attention_fwd attention_bwd \
         gelu_fwd gelu_bwd swiglu_fwd swiglu_bwd embedding_fwd embedding_bwd cross_entropy adamw \
         dequant_int8 dequant_nf4; do
    grep -Eq "^$k .* ok$" "$T/out" || fail "no ok line for $k"
done
# matmul_bf16: 2 x 2 operand kinds x 4 transposes x bias on/off, plus the offsets case
n=$(grep -Ec '^matmul_bf16_(NN|NT|TN|TT) A(16|32) B(16|32)( \+bias)?( offsets)? .* ok$' "$T/out")
[ "$n" -eq 33 ] || fail "expected 33 matmul_bf16 ok lines, got $n"
for combo in "A32 B32" "A32 B16" "A16 B32" "A16 B16"; do
    for tt in NN NT TN TT; do
        grep -q "^matmul_bf16_$tt $combo +bias " "$T/out" || fail "no matmul_bf16_$tt $combo +bias line"
        grep -Eq "^matmul_bf16_$tt $combo +max_rel_err" "$T/out" || fail "no matmul_bf16_$tt $combo line"
    done
done
# the training step, both precisions
for p in fp32 bf16; do
    for s in 1 2 3; do
        grep -Eq "^train $p step $s  loss [0-9.]+ \(cpu\+noise\)  [0-9.]+ \(cpu ref\)  rel_diff " "$T/out" \
            || fail "no $p step $s line"
    done
    grep -Eq "^train $p max_rel_loss_diff .* ok$" "$T/out" || fail "no $p loss agreement line"
    grep -Eq "^train $p step_median [0-9.]+ ms  tokens/s [0-9.]+ .* MFU [0-9.]+%$" "$T/out" \
        || fail "no $p tokens/s + MFU line"
    grep -q "^self-test: a perturbed training loss was caught" "$T/out" || fail "perturbed loss not caught"
done
# gradients after the first backward, per architecture, and a scaled gradient is caught
for g in "train fp32" "train bf16" "train-qkvbias fp32" "train-gpt2 bf16"; do
    grep -Eq "^$g grads after backward 1 .* ok$" "$T/out" || fail "no ok gradient line for $g"
    grep -Eq "^$g max_rel_loss_diff .* ok$" "$T/out" || fail "no ok loss line for $g"
done
[ "$(grep -c '^self-test: a perturbed gradient (scaled by 1 + 3 tol) was caught' "$T/out")" -eq 4 ] \
    || fail "a scaled gradient was not caught in every architecture"
# the shapes real models use, and the > 2^31-element path (a small n in the self-test)
for k in "attention_fwd T=37 H=4/2 hd=64" "attention_bwd T=37 H=8/2 hd=128" "attention_bwd T=29 H=4/1 hd=128 x6" \
         "layernorm_bwd C=771" "rmsnorm_bwd C=771" "cross_entropy V=32000 chunks of 8" "cross_entropy V=50257 chunks of 4 x60" \
         "head dx bf16 V=50257" "head dW bf16 V=50257" "round_bf16 n=1052675"; do
    grep -Eq "^$k.* ok$" "$T/out" || fail "no ok line for '$k'"
done
# a device failure recorded by the backend (its status) fails the check even when the numbers agree
grep -q "^check_me  *device failure: cpu+noise check_me: injected failure" "$T/out" || fail "no device-failure line"
grep -q "^self-test: an injected device failure was caught" "$T/out" || fail "injected device failure not caught"
# the losses must have gone down (the optimizer really ran) and fp32 != bf16 (bf16 really rounded)
l32_1=$(awk '/^train fp32 step 1 /{print $6}' "$T/out"); l32_3=$(awk '/^train fp32 step 3 /{print $6}' "$T/out")
l16_1=$(awk '/^train bf16 step 1 /{print $6}' "$T/out")
awk -v a="$l32_1" -v b="$l32_3" 'BEGIN{exit !(b < a)}' || fail "fp32 loss did not decrease ($l32_1 -> $l32_3)"
[ "$l32_1" != "$l16_1" ] || fail "fp32 and bf16 first losses are identical ($l32_1)"
# the backend under test really differs (noisy matmuls, like another summation order): errors are not 0
! grep -Eq "^matmul_NN +max_rel_err  0.00e\+00" "$T/out" || fail "matmul_NN error is exactly 0: no noise"
! grep -Eq "^train bf16 max_rel_loss_diff  0.00e\+00" "$T/out" || fail "bf16 losses identical: no noise"
# the comparisons can fail
grep -q "^self-test: a perturbed matmul_bf16 output was caught" "$T/out" || fail "perturbed matmul_bf16 not caught"
grep -q "^self-test: a perturbed to_bf16 result was caught" "$T/out" || fail "perturbed to_bf16 not caught"
# the int8 teacher's matmul (w8_pack + matmul_w8a8): 4 shapes, bit-exact and within the quantization bound,
# both comparisons able to fail
[ "$(grep -Ec '^matmul_w8a8 [0-9x]+( beta)?( bias)? \(bits differ\) +max_rel_err  0.00e\+00 .* ok$' "$T/out")" -eq 4 ] \
    || fail "expected 4 bit-exact matmul_w8a8 lines"
[ "$(grep -Ec '^matmul_w8a8 [0-9x]+ vs fp64 / bound .* ok$' "$T/out")" -eq 4 ] || fail "expected 4 matmul_w8a8 bound lines"
grep -q "^self-test: a perturbed matmul_w8a8 result was caught" "$T/out" || fail "perturbed matmul_w8a8 not caught"
grep -q "^self-test: a perturbed matmul_w8a8 result (bound) was caught" "$T/out" || fail "matmul_w8a8 bound: not caught"
! grep -v "^check_me " "$T/out" | grep -q "FAIL" || fail "a FAIL line (other than the injected check_me)"
grep -Eq "^gpu_check: ([0-9]+) of \1 checks within tolerance$" "$T/out" || fail "no all-ok summary"

# without --self-test there is no device here: exit 2, one line naming the reason
rc=0
"$BIN" --no-train >"$T/out" 2>&1 || rc=$?
if [ "$rc" -eq 0 ]; then
    echo "gpu_check found a usable CUDA device: skipping the no-device assertion"
    exit 0
fi
[ "$rc" -eq 2 ] || fail "plain gpu_check exited $rc, expected 2 (no device)"
[ "$(wc -l <"$T/out")" -eq 1 ] || fail "expected one line"
grep -Eq "^gpu_check: nothing checked: .*(CUDA|device|driver)" "$T/out" || fail "the line does not name the reason"
echo "gpu_check self-test ok"
