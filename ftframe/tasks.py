"""Tasks: *what* is learned, composed into every method (see DESIGN.md, "Two axes, kept apart").

A task knows which ``transformers`` auto-class builds the backbone, which ``peft`` task type adapters use, and how
to turn a batch into a loss. Methods never branch on the task; they call these members.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ftframe.errors import UserError
from ftframe.losses import linear_cross_entropy
from ftframe.models import transformers_model
from ftframe.packing import is_packed, packed_forward, packing_mode, unpack, varlen_kwargs

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

    def __init__(self, label_smoothing: float = 0.0, max_new_tokens: int = 256,
                 loss_chunk_size: int | None = 256) -> None:
        self.max_new_tokens = max_new_tokens
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise UserError(f"loss_chunk_size must be >= 1 or null, got {loss_chunk_size}")
        self.label_smoothing = label_smoothing
        self.loss_chunk_size = loss_chunk_size

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
        split = _decoder_and_head(model, inputs)
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


def virtual_tokens(model: torch.nn.Module) -> tuple[bool, int]:
    """Whether ``model`` uses a peft prompt-learning method, and how many virtual tokens it puts before the input."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return False, 0
    if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING"):
        return True, 0  # prefix tuning extends every layer's attention keys/values, not the input
    return True, int(config.num_virtual_tokens)


def _decoder_and_head(model: torch.nn.Module,
                      inputs: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, output layer)`` when ``model(x).logits == head(decoder(x))``, else ``None``.

    Decided once per model by comparing both on the first few tokens of a real batch, so architectures that
    post-process logits (soft-capping, scaling) or peft methods that add virtual tokens use the plain path.
    """
    verdict = getattr(model, "_ftframe_split_ok", None)
    if verdict is False:
        return None
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        model._ftframe_split_ok = False
        return None
    base = transformers_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base:
        model._ftframe_split_ok = False
        return None
    if verdict is None:
        n = min(8, inputs["input_ids"].shape[1])
        probe = {k: v[:1, :n] for k, v in inputs.items()}
        # eval mode (dropout would make the two passes differ) and a forked RNG (the check must not shift the random
        # stream, or a resumed run -- which checks at its first step -- would draw other dropout masks)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                whole = model(**probe, use_cache=False).logits.float()
                split = head(decoder(**probe, use_cache=False).last_hidden_state).float()
        finally:
            model.train(was_training)
        ok = whole.shape == split.shape and torch.allclose(whole, split, rtol=1e-3, atol=1e-3)
        model._ftframe_split_ok = bool(ok)
        if not ok:
            return None
    return decoder, head
