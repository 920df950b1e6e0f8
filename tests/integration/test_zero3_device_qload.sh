#!/usr/bin/env bash
# test_zero3_device_qload.sh — QLoRA's sharded load at sharding.stage 3 on a device backend
# (coordinator/trainer/train_qload.c: each rank quantizes only its 4-byte words of the codes, reading only the
# blocks they depend on, and reads only its parts of the kept base) against the whole load it replaced
# (SHARDTUNE_Z3DEV_QLOAD=whole: train.c load_quantized quantizes the whole base on every rank, then the
# communicator cuts it), both `shardtune train` on tests/tools/fakedev --guard with the same ranks and job:
# the losses, every checkpoint (each dataset and attribute, base_checksum and adapter_base_checksum included,
# but job_spec), final/ and `export --merge` of the last checkpoint are bit-identical; on a model whose fp32
# embedding and head dominate, each rank's peak RSS after loading (fakedev's device memory included) is lower.
# Cases: NF4 + double
# quantization (fp32) on 2 ranks; on 3 ranks with block 3 (uneven shards: a rank's edge inside a tensor's
# codes, mid-block, and another inside the double-quantized scales: checked from the layout, `cuts`), NF4's
# fp32 scales and int8 without double quantization under bf16 cut the same way; DoRA (magnitudes from the gathered codes);
# the unfused path (SHARDTUNE_QLORA_FUSED=0); a bf16 source (BF16 safetensors) under bf16 on 3 ranks. A model
# file with a NaN in a quantized tensor is refused naming it.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"

q=(finetune.mode=qlora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")

# h5same A B: two checkpoints hold the same datasets and attributes (job_spec names the run_dir)
h5same() {
  "$PY" - "$SRC/tests/reference" "$1" "$2" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from dp_common import h5_items
a, b = h5_items(sys.argv[2]), h5_items(sys.argv[3])
a.pop("@job_spec", None)
b.pop("@job_spec", None)
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
bad = [k for k in a if a[k] != b[k]]
assert not bad, f"differ: {bad[:5]}"
assert "@base_checksum" in a, sorted(a)[:10]
PY
}

# load_rss NAME: each rank's peak RSS after loading (SHARDTUNE_REPORT_LOAD_RSS; fakedev's device memory is host
# memory, so it counts both) is lower with the sharded load than with the whole one (a model whose whole base
# outweighs the rest of the load)
load_rss() {
  "$PY" - "$T/$1.err" "$T/w$1.err" <<'PY' || fail "$1: peak RSS at load"
import re, sys
rss = lambda f: {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"rank (\d+): peak RSS after loading the model: (\d+) kB", open(f).read())}
new, old = rss(sys.argv[1]), rss(sys.argv[2])
assert new and set(new) == set(old), (new, old)
for r in new:
    assert new[r] < old[r], f"rank {r}: peak RSS after loading {new[r]} kB sharded, {old[r]} kB whole"
print(f"  peak RSS after loading, rank 0: {new[0]} kB sharded vs {old[0]} kB whole")
PY
}

# same NP NAME [overrides]: job NAME with the sharded load and wNAME with the whole one, on NP fake device ranks
same() {
  local np=$1 name=$2 ck; shift 2
  job "$name" 4 2 1 sharding.stage=3 checkpoint.every_steps=2 train.schedule=constant "${q[@]}" "$@"
  job "w$name" 4 2 1 sharding.stage=3 checkpoint.every_steps=2 train.schedule=constant "${q[@]}" "$@"
  SHARDTUNE_REPORT_LOAD_RSS=1 dev "$np" "$name"
  SHARDTUNE_REPORT_LOAD_RSS=1 SHARDTUNE_Z3DEV_QLOAD=whole dev "$np" "w$name"
  close "$T/$name/metrics.jsonl" "$T/w$name/metrics.jsonl" 0 1 4 >/dev/null || fail "$name ($np ranks): losses differ from the whole load's"
  diff -r "$T/$name/final" "$T/w$name/final" >/dev/null || fail "$name: final/ differs from the whole load's"
  for ck in step-00000002.h5 step-00000004.h5; do
    [ -f "$T/$name/checkpoints/$ck" ] || fail "$name: no checkpoint $ck: $(ls "$T/$name/checkpoints")"
    h5same "$T/$name/checkpoints/$ck" "$T/w$name/checkpoints/$ck" || fail "$name: checkpoint $ck differs from the whole load's"
  done
  "$BIN" export "$T/$name/checkpoints" --merge --out "$T/$name/merged" >/dev/null 2>>"$T/$name.err" &&
    "$BIN" export "$T/w$name/checkpoints" --merge --out "$T/w$name/merged" >/dev/null 2>>"$T/$name.err" ||
    fail "$name: export --merge: $(tail -3 "$T/$name.err")"
  cmp -s "$T/$name/merged/model.safetensors" "$T/w$name/merged/model.safetensors" || fail "$name: export --merge differs"
  echo "$name on $np fake device ranks: losses, checkpoints (base checksum included), final/, export --merge bit-identical to the whole load"
}

# cuts QUANT DQ BLOCK NP: in the blob's layout (worker/qlora.c tensor_bytes, registry order) a rank's edge lies
# inside a tensor's codes mid-block and another inside a tensor's scales (the cases below are chosen so)
cuts() {
  "$PY" - "$T/model" "$@" <<'PY' || fail "$* does not cut a block and the scales"
import json, struct, sys
d, quant, dq, block, world = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
raw = open(d + "/model.safetensors", "rb").read()
head = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
a4 = lambda x: (x + 3) // 4 * 4
names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
per = 2 if quant == "nf4" else 1  # elements per code byte
tens, at = [], 0
for l in range(2):
    for n in names:
        shp = head[f"model.layers.{l}.{n}.weight"]["shape"]
        e = shp[0] * shp[1]; ns = (e + block - 1) // block; cb = a4((e + per - 1) // per)
        b = cb + (a4(ns) + (ns + 255) // 256 * 4 if dq else 4 * ns)
        tens.append((at, cb, b)); at += b
shard = (at // 4 + world - 1) // world
mid_block = in_scales = 0
for r in range(1, world):
    edge = 4 * shard * r
    for t0, cb, b in tens:
        if t0 < edge < t0 + b:
            x = edge - t0
            mid_block |= x < cb and (per * x) % block != 0
            in_scales |= x >= cb
assert mid_block and in_scales, (mid_block, in_scales, shard, at)
PY
}

same 2 nf4
cuts nf4 1 3 3
same 3 nf4b3 finetune.qlora.block=3
cuts nf4 0 7 3
same 3 nf4nodq finetune.qlora.block=7 finetune.qlora.double_quant=false
cuts int8 0 5 3
same 3 i8bf finetune.qlora.quant=int8 finetune.qlora.double_quant=false finetune.qlora.block=5 precision=bf16
same 2 dora finetune.lora.dora=true finetune.qlora.block=48
SHARDTUNE_QLORA_FUSED=0 same 2 unf finetune.qlora.block=48

# a model whose fp32 embedding and head (16000 x 256 each, untied) outweigh the rest: the whole load's peak RSS
# is above the sharded one's
"$BIN" init-model --family llama --layers 2 --dim 256 --heads 4 --kv-heads 2 --vocab 16000 --max-seq 64 --seed 3 \
  --out "$T/wide" >/dev/null
same 2 wide "model.path=$T/wide"
load_rss wide

# a bf16 source (BF16 safetensors, torch_dtype bfloat16) under bf16
"$PY" - "$T/model" "$T/model16" <<'PY'
import json, os, shutil, struct, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst)
raw = open(src + "/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
head = json.loads(raw[8:8 + n]); meta = head.pop("__metadata__", None)
out, blobs, at = {}, [], 0
for name, e in sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    a, b = e["data_offsets"]
    u = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<u4").astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    out[name] = {"dtype": "BF16", "shape": e["shape"], "data_offsets": [at, at + len(r)]}
    blobs.append(r); at += len(r)
if meta is not None:
    out["__metadata__"] = meta
h = json.dumps(out).encode(); h += b" " * (-len(h) % 8)
open(dst + "/model.safetensors", "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
cfg = json.load(open(dst + "/config.json")); cfg.pop("dtype", None); cfg["torch_dtype"] = "bfloat16"
json.dump(cfg, open(dst + "/config.json", "w"))
PY
same 3 src16 "model.path=$T/model16" precision=bf16 finetune.qlora.block=3

# a NaN in a quantized tensor: refused naming it (every element is checked by the rank that owns its code byte)
cp -r "$T/model" "$T/modelnan"
"$PY" - "$T/modelnan/model.safetensors" <<'PY'
import json, struct, sys
p = sys.argv[1]; raw = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", raw[:8])[0]; e = json.loads(raw[8:8 + n])["model.layers.1.mlp.down_proj.weight"]
at = 8 + n + e["data_offsets"][0] + 4 * 777
raw[at:at + 4] = struct.pack("<f", float("nan")); open(p, "wb").write(raw)
PY
job qnan 2 2 1 sharding.stage=3 "${common[@]}" "${q[@]}" "model.path=$T/modelnan"
args=(); mapfile -t args < <(grep . "$T/qnan.args")
set +e
mpirun --oversubscribe -np 3 "$FAKE" --guard "$T/qnan.yaml" "${args[@]}" >"$T/qnan.out" 2>"$T/qnan.err"
rc=$?
set -e
[ $rc != 0 ] && grep -q "down_proj" "$T/qnan.err" || fail "a NaN in a quantized tensor was not refused (rc $rc): $(tail -3 "$T/qnan.err")"
echo "a NaN in layers.1.mlp.down_proj refused by the sharded load: $(grep -m1 -o "[^:]*down_proj[^\"]*" "$T/qnan.err" | head -c 160)"
