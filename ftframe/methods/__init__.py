"""Adaptation methods: one ``FineTuneModule`` subclass per file, found here without a list to edit.

Every module of this package is imported and each ``FineTuneModule`` subclass it defines is a shipped method
(:data:`METHODS`, also importable by name: ``from ftframe.methods import LoRA``); methods of other installed packages
join through the ``ftframe.methods`` entry-point group. A method's :attr:`~FineTuneModule.variants` are what ftframe's
own tests (contract, multi-process, CLI) and ``ftframe compare`` run. See docs/design.md, "Adding a method".
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib.metadata import entry_points
from typing import Any

from ftframe.artifacts import TrainedFolder, read_trained
from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant


def _discover() -> dict[str, type[FineTuneModule]]:
    found: dict[str, type[FineTuneModule]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, FineTuneModule) and value is not FineTuneModule
                    and value.__module__ == module.__name__):
                found[value.__name__] = value
    for point in entry_points(group="ftframe.methods"):
        try:
            cls = point.load()
        except Exception as e:  # a broken plugin must not break ftframe
            warnings.warn(f"[ftframe] the method {point.value!r} (entry point {point.name!r}) failed to import: {e}",
                          stacklevel=2)
            continue
        if isinstance(cls, type) and issubclass(cls, FineTuneModule):
            found.setdefault(cls.__name__, cls)
    return found


#: Every method by class name: ftframe's own, then those of installed plugin packages.
METHODS: dict[str, type[FineTuneModule]] = _discover()
globals().update(METHODS)

__all__ = ["FineTuneModule", "METHODS", "Variant", "load_trained", "method_class", "variants", *METHODS]


def variants(matrix: bool = False) -> dict[str, tuple[type[FineTuneModule], Variant]]:
    """Every method's test variants by label (``matrix``: only those with a row in the compatibility matrix)."""
    return {label: (cls, v) for cls in METHODS.values()  # a class's own: a subclass does not inherit its base's
            for label, v in cls.__dict__.get("variants", {}).items() if v.matrix or not matrix}


def method_class(folder: TrainedFolder) -> type[FineTuneModule]:
    """The method that wrote ``folder`` (recorded in its ``ftframe.json``); a folder without the record is loaded
    as a plain peft adapter or model (:class:`FineTuneModule`'s own loading)."""
    path = str(folder.metadata.get("method") or "")
    module, _, name = path.rpartition(".")
    if not module:
        return FineTuneModule
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{folder.path} was written by the method {path}, which does not import here ({e}); install "
                        "the package that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, FineTuneModule)):
        raise UserError(f"{folder.path}: the recorded method {path} is not a FineTuneModule subclass")
    return cls


def load_trained(folder: str | TrainedFolder, model: str | None = None, dtype: Any = "float32",
                 option: str = "--adapter") -> tuple[Any, TrainedFolder]:
    """``(model, folder record)``: a folder ``ftframe fit`` wrote, loaded by the method that wrote it."""
    info = folder if isinstance(folder, TrainedFolder) else read_trained(folder, option)
    return method_class(info).load_trained(info, model, dtype), info
