#!/usr/bin/env bash
# test_zero3_qload.sh — QLoRA's sharded load at sharding.stage 3 on CPU ranks (coordinator/trainer/train_qload.c
# over worker/comm.c's parts: each rank quantizes only its bytes [qlo, qhi) of the blob, reading only the blocks
# they depend on, and reads only its parts of the kept base, in place) against the whole load it replaced
# (SHARDTUNE_Z3DEV_QLOAD=whole: train.c load_quantized quantizes the whole base on every rank, then the
# communicator gives back what is not this rank's), both `shardtune train` with real MPI ranks and the same job:
# the losses, every checkpoint (each dataset and attribute, base_checksum and adapter_base_checksum included, but
# job_spec), final/ and `export --merge` of the last checkpoint are bit-identical; on a model whose fp32 embedding
# and head dominate, each rank's peak RSS after loading is lower. Cases: NF4 + double quantization on 1 and 2
# ranks; on 3 ranks with block 3 (the host shards are bytes: a rank's edge inside a tensor's codes, mid-block,
# and another inside its double-quantized scales: checked from the layout, `cuts`); NF4's fp32 scales and int8
# under bf16 cut the same way; DoRA (magnitudes from the gathered codes); a bf16 source under bf16; a resume of
# the 2-rank run on 3 ranks (the base checksum agrees). A model file with a NaN in a quantized tensor is refused naming it.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/qload_lib.sh"

q=(finetune.mode=qlora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")

# losses_equal A.jsonl B.jsonl: every step's loss is the same float
losses_equal() {
  "$PY" - "$@" <<'PY'
import json, sys
ls = lambda p: {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if '"loss"' in l and '"step"' in l}
a, b = ls(sys.argv[1]), ls(sys.argv[2])
assert a and a == b, (a, b)
PY
}

# run NP NAME: train job NAME on NP ranks (environment assignments before it reach the ranks); fails on an error
run() {
  [ "$(train "$1" "$2")" = 0 ] || fail "$2 on $1 ranks: $(tail -5 "$T/$2.err")"
}

# same NP NAME [overrides]: job NAME with the sharded load and wNAME with the whole one, on NP CPU ranks
same() {
  local np=$1 name=$2 ck; shift 2
  job "$name" 4 2 1 sharding.stage=3 checkpoint.every_steps=2 train.schedule=constant "${q[@]}" "$@"
  job "w$name" 4 2 1 sharding.stage=3 checkpoint.every_steps=2 train.schedule=constant "${q[@]}" "$@"
  SHARDTUNE_REPORT_LOAD_RSS=1 run "$np" "$name"
  SHARDTUNE_REPORT_LOAD_RSS=1 SHARDTUNE_Z3DEV_QLOAD=whole run "$np" "w$name"
  losses_equal "$T/$name/metrics.jsonl" "$T/w$name/metrics.jsonl" || fail "$name ($np ranks): losses differ from the whole load's"
  diff -r "$T/$name/final" "$T/w$name/final" >/dev/null || fail "$name: final/ differs from the whole load's"
  for ck in step-00000002.h5 step-00000004.h5; do
    [ -f "$T/$name/checkpoints/$ck" ] || fail "$name: no checkpoint $ck: $(ls "$T/$name/checkpoints")"
    h5same "$T/$name/checkpoints/$ck" "$T/w$name/checkpoints/$ck" || fail "$name: checkpoint $ck differs from the whole load's"
  done
  "$BIN" export "$T/$name/checkpoints" --merge --out "$T/$name/merged" >/dev/null 2>>"$T/$name.err" &&
    "$BIN" export "$T/w$name/checkpoints" --merge --out "$T/w$name/merged" >/dev/null 2>>"$T/$name.err" ||
    fail "$name: export --merge: $(tail -3 "$T/$name.err")"
  cmp -s "$T/$name/merged/model.safetensors" "$T/w$name/merged/model.safetensors" || fail "$name: export --merge differs"
  echo "$name on $np CPU ranks: losses, checkpoints (base checksum included), final/, export --merge bit-identical to the whole load"
}

same 1 one
same 2 nf4
cuts 1 nf4 1 3 3
same 3 nf4b3 finetune.qlora.block=3
cuts 1 nf4 0 7 3
same 3 nf4nodq finetune.qlora.block=7 finetune.qlora.double_quant=false
cuts 1 int8 0 5 3
same 3 i8bf finetune.qlora.quant=int8 finetune.qlora.double_quant=false finetune.qlora.block=5 precision=bf16
same 2 dora finetune.lora.dora=true finetune.qlora.block=48

# resume 2 -> 3 ranks: the 2-rank run's step-2 checkpoint resumed on 3 ranks, sharded and whole alike
for n in nf4 wnf4; do
  rm -rf "$T/r$n"; mkdir -p "$T/r$n/checkpoints"; cp "$T/$n/checkpoints/step-00000002.h5" "$T/r$n/checkpoints/"
  sed "s|run_dir: $T/$n|run_dir: $T/r$n|" "$T/$n.yaml" >"$T/r$n.yaml"; cp "$T/$n.args" "$T/r$n.args"
done
run 3 rnf4
SHARDTUNE_Z3DEV_QLOAD=whole run 3 rwnf4
grep -q "resumed from step-00000002" "$T/rnf4.out" || fail "rnf4 did not resume: $(tail -3 "$T/rnf4.err")"
losses_equal "$T/rnf4/metrics.jsonl" "$T/rwnf4/metrics.jsonl" || fail "resume 2 -> 3: losses differ from the whole load's"
h5same "$T/rnf4/checkpoints/step-00000004.h5" "$T/rwnf4/checkpoints/step-00000004.h5" || fail "resume 2 -> 3: checkpoint differs"
echo "resume of the 2-rank run on 3 CPU ranks: losses and checkpoint bit-identical to the whole load's"

# a model whose fp32 embedding and head (16000 x 256 each, untied) outweigh the rest: peak RSS after loading lower
"$BIN" init-model --family llama --layers 2 --dim 256 --heads 4 --kv-heads 2 --vocab 16000 --max-seq 64 --seed 3 \
  --out "$T/wide" >/dev/null
same 2 wide "model.path=$T/wide"
load_rss wide

# a bf16 source (BF16 safetensors, torch_dtype bfloat16) under bf16
bf16_source "$T/model" "$T/model16"
same 3 src16 "model.path=$T/model16" precision=bf16 finetune.qlora.block=3

# a NaN in a quantized tensor: refused naming it (every element is checked by the rank that owns its code byte)
nan_model "$T/model" "$T/modelnan"
job qnan 2 2 1 sharding.stage=3 "${q[@]}" "model.path=$T/modelnan"
[ "$(train 3 qnan)" != 0 ] && grep -q "down_proj" "$T/qnan.err" ||
  fail "a NaN in a quantized tensor was not refused: $(tail -3 "$T/qnan.err")"
echo "a NaN in layers.1.mlp.down_proj refused by the sharded load: $(grep -m1 -o "[^:]*down_proj[^\"]*" "$T/qnan.err" | head -c 160)"
