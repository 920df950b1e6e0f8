#!/usr/bin/env bash
# test_ckpt_async.sh — checkpoint.async: the HDF5 write and commit run in the background.
#   1. async and sync runs (2 ranks, a save every 4 steps): bit-identical losses, and every checkpoint
#      holds the same datasets, values and root attributes (h5py; the job spec differs only in
#      checkpoint.async); metrics.jsonl has ckpt_blocked_ms on exactly the save steps.
#   2. With the write slowed down (test hook ST_TEST_CKPT_SLOW_MS: the ranks wait before the commit),
#      training goes on while step 8's write is in flight (steps after 8 are logged while its .partial
#      exists) and the blocked time is far below the hold; the sync run is blocked for at least the hold.
#   3. kill -9 during that background write: the previous checkpoint verifies, `latest` names it, and
#      auto-resume from it reproduces the uninterrupted run bit for bit.
#   4. SIGUSR1 while a background write is in flight: the stop waits for it, its own checkpoint is
#      committed, exit 85, no .partial left; resume continues bit-identically.
source "$(dirname "$0")/ckpt_lib.sh"
STEPS=12

# --- 1. async vs sync ---
job sync $STEPS 2 2 checkpoint.async=false
job async $STEPS 2 2 checkpoint.async=true
[ "$(train 2 sync)" = 0 ] || fail "sync run: $(cat $T/sync.err)"
[ "$(train 2 async)" = 0 ] || fail "async run: $(cat $T/async.err)"
losses $T/sync > $T/sync.loss; losses $T/async > $T/async.loss
[ "$(wc -l < $T/async.loss)" = $STEPS ] || fail "async run logged $(wc -l < $T/async.loss) steps"
cmp -s $T/sync.loss $T/async.loss || { diff $T/sync.loss $T/async.loss | head; fail "async changes the losses"; }
cmp -s $T/sync/final/model.safetensors $T/async/final/model.safetensors || fail "async changes the final weights"
"$PY" - "$T/sync" "$T/async" <<'EOF' || fail "async and sync checkpoints differ"
import h5py, json, numpy as np, os, sys
a_dir, b_dir = sys.argv[1], sys.argv[2]
names = sorted(n for n in os.listdir(a_dir + "/checkpoints") if n.endswith(".h5"))
assert names == ["step-00000004.h5", "step-00000008.h5", "step-00000012.h5"], names
assert names == sorted(n for n in os.listdir(b_dir + "/checkpoints") if n.endswith(".h5"))
for n in names:
    fa, fb = h5py.File(f"{a_dir}/checkpoints/{n}", "r"), h5py.File(f"{b_dir}/checkpoints/{n}", "r")
    ka, kb = [], []
    fa.visit(ka.append); fb.visit(kb.append)
    assert sorted(ka) == sorted(kb), (n, set(ka) ^ set(kb))
    count = 0
    for k in ka:
        if isinstance(fa[k], h5py.Dataset):
            x, y = fa[k][()], fb[k][()]
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x.view(np.uint32), y.view(np.uint32)), (n, k)
            count += 1
        assert sorted(fa[k].attrs) == sorted(fb[k].attrs), (n, k)
        for at in fa[k].attrs:
            assert np.array_equal(fa[k].attrs[at], fb[k].attrs[at]), (n, k, at)
    assert count > 10, count
    assert sorted(fa.attrs) == sorted(fb.attrs), n
    for at in fa.attrs:
        if at == "job_spec":
            ja, jb = json.loads(fa.attrs[at]), json.loads(fb.attrs[at])
            assert ja["checkpoint"].pop("async") is False and jb["checkpoint"].pop("async") is True
            ja.pop("run_dir"); jb.pop("run_dir"); ja["checkpoint"].pop("dir"); jb["checkpoint"].pop("dir")
            assert ja == jb, (n, at)
        else:
            assert np.array_equal(fa.attrs[at], fb.attrs[at]), (n, at)
print(f"ok: {len(names)} checkpoints, {count} datasets each, identical")
EOF
for run in sync async; do
  "$PY" - "$T/$run/metrics.jsonl" <<'EOF' || fail "$run: ckpt_blocked_ms rows"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
has = [r["step"] for r in rows if "ckpt_blocked_ms" in r]
assert has == [4, 8, 12], has
assert all(r["ckpt_blocked_ms"] >= 0 for r in rows if "ckpt_blocked_ms" in r)
EOF
done
grep -q "checkpoint: .*step-00000004.h5 (periodic, .* s, background)" $T/async.out || fail "no background save line: $(cat $T/async.out)"
echo "ok: async = sync (losses, final weights, checkpoint contents); ckpt_blocked_ms on save steps 4, 8, 12"

# --- 2. the write really is off the critical path ---
HOLD_MS=4000
LONG=120 # with saves every 8 steps each held HOLD_MS (the next save waits for it), it cannot end while we look
job ref $LONG 2 2 checkpoint.every_steps=0
[ "$(train 2 ref)" = 0 ] || fail "reference: $(cat $T/ref.err)"
losses $T/ref > $T/ref.loss
job slow $LONG 2 2 checkpoint.every_steps=8 checkpoint.keep_last=2
export ST_TEST_CKPT_SLOW_MS=$HOLD_MS
start 2 slow
wait_until 120 test -f "$T/slow/checkpoints/step-00000016.h5.partial" ||
  fail "no background write of step 16: $(cat $T/slow.err)"
# training goes on meanwhile: steps after 16 are logged while the write is still in flight
wait_until 60 "$PY" -c "import json,sys; r=[json.loads(l) for l in open('$T/slow/metrics.jsonl')]; sys.exit(0 if r[-1]['step'] >= 18 else 1)" ||
  fail "training did not go on during the background write"
test -f "$T/slow/checkpoints/step-00000016.h5.partial" || fail "the write ended before the check (hold too short?)"
# --- 3. kill -9 during the background write ---
kill9_all $MP
unset ST_TEST_CKPT_SLOW_MS
[ "$(cat $T/slow/checkpoints/latest)" = step-00000008.h5 ] || fail "latest: $(cat $T/slow/checkpoints/latest)"
"$BIN" ckpt verify "$T/slow/checkpoints/step-00000008.h5" >/dev/null || fail "previous checkpoint does not verify"
blocked=$("$PY" -c "import json; print([json.loads(l) for l in open('$T/slow/metrics.jsonl')][7]['ckpt_blocked_ms'])")
"$PY" -c "import sys; sys.exit(0 if $blocked < $HOLD_MS / 4 else 1)" || fail "async save blocked $blocked ms (hold $HOLD_MS)"
[ "$(train 2 slow)" = 0 ] || fail "resume after kill -9: $(cat $T/slow.err)"
grep -q "resumed from step-00000008.h5" $T/slow.out || fail "did not resume from step 8: $(cat $T/slow.out)"
losses $T/slow > $T/slow.loss
cmp -s $T/ref.loss $T/slow.loss || { diff $T/ref.loss $T/slow.loss | head; fail "kill -9 resume: losses differ"; }
echo "ok: training went on during the write (blocked $blocked ms of a $HOLD_MS ms hold); kill -9 mid-write left step 8 loadable; resume bit-identical"

# the synchronous save of the same job is blocked for the whole hold
job slowsync 8 2 2 checkpoint.every_steps=8 checkpoint.async=false
ST_TEST_CKPT_SLOW_MS=$HOLD_MS
export ST_TEST_CKPT_SLOW_MS
[ "$(train 2 slowsync)" = 0 ] || fail "sync slow run: $(cat $T/slowsync.err)"
unset ST_TEST_CKPT_SLOW_MS
sblocked=$("$PY" -c "import json; print([json.loads(l) for l in open('$T/slowsync/metrics.jsonl')][7]['ckpt_blocked_ms'])")
"$PY" -c "import sys; sys.exit(0 if $sblocked >= $HOLD_MS else 1)" || fail "sync save blocked only $sblocked ms"
echo "ok: the sync save blocked $sblocked ms"

# --- 4. a stop waits for the background write ---
job stop $LONG 2 2 checkpoint.every_steps=8 checkpoint.signal=USR1
export ST_TEST_CKPT_SLOW_MS=$HOLD_MS
start 2 stop
wait_until 120 test -f "$T/stop/checkpoints/step-00000008.h5.partial" || fail "no background write of step 8: $(cat $T/stop.err)"
kill -USR1 $(pgrep -P $MP)
set +e; wait $MP; rc=$?; set -e
unset ST_TEST_CKPT_SLOW_MS
[ $rc -eq 85 ] || fail "stop during a background write: exit $rc (want 85): $(cat $T/stop.err)"
at=$(sed -n 's/.*stopped at step \([0-9]*\).*/\1/p' $T/stop.out)
[ -n "$at" ] || fail "no stop line: $(cat $T/stop.out)"
ls $T/stop/checkpoints | grep -q partial && fail "a .partial was left: $(ls $T/stop/checkpoints)"
name=$(printf 'step-%08d.h5' "$at")
[ "$(cat $T/stop/checkpoints/latest)" = "$name" ] || fail "latest $(cat $T/stop/checkpoints/latest), stopped at $at"
for f in $T/stop/checkpoints/step-*.h5; do "$BIN" ckpt verify "$f" >/dev/null || fail "$f does not verify"; done
[ -f $T/stop/checkpoints/step-00000008.h5 ] || fail "the in-flight write of step 8 was not finished"
[ "$(train 2 stop)" = 0 ] || fail "resume after stop: $(cat $T/stop.err)"
losses $T/stop > $T/stop.loss
cmp -s $T/ref.loss $T/stop.loss || { diff $T/ref.loss $T/stop.loss | head; fail "stop resume: losses differ"; }
echo "ok: USR1 during a background write: it finished, the stop checkpoint (step $at) committed, exit 85, resume bit-identical"
echo PASS
