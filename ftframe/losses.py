"""Cross-entropy over a large vocabulary without materializing the full logits.

A causal LM's output layer turns every position into ``vocab`` logits; at 8 x 512 tokens and a 49k vocabulary that is
~800 MB in fp32 before the softmax and as much again for its gradient. :func:`linear_cross_entropy` computes the head
and the loss on chunks of positions and, when gradients are needed, the gradient of each chunk right away, so only
one chunk of logits is ever alive. Values and gradients equal ``F.cross_entropy(head(h).float(), y)`` (tested).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["linear_cross_entropy"]


# 16-bit copies of frozen output-layer weights, reused across steps (a 49k x 576 cast costs ~90 ms on a 2-core CPU)
# (keyed by id; the weak reference tells a live weight from a new tensor that reused a dead one's id)
_CAST_CACHE: dict[int, tuple[weakref.ref, int, torch.dtype, torch.Tensor]] = {}


def _cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad:
        return weight.to(dtype)
    hit = _CAST_CACHE.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == dtype:
        return hit[3]
    for key in [k for k, v in _CAST_CACHE.items() if v[0]() is None]:
        del _CAST_CACHE[key]
    cast = weight.detach().to(dtype)
    _CAST_CACHE[id(weight)] = (weakref.ref(weight), weight._version, dtype, cast)
    return cast


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=smoothing)


def _fused_chunks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, smoothing: float, chunk: int,
                  dtype: torch.dtype, grad_h: torch.Tensor | None,
                  grad_w: torch.Tensor | None) -> torch.Tensor:
    """Sum of cross-entropy of ``hidden @ weight.T`` (computed in ``dtype``), chunk by chunk.

    When ``grad_h`` / ``grad_w`` are given, the gradients of the sum are written / accumulated into them on the way.
    Three ``(chunk, vocab)`` buffers are reused for every chunk: fresh multi-MB allocations page-fault on every use.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    c = min(chunk, n)
    w = _cast_weight(weight, dtype)
    z = torch.empty((c, vocab), dtype=dtype, device=hidden.device)  # logits in the compute dtype
    zf = z if dtype == torch.float32 else torch.empty((c, vocab), dtype=torch.float32, device=hidden.device)
    buf = torch.empty((c, vocab), dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, n, c):
            h = hidden[s: s + c].to(dtype)
            y = labels[s: s + c, None]
            k = h.shape[0]
            torch.mm(h, w.T, out=z[:k])
            if zf is not z:
                zf[:k].copy_(z[:k])
            logp = torch.log_softmax(zf[:k], dim=-1, out=buf[:k])
            nll = -logp.gather(1, y).squeeze(1)
            if smoothing:
                nll = (1 - smoothing) * nll - smoothing * logp.mean(dim=-1)
            total += nll.sum()
            if grad_h is None and grad_w is None:
                continue
            # d(sum nll)/dz = softmax(z) - (1 - s) * onehot(y) - s / vocab   (softmax: far faster than exp on CPU)
            g = torch.softmax(zf[:k], dim=-1, out=buf[:k])
            g.scatter_add_(1, y, torch.full((k, 1), -(1 - smoothing), dtype=g.dtype, device=g.device))
            if smoothing:
                g.sub_(smoothing / vocab)
            if z is not zf:
                g = z[:k].copy_(g)
            if grad_h is not None:
                grad_h[s: s + c] = g @ w
            if grad_w is not None:
                grad_w.add_((g.T @ h).float())
    return total


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T``; the backward pass reuses gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, smoothing, chunk, dtype):  # type: ignore[override]
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                  if ctx.needs_input_grad[1] else None)
        total = _fused_chunks(hidden, weight, labels, smoothing, chunk, dtype, grad_h, grad_w)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w)))
        ctx.weight_dtype = weight.dtype
        ctx.has = (grad_h is not None, grad_w is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.has[0] else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """``sum`` of cross-entropy of ``head(hidden)`` against ``labels``, over chunks of ``chunk_size`` positions.

    Args:
        hidden: ``(N, d)`` final hidden states of the positions that have a target.
        head: The output layer. A plain ``nn.Linear`` without bias takes the fused path (loss and gradient per chunk,
            no recomputation); any other module (an adapter-wrapped or sharded head) is called per chunk under
            activation checkpointing, which recomputes its chunk in the backward pass.
        labels: ``(N,)`` target ids.
        label_smoothing: As in ``torch.nn.functional.cross_entropy``.
        chunk_size: Positions per chunk; ``None`` computes all logits at once (the plain, memory-hungry way).
    """
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum() * 0.0
    if chunk_size is None:
        return _chunk_loss(head(hidden), labels, label_smoothing)
    weight = getattr(head, "weight", None)
    plain = (type(head) is torch.nn.Linear and head.bias is None and type(weight) is torch.nn.Parameter
             and weight.device == hidden.device)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))
    if plain:
        dtype = _compute_dtype(hidden)
        if needs_grad:
            return _FusedLinearCrossEntropy.apply(hidden, weight, labels, float(label_smoothing), int(chunk_size),
                                                  dtype)
        with torch.no_grad():
            return _fused_chunks(hidden, weight, labels, float(label_smoothing), int(chunk_size), dtype, None, None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        h, y = hidden[s: s + chunk_size], labels[s: s + chunk_size]
        if needs_grad and n > chunk_size:  # several chunks: keep only one chunk's logits alive at a time
            total = total + checkpoint(lambda h, y: _chunk_loss(head(h), y, label_smoothing), h, y,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(head(h), y, label_smoothing)
    return total
