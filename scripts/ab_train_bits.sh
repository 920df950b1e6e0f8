#!/usr/bin/env bash
# ab_train_bits.sh — does a change keep training's results bit for bit? Trains every configuration of a matrix
# with two builds' shardtune binaries and compares, per configuration, every step's loss and grad_norm in
# metrics.jsonl (as written) and the bytes of RUN_DIR/final/ (the weights after the last step: they carry
# every step's clipping scale). Matrix: GPT-2 (tied embeddings) and Llama x full / LoRA / frozen (top layer)
# x ZeRO 0-3 x 1-3 ranks x grad_accum 1 and 3, 10 KB buckets, two tasks, 3 steps with clipping active
# (train.grad_clip 0.05, below every step's norm: the script says so when one is not); plus EXTRA rows
# (ZeRO-2's full buffer, overlap off). Prints one line per configuration and a summary; exits 1 on any
# difference, 2 when a run fails.
#
#   scripts/ab_train_bits.sh BASE_BUILD [BUILD]   e.g. build main once: git worktree add /tmp/base main;
#                                                 cmake -S /tmp/base -B /tmp/base/build ...; then
#                                                 scripts/ab_train_bits.sh /tmp/base/build build
#   env: FAMILIES ("gpt2 llama"), MODES ("full lora frozen"; also progressive: unfreeze_every 1, a stage
#        change at steps 1 and 2), STAGES ("0 1 2 3"), RANKS ("1 2 3"), ACCUMS ("1 3"), EXTRA (1: the extra
#        rows, default 1), PRECISION (fp32 | bf16, default fp32), DEVICE (1: each build's fakedev, a device
#        rank, instead of a host one), RESUME (1: each run stopped after step 2, a checkpoint saved, and resumed)
set -euo pipefail -f
BASE=${1:?usage: scripts/ab_train_bits.sh BASE_BUILD [BUILD]}
BUILD=${2:-build}
A=$BASE/shardtune B=$BUILD/shardtune
[ -x "$A" ] && [ -x "$B" ] || { echo "no shardtune in $BASE or $BUILD" >&2; exit 2; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${ST_PYTHON:-/usr/bin/python3}
FAMILIES=${FAMILIES:-gpt2 llama} MODES=${MODES:-full lora frozen} STAGES=${STAGES:-0 1 2 3}
RANKS=${RANKS:-1 2 3} ACCUMS=${ACCUMS:-1 3} EXTRA=${EXTRA:-1} PRECISION=${PRECISION:-fp32} DEVICE=${DEVICE:-0}
RESUME=${RESUME:-0}
if [ "$DEVICE" = 1 ]; then
  [ -x "$BASE/fakedev" ] && [ -x "$BUILD/fakedev" ] || { echo "no fakedev in $BASE or $BUILD" >&2; exit 2; }
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

"$B" init-model --family llama --layers 2 --dim 96 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/llama" >/dev/null
"$B" init-model --family gpt2 --layers 2 --dim 96 --heads 4 --vocab 128 --max-seq 64 --seed 5 --out "$T/gpt2" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/a.jsonl" --docs 120 --vocab 128 >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/b.jsonl" --docs 120 --vocab 128 --task repeat --seed 1 >/dev/null
"$B" data pack --jsonl "$T/a.jsonl" --out "$T/a.h5" --vocab 128 >/dev/null
"$B" data pack --jsonl "$T/b.jsonl" --out "$T/b.h5" --vocab 128 >/dev/null
cat >"$T/job.yaml" <<YAML
model: { path: $T/llama }
seed: 7
train: { steps: 3, micro_batch: 1, grad_accum: 1, seq_len: 32, lr: 3.0e-3, warmup_steps: 0, grad_clip: 0.05 }
tasks: [ { name: a, path: $T/a.h5 }, { name: b, path: $T/b.h5, loss_weight: 0.5 } ]
sharding: { stage: 1, bucket_mb: 0.01 }
eval: { every_steps: 0 }
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML

mode_args() { # FAMILY MODE
  case $2 in
    full) ;;
    frozen) echo "finetune.mode=frozen finetune.train_layers=-1" ;;
    progressive) echo "finetune.mode=progressive finetune.unfreeze_every=1" ;;
    lora) if [ "$1" = gpt2 ]; then echo "finetune.mode=lora finetune.lora.targets=[c_attn,c_proj,c_fc]"
          else echo "finetune.mode=lora"; fi ;;
  esac
}

# one BIN RUN_DIR NP ENV [overrides]: a host rank's `shardtune train`, or (DEVICE=1) the build's fakedev;
# RESUME=1: 2 steps with a checkpoint, then resumed to the end in the same run directory
one() {
  local bin=$1 rd=$2 np=$3 envs=$4
  shift 4
  local cmd=("$bin" train)
  [ "$DEVICE" = 1 ] && cmd=("$(dirname "$bin")/fakedev" --guard)
  if [ "$RESUME" = 1 ]; then
    env $envs mpirun --oversubscribe -np "$np" "${cmd[@]}" "$T/job.yaml" run_dir="$rd" precision="$PRECISION" "$@" \
      train.steps=2 checkpoint.every_steps=2 >/dev/null 2>"$rd.err0" || return 1
  fi
  env $envs mpirun --oversubscribe -np "$np" "${cmd[@]}" "$T/job.yaml" run_dir="$rd" precision="$PRECISION" "$@" \
    >/dev/null 2>"$rd.err"
}

# the rows: "FAMILY MODE STAGE NP ACCUM ENV"
rows=()
for f in $FAMILIES; do for mo in $MODES; do for s in $STAGES; do for np in $RANKS; do for ac in $ACCUMS; do
  rows+=("$f $mo $s $np $ac -")
done; done; done; done; done
if [ "$EXTRA" = 1 ]; then
  rows+=("llama full 2 3 3 SHARDTUNE_ZERO2_FULL_GRADS=1" "gpt2 lora 2 2 3 SHARDTUNE_ZERO2_FULL_GRADS=1"
         "llama full 3 3 3 overlap=false" "llama full 1 3 3 overlap=false" "llama full 2 3 3 overlap=false")
fi
echo "A: $A  B: $B; precision $PRECISION, device $DEVICE, resume $RESUME; ${#rows[@]} configurations; load average $(cut -d' ' -f1-3 /proc/loadavg)"
same=0 differ=0 failed=0 unclipped=0 i=0
for row in "${rows[@]}"; do
  read -r f mo s np ac ex <<<"$row"
  i=$((i + 1))
  envs="X=1" over=()
  case $ex in
    overlap=false) over+=(sharding.overlap=false) ;;
    -) ;;
    *) envs=$ex ;;
  esac
  args=(model.path="$T/$f" sharding.stage="$s" train.grad_accum="$ac" $(mode_args "$f" "$mo") "${over[@]}")
  name="$f $mo zero$s np$np accum$ac ${ex/-/}"
  rc=0
  one "$A" "$T/a$i" "$np" "$envs" "${args[@]}" || rc=1
  one "$B" "$T/b$i" "$np" "$envs" "${args[@]}" || rc=$((rc + 2))
  if [ $rc != 0 ]; then
    echo "FAILED $name (A: $(tail -1 "$T/a$i.err" 2>/dev/null) B: $(tail -1 "$T/b$i.err" 2>/dev/null))"
    failed=$((failed + 1))
    continue
  fi
  verdict=$("$PY" - "$T/a$i" "$T/b$i" <<'EOF'
import hashlib, json, os, re, sys
def steps(d):
    out = []
    for line in open(os.path.join(d, "metrics.jsonl")):
        if '"grad_norm"' not in line:
            continue
        r = json.loads(line)
        raw = {k: re.search(r'"%s":([^,}]*)' % k, line).group(1) for k in ("loss", "grad_norm")}
        out.append((r["step"], raw["loss"], raw["grad_norm"], r["grad_norm"]))
    return out
def final(d):
    h = {}
    root = os.path.join(d, "final")
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            h[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return h
a, b = steps(sys.argv[1]), steps(sys.argv[2])
clipped = all(x[3] is not None and x[3] > 0.05 for x in b)
ok = [x[:3] for x in a] == [x[:3] for x in b] and len(a) == 3 and final(sys.argv[1]) == final(sys.argv[2])
detail = "" if ok else " A " + str([x[:3] for x in a]) + " B " + str([x[:3] for x in b])
print(("same" if ok else "DIFFER") + ("" if clipped else " (not clipped)") + detail)
EOF
)
  echo "$verdict  $name"
  case $verdict in same*) same=$((same + 1)) ;; *) differ=$((differ + 1)) ;; esac
  case $verdict in *"not clipped"*) unclipped=$((unclipped + 1)) ;; esac
  rm -rf "$T/a$i" "$T/b$i"
done
echo "summary: $same same, $differ differ, $failed failed, $unclipped not clipped (of ${#rows[@]}); load average $(cut -d' ' -f1-3 /proc/loadavg)"
[ $failed = 0 ] || exit 2
[ $differ = 0 ]
