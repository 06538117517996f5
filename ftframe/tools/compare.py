"""``ftframe compare``: one data configuration through a list of methods, same budget, one table and one chart.

Each method runs ``ftframe fit`` in its own process (so peak memory is its own) with the same base config, number of
optimizer steps, batch and seed. A :class:`ComparisonProbe` callback in that process records trainable parameters,
training tokens/s, peak memory, the validation loss before and after training and, when the references contain a
final answer (GSM8K's ``#### 42``), the exact-match accuracy of greedy answers on held-out prompts. The parent writes
``results.json``, ``results.md`` (a Markdown table) and ``results.png`` after every method, so a long comparison can
be read while it runs and resumed (finished methods are skipped unless ``force``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ftframe.errors import UserError
from ftframe.evaluation.generation import GSM8K_ANSWER, extract_answer
from ftframe.methods import variants

__all__ = ["DEFAULT_METHODS", "ComparisonProbe", "compare"]

#: label -> a method YAML under configs/methods (or a path) followed by extra ``ftframe fit`` arguments: the untrained
#: base (LoRA with zero steps: its B factors start at zero), then every method variant that names a comparison
#: (:attr:`ftframe.methods.Variant.compare`).
DEFAULT_METHODS: dict[str, str] = {
    "base (no training)": "lora --trainer.max_steps=0 --model.optimizer.lr_schedule=constant",
    **{v.compare[0]: v.compare[1] for _, v in variants().values() if v.compare is not None},
}

RESULT_FILE = "probe.json"


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class ComparisonProbe(Callback):
    """Record what ``ftframe compare`` reports about one run, and write it as JSON to ``output``.

    Args:
        output: JSON file to write (rewritten after every validation and at the end of fit).
        metric_examples: Held-out prompts answered greedily for the task metric after training; 0 skips it.
        answer_pattern: Regex whose first group is the final answer in references and predictions; references
            without a match have no task metric.
        max_new_tokens: Generation length limit for the task metric.
        metric_data: Where the held-out prompts of the task metric come from: ``None`` -- the run's own data module
            (its validation examples); a data source (``gsm8k``, a JSONL file of prompt / completion records) -- the
            records ``InstructionDataModule(val_size=metric_val_size, seed=42)`` holds out of it, so that runs on
            other data (preference pairs made from the training questions) are scored on the same questions.
        metric_val_size: The held-out size of ``metric_data``'s split (the quickstart's: 64).
    """

    def __init__(self, output: str, metric_examples: int = 64, answer_pattern: str = GSM8K_ANSWER,
                 max_new_tokens: int = 256, metric_data: str | None = None, metric_val_size: float = 64) -> None:
        self.output = Path(output)
        self.metric_examples = metric_examples
        self.answer_pattern = answer_pattern
        self.max_new_tokens = max_new_tokens
        self.metric_data = metric_data
        self.metric_val_size = metric_val_size
        self.record: dict[str, Any] = {"val_loss": [], "val_metrics": [], "train_tokens": 0, "train_seconds": 0.0,
                                       "steps": 0}
        self._t0 = 0.0

    def _write(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2))
        tmp.replace(self.output)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.record["started"] = time.time()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainable, total = pl_module.parameter_counts()  # type: ignore[operator]
        self.record.update(method=type(pl_module).__name__, trainable_params=trainable, total_params=total,
                           max_steps=trainer.max_steps, device=str(pl_module.device))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = time.perf_counter() - self._t0
        self.record["steps"] += 1
        if self.record["steps"] == 1:
            return  # the first step pays one-time costs (allocations, kernel selection)
        mask = batch.get("attention_mask")
        self.record["train_tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        self.record["train_seconds"] += seconds

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["peak_memory_bytes"] = _peak_memory_bytes(pl_module.device)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self.record["val_loss"].append({"step": trainer.global_step, "loss": float(value)})
        self.record["val_metrics"].append({"step": trainer.global_step, **{
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}})
        self._write()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "peak_memory_bytes" not in self.record:  # zero training steps: on_train_end did not run
            self.record["peak_memory_bytes"] = _peak_memory_bytes(pl_module.device)
        if self.metric_examples > 0:
            self.record["task_metric"] = self._task_metric(trainer, pl_module)
        self._write()

    @torch.no_grad()
    def _task_metric(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        if self.metric_data is not None:
            return self._task_metric_on(pl_module)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "predict_dataloader"):
            return None
        from ftframe.progress import bar as progress_bar

        model, task, tokenizer = pl_module.model, pl_module.task, pl_module.tokenizer  # type: ignore[union-attr]
        was_training = model.training
        model.eval()
        old_limit = getattr(task, "max_new_tokens", None)
        task.max_new_tokens = self.max_new_tokens
        correct = seen = 0
        started = time.perf_counter()
        records = []
        bar = progress_bar(total=self.metric_examples, desc="[ftframe compare] task metric", unit="prompt", file=sys.stderr)
        try:
            for batch in datamodule.predict_dataloader():
                batch = {k: v[: self.metric_examples - seen].to(pl_module.device) for k, v in batch.items()}
                with trainer.precision_plugin.forward_context():
                    answers = task.predict(model, batch, tokenizer)
                for a in answers:
                    gold = extract_answer(a["reference"], self.answer_pattern)
                    if gold is None:
                        return None  # the data has no extractable final answer: no task metric
                    pred = extract_answer(a["prediction"], self.answer_pattern)
                    correct += int(pred == gold)
                    records.append({"gold": gold, "predicted": pred})
                seen += len(answers)
                bar.update(len(answers))
                if seen >= self.metric_examples:
                    break
        finally:
            bar.close()
            task.max_new_tokens = old_limit
            model.train(was_training)
        return {"name": "exact_match", "value": correct / max(seen, 1), "correct": correct, "n": seen,
                "seconds": time.perf_counter() - started, "answers": records}


    def _task_metric_on(self, pl_module: LightningModule) -> dict[str, Any]:
        """Exact match of greedy answers to ``metric_data``'s held-out prompts (its chat-template prompts)."""
        from ftframe.evaluation.generation import (
            evaluate_generation,
            load_generation_records,
            summarize_generation,
        )

        records = load_generation_records(self.metric_data, split="val", val_size=self.metric_val_size,
                                          limit=self.metric_examples)
        started = time.perf_counter()
        answers = evaluate_generation(pl_module.model, pl_module.tokenizer, records,  # type: ignore[arg-type]
                                      max_new_tokens=self.max_new_tokens, answer_pattern=self.answer_pattern)
        summary = summarize_generation(answers)
        return {"name": "exact_match", "value": summary["exact_match_strict"],
                "correct": sum(a["correct_strict"] for a in answers), "n": summary["n"],
                "seconds": time.perf_counter() - started, "data": self.metric_data,
                "answers": [{"gold": a["gold"], "predicted": a["strict"]} for a in answers]}


# ---------------------------------------------------------------------------------------------------------- parent
def _artifact_bytes(folder: Path) -> int:
    """Size of the trained weights in an exported folder (``*.safetensors``; tokenizer and metadata excluded)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _resolve_spec(label: str, spec: str, configs: Path) -> tuple[str, list[str]]:
    parts = shlex.split(spec)
    if not parts:
        raise UserError(f"compare: method {label!r} has an empty spec; give a method YAML name, e.g. 'lora'")
    name, extra = parts[0], parts[1:]
    path = Path(name)
    if not path.suffix:
        path = configs / "methods" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs / "methods").glob("*.yaml"))
        raise UserError(f"compare: method {label!r}: {path} does not exist; method YAMLs: {known}, or a YAML path")
    return str(path), extra


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _learning_rate(config: Path) -> float | None:
    """The method's peak learning rate, from the configuration the run saved."""
    import yaml

    if not config.is_file():
        return None
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    value = ((model.get("init_args") or {}).get("optimizer") or {}).get("learning_rate")
    return float(value) if value is not None else None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _row(label: str, rec: dict[str, Any]) -> dict[str, Any]:
    losses = [v["loss"] for v in rec.get("val_loss", [])]
    metric = rec.get("task_metric") or {}
    trained = rec.get("steps", 0) > 0
    return {
        "method": label,
        "class": rec.get("method"),
        "learning_rate": rec.get("learning_rate"),
        "trainable_params": rec.get("trainable_params") if trained else None,
        "total_params": rec.get("total_params"),
        "trainable_pct": 100 * rec["trainable_params"] / rec["total_params"]
        if trained and rec.get("total_params") else None,
        "artifact_bytes": rec.get("artifact_bytes"),
        "peak_memory_bytes": rec.get("peak_memory_bytes"),
        "tokens_per_s": rec["train_tokens"] / rec["train_seconds"] if rec.get("train_seconds") else None,
        "val_loss_before": losses[0] if losses else None,
        "val_loss_after": losses[-1] if len(losses) > 1 else (losses[0] if losses else None),
        "task_metric": metric.get("value"),
        "task_metric_n": metric.get("n"),
        "reward_accuracy": (rec.get("val_metrics") or [{}])[-1].get("val/rewards/accuracy"),
        "wall_s": rec.get("wall_s"),
    }


def _table(rows: list[dict[str, Any]], header: str) -> str:
    rewards = any(r.get("reward_accuracy") is not None for r in rows)  # preference runs: held-out reward accuracy
    cols = ["method", "lr", "trainable params", "% of total", "artifact on disk", "peak memory", "train tok/s",
            "val loss before", "val loss after", *(["reward accuracy"] if rewards else []), "exact match", "wall"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        em = "–" if r["task_metric"] is None else f"{100 * r['task_metric']:.1f}% (n={r['task_metric_n']})"
        lines.append("| " + " | ".join([
            r["method"],
            "–" if r["learning_rate"] is None or r["trainable_params"] is None else f"{r['learning_rate']:g}",
            "–" if r["trainable_params"] is None else _fmt_int(r["trainable_params"]),
            f(r["trainable_pct"], ".3f"),
            _fmt_bytes(r["artifact_bytes"]),
            "–" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
            f(r["tokens_per_s"], ".0f"),
            f(r["val_loss_before"], ".4f"),
            f(r["val_loss_after"], ".4f"),
            *([f(r.get("reward_accuracy"), ".3f")] if rewards else []),
            em,
            "–" if r["wall_s"] is None else f"{r['wall_s'] / 60:.1f} min",
        ]) + " |")
    return "\n".join(lines) + "\n"


def _chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["val_loss_after"] is not None]
    if not rows:
        return
    labels = [r["method"] for r in rows]
    panels = [
        ("validation loss (before → after)", "val_loss_after", None),
        ("trainable parameters (%, log)", "trainable_pct", "log"),
        ("train tokens/s", "tokens_per_s", None),
        ("peak memory (GiB)", "peak_memory_bytes", None),
    ]
    if any(r["task_metric"] for r in rows):
        panels.append(("exact match (%)", "task_metric", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.42 * len(rows) + 1.6), sharey=True)
    y = list(range(len(rows)))
    for ax, (name, key, scale) in zip(axes, panels, strict=True):
        values = [r[key] or 0.0 for r in rows]  # "–" cells (e.g. the untrained base) draw as empty bars
        if key == "peak_memory_bytes":
            values = [v / 2**30 for v in values]
        if key == "task_metric":
            values = [100 * v for v in values]
        ax.barh(y, values, color="tab:blue")
        if key == "val_loss_after":
            ax.scatter([r["val_loss_before"] or 0.0 for r in rows], y, color="tab:red", marker="|", s=200,
                       label="before", zorder=3)
            ax.legend(loc="lower right", fontsize=8)
            low = min(min(values), min(r["val_loss_before"] or 9e9 for r in rows))
            ax.set_xlim(left=max(0.0, low - 0.2))
        if scale and any(v > 0 for v in values):
            ax.set_xscale(scale)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(
    fit_config: list[str] | str = "configs/quickstart.yaml",
    methods: dict[str, str] | None = None,
    only: list[str] | None = None,
    steps: int = 60,
    output: str = "runs/compare",
    metric_examples: int = 64,
    answer_pattern: str = GSM8K_ANSWER,
    max_new_tokens: int = 256,
    configs_dir: str = "configs",
    force: bool = False,
    extra_args: list[str] | None = None,
    metric_data: str | None = None,
    metric_val_size: float = 64,
) -> list[dict[str, Any]]:
    """Run one data configuration through several methods with the same budget; write a table and a chart.

    Args:
        fit_config: Base ``ftframe fit`` YAML(s): data, trainer, seed (the method part is replaced per method).
        methods: label -> method YAML name under ``configs_dir/methods`` (or a path), then extra ``ftframe fit``
            arguments, e.g. ``{rslora: "lora --model.use_rslora=true"}``. Default: every shipped method, with the
            untrained base model first.
        only: Run just these labels of ``methods`` (in this order).
        steps: Optimizer steps per method (``trainer.max_steps``); batch size and seed come from ``config``.
        output: Folder for per-method runs and ``results.{json,md,png}``.
        metric_examples: Held-out prompts answered greedily for the exact-match task metric; 0 skips it.
        answer_pattern: Regex whose first group is the final answer (default: GSM8K's ``#### N``).
        max_new_tokens: Generation length limit for the task metric.
        configs_dir: Folder holding ``methods/*.yaml``.
        force: Run methods again even if their results exist.
        extra_args: More ``ftframe fit`` arguments for every method (e.g. ``[--trainer.precision=32-true]``).
        metric_data: Score the exact match on the held-out prompts of this data source instead of each run's own
            validation data (:class:`ComparisonProbe`), e.g. ``gsm8k`` to compare SFT with SFT + DPO, whose data
            are preference pairs (docs/preference.md).
        metric_val_size: The held-out size of ``metric_data`` (the quickstart's: 64).
    """
    configs = [fit_config] if isinstance(fit_config, str) else list(fit_config)
    for c in configs:
        if not Path(c).is_file():
            raise UserError(f"compare: --fit_config {c} does not exist")
    methods = dict(methods or DEFAULT_METHODS)
    if only:
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise UserError(f"compare: --only {unknown} not among the methods {list(methods)}")
        methods = {m: methods[m] for m in only}
    specs = {label: _resolve_spec(label, spec, Path(configs_dir)) for label, spec in methods.items()}  # check all first
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, (label, (method_yaml, extra)) in enumerate(specs.items(), start=1):
        run_dir = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")
        result = run_dir / RESULT_FILE
        done = result.is_file() and "task_metric" in json.loads(result.read_text()) if metric_examples else \
            result.is_file() and "peak_memory_bytes" in json.loads(result.read_text())
        if done and not force:
            print(f"[ftframe compare] {i}/{len(specs)} {label}: results exist in {run_dir}, skipped", flush=True)
        else:
            result.unlink(missing_ok=True)
            probe = {"class_path": "ftframe.tools.compare.ComparisonProbe",
                     "init_args": {"output": str(result), "metric_examples": metric_examples,
                                   "answer_pattern": answer_pattern, "max_new_tokens": max_new_tokens,
                                   "metric_data": metric_data, "metric_val_size": metric_val_size}}
            argv = [sys.executable, "-m", "ftframe", "fit", *[a for c in configs for a in ("--config", c)],
                    "--config", method_yaml, f"--trainer.max_steps={steps}", "--validate_before_fit=true",
                    f"--trainer.default_root_dir={run_dir}", "--trainer.logger=false",
                    f"--trainer.callbacks=[{json.dumps(probe)}]", "--trainer.enable_checkpointing=false",
                    f"--adapter.dirpath={run_dir / 'adapter'}", *(extra_args or []), *extra]
            print(f"[ftframe compare] {i}/{len(specs)} {label}: {shlex.join(argv[2:])}", flush=True)
            started = time.time()
            with open(run_dir.with_suffix(".log"), "w") as log:
                proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
            if proc.returncode != 0 or not result.is_file():
                print(f"[ftframe compare] {label} FAILED (exit {proc.returncode}); see {run_dir.with_suffix('.log')}",
                      flush=True)
                continue
            rec = json.loads(result.read_text())
            rec["wall_s"] = time.time() - started
            rec["artifact_bytes"] = _artifact_bytes(run_dir / "adapter") if "trainer.max_steps=0" not in \
                " ".join(extra) else None
            rec["command"] = shlex.join(["ftframe", *argv[3:]])
            result.write_text(json.dumps(rec, indent=2))
        rec = json.loads(result.read_text())
        rec.setdefault("learning_rate", _learning_rate(run_dir / "config.yaml"))
        rows.append(_row(label, rec))
        header = (f"{len(rows)} methods, {steps} steps each, config {' + '.join(configs)}; "
                  f"exact match on {metric_examples} held-out prompts")
        (out / "results.json").write_text(json.dumps({"config": configs, "steps": steps, "rows": rows}, indent=2))
        (out / "results.md").write_text(_table(rows, header))
        _chart(rows, out / "results.png", header)
        r = rows[-1]
        print(f"[ftframe compare] {label}: val loss {r['val_loss_before']} -> {r['val_loss_after']}, "
              f"exact match {r['task_metric']}", flush=True)
    print(f"[ftframe compare] wrote {out / 'results.md'} and {out / 'results.png'}", flush=True)
    return rows
