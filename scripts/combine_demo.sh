#!/usr/bin/env bash
# Two LoRA adapters on SmolLM2-135M-Instruct -- GSM8K (the quickstart) and chatterbot chat -- combined five ways by
# `ftframe merge --adapters`, every model scored on both tasks (docs/merge.md). About 15 minutes on 2 CPU cores.
# Extra arguments go to scripts/combine_demo.py (e.g. --exact_match 32).
set -euo pipefail
cd "$(dirname "$0")/.."
fit=".venv/bin/ftframe fit --config configs/quickstart.yaml"
# the quickstart's recipe without its checkpoints and forgetting measurements, which this demo does not need
quiet="--trainer.callbacks=[] --trainer.logger=false --validate_before_fit=false"
[ -f runs/demo/gsm8k/adapter/adapter_config.json ] || \
  $fit $quiet --trainer.default_root_dir=runs/demo/gsm8k --adapter.dirpath=runs/demo/gsm8k/adapter
[ -f runs/demo/chatterbot/adapter/adapter_config.json ] || \
  $fit --config configs/data/chatterbot.yaml $quiet --trainer.default_root_dir=runs/demo/chatterbot \
    --adapter.dirpath=runs/demo/chatterbot/adapter
.venv/bin/python scripts/combine_demo.py --first runs/demo/gsm8k/adapter --second runs/demo/chatterbot/adapter "$@"
