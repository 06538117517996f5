"""``InstructionDataModule``: instruction / chat data for causal-LM fine-tuning with response-only loss."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ftframe import assets
from ftframe.data.collate import (
    LengthGroupedSampler,
    PackCollator,
    PadCollator,
    PromptCollator,
    ResumableSampler,
    StepWindows,
    TokenDataset,
    accumulation_of,
    linked_tokenizer,
    shard_for,
    world_size_of,
)
from ftframe.data.readers import read_records, resolve_source
from ftframe.data.templates import TEMPLATES, Format, detect_format, render, to_messages
from ftframe.errors import UserError

__all__ = ["InstructionDataModule", "split_indices"]

CACHE_VERSION = 1
# per-example status codes stored in the cache
OK, TRUNCATED, DROPPED_PROMPT, DROPPED_LONG = 0, 1, 2, 3


class InstructionDataModule(LightningDataModule):
    """Instruction-tuning data: Alpaca, chat-messages or prompt/completion records, loss on responses only.

    Records are rendered with the tokenizer's chat template (or a named template), tokenized once and cached
    (a second run with the same files, tokenizer and options does not re-tokenize), split deterministically into
    train/validation, and batched with dynamic padding. Labels are ``-100`` on every prompt token, so only
    assistant responses -- including the turn terminator / EOS -- are learned.

    Args:
        train_files: Training data: file paths (.jsonl, .json, .csv, .parquet), data asset names (``gsm8k``,
            ``chatterbot``; see ``ftframe download``), or hub dataset names (``name`` or ``name:split``).
        val_files: Validation data in the same forms; if empty, ``val_size`` of the training records are held out.
        val_size: Held-out fraction (< 1) or number of records (>= 1) when ``val_files`` is empty.
        tokenizer: Model whose tokenizer is used. Linked by the CLI to ``model.model_name``; do not set it there.
        format: Record format; ``auto`` picks one from the fields of the first record.
        instruction_field: Alpaca: the instruction field.
        input_field: Alpaca: the optional input field, appended to the instruction.
        output_field: Alpaca: the response field.
        messages_field: Chat: the list of ``{role, content}`` messages.
        prompt_field: Prompt/completion: the prompt field.
        completion_field: Prompt/completion: the response field.
        template: ``chat_template`` uses the tokenizer's own; a name picks a built-in simple template;
            ``auto`` = the tokenizer's if it has one, else ``alpaca``.
        system_prompt: System message prepended to conversations that have none (``None``: the template's default).
        max_length: Maximum tokens per example.
        truncation: Over-long examples: ``truncate`` cuts the response tail, ``drop`` removes the example. An example
            whose prompt alone fills ``max_length`` is always dropped (it has nothing to learn); both are counted.
        max_train_examples: Use at most this many training examples (after the split); ``None`` = all.
        max_val_examples: Use at most this many validation examples; ``None`` = all.
        batch_size: Examples per training batch (per device).
        eval_batch_size: Examples per validation batch; ``None`` = ``batch_size``.
        packing: Concatenate each batch's examples into one row with no padding; attention stays within each example
            and the loss covers the same tokens, so results equal the padded batch's (default; faster, less memory).
        group_by_length: Without packing: put examples of similar length in the same batch (less padding; changes
            which examples share a batch, not which are seen in an epoch).
        pad_to_multiple_of: Without packing: round padded lengths up to a multiple of this; ``None`` disables.
        num_workers: DataLoader worker processes.
        seed: Seed of the train/val split and of the shuffling order.
        cache_dir: Where tokenized data is cached; ``None`` = ``$FTFRAME_HOME/tokenized``.
        strict: Turn every skip-with-count or warning about the records into an error: a record that would be
            truncated or dropped, or that repeats an earlier record's ``id``, stops set-up, naming it.
        min_supervised_fraction: Stop at set-up when fewer of the training tokens than this fraction are supervised
            (a wrong response field, or a template that masks every response); ``0`` disables the check.
    """

    def __init__(
        self,
        train_files: str | list[str] = "gsm8k",
        val_files: str | list[str] | None = None,
        val_size: float = 0.05,
        tokenizer: str | None = None,
        format: Format = "auto",
        instruction_field: str = "instruction",
        input_field: str = "input",
        output_field: str = "output",
        messages_field: str = "messages",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        template: Literal["auto", "chat_template", "alpaca", "chatml", "plain"] = "auto",
        system_prompt: str | None = None,
        max_length: int = 1024,
        truncation: Literal["truncate", "drop"] = "truncate",
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        packing: bool = True,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = 8,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
        min_supervised_fraction: float = 0.001,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= min_supervised_fraction < 1.0:
            raise UserError(f"min_supervised_fraction must be in [0, 1), got {min_supervised_fraction}")
        self.min_supervised_fraction = min_supervised_fraction
        self.strict = strict
        self.sanity: dict[str, Any] = {}
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files)
        self.val_files = [val_files] if isinstance(val_files, str) else list(val_files or [])
        if not self.train_files:
            raise UserError("train_files is empty; name at least one file, asset or dataset")
        if val_size < 0:
            raise UserError(f"val_size must be >= 0 (a fraction < 1 or a count), got {val_size}")
        if max_length < 2:
            raise UserError(f"max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.val_size = val_size
        self.tokenizer_name = tokenizer
        self.format = format
        self.fields = dict(instruction=instruction_field, input=input_field, output=output_field,
                           messages=messages_field, prompt=prompt_field, completion=completion_field)
        self.template = template
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.truncation = truncation
        self.max_train_examples = max_train_examples
        self.max_val_examples = max_val_examples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.packing = packing
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else assets.cache_root() / "tokenized"
        self.tokenizer: Any = None
        self.train_dataset: TokenDataset | None = None
        self.val_dataset: TokenDataset | None = None
        self.stats: dict[str, dict[str, Any]] = {}
        self._sampler: ResumableSampler | None = None
        self._resume: dict[str, int] | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Tokenize and cache (runs once per node, before ``setup``)."""
        for files in self._groups().values():
            self._tokenized(files)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        groups = self._groups()
        train = self._tokenized(groups["train"])
        if "val" in groups:
            val = self._tokenized(groups["val"])
            train_idx, val_idx = list(range(len(train["status"]))), list(range(len(val["status"])))
        else:
            val = train
            train_idx, val_idx = self._split(len(train["status"]))
        self.train_dataset = self._dataset("train", train, train_idx, self.max_train_examples)
        self.val_dataset = self._dataset("val", val, val_idx, self.max_val_examples)
        self.check_sanity()

    def sanity_report(self) -> dict[str, Any]:
        """Per split: counts, supervised-token fractions, terminator supervision; the first example with its mask."""
        from ftframe.data.sanity import instruction_report

        return instruction_report(self.stats, {"train": self.train_dataset, "val": self.val_dataset},
                                  self._get_tokenizer())

    def check_sanity(self) -> None:
        """Print the sanity report (rank 0) and stop on training data that would teach (almost) nothing."""
        from ftframe.data.sanity import format_instruction_report

        report = self.sanity_report()
        self.sanity = report
        rank_zero_info(format_instruction_report(report))
        train = report["splits"]["train"]
        if train["supervised_fraction_overall"] < self.min_supervised_fraction:
            raise UserError(f"only {train['supervised_fraction_overall']:.4%} of the training tokens are supervised "
                            f"(min_supervised_fraction={self.min_supervised_fraction}): the loss would be computed on "
                            "almost nothing. Check that the response field is the right one (output_field / "
                            "completion_field / the assistant turns), or lower min_supervised_fraction for data with "
                            "very long prompts")
        complete = train["examples"] - train["truncated"]
        if train["terminator_supervised"] < complete:
            rank_zero_warn(f"[ftframe] {complete - train['terminator_supervised']} of {complete} complete training "
                           f"responses do not end with a supervised {'/'.join(report['terminators']) or 'EOS'}: the model may "
                           "not learn to stop. Check the template (template: chat_template uses the tokenizer's)")

    def train_dataloader(self) -> StepWindows:
        assert self.train_dataset is not None, "setup() has not run"
        if self.group_by_length and not self.packing:
            lengths = [len(x) for x in self.train_dataset.input_ids]
            self._sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed)
        else:
            self._sampler = ResumableSampler(len(self.train_dataset), seed=self.seed)
        if self._resume is not None:
            self._sampler.resume_from(self._resume["epoch"], self._resume["examples"])
            self._resume = None
        loader = DataLoader(self.train_dataset, batch_size=self.batch_size,
                            sampler=shard_for(self._sampler, self.trainer),  # under DDP: this rank's slice of the order
                            collate_fn=self._collator(), num_workers=self.num_workers, generator=self._generator())
        return StepWindows(loader, accumulation_of(self.trainer))  # each step's loss: a mean over all its tokens

    def val_dataloader(self) -> DataLoader:
        assert self.val_dataset is not None, "setup() has not run"
        return DataLoader(self.val_dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collator(), num_workers=self.num_workers, generator=self._generator())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation examples as prompts (cut before the response) for generation."""
        assert self.val_dataset is not None, "setup() has not run"
        return DataLoader(self.val_dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=PromptCollator(self._get_tokenizer().pad_token_id), num_workers=self.num_workers,
                          generator=self._generator())

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the current epoch, so a resumed run continues with the next unseen batch."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        # a step took batch_size examples on every rank: examples of the whole order consumed so far
        return {"epoch": trainer.current_epoch, "batches": progress.processed,
                "examples": progress.processed * self.batch_size * world_size_of(trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("batches"):
            examples = state_dict.get("examples", int(state_dict["batches"]) * self.batch_size)
            self._resume = {"epoch": int(state_dict["epoch"]), "examples": int(examples)}
            # Lightning cannot see that this module restores the position itself and would warn that it does not
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")

    # ------------------------------------------------------------------ internals
    def _generator(self) -> torch.Generator:
        """A generator of the loader's own: creating an iterator then draws nothing from the global RNG, so dropout
        noise does not depend on where validation, an epoch boundary or a resume falls (exact resume needs this)."""
        return torch.Generator().manual_seed(self.seed)

    def _groups(self) -> dict[str, list[str]]:
        return {"train": self.train_files, **({"val": self.val_files} if self.val_files else {})}

    def _collator(self) -> PackCollator | PadCollator:
        if self.packing:
            return PackCollator()
        return PadCollator(self._get_tokenizer().pad_token_id, self.pad_to_multiple_of)

    def _get_tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.tokenizer = linked_tokenizer(self.tokenizer_name)
        return self.tokenizer

    def _resolved_template(self) -> str:
        tok = self._get_tokenizer()
        if self.template == "auto":
            return "chat_template" if getattr(tok, "chat_template", None) else "alpaca"
        if self.template == "chat_template" and not getattr(tok, "chat_template", None):
            raise UserError(f"template: chat_template, but the tokenizer of {self.tokenizer_name!r} has no chat "
                            f"template; choose one of {sorted(TEMPLATES)}")
        return self.template

    def _cache_key(self, files: list[str]) -> str:
        tok = self._get_tokenizer()
        sources = []
        for name in files:
            kind, path = resolve_source(name)
            if path is not None:
                st = path.stat()
                sources.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
            else:
                sources.append([name])
        knobs = dict(v=CACHE_VERSION, sources=sources, tokenizer=str(tok.name_or_path), vocab=len(tok),
                     chat_template=getattr(tok, "chat_template", None), format=self.format, fields=self.fields,
                     template=self._resolved_template(), system_prompt=self.system_prompt,
                     max_length=self.max_length, truncation=self.truncation, strict=self.strict)
        return hashlib.sha256(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _tokenized(self, files: list[str]) -> dict[str, Any]:
        """Tokenize ``files`` (or read the cache); returns flat tensors plus per-example offsets and status."""
        path = self.cache_dir / f"{self._cache_key(files)}.safetensors"
        if path.is_file():
            data = load_file(str(path))
            return {k: v for k, v in data.items()}
        data = self._tokenize(files)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file(data, str(tmp), metadata={"files": json.dumps(files)})
        os.replace(tmp, path)  # atomic, so concurrent ranks never read half a file
        return data

    def _tokenize(self, files: list[str]) -> dict[str, torch.Tensor]:
        from ftframe.progress import bar as progress_bar

        tok = self._get_tokenizer()
        template = self._resolved_template()
        fmt = self.format
        ids_all: list[list[int]] = []
        labels_all: list[list[int]] = []
        status: list[int] = []
        seen_ids: dict[Any, str] = {}
        duplicates: list[str] = []
        for name in files:
            for rec in progress_bar(read_records(name), desc=f"tokenizing {name}", unit=" rec", mininterval=2,
                            disable=not _is_rank_zero()):
                rid = rec.data.get("id")
                if isinstance(rid, (str, int)) and not isinstance(rid, bool):
                    if rid in seen_ids:
                        duplicates.append(f"{rec.where} repeats id {rid!r} of {seen_ids[rid]}")
                    else:
                        seen_ids[rid] = rec.where
                if fmt == "auto":
                    fmt = detect_format(rec, self.fields)
                messages = to_messages(rec, fmt, self.fields, self.system_prompt)
                try:
                    text, spans = render(messages, tok, template)
                except UserError as e:
                    raise UserError(f"{rec.where}: {e}") from None
                ids, labels, st = self._encode(text, spans, add_special=template != "chat_template")
                ids_all.append(ids)
                labels_all.append(labels)
                status.append(st)
        if not status:
            raise UserError(f"no records found in {files}; the files are empty or hold only blank lines")
        if duplicates:
            message = (f"{len(duplicates)} record(s) repeat an earlier record's id: {'; '.join(duplicates[:3])}"
                       f"{' ...' if len(duplicates) > 3 else ''}")
            if self.strict:
                raise UserError(f"strict: {message}. Remove the duplicates or give them distinct ids")
            rank_zero_warn(f"[ftframe] {message} (kept; strict: true makes this an error)")
        lengths = torch.tensor([len(x) for x in ids_all], dtype=torch.long)
        return {
            "input_ids": torch.tensor([t for x in ids_all for t in x], dtype=torch.int32),
            "labels": torch.tensor([t for x in labels_all for t in x], dtype=torch.int32),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "status": torch.tensor(status, dtype=torch.int8),
        }

    def _encode(self, text: str, spans: list[tuple[int, int]], add_special: bool) -> tuple[list[int], list[int], int]:
        tok = self._get_tokenizer()
        enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        labels = [-100] * len(ids)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if end > start and any(s <= start < e for s, e in spans):
                labels[i] = ids[i]
        first = next((i for i, lab in enumerate(labels) if lab != -100), None)
        if first is None:
            return [], [], DROPPED_PROMPT
        if len(ids) <= self.max_length:
            return ids, labels, OK
        # label at position t is predicted from positions < t, so a response must start inside the window
        if first >= self.max_length:
            return [], [], DROPPED_PROMPT
        if self.truncation == "drop":
            return [], [], DROPPED_LONG
        return ids[: self.max_length], labels[: self.max_length], TRUNCATED

    def _split(self, n: int) -> tuple[list[int], list[int]]:
        return split_indices(n, self.val_size, self.seed)

    def _dataset(self, split: str, data: dict[str, Any], indices: list[int], limit: int | None) -> TokenDataset:
        offsets, status = data["offsets"], data["status"]
        counts = Counter(int(status[i]) for i in indices)
        if self.strict:
            bad = [i for i in indices if int(status[i]) != OK]
            if bad:
                kinds = {TRUNCATED: "truncated", DROPPED_PROMPT: "prompt alone >= max_length",
                         DROPPED_LONG: "too long (truncation: drop)"}
                shown = ", ".join(f"record {i} ({kinds[int(status[i])]})" for i in bad[:5])
                files = self._groups().get(split, self.train_files)
                raise UserError(f"strict: {len(bad)} {split} record(s) of {files} would be truncated or dropped at max_length="
                                f"{self.max_length}: {shown}{' ...' if len(bad) > 5 else ''} (0-based, in file "
                                "order). Raise max_length, shorten those records, or leave strict off to skip and "
                                "count them")
        keep = [i for i in indices if int(status[i]) in (OK, TRUNCATED)]
        if limit is not None:
            keep = keep[:limit]
        ids = [data["input_ids"][offsets[i]: offsets[i + 1]].long() for i in keep]
        labels = [data["labels"][offsets[i]: offsets[i + 1]].long() for i in keep]
        supervised = [float((lab != -100).float().mean()) for lab in labels]
        self.stats[split] = {
            "records": len(indices),
            "examples": len(keep),
            "truncated": counts[TRUNCATED],
            "dropped_prompt_too_long": counts[DROPPED_PROMPT],
            "dropped_too_long": counts[DROPPED_LONG],
            "tokens": int(sum(len(x) for x in ids)),
            "supervised_fraction_median": statistics.median(supervised) if supervised else 0.0,
        }
        s = self.stats[split]
        rank_zero_info(
            f"[ftframe] {split}: {s['examples']} examples from {s['records']} records; {s['truncated']} truncated "
            f"to max_length={self.max_length}, {s['dropped_prompt_too_long']} dropped (prompt alone >= max_length)"
            + (f", {s['dropped_too_long']} dropped (too long, truncation=drop)" if s["dropped_too_long"] else "")
            + f"; {s['tokens']:,} tokens, median supervised fraction {s['supervised_fraction_median']:.2f}"
        )
        if split == "train" and not keep:
            raise UserError(f"the training set is empty after filtering: {s}. Raise max_length, or check the data")
        return TokenDataset(ids, labels)


def _is_rank_zero() -> bool:
    from ftframe.device import is_rank_zero

    return is_rank_zero()


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` record indices of the held-out split ``InstructionDataModule`` makes from ``n`` records.

    Evaluation uses it to score exactly the records a run held out (``ftframe evaluate --split val``).
    """
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise UserError(f"val_size={val_size} leaves no training records out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])
