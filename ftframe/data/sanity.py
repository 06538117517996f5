"""The data sanity report: what a run will actually learn from, before it spends hours on it.

Printed (rank 0) when a data module is set up, and on its own by ``ftframe inspect-data --config <run.yaml>``. Per
split: records read, examples kept, truncated and dropped; the supervised-token fraction (min / median / overall);
how many examples supervise the end of their response (EOS or the chat template's turn terminator -- a model that never
learns it never stops); and the first training example rendered with its loss mask shown. Classification data: the
label distribution per split.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch

__all__ = ["MASK_CLOSE", "MASK_OPEN", "instruction_report", "render_mask", "terminator_ids"]

#: markers around supervised spans in a rendered example
MASK_OPEN, MASK_CLOSE = "[[", "]]"

#: end-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Mistral / Llama 2)
TURN_TERMINATORS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>", "<|endoftext|>")


def terminator_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a response: EOS and the turn terminators this tokenizer has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in TURN_TERMINATORS if t in vocab}
    return ids


def render_mask(tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor, limit: int = 1500) -> str:
    """The example's text with supervised spans between ``[[`` and ``]]`` (the loss is on those tokens only)."""
    parts: list[str] = []
    run: list[int] = []
    supervised = None
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        now = label != -100
        if supervised is not None and now != supervised:
            parts.append(_span(tokenizer, run, supervised))
            run = []
        run.append(token)
        supervised = now
    if run:
        parts.append(_span(tokenizer, run, bool(supervised)))
    text = "".join(parts)
    return text if len(text) <= limit else text[:limit] + f" ... ({len(text) - limit} more characters)"


def _span(tokenizer: Any, ids: list[int], supervised: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{MASK_OPEN}{text}{MASK_CLOSE}" if supervised else text


def instruction_report(stats: dict[str, dict[str, Any]], datasets: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Per split: the counts of ``stats`` plus supervised fractions and terminator supervision; the first example."""
    ends = terminator_ids(tokenizer)
    report: dict[str, Any] = {"splits": {}}
    for split, dataset in datasets.items():
        if dataset is None:
            continue
        fractions, ended, supervised_tokens, tokens = [], 0, 0, 0
        for labels in dataset.labels:
            mask = labels != -100
            n = int(mask.sum())
            fractions.append(n / max(len(labels), 1))
            supervised_tokens += n
            tokens += len(labels)
            if n and int(labels[mask][-1]) in ends:
                ended += 1
        report["splits"][split] = {
            **stats.get(split, {}),
            "supervised_fraction_min": min(fractions) if fractions else 0.0,
            "supervised_fraction_median": statistics.median(fractions) if fractions else 0.0,
            "supervised_fraction_overall": supervised_tokens / max(tokens, 1),
            "zero_supervised_examples": sum(f == 0 for f in fractions),
            "terminator_supervised": ended,
        }
    train = datasets.get("train")
    if train is not None and len(train):
        report["first_example"] = render_mask(tokenizer, train.input_ids[0], train.labels[0])
    report["terminators"] = sorted(tokenizer.convert_ids_to_tokens(sorted(ends)))
    return report


def format_instruction_report(report: dict[str, Any]) -> str:
    lines = ["[ftframe] data sanity report"]
    for split, s in report["splits"].items():
        kept = s.get("examples", 0)
        lines.append(
            f"  {split}: {s.get('records', '?')} records read, {kept} examples kept; {s.get('truncated', 0)} truncated "
            f"(response cut at max_length), {s.get('dropped_prompt_too_long', 0)} dropped with the whole response "
            f"truncated (prompt alone >= max_length), {s.get('dropped_too_long', 0)} dropped as too long; "
            f"supervised tokens per example min {s['supervised_fraction_min']:.3f} / median "
            f"{s['supervised_fraction_median']:.3f} (overall {s['supervised_fraction_overall']:.3f}); "
            f"response end ({'/'.join(report['terminators']) or 'EOS'}) supervised in {s['terminator_supervised']} of "
            f"{kept}")
    if "first_example" in report:
        lines.append(f"  first training example, loss on {MASK_OPEN}...{MASK_CLOSE}:")
        lines += ["    " + line for line in report["first_example"].splitlines() or [""]]
    return "\n".join(lines)
