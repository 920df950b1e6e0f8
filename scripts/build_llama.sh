#!/usr/bin/env bash
# Builds llama.cpp (PyPI llama-cpp-python, from source) for the GGUF reference tests into the cached folder
# `scripts/pyref --llama-dir` prints; a no-op when it is already there. Only the library is built: no
# examples, tests, tools, server, multimodal or curl, so it takes minutes rather than tens of minutes.
# Called by scripts/setup.sh (SHARDTUNE_WITH_PYREF=1), in the background while the other steps run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ldir=$(bash "$here/pyref" --llama-dir)
venv=$(bash "$here/pyref" --dir)
[ -f "$ldir/.complete" ] && exit 0
rm -rf "$ldir"
mkdir -p "$ldir"
export CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
  -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON
  -DCMAKE_BUILD_TYPE=Release"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# a plain target folder (no venv of its own): the reference environment's python imports it via PYTHONPATH
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-cache-dir --target "$ldir" \
  -r "$here/../tests/requirements-llama.txt"
touch "$ldir/.complete"
