"""Write the trained adapter when ``fit`` ends, in the folder format ``peft.PeftModel.from_pretrained`` loads.

The folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (or a full model folder for full
fine-tuning), the tokenizer, the resolved run config (``config.yaml``, as written by LightningCLI) and
``ftframe.json`` (method, base model, step, last metrics). It is written to a temporary sibling folder and renamed
into place, so a crash never leaves a half-written adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import check_writable, gather_trained, log_dir, replace_dir, write_trained, writing

__all__ = ["AdapterExport"]


class AdapterExport(Callback):
    """Save the trained weights (adapter-only for peft methods) at the end of ``fit``.

    Args:
        dirpath: Output folder; ``None`` = ``<trainer.log_dir>/adapter``.
        save_on_fit_end: Write the folder when ``fit`` ends (set ``false`` to skip).
        save_on_validate: Write the folder at the end of ``ftframe validate``: with ``--ckpt_path`` this exports the
            adapter of any saved checkpoint on demand.

    Example:
        ``ftframe fit --config configs/quickstart.yaml --adapter.dirpath out/gsm8k-lora``

        ``ftframe validate --config runs/quickstart/config.yaml --ckpt_path runs/quickstart/checkpoints/last
        --adapter.save_on_validate true --adapter.dirpath out/step-60``
    """

    def __init__(self, dirpath: str | None = None, save_on_fit_end: bool = True, save_on_validate: bool = False) -> None:
        self.dirpath = dirpath
        self.save_on_fit_end = save_on_fit_end
        self.save_on_validate = save_on_validate
        self.last_path: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if (stage == "fit" and self.save_on_fit_end) or (stage == "validate" and self.save_on_validate):
            check_writable(self.resolve_dir(trainer), "--adapter.dirpath")  # before training, not after it

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_on_fit_end:
            self.export(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_on_validate and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.export(trainer, pl_module)

    def resolve_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else log_dir(trainer) / "adapter"

    def export(self, trainer: Trainer, pl_module: LightningModule, dirpath: str | Path | None = None) -> Path:
        """Write the folder now (rank 0 writes; all ranks return the path)."""
        out = Path(dirpath) if dirpath else self.resolve_dir(trainer)
        run_dir = log_dir(trainer)  # collective under DDP: every rank, before the rank-0 block
        weights = gather_trained(trainer, pl_module)  # collective: whole tensors on rank 0 under FSDP / ZeRO-3
        if trainer.is_global_zero:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(out, tmp, "the folder there before (if any) is intact"):
                write_trained(trainer, pl_module, tmp, run_dir, weights)
            replace_dir(tmp, out)
            rank_zero_info(f"[ftframe] adapter written to {out}")
        trainer.strategy.barrier("ftframe_adapter_export")
        self.last_path = out
        return out
