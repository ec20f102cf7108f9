#!/usr/bin/env bash
# Sets up a fresh machine of this project's kind (Debian, Python 3.11, no GPU) for the tests and the main job:
# the Fashion-MNIST IDX files from Debian, and a virtual environment .venv with gessl_ext installed editable.
# GESSL_EXT_BUILD_CUDA=0 skips compiling csrc/ (no GPU here: every op uses its PyTorch / Triton path);
# set GESSL_EXT_BUILD_CUDA=1 to compile-check the CUDA sources (needs CUDA_HOME and TORCH_CUDA_ARCH_LIST, e.g. 9.0;
# about 3 minutes). --no-build-isolation: pip builds with the setuptools and torch installed here, so the
# package install itself needs no network (pyproject.toml declares the package; setup.py adds csrc/).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -d .venv ] || python3 -m venv .venv
# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together on these machines (a CUDA build
# of torch that runs on the CPU; it brings Triton, whose interpreter runs the Triton kernels' tests).
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
GESSL_EXT_BUILD_CUDA="${GESSL_EXT_BUILD_CUDA:-0}" .venv/bin/pip install -q --no-build-isolation -e '.[train,test]'
