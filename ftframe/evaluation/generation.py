"""Generation tasks: greedy answers with stop sequences, scored by exact match of an extracted final answer.

GSM8K's references end in ``#### 42``. Two extractions are reported, as lm-evaluation-harness does for GSM8K:
``strict`` takes the number after the last ``####`` of the answer (a model that does not use the format scores 0);
``flexible`` takes the last number anywhere in the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ftframe.errors import UserError
from ftframe.evaluation.common import scoring_mode

__all__ = ["GSM8K_ANSWER", "GenRecord", "evaluate_generation", "extract_answer", "load_generation_records"]

GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"
LAST_NUMBER = r"(-?[\d,]*\.?\d+)"


def extract_answer(text: str, pattern: str = GSM8K_ANSWER) -> str | None:
    """The last match of ``pattern``'s first group in ``text``, normalized (no thousands commas, no trailing ``.0``)."""
    found = re.findall(pattern, text)
    if not found:
        return None
    value = found[-1].replace(",", "").strip()
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    return value or None


@dataclass(frozen=True)
class GenRecord:
    id: str
    prompt: str
    reference: str


def load_generation_records(
    source: str,
    prompt_field: str = "prompt",
    reference_field: str = "completion",
    split: Literal["all", "val", "train"] = "all",
    val_size: float = 0.05,
    split_seed: int = 42,
    limit: int | None = None,
) -> list[GenRecord]:
    """Prompt/reference records from JSONL, CSV, Parquet or an asset name (``gsm8k``).

    ``split: val`` keeps exactly the records ``InstructionDataModule(val_size=..., seed=split_seed)`` holds out of the
    same source, so a fine-tuned model is scored on data it did not train on.
    """
    from ftframe.data.instruction import split_indices
    from ftframe.data.readers import read_records

    records = list(read_records(source))
    if split != "all":
        train, val = split_indices(len(records), val_size, split_seed)
        records = [records[i] for i in (val if split == "val" else train)]
    out = []
    for rec in records:
        for key in (prompt_field, reference_field):
            if not isinstance(rec.data.get(key), str):
                raise UserError(f"{rec.where}: field '{key}' missing or not a string (fields: {sorted(rec.data)})")
        out.append(GenRecord(str(rec.data.get("id", rec.where)), rec.data[prompt_field], rec.data[reference_field]))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UserError(f"{source}: no records")
    return out


def render_prompt(tokenizer: Any, prompt: str, chat: bool, system_prompt: str | None = None) -> str:
    if chat:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {prompt}\nAnswer:"


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[GenRecord],
    max_new_tokens: int = 256,
    stop: Sequence[str] = ("Question:", "</s>", "<|im_end|>"),
    batch_size: int = 16,
    chat: Literal["auto"] | bool = "auto",
    system_prompt: str | None = None,
    answer_pattern: str = GSM8K_ANSWER,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers for ``records``; per-record dicts with the answer text, extracted answers and correctness."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat == "auto" else bool(chat)
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("chat: true, but the tokenizer has no chat template")
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    from ftframe.progress import bar as progress_bar

    out: list[dict[str, Any]] = []
    bar = progress_bar(total=len(records), desc="[ftframe] generation", unit="prompt", disable=not progress)
    try:
        with scoring_mode(model) as device:
            for start in range(0, len(records), batch_size):
                batch = records[start:start + batch_size]
                texts = [render_prompt(tokenizer, r.prompt, use_chat, system_prompt) for r in batch]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not use_chat).to(device)
                generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id, stop_strings=list(stop) or None,
                                           tokenizer=tokenizer)
                for r, row in zip(batch, generated[:, enc["input_ids"].shape[1]:], strict=True):
                    answer = tokenizer.decode(row, skip_special_tokens=True)
                    for s in stop:  # generation stops after a stop string; the answer ends before it
                        answer = answer.split(s)[0]
                    gold = extract_answer(r.reference, answer_pattern)
                    if gold is None:
                        raise UserError(f"record {r.id}: its reference has no final answer matching {answer_pattern!r}")
                    strict, flexible = extract_answer(answer, answer_pattern), extract_answer(answer, LAST_NUMBER)
                    out.append({"id": r.id, "prompt": r.prompt, "answer": answer.strip(), "gold": gold,
                                "strict": strict, "flexible": flexible, "correct_strict": strict == gold,
                                "correct_flexible": flexible == gold})
                bar.update(len(batch))
    finally:
        bar.close()
        tokenizer.padding_side = old_side
    return out


def summarize_generation(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n = len(records)
    return {"n": n, "exact_match_strict": sum(r["correct_strict"] for r in records) / max(n, 1),
            "exact_match_flexible": sum(r["correct_flexible"] for r in records) / max(n, 1)}
