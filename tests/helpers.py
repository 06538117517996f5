"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

from lightning.pytorch import Trainer


def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                    num_sanity_val_steps=0, limit_val_batches=0)
    defaults.update(kwargs)
    return Trainer(**defaults)


def tiny_fit_args(model: str, data: str, tmp_path, adapter, *extra: str, steps: int = 2) -> list[str]:
    """``ftframe fit`` arguments for a short CPU run of the default method on the tiny model, writing ``adapter``."""
    return ["fit", f"--model.model_name={model}", f"--data.train_files={data}", f"--data.cache_dir={tmp_path / 'c'}",
            "--data.val_size=8", f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
            f"--adapter.dirpath={adapter}", *extra]


def loss_gate(folder, data: str, max_drop: float, on_fail: str = "refuse") -> str:
    """Write an evaluation gate YAML (``--eval``) on the response loss of ``data``'s 8 held-out examples."""
    path = folder / "gate.yaml"
    path.write_text(f"on_fail: {on_fail}\nevaluations:\n  - task: loss\n    data: {data}\n    split: val\n"
                    f"    val_size: 8\n    max_drop: {max_drop}\n")
    return str(path)
