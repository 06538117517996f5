"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad file, field, path or option). The ``ftframe`` command
prints its message as one paragraph and exits with status 2, without a traceback unless ``--debug`` is given
or ``FTFRAME_DEBUG=1`` is set. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "where"]


class UserError(Exception):
    """An error caused by user input; its message names the file/line/field or option and says what to do."""


def where(source: str | None, line: int | None = None, field: str | None = None) -> str:
    """Format a location such as ``data.jsonl:12, field 'output'`` for error messages."""
    parts = []
    if source:
        parts.append(f"{source}:{line}" if line is not None else str(source))
    if field:
        parts.append(f"field '{field}'")
    return ", ".join(parts)
