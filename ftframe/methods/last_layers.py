"""Last layers: train only the top transformer blocks and the output head; 0 blocks is a linear probe.

The classic way to adapt a pre-trained network cheaply (Yosinski et al., 2014, "How transferable are features in
deep neural networks?", https://arxiv.org/abs/1411.1792), optionally with gradual unfreezing from the top down
(Howard & Ruder, 2018, https://arxiv.org/abs/1801.06146). The trained artifact is the whole model, saved as a
Hugging Face folder (safetensors).
"""

from __future__ import annotations

from typing import Any

import torch

from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant
from ftframe.models import transformer_blocks

__all__ = ["LastLayers"]


class LastLayers(FineTuneModule):
    """Train the top ``num_layers`` blocks, the final norm and the output head; everything else stays frozen.

    ``num_layers: 0`` is a linear probe: the output head alone trains.

    With tied input/output embeddings (as in SmolLM2) the head *is* the input embedding matrix, so it trains too.

    Args:
        num_layers: Blocks to train, counted from the top; 0 trains the head only (a linear probe).
        train_head: Train the output head (and, when blocks train, the final norm); ``false`` trains the blocks only.
        unfreeze_every: Gradual unfreezing: start with ``num_layers`` blocks and unfreeze one more block (from the top
            down) every this many optimizer steps; ``null`` keeps the set fixed.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {
        "LastLayers": Variant({"num_layers": 1}, r"\.layers\.1\.|model\.norm\.weight$|embed_tokens",
                              compare=("last_layers (N=2)", "last_layers")),
        "LinearProbe": Variant({"num_layers": 0}, "embed_tokens", matrix=False,
                               compare=("linear_probe (N=0)", "last_layers --model.num_layers=0")),
    }

    # frozen blocks are used only through matmuls, so they may be stored in the autocast dtype
    cast_frozen_weights = True

    def __init__(self, *args, num_layers: int = 2, train_head: bool = True, unfreeze_every: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if num_layers < 0:
            raise UserError(f"num_layers must be >= 0, got {num_layers}")
        if num_layers == 0 and not train_head:
            raise UserError("num_layers: 0 with train_head: false leaves nothing to train")
        if unfreeze_every is not None and unfreeze_every < 1:
            raise UserError(f"unfreeze_every must be >= 1 or null, got {unfreeze_every}")
        self.num_layers = num_layers
        self.train_head = train_head
        self.unfreeze_every = unfreeze_every

    def check_base(self, config: Any) -> None:
        layers = getattr(config, "num_hidden_layers", None)
        if layers is not None and self.num_layers > layers:
            raise UserError(f"LastLayers: num_layers={self.num_layers}, but {self.model_name!r} has {layers} blocks; "
                            f"use 0..{layers} ({layers} trains every block: see FullFineTune)")

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        blocks = transformer_blocks(model)
        if self.num_layers > len(blocks):
            raise UserError(f"num_layers={self.num_layers} but {type(model).__name__} has {len(blocks)} blocks")
        model.requires_grad_(False)
        for block in list(blocks)[len(blocks) - self.num_layers:]:
            block.requires_grad_(True)
        if self.train_head:
            head = self.task.head(model)
            if head is None:
                raise UserError(f"LastLayers: {type(model).__name__} has no output head to train; set train_head: false")
            head.requires_grad_(True)
            norm = getattr(getattr(model, "model", None), "norm", None)
            if self.num_layers > 0 and isinstance(norm, torch.nn.Module):  # a linear probe trains the head alone
                norm.requires_grad_(True)
        self._pending = list(reversed(list(blocks)[: len(blocks) - self.num_layers]))
        if self.unfreeze_every is not None:
            # the optimizer is built from parameters that require grad, so every block that may unfreeze later must
            # require grad now; on_train_batch_start freezes the ones whose turn has not come (no gradient, no update)
            for block in self._pending:
                block.requires_grad_(True)
        return model

    def setup(self, stage: str) -> None:
        # each fit builds a new optimizer from the parameters that require grad: include every block that may unfreeze
        if self.unfreeze_every is not None and stage == "fit":
            for block in getattr(self, "_pending", []):
                block.requires_grad_(True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.unfreeze_every is None:
            return
        unfrozen = min(len(self._pending), self.trainer.global_step // self.unfreeze_every)
        for i, block in enumerate(self._pending):
            block.requires_grad_(i < unfrozen)
