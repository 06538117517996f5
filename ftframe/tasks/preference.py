"""``Preference``: DPO-family preference tuning on (prompt, chosen, rejected) pairs, composed into every method.

A batch holds each pair's chosen response in the first half of its rows and the rejected one in the second half (one
forward pass for both; ``ftframe.data.PreferenceDataModule`` builds such batches). A response's log-probability is
summed over its supervised tokens only (labels ``-100`` on the prompt and padding).

The reference model is never a second copy: the method's :meth:`~ftframe.methods.FineTuneModule.reference_context`
(the starting adapter switched in, or the adapters switched off) where it has one; otherwise (full fine-tuning, last
layers, PiSSA / LoftQ starts) every pair's reference log-probabilities are computed once when fitting starts, with the
weights as loaded, and kept in the checkpoints so a resumed run does not recompute them (docs/preference.md).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import Metric

from ftframe.errors import UserError
from ftframe.losses import PREFERENCE_LOSSES, PreferenceLoss, linear_token_logps, preference_loss, token_logps
from ftframe.packing import is_packed
from ftframe.tasks.base import Task, decoder_and_head

__all__ = ["PAIR_STATS", "PairMetrics", "Preference", "sequence_logps"]

#: What :class:`Preference` logs per pair (``train/<name>`` every step, ``val/<name>`` over the validation set).
PAIR_STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
              "logps/rejected")


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   chunk_size: int | None = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probability summed over each row's supervised tokens (R,), those tokens' count (R,))`` of a padded
    batch; float32. Positions a prompt-learning method puts in front of the input are skipped."""
    if is_packed(batch):
        raise UserError("Preference batches must be padded (chosen rows, then rejected rows), not packed")
    ids = batch["input_ids"]
    targets = batch["labels"][:, 1:]  # token t is predicted from positions < t
    keep = targets != -100
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
    split = decoder_and_head(model, inputs)
    if split is None:  # logits are more than head(decoder(x)), or virtual tokens come first: the plain way
        logits = model(**inputs, use_cache=False).logits[:, -ids.shape[1]:][:, :-1]  # (R, T-1, V)
        lp = token_logps(logits[keep], targets[keep])
    else:
        decoder, head = split
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
        lp = linear_token_logps(hidden[keep], head, targets[keep], chunk_size)
    rows = keep.nonzero()[:, 0]
    sums = lp.new_zeros(ids.shape[0]).index_add(0, rows, lp)
    return sums, keep.sum(1)


class PairMetrics(Metric):
    """Means over all pairs of :data:`PAIR_STATS` (summed over processes by torchmetrics)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sums", default=torch.zeros(len(PAIR_STATS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: torch.Tensor, pairs: torch.Tensor) -> None:  # stats: (B, len(PAIR_STATS))
        self.sums += stats.double().sum(0)
        self.pairs += stats.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.sums / self.pairs.clamp(min=1)).float()


class Preference(Task):
    """Learn from pairs of a preferred (chosen) and a dispreferred (rejected) response to the same prompt.

    Works with every method (the adapters, prompt learning, full fine-tuning, last layers) and every callback; the
    data module must give paired batches (``ftframe.data.PreferenceDataModule``).

    Args:
        loss: ``dpo`` (sigmoid), ``ipo``, ``hinge``, ``robust`` (DPO with ``label_smoothing`` as the label-flip rate), or
            the reference-free ``simpo`` and ``orpo`` (formulas in :func:`ftframe.losses.preference_loss`).
        beta: Strength of the implicit KL penalty to the reference (DPO family: typical 0.05-0.5; IPO: its tau);
            SimPO: the reward scale (typical 2-10); ORPO: the weight of the odds-ratio term (its lambda, ~0.1).
        label_smoothing: ``robust``: assumed probability that a pair's labels are flipped, in ``[0, 0.5)``; ``simpo``:
            conservative smoothing of its sigmoid loss. Must be 0 for the other losses.
        simpo_gamma: SimPO's target reward margin (``gamma``; the paper uses 0.5-1.5 with ``beta`` 2-2.5).
        sft_weight: SimPO: weight of an added NLL term on the chosen responses (0: the paper's loss). ORPO always has
            its NLL term (weight 1).
        reference: Where the reference log-probabilities come from: ``auto`` -- the method's own switch (the starting
            adapter, or the adapters off: one extra forward pass per step without gradients) where it has one, else
            ``precomputed``; ``precomputed`` -- one pass over all training and validation pairs when fitting starts,
            kept in checkpoints (no per-step cost). Ignored by ``simpo`` and ``orpo``.
        loss_chunk_size: Positions per chunk of the output layer (as in ``CausalLM``); ``None``: all logits at once.
    """

    peft_task_type = "CAUSAL_LM"

    def __init__(self, loss: PreferenceLoss = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, sft_weight: float = 0.0,
                 reference: Literal["auto", "precomputed"] = "auto", loss_chunk_size: int | None = 256) -> None:
        if loss not in PREFERENCE_LOSSES:
            raise UserError(f"loss must be one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
        if beta <= 0:
            raise UserError(f"beta must be > 0, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise UserError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss not in ("robust", "simpo"):
            raise UserError(f"label_smoothing applies to the robust and simpo losses, not {loss}; use loss: robust "
                            "for DPO with noisy labels")
        if sft_weight < 0:
            raise UserError(f"sft_weight must be >= 0, got {sft_weight}")
        if sft_weight and loss != "simpo":
            raise UserError(f"sft_weight applies to the simpo loss (orpo has its own NLL term), not {loss}")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise UserError(f"loss_chunk_size must be >= 1 or null, got {loss_chunk_size}")
        self.loss_name = loss
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        self.simpo_gamma = float(simpo_gamma)
        self.sft_weight = float(sft_weight)
        self.reference = reference
        self.loss_chunk_size = loss_chunk_size
        self._module: Any = None
        self._table: torch.Tensor | None = None  # pair id -> (chosen, rejected) reference log-probabilities
        self._logs: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up
    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares with a reference model."""
        return PREFERENCE_LOSSES[self.loss_name]

    @property
    def needs_reference_model(self) -> bool:  # type: ignore[override]
        return self.needs_reference and self.reference == "auto"

    def auto_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def bind(self, datamodule: Any) -> None:
        if datamodule is not None and not getattr(datamodule, "paired", False):
            raise UserError(f"the Preference task needs chosen / rejected pairs, but the data module is "
                            f"{type(datamodule).__name__}; use ftframe.data.PreferenceDataModule (records with prompt, "
                            "chosen and rejected)")

    def attach(self, module: Any) -> None:
        self._module = module

    def _switch(self) -> AbstractContextManager[Any] | None:
        """The method's way to compute the reference with the model being trained, or ``None``."""
        if self.reference == "precomputed" or self._module is None:
            return None
        return self._module.reference_context()

    def reference_source(self) -> str:
        """How the reference log-probabilities are obtained in this run (printed at the start, and documented)."""
        if not self.needs_reference:
            return f"none ({self.loss_name} is reference-free)"
        switch = self._switch()
        if switch is None:
            return "precomputed once with the starting weights, kept in checkpoints"
        init = getattr(self._module, "init_adapter", None)
        return (f"the starting adapter {init} (frozen, switched in)" if init else "the base with the adapters "
                "switched off") + " -- no second model"

    def on_fit_start(self, module: Any) -> None:
        self._module = module
        rank_zero_info(f"[ftframe] Preference ({self.loss_name}, beta={self.beta}): reference = "
                       f"{self.reference_source()}")
        if self.needs_reference and self._switch() is None and self._table is None:
            self._table = self._precompute(module)

    def state_dict(self) -> dict[str, Any]:
        return {"reference_logps": self._table} if self._table is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reference_logps") is not None:
            self._table = state["reference_logps"].float()

    @torch.no_grad()
    def _precompute(self, module: Any) -> torch.Tensor:
        from ftframe.device import is_rank_zero
        from ftframe.progress import bar as progress_bar

        datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "reference_dataloaders"):
            raise UserError("precomputed reference log-probabilities need a PreferenceDataModule (it lists every pair)")
        loaders, total = datamodule.reference_dataloaders()
        table = torch.full((total, 2), float("nan"))
        model = module.model
        was_training = model.training
        model.eval()  # the reference is deterministic: no dropout
        try:
            bar = progress_bar(total=sum(len(loader) for loader in loaders), desc="reference log-probabilities", unit=" batch",
                       mininterval=2, disable=not is_rank_zero())
            for loader in loaders:
                for batch in loader:
                    batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    with _autocast(module):
                        sums, _ = sequence_logps(model, batch, self.loss_chunk_size)
                    b = len(batch["pair_id"])
                    table[batch["pair_id"].cpu()] = torch.stack([sums[:b], sums[b:]], 1).float().cpu()
                    bar.update()
            bar.close()
        finally:
            model.train(was_training)
        return table

    # ------------------------------------------------------------------ computing
    def _reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        b = batch["input_ids"].shape[0] // 2
        switch = self._switch()
        if switch is None:
            if self._table is None:  # evaluating outside fit (ftframe validate / test) without a checkpoint's table
                rank_zero_warn("[ftframe] Preference: no reference log-probabilities were precomputed for this run; "
                               "using the model as it is now as the reference (rewards then start at 0)")
                self._table = self._precompute(self._module)
            ref = self._table[batch["pair_id"].cpu()].to(batch["input_ids"].device)
            if torch.isnan(ref).any():
                raise UserError("a pair has no precomputed reference log-probability: the data changed since the "
                                "checkpoint was written; start a new run")
            return ref[:, 0], ref[:, 1]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), switch:
                sums, _ = sequence_logps(model, batch, self.loss_chunk_size)
        finally:
            model.train(was_training)
        return sums[:b], sums[b:]

    def compute(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean loss over the batch's pairs, number of pairs, per-pair statistics (B, len(PAIR_STATS)))``."""
        rows = batch["input_ids"].shape[0]
        if rows % 2 or "pair_id" not in batch:
            raise UserError("a Preference batch holds its pairs' chosen rows then their rejected rows and a pair_id "
                            "per pair; use ftframe.data.PreferenceDataModule")
        b = rows // 2
        sums, counts = sequence_logps(model, batch, self.loss_chunk_size)
        chosen, rejected = sums[:b], sums[b:]
        ref_c = ref_r = None
        if self.needs_reference:
            ref_c, ref_r = self._reference_logps(model, batch)
        loss, rc, rr = preference_loss(self.loss_name, chosen, rejected, counts[:b], counts[b:], ref_c, ref_r,
                                       beta=self.beta, label_smoothing=self.label_smoothing, gamma=self.simpo_gamma,
                                       sft_weight=self.sft_weight)
        stats = torch.stack([rc, rr, rc - rr, (rc > rr).float(), chosen.detach(), rejected.detach()], 1)
        return loss, torch.tensor(b, device=loss.device), stats

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss, pairs, stats = self.compute(model, batch)
        self._logs = dict(zip(PAIR_STATS, stats.mean(0), strict=True))
        return loss, pairs

    def train_logs(self) -> dict[str, torch.Tensor]:
        logs, self._logs = self._logs, {}
        return logs

    def evaluate(self, model: torch.nn.Module, batch: dict[str, Any]
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        loss, pairs, stats = self.compute(model, batch)
        return loss, pairs, (stats, pairs)

    def metrics(self) -> Any:
        from torchmetrics import MetricCollection

        return MetricCollection({"pairs": PairMetrics()})

    def metric_names(self) -> tuple[str, ...]:
        return PAIR_STATS

    def log_values(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: float(v) for name, v in zip(PAIR_STATS, computed["pairs"], strict=True)}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        """Per pair: both responses' log-probabilities and rewards, and whether the chosen one is preferred."""
        _, _, stats = self.compute(model, batch)
        return [{"pair_id": int(i), **{name: round(float(v), 6) for name, v in zip(PAIR_STATS, row, strict=True)}}
                for i, row in zip(batch["pair_id"], stats, strict=True)]


def _autocast(module: Any) -> AbstractContextManager[Any]:
    """The training precision's autocast, so precomputed references match what a per-step reference would give."""
    precision = getattr(getattr(module, "_trainer", None), "precision_plugin", None)
    forward = getattr(precision, "forward_context", None)
    if callable(forward):
        return forward()
    from contextlib import nullcontext

    return nullcontext()
