#!/usr/bin/env bash
# gguf_ab.sh — A/B of GGUF export speed between two builds on a shared machine: runs BASE's and this
# build's gguf_bench alternately (ROUNDS times each, interleaved), every run measuring its own raw
# write+fsync in the same rounds, then prints per --quant the median over the runs of each build's
# "ratio" (export MB/s / raw MB/s over the file's bytes), export seconds and export CPU seconds (gguf_bench's
# "export CPU s": both builds' gguf_bench must be built from a bench/gguf_bench.c that prints it), with the load average before
# and after. Only ratios measured in the same run are compared (absolute rates mean nothing under load).
# Prints numbers only; asserts nothing.
#
#   BASE=OTHER_BUILD_DIR bench/gguf_ab.sh [BUILD_DIR]
#     env: ROUNDS (3), REPS (3: gguf_bench --reps), ARGS (default "--layers 2 --vocab 8000"),
#          QUANTS (default f32,f16,bf16,q8_0,q4_0,q4_K), THREADS (OMP_NUM_THREADS, 2)
# Build the other commit in its own directory, e.g. `git archive COMMIT | tar -x -C /tmp/base` and cmake there.
set -euo pipefail
NEW=${1:-build}
: "${BASE:?BASE=OTHER_BUILD_DIR (the build to compare against)}"
ROUNDS=${ROUNDS:-3} REPS=${REPS:-3} ARGS=${ARGS:---layers 2 --vocab 8000}
QUANTS=${QUANTS:-f32,f16,bf16,q8_0,q4_0,q4_K} THREADS=${THREADS:-2}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "gguf_ab: base $BASE vs new $NEW, $ROUNDS rounds, $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$ROUNDS"); do
  for side in base new; do
    dir=$([ "$side" = base ] && echo "$BASE" || echo "$NEW")
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$THREADS "$dir/gguf_bench" $ARGS --reps "$REPS" --quant "$QUANTS" >"$out/$side.$r"
    grep -E '^\| [a-z]' "$out/$side.$r" | grep -v '^| quant' | sed "s/^/$side round $r /"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| quant | ratio base (median of runs) | ratio new | export s base | export s new | export CPU s base | export CPU s new | runs |"
echo "|---|---|---|---|---|---|---|---|"
# rows: "| q | file MB | export s | export MB/s | raw MB/s | ratio% | input MB/s | input ratio | export CPU s | raw CPU s |"
IFS=, read -ra qs <<<"$QUANTS"
for q in "${qs[@]}"; do
  med() { sort -n | awk '{v[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
  col() { cat "$out"/$1.* | awk -F'|' -v q="$q" -v c="$2" '{gsub(/ /,"",$2)} $2==q {x=$c; gsub(/[ %]/,"",x); print x}'; }
  echo "| $q | $(col base 7 | med)% | $(col new 7 | med)% | $(col base 4 | med) | $(col new 4 | med) | $(col base 10 | med) | $(col new 10 | med) | $ROUNDS |"
done
