"""Tasks: *what* is learned, composed into every method (see docs/design.md, "The seams").

A task knows which ``transformers`` auto-class builds the backbone, which ``peft`` task type adapters use, and how
to turn a batch into a loss. Methods never branch on the task; they call these members.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ftframe.errors import UserError
from ftframe.losses import linear_cross_entropy
from ftframe.models import transformers_model
from ftframe.packing import is_packed, packed_forward, packing_mode, unpack, varlen_kwargs

__all__ = ["CausalLM", "SequenceClassification", "Task"]


class Task:
    """Base of all tasks. Subclasses set :attr:`peft_task_type` and implement :meth:`auto_class` and :meth:`loss`.

    Optional members: :meth:`bind` (read what the task needs from the data module), :meth:`model_kwargs` (extra
    ``from_pretrained`` arguments), :meth:`head` (the output layer), and :meth:`evaluate` + :meth:`metrics` for metrics
    beyond the loss.
    """

    peft_task_type: str = ""
    #: Whether :meth:`loss`'s weight counts tokens, so that an optimizer step's loss is the mean over every token of
    #: all its micro-batches and processes (docs/distributed.md, "One step, one token mean"); otherwise each
    #: micro-batch's mean weighs the same (classification: batches of examples).
    token_weighted: bool = False
    #: Whether :meth:`head` is freshly initialized (so it must train whatever the method freezes).
    new_head: bool = False

    def auto_class(self) -> Any:
        """The ``transformers`` auto-class that loads the backbone for this task."""
        raise NotImplementedError(f"{type(self).__name__} must implement auto_class()")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean loss, weight)``; the weight (e.g. supervised tokens) makes means over batches exact."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def bind(self, datamodule: Any) -> None:
        """Called before the model is built, with the trainer's data module (or ``None``). Default: nothing."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``auto_class().from_pretrained`` / ``from_config``."""
        return {}

    def check_model(self, model: torch.nn.Module, method: str) -> None:
        """Refuse an adapted model this task cannot run (called right after the method adapts it). Default: accept."""

    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The task's output layer inside ``model`` (trained by LastLayers, saved with adapters), or ``None``."""
        base = transformers_model(model)
        return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None

    def metrics(self) -> Any:
        """A ``torchmetrics.MetricCollection`` updated with :meth:`evaluate`'s outputs, or ``None`` (loss only)."""
        return None

    def evaluate(self, model: torch.nn.Module,
                 batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(mean loss, weight, metric inputs)`` for validation and test; metric inputs are ``(preds, target)``."""
        loss, weight = self.loss(model, batch)
        return loss, weight, None

    def log_values(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """Turn :meth:`metrics`' computed values into scalars to log (names without the ``val/`` prefix)."""
        return {k: float(v) for k, v in computed.items() if v.numel() == 1}

    def examples(self, batch: dict[str, Any], outputs: Any) -> list[dict[str, Any]]:
        """Per-example records of an evaluated batch (for error analysis); default: none."""
        return []

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


class SequenceClassification(Task):
    """One label per text (or text pair): a classification head on an encoder (BERT family) or a decoder LLM.

    Encoders classify from their own pooled output (``[CLS]``); decoders from the hidden state of each example's
    last attended token, found from the attention mask, so left and right padding give the same logits (and a
    text that happens to contain the pad token is still read to its end). LoRA-family methods train and save the
    fresh head with the adapter (peft's ``modules_to_save``, set by the ``SEQ_CLS`` task type).

    Args:
        labels: Label names in id order. The CLI links them from ``data.label_names`` (``ClassificationDataModule``),
            so they are never typed twice; from Python, pass ``labels=datamodule.label_names`` or leave ``None`` and
            let the trainer's data module supply them.
        class_weights: Cross-entropy weights per class, in label order; ``balanced`` computes inverse-frequency
            weights from the training labels (for imbalanced data); ``None``: unweighted.
        label_smoothing: Cross-entropy label smoothing in ``[0, 1)``.
        calibration_bins: Bins of the expected calibration error (ECE) metric.
    """

    peft_task_type = "SEQ_CLS"
    new_head = True

    def __init__(self, labels: list[str] | None = None, class_weights: list[float] | Literal["balanced"] | None = None,
                 label_smoothing: float = 0.0, calibration_bins: int = 15) -> None:
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            raise UserError(f"labels must name at least two distinct classes, got {labels}")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise UserError(f"class_weights must be a list of numbers, 'balanced' or null, got {class_weights!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if calibration_bins < 1:
            raise UserError(f"calibration_bins must be >= 1, got {calibration_bins}")
        self.labels = list(labels) if labels is not None else None
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.calibration_bins = calibration_bins
        self._weights: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up
    def bind(self, datamodule: Any) -> None:
        names = getattr(datamodule, "label_names", None) if datamodule is not None else None
        if names is None and datamodule is not None and hasattr(datamodule, "num_labels"):
            datamodule.num_labels  # noqa: B018 -- reads the training labels
            names = datamodule.label_names
        if self.labels is None:
            self.labels = list(names) if names is not None else None
        elif names is not None and list(names) != self.labels:
            raise UserError(f"the task's labels {self.labels} differ from the data's {list(names)}; leave "
                            "model.task.init_args.labels unset (the CLI links it from the data) or set data.labels "
                            "to the same list")
        self._require_labels()
        if self.class_weights == "balanced":
            if datamodule is None or not hasattr(datamodule, "class_weights"):
                raise UserError("class_weights: balanced needs a ClassificationDataModule to count the training labels")
            self._weights = datamodule.class_weights().float()
        elif self.class_weights is not None:
            if len(self.class_weights) != len(self.labels):
                raise UserError(f"class_weights has {len(self.class_weights)} values for {len(self.labels)} labels "
                                f"{self.labels}")
            self._weights = torch.tensor([float(w) for w in self.class_weights])

    def _require_labels(self) -> list[str]:
        if self.labels is None:
            raise UserError("SequenceClassification has no label names: use ClassificationDataModule (the CLI links "
                            "its label_names to the task), or pass labels=[...]")
        return self.labels

    def check_model(self, model: torch.nn.Module, method: str) -> None:
        prompt_learning, virtual = virtual_tokens(model)
        if prompt_learning and virtual == 0:
            raise UserError(f"{method}: prefix tuning passes its prefixes as past key values, which transformers' "
                            "sequence-classification models do not take. Use PTuning or PromptTuning (virtual input "
                            "tokens) or LoRA instead")

    def auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict[str, Any]:
        labels = self._require_labels()
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}

    def head(self, model: torch.nn.Module) -> torch.nn.Module | None:
        base = transformers_model(model)
        for name in ("score", "classifier"):
            module = getattr(base, name, None)
            if isinstance(module, torch.nn.Module):
                return module
        return None

    # ------------------------------------------------------------------ computing
    def logits(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Class scores ``(B, num labels)`` of a padded batch."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        base = transformers_model(model)
        prompt_learning, _ = virtual_tokens(model)
        score = getattr(base, "score", None)
        if score is None:  # encoders: the model pools ([CLS] + pooler) itself
            return model(input_ids=input_ids, attention_mask=mask).logits
        if prompt_learning:
            # the virtual tokens go in front (as peft does), right padding stays at the end: positions match an
            # unpadded run, and the last real token is found from the mask, not assumed to be the final position
            embeds = base.get_input_embeddings()(input_ids)
            prompts = model.get_prompt(batch_size=len(input_ids)).to(embeds.dtype)
            embeds = torch.cat([prompts, embeds], dim=1)
            mask = torch.cat([mask.new_ones(len(mask), prompts.shape[1]), mask], dim=1)
            hidden = base.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        else:
            hidden = base.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask).argmax(-1)  # last attended token of each row, whichever side the padding is on
        return score(hidden[torch.arange(len(hidden), device=hidden.device), last])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        loss, n, _ = self.evaluate(model, batch)
        return loss, n

    def evaluate(self, model: torch.nn.Module,
                 batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        logits = self.logits(model, batch).float()
        target = batch["labels"]
        weight = self._weights.to(logits.device) if self._weights is not None else None
        loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=self.label_smoothing)
        return loss, torch.tensor(len(target), device=logits.device), (logits.detach(), target)

    # ------------------------------------------------------------------ metrics and reports
    def metrics(self) -> Any:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassCalibrationError,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        k = len(self._require_labels())
        return MetricCollection({
            "accuracy": MulticlassAccuracy(k, average="micro"),
            "f1_macro": MulticlassF1Score(k, average="macro"),
            "precision": MulticlassPrecision(k, average=None),
            "recall": MulticlassRecall(k, average=None),
            "confusion": MulticlassConfusionMatrix(k),
            "ece": MulticlassCalibrationError(k, n_bins=self.calibration_bins, norm="l1"),
        })

    def log_values(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        labels = self._require_labels()
        out = {name: float(computed[name]) for name in ("accuracy", "f1_macro", "ece") if name in computed}
        for name in ("precision", "recall"):
            if name in computed:
                out.update({f"{name}/{label}": float(v) for label, v in zip(labels, computed[name], strict=True)})
        return out

    def examples(self, batch: dict[str, Any], outputs: Any) -> list[dict[str, Any]]:
        labels = self._require_labels()
        logits, target = outputs
        probs = logits.float().softmax(-1).cpu()
        texts = batch.get("text") or [None] * len(target)
        pairs = batch.get("text_pair") or [None] * len(target)
        where = batch.get("where") or [None] * len(target)
        records = []
        for i, row in enumerate(probs):
            pred = int(row.argmax())
            record = {"where": where[i], "text": texts[i]}
            if pairs[i] is not None:
                record["text_pair"] = pairs[i]
            record.update({"gold": labels[int(target[i])], "predicted": labels[pred], "correct": pred == int(target[i]),
                           "confidence": round(float(row[pred]), 6),
                           "probabilities": {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)}})
            records.append(record)
        return records

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, batch: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
        """Per-example label, confidence and class probabilities (and the gold label when the data has one)."""
        logits = self.logits(model, batch)
        target = batch.get("labels")
        if target is None:
            target = logits.argmax(-1)
        records = self.examples(batch, (logits, target))
        if "labels" not in batch:
            for r in records:
                r.pop("gold"), r.pop("correct")
        return records
