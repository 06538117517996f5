"""A method defined outside ftframe, as a user would: only the RMSNorm scales train (a tiny "BitFit"-like method)."""

from __future__ import annotations

import torch

from ftframe.methods import FineTuneModule


class NormOnly(FineTuneModule):
    """Train only normalization scales.

    Args:
        include_final_norm: Also train the final norm before the LM head.
        **kwargs: See :class:`FineTuneModule`.
    """

    def __init__(self, *args, include_final_norm: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.include_final_norm = include_final_norm

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm") and (self.include_final_norm or "layers." in name):
                module.requires_grad_(True)
        return model
