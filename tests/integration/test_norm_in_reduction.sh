#!/usr/bin/env bash
# test_norm_in_reduction.sh — the clipping norm's sum of squares taken inside the gradient reduction
# (worker/comm.c sq_take: ZeRO 0-1's all-reduce buckets, ZeRO-2's reduce-scatter buckets, ZeRO-3's chunks,
# each ST_SUMSQ_CHUNK chunk of the rank's range once all of it is final) and the ranks' parts summed in the
# step's one scalar all-reduce with the losses (coordinator/trainer/train_step.c reduce_step_sums) give the
# bits of a separate sumsq pass and of the norm's own all-reduce:
#  * SHARDTUNE_NORM_CHECK=1 makes every step also take one sumsq pass over the rank's range and the norm's own
#    MPI_Allreduce, and fail on any bit of difference. Runs over ZeRO 1-3 (ZeRO-2 releasing its pages and with
#    its full buffer, SHARDTUNE_ZERO2_FULL_GRADS=1; ZeRO-3 with and without overlap), 2-4 ranks, GPT-2 (tied
#    embeddings) and Llama, full / LoRA / frozen, accumulation 3, 10 KB buckets (chunks straddle buckets and
#    ZeRO-3's layer ranges), two tasks (their sums share the vector), clipping active (every grad_norm above
#    train.grad_clip) all pass;
#  * SHARDTUNE_NORM_CHECK=flip changes the first chunk's sum taken in the reduction by 2^-20 of itself: each
#    stage's run must then fail naming the check, so the chunks are taken during the reduction and the check
#    sees a small change (one ulp of a chunk may round away in the total).
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
PY=${ST_PYTHON:-/usr/bin/python3}
SRC=${ST_SOURCE_DIR:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$BIN" init-model --family llama --layers 2 --dim 96 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/llama" >/dev/null
"$BIN" init-model --family gpt2 --layers 2 --dim 96 --heads 4 --vocab 128 --max-seq 64 --seed 5 --out "$T/gpt2" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/a.jsonl" --docs 120 --vocab 128 >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/b.jsonl" --docs 120 --vocab 128 --task repeat --seed 1 >/dev/null
"$BIN" data pack --jsonl "$T/a.jsonl" --out "$T/a.h5" --vocab 128 >/dev/null
"$BIN" data pack --jsonl "$T/b.jsonl" --out "$T/b.h5" --vocab 128 >/dev/null
cat >"$T/job.yaml" <<YAML
model: { path: $T/llama }
seed: 7
train: { steps: 3, micro_batch: 1, grad_accum: 3, seq_len: 32, lr: 3.0e-3, warmup_steps: 0, grad_clip: 0.05 }
tasks: [ { name: a, path: $T/a.h5 }, { name: b, path: $T/b.h5, loss_weight: 0.5 } ]
sharding: { stage: 1, bucket_mb: 0.01 }
eval: { every_steps: 0 }
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML
GPT2_LORA="finetune.lora.targets=[c_attn,c_proj,c_fc]"

# run NAME NP CHECK [overrides]: SHARDTUNE_NORM_CHECK=CHECK on NP ranks; exit status in NAME.rc
run() {
  local name=$1 np=$2 check=$3
  shift 3
  set +e
  SHARDTUNE_NORM_CHECK=$check mpirun --oversubscribe -np "$np" "$BIN" train "$T/job.yaml" run_dir="$T/$name" "$@" \
    >"$T/$name.out" 2>"$T/$name.err"
  echo $? >"$T/$name.rc"
  set -e
}
pass() { # NAME NP [overrides]: the checked run succeeds, every step clipped
  local name=$1 np=$2
  shift 2
  run "$name" "$np" 1 "$@"
  [ "$(cat "$T/$name.rc")" = 0 ] || fail "$name: $(grep -m2 . "$T/$name.err")"
  "$PY" - "$T/$name/metrics.jsonl" <<'EOF' || fail "$name: clipping not active or steps missing"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"grad_norm"' in l]
assert len(rows) == 3 and all(r["grad_norm"] > 0.05 for r in rows), rows
EOF
  echo "ok   $name"
}
flip() { # NAME NP [overrides]: the first chunk taken in the reduction changed fails the run by name
  local name=$1 np=$2
  shift 2
  run "$name" "$np" flip "$@"
  [ "$(cat "$T/$name.rc")" != 0 ] || fail "$name: the flipped chunk went unnoticed (not taken in the reduction?)"
  grep -q "SHARDTUNE_NORM_CHECK: the gradient sum of squares taken in the reduction" "$T/$name.err" ||
    fail "$name: $(grep -m2 . "$T/$name.err")"
  echo "ok   $name (caught)"
}

pass z1 3 sharding.stage=1
pass z1_gpt2 2 sharding.stage=1 model.path="$T/gpt2"
pass z2 3 sharding.stage=2
pass z2_lora 2 sharding.stage=2 finetune.mode=lora
export SHARDTUNE_ZERO2_FULL_GRADS=1 # the full buffer, reduce-scattered in buckets on the last micro-batch
pass z2_full 3 sharding.stage=2
unset SHARDTUNE_ZERO2_FULL_GRADS
pass z2_gpt2_frozen 3 sharding.stage=2 model.path="$T/gpt2" finetune.mode=frozen finetune.train_layers=-1
pass z3 3 sharding.stage=3
pass z3_four 4 sharding.stage=3
pass z3_blocking 2 sharding.stage=3 sharding.overlap=false
pass z3_gpt2_lora 3 sharding.stage=3 model.path="$T/gpt2" finetune.mode=lora "$GPT2_LORA"
pass z3_frozen 2 sharding.stage=3 finetune.mode=frozen finetune.train_layers=-1
flip z1_flip 2 sharding.stage=1
flip z2_flip 2 sharding.stage=2
flip z3_flip 3 sharding.stage=3
flip z3_blocking_flip 2 sharding.stage=3 sharding.overlap=false
export SHARDTUNE_ZERO2_FULL_GRADS=1
flip z2_full_flip 2 sharding.stage=2
unset SHARDTUNE_ZERO2_FULL_GRADS
echo "all passed"
