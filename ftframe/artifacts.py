"""The folder a trained adapter is written to, shared by the export and checkpoint callbacks.

A trained folder holds what :meth:`FineTuneModule.save_trained` writes (``adapter_config.json`` +
``adapter_model.safetensors`` for peft methods, a whole model folder for full fine-tuning), the tokenizer, the run's
resolved ``config.yaml`` (as LightningCLI saved it) and ``ftframe.json``: method, base model, step, metrics and the
method's hyperparameters. Folders are written under a temporary name and renamed into place, so a crash leaves either
the previous folder or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from ftframe.errors import UserError

__all__ = ["BASE_QUANTIZATION_FILE", "METADATA_FILE", "TrainedFolder", "check_writable", "gather_trained",
           "load_peft_adapter", "log_dir", "merge_peft", "metadata", "read_trained", "replace_dir", "write_trained", "writing"]

METADATA_FILE = "ftframe.json"


def metadata(trainer: Trainer, pl_module: LightningModule, **extra: Any) -> dict[str, Any]:
    """What produced a trained folder: method class, base model, loop position, last metrics, hyperparameters."""
    cls = type(pl_module)
    hparams = {k: v for k, v in dict(getattr(pl_module, "hparams", {})).items() if _jsonable(v)}
    return {
        "method": f"{cls.__module__}.{cls.__qualname__}",
        "model_name": getattr(pl_module, "model_name", None),
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "hparams": hparams,
        "task": _task_info(getattr(pl_module, "task", None)),
        # the precision the run trained in and, under ftframe's Trainer, why it was chosen (ftframe.device)
        "device": (trainer.device_plan.as_dict() if hasattr(trainer, "device_plan")
                   else {"precision": str(trainer.precision)}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def check_writable(folder: Path, option: str) -> None:
    """Fail now, not after training, when ``folder`` cannot be created or written; creates nothing itself."""
    existing = existing_parent(folder)
    if not existing.is_dir():
        raise UserError(f"output folder {folder} cannot be created: {existing} is a file, not a folder; choose "
                        f"another with {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable ({existing} does not allow writing); choose "
                        f"another with {option}")


@contextmanager
def writing(folder: Path, tmp: Path, keep: str) -> Iterator[None]:
    """Around writing ``tmp`` (to become ``folder``): on a full disk, remove the partial ``tmp`` and say what is kept."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(existing_parent(folder)).free
            raise UserError(f"no space left on the device while writing {folder} ({free / 2**20:.0f} MiB free): the "
                            f"partial folder was removed and {keep}. Free space, then resume") from e
        raise


def existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def log_dir(trainer: Trainer) -> Path:
    """The run's log folder. Collective under DDP (``trainer.log_dir`` broadcasts): call it on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def gather_trained(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
    """The weights :meth:`FineTuneModule.save_trained` writes, gathered onto rank 0 when the strategy shards them.

    Collective: call on every rank, before :func:`write_trained`. ``None`` when every rank holds whole weights.
    """
    from ftframe.distributed import gather_weights

    trained_only = getattr(pl_module, "saves_trained_weights_only", lambda: True)()
    return gather_weights(trainer, pl_module, trainable_only=trained_only)


def write_trained(trainer: Trainer, pl_module: LightningModule, folder: Path, run_dir: Path,
                  weights: dict[str, Any] | None = None, **extra: Any) -> None:
    """Write the trained weights, tokenizer, run config and ``ftframe.json`` into ``folder``.

    Call on rank 0 only, with ``run_dir`` = :func:`log_dir` and ``weights`` = :func:`gather_trained` computed on
    every rank beforehand.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if weights is None:
        pl_module.save_trained(folder)  # type: ignore[operator]
    else:
        pl_module.save_trained(folder, state_dict=weights)  # type: ignore[operator]
    tokenizer = getattr(pl_module, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    config = run_dir / "config.yaml"
    if config.is_file():
        shutil.copy(config, folder / "config.yaml")
    (folder / METADATA_FILE).write_text(json.dumps(metadata(trainer, pl_module, **extra), indent=2))


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst``.

    The rename is atomic; when ``dst`` exists it is first renamed aside (``<dst>.old``), so at every instant either the
    old or the new folder is complete under one of the two names.
    """
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _task_info(task: Any) -> dict[str, Any] | None:
    """The task's class and, for classifiers, the label names in id order (what the head's outputs mean)."""
    if task is None:
        return None
    info: dict[str, Any] = {"class": f"{type(task).__module__}.{type(task).__qualname__}"}
    if getattr(task, "labels", None) is not None:
        info["labels"] = list(task.labels)
    return info


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


#: Written next to an adapter trained on a 4-bit base (QLoRA, LoftQ): the ``BitsAndBytesConfig`` that rebuilds it.
BASE_QUANTIZATION_FILE = "ftframe_base_quantization.json"


@dataclass
class TrainedFolder:
    """What a folder written by ``ftframe fit`` holds, read from its files (nothing loaded).

    The method class recorded in ``ftframe.json`` loads it (:meth:`FineTuneModule.load_trained`, through
    :func:`ftframe.methods.load_trained`); a folder without that record is read as a plain peft adapter or model.
    """

    path: Path
    peft_config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json of a peft adapter
    metadata: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # the BitsAndBytesConfig of the 4-bit base the adapter was trained on

    @property
    def base(self) -> str | None:
        return self.peft_config.get("base_model_name_or_path") or self.metadata.get("model_name")

    def base_name(self, model: str | None = None) -> str:
        """``model`` if given, else the recorded base; a :class:`UserError` when there is neither."""
        name = model or self.base
        if not name:
            raise UserError(f"no base model recorded in {self.path}; pass --model")
        return name

    @property
    def is_peft(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    @property
    def method(self) -> str:
        method = self.metadata.get("method")
        if method:
            return method.rsplit(".", 1)[-1]
        if self.is_peft:
            return "DoRA" if self.peft_config.get("use_dora") else str(self.peft_config.get("peft_type"))
        return "full model"

    def auto_class(self) -> tuple[Any, dict[str, Any]]:
        """The transformers auto-class for the task the folder was trained for, and its ``from_pretrained`` kwargs."""
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        labels = (self.metadata.get("task") or {}).get("labels")
        if labels:
            return AutoModelForSequenceClassification, {
                "num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)}}
        return AutoModelForCausalLM, {}


def read_trained(folder: str, option: str = "--adapter") -> TrainedFolder:
    """Read a trained folder's records (``ftframe.json``, a peft ``adapter_config.json``, the 4-bit base's config);
    errors name ``option``."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{option} {folder!r} is not a folder; pass the folder `ftframe fit` wrote "
                        "(<log_dir>/adapter by default)")
    meta_file = path / METADATA_FILE
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    config = path / "adapter_config.json"
    if not (metadata or config.is_file() or (path / "config.json").is_file() or any(path.glob("*.safetensors"))):
        raise UserError(f"{option} {folder!r} is not a trained folder: it has none of {METADATA_FILE} (written by "
                        "ftframe fit), adapter_config.json (peft adapter) or config.json (full model)")
    info = TrainedFolder(path, json.loads(config.read_text()) if config.is_file() else {}, metadata)
    quant_file = path / BASE_QUANTIZATION_FILE
    if quant_file.is_file():  # QLoRA / LoftQ: the exact 4-bit config of the base
        info.quantization = json.loads(quant_file.read_text())["quantization_config"]
    return info


def load_peft_adapter(base: Any, folder: Path, base_name: str) -> Any:
    """``PeftModel.from_pretrained``, with a mismatch between adapter and base reported as one clear error."""
    import warnings

    from peft import PeftModel

    recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    hint = (f"the adapter {folder} was trained on {recorded!r}; it does not fit the base {base_name!r}. "
            "Pass the base it was trained on (--model), or omit --model to use the recorded one")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = PeftModel.from_pretrained(base, str(folder))
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise UserError(f"{hint} ({type(e).__name__}: {first})") from None
    missing = [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    if missing:
        raise UserError(f"{hint} (peft: {str(missing[0].message).splitlines()[0][:300]})")
    for w in caught:
        if "missing adapter keys" not in str(w.message).lower():
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def merge_peft(model: Any, folder: Path) -> Any:
    """peft's ``merge_and_unload`` (``safe_merge``: NaNs refused), its refusals as a :class:`UserError`."""
    config = model.peft_config["default"]
    if config.is_prompt_learning:
        raise UserError(f"{folder} is a {getattr(config.peft_type, 'value', config.peft_type)} adapter: it learns virtual tokens (or per-layer key/value "
                        "prefixes) fed with every input, not a change to the base's weights, so it cannot be merged. "
                        "Use it with `ftframe generate --adapter`, or train a weight-adapting method (LoRA, DoRA, "
                        "IA3) to get a plain merged model")
    try:
        return model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # NaNs found by safe_merge, or a layer type peft cannot merge
        raise UserError(f"peft could not merge {folder}: {e}") from None
