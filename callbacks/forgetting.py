"""Measure what fine-tuning costs the model outside its task, and stop when that cost exceeds a budget.

Catastrophic forgetting (McCloskey & Cohen, 1989; for LLM fine-tuning see Luo et al., 2023,
https://arxiv.org/abs/2308.08747) is invisible in the task's own validation loss. This callback measures it on data
the run never trains on, before training (the baseline) and after every N-th validation:

* **reference perplexity**: token perplexity on a general-text reference (default: a few State of the Union
  addresses, asset ``sotu``; any text file works), and its relative increase over the baseline;
* **KL divergence** ``KL(base || tuned)`` of the next-token distributions on the same reference windows. For adapter
  methods the base is the same model with its adapters switched off (:meth:`FineTuneModule.disable_adapters`, no
  second copy in memory); otherwise a snapshot of the initial trainable weights is swapped in, which for full
  fine-tuning is a copy of the whole model and is taken only when asked for (``kl: initial_weights``);
* **probe accuracy** on multiple-choice questions (default: 100 MMLU questions spread over its subjects), scored as
  ``ftframe evaluate`` scores them (:func:`ftframe.evaluation.score_multiple_choice`).

Each measurement is logged as ``forgetting/*``, appended to ``forgetting.json`` and drawn in ``forgetting.png``
(task metric and forgetting over steps) in the run's log folder. A budget (``max_ppl_increase``, ``max_kl``,
``max_probe_drop``) warns or stops training when exceeded, and ``forgetting/tradeoff`` scores every validation as
task metric plus drift so that :class:`~ftframe.callbacks.AdapterCheckpoint` (``monitor: forgetting/tradeoff``) keeps
the best trade-off within the budget. Reference windows and questions are tokenized once; each measurement's time is
logged as ``forgetting/seconds``. Under DDP every rank scores its share and the sums are reduced, so all ranks log the
same values and take the same stop decision.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ftframe.artifacts import log_dir
from ftframe.callbacks.graceful_stop import stop_requested
from ftframe.distributed import RootForward, shards_parameters
from ftframe.errors import UserError

__all__ = ["ForgettingMonitor"]


class ForgettingMonitor(Callback):
    """Track reference perplexity, KL to the base model and a multiple-choice probe while fine-tuning.

    Args:
        reference: General text the model must not forget: an asset name (``sotu``), a ``.txt`` file, a JSONL file
            (field ``reference_field``) or a folder of them. ``null`` turns off perplexity and KL.
        reference_field: JSONL field holding the text.
        reference_windows: How many windows of ``window_tokens`` tokens to score; texts are taken at even intervals,
            one window from the start of each (a single long text is cut into windows taken at even intervals).
        window_tokens: Tokens per reference window.
        kl: Base model for the KL term. ``auto``: the method's adapter switch when it has one, else a snapshot of the
            initial trainable weights if they are at most ``max_copy_fraction`` of the model, else no KL (with a
            message saying what the copy would cost). ``adapters_off`` / ``initial_weights`` force one; ``off``
            skips KL (and its second forward pass).
        max_copy_fraction: Largest share of the model's parameters ``kl: auto`` copies for a snapshot.
        probe: Multiple-choice questions never trained on: an asset name (``mmlu``) or a JSONL file (see
            ``ftframe evaluate``), scored with ``probe_format``; or a benchmark of ``ftframe evaluate --suite``
            (``arc_easy``, ``arc_challenge``, ``hellaswag``, ``winogrande``, ``piqa``, ``boolq``, ``openbookqa``;
            ``benchmark:mmlu`` for MMLU's benchmark definition), scored with its own prompt and headline metric.
            ``null`` turns the probe off.
        probe_size: How many probe questions, taken at even intervals through the file.
        probe_format: ``letter`` (answer letter after the lettered choices) or ``continuation`` (each choice's text).
        every_n_validations: Measure after every N-th validation run of ``fit``.
        measure_on_train_end: Measure once more when training ends, if the last step was not measured.
        max_ppl_increase: Budget: largest relative reference-perplexity increase over the baseline (0.1 = +10%).
        max_kl: Budget: largest mean KL(base || tuned) per token, in nats.
        max_probe_drop: Budget: largest drop in probe accuracy from the baseline (absolute, 0.05 = 5 points).
        on_budget: What to do when a budget is exceeded: ``warn``, or ``stop`` training (every rank agrees).
        task_metric: The task's metric in ``forgetting/tradeoff`` (logged by validation).
        task_mode: Whether lower (``min``) or higher (``max``) ``task_metric`` is better.
        tradeoff_weight: Weight of the drift in ``forgetting/tradeoff = task (+/-) weight * drift`` (lower is better),
            where drift is the reference NLL increase per token in nats (``log`` of the perplexity ratio; with no
            reference, the KL). Over-budget measurements score ``inf``, so the best trade-off is always within budget.
        batch_size: Windows / questions per forward pass.
        output_dir: Where ``forgetting.json`` and ``forgetting.png`` go; ``None`` = the trainer's log folder.

    Example:
        ``ftframe fit --config configs/quickstart.yaml --config configs/callbacks/default.yaml``
    """

    def __init__(
        self,
        reference: str | None = "sotu",
        reference_field: str = "text",
        reference_windows: int = 8,
        window_tokens: int = 512,
        kl: Literal["auto", "adapters_off", "initial_weights", "off"] = "auto",
        max_copy_fraction: float = 0.1,
        probe: str | None = "mmlu",
        probe_size: int = 100,
        probe_format: Literal["letter", "continuation"] = "continuation",
        every_n_validations: int = 1,
        measure_on_train_end: bool = True,
        max_ppl_increase: float | None = None,
        max_kl: float | None = None,
        max_probe_drop: float | None = None,
        on_budget: Literal["warn", "stop"] = "warn",
        task_metric: str = "val/loss",
        task_mode: Literal["min", "max"] = "min",
        tradeoff_weight: float = 1.0,
        batch_size: int = 2,
        output_dir: str | None = None,
    ) -> None:
        for name, value in (("reference_windows", reference_windows), ("window_tokens", window_tokens),
                            ("probe_size", probe_size), ("every_n_validations", every_n_validations),
                            ("batch_size", batch_size)):
            if value < 1:
                raise UserError(f"ForgettingMonitor: {name} must be >= 1, got {value}")
        if window_tokens < 2:
            raise UserError(f"ForgettingMonitor: window_tokens must be >= 2, got {window_tokens}")
        for name, value in (("max_ppl_increase", max_ppl_increase), ("max_kl", max_kl),
                            ("max_probe_drop", max_probe_drop)):
            if value is not None and value < 0:
                raise UserError(f"ForgettingMonitor: {name} must be >= 0 or null, got {value}")
        if reference is None and probe is None:
            raise UserError("ForgettingMonitor: reference and probe are both null; nothing to measure")
        if kl not in ("auto", "adapters_off", "initial_weights", "off"):
            raise UserError(f"ForgettingMonitor: kl must be auto, adapters_off, initial_weights or off; got {kl!r}")
        self.reference = reference
        self.reference_field = reference_field
        self.reference_windows = reference_windows
        self.window_tokens = window_tokens
        self.kl = kl
        self.max_copy_fraction = max_copy_fraction
        self.probe = probe
        self.probe_size = probe_size
        self.probe_format = probe_format
        self.every_n_validations = every_n_validations
        self.measure_on_train_end = measure_on_train_end
        self.max_ppl_increase = max_ppl_increase
        self.max_kl = max_kl
        self.max_probe_drop = max_probe_drop
        self.on_budget = on_budget
        self.task_metric = task_metric
        self.task_mode = task_mode
        self.tradeoff_weight = tradeoff_weight
        self.batch_size = batch_size
        self.output_dir = output_dir
        # state (saved in checkpoints)
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self.measure_seconds = 0.0  # time spent measuring in this process (the run summary's)
        self.validations = 0
        self.initial_weights: dict[str, torch.Tensor] | None = None
        # built in setup
        self._windows: list[tuple[list[int], int]] = []
        self._questions: list[Any] = []
        self._kl_mode: str = "off"

    def metric_names(self) -> tuple[str, ...]:
        """What this monitor can log, as ``forgetting/<name>`` (``kl`` only where a base model is at hand)."""
        names = ["seconds", "over_budget", "task", "tradeoff"]
        if self.reference is not None:
            names += ["ref_nll", "ref_ppl", "ppl_increase"] + (["kl"] if self.kl != "off" else [])
        if self.probe is not None:
            names += ["probe_acc", "probe_drop"]
        return tuple(f"forgetting/{n}" for n in names)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reference=self.reference, probe=self.probe, task_metric=self.task_metric)

    # ------------------------------------------------------------------ set-up
    def _prepare(self, pl_module: LightningModule) -> None:
        """Tokenize the reference windows and load the probe questions (once per process)."""
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise UserError("ForgettingMonitor needs the model's tokenizer: use it with an ftframe method "
                            "(a FineTuneModule subclass)")
        if self.reference is not None and not self._windows:
            self._windows = self._reference_windows(tokenizer)
        if self.probe is not None and not self._questions:
            from ftframe.evaluation import load_questions, sample_evenly

            bench = self._probe_benchmark()
            if bench is not None:
                from ftframe.evaluation.benchmarks import load_benchmark

                self._questions = load_benchmark(bench.name, sample=self.probe_size)
            else:
                self._questions = sample_evenly(load_questions(self.probe), self.probe_size)

    def _probe_benchmark(self) -> Any:
        """The benchmark definition ``probe`` names (``benchmark:NAME``, or a benchmark that is not an asset/file)."""
        from ftframe import assets
        from ftframe.evaluation.benchmarks import benchmark, benchmark_names

        probe = self.probe or ""
        if probe.startswith("benchmark:"):
            return benchmark(probe.split(":", 1)[1])
        if probe in benchmark_names() and not assets.is_asset(probe) and not Path(probe).exists():
            return benchmark(probe)
        return None

    def _reference_windows(self, tokenizer: Any) -> list[tuple[list[int], int]]:
        from ftframe.evaluation.perplexity import read_texts, text_windows

        source = self.reference
        assert source is not None
        from ftframe import assets

        path = assets.asset_path(source) if assets.is_asset(source) else Path(source)
        texts = [t for t in read_texts(path, self.reference_field) if t.strip()]
        if not texts:
            raise UserError(f"ForgettingMonitor: reference {source} holds no text")
        n = self.reference_windows
        if len(texts) >= n:
            # one window from the start of each of n texts at even intervals; ~8 characters per token is plenty
            picked = [texts[round(i * (len(texts) - 1) / max(n - 1, 1))] for i in range(n)]
            windows = [text_windows(tokenizer, [t[: self.window_tokens * 8]], self.window_tokens)[0][0]
                       for t in picked]
        else:
            every = text_windows(tokenizer, texts, self.window_tokens)[0]
            windows = [every[round(i * (len(every) - 1) / max(n - 1, 1))] for i in range(min(n, len(every)))]
        return windows

    def _choose_kl(self, trainer: Trainer, pl_module: LightningModule) -> str:
        if self.kl == "off" or self.reference is None:
            return "off"
        switch = pl_module.disable_adapters() if hasattr(pl_module, "disable_adapters") else None
        if shards_parameters(trainer) and (self.kl == "initial_weights" or (self.kl == "auto" and switch is None)):
            # a snapshot swapped into parameters that are views of shards would not reach the gathered weights
            if self.kl == "initial_weights":
                raise UserError(f"ForgettingMonitor kl: initial_weights cannot run under "
                                f"{type(trainer.strategy).__name__}, which shards the weights it would swap; use "
                                "kl: adapters_off with an adapter method, kl: off, or configs/strategy/ddp.yaml")
            rank_zero_info(f"[ftframe] forgetting: no KL for {type(pl_module).__name__} under "
                           f"{type(trainer.strategy).__name__} (it has no adapter switch; a weight snapshot cannot be "
                           "swapped into shards)")
            return "off"
        if self.kl == "adapters_off":
            if switch is None:
                raise UserError(f"ForgettingMonitor kl: adapters_off, but {type(pl_module).__name__} has no adapter "
                                "switch (its base weights are trained or changed); use kl: initial_weights")
            return "adapters_off"
        if self.kl == "initial_weights":
            return "initial_weights"
        if switch is not None:
            return "adapters_off"
        trainable, total = _counts(pl_module)
        if trainable <= self.max_copy_fraction * total:
            return "initial_weights"
        rank_zero_info(f"[ftframe] forgetting: no KL for {type(pl_module).__name__}: the base would need a copy of "
                       f"{trainable:,} trainable weights ({trainable / total:.0%} of the model, "
                       f"{_bytes(pl_module) / 2**30:.2f} GiB); set kl: initial_weights to accept that memory")
        return "off"

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare(pl_module)
        self._kl_mode = self._choose_kl(trainer, pl_module)
        if self._kl_mode == "initial_weights" and self.initial_weights is None:
            self.initial_weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        if self.baseline is None:
            self.baseline = self._measure(trainer, pl_module, "baseline")
            if self.baseline is not None:
                self._record(trainer, dict(self.baseline), task=None)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or self.baseline is None:
            return
        if (self.validations + 1) % self.every_n_validations:
            self.validations += 1
            return
        metrics = self._measure(trainer, pl_module, f"step {trainer.global_step}")
        if metrics is None:  # a signal stopped training: this validation is measured again after resuming
            return
        self.validations += 1
        task = trainer.callback_metrics.get(self.task_metric)
        self._record(trainer, metrics, task=float(task) if task is not None else None)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.measure_on_train_end or self.baseline is None:
            return
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return
        metrics = self._measure(trainer, pl_module, "end of training")
        if metrics is not None:
            self._record(trainer, metrics, task=None)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "history": self.history, "validations": self.validations,
                "initial_weights": self.initial_weights}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict.get("baseline")
        self.history = list(state_dict.get("history", []))
        self.validations = int(state_dict.get("validations", 0))
        self.initial_weights = state_dict.get("initial_weights")

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def _measure(self, trainer: Trainer, pl_module: LightningModule, when: str) -> dict[str, float] | None:
        """The forgetting metrics now, or ``None`` when a signal (``GracefulStop``) cut the measurement short."""
        from ftframe.evaluation.common import scoring_mode

        model = pl_module.model  # the bare model: DDP's wrapper is not involved in these forward passes
        assert model is not None
        tokenizer = pl_module.tokenizer
        rank, world = trainer.global_rank, trainer.world_size
        run = model
        if shards_parameters(trainer):
            # FSDP / ZeRO-3: forward passes go through the wrapped root (it gathers the root unit's weights) and
            # gather weights collectively, so every rank scores everything -- the same passes, the same result
            run = RootForward(trainer.strategy.model, model)
            rank, world = 0, 1
        start = time.perf_counter()
        rank_zero_info(f"[ftframe] forgetting ({when}): scoring {len(self._windows)} reference windows"
                       + (" twice (tuned and base)" if self._kl_mode != "off" else "")
                       + f" and {len(self._questions)} probe questions")
        out: dict[str, float] = {}
        device = next(model.parameters()).device
        sums = torch.zeros(6, dtype=torch.float64, device=device)  # nll, tokens, kl, correct, questions, cut short
        # a signal ends the measurement early; passes that gather weights collectively (FSDP / ZeRO-3) run to the end
        may_stop = not shards_parameters(trainer)
        if self._windows:
            from ftframe.evaluation.perplexity import pad_windows
            from ftframe.tasks import virtual_tokens

            virtual = virtual_tokens(model)[1]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            mine = self._windows[rank::world]
            with scoring_mode(model) as device:
                for i in range(0, len(mine), self.batch_size):
                    if may_stop and stop_requested():
                        sums[5] = 1
                        break
                    chunk = mine[i : i + self.batch_size]
                    ids, mask = pad_windows(chunk, pad)
                    ids, mask = ids.to(device), mask.to(device)
                    logits = run(input_ids=ids, attention_mask=mask).logits[:, virtual:]  # (B, T, V)
                    base = None
                    if self._kl_mode != "off":
                        with self._base(pl_module):
                            base = run(input_ids=ids, attention_mask=mask).logits
                    for r, (w, scored) in enumerate(chunk):
                        span = slice(len(w) - scored - 1, len(w) - 1)  # positions predicting the scored tokens
                        lp = F.log_softmax(logits[r, span].float(), dim=-1)  # (scored, V)
                        target = torch.tensor(w[len(w) - scored :], device=device)
                        sums[0] -= lp.gather(-1, target[:, None]).sum().double()
                        sums[1] += scored
                        if base is not None:
                            base_lp = F.log_softmax(base[r, span].float(), dim=-1)
                            sums[2] += F.kl_div(lp, base_lp, log_target=True, reduction="sum").double()
                    del logits, base
        if self._questions:
            from ftframe.evaluation import score_multiple_choice

            mine_q = self._questions[rank::world]
            if may_stop and stop_requested():
                sums[5] = 1
            elif mine_q:
                bench = self._probe_benchmark()
                result = score_multiple_choice(run, tokenizer, mine_q,
                                               prompt_format="rendered" if bench else self.probe_format,
                                               batch_size=max(self.batch_size, 4), overflow="truncate",
                                               progress=False)
                if bench is not None:
                    key = "correct_norm" if bench.primary == "acc_norm" else "correct"
                else:
                    key = "correct_norm" if self.probe_format == "continuation" else "correct"
                sums[3] += sum(bool(r[key]) for r in result.records)
                sums[4] += len(result.records)
        if world > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[5]) > 0:
            rank_zero_info(f"[ftframe] forgetting ({when}): stopped by a signal after "
                           f"{time.perf_counter() - start:.1f}s; not recorded")
            return None
        if self._windows:
            nll = float(sums[0] / sums[1])
            out["ref_nll"] = nll
            out["ref_ppl"] = math.exp(nll)
            if self._kl_mode != "off":
                out["kl"] = float(sums[2] / sums[1])
        if self._questions and float(sums[4]) > 0:
            out["probe_acc"] = float(sums[3] / sums[4])
        out["seconds"] = time.perf_counter() - start
        self.measure_seconds += out["seconds"]
        parts = [f"{k}={v:.4f}" for k, v in out.items() if k != "seconds"]
        rank_zero_info(f"[ftframe] forgetting ({when}): {', '.join(parts)} in {out['seconds']:.1f}s")
        return out

    @contextmanager
    def _base(self, pl_module: LightningModule) -> Iterator[None]:
        """The base model's forward: adapters switched off, or the initial trainable weights swapped in."""
        if self._kl_mode == "adapters_off":
            with pl_module.disable_adapters() or nullcontext():
                yield
            return
        assert self.initial_weights is not None
        params = dict(pl_module.named_parameters())
        saved = {}
        for name, initial in self.initial_weights.items():
            saved[name] = params[name].data
            params[name].data = initial.to(saved[name].device)
        try:
            yield
        finally:
            for name, data in saved.items():
                params[name].data = data

    # ------------------------------------------------------------------ budget, trade-off, logging
    def _record(self, trainer: Trainer, metrics: dict[str, float], task: float | None) -> None:
        assert self.baseline is not None
        row: dict[str, Any] = {"step": trainer.global_step, **metrics}
        if "ref_ppl" in metrics:
            row["ppl_increase"] = metrics["ref_ppl"] / self.baseline["ref_ppl"] - 1
        if "probe_acc" in metrics:
            row["probe_drop"] = self.baseline["probe_acc"] - metrics["probe_acc"]
        over = self._over_budget(row)
        row["over_budget"] = bool(over)
        if task is not None:
            row["task"] = task
            drift = (metrics["ref_nll"] - self.baseline["ref_nll"]) if "ref_nll" in metrics else row.get("kl", 0.0)
            signed = task if self.task_mode == "min" else -task
            row["tradeoff"] = math.inf if over else signed + self.tradeoff_weight * drift
        self.history.append(row)
        logged = {f"forgetting/{k}": float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for key, value in logged.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        folder = self._folder(trainer)  # collective under DDP (trainer.log_dir broadcasts): every rank
        if trainer.is_global_zero:
            self._write(folder)
        decision = trainer.strategy.reduce_boolean_decision(bool(over), all=False)
        if decision:
            message = f"[ftframe] forgetting budget exceeded at step {trainer.global_step}: {'; '.join(over)}"
            if self.on_budget == "stop":
                trainer.should_stop = True
                rank_zero_info(message + ". Stopping training (on_budget: stop).")
            else:
                rank_zero_warn(message + " (on_budget: warn; set on_budget: stop to stop training)")

    def _over_budget(self, row: dict[str, Any]) -> list[str]:
        reasons = []
        if self.max_ppl_increase is not None and row.get("ppl_increase", 0.0) > self.max_ppl_increase:
            reasons.append(f"reference perplexity +{row['ppl_increase']:.1%} > max_ppl_increase "
                           f"{self.max_ppl_increase:.1%}")
        if self.max_kl is not None and row.get("kl", 0.0) > self.max_kl:
            reasons.append(f"KL {row['kl']:.4f} > max_kl {self.max_kl}")
        if self.max_probe_drop is not None and row.get("probe_drop", 0.0) > self.max_probe_drop:
            reasons.append(f"probe accuracy -{row['probe_drop']:.3f} > max_probe_drop {self.max_probe_drop}")
        return reasons

    def best(self) -> dict[str, Any] | None:
        """The measurement with the best (lowest) trade-off within budget, or ``None`` if none qualifies."""
        rows = [r for r in self.history if math.isfinite(r.get("tradeoff", math.inf))]
        return min(rows, key=lambda r: r["tradeoff"]) if rows else None

    def _folder(self, trainer: Trainer) -> Path:
        return Path(self.output_dir) if self.output_dir else log_dir(trainer)

    def _write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        report = {"baseline": self.baseline, "history": self.history, "best_tradeoff": self.best(),
                  "budget": {"max_ppl_increase": self.max_ppl_increase, "max_kl": self.max_kl,
                             "max_probe_drop": self.max_probe_drop, "on_budget": self.on_budget},
                  "reference": self.reference, "reference_tokens": sum(s for _, s in self._windows),
                  "probe": self.probe, "probe_questions": len(self._questions), "kl_base": self._kl_mode,
                  "task_metric": self.task_metric}
        tmp = folder / "forgetting.json.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(folder / "forgetting.json")
        plot_forgetting(self.history, folder / "forgetting.png", task_metric=self.task_metric,
                        max_ppl_increase=self.max_ppl_increase)


def plot_forgetting(history: list[dict[str, Any]], path: Path, task_metric: str = "val/loss",
                    max_ppl_increase: float | None = None) -> None:
    """Task metric and forgetting over steps (left), task metric against perplexity increase (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, scatter) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = [r["step"] for r in history]
    series = [("ppl_increase", "reference perplexity increase", "tab:red"), ("kl", "KL(base || tuned)", "tab:orange"),
              ("probe_drop", "probe accuracy drop", "tab:purple")]
    for key, label, color in series:
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=color, label=label)
    if max_ppl_increase is not None:
        ax.axhline(max_ppl_increase, color="tab:red", linestyle=":", label="perplexity budget")
    ax.set_xlabel("step")
    ax.set_ylabel("forgetting")
    task = [(r["step"], r["task"]) for r in history if "task" in r]
    if task:
        twin = ax.twinx()
        twin.plot(*zip(*task, strict=True), marker="s", color="tab:blue", label=task_metric)
        twin.set_ylabel(task_metric, color="tab:blue")
    ax.legend(loc="center left", fontsize=8)
    ax.set_title("forgetting over training")
    both = [r for r in history if "task" in r and "ppl_increase" in r]
    if both:
        scatter.plot([r["ppl_increase"] for r in both], [r["task"] for r in both], marker="o", color="tab:blue")
        for r in both:
            scatter.annotate(str(r["step"]), (r["ppl_increase"], r["task"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
        finite = [r for r in both if math.isfinite(r.get("tradeoff", math.inf))]
        if finite:
            best = min(finite, key=lambda r: r["tradeoff"])
            scatter.scatter([best["ppl_increase"]], [best["task"]], s=120, facecolors="none", edgecolors="tab:green",
                            label=f"best trade-off (step {best['step']})")
            scatter.legend(fontsize=8)
        if max_ppl_increase is not None:
            scatter.axvline(max_ppl_increase, color="tab:red", linestyle=":")
    scatter.set_xlabel("reference perplexity increase (relative to before training)")
    scatter.set_ylabel(task_metric)
    scatter.set_title("task vs. forgetting (labels: step)")
    if not steps:
        ax.text(0.5, 0.5, "no measurements", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _counts(pl_module: LightningModule) -> tuple[int, int]:
    counts = getattr(pl_module, "parameter_counts", None)
    if callable(counts):
        return counts()
    params = list(pl_module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _bytes(pl_module: LightningModule) -> int:
    return sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
