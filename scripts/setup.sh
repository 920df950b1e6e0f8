#!/usr/bin/env bash
# Installs every Debian package shardtune needs to build, test and benchmark.
# Idempotent: packages already present are skipped; nothing is downloaded at build or run time.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev
  libzmq3-dev libprotobuf-c-dev protobuf-c-compiler
  libcmocka-dev libopenblas-dev libyaml-dev
  python3 python3-torch python3-numpy python3-h5py python3-zmq python3-protobuf
)
if [ "${SHARDTUNE_WITH_SLURM:-0}" = 1 ]; then PKGS+=(slurm-wlm munge); fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PKGS[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
