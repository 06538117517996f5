"""A DPO training job for tests/test_preference.py's DDP test, run as a script so Lightning's DDP launcher can start
its ranks.

    python tests/preference_job.py OUT MODEL PAIRS DEVICES BATCH ACCUMULATE STEPS METHOD

Trains ``METHOD`` (``LoRA``: the reference is the base with the adapters off; ``FullFineTune``: precomputed on every
rank) with ``Preference(loss="dpo")`` for ``STEPS`` optimizer steps on ``DEVICES`` CPU processes of ``BATCH`` pairs,
accumulating ``ACCUMULATE`` batches, and writes from rank 0 ``OUT/trained.safetensors`` (the trainable weights) and
``OUT/metrics.json`` (the validation metrics after training).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch import seed_everything
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftframe.data import PreferenceDataModule  # noqa: E402
from ftframe.methods import FullFineTune, LoRA  # noqa: E402
from ftframe.optim import OptimizerSettings  # noqa: E402
from ftframe.tasks import Preference  # noqa: E402
from tests.helpers import tiny_trainer  # noqa: E402


def main() -> None:
    out, model, pairs, devices, batch, accumulate, steps, method = sys.argv[1:]
    seed_everything(0)
    options = {"dropout": 0.0} if method == "LoRA" else {}
    cls = {"LoRA": LoRA, "FullFineTune": FullFineTune}[method]
    module = cls(model_name=model, task=Preference(beta=0.5), optimizer=OptimizerSettings(learning_rate=1e-2),
                 **options)
    data = PreferenceDataModule(train_files=pairs, tokenizer=model, val_size=8, batch_size=int(batch),
                                eval_batch_size=2, cache_dir=str(Path(out) / "cache"))
    trainer = tiny_trainer(Path(out), max_steps=int(steps), devices=int(devices), accumulate_grad_batches=int(accumulate),
                           strategy="ddp" if int(devices) > 1 else "auto", limit_val_batches=None,
                           num_sanity_val_steps=0, check_val_every_n_epoch=None, val_check_interval=None)
    trainer.fit(module, datamodule=data)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    if trainer.global_rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in module.trainable_state_dict().items()},
                  str(Path(out) / "trained.safetensors"))
        (Path(out) / "metrics.json").write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
