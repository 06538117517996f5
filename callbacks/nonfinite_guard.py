"""``NonFiniteGuard``: a step whose loss or gradients are not finite is skipped, and too many stop training.

``ftframe fit`` adds it to every run (like ``GracefulStop``; list it under ``trainer.callbacks`` to change its
options). A skipped step leaves the weights and the optimizer state as they were, with a warning naming the batch's
examples; after ``max_nonfinite_steps`` such steps training stops with an error and the last checkpoint (written
before them) is kept. Under DDP / FSDP every process takes the same decision (one collective per micro-batch, as
the check for a batch without supervised tokens needs anyway).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from ftframe.distributed import any_rank, gather_objects, shards_parameters
from ftframe.errors import UserError

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard(Callback):
    """Skip optimizer steps with an inf / NaN loss or gradients; stop after too many.

    Args:
        max_nonfinite_steps: Steps skipped before training stops with an error; ``0`` stops at the first one.
    """

    def __init__(self, max_nonfinite_steps: int = 10) -> None:
        if max_nonfinite_steps < 0:
            raise UserError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # steps skipped in this run
        self._bad_loss = False  # a micro-batch of the step being accumulated had a non-finite loss
        self._ids: list[Any] = []  # the examples of the step being accumulated

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        batch, self._batch = getattr(self, "_batch", None) or {}, None
        self._ids += _local_ids(batch)
        tokens = getattr(pl_module, "step_tokens", None)
        nonfinite, unsupervised = any_rank(trainer, pl_module.device, not bool(torch.isfinite(loss)),
                                           tokens is not None and int(tokens) == 0)
        if unsupervised:
            ids = sorted(set(gather_objects(trainer, _local_ids(batch))))
            raise UserError(f"step {trainer.global_step + 1}: a training batch has no supervised token (every label "
                            f"is -100), so its loss would be 0 and teach nothing; it held {ids}. Check the data with "
                            "`ftframe inspect-data --config <your config>` (the response field, the template's mask, "
                            "max_length)")
        self._bad_loss |= nonfinite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        bad_grads = False
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:  # (fp16's scaler skips infs)
            # one fused norm over all gradients (inf/NaN anywhere makes it non-finite), one host sync per step
            bad_grads = not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if shards_parameters(trainer):  # each rank checked its shard of the gradients
                bad_grads = any_rank(trainer, pl_module.device, bad_grads)
        local_ids, self._ids = self._ids, []
        bad_loss, self._bad_loss = self._bad_loss, False
        if not (bad_loss or bad_grads):
            return
        what = "loss" if bad_loss else "gradients"
        ids = sorted(set(gather_objects(trainer, local_ids)))
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients as they are
        self.nonfinite_steps += 1
        pl_module.log("train/nonfinite_steps", float(self.nonfinite_steps), reduce_fx="max")
        step = trainer.global_step + 1
        if ids and isinstance(ids[0], str):  # classification batches carry file:line
            examples = "the examples at " + ", ".join(ids)
        else:
            examples = f"training examples {ids} (positions in the training split)" if ids else "its examples"
        if self.nonfinite_steps > self.max_nonfinite_steps:
            saved = [cb.last_model_path for cb in trainer.callbacks if getattr(cb, "last_model_path", None)]
            kept = (f"The last checkpoint, {Path(saved[0]).parent}, holds the state before it" if saved
                    else "No checkpoint had been written")
            raise UserError(f"step {step}: non-finite {what} ({self.nonfinite_steps} steps so far, more than "
                            f"max_nonfinite_steps={self.max_nonfinite_steps}); the batch held {examples}. Training "
                            f"stopped. {kept}. Lower the learning rate, use bf16-mixed rather than 16-mixed, or check "
                            "those examples")
        rank_zero_warn(f"[ftframe] step {step}: non-finite {what}; step skipped, weights unchanged "
                       f"({self.nonfinite_steps} of at most {self.max_nonfinite_steps}); the batch held {examples}")


def _local_ids(batch: Any) -> list[Any]:
    """The batch's example ids (positions in the split), or ``file:line`` for batches that carry them."""
    if not isinstance(batch, dict):
        return []
    ids = batch.get("example_ids")
    return [int(i) for i in ids.tolist()] if isinstance(ids, torch.Tensor) else list(batch.get("where") or [])
