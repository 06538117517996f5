"""Packed batches: a batch's examples concatenated into one row, no padding, attention kept per example.

A packed batch (built by :class:`ftframe.data.collate.PackCollator`) has shape ``(1, total tokens)`` and carries
``position_ids`` that restart at 0 for every example plus ``cu_seq_lens`` (the example boundaries, as in
flash-attention's variable-length API). Positions alone are not enough to keep examples apart in every attention
backend, so ftframe registers its own attention implementation, ``ftframe_varlen``, with ``transformers``: it runs
causal attention separately on each example's span and behaves exactly like ``sdpa`` on ordinary batches (a span
may instead carry its own boolean mask: multiple-choice scoring feeds a question's choices as branches of a token
tree that way, :func:`packed_forward`). Models
that do not route attention through ``transformers``' attention interface get the batch unpacked to padded form
instead (:func:`unpack`), so packing is never wrong, only sometimes not faster.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION", "STEP_TOKENS", "batch_examples", "enable_varlen_attention", "is_packed", "packed_forward",
    "packing_mode", "supervised_tokens", "token_lengths", "unpack", "varlen_attention", "varlen_attention_scope",
    "varlen_kwargs",
]

ATTENTION = "ftframe_varlen"
#: attention implementations that keep packed examples apart given ``cu_seq_lens_*`` keyword arguments
_VARLEN_NATIVE = {ATTENTION, "flash_attention_2", "flash_attention_3"}
# Set while ftframe itself runs a packed forward pass: the mask hook then skips building a dense
# (tokens x tokens) block-diagonal mask, because the attention function gets the example boundaries instead.
_PACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("ftframe_packed", default=False)
# the example boundaries during a packed forward pass (token_lengths() derives NEFTune's per-token scale from them)
_BOUNDS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("ftframe_bounds", default=None)
# per span, a (length, length) boolean mask (True: may attend) in place of the causal one; None: causal
_SPAN_MASKS: contextvars.ContextVar[list[torch.Tensor | None] | None] = contextvars.ContextVar("ftframe_span_masks",
                                                                                              default=None)
_registered = False


def batch_examples(batch: dict[str, Any]) -> int:
    """Number of examples in a packed or padded batch."""
    if is_packed(batch):
        return len(batch["cu_seq_lens"]) - 1
    return int(batch["input_ids"].shape[0])


#: batch key of the supervised-token count of all micro-batches of this process that form one optimizer step
#: (``ftframe.data.collate.StepWindows`` sets it; the training step adds the other processes' counts)
STEP_TOKENS = "step_tokens"


def supervised_tokens(batch: dict[str, Any]) -> torch.Tensor | None:
    """Tokens with a target in a causal-LM batch (labels other than ``-100``, after the one-token shift), or ``None``
    for a batch without per-token labels (classification). A packed batch has ``-100`` on every example's first token,
    so it counts what the same examples padded count."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return None
    return (labels[:, 1:] != -100).sum()


def is_packed(batch: dict[str, Any]) -> bool:
    return "cu_seq_lens" in batch


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args: Any, **kwargs: Any) -> Any:
        if _PACKED.get() and kwargs.get("attention_mask") is None:
            return None  # varlen attention applies causality within each example itself
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(ATTENTION, varlen_attention)
    AttentionMaskInterface.register(ATTENTION, mask)
    _registered = True


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``sdpa``, except that with ``cu_seq_lens_q`` each example's span attends causally to itself only (or, inside
    :func:`packed_forward` with ``span_masks``, as its own mask allows).

    ``query`` is ``(1, heads, tokens, head_dim)``; ``key``/``value`` may have fewer (grouped) heads. Returns the
    output as ``(1, tokens, heads, head_dim)``, the layout ``transformers`` expects from attention functions.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch has one row, got query of shape {tuple(query.shape)}")
    groups = query.shape[1] // key.shape[1]
    edges = bounds.tolist()
    masks = _SPAN_MASKS.get() or [None] * (len(edges) - 1)
    if len(masks) != len(edges) - 1:
        raise ValueError(f"{len(masks)} span masks for {len(edges) - 1} spans")
    out = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], attn_mask=m,
                                       is_causal=m is None, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1)
        for s, e, m in zip(edges[:-1], edges[1:], masks, strict=True)
    ]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def enable_varlen_attention(model: torch.nn.Module) -> bool:
    """Switch a ``transformers`` model that uses ``sdpa`` to ``ftframe_varlen`` (identical on unpacked batches).

    Returns whether the model can now take packed batches with per-example attention.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in _VARLEN_NATIVE:
        return True
    if impl != "sdpa" or not getattr(model, "_supports_attention_backend", False):
        return False
    _register()
    model.set_attn_implementation(ATTENTION)
    return getattr(model.config, "_attn_implementation", None) == ATTENTION


@contextmanager
def varlen_attention_scope(model: torch.nn.Module) -> Iterator[bool]:
    """Run a ``transformers`` model on ``ftframe_varlen`` attention for a while (from ``sdpa`` or ``eager``), then
    put its attention implementation back. Yields whether the model is on ``ftframe_varlen``."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == ATTENTION:
        yield True
        return
    if impl not in ("sdpa", "eager") or not getattr(model, "_supports_attention_backend", False):
        yield False
        return
    _register()
    model.set_attn_implementation(ATTENTION)
    try:
        yield getattr(model.config, "_attn_implementation", None) == ATTENTION
    finally:
        model.set_attn_implementation(impl)


def packing_mode(model: torch.nn.Module) -> str:
    """``varlen`` (boundaries passed to attention), or ``unpack`` (the model cannot isolate packed examples)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "varlen" if impl in _VARLEN_NATIVE else "unpack"


@contextmanager
def packed_forward(cu_seq_lens: torch.Tensor | None = None,
                   span_masks: list[torch.Tensor | None] | None = None) -> Iterator[None]:
    """Mark a packed forward pass; with ``cu_seq_lens``, :func:`token_lengths` gives each token's example length.

    ``span_masks`` (one per span, ``None`` for causal) replaces a span's causal mask with its own ``(length, length)``
    boolean one, for ``ftframe_varlen`` attention.
    """
    token, token_b, token_m = _PACKED.set(True), _BOUNDS.set(cu_seq_lens), _SPAN_MASKS.set(span_masks)
    try:
        yield
    finally:
        _SPAN_MASKS.reset(token_m)
        _BOUNDS.reset(token_b)
        _PACKED.reset(token)


def token_lengths() -> torch.Tensor | None:
    """Inside a packed forward pass: the length of the example each token belongs to, shape ``(tokens,)``."""
    bounds = _BOUNDS.get()
    if bounds is None:
        return None
    sizes = (bounds[1:] - bounds[:-1]).long()
    return torch.repeat_interleave(sizes, sizes)


def varlen_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments that carry a packed batch's example boundaries to the attention functions."""
    cu = batch["cu_seq_lens"].to(torch.int32)
    longest = int(batch["max_seq_len"]) if "max_seq_len" in batch else int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def unpack(batch: dict[str, torch.Tensor], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Turn a packed batch back into a right-padded ``(examples, longest)`` batch with an attention mask."""
    edges = batch["cu_seq_lens"].tolist()
    lengths = [e - s for s, e in zip(edges[:-1], edges[1:], strict=True)]
    n, longest = len(lengths), max(lengths)
    device = batch["input_ids"].device
    input_ids = torch.full((n, longest), pad_token_id, dtype=batch["input_ids"].dtype, device=device)
    labels = torch.full((n, longest), -100, dtype=batch["labels"].dtype, device=device)
    attention_mask = torch.zeros((n, longest), dtype=torch.long, device=device)
    for i, (s, e) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        input_ids[i, : e - s] = batch["input_ids"][0, s:e]
        labels[i, : e - s] = batch["labels"][0, s:e]
        attention_mask[i, : e - s] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
