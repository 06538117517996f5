#!/usr/bin/env bash
# The import-layer contract of pyproject.toml ([tool.importlinter]), checked by import-linter on the package as it is
# installed: ftframe/ with the top-level callbacks/ folder in place as ftframe/callbacks (see [tool.setuptools]).
# Every import counts, those inside functions included.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -r ftframe "$stage/ftframe"
cp -r callbacks "$stage/ftframe/callbacks"
cd "$stage"
PYTHONPATH="$stage" "$root/.venv/bin/lint-imports" "$root/pyproject.toml" "$@"
