"""``ftframe tune``: a hyperparameter search over any config key of an ``ftframe fit`` run, on Optuna.

* The **run** is any ``ftframe fit`` configuration (``--config`` files and flags); the **space** is a YAML file of
  dotted config keys (as ``ftframe fit --print_config`` names them) and their distributions. A trial turns the values
  it draws into LightningCLI flags (``--model.init_args.r=16``) and runs ``python -m ftframe fit`` with them in its own
  process, under ``<output>/trials/<number>/`` -- the same code path as a hand-run fit, and its own peak memory.
* **Pruning by step**: a :class:`TrialReporter` callback in that process reports the objective to the study after
  each validation, keyed on ``trainer.global_step`` (a one-epoch fine-tune still prunes), and stops the run when the
  pruner (median or successive halving) says so. ``--eval_every N`` validates every N optimizer steps for it.
* **Several objectives**: ``--objectives val/loss forgetting/ppl_increase`` gives a multi-objective study (with the
  :class:`~ftframe.callbacks.ForgettingMonitor` in the run) and its Pareto front. Optuna cannot prune those.
* **Nothing lost, and parallel**: the study lives in Optuna storage (default: SQLite ``<output>/study.db``; a
  ``.log`` path is a journal file; a PostgreSQL / MySQL URL shares one study between machines). Rerunning the same
  command continues it up to ``--trials`` finished trials; a trial whose process died is marked failed once its
  heartbeat is ``2 x --heartbeat`` seconds old (RDB storage) and is not counted. Several ``ftframe tune`` processes on
  one storage run trials in parallel.
* **Outputs** (rewritten after every trial): ``best.yaml`` (``ftframe fit --config best.yaml`` runs the best trial),
  ``trials.md`` / ``trials.csv``, and Optuna's matplotlib plots (optimisation history, parameter importances, Pareto
  front).

Sampling, pruning and storage are Optuna's (TPE sampler, ``MedianPruner`` / ``SuccessiveHalvingPruner``, RDB and
journal storage); this module only turns a space file into trials of ``ftframe fit`` and their results into files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import fnmatch
import importlib
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from ftframe.errors import UserError

__all__ = ["Param", "TrialReporter", "load_space", "main", "tune"]

KINDS = ("float", "int", "categorical")
RESULT_FILE = "result.json"
#: Substrings of a metric name that mean higher is better (anything else is minimised).
MAXIMISE = ("accuracy", "acc", "f1", "precision", "recall", "margins", "rewards/chosen")


# ---------------------------------------------------------------------------------------------------- the space
@dataclass
class Param:
    """One searched config key and its distribution."""

    key: str
    kind: str
    where: str  # "file:line" of the key in the space file
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        """The value ``trial`` draws for this key (Optuna's ``suggest_*``)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        labels = [_choice_label(c) for c in self.choices]
        return self.choices[labels.index(trial.suggest_categorical(self.key, labels))]

    def optuna_value(self, value: Any) -> Any:
        """``value`` as Optuna stores it (a categorical choice that is a list or mapping is stored as its label)."""
        if self.kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)  # e.g. an int option the run config's schema types as float
        return _choice_label(value) if self.kind == "categorical" else value

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.kind == "int" and value != int(value):
            return False
        if self.step:
            return abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-9
        return True

    def bounds(self) -> list[Any]:
        """The values that bound what this key can take (tried against the run config before any trial)."""
        if self.kind == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [float(self.low), float(self.high)]


def _choice_label(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def _same(a: Any, b: Any) -> bool:
    return _choice_label(a) == _choice_label(b) and type(a) is type(b) or (
        not isinstance(a, bool) and not isinstance(b, bool) and isinstance(a, (int, float))
        and isinstance(b, (int, float)) and a == b)


def flag_value(value: Any) -> str:
    """``value`` as a LightningCLI flag value (parsed as YAML by jsonargparse)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and text not in ("inf", "-inf", "nan"):
            mantissa, exponent = text.split("e")
            text = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exponent):+03d}"  # YAML 1.1 needs the dot
        return text
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def to_flags(params: dict[str, Any]) -> list[str]:
    """LightningCLI overrides for drawn values: ``{"model.init_args.r": 16}`` -> ``["--model.init_args.r=16"]``."""
    return [f"--{key}={flag_value(value)}" for key, value in params.items()]


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{where}: {name} must be a number, got {value!r}")
    try:
        return float(value)  # "1e-4" is a string to YAML 1.1: accept it
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name} must be a number, got {value!r}") from None


def load_space(path: str | Path) -> list[Param]:
    """Read a space file: ``KEY: {type: float|int|categorical, low, high, log, step, choices}`` per line.

    A list (``KEY: [a, b]``) is a categorical. Errors name the file, line and key.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--space {path}: cannot read it ({e.strerror})") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise UserError(f"--space {path}: not valid YAML: {e}") from None
    if root is None or not isinstance(root, yaml.MappingNode) or not root.value:
        raise UserError(f"--space {path}: expected a mapping of dotted config keys to distributions, e.g. "
                        "model.init_args.r: {type: int, low: 4, high: 32}")
    params: list[Param] = []
    for key_node, value_node in root.value:
        key, where = str(key_node.value), f"{path}:{key_node.start_mark.line + 1}"
        spec = yaml.safe_load(yaml.serialize(value_node))
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict):
            raise UserError(f"{where}: {key}: expected {{type: float|int|categorical, ...}} or a list of choices, "
                            f"got {spec!r}")
        kind = spec.pop("type", None)
        if kind not in KINDS:
            raise UserError(f"{where}: {key}: type must be one of {list(KINDS)}, got {kind!r}")
        allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
                   "categorical": {"choices"}}[kind]
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise UserError(f"{where}: {key}: {kind} takes {sorted(allowed)}, not {unknown}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{where}: {key}: choices must be a non-empty list")
            if len({json.dumps(_choice_label(c)) for c in choices}) != len(choices):
                raise UserError(f"{where}: {key}: choices repeat a value: {choices}")
            params.append(Param(key, kind, where, choices=choices))
            continue
        for name in ("low", "high"):
            if name not in spec:
                raise UserError(f"{where}: {key}: {kind} needs low and high")
        low, high = _number(spec["low"], where, "low"), _number(spec["high"], where, "high")
        log = bool(spec.get("log", False))
        step = _number(spec["step"], where, "step") if spec.get("step") is not None else None
        if not (math.isfinite(low) and math.isfinite(high)):
            raise UserError(f"{where}: {key}: low and high must be finite")
        if low > high:
            raise UserError(f"{where}: {key}: the range is inverted (low {spec['low']} > high {spec['high']})")
        if low == high:
            raise UserError(f"{where}: {key}: the range is empty (low == high == {spec['low']}); fix the value in the "
                            "run config instead of searching it")
        if log and low <= 0:
            raise UserError(f"{where}: {key}: a log range needs low > 0, got {spec['low']}")
        if log and step is not None:
            raise UserError(f"{where}: {key}: log and step cannot be combined (Optuna draws one or the other)")
        if step is not None and step <= 0:
            raise UserError(f"{where}: {key}: step must be > 0, got {spec['step']}")
        if kind == "int":
            if low != int(low) or high != int(high) or (step is not None and step != int(step)):
                raise UserError(f"{where}: {key}: an int range needs whole numbers (use type: float otherwise)")
        params.append(Param(key, kind, where, low=low, high=high, log=log, step=step))
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise UserError(f"--space {path}: a key appears twice")
    return params


# ---------------------------------------------------------------------------------------------------- the run
def _parse_run(args: list[str], apply_when_precision: bool = True) -> tuple[Any, Any]:
    """Parse ``ftframe fit`` arguments exactly as ``ftframe fit`` does, without building anything: (parser, config).

    ``when_precision`` is applied for this machine when asked (quietly), as fit would.
    """
    from ftframe.cli import FTFrameCLI, _check_option_names

    _check_option_names(args)

    class _ParseOnly(FTFrameCLI):
        def before_instantiate_classes(self) -> None:
            if apply_when_precision:
                with contextlib.redirect_stdout(io.StringIO()):
                    self._apply_when_precision(self.config)

        def instantiate_classes(self) -> None:
            pass

        def _set_seed(self) -> None:
            pass

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")  # tune's own argv is not fit's
        cli = _ParseOnly(args=args, run=False)
    return cli.parser, cli.config


def _config_keys(config: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in vars(config).items():
        full = f"{prefix}{key}"
        keys.append(full)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            keys += _config_keys(value, full + ".")
    return keys


def _import_class(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    if not module:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def check_space(params: list[Param], run_args: list[str], config: Any) -> None:
    """Every key is one the run config has; every bound and choice is a value it accepts (class paths import)."""
    keys = [k for k in _config_keys(config) if not k.startswith("__")]
    for p in params:
        if p.key not in keys:
            close = difflib.get_close_matches(p.key, keys, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(close)}?" if close
                    else "the keys are as `ftframe fit --print_config` names them, e.g. model.init_args.r")
            raise UserError(f"{p.where}: {p.key!r} is not a key of the run config; {hint}")
        if p.kind == "categorical" and p.key.endswith("class_path"):
            for choice in p.choices:
                if not isinstance(choice, str) or _import_class(choice) is None:
                    raise UserError(f"{p.where}: {p.key}: the class path {choice!r} does not import (give the full "
                                    "module path, e.g. ftframe.methods.DoRA)")
    for p in params:  # one parse per bound: jsonargparse types each value as the run config would
        for value in p.bounds():
            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    _parse_run([*run_args, *to_flags({p.key: value})], apply_when_precision=False)
            except SystemExit:
                lines = [line for line in err.getvalue().splitlines() if line.strip()]
                raise UserError(f"{p.where}: {p.key}={flag_value(value)} is refused by the run config: "
                                f"{lines[-1] if lines else 'invalid value'}") from None
            except UserError as e:
                raise UserError(f"{p.where}: {p.key}={flag_value(value)}: {e}") from None


def logged_metrics(config: Any) -> list[str]:
    """What a run of ``config`` logs, as patterns (``*`` for a label or data set name)."""
    names = ["train/loss", "val/loss", "val/*/loss"]
    task = config.get("model.init_args.task")
    task_obj = None
    if task is not None and getattr(task, "class_path", None):
        cls = _import_class(str(task.class_path))
        if cls is not None:
            with contextlib.suppress(Exception):
                task_obj = cls(**(task.init_args.as_dict() if getattr(task, "init_args", None) else {}))
    if task_obj is None and task is None:
        from ftframe.tasks import CausalLM

        task_obj = CausalLM()
    if task_obj is not None:
        for name in task_obj.metric_names():
            names += [f"val/{name}", f"val/*/{name}"]
    for cb in config.get("trainer.callbacks") or []:
        cls = _import_class(str(getattr(cb, "class_path", "")))
        if cls is not None and hasattr(cls, "metric_names"):
            with contextlib.suppress(Exception):
                names += list(cls(**(cb.init_args.as_dict() if getattr(cb, "init_args", None) else {})).metric_names())
    return names


def default_objective(config: Any) -> str:
    return "val/accuracy" if "val/accuracy" in logged_metrics(config) else "val/loss"


def direction_of(metric: str) -> str:
    leaf = metric.rsplit("/", 1)[-1]
    return "maximize" if any(word in leaf for word in MAXIMISE) and "loss" not in leaf else "minimize"


def make_pruner(name: str) -> Any:
    """Optuna's pruner for ``--pruner`` (built alike in ``ftframe tune`` and in each trial: storage keeps none)."""
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[name]()


# ---------------------------------------------------------------------------------------------------- in the trial
class TrialReporter(Callback):
    """Report a trial's objective to its Optuna study after each validation, keyed on ``global_step``; prune.

    ``ftframe tune`` adds it to every trial's ``ftframe fit``; it is not meant for hand-written configs. It keeps the
    latest value of every logged scalar, writes them (and whether and where the trial was pruned) to ``output``, and
    asks the CLI for a validation after training when the last one was not at the final step.

    Args:
        output: JSON file for the trial's results.
        storage: The study's Optuna storage (URL or journal path); ``None``: no pruning.
        study: The study's name.
        trial_id: Optuna's id of this trial.
        prune_on: The metric reported for pruning (single-objective studies only).
        pruner: ``median`` or ``halving``, as ``ftframe tune --pruner`` (the storage does not keep it).
    """

    def __init__(self, output: str, storage: str | None = None, study: str | None = None, trial_id: int | None = None,
                 prune_on: str | None = None, pruner: str = "median") -> None:
        self.pruner = pruner
        self.output = output
        self.storage = storage
        self.study = study
        self.trial_id = trial_id
        self.prune_on = prune_on
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.pruned_at: int | None = None
        self.last_validation_step: int | None = None
        self._trial: Any = None

    def _optuna_trial(self) -> Any:
        if self._trial is None:
            import optuna

            study = optuna.load_study(study_name=self.study, storage=open_storage(self.storage),
                                      pruner=make_pruner(self.pruner))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def _collect(self, trainer: Trainer) -> None:
        for key, value in trainer.callback_metrics.items():
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                self.latest[key] = float(value)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._collect(trainer)
        step = trainer.global_step
        self.last_validation_step = step
        self.history.append({"step": step, **{k: v for k, v in self.latest.items() if not k.startswith("train/")}})
        if (self.prune_on and self.storage and self.trial_id is not None and trainer.state.fn == "fit"
                and self.prune_on in self.latest and self.pruned_at is None):
            prune = False
            if trainer.is_global_zero:
                trial = self._optuna_trial()
                trial.report(self.latest[self.prune_on], step)
                prune = not self._at_last_step(trainer) and trial.should_prune()
            if trainer.strategy.broadcast(prune, src=0):
                self.pruned_at = step
                trainer.should_stop = True
                if trainer.is_global_zero:
                    print(f"[ftframe] tune: pruned at step {step} ({self.prune_on} {self.latest[self.prune_on]:.4f})",
                          flush=True)
        self._write(trainer)

    @staticmethod
    def _at_last_step(trainer: Trainer) -> bool:
        """At the run's last step pruning saves nothing: the value is then the trial's result, never a prune."""
        last = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return trainer.global_step >= last

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collect(trainer)
        self._write(trainer)

    def wants_final_validation(self, trainer: Trainer) -> bool:
        """Asked by ``FTFrameCLI.after_fit``: validate once more so the objective is the final step's."""
        return self.pruned_at is None and self.last_validation_step != trainer.global_step

    def _write(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        record = {"metrics": self.latest, "steps": trainer.global_step, "pruned_at": self.pruned_at,
                  "last_validation_step": self.last_validation_step, "history": self.history}
        part = Path(self.output).with_suffix(".part")
        part.write_text(json.dumps(record, indent=1, default=float))
        os.replace(part, self.output)


# ---------------------------------------------------------------------------------------------------- storage
def open_storage(url: str, heartbeat: float | None = None) -> Any:
    """Optuna storage for ``url``: an RDB URL (``sqlite:///``, ``postgresql://``, ``mysql://``), with a heartbeat
    when given, or a journal file path."""
    import optuna

    if "://" in url:
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # parallel workers wait for the file lock
        if heartbeat:
            kwargs.update(heartbeat_interval=max(1, int(heartbeat)), grace_period=max(2, int(2 * heartbeat)))
        import warnings

        from sqlalchemy.exc import SQLAlchemyError

        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: "experimental"
                    return optuna.storages.RDBStorage(url, **kwargs)
            except SQLAlchemyError:
                # workers started together race to create a new database's tables: the loser retries and finds them
                if attempt == 5:
                    raise
                time.sleep(0.5 * (attempt + 1))
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(url))


WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned(study: Any, heartbeat: bool) -> list[int]:
    """Mark failed the trials left RUNNING by a worker that died (``kill -9``, a crash, a lost machine).

    A trial's worker is ``host:pid``: one on this host whose process is gone is failed at once (any storage); others
    by Optuna's heartbeat (RDB storage), once silent for the grace period. Returns the numbers failed."""
    import optuna

    running = lambda: [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]  # noqa: E731
    before = {t.number for t in running()}
    if not before:
        return []
    host = socket.gethostname()
    for t in running():
        worker = str(t.user_attrs.get("worker", ""))
        name, _, pid = worker.rpartition(":")
        if name == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            study._storage.set_trial_user_attr(t._trial_id, "note", f"its worker {worker} died mid-trial")
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if heartbeat:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    still = {t.number for t in running()}
    failed = sorted(before - still)
    if failed:
        print(f"[ftframe] tune: trial{'s' if len(failed) > 1 else ''} {failed} had been running when "
              f"{'their worker' if len(failed) > 1 else 'its worker'} stopped: marked failed (not counted)", flush=True)
    if still:
        print(f"[ftframe] tune: trial{'s' if len(still) > 1 else ''} {sorted(still)} running in another worker",
              flush=True)
    return failed


# ---------------------------------------------------------------------------------------------------- outputs
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}"
    return "" if value is None else str(value)


def _trial_rows(study: Any, params: list[Param], objectives: list[str]) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        row.update({p.key: t.params.get(p.key) for p in params})
        for i, name in enumerate(objectives):
            row[name] = t.values[i] if t.values is not None else t.user_attrs.get("metrics", {}).get(name)
        row["steps"] = t.user_attrs.get("steps")
        row["pruned_at"] = t.user_attrs.get("pruned_at")
        row["seconds"] = round(seconds, 1) if seconds is not None else None
        row["worker"] = t.user_attrs.get("worker", "")
        row["note"] = t.user_attrs.get("note", "")
        rows.append(row)
    return rows


def write_outputs(study: Any, params: list[Param], objectives: list[str], out: Path, parser: Any,
                  run_args: list[str], plots: bool = True) -> dict[str, Any]:
    """trials.csv, trials.md, best.yaml and the plots, from the study as it is now; returns a summary."""
    import optuna

    rows = _trial_rows(study, params, objectives)
    columns = list(rows[0]) if rows else ["trial", "state", *[p.key for p in params], *objectives]
    with open(out / "trials.csv.part", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / "trials.csv.part", out / "trials.csv")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trials if complete else []
    best_numbers = {t.number for t in best}
    lines = [f"# Study `{study.study_name}`", "",
             f"{len(rows)} trials: " + ", ".join(f"{sum(r['state'] == s for r in rows)} {s.lower()}"
                                                 for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
                                                 if any(r["state"] == s for r in rows)) + ". "
             + ("Objective" + ("s" if len(objectives) > 1 else "") + ": "
                + ", ".join(f"{m} ({d.name.lower()})" for m, d in zip(objectives, study.directions, strict=True))) + ".",
             ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        mark = (" **Pareto**" if len(objectives) > 1 else " **best**") if r["trial"] in best_numbers else ""
        lines.append("| " + " | ".join(_fmt(r[c]) + (mark if c == "trial" else "") for c in columns) + " |")
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary: dict[str, Any] = {"trials": len(rows), "best": [t.number for t in best]}
    if best:
        chosen = best[0] if len(objectives) == 1 else min(best, key=lambda t: t.values[0])
        _write_best_yaml(chosen, params, objectives, out, parser, run_args)
        summary["best_values"] = chosen.values
        summary["best_params"] = chosen.params
    if plots:
        _plots(study, objectives, out)
    return summary


def _write_best_yaml(trial: Any, params: list[Param], objectives: list[str], out: Path, parser: Any,
                     run_args: list[str]) -> None:
    values = trial.user_attrs.get("values") or {}
    chosen = {p.key: values.get(p.key, trial.params.get(p.key)) for p in params}
    parser, config = _parse_run([*run_args, *to_flags(chosen)], apply_when_precision=False)
    body = parser.dump(config, skip_none=False)
    head = [f"# ftframe tune: the best trial ({trial.number}) of the study in {out}",
            f"# {', '.join(f'{m} = {v:.6g}' for m, v in zip(objectives, trial.values, strict=True))}",
            *(f"# {k}: {flag_value(v)}" for k, v in chosen.items()),
            "# run it: ftframe fit --config best.yaml"]
    (out / "best.yaml").write_text("\n".join(head) + "\n" + body, encoding="utf-8")


def _plots(study: Any, objectives: list[str], out: Path) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    jobs: list[tuple[str, Any]] = []
    if len(objectives) == 1:
        jobs.append(("history.png", lambda: ovm.plot_optimization_history(study, target_name=objectives[0])))
        if len(complete) >= 2 and study.best_trial.params:
            jobs.append(("importances.png", lambda: ovm.plot_param_importances(study)))
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            jobs.append(("intermediate.png", lambda: ovm.plot_intermediate_values(study)))
    else:
        for i, name in enumerate(objectives):
            jobs.append((f"history_{i}.png", lambda i=i, name=name: ovm.plot_optimization_history(
                study, target=lambda t, i=i: t.values[i], target_name=name)))
        if len(objectives) in (2, 3):
            jobs.append(("pareto.png", lambda: ovm.plot_pareto_front(study, target_names=objectives)))
    for name, make in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances with one distinct value
            print(f"[ftframe] tune: {name} not drawn: {e}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- the search
def _die_with_parent() -> None:
    """In the trial's process: get SIGTERM when ``ftframe tune`` dies (Linux), so no orphan trains on."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _output_overrides(config: Any, folder: Path) -> list[str]:
    """Flags that put everything a trial writes under its folder; a path no flag can move is an error."""
    flags = [f"--trainer.default_root_dir={folder}", f"--adapter.dirpath={folder / 'adapter'}"]
    logger = config.get("trainer.logger")
    if isinstance(logger, list):
        raise UserError("ftframe tune: trainer.logger is a list; give the run one logger (or none) so each trial can "
                        "log to its own folder")
    if getattr(logger, "init_args", None) is not None and "save_dir" in logger.init_args:
        flags.append(f"--trainer.logger.init_args.save_dir={folder}")
    for cb in config.get("trainer.callbacks") or []:
        init = getattr(cb, "init_args", None)
        for arg in ("dirpath", "output_dir"):
            if init is not None and init.get(arg):
                name = str(cb.class_path).rsplit(".", 1)[-1]
                raise UserError(f"ftframe tune: trainer.callbacks {name} sets {arg}: {init.get(arg)}; every trial "
                                f"would write there. Leave it unset (it then follows the trial's log folder)")
    return flags


def _progress(trial: Any, params: list[Param], objectives: list[str], study: Any, seconds: float, state: str,
              result: dict[str, Any] | None, total: int) -> str:
    import optuna

    drawn = " ".join(f"{p.key.rsplit('.', 1)[-1]}={_fmt(trial.params.get(p.key))}" for p in params)
    metrics = (result or {}).get("metrics", {})
    got = " ".join(f"{m}={_fmt(metrics.get(m))}" for m in objectives if m in metrics)
    done = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
               for t in study.get_trials(deepcopy=False))
    where = f" at step {result['pruned_at']}" if result and result.get("pruned_at") is not None else ""
    line = f"[ftframe] tune: trial {trial.number} {state}{where} in {seconds:.0f}s ({done}/{total} done): {got} | {drawn}"
    try:
        if len(objectives) == 1:
            line += f" | best {study.best_value:.4f} (trial {study.best_trial.number})"
        else:
            line += f" | Pareto front: trials {sorted(t.number for t in study.best_trials)}"
    except ValueError:
        pass
    return line


def tune(configs: list[str], space: str, trials: int = 8, timeout: float | None = None, storage: str | None = None,
         study: str | None = None, objectives: list[str] | None = None, directions: list[str] | None = None,
         pruner: str = "median", eval_every: int | None = None, output_dir: str | None = None,
         heartbeat: float = 30.0, baseline: bool = True, seed: int = 0, startup_trials: int | None = None,
         check_metrics: bool = True, fit_args: list[str] | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run (or continue) a study; see the module docstring. Returns a summary of the study."""
    import optuna

    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if not configs:
        raise UserError("ftframe tune needs the run: --config RUN.yaml (any `ftframe fit` configuration)")
    run_args = [a for c in configs for a in ("--config", c)] + list(fit_args or [])
    params = load_space(space)
    parser, config = _parse_run(run_args)
    check_space(params, run_args, config)
    objectives = list(objectives or [default_objective(config)])
    if check_metrics:
        known = logged_metrics(config)
        for metric in objectives:
            if not any(fnmatch.fnmatchcase(metric, pattern) for pattern in known):
                close = difflib.get_close_matches(metric, [k for k in known if "*" not in k], n=3, cutoff=0.5)
                raise UserError(f"--objectives {metric}: this run never logs it; it logs {sorted(known)}"
                                + (f" (did you mean {' or '.join(close)}?)" if close else "")
                                + ". (A metric your own code logs: add --check_metrics false)")
    directions = list(directions or [direction_of(m) for m in objectives])
    if len(directions) != len(objectives) or any(d not in ("minimize", "maximize") for d in directions):
        raise UserError(f"--directions: one of minimize / maximize per objective ({objectives}), got {directions}")
    if pruner not in ("median", "halving", "none"):
        raise UserError(f"--pruner must be median, halving or none, got {pruner!r}")
    multi = len(objectives) > 1
    if multi and pruner != "none":
        print("[ftframe] tune: several objectives: Optuna cannot prune them, so every trial runs to the end",
              flush=True)
    if eval_every is not None and eval_every < 1:
        raise UserError(f"--eval_every must be >= 1, got {eval_every}")
    name = study or Path(configs[-1]).stem
    out = Path(output_dir or Path("runs") / "tune" / name)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    prune = make_pruner(pruner if not multi else "none")
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials or max(2, min(10, trials // 3)))
    the_study = optuna.create_study(study_name=name, storage=open_storage(url, heartbeat), directions=directions,
                                    sampler=sampler, pruner=prune, load_if_exists=True)
    stored = the_study.user_attrs.get("ftframe")
    spec = {"objectives": objectives, "keys": [p.key for p in params]}
    if stored is None:
        the_study.set_user_attr("ftframe", spec)
    elif stored != spec:
        raise UserError(f"study {name!r} in {url} was started with objectives {stored['objectives']} over "
                        f"{stored['keys']}; this command has {objectives} over {spec['keys']}. Use another --study "
                        "or --output_dir for a different search")
    if baseline and not the_study.get_trials(deepcopy=False):
        current = {p.key: config.get(p.key) for p in params}
        if all(p.contains(v) for p, v in zip(params, current.values(), strict=True)):
            the_study.enqueue_trial({p.key: p.optuna_value(v) for p, v in zip(params, current.values(), strict=True)},
                                    user_attrs={"note": "the run config's own values"}, skip_if_exists=True)
            own = {p.key: p.optuna_value(v) for p, v in zip(params, current.values(), strict=True)}
            print(f"[ftframe] tune: trial 0 runs the config's own values ({' '.join(to_flags(own))}) as the baseline",
                  flush=True)
        else:
            outside = [p.key for p, v in zip(params, current.values(), strict=True) if not p.contains(v)]
            print(f"[ftframe] tune: no baseline trial: the config's values of {outside} lie outside the space",
                  flush=True)

    fail_abandoned(the_study, heartbeat="://" in url)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done_before = sum(t.state in counted for t in the_study.get_trials(deepcopy=False))
    print(f"[ftframe] tune: study {name!r} ({url}): {done_before} of {trials} trials done; objective"
          f"{'s' if multi else ''} {', '.join(f'{m} ({d})' for m, d in zip(objectives, directions, strict=True))}; "
          f"pruner {pruner if not multi else 'none'}; output {out}", flush=True)
    if done_before >= trials:
        return write_outputs(the_study, params, objectives, out, parser, run_args)

    class TrialFailed(Exception):
        pass

    def objective(trial: Any) -> Any:
        trial.set_user_attr("worker", WORKER)
        drawn = {p.key: p.suggest(trial) for p in params}
        trial.set_user_attr("values", drawn)
        folder = (out / "trials" / f"{trial.number:03d}").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESULT_FILE).unlink(missing_ok=True)
        extra = []
        if eval_every and not multi and pruner != "none":
            accumulate = int(config.get("trainer.accumulate_grad_batches") or 1)
            extra = [f"--trainer.val_check_interval={eval_every * accumulate}", "--trainer.check_val_every_n_epoch=null"]
        reporter = ["--trainer.callbacks+=ftframe.tune.TrialReporter", f"--trainer.callbacks.output={folder / RESULT_FILE}",
                    f"--trainer.callbacks.storage={url}", f"--trainer.callbacks.study={name}",
                    f"--trainer.callbacks.trial_id={trial._trial_id}"]
        if not multi and pruner != "none":
            reporter += [f"--trainer.callbacks.prune_on={objectives[0]}", f"--trainer.callbacks.pruner={pruner}"]
        argv = [sys.executable, "-m", "ftframe", "fit", *run_args, *to_flags(drawn), *_output_overrides(config, folder),
                "--validate_before_fit=false", *extra, *reporter]
        (folder / "command.txt").write_text(" ".join(argv[1:]) + "\n", encoding="utf-8")
        print(f"[ftframe] tune: trial {trial.number} starts: {' '.join(to_flags(drawn))} (log: {folder / 'fit.log'})",
              flush=True)
        start = time.perf_counter()
        with open(folder / "fit.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen(argv, stdout=None if verbose else log, stderr=subprocess.STDOUT if not verbose
                                    else None, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                    preexec_fn=_die_with_parent)
            try:
                code = proc.wait()
            except BaseException:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                if proc.poll() is None:
                    proc.kill()
                raise
        seconds = time.perf_counter() - start
        result = json.loads((folder / RESULT_FILE).read_text()) if (folder / RESULT_FILE).exists() else None
        if result is not None:
            trial.set_user_attr("steps", result["steps"])
            trial.set_user_attr("metrics", {m: result["metrics"].get(m) for m in objectives})
        if code != 0 or result is None:
            tail = (folder / "fit.log").read_text(errors="replace").strip().splitlines()[-3:] if not verbose else []
            trial.set_user_attr("note", f"exit {code}: {' / '.join(tail)[-300:]}")
            print(_progress(trial, params, objectives, the_study, seconds, f"failed (exit {code}; see "
                            f"{folder / 'fit.log'})", result, trials), flush=True)
            raise TrialFailed(f"trial {trial.number}: ftframe fit exited {code}")
        if result.get("pruned_at") is not None:
            trial.set_user_attr("pruned_at", result["pruned_at"])
            print(_progress(trial, params, objectives, the_study, seconds, "pruned", result, trials), flush=True)
            raise optuna.TrialPruned(f"at step {result['pruned_at']}")
        missing = [m for m in objectives if m not in result["metrics"]]
        if missing:
            logged = sorted(k for k in result["metrics"] if not k.startswith("train/"))
            trial.set_user_attr("note", f"never logged {missing}")
            raise TrialFailed(f"trial {trial.number} never logged {missing}; it logged {logged}")
        values = [result["metrics"][m] for m in objectives]
        the_study._ftframe_last = (trial, seconds, result)  # printed once Optuna has stored the values
        return values if multi else values[0]

    def after_trial(study: Any, frozen: Any) -> None:
        last = getattr(study, "_ftframe_last", None)
        if last is not None and last[0].number == frozen.number:
            print(_progress(frozen, params, objectives, study, last[1], "complete", last[2], trials), flush=True)
        write_outputs(study, params, objectives, out, parser, run_args)

    from optuna.study import MaxTrialsCallback

    try:
        the_study.optimize(objective, timeout=timeout, catch=(TrialFailed,), gc_after_trial=True,
                           callbacks=[MaxTrialsCallback(trials, states=counted), after_trial])
    except KeyboardInterrupt:
        write_outputs(the_study, params, objectives, out, parser, run_args, plots=False)
        print(f"[ftframe] tune: interrupted; the running trial is marked failed. The same command continues the "
              f"study ({url})", file=sys.stderr, flush=True)
        raise
    summary = write_outputs(the_study, params, objectives, out, parser, run_args)
    states = [t.state.name for t in the_study.get_trials(deepcopy=False)]
    summary.update({s.lower(): states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")})
    print(f"[ftframe] tune: {summary['complete']} complete, {summary['pruned']} pruned, {summary['fail']} failed; "
          f"best trial{'s' if multi else ''} {summary['best']}"
          + (f" ({objectives[0]} {summary['best_values'][0]:.4f})" if summary.get("best_values") and not multi
             else "")
          + f"; {out / 'trials.md'}, {out / 'best.yaml'}", flush=True)
    return summary


def main(argv: list[str]) -> dict[str, Any]:
    """``ftframe tune`` arguments -> :func:`tune`. Unrecognised arguments go to every trial's ``ftframe fit``."""
    parser = argparse.ArgumentParser(
        prog="ftframe tune",
        description="Hyperparameter search over the config keys of an `ftframe fit` run, on Optuna: each trial is an "
                    "`ftframe fit` in its own process, pruned by step; the study continues where it stopped. Other "
                    "arguments (e.g. --trainer.max_steps 20) go to every trial.")
    parser.add_argument("--config", action="append", default=[], help="the run: an `ftframe fit` config (repeatable)")
    parser.add_argument("--space", required=True, help="YAML: dotted config key -> {type: float|int|categorical, "
                        "low, high, log, step, choices}")
    parser.add_argument("--trials", type=int, default=8, help="finished (complete or pruned) trials the study "
                        "should reach, counting earlier runs of the same study (default 8)")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    parser.add_argument("--storage", default=None, help="Optuna storage: sqlite:///PATH, postgresql://..., "
                        "mysql://..., or a journal file path (default: sqlite under the output folder)")
    parser.add_argument("--study", default=None, help="study name (default: the run config's file name)")
    parser.add_argument("--objectives", nargs="+", default=None, help="logged metric(s) to optimise (default "
                        "val/loss, val/accuracy for classification); two or more: a Pareto front")
    parser.add_argument("--directions", nargs="+", default=None, choices=["minimize", "maximize"],
                        help="per objective (default: maximize accuracy-like names, minimize the rest)")
    parser.add_argument("--pruner", default="median", choices=["median", "halving", "none"])
    parser.add_argument("--eval_every", type=int, default=None, help="validate every N optimizer steps for the "
                        "pruner (default: the run config's own validation interval)")
    parser.add_argument("--output_dir", default=None, help="default runs/tune/<study>")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds between a running trial's heartbeats; "
                        "a trial silent for twice that is marked failed (RDB storage)")
    parser.add_argument("--baseline", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="trial 0 runs the config's own values when they lie in the space (default true)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--startup_trials", type=int, default=None, help="random trials before TPE models the "
                        "space (default: a third of --trials, 2 to 10)")
    parser.add_argument("--check_metrics", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="check before any trial that the run logs each objective (default true)")
    parser.add_argument("--verbose", action="store_true", help="show each trial's own output instead of a log file")
    args, fit_args = parser.parse_known_args(argv)
    kwargs = vars(args)
    return tune(configs=kwargs.pop("config"), fit_args=fit_args, **kwargs)
