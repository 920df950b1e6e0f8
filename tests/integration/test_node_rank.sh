#!/usr/bin/env bash
# test_node_rank.sh — the node-local rank the trainer uses to pick its GPU (st_comm_node_rank, MPI's
# shared-memory grouping) agrees with Open MPI's own OMPI_COMM_WORLD_LOCAL_RANK on 3 ranks of one host:
# every rank sees 3 ranks on its node and the local ranks are 0, 1, 2, one each.
set -euo pipefail
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=$(mpirun --oversubscribe -np 3 "${ST_BUILD_DIR:?}/node_rank")
echo "$out"
[ "$(echo "$out" | wc -l)" = 3 ] || { echo "FAIL: expected 3 lines"; exit 1; }
echo "$out" | awk '$2 != $4 || $3 != 3 { bad = 1 } END { exit bad }' || { echo "FAIL: node-local rank disagrees with OMPI_COMM_WORLD_LOCAL_RANK"; exit 1; }
[ "$(echo "$out" | awk '{print $2}' | sort -n | tr '\n' ' ')" = "0 1 2 " ] || { echo "FAIL: local ranks are not 0 1 2"; exit 1; }
echo "ok: node-local ranks 0 1 2 of 3, as Open MPI says"
