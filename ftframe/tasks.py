"""Tasks: *what* is learned, composed into every method (see DESIGN.md, "Two axes, kept apart").

A task knows which ``transformers`` auto-class builds the backbone, which ``peft`` task type adapters use, and how
to turn a batch into a loss. Methods never branch on the task; they call these members.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftframe.errors import UserError

__all__ = ["CausalLM", "Task"]


class Task:
    """Base of all tasks. Subclasses set :attr:`peft_task_type` and implement :meth:`auto_class` and :meth:`loss`."""

    peft_task_type: str = ""

    def auto_class(self) -> Any:
        """The ``transformers`` auto-class that loads the backbone for this task."""
        raise NotImplementedError(f"{type(self).__name__} must implement auto_class()")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean loss, weight)``; the weight (e.g. supervised tokens) makes means over batches exact."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        """Per-example predictions for ``ftframe predict``."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict()")


class CausalLM(Task):
    """Next-token prediction on supervised tokens only (labels of ``-100`` are ignored: prompt and padding).

    Args:
        label_smoothing: Cross-entropy label smoothing in ``[0, 1)``; 0 disables it.
        max_new_tokens: ``predict``: maximum tokens generated per prompt (greedy decoding).
    """

    peft_task_type = "CAUSAL_LM"

    def __init__(self, label_smoothing: float = 0.0, max_new_tokens: int = 256) -> None:
        self.max_new_tokens = max_new_tokens
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]  # token t is predicted from positions < t
        logits = logits[:, :-1]
        keep = labels != -100  # (B, T-1)
        n_tokens = keep.sum()
        # Only supervised positions enter the softmax: prompt logits are never upcast or normalised.
        loss = F.cross_entropy(
            logits[keep].float(), labels[keep], reduction="sum", label_smoothing=self.label_smoothing
        )
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
