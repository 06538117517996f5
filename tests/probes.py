"""Callbacks that tests pass to ``ftframe fit`` subprocesses (``--trainer.callbacks+=tests.probes.NAME``)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from lightning.pytorch import Callback

from ftframe.tasks import CausalLM


class KillAt(Callback):
    """SIGKILL this process right after optimizer step ``step``: no hook, no cleanup, like a crash or OOM kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(Callback):
    """Send this process the signal ``name`` (e.g. SIGTERM) ``times`` times, once, like a scheduler's pre-emption:
    ``during: step``: as step ``step + 1`` starts; ``validation``: at the first validation batch after step ``step``;
    ``checkpoint``: while the checkpoint of step ``step`` is written (inside ``save_trained``); ``forgetting``: during
    the first forward pass of the forgetting measurement after step ``step``. Only on rank ``rank`` if given.
    ``stamp``: a file to write the time of sending to (``time.time()``), to measure the exit; while it exists nothing
    is sent (the resumed run, whose config.yaml lists this callback too, is not signalled again)."""

    def __init__(self, step: int, name: str = "SIGTERM", times: int = 1, during: str = "step",
                 rank: int | None = None, stamp: str | None = None) -> None:
        if during not in ("step", "validation", "checkpoint", "forgetting"):
            raise ValueError(f"SignalAt: unknown during={during!r}")
        self.step, self.name, self.times, self.during, self.rank, self.stamp = step, name, times, during, rank, stamp
        self._sent = bool(stamp) and Path(stamp).exists()

    def _send(self, trainer) -> None:
        if self._sent or trainer.global_step != self.step or (self.rank is not None and trainer.global_rank != self.rank):
            return
        self._sent = True
        if self.stamp:
            Path(self.stamp).write_text(repr(time.time()))
        for _ in range(self.times):
            os.kill(os.getpid(), getattr(signal, self.name))

    def setup(self, trainer, pl_module, stage) -> None:
        if stage != "fit":
            return
        if self.during == "checkpoint":
            original = pl_module.save_trained

            def save_trained(directory):
                if trainer.state.fn == "fit":
                    self._send(trainer)
                return original(directory)

            pl_module.save_trained = save_trained
        if self.during == "forgetting":
            from ftframe.callbacks import ForgettingMonitor

            monitor = next(cb for cb in trainer.callbacks if isinstance(cb, ForgettingMonitor))
            measure = monitor._measure

            def measured(trainer_, module, when):
                hook = None
                if when != "baseline" and trainer_.global_step == self.step:
                    hook = module.model.register_forward_hook(lambda *_: self._send(trainer_))
                try:
                    return measure(trainer_, module, when)
                finally:
                    if hook is not None:
                        hook.remove()

            monitor._measure = measured

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.during == "step":
            self._send(trainer)

    def on_validation_batch_start(self, trainer, *args) -> None:
        if self.during == "validation" and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._send(trainer)


class SlowStepAt(Callback):
    """Make step ``step + 1`` hang for ``seconds`` in the backward pass of its micro-batch ``micro`` (0-based), once
    (``marker``: a file created then; while it exists the step is not slowed, so the resumed run is not)."""

    def __init__(self, step: int, seconds: float = 600.0, micro: int = 0, marker: str | None = None) -> None:
        self.step, self.seconds, self.micro, self.marker = step, seconds, micro, marker
        self._micro = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._micro = batch_idx % trainer.accumulate_grad_batches

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step != self.step or self._micro != self.micro:
            return
        if self.marker:
            if Path(self.marker).exists():
                return
            Path(self.marker).write_text(repr(time.time()))
        time.sleep(self.seconds)


class KillDuringSave(Callback):
    """SIGKILL this process while the checkpoint of step ``step`` is half written (inside ``save_trained``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer, pl_module, stage) -> None:
        original = pl_module.save_trained

        def save_trained(directory):
            if trainer.global_step == self.step and trainer.state.fn == "fit":
                Path(directory, "adapter_model.safetensors").write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return original(directory)

        pl_module.save_trained = save_trained


class RankRecord(Callback):
    """Write what each rank saw at the end of fit to ``<folder>/rank<N>.json`` (step, stop flag, forgetting metrics)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("forgetting/")}
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "should_stop": trainer.should_stop, "metrics": metrics}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class NaNLossTask(CausalLM):
    """Causal-LM tuning whose loss is NaN on the given (1-based) training steps: a diverging batch, on demand."""

    def __init__(self, steps: list[int], rank: int | None = None) -> None:
        super().__init__()
        self.steps = set(steps)
        self.rank = rank  # only in this process of a multi-process run
        self.calls = 0

    def loss(self, model, batch):
        import torch.distributed as dist

        loss, n_tokens = super().loss(model, batch)
        if model.training:
            self.calls += 1
            here = self.rank is None or (dist.is_initialized() and dist.get_rank() == self.rank)
            if self.calls in self.steps and here:
                loss = loss * float("nan")
        return loss, n_tokens


class InfGradientAt(Callback):
    """Put an inf into one trainable gradient after the backward pass of the given (1-based) steps."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step + 1 in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


class WeightsPerStep(Callback):
    """Keep a copy of the trainable weights after every step (``.history``), and the optimizer's step counts."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.optimizer_steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.history.append({k: v.detach().clone() for k, v in pl_module.trainable_state_dict().items()})
        state = trainer.optimizers[0].state
        self.optimizer_steps.append(max((int(s["step"]) for s in state.values() if "step" in s), default=0))


class UnsupervisedBatchAt(Callback):
    """Mask every label of the batch of the given (1-based) step, as data whose responses were all cut away."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            batch["labels"].fill_(-100)


class KillAtBatch(Callback):
    """SIGKILL this process after micro-batch ``batch`` of the run (0-based, counted over epochs), e.g. halfway
    through the micro-batches that gradient accumulation gathers into one optimizer step."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
