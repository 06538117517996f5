#!/usr/bin/env bash
# The test suite: install with dev extras, fetch the offline assets, check the import layers, run pytest and build
# the docs strictly.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
.venv/bin/ftframe download
bash scripts/lint_imports.sh
.venv/bin/python -m pytest "$@"
.venv/bin/mkdocs build --strict --quiet -d "$(mktemp -d)"
