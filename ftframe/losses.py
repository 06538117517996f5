"""Cross-entropy over a large vocabulary without materializing the full logits.

A causal LM's output layer turns every position into ``vocab`` logits; at 8 x 512 tokens and a 49k vocabulary that is
~800 MB in fp32 before the softmax and as much again for its gradient. :func:`linear_cross_entropy` computes the head
and the loss on chunks of positions and, when gradients are needed, the gradient of each chunk right away, so only
one chunk of logits is ever alive. Values and gradients equal ``F.cross_entropy(head(h).float(), y)`` (tested).
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["PREFERENCE_LOSSES", "linear_cross_entropy", "linear_token_logps", "preference_loss", "token_logps"]


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


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float32 log-probabilities of ``labels`` under ``(N, V)`` logits."""
    logits = logits.float()
    return logits.gather(-1, labels[:, None]).squeeze(-1) - logits.logsumexp(-1)


def linear_token_logps(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                       chunk_size: int | None = 256) -> torch.Tensor:
    """``(N,)`` float32 log-probabilities of ``labels`` under ``head(hidden)``, chunk by chunk.

    With gradients, each chunk runs under activation checkpointing: its ``(chunk, vocab)`` logits are recomputed in
    the backward pass instead of kept, so memory stays at one chunk of logits (preference losses need per-token
    values, which the fused sum of :func:`linear_cross_entropy` does not give). ``chunk_size=None``: all at once.
    """
    n = hidden.shape[0]
    if n == 0:
        return hidden.new_zeros((0,), dtype=torch.float32) + hidden.sum() * 0.0
    if chunk_size is None or n <= chunk_size:
        return token_logps(head(hidden), labels)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad
                                              or any(p.requires_grad for p in head.parameters()))
    parts = []
    for s in range(0, n, chunk_size):
        h, y = hidden[s: s + chunk_size], labels[s: s + chunk_size]
        if needs_grad:
            parts.append(checkpoint(lambda h, y: token_logps(head(h), y), h, y, use_reentrant=False))
        else:
            parts.append(token_logps(head(h), y))
    return torch.cat(parts)


PreferenceLoss = Literal["dpo", "ipo", "hinge", "robust", "simpo", "orpo"]
#: Losses that compare with a reference model (the others -- SimPO, ORPO -- are reference-free).
PREFERENCE_LOSSES: dict[str, bool] = {"dpo": True, "ipo": True, "hinge": True, "robust": True, "simpo": False,
                                      "orpo": False}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler, 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(kind: PreferenceLoss, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                    rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                    ref_rejected: torch.Tensor | None = None, beta: float = 0.1, label_smoothing: float = 0.0,
                    gamma: float = 0.5, sft_weight: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean loss over the pairs, chosen rewards, rejected rewards)`` of one batch of preference pairs.

    ``chosen`` / ``rejected``: ``(B,)`` log-probabilities of each response summed over its tokens, ``*_tokens`` their
    token counts, ``ref_*`` the same under the reference model (needed by the losses of :data:`PREFERENCE_LOSSES`
    marked ``True``). With ``h = (chosen - ref_chosen) - (rejected - ref_rejected)``:

    * ``dpo``: ``-log sigmoid(beta h)`` (Rafailov et al., 2023);
    * ``robust``: DPO for labels flipped with probability ``label_smoothing`` (Chowdhury et al., 2024):
      ``((1 - e) l(h) - e l(-h)) / (1 - 2e)`` with ``l(x) = -log sigmoid(beta x)``;
    * ``hinge``: ``max(0, 1 - beta h)`` (SLiC, Zhao et al., 2023);
    * ``ipo``: ``(h_c / n_c - h_r / n_r - 1 / (2 beta))^2`` with the log-ratios averaged per token (Azar et al., 2023,
      in the length-normalised form its authors use);
    * ``simpo``: ``-log sigmoid(beta (chosen / n_c - rejected / n_r) - gamma)``, reference-free, with label smoothing as
      in conservative DPO, plus ``sft_weight`` x the chosen responses' token-mean NLL (Meng et al., 2024);
    * ``orpo``: the chosen responses' token-mean NLL ``- beta`` x mean ``log sigmoid`` of the log odds ratio of the
      per-token mean log-probabilities (Hong et al., 2024).

    Rewards: ``beta`` x the log-ratio to the reference, or ``beta`` x the per-token mean log-probability for the
    reference-free losses (as TRL reports them).
    """
    if PREFERENCE_LOSSES[kind] and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"the {kind} loss needs the reference model's log-probabilities")
    nc, nr = chosen_tokens.to(chosen.dtype).clamp(min=1), rejected_tokens.to(chosen.dtype).clamp(min=1)
    if PREFERENCE_LOSSES[kind]:
        hc, hr = chosen - ref_chosen, rejected - ref_rejected
        h = hc - hr
        if kind == "dpo":
            losses = -F.logsigmoid(beta * h)
        elif kind == "robust":
            e = label_smoothing
            losses = ((1 - e) * -F.logsigmoid(beta * h) - e * -F.logsigmoid(-beta * h)) / (1 - 2 * e)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * h)
        else:  # ipo
            losses = (hc / nc - hr / nr - 1 / (2 * beta)) ** 2
        return losses.mean(), beta * hc.detach(), beta * hr.detach()
    ac, ar = chosen / nc, rejected / nr
    nll = -chosen.sum() / nc.sum()
    if kind == "simpo":
        logits = beta * (ac - ar) - gamma
        e = label_smoothing
        loss = ((1 - e) * -F.logsigmoid(logits) - e * F.logsigmoid(-logits)).mean()
        if sft_weight:
            loss = loss + sft_weight * nll
    else:  # orpo
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        loss = nll - beta * F.logsigmoid(log_odds).mean()
    return loss, beta * ac.detach(), beta * ar.detach()
