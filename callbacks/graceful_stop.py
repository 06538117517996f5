"""``GracefulStop``: SIGTERM or Ctrl-C ends ``fit`` after the current step, checkpointed, in seconds.

A cluster's pre-emption (SIGTERM, with a kill some 30 s later) or a Ctrl-C (SIGINT) must not cost the run, nor wait
for work that can be redone: the step in flight finishes (micro-batches of an accumulated step included), every rank
agrees to stop after it, the checkpoint of that step is written (by ``AdapterCheckpoint`` when the run has one, else a
Lightning checkpoint in ``<log_dir>/checkpoints``), and training ends by raising :class:`Preempted` -- no validation,
forgetting measurement, export or after-training validation runs after the signal. ``ftframe fit`` catches it, prints
the command that resumes, and exits 0 on every rank. A signal during validation stops at the next validation batch
(the step before it is checkpointed); one before the first step stops there, with nothing to save. A second signal
falls back to the default behaviour (stop now; the last complete checkpoint stays intact, as checkpoints are written
under a temporary name and renamed). ``ftframe fit`` adds this callback unless the configuration has one.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import log_dir

__all__ = ["GracefulStop", "Preempted"]

SIGNALS = ("SIGTERM", "SIGINT")


class Preempted(Exception):  # noqa: N818 -- it is what happened, not an error
    """Training stopped on a signal after ``step``; its state is in ``checkpoint`` (``None``: nothing to save)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None, resume: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.signal_name, self.step, self.checkpoint, self.resume = signal_name, step, checkpoint, resume


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
        self.received_at: float | None = None  # when (time.monotonic())
        self.stopped_at: int | None = None  # the step after which training stopped because of it
        self.checkpoint: str | None = None  # where the state of that step was written
        self._previous: dict[int, Any] = {}
        self._stepped = False  # this process completed a step of this fit

    # ------------------------------------------------------------------ signal handling
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: the default behaviour (terminate / KeyboardInterrupt) now
            self._restore()
            signal.raise_signal(signum)
            return
        self.received, self.received_at = signal.Signals(signum).name, time.monotonic()

    def _install(self) -> None:
        """Make this callback the handler of its signals (again: Lightning registers its own SIGTERM handler after
        ``setup``, whose broadcast from the signalled rank alone would mismatch the other ranks' collectives)."""
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread (e.g. not inside a notebook's worker)
        for name in self.signals:
            number = getattr(signal, name)
            self._previous.setdefault(number, signal.getsignal(number))  # the handler from before this fit
            signal.signal(number, self._handle)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _asked(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether any process was signalled (collective under several processes: call it where all ranks are)."""
        asked = self.received is not None
        if trainer.world_size > 1:
            flag = torch.tensor(float(asked), device=pl_module.device)
            asked = bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)
        if asked and self.received is None:
            self.received, self.received_at = "a signal to another process", time.monotonic()
        return asked

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # early: a signal while the model loads or the baseline is measured stops at the first step
            self.received, self.received_at, self.stopped_at, self.checkpoint = None, None, None, None
            self._stepped = False
            self._install()  # after Lightning's own SIGTERM handler, which would end the run without a checkpoint

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self._stepped and self._asked(trainer, pl_module):  # signalled before the first step: nothing to save
            self._stop(trainer, save=False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stepped = not trainer.fit_loop._should_accumulate()  # this micro-batch completed an optimizer step
        self._stepped |= stepped
        if stepped and self._asked(trainer, pl_module):
            self._stop(trainer, save=True)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._asked(trainer, pl_module):
            self._stop(trainer, save=self._stepped)  # the validation is abandoned; the step before it is kept

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------------ stopping
    def _stop(self, trainer: Trainer, save: bool) -> None:
        """Checkpoint the current step (collective) and end ``fit`` by raising :class:`Preempted`."""
        from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint

        self.stopped_at = trainer.global_step
        if save:
            for cb in trainer.callbacks:
                if isinstance(cb, AdapterCheckpoint) and self.checkpoint is None:
                    self.checkpoint = cb.save_stopping_state(trainer)
            if self.checkpoint is None:
                path = log_dir(trainer) / "checkpoints" / f"interrupted-step={trainer.global_step:06d}.ckpt"
                trainer.save_checkpoint(path)  # collective; rank 0 writes
                self.checkpoint = str(path)
        config = log_dir(trainer) / "config.yaml"
        if self.checkpoint is None:
            resume = "nothing to resume (no step was taken): run the same command again"
        elif config.is_file():
            resume = f"ftframe fit --config {config} --ckpt_path {self.checkpoint}"
        else:
            resume = f"the same ftframe fit command with --ckpt_path {self.checkpoint}"
        waited = time.monotonic() - self.received_at if self.received_at is not None else 0.0
        rank_zero_info(f"[ftframe] stopped by {self.received} after step {self.stopped_at} ({waited:.1f}s after the "
                       f"signal); " + (f"the state of that step is in {self.checkpoint}. " if self.checkpoint else "")
                       + f"Resume with: {resume}")
        raise Preempted(self.received or "a signal", self.stopped_at, self.checkpoint, resume)

