#!/usr/bin/env bash
# distill_bench.sh — knowledge distillation's step time against the student's own fine-tuning step, with a
# teacher of about twice the student's parameters (issue 21's target: <= 1.5x), in fp32 and bf16 (the bf16
# teacher: its bf16 weight copy), and with the int8 teacher (distill.teacher_dtype: int8) side by side: student,
# fp32/bf16-teacher and int8-teacher runs interleaved in every round. Reads step_ms and teacher_ms (the teacher's forward per step) from
# RUN_DIR/metrics.jsonl, skipping the first steps (warm-up). The plain and the distillation runs alternate
# REPEATS times; it prints each pair's medians and the load average, then the best (lowest) median of each
# kind and their ratio (on a shared machine the lowest is the least disturbed). Wall time on a loaded machine
# mostly measures the scheduler, so it also prints CPU time per step (user + system, GNU time, with
# OMP_WAIT_POLICY=passive so no thread spins): (CPU of a STEPS-step run - CPU of a SKIP-step run) /
# (STEPS - SKIP), which setup (loading, data) cancels out of. Prints numbers only.
#
#   bench/distill_bench.sh [BUILD_DIR]   env: STEPS (default 8), SKIP (2), VOCAB (8192), MICRO (4), SEQ (128),
#                                        THREADS (OMP_NUM_THREADS, default 2), PRECISIONS ("fp32 bf16"),
#                                        REPEATS (2), INT8 (1: also the int8 teacher, distill.teacher_dtype),
#                                        WALL (1; 0: the CPU-time rounds only)
# Student: Llama L4 C256 H4 KV2 F688; teacher: Llama L8 C320 H4 KV2 F864 (parameter counts printed).
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/shardtune
PY=${ST_PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-8} SKIP=${SKIP:-2} VOCAB=${VOCAB:-8192} MICRO=${MICRO:-4} SEQ=${SEQ:-128} THREADS=${THREADS:-2}
PRECISIONS=${PRECISIONS:-fp32 bf16} REPEATS=${REPEATS:-2} INT8=${INT8:-1} WALL=${WALL:-1}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

"$BIN" init-model --family llama --layers 4 --dim 256 --heads 4 --kv-heads 2 --ffn 688 --vocab "$VOCAB" \
  --max-seq "$SEQ" --seed 1 --out "$T/student" >/dev/null
"$BIN" init-model --family llama --layers 8 --dim 320 --heads 4 --kv-heads 2 --ffn 864 --vocab "$VOCAB" \
  --max-seq "$SEQ" --seed 2 --out "$T/teacher" >/dev/null
"$PY" - "$T/data.jsonl" "$VOCAB" <<'EOF'
import json, random, sys
random.seed(0)
V = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        s = random.randrange(V)
        f.write(json.dumps({"input_ids": [(s + 7 * i) % V for i in range(random.randint(100, 400))]}) + "\n")
EOF
"$BIN" data pack --jsonl "$T/data.jsonl" --out "$T/data.h5" --vocab "$VOCAB" >/dev/null
cat > "$T/job.yaml" <<YAML
model: { path: $T/student }
run_dir: $T/run
seed: 1
train: { steps: $STEPS, micro_batch: $MICRO, seq_len: $SEQ, lr: 1.0e-4, warmup_steps: 0, log_every: 1000 }
tasks:
  - { name: a, path: $T/data.h5 }
eval: { every_steps: 0 }
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML

params() { # model dir [nonemb] -> parameter count (with nonemb: without the input embeddings, a gather)
  "$PY" - "$1/model.safetensors" "${2:-}" <<'EOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
total = 0
for k, v in h.items():
    if k == "__metadata__" or (sys.argv[2] and ("embed_tokens" in k or k.endswith(("wte.weight", "wpe.weight")))):
        continue
    c = 1
    for d in v["shape"]:
        c *= d
    total += c
print(total)
EOF
}
summary() { # RUN_DIR -> "step_ms teacher_ms" (medians over steps after SKIP)
  "$PY" - "$1/metrics.jsonl" "$SKIP" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
print(f"{med('step_ms'):.1f} {med('teacher_ms'):.1f}")
EOF
}

cpu_s() { # job args... -> user+system CPU seconds of the run
  local f
  f=$(mktemp)
  OMP_WAIT_POLICY=passive OMP_NUM_THREADS=$THREADS /usr/bin/time -f "%U %S" -o "$f" "$BIN" train "$T/job.yaml" "$@" \
    >/dev/null
  "$PY" -c "import sys; u, s = open(sys.argv[1]).read().split()[-2:]; print(float(u) + float(s))" "$f"
  rm -f "$f"
}
cpu_per_step() { # job args... -> CPU ms per step, setup cancelled
  local a b
  a=$(cpu_s train.steps="$SKIP" run_dir="$T/cpu_a" "$@")
  b=$(cpu_s train.steps="$STEPS" run_dir="$T/cpu_b" "$@")
  rm -rf "$T/cpu_a" "$T/cpu_b"
  "$PY" -c "print(f'{($b - $a) * 1e3 / ($STEPS - $SKIP):.1f}')"
}

ps=$(params "$T/student") pt=$(params "$T/teacher")
ns=$(params "$T/student" nonemb) nt=$(params "$T/teacher" nonemb)
echo "student $ps parameters, teacher $pt ($("$PY" -c "print(f'{$pt/$ps:.2f}')")x); batch $MICRO x $SEQ tokens;" \
     "$THREADS threads; median of steps $((SKIP + 1))..$STEPS"
echo "FLOP bound of the ratio (matmul FLOPs: student step 6 N_s, teacher forward 2 N_t per token; N without the" \
     "input embeddings, head included): 1 + 2*$nt / (6*$ns) = $("$PY" -c "print(f'{1 + 2*$nt/(6*$ns):.2f}')")x"
printf "%-10s %4s %12s %12s %12s %12s %12s %8s %8s   %s\n" precision run student_ms distill_ms teacher_ms \
  int8_dist_ms int8_teach_ms ratio int8_rat "load average (1/5/15 min)"
for p in $PRECISIONS; do
  [ "$WALL" = 1 ] || break
  best_s="" best_d="" best_q=""
  for r in $(seq "$REPEATS"); do
    OMP_NUM_THREADS=$THREADS "$BIN" train "$T/job.yaml" run_dir="$T/s_${p}_$r" precision=$p >/dev/null
    read -r s _ < <(summary "$T/s_${p}_$r")
    OMP_NUM_THREADS=$THREADS "$BIN" train "$T/job.yaml" run_dir="$T/d_${p}_$r" precision=$p \
      "distill.teacher=$T/teacher" >/dev/null
    read -r d tt < <(summary "$T/d_${p}_$r")
    q=nan qt=nan
    if [ "$INT8" = 1 ]; then
      OMP_NUM_THREADS=$THREADS "$BIN" train "$T/job.yaml" run_dir="$T/q_${p}_$r" precision=$p \
        "distill.teacher=$T/teacher" distill.teacher_dtype=int8 >/dev/null
      read -r q qt < <(summary "$T/q_${p}_$r")
      best_q=$("$PY" -c "print(min(x for x in [$q, ${best_q:-1e30}]))")
    fi
    printf "%-10s %4s %12s %12s %12s %12s %12s %7.2fx %7.2fx   %s\n" "$p" "$r" "$s" "$d" "$tt" "$q" "$qt" \
      "$("$PY" -c "print($d/$s)")" "$("$PY" -c "print(float('$q')/$s)")" "$(cut -d' ' -f1-3 /proc/loadavg)"
    best_s=$("$PY" -c "print(min(x for x in [$s, ${best_s:-1e30}]))")
    best_d=$("$PY" -c "print(min(x for x in [$d, ${best_d:-1e30}]))")
  done
  printf "%-10s %4s %12s %12s %12s %12s %12s %7.2fx %7.2fx   (best of %s)\n" "$p" best "$best_s" "$best_d" "" \
    "${best_q:-nan}" "" "$("$PY" -c "print($best_d/$best_s)")" "$("$PY" -c "print(float('${best_q:-nan}')/$best_s)")" \
    "$REPEATS"
done
echo
echo "CPU time per step (OMP_WAIT_POLICY=passive; steps $((SKIP + 1))..$STEPS):"
printf "%-10s %14s %14s %14s %8s %8s   %s\n" precision student_cpu_ms distill_cpu_ms int8_dist_cpu_ms ratio \
  int8_rat "load average (1/5/15 min)"
for p in $PRECISIONS; do
  ms="" md="" mq=""
  for r in $(seq "$REPEATS"); do
    s=$(cpu_per_step precision=$p)
    d=$(cpu_per_step precision=$p "distill.teacher=$T/teacher")
    q=nan
    [ "$INT8" = 1 ] && q=$(cpu_per_step precision=$p "distill.teacher=$T/teacher" distill.teacher_dtype=int8)
    printf "%-10s %14s %14s %14s %7.2fx %7.2fx   %s\n" "$p" "$s" "$d" "$q" "$("$PY" -c "print($d/$s)")" \
      "$("$PY" -c "print(float('$q')/$s)")" "$(cut -d' ' -f1-3 /proc/loadavg)"
    ms="$ms $s," md="$md $d," mq="$mq $q,"
  done
  "$PY" -c "
s, d, q = min([$ms]), min([$md]), min([float(x) for x in '$mq'.split(',') if x.strip()] or [float('nan')])
print(f'{\"$p\":<10} {s:>14.1f} {d:>14.1f} {q:>14.1f} {d/s:7.2f}x {q/s:7.2f}x   (lowest of $REPEATS each)')"
done
