"""Scorecards: one model's results on a suite of benchmarks, and two scorecards side by side.

A scorecard folder holds ``scorecard.json`` (everything), ``scorecard.md`` (the table, then each benchmark's error
analysis), ``scorecard.png`` (a bar chart of the headline metrics with their standard errors) and
``records/<benchmark>.jsonl`` (every question's scores, which :func:`compare` pairs question by question).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ftframe.errors import UserError

__all__ = ["compare", "write_scorecard"]


def _pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{100 * v:.2f}"


def scorecard_markdown(card: dict[str, Any]) -> str:
    what = card.get("adapter") or card.get("model") or "base"
    lines = [f"## Scorecard: {what}\n",
             f"suite `{card['suite']}`, dtype {card.get('dtype')}, {card['questions']} questions in "
             f"{card['seconds']:.0f} s ({card['questions'] / max(card['seconds'], 1e-9):.1f} questions/s)\n",
             "| benchmark | split | n | metric | score ± SE | acc | acc_norm | seconds |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for r in card["benchmarks"].values():
        lines.append(f"| {r['title']} | {r['split']} | {r['n']} | {r['primary_metric']} | {_pct(r['primary'])} ± "
                     f"{_pct(r['primary_stderr'])} | {_pct(r['acc'])} | {_pct(r['acc_norm'])} | {r['seconds']:.0f} |")
    mean = card.get("mean_primary")
    if mean is not None:
        lines.append(f"| **mean** | | | | **{_pct(mean)}** | | | |")
    lines.append("\nScores in %; SE: the standard error of the mean over questions. Each benchmark is scored as "
                 "lm-evaluation-harness 0.4.13 defines it (ftframe/evaluation/benchmarks.yaml), zero-shot unless "
                 "k_shot says otherwise.\n")
    return "\n".join(lines)


def _bar_chart(labels: list[str], series: list[tuple[str, list[float], list[float]]], path: Path,
               title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4))
    width = 0.8 / len(series)
    for k, (name, values, errors) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [100 * v for v in values], width, yerr=[100 * e for e in errors], capsize=3, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_scorecard(out: Path, card: dict[str, Any], analyses: dict[str, str]) -> None:
    """Write ``scorecard.json`` / ``.md`` / ``.png`` for ``card`` (``benchmarks``: name -> summary) into ``out``."""
    scores = [r["primary"] for r in card["benchmarks"].values()]
    card["mean_primary"] = sum(scores) / len(scores) if scores else None
    (out / "scorecard.json").write_text(json.dumps(card, indent=2) + "\n")
    md = scorecard_markdown(card) + "\n" + "\n".join(analyses[n] for n in card["benchmarks"] if n in analyses)
    (out / "scorecard.md").write_text(md)
    names = list(card["benchmarks"])
    _bar_chart([card["benchmarks"][n]["title"] for n in names],
               [(card.get("adapter") or card.get("model") or "base",
                 [card["benchmarks"][n]["primary"] for n in names],
                 [card["benchmarks"][n]["primary_stderr"] for n in names])],
               out / "scorecard.png", f"suite {card['suite']}: headline metric per benchmark (± SE)")


def _load(folder: str) -> tuple[Path, dict[str, Any]]:
    path = Path(folder)
    file = path / "scorecard.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--compare {folder}: no scorecard.json there; write one with `ftframe evaluate --suite ...`")
    try:
        return file.parent, json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not a scorecard ({e.msg})") from None


def _records(folder: Path, name: str) -> dict[str, dict[str, Any]] | None:
    path = folder / "records" / f"{name}.jsonl"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f) if r}


def _value(record: dict[str, Any], metric: str) -> float:
    return float(record["mc2"] if metric == "mc2" else record["correct_norm" if metric == "acc_norm" else "correct"])


def compare(a: str, b: str, output: str | Path) -> dict[str, Any]:
    """Two scorecards side by side: B - A per benchmark with the standard error of the difference.

    Where both scored the same questions the difference is paired (SE of the per-question differences, which
    removes the questions' own difficulty from the noise); otherwise the two SEs are combined as independent. A
    difference within 1.96 SE (95 %) is reported as inside the noise.
    """
    fa, ca = _load(a)
    fb, cb = _load(b)
    common = [n for n in ca["benchmarks"] if n in cb["benchmarks"]]
    if not common:
        raise UserError(f"--compare: {a} and {b} share no benchmark")
    rows = []
    for name in common:
        ra, rb = ca["benchmarks"][name], cb["benchmarks"][name]
        metric = ra["primary_metric"]
        recs_a, recs_b = _records(fa, name), _records(fb, name)
        paired = recs_a is not None and recs_b is not None and set(recs_a) == set(recs_b)
        if paired:
            d = [_value(recs_b[i], metric) - _value(recs_a[i], metric) for i in recs_a]
            n = len(d)
            diff = sum(d) / n
            se = math.sqrt(sum((x - diff) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
        else:
            diff = rb["primary"] - ra["primary"]
            se = math.sqrt(ra["primary_stderr"] ** 2 + rb["primary_stderr"] ** 2)
        z = diff / se if se and se == se else float("inf") if diff else 0.0
        rows.append({"benchmark": name, "title": ra["title"], "metric": metric, "n": ra["n"], "a": ra["primary"],
                     "a_stderr": ra["primary_stderr"], "b": rb["primary"], "b_stderr": rb["primary_stderr"],
                     "diff": diff, "diff_stderr": se, "paired": paired, "z": z,
                     "verdict": "inside the noise" if abs(z) < 1.96 else ("better" if diff > 0 else "worse")})
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    label_a = ca.get("adapter") or ca.get("model") or "base"
    label_b = cb.get("adapter") or cb.get("model") or "base"
    result = {"a": str(a), "b": str(b), "a_label": label_a, "b_label": label_b, "rows": rows}
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"## Comparison: B = {label_b} vs A = {label_a}\n",
             "| benchmark | metric | n | A | B | B − A ± SE | paired | verdict (95 %) |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['title']} | {r['metric']} | {r['n']} | {_pct(r['a'])} | {_pct(r['b'])} | "
                     f"{100 * r['diff']:+.2f} ± {_pct(r['diff_stderr'])} | {'yes' if r['paired'] else 'no'} | "
                     f"{r['verdict']} |")
    inside = [r["title"] for r in rows if r["verdict"] == "inside the noise"]
    lines.append(f"\n{len(rows) - len(inside)} of {len(rows)} differences lie outside 1.96 standard errors"
                 + (f"; inside the noise: {', '.join(inside)}." if inside else "."))
    md = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(md)
    _bar_chart([r["title"] for r in rows],
               [(f"A: {label_a}", [r["a"] for r in rows], [r["a_stderr"] for r in rows]),
                (f"B: {label_b}", [r["b"] for r in rows], [r["b_stderr"] for r in rows])],
               out / "comparison.png", "headline metric per benchmark (± SE)")
    print(md, flush=True)
    return result
