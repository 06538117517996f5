"""``ftframe evaluate``: load a model (base, base + adapter, or a merged folder), run one evaluation, write reports."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Literal

from ftframe.errors import UserError
from ftframe.models import InferenceDType

__all__ = ["OPTIONS", "evaluate", "load_items", "score"]


def evaluate(
    task: Literal["multiple_choice", "generation", "perplexity", "loss"] = "multiple_choice",
    data: str = "mmlu",
    model: str | None = None,
    adapter: str | None = None,
    dtype: InferenceDType = "auto",
    output: str = "runs/evaluate",
    limit: int | None = None,
    sample: int | None = None,
    batch_size: int = 8,
    prompt_format: str = "letter",
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
    suite: str | None = None,
    compare: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a model and write ``results.json``, ``results.md`` and per-item ``records.jsonl`` to ``output``.

    With ``suite``: score every benchmark of the suite instead and write a scorecard (``scorecard.md`` / ``.json`` /
    ``.png``, error analysis per benchmark, ``records/``). With ``compare A B``: no model; two scorecards side by side.

    Args:
        task: ``multiple_choice`` (acc / acc_norm by log-likelihood), ``generation`` (greedy answers, exact match of
            the final ``#### N``), ``perplexity`` (sliding window) or ``loss`` (mean NLL per response token of instruction
            data, templated and masked as training does: on ``split: val`` the validation loss of a run).
        data: multiple_choice: JSONL with question/choices/label per line, or ``mmlu``; generation: prompt/completion
            records or ``gsm8k``; perplexity: a ``.txt`` file, JSONL with ``text_field``, or a folder of them; loss:
            any instruction data (``gsm8k``, ``chatterbot``, JSONL / CSV / Parquet records).
        model: Base model (asset name, folder, ``.gguf``, hub id); default: the base recorded in the adapter.
        adapter: Folder written by ``ftframe fit`` (peft adapter, bottleneck adapters, or a full model folder).
        dtype: dtype to load the model in; ``auto``: float32 on a CPU (exact scores), bfloat16 / float16 on a CUDA
            GPU (see :mod:`ftframe.device`); a 16-bit dtype on a CPU without fast 16-bit matmuls is warned about.
        output: Folder for the reports.
        limit: Evaluate only the first this many items.
        sample: multiple_choice: evaluate this many questions taken at even intervals through the data (MMLU's file
            is sorted by subject, so this keeps most subjects in).
        batch_size: Items per forward pass.
        prompt_format: multiple_choice: ``letter`` (MMLU: ``A. ..`` lines, ``Answer:``, letters scored),
            ``continuation`` (``Question: ..`` ``Answer:``, choice text scored), or a YAML file of a prompt format's
            fields (question, continuation, choice_line, description, delimiter, shot_separator), e.g.
            ``configs/prompts/mmlu_continuation.yaml``.
        k_shot: multiple_choice: worked examples of the same subject in front of each question.
        seed: multiple_choice: seed of the few-shot draw.
        subjects: multiple_choice: only these subjects.
        max_length: multiple_choice: context window (default: the model's); loss: the data module's ``max_length``
            (default 1024).
        overflow: multiple_choice: a question longer than ``max_length``: ``error``, ``truncate`` (context from the
            left) or ``skip`` (counted).
        split: generation and loss: ``val`` = exactly the records ``InstructionDataModule(val_size, seed=split_seed)`` held
            out of ``data``; ``train`` the rest; ``all`` every record.
        val_size: generation and loss: the held-out size used with ``split`` (the quickstart holds out 64).
        split_seed: generation and loss: the data module's ``seed`` (default 42, as ``InstructionDataModule``).
        max_new_tokens: generation: length limit.
        chat: generation: wrap prompts in the tokenizer's chat template (``auto``: when it has one).
        window: perplexity: tokens per window.
        stride: perplexity: tokens between window starts (default: ``window``, disjoint windows).
        text_field: perplexity: the text field of JSON records.
        suite: A benchmark suite: ``standard`` (ARC-Easy, ARC-Challenge, HellaSwag, Winogrande, PIQA, BoolQ,
            OpenBookQA, MMLU as lm-evaluation-harness 0.4.13 defines them) or a suite YAML; ``limit`` caps every
            benchmark's question count.
        compare: Two scorecard folders A B: B - A per benchmark with its standard error, and which differences are
            inside the noise.
    """
    opts = {k: v for k, v in locals().items() if k in OPTIONS}
    out = Path(output)
    if compare is not None:
        if len(compare) != 2:
            raise UserError(f"--compare takes two scorecard folders A B, got {len(compare)}: {compare}")
        from ftframe.evaluation.scorecard import compare as compare_cards

        return compare_cards(compare[0], compare[1], out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {out}: {e.strerror}") from None
    from ftframe.tools.generate import Generator

    if suite is not None:
        return _evaluate_suite(suite, model, adapter, dtype, out, limit, batch_size)

    # read and check the data and the prompt format before the (slow) model load
    fmt = None
    if task == "multiple_choice":
        from ftframe.evaluation.multiple_choice import resolve_prompt_format

        fmt = resolve_prompt_format(prompt_format)
    items = load_items(opts, tokenizer=adapter or model)
    loaded = Generator(adapter=adapter, model=model, dtype=dtype)
    started = time.perf_counter()
    summary, records = score(loaded.model, loaded.tokenizer, items, opts)
    seconds = time.perf_counter() - started
    report = {"task": task, "data": data, "model": model, "adapter": adapter, "dtype": loaded.dtype, "seconds": seconds,
              "options": {"prompt_format": prompt_format,
                          "prompt_format_fields": dataclasses.asdict(fmt) if fmt is not None else None,
                          "k_shot": k_shot, "seed": seed, "limit": limit,
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


def _evaluate_suite(suite_name: str, model: str | None, adapter: str | None, dtype: Any, out: Path,
                    limit: int | None, batch_size: int) -> dict[str, Any]:
    from ftframe.evaluation.analysis import analysis_markdown, analyze
    from ftframe.evaluation.benchmarks import load_suite, run_suite, suite_questions
    from ftframe.evaluation.scorecard import write_scorecard
    from ftframe.tools.generate import Generator

    suite = load_suite(suite_name)
    questions = suite_questions(suite, limit=limit)  # every benchmark read and checked before the model loads
    loaded = Generator(adapter=adapter, model=model, dtype=dtype)
    (out / "records").mkdir(exist_ok=True)
    card: dict[str, Any] = {"suite": suite.name, "suite_file": suite.source, "model": model, "adapter": adapter,
                            "dtype": loaded.dtype, "limit": limit, "benchmarks": {}, "questions": 0, "seconds": 0.0,
                            "analysis": {}}
    analyses: dict[str, str] = {}

    def done(name: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        with open(out / "records" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        analysis = analyze(questions[name], records)
        card["analysis"][name] = analysis
        analyses[name] = analysis_markdown(summary["title"], analysis)
        card["benchmarks"][name] = summary
        card["questions"] += summary["n"]
        card["seconds"] += summary["seconds"]
        write_scorecard(out, card, analyses)  # after every benchmark: a crash keeps what was scored
        print(f"[ftframe] {summary['title']}: {summary['primary_metric']} {100 * summary['primary']:.2f} ± "
              f"{100 * summary['primary_stderr']:.2f} ({summary['n']} questions, {summary['seconds']:.0f} s)",
              flush=True)

    run_suite(loaded.model, loaded.tokenizer, suite, questions, batch_size=batch_size, on_result=done)
    print((out / "scorecard.md").read_text().split("\n### ")[0], flush=True)
    print(f"[ftframe] scorecard written to {out} (scorecard.md / .json / .png, records/)", flush=True)
    return card


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
    if report["task"] == "loss":
        return (head + "| examples | response tokens | loss (NLL / token) | perplexity |\n|---:|---:|---:|---:|\n"
                f"| {res['examples']} | {res['tokens']} | {res['loss']:.4f} | {res['perplexity']:.3f} |\n")
    if report["task"] == "generation":
        return (head + "| n | exact match (strict `#### N`) | exact match (flexible: last number) |\n|---:|---:|---:|\n"
                f"| {res['n']} | {100 * res['exact_match_strict']:.2f} | {100 * res['exact_match_flexible']:.2f} |\n")
    return (head + "| tokens | windows (length / stride) | perplexity | bits per byte |\n|---:|---:|---:|---:|\n"
            f"| {res['tokens']} | {res['windows']} ({res['max_length']} / {res['stride']}) | "
            f"{res['perplexity']:.3f} | {res['bits_per_byte']:.4f} |\n")


#: The options of :func:`evaluate` that choose and score the data (not the model or where reports go).
OPTIONS = ("task", "data", "limit", "sample", "batch_size", "prompt_format", "k_shot", "seed", "subjects", "max_length",
           "overflow", "split", "val_size", "split_seed", "max_new_tokens", "chat", "window", "stride", "text_field")


def defaults() -> dict[str, Any]:
    """:data:`OPTIONS` with :func:`evaluate`'s defaults."""
    import inspect

    params = inspect.signature(evaluate).parameters
    return {name: params[name].default for name in OPTIONS}


def load_items(opts: dict[str, Any], tokenizer: str | None) -> Any:
    """Read (and check) the data an evaluation needs; ``opts`` maps :data:`OPTIONS` names (missing = default).

    ``tokenizer`` (a model name or a folder with a tokenizer) is needed by ``task: loss`` only, which tokenizes as
    training does.
    """
    from ftframe.evaluation import generation as gen_mod
    from ftframe.evaluation import multiple_choice as mc
    from ftframe.evaluation.perplexity import read_texts

    o = {**defaults(), **opts}
    task = o["task"]
    if task == "multiple_choice":
        if o["k_shot"] < 0:
            raise UserError(f"k_shot must be >= 0, got {o['k_shot']}")
        items: Any = mc.load_questions(o["data"], subjects=o["subjects"])
        if o["sample"] is not None:
            items = mc.sample_evenly(items, o["sample"])
        if o["limit"] is not None:
            items = items[:o["limit"]]
        return items
    if task == "generation":
        return gen_mod.load_generation_records(o["data"], split=o["split"], val_size=o["val_size"],
                                               split_seed=o["split_seed"], limit=o["limit"])
    if task == "perplexity":
        return read_texts(o["data"], field=o["text_field"])
    if task == "loss":
        from ftframe.evaluation.response_loss import load_loss_batches

        if not tokenizer:
            raise UserError("task loss needs a model or adapter to tokenize the data with (--model / --adapter)")
        return load_loss_batches(o["data"], tokenizer, split=o["split"], val_size=o["val_size"],
                                 split_seed=o["split_seed"], max_length=o["max_length"] or 1024,
                                 batch_size=o["batch_size"], limit=o["limit"])
    raise UserError(f"unknown evaluation task {task!r}; choose one of multiple_choice, generation, perplexity, loss")


def score(net: Any, tok: Any, items: Any, opts: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one evaluation of a loaded model on :func:`load_items`' items: ``(summary, per-item records)``."""
    from ftframe.evaluation import generation as gen_mod
    from ftframe.evaluation import multiple_choice as mc
    from ftframe.evaluation.perplexity import perplexity

    o = {**defaults(), **opts}
    task = o["task"]
    if task == "multiple_choice":
        result = mc.score_multiple_choice(net, tok, items, prompt_format=o["prompt_format"], k_shot=o["k_shot"],
                                          seed=o["seed"], batch_size=o["batch_size"], max_length=o["max_length"],
                                          overflow=o["overflow"])
        summary = mc.summarize(result.records)
        summary.update(truncated=result.truncated, skipped=len(result.skipped), skipped_ids=result.skipped)
        return summary, result.records
    if task == "generation":
        records = gen_mod.evaluate_generation(net, tok, items, max_new_tokens=o["max_new_tokens"],
                                              batch_size=o["batch_size"], chat=o["chat"])
        return gen_mod.summarize_generation(records), records
    if task == "perplexity":
        return perplexity(net, tok, items, max_length=o["window"], stride=o["stride"], batch_size=o["batch_size"]), []
    from ftframe.evaluation.response_loss import response_loss

    return response_loss(net, items), []
