"""Full fine-tuning: every weight of the base model is trained.

The baseline every parameter-efficient method is compared with (Howard & Ruder, 2018, "Universal Language Model
Fine-tuning", https://arxiv.org/abs/1801.06146). The trained artifact is the whole model, saved as a Hugging Face
folder (safetensors).
"""

from __future__ import annotations

import torch

from ftframe.methods.base import FineTuneModule, Variant

__all__ = ["FullFineTune"]


class FullFineTune(FineTuneModule):
    """Train all parameters of the base model.

    Args:
        freeze_embeddings: Keep the input embedding matrix frozen (with tied embeddings this freezes the LM head
            too); saves optimizer memory on large vocabularies.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {"FullFineTune": Variant({}, ".", compare=("full", "full"))}

    def __init__(self, *args, freeze_embeddings: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.freeze_embeddings = freeze_embeddings

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(True)
        if self.freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        return model
