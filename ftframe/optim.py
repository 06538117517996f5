"""The optimizer and learning-rate schedule every method trains with: AdamW with warm-up and a decay schedule.

:class:`OptimizerSettings` is the one typed object holding them (``model.init_args.optimizer`` in a config);
:func:`configure_adamw` builds Lightning's ``configure_optimizers`` result from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ftframe.errors import UserError

__all__ = ["OptimizerSettings", "configure_adamw"]


@dataclass
class OptimizerSettings:
    """AdamW and its learning-rate schedule.

    Args:
        learning_rate: Peak learning rate.
        weight_decay: Weight decay, applied to matrices only (biases and norm weights are excluded).
        betas: AdamW betas.
        warmup_steps: Linear warm-up length: optimizer steps if >= 1, else a fraction of all training steps.
        lr_schedule: Shape of the learning rate after warm-up.
        min_lr_ratio: Final learning rate as a fraction of the peak, for the cosine schedule.
        fused: Use PyTorch's fused AdamW kernel (one kernel for all parameters; same update).
    """

    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: float = 0.0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    fused: bool = True

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0 (steps, or a fraction < 1 of all steps), got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


def configure_adamw(parameters: Any, settings: OptimizerSettings, total_steps: float) -> dict[str, Any]:
    """AdamW over the trainable ``parameters`` and a per-step schedule over ``total_steps`` (Lightning's estimate)."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            # biases and norm scales are vectors; decaying them hurts and is conventionally skipped
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": settings.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = settings.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                   for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, betas=settings.betas, fused=fused or None)
    total = int(total_steps) if math.isfinite(total_steps) else 0
    warmup = int(settings.warmup_steps) if settings.warmup_steps >= 1 else int(settings.warmup_steps * total)
    name, extra = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": settings.min_lr_ratio}), "linear": ("linear", {}),
                   "constant": ("constant_with_warmup", {})}[settings.lr_schedule]
    if total == 0 and name != "constant_with_warmup":
        raise UserError(f"lr_schedule={settings.lr_schedule!r} needs a known number of steps: set trainer.max_steps "
                        "or trainer.max_epochs, or use lr_schedule: constant")
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1),
                              scheduler_specific_kwargs=extra)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
