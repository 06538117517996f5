"""One block at the end of ``ftframe fit`` that says what the run did, and ``summary.json`` with the same.

``ftframe fit`` adds :class:`RunSummary` to every run (a configured one is kept). At the end of training -- or
after a signal stopped it (``GracefulStop``) -- rank 0 prints::

    [ftframe] run summary
      trained      LoRA on smollm2-135m-instruct: 1,843,200 of 136,358,784 parameters trainable (1.352%)
      device       cpu, precision bf16-mixed (bfloat16 matmuls measured 2.4x as fast as float32 on this CPU)
      steps        60/60 (epoch 0), finished
      wall time    6m12s: training 4m50s, validation 40.1s, forgetting 35.2s, checkpointing 2.1s, other 4.6s
      throughput   412 useful tok/s (training time only)
      peak memory  3.1 GB (RSS)
      val/loss     1.4945 -> 0.9749 (ratio 0.652)
      adapter      runs/quickstart/adapter
      checkpoints  runs/quickstart/checkpoints (last: runs/quickstart/checkpoints/step=000060)
      resume       ftframe fit --config runs/quickstart/config.yaml --ckpt_path runs/quickstart/checkpoints/last
      evaluate     ftframe evaluate --adapter runs/quickstart/adapter --suite standard --output runs/quickstart/scorecard
      summary      runs/quickstart/summary.json

and writes ``summary.json`` into the run's log folder. The CLI hands it the validation losses before and after
training (``validate_before_fit``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from ftframe.callbacks.progress import TrainingStats
from ftframe.progress import format_seconds

__all__ = ["RunSummary"]


class RunSummary(Callback):
    """Times training, validation, forgetting measurements and checkpoint writing; prints and writes the summary."""

    def __init__(self, filename: str = "summary.json") -> None:
        self.filename = filename
        self.stats = TrainingStats()
        self.val_before: dict[str, float] | None = None
        self.val_after: dict[str, float] | None = None
        self.validation_seconds = 0.0
        self._fit_start: float | None = time.monotonic()  # the CLI makes it just before fit's validations
        self._val_start: float | None = None
        self.written: dict[str, Any] | None = None

    # ------------------------------------------------------------------ timing
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stats.on_train_start(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.stats.batch_start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.stats.batch_end(trainer, batch)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_start is not None:
            self.validation_seconds += time.monotonic() - self._val_start
            self._val_start = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from ftframe.callbacks.graceful_stop import Preempted

        if isinstance(exception, Preempted):
            self.finish(trainer, stopped=f"stopped by {exception.signal_name} after step {exception.step}",
                        resume=exception.resume)

    # ------------------------------------------------------------------ the summary
    @staticmethod
    def _forgetting(trainer: Trainer) -> list[Any]:
        from ftframe.callbacks.forgetting import ForgettingMonitor

        return [cb for cb in trainer.callbacks if isinstance(cb, ForgettingMonitor)]

    def collect(self, trainer: Trainer, stopped: str | None = None, resume: str | None = None) -> dict[str, Any]:
        """The summary as a dict (what ``summary.json`` holds)."""
        from ftframe.artifacts import log_dir
        from ftframe.callbacks.adapter_checkpoint import LAST_LINK, AdapterCheckpoint
        from ftframe.callbacks.adapter_export import AdapterExport

        module = trainer.lightning_module
        fields = self.stats.fields(trainer)
        trainable, total = module.parameter_counts() if hasattr(module, "parameter_counts") else (None, None)
        plan = getattr(trainer, "device_plan", None)
        forgetting_s = float(sum(cb.measure_seconds for cb in self._forgetting(trainer)))
        checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, AdapterCheckpoint)]
        checkpoint_s = float(sum(getattr(cb, "write_seconds", 0.0) for cb in checkpoints))
        wall = time.monotonic() - self._fit_start if self._fit_start is not None else fields["elapsed_s"]
        folder = log_dir(trainer)
        exports = [cb for cb in trainer.callbacks if isinstance(cb, AdapterExport)]
        adapter = None
        if exports:
            adapter = str(exports[0].last_path or exports[0].resolve_dir(trainer))
        ckpt_dir = None
        last = None
        if checkpoints:
            ckpt_dir = str(checkpoints[0].dirpath or folder / "checkpoints")
            if checkpoints[0].last_model_path:
                last = str(Path(checkpoints[0].last_model_path).parent)
        config = folder / "config.yaml"
        if resume is None:
            if ckpt_dir and last:
                resume = (f"ftframe fit --config {config} --ckpt_path {Path(ckpt_dir) / LAST_LINK}" if config.is_file()
                          else f"the same ftframe fit command with --ckpt_path {Path(ckpt_dir) / LAST_LINK}")
        evaluate = None
        if adapter:
            evaluate = f"ftframe evaluate --adapter {adapter} --suite standard --output {folder / 'scorecard'}"
        val = None
        if self.val_before or self.val_after:
            val = {k: {"before": (self.val_before or {}).get(k), "after": (self.val_after or {}).get(k)}
                   for k in sorted(set(self.val_before or {}) | set(self.val_after or {}))}
        return {
            "method": type(module).__name__, "model": getattr(module, "model_name", None),
            "trainable_parameters": trainable, "total_parameters": total,
            "device": plan.name if plan is not None else str(module.device),
            "precision": str(trainer.precision), "precision_reason": plan.reason if plan is not None else None,
            "step": fields["step"], "max_steps": fields["max_steps"], "epoch": fields["epoch"],
            "finished": stopped is None, "stopped": stopped,
            "seconds": {"wall": wall, "training": self.stats.train_seconds, "validation": self.validation_seconds,
                        "forgetting": forgetting_s, "checkpointing": checkpoint_s,
                        "other": max(wall - self.stats.train_seconds - self.validation_seconds - forgetting_s
                                     - checkpoint_s, 0.0)},
            "tokens": self.stats.tokens, "tokens_per_s": fields["tokens_per_s"],
            "peak_memory_bytes": fields["peak_memory_bytes"], "peak_memory_kind": fields["peak_memory_kind"],
            "validation": val, "adapter": adapter, "checkpoints": ckpt_dir, "last_checkpoint": last,
            "resume": resume, "evaluate": evaluate, "log_dir": str(folder),
            "summary": str(folder / self.filename),
        }

    def finish(self, trainer: Trainer, stopped: str | None = None, resume: str | None = None) -> dict[str, Any]:
        """Print the block and write ``summary.json`` (rank 0); returns the summary."""
        summary = self.collect(trainer, stopped=stopped, resume=resume)
        self.written = summary
        if trainer.is_global_zero:
            path = Path(summary["summary"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, path)
            print(format_summary(summary), flush=True)
        return summary


def format_summary(s: dict[str, Any]) -> str:
    """The printed block of a summary dict."""
    rows: list[tuple[str, str]] = []
    trained = f"{s['method']}" + (f" on {s['model']}" if s["model"] else "")
    if s["trainable_parameters"] is not None and s["total_parameters"]:
        trained += (f": {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters trainable "
                    f"({100 * s['trainable_parameters'] / s['total_parameters']:.3f}%)")
    rows.append(("trained", trained))
    rows.append(("device", f"{s['device']}, precision {s['precision']}"
                 + (f" ({s['precision_reason']})" if s["precision_reason"] else "")))
    steps = f"{s['step']}" + (f"/{s['max_steps']}" if s["max_steps"] else "")
    rows.append(("steps", f"{steps} (epoch {s['epoch']}), " + ("finished" if s["finished"] else s["stopped"])))
    t = s["seconds"]
    rows.append(("wall time", f"{format_seconds(t['wall'])}: training {format_seconds(t['training'])}, validation "
                 f"{format_seconds(t['validation'])}, forgetting {format_seconds(t['forgetting'])}, checkpointing "
                 f"{format_seconds(t['checkpointing'])}, other {format_seconds(t['other'])}"))
    rows.append(("throughput", f"{s['tokens_per_s']:.0f} useful tok/s (training time only)"))
    rows.append(("peak memory", f"{s['peak_memory_bytes'] / 1e9:.1f} GB ({s['peak_memory_kind']})"))
    for key, v in (s["validation"] or {}).items():
        before, after = v["before"], v["after"]
        if before is not None and after is not None:
            change = f"ratio {after / before:.3f}" if before else f"change {after - before:+.4f}"
            rows.append((key, f"{before:.4f} -> {after:.4f} ({change})"))
        elif after is not None or before is not None:
            rows.append((key, f"{before if before is not None else '?'} -> {after if after is not None else '?'}"))
    for key in ("adapter", "checkpoints"):
        if s[key]:
            rows.append((key, s[key] + (f" (last: {s['last_checkpoint']})" if key == "checkpoints"
                                        and s["last_checkpoint"] else "")))
    for key in ("resume", "evaluate", "summary"):
        if s[key]:
            rows.append((key, s[key]))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(["[ftframe] run summary", *(f"  {k.ljust(width)}{v}" for k, v in rows)])
