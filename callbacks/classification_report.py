"""``ClassificationReport``: error analysis written by ``ftframe test`` and ``ftframe predict`` for classifiers.

Collects the per-example records that a classification task returns from ``test_step`` / ``predict_step`` (text,
gold, predicted, probabilities, file:line), gathers them from every process, and writes on rank 0 (see
:func:`ftframe.evaluation.classification.write_report`):

* ``predictions.jsonl`` -- one record per example;
* ``report.md`` -- accuracy, macro-F1, per-class precision / recall, the confusion matrix and, per gold label, the
  most confident mistakes (what to look at first: label noise or a real blind spot);
* ``metrics.json`` and ``confusion_matrix.png``.

The CLI adds it by itself for ``test`` / ``predict`` with a classification task; add it to ``trainer.callbacks`` to
change where it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from ftframe.artifacts import log_dir

__all__ = ["ClassificationReport"]


class ClassificationReport(Callback):
    """Write predictions, a confident-mistakes report and a confusion-matrix PNG after ``test`` and ``predict``.

    Args:
        output_dir: Folder for the files; default ``<log_dir>/analysis/<test|predict>``.
        mistakes_per_class: Most confident mistakes listed per gold label.
    """

    def __init__(self, output_dir: str | None = None, mistakes_per_class: int = 5) -> None:
        self.output_dir = output_dir
        self.mistakes_per_class = mistakes_per_class
        self._records: list[dict[str, Any]] = []
        #: where the last report was written
        self.written: Path | None = None

    def _start(self) -> None:
        self._records = []

    def _collect(self, outputs: Any) -> None:
        if isinstance(outputs, list):
            self._records.extend(r for r in outputs if isinstance(r, dict))

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start()

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "predict")

    def _write(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        labels = getattr(getattr(pl_module, "task", None), "labels", None)
        folder = Path(self.output_dir) if self.output_dir else log_dir(trainer) / "analysis" / stage  # every rank
        records = self._records
        if trainer.world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        self._records = []
        if not trainer.is_global_zero or not labels or not records:
            return
        from ftframe.evaluation.classification import write_report

        title = f"{type(pl_module).__name__} on {getattr(pl_module, 'model_name', '?')} ({stage})"
        summary = write_report(records, list(labels), folder, title, self.mistakes_per_class)
        self.written = folder
        scores = (f": accuracy {summary['accuracy']:.4f}, macro-F1 {summary['f1_macro']:.4f}"
                  if "accuracy" in summary else "")
        rank_zero_info(f"[ftframe] {stage} report for {len(records)} examples{scores} -> {folder} (predictions.jsonl, "
                       "report.md, confusion_matrix.png)")
