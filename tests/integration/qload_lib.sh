# qload_lib.sh — shared by the sharded QLoRA load's tests (test_zero3_device_qload.sh on fakedev,
# test_zero3_qload.sh on CPU ranks): `h5same` (two checkpoints hold the same datasets and attributes), `cuts`
# (a shard edge inside a tensor's codes mid-block and another inside its scales), `bf16_source` (a BF16 copy of
# a model directory), `nan_model` (a copy with a NaN in layers.1.mlp.down_proj), `same` (a job with the sharded
# load and with the whole one, bit for bit), `load_rss`. Sourced after ckpt_lib.sh; the test sets `q` (the
# QLoRA overrides), `qrun` (NP NAME: runs a job, failing the test on an error) and `qwhere` (the ranks, in words).

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

# cuts UNIT QUANT DQ BLOCK NP: in the blob's layout of $T/model (worker/qlora.c tensor_bytes, registry order)
# sharded in UNIT-byte units (4: a device's words, comm_zero3_dev.c; 1: CPU ranks' bytes, comm.c) a rank's edge
# lies inside a tensor's codes mid-block and another inside a tensor's scales (the cases are chosen so)
cuts() {
  "$PY" - "$T/model" "$@" <<'PY' || fail "$* does not cut a block and the scales"
import json, struct, sys
d, unit, quant, dq, block, world = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
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
shard = (at // unit + world - 1) // world
mid_block = in_scales = 0
for r in range(1, world):
    edge = unit * shard * r
    for t0, cb, b in tens:
        if t0 < edge < t0 + b:
            x = edge - t0
            mid_block |= x < cb and (per * x) % block != 0
            in_scales |= x >= cb
assert mid_block and in_scales, (mid_block, in_scales, shard, at)
PY
}

# bf16_source SRC DST: DST a copy of model directory SRC with BF16 safetensors (round to nearest even) and
# torch_dtype bfloat16
bf16_source() {
  "$PY" - "$1" "$2" <<'PY'
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
}

# nan_model SRC DST: DST a copy of model directory SRC with a NaN at element 777 of layers.1.mlp.down_proj
nan_model() {
  cp -r "$1" "$2"
  "$PY" - "$2/model.safetensors" <<'PY'
import json, struct, sys
p = sys.argv[1]; raw = bytearray(open(p, "rb").read())
n = struct.unpack("<Q", raw[:8])[0]; e = json.loads(raw[8:8 + n])["model.layers.1.mlp.down_proj.weight"]
at = 8 + n + e["data_offsets"][0] + 4 * 777
raw[at:at + 4] = struct.pack("<f", float("nan")); open(p, "wb").write(raw)
PY
}

# load_rss NAME: each rank's peak RSS after loading (SHARDTUNE_REPORT_LOAD_RSS) is lower in $T/NAME.err (the
# sharded load) than in $T/wNAME.err (the whole one)
load_rss() {
  "$PY" - "$T/$1.err" "$T/w$1.err" <<'PY' || fail "$1: peak RSS at load"
import re, sys
rss = lambda f: {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"rank (\d+): peak RSS after loading the model: (\d+) kB", open(f).read())}
new, old = rss(sys.argv[1]), rss(sys.argv[2])
assert new and set(new) == set(old), (new, old)
for r in new:
    assert new[r] < old[r], f"rank {r}: peak RSS after loading {new[r]} kB sharded, {old[r]} kB whole"
print(f"  peak RSS after loading, rank 0: {new[0]} kB sharded vs {old[0]} kB whole ({len(new)} ranks)")
PY
}

# losses_equal A.jsonl B.jsonl: every step's loss is the same float
losses_equal() {
  "$PY" - "$@" <<'PY'
import json, sys
ls = lambda p: {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if '"loss"' in l and '"step"' in l}
a, b = ls(sys.argv[1]), ls(sys.argv[2])
assert a and a == b, (a, b)
PY
}

# same NP NAME [overrides]: job NAME with the sharded load and wNAME with the whole one (SHARDTUNE_Z3DEV_QLOAD=whole)
# on NP ranks (qrun): losses, final/, every checkpoint and `export --merge` of the last one bit-identical
same() {
  local np=$1 name=$2 ck; shift 2
  job "$name" 4 2 1 sharding.stage=3 checkpoint.every_steps=2 train.schedule=constant "${q[@]}" "$@"
  job "w$name" 4 2 1 sharding.stage=3 checkpoint.every_steps=2 train.schedule=constant "${q[@]}" "$@"
  SHARDTUNE_REPORT_LOAD_RSS=1 "$qrun" "$np" "$name"
  SHARDTUNE_REPORT_LOAD_RSS=1 SHARDTUNE_Z3DEV_QLOAD=whole "$qrun" "$np" "w$name"
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
  echo "$name on $np $qwhere: losses, checkpoints (base checksum included), final/, export --merge bit-identical to the whole load"
}

# qload_cases UNIT: the cases every backend runs (UNIT: its shards' unit in bytes, for `cuts`): NF4 + double
# quantization on 2 ranks; on 3 ranks with block 3 (a rank's edge inside a tensor's codes mid-block, another
# inside its double-quantized scales), NF4's fp32 scales and int8 under bf16 cut the same way; DoRA; a model whose
# fp32 embedding and head (16000 x 256 each, untied) outweigh the rest (peak RSS after loading lower sharded); a
# bf16 source (BF16 safetensors, torch_dtype bfloat16) under bf16 on 3 ranks
qload_cases() {
  same 2 nf4
  cuts "$1" nf4 1 3 3
  same 3 nf4b3 finetune.qlora.block=3
  cuts "$1" nf4 0 7 3
  same 3 nf4nodq finetune.qlora.block=7 finetune.qlora.double_quant=false
  cuts "$1" int8 0 5 3
  same 3 i8bf finetune.qlora.quant=int8 finetune.qlora.double_quant=false finetune.qlora.block=5 precision=bf16
  same 2 dora finetune.lora.dora=true finetune.qlora.block=48
  "$BIN" init-model --family llama --layers 2 --dim 256 --heads 4 --kv-heads 2 --vocab 16000 --max-seq 64 --seed 3 \
    --out "$T/wide" >/dev/null
  same 2 wide "model.path=$T/wide"
  load_rss wide
  bf16_source "$T/model" "$T/model16"
  same 3 src16 "model.path=$T/model16" precision=bf16 finetune.qlora.block=3
}
