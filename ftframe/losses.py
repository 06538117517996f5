"""Cross-entropy over a large vocabulary without materializing the full logits.

A causal LM's output layer turns every position into ``vocab`` logits; at 8 x 512 tokens and a 49k vocabulary that is
~800 MB in fp32 before the softmax and as much again for its gradient. :func:`linear_cross_entropy` computes the head
and the loss on chunks of positions and, when gradients are needed, the gradient of each chunk right away, so only
one chunk of logits is ever alive. Values and gradients equal ``F.cross_entropy(head(h).float(), y)`` (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["linear_cross_entropy"]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=smoothing)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T``; the backward pass reuses gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, smoothing, chunk, dtype):  # type: ignore[override]
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                h = hidden[s: s + chunk].to(dtype)
                y = labels[s: s + chunk]
                z = (h @ w.T).float()  # (chunk, vocab): the only full-width tensor, freed every iteration
                lse = torch.logsumexp(z, dim=-1)
                nll = lse - z.gather(1, y[:, None]).squeeze(1)
                if smoothing:
                    nll = (1 - smoothing) * nll + smoothing * (lse - z.mean(dim=-1))
                total += nll.sum()
                # d(sum nll)/dz = softmax(z) - (1 - s) * onehot(y) - s / vocab, computed in place
                g = z.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -(1 - smoothing)))
                if smoothing:
                    g.sub_(smoothing / vocab)
                g = g.to(dtype)
                grad_h[s: s + chunk] = g @ w
                if grad_w is not None:
                    grad_w.add_((g.T @ h).float())
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.weight_dtype = weight.dtype
        ctx.has_grad_w = grad_w is not None
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    chunk_size: int | None = 1024,
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
    if plain and needs_grad:
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, float(label_smoothing), int(chunk_size),
                                              _compute_dtype(hidden))
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_size):
        h, y = hidden[s: s + chunk_size], labels[s: s + chunk_size]
        if needs_grad and n > chunk_size:  # several chunks: keep only one chunk's logits alive at a time
            total = total + checkpoint(lambda h, y: _chunk_loss(head(h), y, label_smoothing), h, y,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(head(h), y, label_smoothing)
    return total
