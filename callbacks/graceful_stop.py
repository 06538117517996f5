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

A step that cannot finish in time is abandoned: ``grace_s`` seconds after the signal, if training has not stopped yet
and no optimizer update or checkpoint write is under way (those finish; they take a fraction of a step), the work in
progress -- a forward / backward pass, a validation batch, a forgetting measurement -- is interrupted, and the state
of the last finished step is checkpointed: the weights (only an optimizer update changes them), with the loops, the
data position and the random-number generators as they were when that step ended. Resuming from it replays the
abandoned step exactly. Under several processes a peer may be blocked in a collective, so an abandoning process writes
nothing new and exits: the last periodic checkpoint is the one to resume from (the message names it).
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import log_dir

__all__ = ["GracefulStop", "Preempted", "stop_requested", "uninterrupted"]

SIGNALS = ("SIGTERM", "SIGINT")


class Preempted(Exception):  # noqa: N818 -- it is what happened, not an error
    """Training stopped on a signal after ``step``; its state is in ``checkpoint`` (``None``: nothing to save)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None, resume: str) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}")
        self.signal_name, self.step, self.checkpoint, self.resume = signal_name, step, checkpoint, resume


class _Abandoned(Preempted):
    """Raised in the main thread when the grace period ran out: the work in progress is dropped (see ``on_exception``)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name, -1, None, "")


_ACTIVE: list[GracefulStop] = []  # the instances handling signals in this process (one per running fit)
_BUSY = [0]  # depth of `uninterrupted()` blocks in progress


def stop_requested() -> bool:
    """Whether this process was asked to stop by a signal: long work outside a step (a measurement) may end early."""
    return any(gs.received is not None for gs in _ACTIVE)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Work that the grace period does not abandon (a checkpoint write: abandoning it would only mean writing it again)."""
    _BUSY[0] += 1
    try:
        yield
    finally:
        _BUSY[0] -= 1


class GracefulStop(Callback):
    """Stop training cleanly on SIGTERM / SIGINT: finish the step, checkpoint it, exit 0 with the resume command.

    Args:
        signals: Signal names to handle.
        grace_s: Seconds after the signal to wait for the step in progress; then it is abandoned and the last finished
            step is checkpointed (``null``: always wait). Keep it under the scheduler's kill delay (SLURM's
            ``KillWait`` and Kubernetes' ``terminationGracePeriodSeconds`` default to 30 s) minus a checkpoint write.
    """

    def __init__(self, signals: list[str] | None = None, grace_s: float | None = 20.0) -> None:
        self.signals = list(signals) if signals is not None else list(SIGNALS)
        if grace_s is not None and not grace_s > 0:
            from ftframe.errors import UserError

            raise UserError(f"GracefulStop: grace_s must be a positive number of seconds or null, got {grace_s!r}")
        self.grace_s = grace_s
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
        self.abandoned = False  # the grace period ran out and the work in progress was dropped
        self._updating = False  # between the step's last backward and its end: the optimizer changes the weights
        self._stopping = False  # _stop or the abandonment is writing the checkpoint
        self._abandon = False  # the watchdog asked the main thread to abandon
        self._rewind: dict[str, Any] | None = None  # the state at the end of the last finished step
        self._rewinding = False  # on_save_checkpoint writes `_rewind` instead of the live loops / data position
        self._watchdog: threading.Thread | None = None

    # ------------------------------------------------------------------ signal handling
    def _handle(self, signum: int, frame: Any) -> None:
        if self._abandon and not self._stopping:  # the watchdog's wake-up call: drop what is in progress
            self._abandon = False
            raise _Abandoned(self.received or signal.Signals(signum).name)
        if self.received is not None:  # asked twice: the default behaviour (terminate / KeyboardInterrupt) now
            self._restore()
            signal.raise_signal(signum)
            return
        self.received, self.received_at = signal.Signals(signum).name, time.monotonic()
        self._start_watchdog(signum)

    def _start_watchdog(self, signum: int) -> None:
        if self.grace_s is None or self._watchdog is not None or threading.current_thread() is not threading.main_thread():
            return
        main = threading.main_thread().ident
        deadline = time.monotonic() + self.grace_s

        def watch() -> None:
            while self in _ACTIVE and not self._stopping:
                if time.monotonic() >= deadline and not self._updating and not _BUSY[0]:
                    self._abandon = True
                    signal.pthread_kill(main, signum)  # wakes a blocking call; the handler raises _Abandoned
                    return
                time.sleep(0.05)

        self._watchdog = threading.Thread(target=watch, name="ftframe-grace", daemon=True)
        self._watchdog.start()

    def _install(self) -> None:
        """Make this callback the handler of its signals (again: Lightning registers its own SIGTERM handler after
        ``setup``, whose broadcast from the signalled rank alone would mismatch the other ranks' collectives)."""
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread (e.g. not inside a notebook's worker)
        for name in self.signals:
            number = getattr(signal, name)
            self._previous.setdefault(number, signal.getsignal(number))  # the handler from before this fit
            signal.signal(number, self._handle)
        if self not in _ACTIVE:
            _ACTIVE.append(self)

    def _restore(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
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
            self._stepped = self.abandoned = self._updating = self._stopping = self._abandon = self._rewinding = False
            self._rewind, self._watchdog = None, None
            self._install()  # after Lightning's own SIGTERM handler, which would end the run without a checkpoint

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # at the first micro-batch of a step: a signal since the last step's end (during its checkpoint write, a
        # validation's end, a forgetting measurement) stops here; before the first step there is nothing to save
        if self._step_starts(trainer) and self._asked(trainer, pl_module):
            self._stop(trainer, save=self._stepped)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._updating = True  # the point of no return: this step's update is not abandoned

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        stepped = not trainer.fit_loop._should_accumulate()  # this micro-batch completed an optimizer step
        if stepped:
            self._stepped = True
            self._remember(trainer)
        self._updating = False
        if stepped and self._asked(trainer, pl_module):
            self._stop(trainer, save=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._asked(trainer, pl_module):  # a signal during the last validation's end: no end-of-training work
            self._stop(trainer, save=self._stepped)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and self._asked(trainer, pl_module):
            self._stop(trainer, save=self._stepped)  # the validation is abandoned; the step before it is kept

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._rewinding and self._rewind is not None:  # the abandoned step never happened
            checkpoint["loops"] = self._rewind["loops"]
            if self._rewind.get("datamodule") is not None:
                checkpoint[type(trainer.datamodule).__qualname__] = self._rewind["datamodule"]

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, _Abandoned):
            self._finish_abandoned(trainer, exception)
        self._restore()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------------ stopping
    @staticmethod
    def _step_starts(trainer: Trainer) -> bool:
        """Whether the batch about to run is the first micro-batch of an optimizer step."""
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's batches, the current one included
        return (ready - 1) % trainer.accumulate_grad_batches == 0

    def _remember(self, trainer: Trainer) -> None:
        """Keep what the checkpoint of this finished step needs besides the weights (cheap: counters and seeds)."""
        from ftframe.callbacks.adapter_checkpoint import _rng_states

        datamodule = trainer.datamodule
        self._rewind = {"loops": copy.deepcopy(trainer._checkpoint_connector._get_loops_state_dict()),
                        "datamodule": copy.deepcopy(datamodule.state_dict()) if datamodule is not None else None,
                        "rng": _rng_states(), "step": trainer.global_step}

    def _finish_abandoned(self, trainer: Trainer, exception: _Abandoned) -> None:
        """The grace period ran out: checkpoint the last finished step (one process) and fill in ``exception``."""
        from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint, _set_rng_states

        self._stopping = self.abandoned = True
        waited = time.monotonic() - self.received_at if self.received_at is not None else 0.0
        rank_zero_info(f"[ftframe] the step in progress did not finish within grace_s={self.grace_s}s of the signal: "
                       "abandoning it")
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, AdapterCheckpoint)), None)
        rewind = self._rewind
        if rewind is not None and trainer.world_size == 1:
            self.stopped_at = rewind["step"]
            for p in trainer.lightning_module.parameters():
                p.grad = None  # the abandoned step's partial gradients
            _set_rng_states(rewind["rng"])  # as at that step's end (AdapterCheckpoint saves them)
            self._rewinding = True
            try:
                if saver is not None:
                    self.checkpoint = saver.save_stopping_state(trainer)
                if self.checkpoint is None:
                    path = log_dir(trainer) / "checkpoints" / f"interrupted-step={self.stopped_at:06d}.ckpt"
                    trainer.save_checkpoint(path)
                    self.checkpoint = str(path)
            finally:
                self._rewinding = False
        else:  # nothing finished, or a peer may be blocked in a collective: the last complete checkpoint stands
            self.stopped_at = rewind["step"] if rewind is not None else None
            last = saver.last_model_path if saver is not None else ""
            self.checkpoint = str(Path(last).parent) if last else None
        resume = self._resume_command(trainer)
        note = (f"the state of step {self.stopped_at} is in {self.checkpoint}. " if self.checkpoint and trainer.world_size == 1
                else f"the last complete checkpoint is {self.checkpoint}. " if self.checkpoint else "")
        rank_zero_info(f"[ftframe] stopped by {self.received} after step {self.stopped_at} ({waited:.1f}s after the "
                       f"signal; step {trainer.global_step + 1} abandoned); {note}Resume with: {resume}")
        exception.step, exception.checkpoint, exception.resume = self.stopped_at or 0, self.checkpoint, resume
        exception.args = (f"stopped by {self.received} after step {self.stopped_at}",)

    def _resume_command(self, trainer: Trainer) -> str:
        config = log_dir(trainer) / "config.yaml"
        checkpoint = self.checkpoint or trainer.ckpt_path  # nothing new: the checkpoint this run resumed from
        if checkpoint is None:
            return "nothing to resume (no step was taken): run the same command again"
        if config.is_file():
            return f"ftframe fit --config {config} --ckpt_path {checkpoint}"
        return f"the same ftframe fit command with --ckpt_path {checkpoint}"

    def _stop(self, trainer: Trainer, save: bool) -> None:
        """Checkpoint the current step (collective) and end ``fit`` by raising :class:`Preempted`."""
        from ftframe.callbacks.adapter_checkpoint import AdapterCheckpoint

        self._stopping = True
        self.stopped_at = trainer.global_step
        if save:
            for cb in trainer.callbacks:
                if isinstance(cb, AdapterCheckpoint) and self.checkpoint is None:
                    self.checkpoint = cb.save_stopping_state(trainer)
            if self.checkpoint is None:
                path = log_dir(trainer) / "checkpoints" / f"interrupted-step={trainer.global_step:06d}.ckpt"
                trainer.save_checkpoint(path)  # collective; rank 0 writes
                self.checkpoint = str(path)
        resume = self._resume_command(trainer)
        waited = time.monotonic() - self.received_at if self.received_at is not None else 0.0
        rank_zero_info(f"[ftframe] stopped by {self.received} after step {self.stopped_at} ({waited:.1f}s after the "
                       f"signal); " + (f"the state of that step is in {self.checkpoint}. " if self.checkpoint else "")
                       + f"Resume with: {resume}")
        raise Preempted(self.received or "a signal", self.stopped_at, self.checkpoint, resume)

