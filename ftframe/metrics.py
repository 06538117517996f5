"""Evaluation bookkeeping for one stage (validation or test): what :class:`ftframe.methods.FineTuneModule` logs.

One weighted loss mean and one collection of the task's metrics (accuracy, F1, ...) over the whole set, plus one of
each per data set when the data module has several (``dataset_names``, e.g. ``MultitaskDataModule``). Values are
reduced over all ranks by torchmetrics, so they are logged without another sync and alike on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric

__all__ = ["StageMetrics"]


class StageMetrics(torch.nn.Module):
    """The loss and task metrics of one evaluation stage, overall and per data set.

    Args:
        task: The :class:`ftframe.tasks.Task` whose ``metrics()`` and ``log_values()`` are used.
    """

    def __init__(self, task: Any) -> None:
        super().__init__()
        self.task = task
        self.loss = MeanMetric()
        self.metrics = task.metrics()
        self.member_loss = torch.nn.ModuleDict()  # data set name -> MeanMetric
        self.member_metrics = torch.nn.ModuleDict()

    def reset(self) -> None:
        for metric in [self.loss, self.metrics, *self.member_loss.values(), *self.member_metrics.values()]:
            if metric is not None:
                metric.reset()

    def update(self, loss: torch.Tensor, weight: Any, outputs: Any, dataset: str | None = None) -> None:
        """Add one batch: its loss with ``weight`` (e.g. its token count), and the task's outputs if any."""
        self.loss.update(loss, weight=weight)
        if self.metrics is not None and outputs is not None:
            self.metrics.update(*outputs)
        if dataset is None:
            return
        if dataset not in self.member_loss:
            device = self.loss.device
            self.member_loss[dataset] = MeanMetric().to(device)
            member = self.task.metrics()
            if member is not None:
                self.member_metrics[dataset] = member.to(device)
        self.member_loss[dataset].update(loss, weight=weight)
        if dataset in self.member_metrics and outputs is not None:
            self.member_metrics[dataset].update(*outputs)

    def compute(self, stage: str) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """``(values to log, computed tensors by where)``: ``{stage}/loss``, ``{stage}/{metric}`` and
        ``{stage}/{data set}/...``; the second holds every computed tensor (confusion matrices too), keyed ``stage`` or
        ``stage/data set``. Empty when nothing was updated."""
        logged: dict[str, Any] = {}
        computed: dict[str, dict[str, torch.Tensor]] = {}
        if not self.loss.update_called:
            return logged, computed
        logged[f"{stage}/loss"] = self.loss.compute()
        self._task_values(stage, self.metrics, logged, computed)
        for name, loss in self.member_loss.items():
            if loss.update_called:
                logged[f"{stage}/{name}/loss"] = loss.compute()
                self._task_values(f"{stage}/{name}", self.member_metrics[name] if name in self.member_metrics
                                  else None, logged, computed)
        return logged, computed

    def log(self, module: Any, stage: str) -> dict[str, dict[str, torch.Tensor]]:
        """Log :meth:`compute`'s values through the LightningModule ``module`` (``val/loss`` on the progress bar;
        no sync: torchmetrics reduced them over all ranks already); returns the computed tensors."""
        logged, computed = self.compute(stage)
        if f"{stage}/loss" in logged:
            module.log(f"{stage}/loss", logged.pop(f"{stage}/loss"), prog_bar=stage == "val", sync_dist=False)
        module.log_dict(logged, sync_dist=False)
        return computed

    def _task_values(self, where: str, metrics: Any, logged: dict[str, Any],
                     computed: dict[str, dict[str, torch.Tensor]]) -> None:
        if metrics is None or not any(m.update_called for m in metrics.values()):
            return
        values = metrics.compute()
        computed[where] = {k: v.detach().cpu() for k, v in values.items()}
        logged.update({f"{where}/{k}": v for k, v in self.task.log_values(values).items()})
