"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

from lightning.pytorch import Trainer


def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                    num_sanity_val_steps=0, limit_val_batches=0)
    defaults.update(kwargs)
    return Trainer(**defaults)
