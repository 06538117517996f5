"""``CausalLM``: next-token prediction on the supervised (response) tokens."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ftframe.errors import UserError
from ftframe.losses import linear_cross_entropy
from ftframe.models import transformers_model
from ftframe.packing import is_packed, packed_forward, packing_mode, unpack, varlen_kwargs
from ftframe.tasks.base import Task, decoder_and_head, virtual_tokens

__all__ = ["CausalLM"]


class CausalLM(Task):
    """Next-token prediction on supervised tokens only (labels of ``-100`` are ignored: prompt and padding).

    The output layer and the softmax run only on positions that have a target, in chunks, so the full
    ``(tokens x vocab)`` logits are never built (see :mod:`ftframe.losses`). Packed batches (one row holding the whole
    batch, see ``InstructionDataModule(packing=...)``) are run with per-example attention.

    Args:
        label_smoothing: Cross-entropy label smoothing in ``[0, 1)``; 0 disables it.
        max_new_tokens: ``predict``: maximum tokens generated per prompt (greedy decoding).
        loss_chunk_size: Positions per chunk of the output layer + loss; smaller saves memory, ``None`` computes all
            logits at once (the plain way, for comparison).
    """

    peft_task_type = "CAUSAL_LM"
    token_weighted = True

    def __init__(self, label_smoothing: float = 0.0, max_new_tokens: int = 256,
                 loss_chunk_size: int | None = 256) -> None:
        self.max_new_tokens = max_new_tokens
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise UserError(f"loss_chunk_size must be >= 1 or null, got {loss_chunk_size}")
        self.label_smoothing = label_smoothing
        self.loss_chunk_size = loss_chunk_size

    def bind(self, datamodule: Any) -> None:
        if getattr(datamodule, "label_names", None) is not None:  # set up with labelled texts
            raise UserError(f"{type(datamodule).__name__} holds labelled texts, but the task is causal-LM tuning; set "
                            "model.task to SequenceClassification (--model.task SequenceClassification), or give the "
                            "files to InstructionDataModule as prompt/completion pairs to generate the labels")

    def auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        packed = is_packed(batch)
        prompt_learning, virtual = virtual_tokens(model)
        if packed and (prompt_learning or packing_mode(transformers_model(model)) == "unpack"):
            batch, packed = unpack(batch), False  # virtual tokens go in front of each example, not of the row
        targets = batch["labels"][:, 1:]  # token t is predicted from positions < t
        keep = targets != -100  # (B, T-1); a packed batch has -100 on every example's first token
        n_tokens = keep.sum()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        extra = varlen_kwargs(batch) if packed else {}
        split = decoder_and_head(model, inputs)
        with packed_forward(batch["cu_seq_lens"]) if packed else nullcontext():
            if split is None:  # a model whose logits are more than head(decoder(x)): the plain way
                logits = model(**inputs, **extra, use_cache=False).logits[:, virtual:-1]  # (B, T-1, V)
                loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum",
                                       label_smoothing=self.label_smoothing)
            else:
                decoder, head = split
                hidden = decoder(**inputs, **extra, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, d)
                loss = linear_cross_entropy(hidden[keep], head, targets[keep], self.label_smoothing,
                                            self.loss_chunk_size)
        return loss / n_tokens.clamp(min=1), n_tokens

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        """Greedy answers to the prompts of a left-padded prompt-only batch, with the reference responses."""
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        results = []
        for i in range(len(new)):
            ref = batch["reference_ids"][i]
            results.append({
                "prompt": tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()],
                                           skip_special_tokens=False),
                "prediction": tokenizer.decode(new[i], skip_special_tokens=True).strip(),
                "reference": tokenizer.decode(ref[ref != -100], skip_special_tokens=True).strip(),
            })
        return results
