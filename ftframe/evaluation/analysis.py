"""Error analysis of one multiple-choice benchmark: where a model is right, where it is wrong, and what it leans on.

From the per-question records of :func:`~ftframe.evaluation.multiple_choice.score_multiple_choice` and the questions:

* accuracy per subject / category (MMLU subjects, HellaSwag activities), worst first;
* the most confident mistakes, with the question and every choice's log-likelihood and probability;
* answer-position bias: how often each position is chosen against how often it is right;
* length bias: accuracy by the correct choice's length quartile, and how often the longest choice is picked
  against how often it is right -- for ``acc`` and ``acc_norm`` (which divides by length) side by side;
* where ``acc`` and ``acc_norm`` disagree, which of the two is right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ftframe.evaluation.multiple_choice import LETTERS, MCQuestion

__all__ = ["analyze", "analysis_markdown"]


def _probs(lls: Sequence[float]) -> list[float]:
    top = max(lls)
    e = [math.exp(v - top) for v in lls]
    s = sum(e)
    return [v / s for v in e]


def _share(n: int, total: int) -> float:
    return n / total if total else float("nan")


def analyze(questions: Sequence[MCQuestion], records: Sequence[dict[str, Any]], mistakes: int = 5) -> dict[str, Any]:
    """The analysis as plain data (JSON-ready); ``records`` in the order of ``questions`` (ids are matched)."""
    by_id = {q.id: q for q in questions}
    pairs = [(by_id[r["id"]], r) for r in records if r["id"] in by_id]
    n = len(pairs)
    out: dict[str, Any] = {"n": n}
    if not n:
        return out

    # per subject
    groups: dict[str, list[dict[str, Any]]] = {}
    for q, r in pairs:
        if q.subject is not None:
            groups.setdefault(q.subject, []).append(r)
    if len(groups) > 1:
        out["subjects"] = sorted(
            ({"subject": s, "n": len(rs), "acc": _share(sum(r["correct"] for r in rs), len(rs)),
              "acc_norm": _share(sum(r["correct_norm"] for r in rs), len(rs))} for s, rs in groups.items()),
            key=lambda d: (d["acc"], -d["n"]))

    # most confident mistakes
    wrong = []
    for q, r in pairs:
        if r["correct"]:
            continue
        p = _probs(r["loglikelihoods"])
        wrong.append({"id": q.id, "question": q.question if q.continuation is None else q.continuation,
                      "partial": q.continuation is not None, "subject": q.subject, "gold": r["gold"],
                      "pred": r["pred"], "confidence": p[r["pred"]],
                      "choices": [{"text": c, "loglikelihood": ll, "prob": pr}
                                  for c, ll, pr in zip(q.choices, r["loglikelihoods"], p, strict=True)]})
    out["confident_mistakes"] = sorted(wrong, key=lambda w: -w["confidence"])[:mistakes]

    # answer position
    width = max(len(q.choices) for q, _ in pairs)
    positions = []
    for i in range(width):
        offered = [(q, r) for q, r in pairs if len(q.choices) > i]
        gold_here = [r for q, r in offered if r["gold"] == i]
        positions.append({
            "position": LETTERS[i], "offered": len(offered),
            "chosen": _share(sum(r["pred"] == i for _, r in offered), len(offered)),
            "chosen_norm": _share(sum(r["pred_norm"] == i for _, r in offered), len(offered)),
            "correct": _share(len(gold_here), len(offered)),
            "acc_when_correct_here": _share(sum(r["correct"] for r in gold_here), len(gold_here)),
        })
    out["positions"] = positions

    # length: quartiles of the correct choice's length (characters), and the longest choice
    lengths = sorted(len(q.choices[r["gold"]]) for q, r in pairs)
    cuts = [lengths[max(math.ceil(k * n / 4) - 1, 0)] for k in (1, 2, 3)]  # upper ends of Q1..Q3

    def quartile(length: int) -> int:
        return sum(length > c for c in cuts)

    quarts: list[list[dict[str, Any]]] = [[], [], [], []]
    for q, r in pairs:
        quarts[quartile(len(q.choices[r["gold"]]))].append(r)
    bounds = [lengths[0] - 1, *cuts, lengths[-1]]
    out["length_quartiles"] = [
        {"quartile": k + 1, "chars": f"{bounds[k] + 1}-{bounds[k + 1]}", "n": len(rs),
         "acc": _share(sum(r["correct"] for r in rs), len(rs)),
         "acc_norm": _share(sum(r["correct_norm"] for r in rs), len(rs))}
        for k, rs in enumerate(quarts) if rs]
    varied = [(q, r) for q, r in pairs if len({len(c) for c in q.choices}) > 1]
    if varied:
        def longest(q: MCQuestion) -> int:
            return max(range(len(q.choices)), key=lambda i: len(q.choices[i]))

        out["longest_choice"] = {
            "questions": len(varied),
            "is_correct": _share(sum(longest(q) == r["gold"] for q, r in varied), len(varied)),
            "chosen_acc": _share(sum(longest(q) == r["pred"] for q, r in varied), len(varied)),
            "chosen_acc_norm": _share(sum(longest(q) == r["pred_norm"] for q, r in varied), len(varied)),
        }

    # acc vs acc_norm
    differ = [r for _, r in pairs if r["pred"] != r["pred_norm"]]
    out["acc_vs_acc_norm"] = {"disagree": len(differ), "acc_right": sum(r["correct"] for r in differ),
                              "acc_norm_right": sum(r["correct_norm"] for r in differ),
                              "acc": _share(sum(r["correct"] for _, r in pairs), n),
                              "acc_norm": _share(sum(r["correct_norm"] for _, r in pairs), n)}
    return out


def _pct(v: float) -> str:
    return "–" if v != v else f"{100 * v:.1f}"


def _clip(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def analysis_markdown(title: str, a: dict[str, Any], subjects: int = 10) -> str:
    """The analysis as a Markdown section."""
    lines = [f"### {title}: error analysis ({a['n']} questions)\n"]
    if not a["n"]:
        return lines[0]
    if "subjects" in a:
        shown = a["subjects"][:subjects]
        lines += [f"**Per subject** (the {len(shown)} weakest of {len(a['subjects'])}):\n",
                  "| subject | n | acc | acc_norm |", "|---|---:|---:|---:|"]
        lines += [f"| {s['subject']} | {s['n']} | {_pct(s['acc'])} | {_pct(s['acc_norm'])} |" for s in shown]
        lines.append("")
    lines += ["**Answer position** (share of questions; a model without bias picks each position as often as it is "
              "right):\n", "| position | offered | chosen (acc) | chosen (acc_norm) | correct | acc when correct here |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['position']} | {p['offered']} | {_pct(p['chosen'])} | {_pct(p['chosen_norm'])} | "
              f"{_pct(p['correct'])} | {_pct(p['acc_when_correct_here'])} |" for p in a["positions"]]
    lines += ["", "**Length** (quartiles of the correct choice's length in characters):\n",
              "| quartile | chars | n | acc | acc_norm |", "|---|---|---:|---:|---:|"]
    lines += [f"| Q{q['quartile']} | {q['chars']} | {q['n']} | {_pct(q['acc'])} | {_pct(q['acc_norm'])} |"
              for q in a["length_quartiles"]]
    if "longest_choice" in a:
        lc = a["longest_choice"]
        lines += ["", f"The longest choice is correct in {_pct(lc['is_correct'])} % of {lc['questions']} questions "
                      f"with choices of different lengths; `acc` picks it in {_pct(lc['chosen_acc'])} %, `acc_norm` in "
                      f"{_pct(lc['chosen_acc_norm'])} %."]
    d = a["acc_vs_acc_norm"]
    lines += ["", f"`acc` {_pct(d['acc'])} % vs `acc_norm` {_pct(d['acc_norm'])} %: they pick different choices on "
                  f"{d['disagree']} questions; there `acc` is right {d['acc_right']} times, `acc_norm` "
                  f"{d['acc_norm_right']} times."]
    if a["confident_mistakes"]:
        lines += ["", "**Most confident mistakes:**", ""]
        for w in a["confident_mistakes"]:
            head = "(each choice fills the blank of:) " if w["partial"] else ""
            subject = f" ({w['subject']})" if w["subject"] else ""
            lines.append(f"- `{w['id']}`{subject}: {head}{_clip(w['question'])}")
            for i, c in enumerate(w["choices"]):
                mark = " ✔ gold" if i == w["gold"] else (" ✘ picked" if i == w["pred"] else "")
                lines.append(f"    - {LETTERS[i]}. {_clip(c['text'], 160)} — log-lik {c['loglikelihood']:.2f}, "
                             f"p {c['prob']:.2f}{mark}")
    return "\n".join(lines) + "\n"
