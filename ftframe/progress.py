"""Progress that a log file can show: a bar in a terminal, a plain line every N seconds anywhere else.

A rich or tqdm bar redraws one line with carriage returns; written to a file (``> run.log``, a SLURM job, a
container log) that is one ever-growing line, or nothing at all until the end. ftframe's long work -- training
(``ftframe.callbacks.LineProgressBar``), forgetting measurements, evaluation, preference sampling, downloads --
reports through :func:`bar`: tqdm where stdout is a terminal, otherwise a line on stdout every
``FTFRAME_PROGRESS_INTERVAL`` seconds (default 30) and one when the work ends.

``FTFRAME_PROGRESS=lines`` or ``bar`` forces one or the other.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["LineProgress", "bar", "format_seconds", "interval_s", "use_lines"]

DEFAULT_INTERVAL_S = 30.0


def use_lines() -> bool:
    """Plain lines instead of a redrawn bar: stdout is not a terminal (or ``FTFRAME_PROGRESS=lines``)."""
    forced = os.environ.get("FTFRAME_PROGRESS", "").strip().lower()
    if forced in ("lines", "bar"):
        return forced == "lines"
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdout
        return True


def interval_s() -> float:
    """Seconds between two progress lines: ``FTFRAME_PROGRESS_INTERVAL`` (``ftframe fit --progress_interval``)."""
    value = os.environ.get("FTFRAME_PROGRESS_INTERVAL")
    try:
        return max(float(value), 0.0) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_seconds(seconds: float) -> str:
    """``75.0`` -> ``1m15s``; ``3725`` -> ``1h02m05s``; under a minute ``12.3s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LineProgress:
    """The part of tqdm's interface ftframe uses (``update``, ``close``, iteration, a context manager), printing
    ``[ftframe] DESC: N/TOTAL UNIT (P%), R UNIT/s, elapsed E, ETA T`` every ``interval`` seconds and at the end."""

    def __init__(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", interval: float | None = None, disable: bool = False, **_: Any) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc.strip().rstrip(":"), unit.strip() or "it"
        self.interval = interval_s() if interval is None else interval
        self.disable = disable
        self.n = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress(iterable=...) to iterate"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """(accepted for tqdm compatibility; lines carry counts and times only)"""

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc.strip().rstrip(":")

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.2f} {self.unit}/s")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.total and 0 < self.n < self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        name = self.desc if self.desc.startswith("[") else f"[ftframe] {self.desc}" if self.desc else "[ftframe]"
        return f"{name}: " + ", ".join(parts)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= self.interval and not (self.total and self.n >= self.total):
            self.last = now
            print(self.line(), flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n:
            print(self.line(), flush=True)


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A progress bar for long work: tqdm in a terminal, :class:`LineProgress` elsewhere. Takes tqdm's keywords."""
    if use_lines():
        return LineProgress(iterable, **kwargs)
    from tqdm.auto import tqdm

    kwargs.pop("interval", None)
    return tqdm(iterable, **kwargs)
