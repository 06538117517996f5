"""Training progress for a terminal and for a log file, with the same fields in both.

``ftframe fit`` puts :class:`LineProgressBar` in place of Lightning's default bar when stdout is not a terminal (a
log file, ``nohup``, SLURM, CI, a container), and :class:`RichTrainingBar` when it is. Both show: step / max steps,
epoch, train loss, learning rate, useful (non-padding) tokens per second, elapsed time, ETA and peak memory. The line
bar prints one line every ``interval_s`` seconds (``ftframe fit --progress_interval``, default 30) and one after
every validation, on rank 0 only::

    [ftframe] step 12/60 (20%) epoch 0: loss 1.0312, lr 9.6e-04, 405 tok/s, elapsed 1m10s, ETA 4m40s, peak mem 3.1 GB
    [ftframe] validation at step 20: val/loss 0.9912 (4.1s)

Both are Lightning ``ProgressBar`` callbacks; a bar in the configuration's callbacks is left alone.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from ftframe.progress import DEFAULT_INTERVAL_S, format_seconds

__all__ = ["LineProgressBar", "RichTrainingBar", "TrainingStats", "peak_memory_bytes"]


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """The process's peak memory so far and what it is: CUDA's allocator peak on a GPU, the resident set elsewhere."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device), "GPU"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "RSS"  # bytes on macOS, KiB on Linux


class TrainingStats:
    """Step, tokens and time of the training loop, for the progress bars and the run summary."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.first_step = 0
        self.tokens = 0  # non-padding input tokens fed on this rank, times the world size
        self.train_seconds = 0.0
        self._batch_start: float | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.start = time.monotonic()
        self.first_step = trainer.global_step  # a resumed run: its ETA counts from here

    def batch_start(self) -> None:
        self._batch_start = time.monotonic()

    def batch_end(self, trainer: Trainer, batch: Any) -> None:
        if self._batch_start is not None:
            self.train_seconds += time.monotonic() - self._batch_start
            self._batch_start = None
        self.tokens += _useful_tokens(batch) * trainer.world_size

    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def fields(self, trainer: Trainer) -> dict[str, Any]:
        """Everything a progress line shows, as values (``None`` where unknown)."""
        step = trainer.global_step
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None:
            estimated = trainer.estimated_stepping_batches
            max_steps = int(estimated) if math.isfinite(estimated) else None
        elapsed = time.monotonic() - self.start if self.start is not None else 0.0
        done = step - self.first_step
        eta = elapsed / done * (max_steps - step) if max_steps and done > 0 else None
        loss = trainer.callback_metrics.get("train/loss")
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        module = trainer.lightning_module
        peak, kind = peak_memory_bytes(module.device if module is not None else None)
        return {"step": step, "max_steps": max_steps, "epoch": trainer.current_epoch,
                "loss": float(loss) if loss is not None else None, "lr": lr, "tokens_per_s": self.tokens_per_s(),
                "elapsed_s": elapsed, "eta_s": eta, "peak_memory_bytes": peak, "peak_memory_kind": kind}


def _useful_tokens(batch: Any) -> int:
    if isinstance(batch, dict):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def format_line(f: dict[str, Any]) -> str:
    step = f"step {f['step']}"
    if f["max_steps"]:
        step += f"/{f['max_steps']} ({100 * f['step'] / f['max_steps']:.0f}%)"
    parts = []
    if f["loss"] is not None:
        parts.append(f"loss {f['loss']:.4f}")
    if f["lr"] is not None:
        parts.append(f"lr {f['lr']:.1e}")
    parts.append(f"{f['tokens_per_s']:.0f} tok/s")
    parts.append(f"elapsed {format_seconds(f['elapsed_s'])}")
    parts.append(f"ETA {format_seconds(f['eta_s'])}" if f["eta_s"] is not None else "ETA ?")
    parts.append(f"peak mem {_gb(f['peak_memory_bytes'])}")
    return f"[ftframe] {step} epoch {f['epoch']}: " + ", ".join(parts)


class LineProgressBar(ProgressBar):
    """A progress line every ``interval_s`` seconds of training and one after every validation (rank 0)."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.stats = TrainingStats()
        self._enabled = True
        self._last = 0.0
        self._val_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_enabled:
            print(*args, **kwargs, flush=True)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stats.on_train_start(trainer)
        self._last = time.monotonic()
        if self.is_enabled:
            fields = self.stats.fields(trainer)
            total = f"/{fields['max_steps']}" if fields["max_steps"] else ""
            self.print(f"[ftframe] training from step {trainer.global_step}{total}; a progress line every "
                       f"{self.interval_s:g}s")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.stats.batch_start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.stats.batch_end(trainer, batch)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.print(format_line(self.stats.fields(trainer)))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.print(format_line(self.stats.fields(trainer)).replace("[ftframe] step", "[ftframe] trained: step", 1))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val") and isinstance(v, torch.Tensor) and v.numel() == 1}
        values = ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())) or "no metrics"
        self.print(f"[ftframe] validation at step {trainer.global_step}: {values} "
                   f"({format_seconds(time.monotonic() - self._val_start)})")


class RichTrainingBar(RichProgressBar):
    """Lightning's rich bar, with the line bar's fields (lr, tok/s, ETA, peak memory) among its metrics."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats = TrainingStats()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.stats.on_train_start(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        super().on_train_batch_start(trainer, pl_module, *args)
        self.stats.batch_start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.stats.batch_end(trainer, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if self.stats.start is None:
            return metrics
        f = self.stats.fields(trainer)
        if f["max_steps"]:
            metrics["step"] = f"{f['step']}/{f['max_steps']}"
        if f["lr"] is not None:
            metrics["lr"] = f"{f['lr']:.1e}"
        metrics["tok/s"] = f"{f['tokens_per_s']:.0f}"
        if f["eta_s"] is not None:
            metrics["ETA"] = format_seconds(f["eta_s"])
        metrics["peak mem"] = _gb(f["peak_memory_bytes"])
        return metrics
