#!/usr/bin/env bash
# gen_gpu_check.sh — on a GPU machine: `shardtune generate --backend cuda` against `--backend cpu` (greedy,
# Llama with GQA and GPT-2, prompts of 5..120 tokens, 64 new, batch 3). Prints, per model, how many tokens
# agree before the first difference and the largest logit difference relative to the logit scale over the
# agreeing steps (both runs dump the logits each token was chosen from); exits 1 when the relative logit
# difference exceeds 1e-4 or the outputs differ where the CPU's top two logits are more than 1e-3 apart.
#   bench/gen_gpu_check.sh [BUILD_DIR]      (default build-cuda)
# GEN_CHECK_BACKEND=cpu runs the "GPU" side on the CPU too (a self-check of this script without a GPU).
set -euo pipefail
BUILD=${1:-build-cuda}
BIN="$BUILD/shardtune"
SIDE=${GEN_CHECK_BACKEND:-cuda}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$BIN" init-model --family llama --layers 2 --dim 128 --heads 8 --kv-heads 2 --ffn 256 --vocab 512 --max-seq 256 \
    --seed 3 --out "$TMP/llama" >/dev/null
"$BIN" init-model --family gpt2 --layers 2 --dim 128 --heads 4 --vocab 512 --max-seq 256 --seed 4 --out "$TMP/gpt2" >/dev/null
python3 - "$TMP/p.jsonl" <<'PY'
import json, random, sys
random.seed(2)
with open(sys.argv[1], "w") as f:
    for n in (5, 40, 120, 17):
        f.write(json.dumps({"input_ids": [random.randrange(512) for _ in range(n)]}) + "\n")
PY
status=0
for m in llama gpt2; do
  for be in cpu gpu; do
    backend=cpu; [ "$be" = gpu ] && backend=$SIDE
    "$BIN" generate --model "$TMP/$m" --prompts "$TMP/p.jsonl" --out "$TMP/$m.$be.jsonl" --max-new 64 --batch 3 \
        --backend "$backend" --dump-logits "$TMP/$m.$be.bin" 2>/dev/null
  done
  /usr/bin/python3 - "$TMP/$m" 512 "$m" <<'PY' || status=1
import json, sys
import numpy as np
base, V, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
outs = {b: [json.loads(l)["output_ids"] for l in open(f"{base}.{b}.jsonl")] for b in ("cpu", "gpu")}
logits = {b: np.fromfile(f"{base}.{b}.bin", dtype=np.float32) for b in ("cpu", "gpu")}
oc = og = 0
agree, worst, bad = 0, 0.0, False
for a, b in zip(outs["cpu"], outs["gpu"]):
    la = logits["cpu"][oc:oc + len(a) * V].reshape(-1, V)
    lb = logits["gpu"][og:og + len(b) * V].reshape(-1, V)
    oc += len(a) * V
    og += len(b) * V
    for k in range(min(len(a), len(b))):
        scale = np.abs(la[k]).max()
        worst = max(worst, np.abs(la[k] - lb[k]).max() / scale)
        if a[k] != b[k]:
            top = np.sort(la[k])[-2:]
            bad |= (top[1] - top[0]) / scale > 1e-3
            break
        agree += 1
ok = worst <= 1e-4 and not bad
print(f"{name}: {agree} tokens agree, max relative logit difference {worst:.2e} {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
done
exit $status
