"""``ClassificationDataModule``: text (or text pairs) with a label, for sequence classification.

Records come from JSONL / JSON / CSV / Parquet files, a data asset (``rotten-tomatoes``) or a ``datasets`` name. The
label column holds names (``"fresh"``) or integer ids; the mapping between the two is decided once, from the training
data (or ``labels``), and exposed as :attr:`ClassificationDataModule.label_names` so that the model gets the number of
labels from the data and saves the names with its weights. Without separate validation / test files the training
records are split stratified by label, deterministically from ``seed``. Every problem names the file, line and column.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from ftframe.data.collate import (
    LengthGroupedSampler,
    ResumableSampler,
    linked_tokenizer,
    pad_right,
    shard_for,
    world_size_of,
)
from ftframe.data.readers import Record, read_records
from ftframe.errors import UserError

__all__ = ["ClassificationDataModule", "ClassificationDataset", "ClassificationCollator"]


class ClassificationDataset(Dataset):
    """Tokenized examples ``{"input_ids": LongTensor(T), "labels": LongTensor()}`` with their text and origin."""

    def __init__(self, input_ids: list[torch.Tensor], labels: list[int], where: list[str],
                 texts: list[str] | None = None, pairs: list[str | None] | None = None) -> None:
        self.input_ids = input_ids
        self.labels = labels
        self.where = where
        self.texts = texts if texts is not None else [""] * len(input_ids)
        self.pairs = pairs if pairs is not None else [None] * len(input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": torch.tensor(self.labels[i]), "text": self.texts[i],
                "text_pair": self.pairs[i], "where": self.where[i]}


class ClassificationCollator:
    """Pad to the longest example of the batch (dynamic padding), on the right; labels are one id per example.

    The batch also carries each example's ``text``, ``text_pair`` and ``where`` (file:line), for error analysis.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of or 1

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], self.pad_token_id, self.multiple)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "labels": torch.stack([e["labels"] for e in examples])}  # (B,)
        if "text" in examples[0]:
            batch["text"] = [e["text"] for e in examples]
            batch["where"] = [e["where"] for e in examples]
            if any(e["text_pair"] is not None for e in examples):
                batch["text_pair"] = [e["text_pair"] for e in examples]
        return batch


class ClassificationDataModule(LightningDataModule):
    """Text or text-pair classification data.

    Args:
        train_files: Training records: files, data assets (``rotten-tomatoes``) or ``datasets`` names.
        val_files: Validation records; ``None`` = split off the training records (``val_size``).
        test_files: Test records; ``None`` = split off the training records (``test_size``).
        tokenizer: Tokenizer name or folder; the CLI links it to ``model.model_name``.
        text_field: Column with the text.
        text_pair_field: Column with the second text of a pair (e.g. hypothesis), or ``None``.
        label_field: Column with the label: names (strings) or integer ids, not a mix.
        labels: The label names in id order. ``None``: the sorted names found in the training data (for integer
            labels, ``0 .. max``). Giving them fixes the ids independently of the data.
        val_size: Fraction (< 1) or count of training records held out for validation when ``val_files`` is unset.
        test_size: Same, for the test split when ``test_files`` is unset (``0``: no test split).
        empty_text: What to do with a record whose text is empty: ``skip`` it (counted and reported) or ``error``.
        max_length: Longest tokenized example; longer ones are truncated (counted and reported).
        strict: Turn every skip-with-count into an error: an empty text (as ``empty_text: error``) or an example
            longer than ``max_length`` stops set-up.
        batch_size: Training batch size.
        eval_batch_size: Validation / test batch size (``None`` = ``batch_size``).
        group_by_length: Batch examples of similar length together (less padding), in shuffled order.
        pad_to_multiple_of: Round padded lengths up to a multiple of this.
        num_workers: DataLoader worker processes.
        seed: Seed of the split and the shuffling.
    """

    def __init__(
        self,
        train_files: str | list[str] = "rotten-tomatoes",
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        tokenizer: str | None = None,
        text_field: str = "text",
        text_pair_field: str | None = None,
        label_field: str = "label",
        labels: list[str] | None = None,
        val_size: float = 0.1,
        test_size: float = 0.1,
        empty_text: Literal["skip", "error"] = "skip",
        max_length: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        pad_to_multiple_of: int | None = 8,
        num_workers: int = 0,
        seed: int = 42,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.strict = strict
        if strict:
            empty_text = "error"
        self.train_files = _as_list(train_files)
        self.val_files = _as_list(val_files)
        self.test_files = _as_list(test_files)
        if not self.train_files:
            raise UserError("train_files is empty; name at least one file, asset or dataset")
        for name, value in (("val_size", val_size), ("test_size", test_size)):
            if value < 0:
                raise UserError(f"{name} must be >= 0 (a fraction < 1 or a count), got {value}")
        if empty_text not in ("skip", "error"):
            raise UserError(f"empty_text must be 'skip' or 'error', got {empty_text!r}")
        if max_length < 2 or batch_size < 1:
            raise UserError(f"max_length must be >= 2 and batch_size >= 1, got {max_length} and {batch_size}")
        if labels is not None and len(set(labels)) != len(labels):
            raise UserError(f"labels has duplicates: {labels}")
        self.tokenizer_name = tokenizer
        self.text_field, self.text_pair_field, self.label_field = text_field, text_pair_field, label_field
        self.given_labels = list(labels) if labels is not None else None
        self.val_size, self.test_size = val_size, test_size
        self.empty_text = empty_text
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer: Any = None
        self.label_names: list[str] | None = None
        self.datasets: dict[str, ClassificationDataset] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self._sampler: ResumableSampler | None = None
        self._resume: dict[str, int] | None = None

    # ------------------------------------------------------------------ labels
    @property
    def num_labels(self) -> int:
        """Number of classes (reads the training labels if ``setup`` has not run yet)."""
        if self.label_names is None:
            self._decide_labels(self._read(self.train_files))
        assert self.label_names is not None
        return len(self.label_names)

    def label_names_from_data(self) -> list[str]:
        """The label names in id order, reading the training records if ``setup`` has not run yet."""
        self.num_labels  # noqa: B018 -- decides the names
        assert self.label_names is not None
        return list(self.label_names)

    @property
    def label2id(self) -> dict[str, int]:
        assert self.label_names is not None, "setup() has not run"
        return {name: i for i, name in enumerate(self.label_names)}

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights of the training labels, mean 1 (for an imbalance-aware loss)."""
        train = self.datasets.get("train")
        if train is None:
            raise UserError("class_weights() needs setup('fit') to have run")
        counts = Counter(train.labels)
        n, k = len(train.labels), len(self.label_names or [])
        return torch.tensor([n / (k * counts[i]) if counts[i] else 0.0 for i in range(k)])

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train = self._read(self.train_files)
        self._decide_labels(train)
        splits: dict[str, list[tuple[Record, str, str | None, int]]] = {}
        parsed = self._parse(train)
        val_count = _count(self.val_size, len(parsed)) if not self.val_files else 0
        test_count = _count(self.test_size, len(parsed)) if not self.test_files else 0
        splits["train"], held = _stratified_split(parsed, val_count + test_count, self.seed)
        if self.val_files:
            splits["val"] = self._parse(self._read(self.val_files))
        if self.test_files:
            splits["test"] = self._parse(self._read(self.test_files))
        if held:  # split again into validation and test, each still stratified
            if self.val_files:
                splits["test"] = held
            elif test_count:
                splits["val"], splits["test"] = _stratified_split(held, test_count, self.seed + 1)
            else:
                splits["val"] = held
        if len({label for *_, label in splits["train"]}) < 2:
            raise UserError(f"{self.train_files}: the training data has a single label ({self.label_names}); "
                            "classification needs at least two")
        for name, examples in splits.items():
            self.datasets[name] = self._tokenize(name, examples)

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        if self.group_by_length:
            self._sampler = LengthGroupedSampler([len(x) for x in data.input_ids], self.batch_size, seed=self.seed)
        else:
            self._sampler = ResumableSampler(len(data), seed=self.seed)
        if self._resume is not None:
            self._sampler.resume_from(self._resume["epoch"], self._resume["examples"])
            self._resume = None
        return DataLoader(data, batch_size=self.batch_size, sampler=shard_for(self._sampler, self.trainer),
                          collate_fn=self._collator(), num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if "test" in self.datasets else "val")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the current epoch, so a resumed run continues with the next unseen batch."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {"label_names": self.label_names}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # a step took batch_size examples on every rank: examples of the whole order consumed so far
        return {"epoch": trainer.current_epoch, "batches": progress.processed, "label_names": self.label_names,
                "examples": progress.processed * self.batch_size * world_size_of(trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("label_names")
        if saved is not None and self.label_names is not None and saved != self.label_names:
            raise UserError(f"the checkpoint was trained with labels {saved}, this data has {self.label_names}; "
                            "set labels: to the checkpoint's list")
        if state_dict.get("batches"):
            examples = state_dict.get("examples", int(state_dict["batches"]) * self.batch_size)
            self._resume = {"epoch": int(state_dict["epoch"]), "examples": int(examples)}

    # ------------------------------------------------------------------ internals
    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collator(), num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def _collator(self) -> ClassificationCollator:
        return ClassificationCollator(self._get_tokenizer().pad_token_id, self.pad_to_multiple_of)

    def _get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = linked_tokenizer(self.tokenizer_name)
        return self.tokenizer

    def _read(self, files: list[str]) -> list[Record]:
        records = [r for name in files for r in read_records(name)]
        if not records:
            raise UserError(f"{files}: no records")
        return records

    def _decide_labels(self, records: list[Record]) -> None:
        if self.label_names is not None:
            return
        values = [self._label_value(r) for r in records]
        kinds = {type(v) for v in values}
        if len(kinds) > 1:
            first = next(r for r, v in zip(records, values, strict=True) if type(v) is not type(values[0]))
            raise UserError(f"{first.where}: column '{self.label_field}' mixes label types ({type(values[0]).__name__} "
                            f"and {type(self._label_value(first)).__name__}, e.g. {self._label_value(first)!r}); use "
                            "names everywhere or integer ids everywhere")
        if self.given_labels is not None:
            self.label_names = self.given_labels
        elif kinds == {int}:
            ids = sorted(set(values))
            if ids[0] < 0:
                bad = next(r for r, v in zip(records, values, strict=True) if v < 0)
                raise UserError(f"{bad.where}: column '{self.label_field}' has the negative id {ids[0]}; integer "
                                "labels are ids 0..K-1")
            self.label_names = [str(i) for i in range(ids[-1] + 1)]
        else:
            self.label_names = sorted(set(map(str, values)))

    def _label_value(self, record: Record) -> Any:
        if self.label_field not in record.data:
            raise UserError(f"{record.where}: no column '{self.label_field}' (columns: {sorted(record.data)}); set "
                            "data.label_field")
        value = record.data[self.label_field]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{record.where}: column '{self.label_field}' holds {value!r} "
                            f"({type(value).__name__}); labels are names (strings) or integer ids")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and record.source.endswith(".csv"):
            return int(value)  # CSV cells are text: "1" is the id 1
        return value

    def _parse(self, records: list[Record]) -> list[tuple[Record, str, str | None, int]]:
        assert self.label_names is not None
        index = {name: i for i, name in enumerate(self.label_names)}
        out, empty = [], []
        for r in records:
            for field in (self.text_field, self.text_pair_field):
                if field is not None and field not in r.data:
                    raise UserError(f"{r.where}: no column '{field}' (columns: {sorted(r.data)}); set "
                                    f"data.{'text_field' if field == self.text_field else 'text_pair_field'}")
            text = r.data[self.text_field]
            pair = r.data[self.text_pair_field] if self.text_pair_field else None
            if not isinstance(text, str) or (pair is not None and not isinstance(pair, str)):
                raise UserError(f"{r.where}: the text columns must hold strings, got {type(text).__name__}")
            if not text.strip() or (pair is not None and not pair.strip()):
                if self.empty_text == "error":
                    raise UserError(f"{r.where}: empty text in column '{self.text_field}'")
                empty.append(r.where)
                continue
            value = self._label_value(r)
            key = str(value) if isinstance(value, int) else value
            if key not in index:
                raise UserError(f"{r.where}: label {value!r} is not one of the training labels {self.label_names}; "
                                "fix the record or list every label in data.labels")
            out.append((r, text, pair, index[key]))
        if empty:
            rank_zero_warn(f"[ftframe] skipped {len(empty)} record(s) with empty text (first: {empty[0]}); set "
                           "empty_text: error to stop instead")
        return out

    def _tokenize(self, split: str, examples: list[tuple[Record, str, str | None, int]]) -> ClassificationDataset:
        tok = self._get_tokenizer()
        ids, labels, where, texts, pairs, truncated = [], [], [], [], [], 0
        chunk = 512  # a fast tokenizer encodes a list in parallel
        for start in range(0, len(examples), chunk):
            part = examples[start: start + chunk]
            text_batch = [text for _, text, _, _ in part]
            pair_batch = [pair for _, _, pair, _ in part] if self.text_pair_field else None
            encoded = tok(text_batch, pair_batch, add_special_tokens=True, truncation=True, max_length=self.max_length)
            overflow = [bool(e.overflowing) for e in encoded.encodings] if encoded.encodings else None
            for i, (record, text, pair, label) in enumerate(part):
                full = encoded["input_ids"][i]
                if overflow is not None:
                    truncated += overflow[i]
                elif len(full) >= self.max_length:  # a slow tokenizer: count what reached the limit
                    truncated += len(tok(text, pair, add_special_tokens=True)["input_ids"]) > self.max_length
                ids.append(torch.tensor(full, dtype=torch.long))
                labels.append(label)
                where.append(record.where)
                texts.append(text)
                pairs.append(pair)
        counts = Counter(labels)
        assert self.label_names is not None
        dist = ", ".join(f"{name} {counts[i]}" for i, name in enumerate(self.label_names))
        if self.strict and truncated:
            raise UserError(f"strict: {truncated} {split} example(s) are longer than max_length={self.max_length} "
                            "tokens and would be truncated; raise max_length or leave strict off to truncate and count")
        self.stats[split] = {"examples": len(ids), "truncated": truncated, "labels": dict(counts)}
        rank_zero_info(f"[ftframe] {split}: {len(ids)} examples ({dist}); {truncated} truncated to max_length="
                       f"{self.max_length}")
        return ClassificationDataset(ids, labels, where, texts, pairs)


def _as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def _count(size: float, n: int) -> int:
    return int(size) if size >= 1 else math.floor(size * n + 0.5)


def _stratified_split(examples: list[Any], n_held: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``n_held`` examples with the label proportions of the whole (largest-remainder rounding)."""
    if n_held <= 0:
        return list(examples), []
    if n_held >= len(examples):
        raise UserError(f"cannot hold out {n_held} of {len(examples)} records for validation/test; lower val_size "
                        "/ test_size")
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex[-1], []).append(i)
    quotas = {label: n_held * len(idx) / len(examples) for label, idx in by_label.items()}
    take = {label: math.floor(q) for label, q in quotas.items()}
    for label in sorted(quotas, key=lambda k: quotas[k] - take[k], reverse=True)[: n_held - sum(take.values())]:
        take[label] += 1
    rng = random.Random(seed)
    held_idx: set[int] = set()
    for label, idx in sorted(by_label.items()):
        shuffled = idx[:]
        rng.shuffle(shuffled)
        held_idx.update(shuffled[: take[label]])
    kept = [ex for i, ex in enumerate(examples) if i not in held_idx]
    held = [ex for i, ex in enumerate(examples) if i in held_idx]
    return kept, held
