#!/usr/bin/env bash
# tests/sanitize.sh — the unit tests and a short integration subset under AddressSanitizer +
# UndefinedBehaviorSanitizer (with float-cast-overflow: a NaN or huge float cast to an integer is UB that
# -fsanitize=undefined alone does not catch). Any report fails the run (halt_on_error, no recovery).
#
#   bash tests/sanitize.sh [BUILD_DIR]      # default build-san; CPU build; -j2
#
# ASan reports land in BUILD_DIR/sanitizer-reports and fail the run even where a test expected a failure.
# Leak detection is off: Open MPI, HDF5 and libzmq keep process-lifetime allocations that are not ours.
# ST_SAN_TESTS (a ctest -R regex) replaces the integration subset.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
B=${1:-$SRC/build-san}
FLAGS="-fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
cmake -S "$SRC" -B "$B" -DSHARDTUNE_CUDA=OFF -DSHARDTUNE_DNNL=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined,float-cast-overflow" >/dev/null
cmake --build "$B" -j2 >/dev/null
# ASan reports go to files (checked below), so a test that expects a failing exit code cannot hide one;
# UBSan inside the ASan runtime ignores log_path and reports on stderr, so it aborts (exit 134), a code
# no test accepts
REPORTS="$B/sanitizer-reports"
rm -rf "$REPORTS"; mkdir -p "$REPORTS"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0:log_path=$REPORTS/asan
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1
export OMP_NUM_THREADS=1
# every process the tests start inherits these; a sanitizer report aborts it and fails its test
SUBSET=${ST_SAN_TESTS:-integration\.(test_strict_inputs|test_divergence|test_resume_safety|test_telemetry_cli)$}
cd "$B"
status=0
# JUnit files for ./run test's summary line (san-unit.xml, san-integration.xml)
ctest -L unit --output-on-failure -j1 --output-junit "$B/san-unit.xml" || status=1
ctest -R "$SUBSET" --output-on-failure -j1 --output-junit "$B/san-integration.xml" || status=1
if [ -n "$(ls -A "$REPORTS")" ]; then
  echo "sanitize: reports in $REPORTS:" >&2
  head -n 30 "$REPORTS"/* >&2
  exit 1
fi
[ $status = 0 ] || exit 1
echo "sanitize: unit tests and '$SUBSET' clean under ASan + UBSan"
