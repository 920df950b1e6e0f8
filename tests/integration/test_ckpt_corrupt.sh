#!/usr/bin/env bash
# test_ckpt_corrupt.sh — damaged checkpoints are detected and auto-resume falls back.
#   bit flip inside a tensor's data: `ckpt verify` exits 1 naming that tensor; auto-resume warns in one
#   line naming the file and resumes from the previous checkpoint, ending with the uninterrupted loss.
#   truncated latest: `ckpt verify` fails naming the file; auto-resume falls back again.
#   Also: `ckpt inspect` shows step and world size; verify of a good file prints "ok: N tensors".
#   Legacy layout (files written before 2026-12-06: chunked + Fletcher32): the same file rewritten so by
#   h5py still verifies, a flipped byte in it is still caught naming the tensor, and a run resumes from it.
source "$(dirname "$0")/ckpt_lib.sh"
job run 12 2 1 train.schedule=constant
job ref 16 2 1 train.schedule=constant; [ "$(train 2 ref)" = 0 ] || fail "reference: $(cat $T/ref.err)"
[ "$(train 2 run)" = 0 ] || fail "first run: $(cat $T/run.err)"
C=$T/run/checkpoints
out=$("$BIN" ckpt verify $C/step-00000012.h5) || fail "verify of a good file: $out"
[[ "$out" =~ ^ok:\ [0-9]+\ tensors$ ]] || fail "verify output: $out"
ins=$("$BIN" ckpt inspect $C)
grep -q "^world_size  2" <<<"$ins" || fail "inspect: world size: $ins"
grep -q "^step        12" <<<"$ins" || fail "inspect: latest is not step 12: $ins"

# flip one byte in the middle of a model tensor's data (its first chunk in a chunked file)
TENSOR=model/model.layers.1.self_attn.o_proj.weight
flip() {
  "$PY" - "$1" $TENSOR <<'PYEOF'
import h5py, sys
with h5py.File(sys.argv[1], "r") as f:
    d = f[sys.argv[2]]
    if d.chunks:
        info = d.id.get_chunk_info(0)
        off = info.byte_offset + info.size // 2
    else:
        off = d.id.get_offset() + d.id.get_storage_size() // 2
with open(sys.argv[1], "r+b") as g:
    g.seek(off); b = g.read(1); g.seek(off); g.write(bytes([b[0] ^ 0x10]))
PYEOF
}
flipped_fails() { # FILE: verify exits 1 with one line naming $TENSOR
  set +e; out=$("$BIN" ckpt verify "$1" 2>&1); rc=$?; set -e
  [ $rc -eq 1 ] || fail "verify of a flipped file: exit $rc"
  [ "$(echo "$out" | wc -l)" -eq 1 ] || fail "verify: more than one line: $out"
  echo "$out" | grep -q "$TENSOR" || fail "verify does not name $TENSOR: $out"
}

# the legacy layout: every dataset chunked (whole rows, ~1 MB) with Fletcher32, attributes as they are
"$PY" - $C/step-00000012.h5 $T/legacy.h5 <<'PYEOF'
import h5py, sys
with h5py.File(sys.argv[1], "r") as f, h5py.File(sys.argv[2], "w") as g:
    for k, v in f.attrs.items():
        g.attrs.create(k, v, dtype=f.attrs.get_id(k).dtype)
    def copy(name, obj):
        if isinstance(obj, h5py.Group):
            g.require_group(name)
        else:
            rows = max(1, min(obj.shape[0], (1 << 18) // max(1, obj.size // obj.shape[0])))
            d = g.create_dataset(name, data=obj[...], chunks=(rows,) + obj.shape[1:], fletcher32=True)
        for k, v in obj.attrs.items():
            g[name].attrs.create(k, v, dtype=obj.attrs.get_id(k).dtype)
    f.visititems(copy)
    assert g["model/model.layers.1.self_attn.o_proj.weight"].id.get_create_plist().get_filter(0)[0] == h5py.h5z.FILTER_FLETCHER32
PYEOF
out=$("$BIN" ckpt verify $T/legacy.h5) || fail "verify of a legacy (chunked, Fletcher32) file: $out"
[[ "$out" =~ ^ok:\ [0-9]+\ tensors$ ]] || fail "verify output (legacy): $out"
mkdir -p $T/legacy && cp $T/legacy.h5 $T/legacy/step-00000012.h5
job legacy 13 2 1 train.schedule=constant resume=$T/legacy/step-00000012.h5
[ "$(train 2 legacy)" = 0 ] || fail "resume from a legacy file: $(cat $T/legacy.err)"
grep -q "resumed from step-00000012.h5 at step 12" $T/legacy.out || fail "did not resume from the legacy file: $(cat $T/legacy.out)"
flip $T/legacy.h5; flipped_fails $T/legacy.h5
echo "ok: legacy layout verifies, resumes, and its flipped byte is found: $out"

flip $C/step-00000012.h5; flipped_fails $C/step-00000012.h5
echo "ok: bit flip found: $out"
[ "$(train 2 run train.steps=16)" = 0 ] || fail "resume past a flipped checkpoint: $(cat $T/run.err)"
grep -q "warning: checkpoint $C/step-00000012.h5 is unusable.*$TENSOR.*falling back to step-00000008.h5" $T/run.err ||
  fail "no fallback warning: $(cat $T/run.err)"
grep -q "resumed from step-00000008.h5 at step 8" $T/run.out || fail "did not resume from step 8"
losses $T/ref > $T/ref.loss; losses $T/run > $T/run.loss
cmp -s $T/ref.loss $T/run.loss || fail "losses after fallback differ from the uninterrupted run"
echo "ok: auto-resume fell back to step 8 and matched the uninterrupted run"

# truncate the newest (step 16) to half its size
f=$C/step-00000016.h5; truncate -s $(( $(stat -c %s $f) / 2 )) $f
set +e; out=$("$BIN" ckpt verify $f 2>&1); rc=$?; set -e
[ $rc -eq 1 ] && echo "$out" | grep -q "step-00000016.h5" || fail "verify of a truncated file: rc $rc: $out"
echo "ok: truncation found: $out"
: > $T/run.err
[ "$(train 2 run train.steps=20)" = 0 ] || fail "resume past a truncated checkpoint: $(cat $T/run.err)"
grep -q "warning: checkpoint $C/step-00000016.h5 is unusable" $T/run.err || fail "no truncation warning: $(cat $T/run.err)"
[ "$(grep -c warning: $T/run.err)" -eq 1 ] || fail "expected one warning (step 12 was rewritten intact): $(cat $T/run.err)"
grep -q "resumed from step-00000012.h5 at step 12" $T/run.out || fail "did not fall back to step 12"
echo PASS
