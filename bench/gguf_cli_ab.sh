#!/usr/bin/env bash
# gguf_cli_ab.sh — A/B of `shardtune export MODEL --format gguf --quant Q` (the whole CLI: reading the source,
# encoding, writing) between two builds on a shared machine: BASE's and this build's shardtune alternately,
# ROUNDS times per quant (which goes first alternates), each pair followed by a raw write+fsync of the file's size (dd bs=1M conv=fsync) in the
# same round; prints each run (wall s, user s, sys s, peak RSS KB, file bytes), then per quant the medians and
# the ratio (raw write s / export wall s, the issue's "fraction of raw write bandwidth") and both rates in MB/s
# (file bytes / median s), with the load average. Every round also compares the two builds' files byte for
# byte (`cmp`) and stops at the first difference: a faster export must write the same file.
#
#   BASE=OTHER_BUILD_DIR bench/gguf_cli_ab.sh MODEL_DIR [BUILD_DIR]
#     env: ROUNDS (5), QUANTS ("f16 q8_0 q4_0 q4_K"), THREADS (OMP_NUM_THREADS, 2), OUT (scratch dir, /tmp/st_gguf_cli_ab)
set -euo pipefail
M=${1:?MODEL_DIR}
NEW=${2:-build}
: "${BASE:?BASE=OTHER_BUILD_DIR (the build to compare against)}"
ROUNDS=${ROUNDS:-5} QUANTS=${QUANTS:-f16 q8_0 q4_0 q4_K} THREADS=${THREADS:-2} O=${OUT:-/tmp/st_gguf_cli_ab}
mkdir -p "$O"
runs=$O/runs.txt
: >"$runs"
echo "gguf_cli_ab: $BASE vs $NEW, model $M, $ROUNDS rounds, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for q in $QUANTS; do
  for r in $(seq 1 "$ROUNDS"); do
    order="base new"
    [ $((r % 2)) = 0 ] && order="new base" # alternate which build goes first (page cache, writeback state)
    for side in $order; do
      B=$([ $side = base ] && echo "$BASE" || echo "$NEW")/shardtune
      rm -f "$O/$side.gguf"
      /usr/bin/time -f "%e %U %S %M" -o "$O/t" env OMP_NUM_THREADS="$THREADS" "$B" export "$M" --out "$O/$side.gguf" \
        --format gguf --quant "$q" --force >/dev/null 2>"$O/err" || { echo "$side failed: $(cat "$O/err")"; exit 1; }
      sz=$(stat -c %s "$O/$side.gguf")
      echo "$q $side $r $(cat "$O/t") $sz" | tee -a "$runs"
    done
    cmp "$O/base.gguf" "$O/new.gguf" || { echo "$q round $r: the two builds' files differ"; exit 1; }
    rm -f "$O/base.gguf" "$O/new.gguf"
    t0=$(date +%s.%N)
    dd if=/dev/zero of="$O/raw.bin" bs=1M count=$(((sz + 1048575) / 1048576)) conv=fsync status=none
    t1=$(date +%s.%N)
    rm -f "$O/raw.bin"
    echo "$q raw $r $(echo "$t1 - $t0" | bc) 0 0 0 $sz" | tee -a "$runs"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| quant | MB | wall s base | wall s new | CPU s base | CPU s new | peak RSS MB base | new | raw s | raw MB/s | export MB/s base | new | ratio base | ratio new |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
med() { sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
for q in $QUANTS; do
  col() { awk -v q="$q" -v s="$1" '$1==q && $2==s {print '"$2"'}' "$runs" | med; }
  wb=$(col base '$4') wn=$(col new '$4') raw=$(col raw '$4')
  mb=$(col raw '$8/1e6')
  printf '| %s | %.1f | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f | %.3f | %.0f | %.0f | %.0f | %.0f%% | %.0f%% |\n' \
    "$q" "$mb" "$wb" "$wn" "$(col base '$5+$6')" "$(col new '$5+$6')" "$(col base '$7/1024')" "$(col new '$7/1024')" \
    "$raw" "$(echo "$mb / $raw" | bc -l)" "$(echo "$mb / $wb" | bc -l)" "$(echo "$mb / $wn" | bc -l)" \
    "$(echo "100 * $raw / $wb" | bc -l)" "$(echo "100 * $raw / $wn" | bc -l)"
done
