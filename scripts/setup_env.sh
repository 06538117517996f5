#!/usr/bin/env bash
# Create .venv (if missing) and install ftframe into it. Sourced by quickstart.sh and test.sh.
# Usage: source scripts/setup_env.sh [EXTRAS]   e.g. EXTRAS=dev
set -euo pipefail
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch first and pinned: 2.13.0 is the CPU build these machines carry; a looser pin may pull a multi-GB CUDA build
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".${1:+[$1]}"
