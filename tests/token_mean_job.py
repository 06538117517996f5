"""A training job for tests/test_token_mean.py, run as a script so Lightning's DDP launcher can start its ranks.

    python tests/token_mean_job.py OUT MODEL DEVICES BATCH ACCUMULATE STEPS DATA [DATA ...]

Trains LoRA (no dropout) for ``STEPS`` optimizer steps on each JSONL file ``DATA`` -- padded and packed -- with
``DEVICES`` CPU processes of ``BATCH`` examples, ``ACCUMULATE`` micro-batches per step, in float32. Writes from rank 0,
for each data file and packing mode, ``OUT/<data stem>-<padded|packed>/``: ``steps.json`` (per optimizer step: the
logged ``train/loss`` and ``train/tokens`` and the positions of its examples in the training split, gathered from every rank) and
``grads.safetensors`` (the trainable parameters' gradients at every optimizer step, as the optimizer sees them:
``<step>.<name>``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, seed_everything
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ftframe.data import InstructionDataModule  # noqa: E402
from ftframe.methods import LoRA  # noqa: E402
from ftframe.optim import OptimizerSettings  # noqa: E402
from tests.helpers import tiny_trainer  # noqa: E402


class Record(Callback):
    """Each optimizer step's gradients, logged loss and examples (every rank's)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.steps: list[dict] = []
        self._ids: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._ids += batch["example_ids"].tolist()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1
        for name, p in pl_module.named_parameters():
            if p.requires_grad and p.grad is not None:
                self.grads[f"{step}.{name}"] = p.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.steps) == trainer.global_step:  # this micro-batch did not complete a step
            return
        ids = self._ids
        if trainer.world_size > 1:
            every: list = [None] * trainer.world_size
            dist.all_gather_object(every, ids)
            ids = [i for rank in every for i in rank]
        self.steps.append({"loss": float(trainer.callback_metrics["train/loss"]),
                           "tokens": float(trainer.callback_metrics["train/tokens"]), "ids": sorted(ids)})
        self._ids = []


def main() -> None:
    out, model, devices, batch, accumulate, steps, *files = sys.argv[1:]
    devices, batch, accumulate, steps = int(devices), int(batch), int(accumulate), int(steps)
    for data in files:
        for packing in (False, True):
            seed_everything(0, workers=True)
            folder = Path(out) / f"{Path(data).stem}-{'packed' if packing else 'padded'}"
            dm = InstructionDataModule(train_files=data, tokenizer=model, val_size=0, batch_size=batch, max_length=256,
                                       packing=packing, cache_dir=str(folder / "cache"), seed=3)
            module = LoRA(model_name=model, r=4, alpha=8, dropout=0.0,
                          optimizer=OptimizerSettings(learning_rate=1e-2, warmup_steps=0, lr_schedule="constant"))
            record = Record()
            trainer = tiny_trainer(folder, devices=devices, strategy="ddp" if devices > 1 else "auto",
                                   max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[record],
                                   precision="32-true", log_every_n_steps=1)
            trainer.fit(module, datamodule=dm)
            if trainer.global_rank == 0:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "steps.json").write_text(json.dumps(record.steps))
                save_file({k: v.contiguous() for k, v in record.grads.items()}, str(folder / "grads.safetensors"))


if __name__ == "__main__":
    main()
