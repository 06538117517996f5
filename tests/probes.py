"""Callbacks that tests pass to ``ftframe fit`` subprocesses (``--trainer.callbacks+=tests.probes.NAME``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from lightning.pytorch import Callback


class KillAt(Callback):
    """SIGKILL this process right after optimizer step ``step``: no hook, no cleanup, like a crash or OOM kill."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


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
