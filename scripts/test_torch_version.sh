#!/usr/bin/env bash
# Run the test suite under another PyTorch release, in a fresh virtual environment.
#
#   bash scripts/test_torch_version.sh TORCH TORCHVISION [VENV] [PYTEST ARGS...]
#   bash scripts/test_torch_version.sh 2.11.0 0.26.0         # the oldest release we support
#
# Installs torch==TORCH and torchvision==TORCHVISION from PyPI into VENV (default
# /tmp/mocohub-torch-TORCH; reused when it exists), then this checkout with its
# dev extra (editable, so the code under test is this checkout's), and runs
# `python -m pytest` there with PYTEST ARGS. The exit code is pytest's. Needs the
# network for the install (PyPI's Linux wheels are CUDA builds: a few GB), about
# 12 minutes of tests on 2 cores. README.md ("Install") names the releases checked.
set -euo pipefail
TORCH=${1:?usage: scripts/test_torch_version.sh TORCH TORCHVISION [VENV] [PYTEST ARGS...]}
VISION=${2:?usage: scripts/test_torch_version.sh TORCH TORCHVISION [VENV] [PYTEST ARGS...]}
VENV=${3:-/tmp/mocohub-torch-$TORCH}
shift $(($# < 3 ? $# : 3))
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH" "torchvision==$VISION"
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
"$VENV/bin/python" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
