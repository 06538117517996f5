"""DoRA: weight-decomposed low-rank adaptation.

Each targeted weight is split into a magnitude (a trained vector, one entry per output row) and a direction (the
frozen weight plus a LoRA update, normalised row by row); both parts train (Liu et al., 2024, "DoRA:
Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353). Built on ``peft.LoraConfig(use_dora=
True)``; the saved adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

from ftframe.methods.base import Variant
from ftframe.methods.lora import LoRA, lora_config

__all__ = ["DoRA"]


class DoRA(LoRA):
    """LoRA with a trained magnitude per output row. Takes the options of :class:`LoRA`."""

    variants = {"DoRA": Variant({"r": 4, "dropout": 0.0}, "lora_A|lora_B|lora_magnitude_vector",
                                compare=("dora", "dora"))}

    # DoRA reads the frozen weight outside matmuls (row norms), so it stays in its loaded dtype
    cast_frozen_weights = False

    def peft_config(self) -> Any:
        config = lora_config(**self.lora)
        config.use_dora = True
        return config
