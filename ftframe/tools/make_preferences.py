"""``ftframe make-preferences``: preference pairs from a model's own mistakes on questions with a checkable answer.

As in iterative reasoning preference optimisation (Pang et al., 2024, https://arxiv.org/abs/2404.19733): sample
``samples`` answers per training question from the model (a base, or a base + the adapter it will be tuned from),
keep a correct worked solution as *chosen* -- a sampled one whose final number is right (on-policy), or the reference
solution -- and a sampled answer with a wrong final number as *rejected*. The pairs are written as JSONL that
``ftframe.data.PreferenceDataModule`` reads (``prompt``, ``chosen``, ``rejected``, plus where each came from), and the
sampling settings and counts beside them (``<output>.meta.json``).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Literal

import torch

from ftframe.errors import UserError
from ftframe.models import InferenceDType

__all__ = ["make_preferences", "pick_pairs"]


def pick_pairs(answers: list[str], reference: str, gold: str, chosen: str, pairs: int, rng: random.Random,
               pattern: str) -> list[dict[str, Any]]:
    """The pairs of one question from its sampled ``answers``: at most ``pairs``, each with a distinct rejected
    answer (its last number is not ``gold``, or it has none), and as chosen a correct sampled answer (``pattern``
    finds ``gold``) where ``chosen`` is ``sampled`` and one exists, else the ``reference`` solution."""
    from ftframe.evaluation.generation import LAST_NUMBER, extract_answer

    right, wrong = [], []
    for a in dict.fromkeys(x.strip() for x in answers if x.strip()):  # distinct, in sampling order
        last = extract_answer(a, LAST_NUMBER)
        if extract_answer(a, pattern) == gold:
            right.append((a, gold))
        elif last != gold:  # the final number is wrong, or there is none (a right number out of format is neither)
            wrong.append((a, last))
    rng.shuffle(wrong)
    out = []
    for i, (bad, number) in enumerate(wrong[:pairs]):
        if chosen == "sampled" and right:
            good, source = right[i % len(right)][0], "sampled"
        else:
            good, source = reference.strip(), "reference"
        out.append({"chosen": good, "rejected": bad, "chosen_source": source, "rejected_answer": number})
    return out


def make_preferences(
    output: str,
    adapter: str | None = None,
    model: str | None = None,
    data: str = "gsm8k",
    split: Literal["train", "val", "all"] = "train",
    val_size: float = 64,
    split_seed: int = 42,
    limit: int | None = 200,
    samples: int = 4,
    pairs_per_question: int = 1,
    chosen: Literal["sampled", "reference"] = "sampled",
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prompt_field: str = "prompt",
    reference_field: str = "completion",
    answer_pattern: str = r"####\s*(-?[\d,]*\.?\d+)",
    dtype: InferenceDType = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Write preference pairs (chosen = a correct solution, rejected = the model's own wrong answer) as JSONL.

    Args:
        output: JSONL file to write (its settings and counts go to ``<output>.meta.json``).
        adapter: Folder written by ``ftframe fit`` to sample from (base + adapter); omit to sample from ``model``.
        model: Base model (asset name, folder, .gguf, hub id); default: the base recorded in the adapter.
        data: Questions with reference solutions ending in a checkable answer (``gsm8k``, or JSONL / CSV / Parquet).
        split: ``train``: the records ``InstructionDataModule(val_size, seed=split_seed)`` trains on, so that the
            held-out ones stay unseen; ``val``: the held-out ones; ``all``.
        val_size: The held-out size of that split (the quickstart holds out 64).
        split_seed: The seed of that split.
        limit: Use at most this many questions (the first of the split); ``None``: all.
        samples: Answers sampled per question.
        pairs_per_question: Pairs kept per question at most (each with a different wrong answer).
        chosen: ``sampled``: a sampled correct answer where one exists (on-policy), else the reference solution;
            ``reference``: always the reference solution.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling threshold.
        max_new_tokens: Maximum tokens per sampled answer.
        batch_size: Questions per generation batch (``batch_size x samples`` sequences at once).
        prompt_field: The question field.
        reference_field: The reference solution field.
        answer_pattern: Regular expression whose first group is the final answer (GSM8K's ``#### 42``).
        dtype: dtype to load the model in; ``auto``: float32 on a CPU.
        seed: Random seed of the sampling and of which wrong answers are kept.
    """
    from ftframe.evaluation.generation import extract_answer, load_generation_records
    from ftframe.progress import bar as progress_bar
    from ftframe.tools.generate import Generator

    if samples < 1 or pairs_per_question < 1 or batch_size < 1:
        raise UserError("samples, pairs_per_question and batch_size must be >= 1")
    if temperature <= 0:
        raise UserError(f"temperature must be > 0 (the answers are sampled), got {temperature}")
    records = load_generation_records(data, prompt_field, reference_field, split, val_size, split_seed, limit)
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = Generator(adapter=adapter, model=model, dtype=dtype)
    tok = gen.tokenizer
    add_special = not getattr(tok, "chat_template", None)
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}.tmp")
    counts = {"questions": 0, "pairs": 0, "questions_all_correct": 0, "questions_all_wrong": 0,
              "chosen_sampled": 0, "chosen_reference": 0, "samples_correct": 0, "samples": 0}
    bar = progress_bar(total=len(records), desc="[ftframe] sampling answers", unit=" question")
    with open(tmp, "w", encoding="utf-8") as f, torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            enc = tok([gen.prompt_text(r.prompt) for r in batch], return_tensors="pt", padding=True,
                      add_special_tokens=add_special)
            generated = gen.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                                           temperature=temperature, top_p=top_p, num_return_sequences=samples,
                                           pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, r in enumerate(batch):
                gold = extract_answer(r.reference, answer_pattern)
                if gold is None:
                    raise UserError(f"record {r.id}: its reference solution has no final answer matching "
                                    f"{answer_pattern!r}")
                answers = texts[i * samples:(i + 1) * samples]
                right = sum(extract_answer(a, answer_pattern) == gold for a in answers)
                counts["questions"] += 1
                counts["samples"] += len(answers)
                counts["samples_correct"] += right
                counts["questions_all_correct"] += right == len(answers)
                counts["questions_all_wrong"] += right == 0
                for pair in pick_pairs(answers, r.reference, gold, chosen, pairs_per_question, rng, answer_pattern):
                    f.write(json.dumps({"id": f"{r.id}-{counts['pairs']}", "prompt": r.prompt, **pair,
                                        "gold": gold}, ensure_ascii=False) + "\n")
                    counts["pairs"] += 1
                    counts[f"chosen_{pair['chosen_source']}"] += 1
            bar.update(len(batch))
            bar.set_postfix(pairs=counts["pairs"])
    bar.close()
    os.replace(tmp, out_path)
    meta = {"output": str(out_path), "adapter": adapter, "model": model or None, "data": data, "split": split,
            "val_size": val_size, "split_seed": split_seed, "limit": limit, "samples": samples,
            "pairs_per_question": pairs_per_question, "chosen": chosen, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": max_new_tokens, "answer_pattern": answer_pattern, "seed": seed, "dtype": str(gen.dtype),
            "counts": counts, "sample_accuracy": counts["samples_correct"] / max(counts["samples"], 1),
            "seconds": round(time.perf_counter() - started, 1)}
    Path(f"{out_path}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[ftframe] {counts['pairs']} pairs from {counts['questions']} questions written to {out_path} "
          f"(sampled answers correct: {meta['sample_accuracy']:.1%}; chosen sampled {counts['chosen_sampled']}, "
          f"reference {counts['chosen_reference']}; {counts['questions_all_correct']} questions had no wrong answer) "
          f"in {meta['seconds']:.0f} s; settings in {out_path}.meta.json", flush=True)
    return meta
