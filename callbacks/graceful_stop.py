"""``GracefulStop``: SIGTERM or Ctrl-C finishes the current step, writes a resumable checkpoint and ends ``fit``.

A cluster's pre-emption (SIGTERM) or a Ctrl-C (SIGINT) must not cost the run: the step in flight finishes, every rank
agrees to stop after it, the checkpoint of that step is written (by ``AdapterCheckpoint``, which saves the state of
a run that is stopping; without one, a Lightning checkpoint in ``<log_dir>/checkpoints``), and ``fit`` returns
normally, so the process exits 0 after printing the command that resumes. A second signal while stopping falls back
to the default behaviour (stop now). ``ftframe fit`` adds this callback unless the configuration has one.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import log_dir

__all__ = ["GracefulStop"]

SIGNALS = ("SIGTERM", "SIGINT")


class GracefulStop(Callback):
    """Stop training cleanly on SIGTERM / SIGINT: finish the step, checkpoint it, exit 0 with the resume command.

    Args:
        signals: Signal names to handle.
    """

    def __init__(self, signals: list[str] | None = None) -> None:
        self.signals = list(signals) if signals is not None else list(SIGNALS)
        unknown = [s for s in self.signals if not hasattr(signal, s)]
        if unknown:
            from ftframe.errors import UserError

            raise UserError(f"GracefulStop: unknown signal(s) {unknown}; use names such as {list(SIGNALS)}")
        self.received: str | None = None  # the signal that asked to stop
        self.stopped_at: int | None = None  # the step after which training stopped because of it
        self.checkpoint: str | None = None  # where the state of that step was written
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signal handling
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: the default behaviour (terminate / KeyboardInterrupt) now
            self._restore()
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread (e.g. not inside a notebook's worker)
        for name in self.signals:
            number = getattr(signal, name)
            self._previous[number] = signal.getsignal(number)
            signal.signal(number, self._handle)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received, self.stopped_at, self.checkpoint = None, None, None
        self._install()  # after Lightning's own SIGTERM handler, which would end the run without a checkpoint

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        asked = self.received is not None
        if trainer.world_size > 1:  # one process may have been signalled: all stop after the same step
            flag = torch.tensor(float(asked), device=pl_module.device)
            asked = bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)
        if not asked or self.stopped_at is not None:
            return
        self.received = self.received or "a signal to another process"
        self.stopped_at = trainer.global_step
        trainer.should_stop = True  # AdapterCheckpoint (run after this callback) saves the state of a stopping run
        from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint

        if not any(isinstance(cb, AdapterCheckpoint) and cb.save_on_train_end for cb in trainer.callbacks):
            path = log_dir(trainer) / "checkpoints" / f"interrupted-step={trainer.global_step:06d}.ckpt"
            trainer.save_checkpoint(path)  # collective; rank 0 writes
            self.checkpoint = str(path)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()
        if self.stopped_at is None:
            return
        if self.checkpoint is None:
            from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint

            paths = [cb.last_model_path for cb in trainer.callbacks if isinstance(cb, AdapterCheckpoint)]
            self.checkpoint = str(Path(paths[0]).parent) if paths and paths[0] else None
        config = log_dir(trainer) / "config.yaml"
        resume = (f"ftframe fit --config {config} --ckpt_path {self.checkpoint}" if config.is_file()
                  else f"the same ftframe fit command with --ckpt_path {self.checkpoint}")
        rank_zero_info(f"[ftframe] stopped by {self.received} after step {self.stopped_at}; the state of that step is in "
                       f"{self.checkpoint}. Resume with: {resume}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
