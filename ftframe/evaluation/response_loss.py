"""Response loss: the mean negative log-likelihood per supervised token on instruction data, as training measures it.

The records are read, split, templated and masked by :class:`ftframe.data.InstructionDataModule` with the same options
as training, so ``split: val`` scores exactly the held-out examples and the number is the validation loss a run logs.
It is the cheap, deterministic way to compare models on a task (base vs. fine-tuned vs. merged vs. combined adapters);
generation exact match is the end-to-end one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ftframe.errors import UserError

__all__ = ["load_loss_batches", "response_loss"]


def load_loss_batches(
    data: str,
    tokenizer: str,
    split: Literal["all", "val", "train"] = "val",
    val_size: float = 64,
    split_seed: int = 42,
    max_length: int = 1024,
    batch_size: int = 8,
    limit: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized, masked batches of ``data`` (a file or asset name) for :func:`response_loss`.

    ``split`` picks the examples ``InstructionDataModule(val_size=val_size, seed=split_seed)`` holds out (``val``),
    trains on (``train``) or all of them (``all``); ``tokenizer`` is a model name or a folder with a tokenizer.
    """
    from ftframe.data.instruction import InstructionDataModule

    dm = InstructionDataModule(train_files=data, val_size=0 if split == "all" else val_size, seed=split_seed,
                               tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                               eval_batch_size=batch_size,
                               max_train_examples=limit, max_val_examples=limit)
    dm.prepare_data()
    dm.setup("fit")
    if split == "val":
        loader = dm.val_dataloader()
    else:
        from torch.utils.data import DataLoader

        # in file order, unlike the training loader's shuffled one
        loader = DataLoader(dm.train_dataset, batch_size=batch_size, shuffle=False, collate_fn=dm._collator())
    batches = list(loader)
    if not batches:
        raise UserError(f"{data}: no examples in split {split!r} to compute the response loss on")
    return batches


@torch.inference_mode()
def response_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Token-weighted mean NLL of the supervised (response) tokens, its perplexity, and the counts."""
    from ftframe.tasks import CausalLM

    task = CausalLM()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens, examples = 0.0, 0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss, weight = task.loss(model, batch)
            total += float(loss) * float(weight)
            tokens += int(weight)
            # a packed batch is one row holding every example: count them by id
            examples += len(batch["example_ids"]) if "example_ids" in batch else int(batch["input_ids"].shape[0])
    finally:
        model.train(was_training)
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": tokens, "examples": examples}
