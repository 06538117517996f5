"""``PreferenceDataModule``: (prompt, chosen, rejected) records for the ``Preference`` task (DPO and its family)."""

from __future__ import annotations

import hashlib
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from ftframe.data.collate import pad_right
from ftframe.data.instruction import (
    DROPPED_LONG,
    DROPPED_PROMPT,
    OK,
    TRUNCATED,
    InstructionDataModule,
    _is_rank_zero,
)
from ftframe.data.readers import Record, read_records
from ftframe.data.templates import ROLES, check_messages, render
from ftframe.errors import UserError

__all__ = ["PairCollator", "PairDataset", "PreferenceDataModule"]

IDENTICAL = 4  # status of a record whose chosen and rejected responses are the same text


class PairDataset(Dataset):
    """Tokenized pairs; item ``i`` is ``{chosen_ids, chosen_labels, rejected_ids, rejected_labels, pair_id}``.

    ``input_ids`` / ``labels`` are the chosen sequences (what the sanity report and length grouping read); pair ids
    start at ``first_id`` so that training and validation pairs never share one.
    """

    def __init__(self, chosen: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 rejected: Sequence[tuple[torch.Tensor, torch.Tensor]], first_id: int = 0) -> None:
        self.input_ids = [ids for ids, _ in chosen]
        self.labels = [labels for _, labels in chosen]
        self.rejected_ids = [ids for ids, _ in rejected]
        self.rejected_labels = [labels for _, labels in rejected]
        self.first_id = first_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"chosen_ids": self.input_ids[i], "chosen_labels": self.labels[i],
                "rejected_ids": self.rejected_ids[i], "rejected_labels": self.rejected_labels[i],
                "pair_id": self.first_id + i, "index": i}


class PairCollator:
    """One padded batch of ``2B`` rows: the ``B`` chosen sequences, then the ``B`` rejected ones (one forward pass)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of or 1

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        labs = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        input_ids, attention_mask = pad_right(seqs, self.pad_token_id, self.multiple)
        labels = torch.full_like(input_ids, -100)
        for i, lab in enumerate(labs):
            labels[i, : len(lab)] = lab
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "pair_id": torch.tensor([int(e["pair_id"]) for e in examples]),
                "example_ids": torch.tensor([int(e["index"]) for e in examples])}


class PreferenceDataModule(InstructionDataModule):
    """Preference pairs: a prompt with a chosen (preferred) and a rejected response, for ``ftframe.tasks.Preference``.

    Each field may be plain text or chat messages: ``prompt`` a string (one user turn) or a list of ``{role, content}``
    (system / user / assistant turns before the answer); ``chosen`` and ``rejected`` a string (one assistant turn) or a
    list of assistant messages. Both responses are rendered after the same prompt with the tokenizer's chat template
    (or a named template), and supervised (counted in the log-probability) on their assistant tokens only, turn
    terminator included. Readers, caching, the train/validation split, the sanity report and the errors naming file,
    line and field are those of :class:`InstructionDataModule`; ``ftframe make-preferences`` writes such files.

    Args:
        train_files: Training pairs: file paths (.jsonl, .json, .csv, .parquet) or hub dataset names.
        val_files: Validation pairs; if empty, ``val_size`` of the training records are held out.
        val_size: Held-out fraction (< 1) or number of records (>= 1) when ``val_files`` is empty.
        tokenizer: Model whose tokenizer is used (linked by the CLI to ``model.model_name``).
        prompt_field: The prompt field.
        chosen_field: The preferred response field.
        rejected_field: The dispreferred response field.
        template: As in :class:`InstructionDataModule`.
        system_prompt: System message prepended to prompts that have none.
        max_length: Maximum tokens per sequence (prompt + one response).
        truncation: ``truncate`` cuts a too-long response's tail (both sides of a pair are cut at the same length
            budget), ``drop`` removes the pair; a pair whose prompt alone fills ``max_length`` is always dropped.
        max_train_examples: Use at most this many training pairs.
        max_val_examples: Use at most this many validation pairs.
        batch_size: Pairs per training batch (per device): ``2 x batch_size`` sequences per forward pass.
        eval_batch_size: Pairs per validation batch; ``None`` = ``batch_size``.
        group_by_length: Batch pairs of similar (chosen) length together.
        pad_to_multiple_of: Round padded lengths up to a multiple of this; ``None`` disables.
        num_workers: DataLoader worker processes.
        seed: Seed of the split and of the shuffling order.
        cache_dir: Where tokenized data is cached; ``None`` = ``$FTFRAME_HOME/tokenized``.
        strict: Turn every skip-with-count into an error naming the record (truncated, dropped, identical responses).
    """

    #: The ``Preference`` task checks for this.
    paired = True

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_size: float = 0.05,
        tokenizer: str | None = None,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        template: Literal["auto", "chat_template", "alpaca", "chatml", "plain"] = "auto",
        system_prompt: str | None = None,
        max_length: int = 1024,
        truncation: Literal["truncate", "drop"] = "truncate",
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        group_by_length: bool = False,
        pad_to_multiple_of: int | None = 8,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: str | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(train_files=train_files, val_files=val_files, val_size=val_size, tokenizer=tokenizer,
                         format="prompt_completion", prompt_field=prompt_field, template=template,
                         system_prompt=system_prompt, max_length=max_length, truncation=truncation,
                         max_train_examples=max_train_examples, max_val_examples=max_val_examples,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, packing=False,
                         group_by_length=group_by_length, pad_to_multiple_of=pad_to_multiple_of,
                         num_workers=num_workers, seed=seed, cache_dir=cache_dir, min_supervised_fraction=0.0,
                         strict=strict)
        self.fields.update(chosen=chosen_field, rejected=rejected_field)
        self._next_id = 0

    # ------------------------------------------------------------------ loaders
    def _collator(self) -> PairCollator:
        return PairCollator(self._get_tokenizer().pad_token_id, self.pad_to_multiple_of)

    def predict_dataloader(self) -> DataLoader:
        """The validation pairs (``Preference.predict`` scores both responses of each)."""
        return self.val_dataloader()

    def reference_dataloaders(self) -> tuple[list[DataLoader], int]:
        """Loaders over every training and validation pair in order (no sharding), and the number of pair ids: what
        the ``Preference`` task precomputes reference log-probabilities on."""
        assert self.train_dataset is not None and self.val_dataset is not None, "setup() has not run"
        loaders = [DataLoader(d, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collator())
                   for d in (self.train_dataset, self.val_dataset) if len(d)]
        return loaders, self._next_id

    def check_sanity(self) -> None:
        """Print the sanity report (the chosen side, plus how many pairs were identical) on rank 0."""
        from ftframe.data.sanity import format_instruction_report

        report = self.sanity_report()
        self.sanity = report
        text = format_instruction_report(report).replace("data sanity report", "data sanity report (chosen responses)")
        for split, s in self.stats.items():
            text += (f"\n  {split}: {s['identical']} pair(s) dropped with identical chosen and rejected responses; "
                     f"median tokens chosen {s['chosen_tokens_median']:.0f} / rejected {s['rejected_tokens_median']:.0f}")
        rank_zero_info(text)

    # ------------------------------------------------------------------ tokenizing
    def _cache_key(self, files: list[str]) -> str:
        return "pairs-" + hashlib.sha256(super()._cache_key(files).encode()).hexdigest()[:20]

    def _messages(self, rec: Record, name: str, roles: tuple[str, ...]) -> list[dict[str, str]]:
        field = self.fields[name]
        if field not in rec.data or rec.data[field] is None:
            raise UserError(f"{rec.where}: field '{field}' is missing (record has {sorted(rec.data)}). Add it, or map "
                            f"your column with {name}_field")
        value = rec.data[field]
        if isinstance(value, str):
            return [{"role": "user" if name == "prompt" else "assistant", "content": value}]
        if not isinstance(value, list) or not value:
            raise UserError(f"{rec.where}: field '{field}' must be a string or a non-empty list of {{role, content}} "
                            f"messages, got {type(value).__name__} {value!r:.60}")
        return check_messages(rec, field, value, roles)

    def _tokenize(self, files: list[str]) -> dict[str, torch.Tensor]:
        from ftframe.progress import bar as progress_bar

        template = self._resolved_template()
        ids_all: list[list[int]] = []
        labels_all: list[list[int]] = []
        status: list[int] = []
        for name in files:
            for rec in progress_bar(read_records(name), desc=f"tokenizing {name}", unit=" pair", mininterval=2,
                            disable=not _is_rank_zero()):
                prompt = self._messages(rec, "prompt", ROLES)
                if prompt[-1]["role"] == "assistant":
                    raise UserError(f"{rec.where}: field '{self.fields['prompt']}' ends with an assistant message; "
                                    "the prompt must end where the answer starts")
                if self.system_prompt and prompt[0]["role"] != "system":
                    prompt.insert(0, {"role": "system", "content": self.system_prompt})
                sides = [self._messages(rec, side, ("assistant",)) for side in ("chosen", "rejected")]
                encoded = []
                for side in sides:
                    try:
                        text, spans = render(prompt + side, self._get_tokenizer(), template)
                    except UserError as e:
                        raise UserError(f"{rec.where}: {e}") from None
                    encoded.append(self._encode(text, spans, add_special=template != "chat_template"))
                (c_ids, c_lab, c_st), (r_ids, r_lab, r_st) = encoded
                if sides[0] == sides[1]:
                    st = IDENTICAL
                elif DROPPED_PROMPT in (c_st, r_st):
                    st = DROPPED_PROMPT
                elif DROPPED_LONG in (c_st, r_st):
                    st = DROPPED_LONG
                else:
                    st = TRUNCATED if TRUNCATED in (c_st, r_st) else OK
                if st not in (OK, TRUNCATED):
                    c_ids = c_lab = r_ids = r_lab = []
                ids_all += [c_ids, r_ids]
                labels_all += [c_lab, r_lab]
                status.append(st)
        if not status:
            raise UserError(f"no records found in {files}; the files are empty or hold only blank lines")
        lengths = torch.tensor([len(x) for x in ids_all], dtype=torch.long)
        return {
            "input_ids": torch.tensor([t for x in ids_all for t in x], dtype=torch.int32),
            "labels": torch.tensor([t for x in labels_all for t in x], dtype=torch.int32),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),  # 2 sequences per record
            "status": torch.tensor(status, dtype=torch.int8),
        }

    def _dataset(self, split: str, data: dict[str, Any], indices: list[int], limit: int | None) -> PairDataset:
        offsets, status = data["offsets"], data["status"]
        counts = Counter(int(status[i]) for i in indices)
        kinds = {TRUNCATED: "truncated", DROPPED_PROMPT: "prompt alone >= max_length",
                 DROPPED_LONG: "too long (truncation: drop)", IDENTICAL: "chosen == rejected"}
        if self.strict:
            bad = [i for i in indices if int(status[i]) != OK]
            if bad:
                shown = ", ".join(f"record {i} ({kinds[int(status[i])]})" for i in bad[:5])
                raise UserError(f"strict: {len(bad)} {split} pair(s) of {self._groups().get(split, self.train_files)} "
                                f"would be truncated or dropped: {shown}{' ...' if len(bad) > 5 else ''} (0-based, "
                                "in file order). Fix those records, raise max_length, or leave strict off to skip and "
                                "count them")
        keep = [i for i in indices if int(status[i]) in (OK, TRUNCATED)]
        if limit is not None:
            keep = keep[:limit]

        def seq(j: int) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = offsets[j], offsets[j + 1]
            return data["input_ids"][a:b].long(), data["labels"][a:b].long()

        chosen, rejected = [seq(2 * i) for i in keep], [seq(2 * i + 1) for i in keep]
        dataset = PairDataset(chosen, rejected, first_id=self._next_id)
        self._next_id += len(dataset)
        supervised = [float((lab != -100).float().mean()) for _, lab in chosen]
        self.stats[split] = {
            "records": len(indices), "examples": len(keep), "truncated": counts[TRUNCATED],
            "dropped_prompt_too_long": counts[DROPPED_PROMPT], "dropped_too_long": counts[DROPPED_LONG],
            "identical": counts[IDENTICAL],
            "tokens": int(sum(len(x) for x, _ in chosen) + sum(len(x) for x, _ in rejected)),
            "supervised_fraction_median": statistics.median(supervised) if supervised else 0.0,
            "chosen_tokens_median": statistics.median([int((lab != -100).sum()) for _, lab in chosen]) if keep else 0,
            "rejected_tokens_median": statistics.median([int((lab != -100).sum()) for _, lab in rejected]) if keep
            else 0,
        }
        s = self.stats[split]
        rank_zero_info(f"[ftframe] {split}: {s['examples']} pairs from {s['records']} records; {s['truncated']} "
                       f"truncated to max_length={self.max_length}, {s['dropped_prompt_too_long']} dropped (prompt "
                       f"alone >= max_length), {s['dropped_too_long']} dropped (too long), {s['identical']} dropped "
                       f"(identical responses); {s['tokens']:,} tokens")
        if s["identical"]:
            rank_zero_warn(f"[ftframe] {split}: {s['identical']} pair(s) have the same chosen and rejected response and "
                           "were dropped (they carry no preference; strict: true makes this an error)")
        if split == "train" and not keep:
            raise UserError(f"the training set is empty after filtering: {s}. Raise max_length, or check the data")
        return dataset
