#!/usr/bin/env bash
# test_zero3_device_edges.sh — device ZeRO-3's edges (worker/comm_zero3_dev.c z3d_embed_rows, z3d_head_rows):
# an untied Llama embedding is never gathered whole (the batch's rows travel: each rank packs the pieces of
# every rank's rows its shard holds, one uneven all-gather), an untied head goes in vocabulary blocks (gathered
# one at a time into the base slots, the next prefetched), and the slots are sized for a layer, not for the
# table. Run by `shardtune train` on tests/tools/fakedev --guard (fake NCCL with stream-order checks).
# SHARDTUNE_HEAD_BLOCK_ROWS=48 (both sides) cuts the test model's 128-row head into 48 + 48 + 32: the CPU ranks'
# head then runs the same blocks (worker/model.c head_vblock: the same logits, dlnf summed block by block in
# the same order), so the device runs must equal the CPU ranks' stage 3 bit for bit:
#  1. full fp32 and bf16 with activation checkpointing, LoRA, QLoRA (NF4), on 2 ranks: losses and final/
#     bit-identical; full and LoRA on 3 ranks within 1e-6 (NCCL and MPI may associate a sum of three
#     differently); GPT-2 and Llama with tied embeddings (the table gathered whole, as before) bit-identical;
#     blocks on the device only (SHARDTUNE_ZERO3_DEV_HEAD_ROWS=48, fp32: the CPU ranks' head one product, dlnf's
#     sum over the vocabulary then reassociated) within 1e-6, 2 ranks;
#  2. the old path (SHARDTUNE_ZERO3_DEV_EDGES=whole: the embedding and head gathered whole) gives the same
#     losses and final/ as the rows and blocks, and holds more device memory: the plan is true for both
#     (1%), QLoRA on 2 ranks;
#  3. a 2-rank device checkpoint at step 3 resumed on 3 device ranks: steps 4-6 within 1e-6;
#  4. the head's loss with blocks outermost (worker/model.c head_outer): 3 row chunks of 16 rows
#     (SHARDTUNE_HEAD_CHUNK_ROWS) x the 3 head blocks; the CPU ranks run the same loops (SHARDTUNE_HEAD_OUTER=1):
#     fp32 and bf16 bit-identical; each head block gathered exactly twice per micro-batch (the fake device's
#     count of z3d_head_rows gathers), where the row-chunk loop (SHARDTUNE_HEAD_OUTER=0) gathers it twice per
#     row chunk (6 times), its losses within 1e-6 of the blocks-outermost ones (the online softmax's rescaling:
#     a few float roundings per row).
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"

"$BIN" init-model --family gpt2 --layers 2 --dim 64 --heads 4 --vocab 128 --max-seq 64 --seed 3 --out "$T/gpt2" >/dev/null
"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 --tied \
  --out "$T/tied" >/dev/null
q=(finetune.mode=qlora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
export SHARDTUNE_HEAD_BLOCK_ROWS=48

cmp_cpu 2 full 0
cmp_cpu 2 bf 0 precision=bf16 memory.activation_checkpointing=true
cmp_cpu_adapter 2 lora 0 finetune.mode=lora
cmp_cpu 3 full3 1e-6
cmp_cpu_adapter 3 lora3 1e-6 finetune.mode=lora
cmp_cpu 2 gpt2 0 "model.path=$T/gpt2"
# blocks on the device only (fp32, the CPU ranks' head one product): dlnf sums its 128 vocabulary terms in three
# partial sums instead of one, a reassociation of the same kind as a sum over three ranks: within 1e-6
unset SHARDTUNE_HEAD_BLOCK_ROWS
export SHARDTUNE_ZERO3_DEV_HEAD_ROWS=48
cmp_cpu 2 devblk 1e-6
unset SHARDTUNE_ZERO3_DEV_HEAD_ROWS
export SHARDTUNE_HEAD_BLOCK_ROWS=48
cmp_cpu 2 tied 0 "model.path=$T/tied"

# QLoRA: rows and blocks vs the whole tables (the old path), and vs the CPU ranks
export FAKEDEV_REPORT_MEM=1
cmp_cpu_adapter 2 qz 0 "${q[@]}"
p=$(plan_true 2 qz) || fail "qlora 2 ranks: the plan is not the device memory held"
job qw 6 3 2 sharding.stage=3 "${common[@]}" "${q[@]}"
export SHARDTUNE_ZERO3_DEV_EDGES=whole
dev 2 qw
close "$T/qw/metrics.jsonl" "$T/qz/metrics.jsonl" 0 1 6 >/dev/null || fail "qlora: whole edges vs rows and blocks differ"
diff -r "$T/qw/final" "$T/qz/final" >/dev/null || fail "qlora: final/ with whole edges differs"
w=$(plan_true 2 qw) || fail "qlora whole edges: the plan is not the device memory held"
unset SHARDTUNE_ZERO3_DEV_EDGES
unset FAKEDEV_REPORT_MEM
python3 - "$T/qz.out" "$T/qw.out" <<'PY' || fail "rows and blocks do not hold less device memory"
import re, sys
held = lambda f: {int(m.group(1)): int(m.group(2)) for m in
                  re.finditer(r"fakedev device bytes: rank (\d+) peak \d+ between steps (\d+)", open(f).read())}
a, b = held(sys.argv[1]), held(sys.argv[2])
assert all(a[r] < b[r] for r in a), (a, b)
print(f"  rows and blocks hold {b[0] - a[0]} device bytes less per rank than the whole tables")
PY
echo "qlora on 2 fake device ranks: whole edges (the old path) equal bit for bit; plan vs held $p (rows, blocks), $w (whole)"

job k 6 3 2 sharding.stage=3 checkpoint.every_steps=3 train.schedule=constant
dev 2 k
ck="$T/k/checkpoints/step-00000003.h5"
[ -f "$ck" ] || fail "no checkpoint at step 3: $(ls "$T/k/checkpoints")"
job r3 6 2 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
dev 3 r3
a=$(close "$T/r3/metrics.jsonl" "$T/k/metrics.jsonl" 1e-6 4 6) || fail "resumed on 3 device ranks: steps 4-6 differ"
echo "device stage-3 checkpoint (2 ranks, step 3) resumed on 3 device ranks: steps 4-6 within $a (1e-6)"

# --- 4. blocks outermost: 3 row chunks x 3 head blocks (48 + 48 + 32 rows) ---
export SHARDTUNE_HEAD_CHUNK_ROWS=16 SHARDTUNE_HEAD_OUTER=1 FAKEDEV_REPORT_MEM=1
cmp_cpu 2 outer 0
cmp_cpu 2 outerbf 0 precision=bf16 memory.activation_checkpointing=true
# gathers GATHERS_PER_PASS NAME...: every rank gathered its head blocks GATHERS_PER_PASS times per head pass
gathers() {
  python3 - "$@" <<'PY'
import re, sys
per, names = int(sys.argv[1]), sys.argv[2:]
for n in names:
    seen = [(int(g), int(p)) for g, p in re.findall(r"head blocks gathered (\d+) in (\d+) head passes", open(n).read())]
    assert len(seen) == 2 and all(p > 0 and g == per * p for g, p in seen), (n, per, seen)
print(" ".join(f"{g}/{p}" for n in names for g, p in
               re.findall(r"head blocks gathered (\d+) in (\d+) head passes", open(n).read())))
PY
}
g=$(gathers 6 "$T/outer.out" "$T/outerbf.out") || fail "blocks outermost: a head block not gathered exactly twice per micro-batch"
unset SHARDTUNE_HEAD_OUTER # the default: a head by blocks in several chunks runs blocks outermost
job dflt 6 3 2 sharding.stage=3 "${common[@]}"
dev 2 dflt
gathers 6 "$T/dflt.out" >/dev/null || fail "by default a head block is not gathered exactly twice per micro-batch"
diff -r "$T/dflt/final" "$T/outer/final" >/dev/null || fail "blocks outermost by default: final/ differs from the forced run's"
export SHARDTUNE_HEAD_OUTER=0
job rowloop 6 3 2 sharding.stage=3 "${common[@]}"
dev 2 rowloop
r=$(gathers 18 "$T/rowloop.out") || fail "the row-chunk loop: not 6 gathers per head block per micro-batch"
a=$(close "$T/rowloop/metrics.jsonl" "$T/outer/metrics.jsonl" 1e-6 1 6) || fail "row-chunk loop vs blocks outermost"
unset SHARDTUNE_HEAD_CHUNK_ROWS SHARDTUNE_HEAD_OUTER FAKEDEV_REPORT_MEM
echo "blocks outermost: head gathers/passes per rank $g (2 per block; also by default), the row-chunk loop $r (6 per block); losses within $a"
