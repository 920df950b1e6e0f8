#!/usr/bin/env bash
# test_distill_train.sh — `distill:` in train: the trainer runs the teacher and reports the combined loss.
# The loss formula and gradients are checked against torch in tests/reference/test_distill_torch.py; here:
#  * teacher = the student itself: step 1 has kd_loss ~ 0, ce_loss equal to a plain run's step-1 loss and
#    loss = (1 - alpha) * ce_loss;
#  * a GPT-2 teacher for a Llama student (another architecture and size), 1 and 2 ranks: every step
#    loss = alpha * kd_loss + (1 - alpha) * ce_loss, step 1's ce_loss equals the plain run's loss, teacher_ms
#    is reported; the loss falls;
#  * errors: another vocabulary, temperature 0, the cuda backend's absence of support is not tested here.
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
PY=${ST_PYTHON:-/usr/bin/python3}
SRC=${ST_SOURCE_DIR:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/student" >/dev/null
"$BIN" init-model --family gpt2 --layers 3 --dim 96 --heads 4 --vocab 128 --max-seq 64 --seed 5 \
  --out "$T/teacher" >/dev/null
"$BIN" init-model --family gpt2 --layers 1 --dim 32 --heads 2 --vocab 100 --max-seq 64 --out "$T/other" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/train.jsonl" --docs 200 --vocab 128 >/dev/null
"$BIN" data pack --jsonl "$T/train.jsonl" --out "$T/train.h5" --vocab 128 >/dev/null

job() { # job NAME [distill yaml line]
  {
    echo "model: { path: $T/student }"
    echo "run_dir: $T/$1"
    echo "seed: 7"
    echo "train: { steps: 4, micro_batch: 4, grad_accum: 1, seq_len: 32, lr: 3.0e-3, warmup_steps: 0 }"
    echo "tasks: [ { name: count, path: $T/train.h5 } ]"
    echo "eval: { every_steps: 0 }"
    echo "checkpoint: { every_steps: 0 }"
    echo "monitor: { publish: \"\", control: \"\" }"
    if [ $# -gt 1 ]; then echo "$2"; fi
  } > "$T/$1.yaml"
}
job plain
job self "distill: { teacher: $T/student, temperature: 2.0, alpha: 0.5 }"
job gpt2 "distill: { teacher: $T/teacher, temperature: 2.0, alpha: 0.7 }"
"$BIN" train "$T/plain.yaml" >/dev/null 2>"$T/plain.err" || fail "plain run: $(cat "$T/plain.err")"
"$BIN" train "$T/self.yaml" >/dev/null 2>"$T/self.err" || fail "self-distill run: $(cat "$T/self.err")"
"$BIN" train "$T/gpt2.yaml" >/dev/null 2>"$T/gpt2.err" || fail "gpt2-teacher run: $(cat "$T/gpt2.err")"
mpirun --oversubscribe -np 2 "$BIN" train "$T/gpt2.yaml" run_dir="$T/gpt2_2r" train.micro_batch=2 >/dev/null \
  2>"$T/gpt2_2r.err" || fail "2-rank run: $(cat "$T/gpt2_2r.err")"

"$PY" - "$T" <<'PYEOF' || fail "metrics check"
import json, sys
T = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{T}/{name}/metrics.jsonl")]
plain, me, g1, g2 = rows("plain"), rows("self"), rows("gpt2"), rows("gpt2_2r")
def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)
ok = True
def check(c, msg):
    global ok
    print(("ok   " if c else "FAIL ") + msg)
    ok &= bool(c)
check(abs(me[0]["kd_loss"]) < 1e-6, f"self teacher: step-1 kd_loss {me[0]['kd_loss']:.3g} ~ 0")
check(rel(me[0]["ce_loss"], plain[0]["loss"]) < 1e-6, f"self teacher: ce_loss {me[0]['ce_loss']} = plain {plain[0]['loss']}")
check(rel(me[0]["loss"], 0.5 * me[0]["ce_loss"]) < 1e-5, f"self teacher: loss {me[0]['loss']} = 0.5 ce")
check("ce_loss" not in plain[0] and "kd_loss" not in plain[0], "plain run has no KD fields")
for name, r in (("1 rank", g1), ("2 ranks", g2)):
    check(len(r) == 4, f"{name}: 4 steps")
    for x in r:
        want = 0.7 * x["kd_loss"] + 0.3 * x["ce_loss"]
        check(rel(x["loss"], want) < 1e-5, f"{name} step {x['step']}: loss {x['loss']:.6f} = 0.7 kd + 0.3 ce {want:.6f}")
        check(x["teacher_ms"] > 0, f"{name} step {x['step']}: teacher_ms {x['teacher_ms']}")
    check(rel(r[0]["ce_loss"], plain[0]["loss"]) < 1e-5, f"{name}: step-1 ce_loss = plain loss")
    check(r[-1]["loss"] < r[0]["loss"], f"{name}: loss falls {r[0]['loss']:.4f} -> {r[-1]['loss']:.4f}")
sys.exit(0 if ok else 1)
PYEOF

# user errors: one line naming the cause, non-zero exit
set +e
out=$("$BIN" train "$T/gpt2.yaml" run_dir="$T/e1" distill.teacher="$T/other" 2>&1); rc=$?
set -e
[ $rc -ne 0 ] && grep -q "vocabulary" <<<"$out" || fail "other vocabulary: rc $rc: $out"
set +e
out=$("$BIN" train "$T/gpt2.yaml" run_dir="$T/e2" distill.temperature=0 2>&1); rc=$?
set -e
[ $rc -ne 0 ] && grep -q "distill.temperature" <<<"$out" || fail "temperature 0: rc $rc: $out"
echo "ok"
