"""``Variant``: one configuration of a method that ftframe's own tests and ``ftframe compare`` run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Variant"]


@dataclass(frozen=True)
class Variant:
    """One configuration of a method that ftframe's own tests and ``ftframe compare`` run.

    Args:
        options: Constructor options on the tiny test model (``tests/conftest.py``).
        trains: Regular expression (``re.search``) matching exactly the names of the parameters it trains.
        matrix: A row of the compatibility matrix and of the multi-process tests (else the contract tests only).
        compare: ``(label, spec)`` for ``ftframe compare``: a YAML under ``configs/methods`` followed by extra
            ``ftframe fit`` arguments; ``None``: not compared.
    """

    options: dict[str, Any] = field(default_factory=dict)
    trains: str = "."
    matrix: bool = True
    compare: tuple[str, str] | None = None
