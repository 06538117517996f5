"""What every scoring function does around its forward passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

__all__ = ["scoring_mode"]


@contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode, no gradients and, for a model mid mixed-precision training, autocast; restores the mode after.

    A model trained with ``bf16-mixed`` may hold frozen weights in bfloat16 next to float32 trainable ones (ftframe's
    ``frozen_dtype: auto``); outside the Trainer's autocast its layers would mix dtypes, so scoring runs under
    autocast to the 16-bit type then. Yields the model's device.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    device = next(model.parameters()).device
    low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    mixed = bool(low) and torch.float32 in dtypes
    cast = torch.autocast(device.type, dtype=low[0]) if mixed and device.type in ("cpu", "cuda") else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), cast:
            yield device
    finally:
        model.train(was_training)
