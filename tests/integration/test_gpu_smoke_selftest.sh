#!/usr/bin/env bash
# test_gpu_smoke_selftest.sh — tests/tools/gpu_smoke.sh, the first command on a GPU machine, works end to end:
# --self-test runs all of it here (gpu_check --self-test; the "GPU" runs on the CPU backend on 2 ranks,
# ZeRO 0/1/2, fp32 and bf16, each against a 1-rank CPU reference; progressive stage changes against the CPU;
# the ldd check of every binary; the results file in $OUT; a bf16 ZeRO-2 stop + resume that must
# be bit-identical) and must pass every check; without --self-test on this GPU-less machine it must exit 2
# with one line saying why.
set -euo pipefail
# (matches read $out from a here-string: `echo | grep -q` can lose echo to SIGPIPE, which pipefail counts)
B=${ST_BUILD_DIR:?}
SRC=${ST_SOURCE_DIR:?}
R=$(mktemp -d); trap 'rm -rf "$R"' EXIT
out=$(OUT=$R bash "$SRC/tests/tools/gpu_smoke.sh" --self-test "$B" 2>&1) || { echo "$out"; echo "FAIL: gpu_smoke --self-test failed"; exit 1; }
# the results file holds the same lines (what comes back from a device machine's $OUT)
grep -q "all GPU checks passed" "$R/gpu_smoke.txt" || { echo "FAIL: no summary in \$OUT/gpu_smoke.txt"; exit 1; }
echo "$out" | grep -v '^matmul\|max_rel_err'
for want in "ldd gpu_check  *ok" "ldd shardtune  *ok" "^gpu_check  *ok" "cpu reference fp32  *ok" "cpu reference bf16  *ok" \
            "progressive bf16 ZeRO-1 vs CPU  *ok" "resume bf16 ZeRO-2 bit-identical  *ok" "qlora fp32 ZeRO-1 vs CPU  *ok" \
            "qlora_dora bf16 ZeRO-1 vs CPU  *ok" "ptuning_lstm fp32 ZeRO-1 vs CPU  *ok" "all GPU checks passed"; do
  grep -q "$want" <<<"$out" || { echo "FAIL: no line matching '$want'"; exit 1; }
done
for p in fp32 bf16; do for z in 0 1 2; do
  grep -q "2 cpu rank(s) $p ZeRO-$z vs CPU  *ok" <<<"$out" || { echo "FAIL: no ok line for $p ZeRO-$z"; exit 1; }
done; done
if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then echo "ok: gpu_smoke --self-test passed (a GPU is visible: the no-GPU path is not checked)"; exit 0; fi
set +e
line=$(bash "$SRC/tests/tools/gpu_smoke.sh" "$B" 2>&1); rc=$?
set -e
[ $rc = 2 ] && [ "$(echo "$line" | wc -l)" = 1 ] || { echo "FAIL: without a GPU: rc $rc, output: $line"; exit 1; }
echo "ok: gpu_smoke --self-test passed; without a GPU: $line"
