"""``ftframe evaluate``: load a model (base, base + adapter, or a merged folder), run one evaluation, write reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from ftframe.errors import UserError
from ftframe.models import DTypeName

__all__ = ["evaluate"]


def evaluate(
    task: Literal["multiple_choice", "generation", "perplexity"] = "multiple_choice",
    data: str = "mmlu",
    model: str | None = None,
    adapter: str | None = None,
    dtype: DTypeName = "float32",
    output: str = "runs/evaluate",
    limit: int | None = None,
    sample: int | None = None,
    batch_size: int = 8,
    prompt_format: Literal["letter", "continuation"] = "letter",
    k_shot: int = 0,
    seed: int = 1234,
    subjects: list[str] | None = None,
    max_length: int | None = None,
    overflow: Literal["error", "truncate", "skip"] = "error",
    split: Literal["all", "val", "train"] = "all",
    val_size: float = 64,
    split_seed: int = 42,
    max_new_tokens: int = 256,
    chat: Literal["auto"] | bool = "auto",
    window: int = 1024,
    stride: int | None = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """Evaluate a model and write ``results.json``, ``results.md`` and per-item ``records.jsonl`` to ``output``.

    Args:
        task: ``multiple_choice`` (acc / acc_norm by log-likelihood), ``generation`` (greedy answers, exact match of
            the final ``#### N``) or ``perplexity`` (sliding window).
        data: multiple_choice: JSONL with question/choices/label per line, or ``mmlu``; generation: prompt/completion
            records or ``gsm8k``; perplexity: a ``.txt`` file, JSONL with ``text_field``, or a folder of them.
        model: Base model (asset name, folder, ``.gguf``, hub id); default: the base recorded in the adapter.
        adapter: Folder written by ``ftframe fit`` (peft adapter, bottleneck adapters, or a full model folder).
        dtype: dtype to load the model in.
        output: Folder for the reports.
        limit: Evaluate only the first this many items.
        sample: multiple_choice: evaluate this many questions taken at even intervals through the data (MMLU's file
            is sorted by subject, so this keeps most subjects in).
        batch_size: Items per forward pass.
        prompt_format: multiple_choice: ``letter`` (MMLU: ``A. ..`` lines, ``Answer:``, letters scored) or
            ``continuation`` (``Question: ..`` ``Answer:``, choice text scored).
        k_shot: multiple_choice: worked examples of the same subject in front of each question.
        seed: multiple_choice: seed of the few-shot draw.
        subjects: multiple_choice: only these subjects.
        max_length: multiple_choice: context window; default: the model's.
        overflow: multiple_choice: a question longer than ``max_length``: ``error``, ``truncate`` (context from the
            left) or ``skip`` (counted).
        split: generation: ``val`` = exactly the records ``InstructionDataModule(val_size, seed=split_seed)`` held
            out of ``data``; ``train`` the rest; ``all`` every record.
        val_size: generation: the held-out size used with ``split`` (the quickstart holds out 64).
        split_seed: generation: the data module's ``seed`` (default 42, as ``InstructionDataModule``).
        max_new_tokens: generation: length limit.
        chat: generation: wrap prompts in the tokenizer's chat template (``auto``: when it has one).
        window: perplexity: tokens per window.
        stride: perplexity: tokens between window starts (default: ``window``, disjoint windows).
        text_field: perplexity: the text field of JSON records.
    """
    from ftframe.evaluation import generation as gen_mod
    from ftframe.evaluation import multiple_choice as mc
    from ftframe.evaluation.perplexity import perplexity, read_texts
    from ftframe.generate import Generator

    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror}") from None
    # read and check the data before the (slow) model load
    if task == "multiple_choice":
        if k_shot < 0:
            raise UserError(f"k_shot must be >= 0, got {k_shot}")
        items: Any = mc.load_questions(data, subjects=subjects)
        if sample is not None:
            items = mc.sample_evenly(items, sample)
        if limit is not None:
            items = items[:limit]
    elif task == "generation":
        items = gen_mod.load_generation_records(data, split=split, val_size=val_size, split_seed=split_seed,
                                                limit=limit)
    else:
        items = read_texts(data, field=text_field)
    loaded = Generator(adapter=adapter, model=model, dtype=dtype)
    net, tok = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    if task == "multiple_choice":
        result = mc.score_multiple_choice(net, tok, items, prompt_format=prompt_format, k_shot=k_shot, seed=seed,
                                          batch_size=batch_size, max_length=max_length, overflow=overflow)
        records = result.records
        summary = mc.summarize(records)
        summary.update(truncated=result.truncated, skipped=len(result.skipped), skipped_ids=result.skipped)
    elif task == "generation":
        records = gen_mod.evaluate_generation(net, tok, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                              chat=chat)
        summary = gen_mod.summarize_generation(records)
    else:
        summary = perplexity(net, tok, items, max_length=window, stride=stride, batch_size=batch_size)
        records = []
    seconds = time.perf_counter() - started
    report = {"task": task, "data": data, "model": model, "adapter": adapter, "dtype": dtype, "seconds": seconds,
              "options": {"prompt_format": prompt_format, "k_shot": k_shot, "seed": seed, "limit": limit,
                          "sample": sample,
                          "split": split, "max_new_tokens": max_new_tokens, "window": window, "stride": stride},
              "results": summary}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    with open(out / "records.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (out / "results.md").write_text(_markdown(report))
    print(_markdown(report), flush=True)
    print(f"[ftframe] evaluation written to {out} ({seconds:.1f} s)", flush=True)
    return report


def _markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    what = report["adapter"] or report["model"] or "base"
    head = f"## {report['task']} on {report['data']} — {what}\n\n"
    if report["task"] == "multiple_choice":
        fmt = report["options"]["prompt_format"]
        lines = [head + f"format `{fmt}`, {report['options']['k_shot']}-shot, {res['n']} questions "
                 f"({res.get('truncated', 0)} truncated, {res.get('skipped', 0)} skipped)\n",
                 "| subject | n | acc | acc_norm |", "|---|---:|---:|---:|",
                 f"| **all** | {res['n']} | {100 * res['acc']:.2f} ± {100 * res['acc_stderr']:.2f} | "
                 f"{100 * res['acc_norm']:.2f} ± {100 * res['acc_norm_stderr']:.2f} |"]
        for s, v in res.get("subjects", {}).items():
            lines.append(f"| {s} | {v['n']} | {100 * v['acc']:.2f} | {100 * v['acc_norm']:.2f} |")
        return "\n".join(lines) + "\n"
    if report["task"] == "generation":
        return (head + "| n | exact match (strict `#### N`) | exact match (flexible: last number) |\n|---:|---:|---:|\n"
                f"| {res['n']} | {100 * res['exact_match_strict']:.2f} | {100 * res['exact_match_flexible']:.2f} |\n")
    return (head + "| tokens | windows (length / stride) | perplexity | bits per byte |\n|---:|---:|---:|---:|\n"
            f"| {res['tokens']} | {res['windows']} ({res['max_length']} / {res['stride']}) | "
            f"{res['perplexity']:.3f} | {res['bits_per_byte']:.4f} |\n")
