"""Reading records from local files (JSONL / JSON / CSV / Parquet) or a ``datasets`` name, with locations.

Every record carries where it came from (``file:line``), so a bad record is reported as such instead of as a
traceback deep inside tokenization.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftframe import assets
from ftframe.errors import UserError

__all__ = ["Record", "read_records", "resolve_source"]

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Record:
    """One raw record and its origin (``source`` is a file path or dataset name; ``line`` is 1-based)."""

    data: dict[str, Any]
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def resolve_source(name: str) -> tuple[str, Path | None]:
    """Return ``(kind, path)`` for a data source: a local file, a registered data asset, or a hub dataset."""
    if assets.is_asset(name):
        if assets.ASSETS[name].kind != "data":
            raise UserError(f"'{name}' is a model asset, not a dataset")
        path = assets.asset_path(name)
        return SUFFIXES[path.suffix], path
    path = Path(name).expanduser()
    if path.suffix.lower() in SUFFIXES:
        if not path.is_file():
            raise UserError(f"data file {name!r} does not exist; check the path in train_files/val_files")
        return SUFFIXES[path.suffix.lower()], path
    if path.exists():
        raise UserError(f"data file {name!r} has an unsupported extension; use one of {sorted(SUFFIXES)}")
    return "hub", None


def read_records(name: str) -> Iterator[Record]:
    """Yield the records of one source; raises :class:`UserError` naming file and line on malformed input."""
    kind, path = resolve_source(name)
    if kind == "hub":
        yield from _read_hub(name)
        return
    assert path is not None
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    if kind == "jsonl":
        yield from _read_jsonl(path)
    elif kind == "json":
        yield from _read_json(path)
    elif kind == "csv":
        yield from _read_csv(path)
    else:
        yield from _read_parquet(path)


def _open_text(path: Path):
    # utf-8-sig: a byte-order mark at the start of the file is not part of the first record
    return open(path, encoding="utf-8-sig", newline="")


def _decode_error(path: Path, e: UnicodeDecodeError) -> UserError:
    return UserError(f"{path}: bytes at offset {e.start} are not valid UTF-8 ({e.reason}); re-save the file as UTF-8")


def _read_jsonl(path: Path) -> Iterator[Record]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {e.msg}. "
                                    f"Line starts with {line[:60]!r}; fix or remove the line.") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__} "
                                    f"{line[:60].strip()!r}")
                yield Record(obj, str(path), lineno)
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None


def _read_json(path: Path) -> Iterator[Record]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of records (or {{\"data\": [...]}}), got {type(obj).__name__}")
    for i, rec in enumerate(obj, start=1):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        yield Record(rec, str(path), i)  # JSON arrays: "line" is the record number


def _read_csv(path: Path) -> Iterator[Record]:
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise UserError(f"{path}: no header row; the first row must name the columns")
            for row in reader:
                if None in row:  # more cells than header columns
                    raise UserError(f"{path}:{reader.line_num}: row has more cells than the {len(header)} header "
                                    "columns; quote cells containing commas")
                missing = [k for k in header if row.get(k) is None]
                if missing and any("\n" in (v or "") for v in row.values()):
                    # a short row whose quoted cell ran over line ends: an unclosed quote, not a missing field
                    raise UserError(f"{path}:{reader.line_num}: row has {len(header) - len(missing)} cell(s), the "
                                    f"header {len(header)} (no {missing}); an unclosed quote (\") may have joined the "
                                    "following lines into one cell")
                yield Record(dict(row), str(path), reader.line_num)
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None
    except csv.Error as e:
        raise UserError(f"{path}: CSV error: {e}") from None


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading Parquet needs pyarrow: pip install pyarrow") from e
    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield Record(row, str(path), i)


def _read_hub(name: str) -> Iterator[Record]:
    """``name`` or ``name:split`` (default split ``train``) via ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"{name!r} is not a local file or asset; loading it as a hub dataset needs the datasets "
                        "package: pip install 'ftframe[hub]'") from e
    ds_name, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, split=split or "train")
    except Exception as e:  # network errors, unknown names: all user-fixable
        raise UserError(f"could not load {name!r}: not a local file, not an asset ({sorted(assets.ASSETS)}), and "
                        f"datasets.load_dataset failed: {e}") from e
    for i, row in enumerate(ds, start=1):
        yield Record(dict(row), name, i)
