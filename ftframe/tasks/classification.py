"""``SequenceClassification``: one label per text (or text pair), a head on an encoder or a decoder LLM."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from ftframe.errors import UserError
from ftframe.models import transformers_model
from ftframe.tasks.base import Task, virtual_tokens

__all__ = ["SequenceClassification"]


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

    def metric_names(self) -> tuple[str, ...]:
        return ("accuracy", "f1_macro", "ece", "precision/*", "recall/*")

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
