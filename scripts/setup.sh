#!/usr/bin/env bash
# Create the virtual environment and install the project with its test tools. Safe to re-run.
#
#   scripts/setup.sh                 # .venv with python3
#   PYTHON=python3.12 VENV=/scratch/venv scripts/setup.sh
#
# torch comes first, chosen for the machine: a CUDA build where an NVIDIA GPU answers, else the CPU build
# (TORCH_VERSION). On a CPU-only Linux machine that pulls wheels from the public index, set TORCH_INDEX_URL
# to PyTorch's CPU-only wheel index (the "CPU" choice of the selector on PyTorch's install page) to avoid the
# multi-GB CUDA build. An existing torch is always kept: the project asks for a range (torch>=2.6: FSDP2's public API).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found; installing torch with CUDA"
    "$PY" -m pip install "torch>=2.6"
  else
    echo "setup: no NVIDIA GPU; installing the CPU build torch==$TORCH_VERSION"
    "$PY" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
  fi
fi

echo "setup: installing the project and its dev tools"
"$PY" -m pip install -e ".[dev]"
"$PY" -c "import torch, pytorch_lightning, hydra; print('setup: torch', torch.__version__, '| lightning', pytorch_lightning.__version__, '| cuda', torch.cuda.is_available())"
