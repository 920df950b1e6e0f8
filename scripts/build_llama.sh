#!/usr/bin/env bash
# Builds llama.cpp (PyPI llama-cpp-python, from source) for the GGUF reference tests into the cached folder
# `scripts/pyref --llama-dir` prints (keyed by tests/requirements-llama.txt's hash); a no-op when it is
# already there. Only the library is built: no examples, tests, tools, server, multimodal or curl.
#   scripts/build_llama.sh            build (or wait for a build in progress, then return)
#   scripts/build_llama.sh --background   start the build detached (log: <folder>.log) and return at once;
#                                     a later plain call waits for it (./run test: setup, shardtune's own
#                                     build, then the wait, so the two compiles overlap)
# Concurrent calls serialize on <folder>.lock; a failed build is retried by the next call.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ldir=$(bash "$here/pyref" --llama-dir)
venv=$(bash "$here/pyref" --dir)
[ -f "$ldir/.complete" ] && exit 0
mkdir -p "$(dirname "$ldir")"
if [ "${1:-}" = --background ]; then
  echo "setup: building llama.cpp (llama-cpp-python) in the background: $ldir.log"
  nohup bash "$0" >"$ldir.log" 2>&1 </dev/null &
  exit 0
fi
exec 9>"$ldir.lock"
flock 9
[ -f "$ldir/.complete" ] && exit 0
echo "setup: building llama.cpp for the GGUF reference tests (llama-cpp-python from source; minutes, once)"
rm -rf "$ldir"
mkdir -p "$ldir"
export CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
  -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON
  -DCMAKE_BUILD_TYPE=Release"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
t0=$SECONDS
# a plain target folder (no venv of its own): the reference environment's python imports it via PYTHONPATH
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-cache-dir --target "$ldir" \
  -r "$here/../tests/requirements-llama.txt"
touch "$ldir/.complete"
echo "setup: llama.cpp built in $((SECONDS - t0)) s"
