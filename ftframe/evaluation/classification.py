"""Error analysis for classifiers: per-example predictions, the most confident mistakes, a confusion-matrix plot.

Works on the per-example records :class:`ftframe.tasks.SequenceClassification` produces (``text``, ``gold``,
``predicted``, ``confidence``, ``probabilities``, ``where``); the ``ClassificationReport`` callback writes them for
``ftframe test`` / ``ftframe predict``, and ``benchmarks/classification.py`` reuses them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["classification_summary", "confident_mistakes", "plot_confusion", "write_report"]


def classification_summary(records: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision / recall / support and the confusion matrix (rows: gold) of records."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    index = {name: i for i, name in enumerate(labels)}
    scored = [r for r in records if r.get("gold") is not None]
    if not scored:
        return {"examples": len(records)}
    gold = torch.tensor([index[r["gold"]] for r in scored])
    pred = torch.tensor([index[r["predicted"]] for r in scored])
    k = len(labels)
    precision = multiclass_precision(pred, gold, k, average=None)
    recall = multiclass_recall(pred, gold, k, average=None)
    return {
        "examples": len(scored),
        "accuracy": float(multiclass_accuracy(pred, gold, k, average="micro")),
        "f1_macro": float(multiclass_f1_score(pred, gold, k, average="macro")),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "support": int((gold == i).sum())} for i, name in enumerate(labels)},
        "confusion": multiclass_confusion_matrix(pred, gold, k).tolist(),
    }


def confident_mistakes(records: list[dict[str, Any]], per_class: int = 5) -> dict[str, list[dict[str, Any]]]:
    """For each gold label, its wrongly predicted examples with the highest confidence, most confident first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted((r for r in records if r.get("gold") is not None and not r.get("correct")),
                    key=lambda r: -r["confidence"]):
        bucket = out.setdefault(r["gold"], [])
        if len(bucket) < per_class:
            bucket.append(r)
    return out


def plot_confusion(matrix: list[list[int]], labels: list[str], path: str | Path, title: str = "") -> None:
    """Confusion matrix as a PNG: counts in each cell, shaded by the share of the gold row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(matrix, dtype=torch.float64)
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = max(3.6, 0.8 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(counts[i, j])}\n{100 * share[i, j]:.1f}%", ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of gold row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[dict[str, Any]], labels: list[str], folder: str | Path, title: str = "",
                 mistakes_per_class: int = 5) -> dict[str, Any]:
    """Write ``predictions.jsonl``, ``report.md`` (metrics, confusion, confident mistakes), ``metrics.json`` and
    ``confusion_matrix.png`` (when gold labels are known) into ``folder``; return the summary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    summary = classification_summary(records, labels)
    _atomic_write(folder / "metrics.json", json.dumps(summary, indent=2))
    lines = [f"# {title or 'Classification report'}", "", f"{len(records)} examples; predictions: predictions.jsonl", ""]
    if "accuracy" in summary:
        lines += [f"accuracy **{summary['accuracy']:.4f}**, macro-F1 **{summary['f1_macro']:.4f}**", "",
                  "| label | precision | recall | support |", "|---|---|---|---|"]
        lines += [f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['support']} |"
                  for name, c in summary["per_class"].items()]
        lines += ["", "Confusion matrix (rows: gold, columns: predicted):", "",
                  "| gold \\ predicted | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
                  for name, row in zip(labels, summary["confusion"], strict=True)]
        lines += ["", f"## Most confident mistakes (up to {mistakes_per_class} per gold label)", ""]
        mistakes = confident_mistakes(records, mistakes_per_class)
        for name in labels:
            lines.append(f"### gold {name}")
            lines.append("")
            for r in mistakes.get(name, []):
                text = " ".join(str(r.get("text", "")).split())
                text = text if len(text) <= 300 else text[:297] + "..."
                where = Path(str(r.get("where", ""))).name  # file:line, without the folder
                lines.append(f"- predicted **{r['predicted']}** at {r['confidence']:.3f} ({where}): {text}")
            if not mistakes.get(name):
                lines.append("- none")
            lines.append("")
        plot_confusion(summary["confusion"], labels, folder / "confusion_matrix.png",
                       f"{title}\naccuracy {summary['accuracy']:.3f}, macro-F1 {summary['f1_macro']:.3f}".strip())
    _atomic_write(folder / "report.md", "\n".join(lines) + "\n")
    return summary


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
