#!/usr/bin/env bash
# The main job: install, fetch the offline assets, and fine-tune SmolLM2-135M-Instruct with LoRA on GSM8K on CPU.
# Extra arguments go to `ftframe fit` (e.g. --trainer.max_steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# what the quickstart reads: the model, GSM8K, and MMLU + State of the Union for the forgetting monitor
.venv/bin/ftframe download --names '[smollm2-135m-instruct, gsm8k, mmlu, sotu]'
.venv/bin/ftframe fit --config configs/quickstart.yaml "$@"
echo
echo "Adapter written to runs/quickstart/adapter. Try it:"
echo "  .venv/bin/ftframe generate --adapter runs/quickstart/adapter --prompt 'A baker sells 12 muffins a day for 3 days. How many muffins does he sell?'"
