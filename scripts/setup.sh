#!/usr/bin/env bash
# Installs every Debian package shardtune needs to build, test and benchmark.
# Idempotent: packages already present are skipped; nothing is downloaded at build or run time.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev
  libzmq3-dev libprotobuf-c-dev protobuf-c-compiler
  libcmocka-dev libopenblas-dev libdnnl-dev libyaml-dev
  python3 python3-torch python3-numpy python3-h5py python3-zmq python3-protobuf
)
# the test extras of `./run test`: Slurm, and a real headless browser for the compare page test
if [ "${SHARDTUNE_WITH_SLURM:-0}" = 1 ]; then PKGS+=(slurm-wlm munge chromium chromium-driver python3-selenium); fi
if [ "${SHARDTUNE_WITH_PYREF:-0}" = 1 ]; then PKGS+=(python3-venv python3-pip); fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PKGS[@]} packages present"
else
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
fi

# Reference tests only: PyPI's transformers / tokenizers / gguf in a cached virtual environment that also
# sees Debian's torch, numpy and h5py. Its path depends on the requirements file, so a changed pin makes a
# new one; scripts/pyref prints it.
if [ "${SHARDTUNE_WITH_PYREF:-0}" = 1 ]; then
  venv=$(bash "$(dirname "$0")/pyref" --dir)
  if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "setup: creating the reference-test virtual environment $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$(dirname "$0")/../tests/requirements-ref.txt"
    touch "$venv/.complete"
  fi
  # llama.cpp for the GGUF tests (tests/requirements-llama.txt; minutes, once per machine): in the background
  # when the caller waits for it later (./run test does, after building shardtune), else here
  if [ "${SHARDTUNE_LLAMA_BACKGROUND:-0}" = 1 ]; then
    bash "$(dirname "$0")/build_llama.sh" --background
  else
    bash "$(dirname "$0")/build_llama.sh"
  fi
  # PyPI torch 2.x + transformers + peft (tests/requirements-torch.txt), isolated from Debian's torch 1.13
  tvenv=$(bash "$(dirname "$0")/pyref" --torch --dir)
  if [ ! -x "$tvenv/bin/python" ] || [ ! -f "$tvenv/.complete" ]; then
    echo "setup: creating the torch reference-test virtual environment $tvenv (~5 GB, a few minutes)"
    rm -rf "$tvenv"
    /usr/bin/python3 -m venv "$tvenv"
    "$tvenv/bin/pip" install -q --disable-pip-version-check -r "$(dirname "$0")/../tests/requirements-torch.txt"
    touch "$tvenv/.complete"
  fi
fi
