#!/usr/bin/env bash
# The PyPI PyTorch + transformers that bench/cpu_train measures against (benchmarks only).
#   bench/torch_venv.sh --dir    prints the virtual environment's folder
#   bench/torch_venv.sh          creates it if missing (a few minutes, ~5 GB), then prints its python
# Kept outside the clone, keyed by the hash of bench/requirements-bench.txt, so reruns skip the install.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
req=$here/requirements-bench.txt
hash=$(sha256sum "$req" | cut -c1-12)
dir=${SHARDTUNE_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/shardtune/bench-venv-$hash}
if [ "${1:-}" = --dir ]; then echo "$dir"; exit 0; fi
if [ ! -x "$dir/bin/python" ] || [ ! -f "$dir/.complete" ]; then
    echo "bench: installing PyPI torch + transformers into $dir (once; a few minutes)" >&2
    rm -rf "$dir"
    /usr/bin/python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    touch "$dir/.complete"
fi
echo "$dir/bin/python"
