"""A training job for tests/test_distributed.py, run as a script so Lightning's DDP launcher can start its ranks.

    python tests/ddp_job.py OUT MODEL DATA DEVICES BATCH STEPS PRECISION METHOD [METHOD ...]

For each method (a key of ``tests.test_methods_contract.METHODS``) it trains ``STEPS`` steps on the CPU with
``DEVICES`` processes of ``BATCH`` examples each, in Lightning precision ``PRECISION``, and writes, from rank 0, ``OUT/<method>/``: ``losses.json`` (the
loss of every step, averaged over the ranks), ``trained.safetensors`` (the trainable weights), ``logits.pt`` (the
trained model's logits on a fixed padded batch) and ``artifact/`` (what ``save_trained`` writes).
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
from ftframe.packing import unpack  # noqa: E402
from tests.helpers import tiny_trainer  # noqa: E402
from tests.test_methods_contract import METHODS  # noqa: E402


class StepLosses(Callback):
    """The loss of each optimizer step, averaged over the ranks (what DDP's averaged gradient is the gradient of)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if trainer.world_size > 1:
            dist.all_reduce(loss)
            loss /= trainer.world_size
        self.losses.append(float(loss))


def main() -> None:
    out, model, data, devices, batch, steps, precision, *names = sys.argv[1:]
    for name in names:
        seed_everything(0)
        cls, kwargs, _, _ = METHODS[name]
        module = cls(model_name=model, learning_rate=1e-2, **kwargs)
        dm = InstructionDataModule(train_files=data, tokenizer=model, val_size=8, batch_size=int(batch),
                                   cache_dir=str(Path(out) / "cache"))
        recorder = StepLosses()
        trainer = tiny_trainer(Path(out) / name, max_steps=int(steps), devices=int(devices),
                               strategy="ddp" if int(devices) > 1 else "auto", callbacks=[recorder],
                               precision=precision)
        trainer.fit(module, datamodule=dm)
        if trainer.is_global_zero:
            folder = Path(out) / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "losses.json").write_text(json.dumps(recorder.losses))
            save_file({k: v.detach().cpu().clone() for k, v in module.trainable_state_dict().items()},
                      str(folder / "trained.safetensors"))
            module.model.eval()
            fixed = unpack(next(iter(dm.val_dataloader())))
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                logits = module.model(input_ids=fixed["input_ids"], attention_mask=fixed["attention_mask"]).logits
            torch.save({"logits": logits, "input_ids": fixed["input_ids"], "attention_mask": fixed["attention_mask"]},
                       folder / "logits.pt")
            module.save_trained(folder / "artifact")
        if trainer.world_size > 1:
            dist.barrier()


if __name__ == "__main__":
    main()
