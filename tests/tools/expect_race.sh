#!/usr/bin/env bash
# expect_race.sh NP TOOL ARGS... — runs `mpirun -np NP TOOL ARGS...` (tests/tools/nccl_fake with a wait removed
# on purpose, e.g. SHARDTUNE_ZERO3_DEV_FAULT) and passes only when the fake NCCL's stream-order checker caught
# it: exit status 1 (violations) and its "stream order violated" message. Any other outcome fails: a run that
# passes means the checker missed the race; another status means it broke for another reason.
np=$1; shift
out=$(mpirun --oversubscribe -np "$np" "$@" 2>&1)
rc=$?
echo "$out" | grep -m3 "stream order violated"
echo "$out" | tail -2
[ "$rc" = 1 ] || { echo "expect_race: exit status $rc, not 1 (violations)"; exit 1; }
echo "$out" | grep -q "stream order violated" || { echo "expect_race: no violation reported"; exit 1; }
