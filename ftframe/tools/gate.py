"""The evaluation gate of ``ftframe merge`` and ``ftframe export``: measure before writing, refuse a degraded model.

A gate file is YAML: ``on_fail`` (``refuse``: write nothing and exit with an error; ``mark``: write the output and
record the failure in its report) and a list of ``evaluations``, each the options of ``ftframe evaluate`` (task, data,
split, limit, ...) plus ``metric`` (a key of that task's results, default: the task's headline metric) and
``max_drop``: how much worse the metric may get than on the unmerged model. For metrics where higher is better
(accuracy, exact match) the drop is in the metric's own units (0.02 = two points of accuracy); for loss-like metrics
(loss, perplexity, bits per byte) it is relative (0.02 = 2 % higher). Example::

    on_fail: refuse
    evaluations:
      - task: loss            # response NLL on the 64 held-out GSM8K examples, as training measures it
        data: gsm8k
        split: val
        max_drop: 0.01
      - task: multiple_choice
        data: mmlu
        sample: 200
        max_drop: 0.02
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftframe.errors import UserError

__all__ = ["EvalGate", "GateResult", "HIGHER_IS_BETTER", "LOWER_IS_BETTER"]

HIGHER_IS_BETTER = ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible")
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")
#: the metric an evaluation is judged by when its entry names none
HEADLINE = {"multiple_choice": "acc", "generation": "exact_match_flexible", "perplexity": "perplexity", "loss": "loss"}


@dataclass
class GateResult:
    """Scores of the candidate and the reference(s) per evaluation, and whether every drop is within its budget."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    on_fail: str = "refuse"

    @property
    def passed(self) -> bool:
        return all(r["passed"] for r in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "on_fail": self.on_fail, "evaluations": self.rows}

    def markdown(self) -> str:
        lines = ["| evaluation | metric | reference | candidate | change | allowed | result |",
                 "|---|---|---:|---:|---:|---:|---|"]
        for r in self.rows:
            refs = ", ".join(f"{name} {value:.4f}" for name, value in r["references"].items())
            change = (f"{r['drop']:+.4f}" if r["relative"] is False else f"{100 * r['drop']:+.2f} %")
            allowed = f"{r['max_drop']:.4f}" if r["relative"] is False else f"{100 * r['max_drop']:.2f} %"
            lines.append(f"| {r['name']} | {r['metric']} | {refs} | {r['candidate']:.4f} | worse by {change} | "
                         f"{allowed} | {'pass' if r['passed'] else 'FAIL'} |")
        verdict = "passed" if self.passed else "FAILED"
        return f"evaluation gate {verdict}:\n" + "\n".join(lines)


class EvalGate:
    """Evaluations with a budget per metric; build it with :meth:`from_file` (checks the file before slow work).

    Args:
        evaluations: ``ftframe evaluate`` options per evaluation, plus ``metric``, ``max_drop`` and optionally
            ``name`` and ``reference`` (which reference model to compare with, when there are several; default: the
            best of them).
        on_fail: ``refuse`` or ``mark``.
        source: Where the gate came from, for messages.
    """

    def __init__(self, evaluations: list[dict[str, Any]], on_fail: Literal["refuse", "mark"] = "refuse",
                 source: str = "gate") -> None:
        self.evaluations = evaluations
        self.on_fail = on_fail
        self.source = source
        self._items: list[Any] = [None] * len(evaluations)

    @classmethod
    def from_file(cls, path: str | Path) -> EvalGate:
        """Read and check a gate YAML; errors name the file, the entry and the key."""
        import yaml

        from ftframe.tools.evaluate import OPTIONS

        file = Path(path)
        if not file.is_file():
            raise UserError(f"--eval {path}: no such file; pass a YAML gate file (see docs/merge.md)")
        try:
            doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UserError(f"--eval {path}: not valid YAML ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("evaluations"), list) or not doc["evaluations"]:
            raise UserError(f"{path}: expected a mapping with a non-empty list 'evaluations' (and optionally "
                            "'on_fail: refuse|mark')")
        unknown = set(doc) - {"evaluations", "on_fail"}
        if unknown:
            raise UserError(f"{path}: unknown key(s) {sorted(unknown)}; a gate file has 'evaluations' and 'on_fail'")
        on_fail = doc.get("on_fail", "refuse")
        if on_fail not in ("refuse", "mark"):
            raise UserError(f"{path}: on_fail {on_fail!r} must be 'refuse' or 'mark'")
        allowed = set(OPTIONS) | {"metric", "max_drop", "name", "reference"}
        entries = []
        for i, entry in enumerate(doc["evaluations"]):
            at = f"{path}, evaluations[{i}]"
            if not isinstance(entry, dict):
                raise UserError(f"{at}: expected a mapping of ftframe evaluate options, got {entry!r}")
            for key in entry:
                if key not in allowed:
                    near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(allowed)}"
                    raise UserError(f"{at}: unknown key {key!r}{hint}")
            task = entry.get("task", "multiple_choice")
            if task not in HEADLINE:
                raise UserError(f"{at}: task {task!r} is not one of {sorted(HEADLINE)}")
            metric = entry.get("metric", HEADLINE[task])
            if metric not in HIGHER_IS_BETTER + LOWER_IS_BETTER:
                raise UserError(f"{at}: metric {metric!r} is not one of {sorted(HIGHER_IS_BETTER + LOWER_IS_BETTER)}")
            if "max_drop" not in entry:
                raise UserError(f"{at}: 'max_drop' is required: how much worse {metric} may get (units: "
                                f"{'relative, 0.02 = 2 %' if metric in LOWER_IS_BETTER else 'absolute, 0.02 = 2 points'})")
            max_drop = entry["max_drop"]
            if isinstance(max_drop, bool) or not isinstance(max_drop, int | float) or max_drop < 0:
                raise UserError(f"{at}: max_drop must be a number >= 0, got {max_drop!r}")
            name = entry.get("name") or f"{task} {entry.get('data', '')}".strip()
            entries.append({**entry, "task": task, "metric": metric, "max_drop": float(max_drop), "name": name})
        return cls(entries, on_fail=on_fail, source=str(path))

    def prepare(self, tokenizer: str | None) -> None:
        """Read every evaluation's data now (before the slow work), tokenizing with ``tokenizer`` where needed."""
        from ftframe.tools.evaluate import OPTIONS, load_items

        for i, entry in enumerate(self.evaluations):
            if self._items[i] is None:
                self._items[i] = load_items({k: v for k, v in entry.items() if k in OPTIONS}, tokenizer)

    def score(self, model: Any, tokenizer: Any, tokenizer_source: str | None = None) -> dict[str, float]:
        """Each evaluation's metric for one loaded model."""
        from ftframe.tools.evaluate import OPTIONS, score

        self.prepare(tokenizer_source or getattr(tokenizer, "name_or_path", None))
        out = {}
        for entry, items in zip(self.evaluations, self._items, strict=True):
            summary, _ = score(model, tokenizer, items, {k: v for k, v in entry.items() if k in OPTIONS})
            out[entry["name"]] = float(summary[entry["metric"]])
            print(f"[ftframe] gate: {entry['name']}: {entry['metric']} {out[entry['name']]:.4f}", flush=True)
        return out

    def compare(self, candidate: dict[str, float], references: dict[str, dict[str, float]]) -> GateResult:
        """Judge the candidate's scores against the reference scores (``{reference name: scores}``)."""
        rows = []
        for entry in self.evaluations:
            name, metric = entry["name"], entry["metric"]
            lower = metric in LOWER_IS_BETTER
            refs = {ref: scores[name] for ref, scores in references.items()}
            chosen = entry.get("reference")
            if chosen is not None and chosen not in refs:
                raise UserError(f"{self.source}: evaluation {name!r} names reference {chosen!r}; the references are "
                                f"{sorted(refs)}")
            base = refs[chosen] if chosen is not None else (min(refs.values()) if lower else max(refs.values()))
            new = candidate[name]
            drop = (new - base) / abs(base) if lower else base - new
            rows.append({"name": name, "metric": metric, "references": refs, "compared_with": base,
                         "candidate": new, "drop": drop, "relative": lower, "max_drop": entry["max_drop"],
                         "passed": drop <= entry["max_drop"] + 1e-12})
        return GateResult(rows, on_fail=self.on_fail)

    def check(self, candidate: tuple[Any, Any], reference: tuple[Any, Any] | dict[str, tuple[Any, Any]],
              tokenizer_source: str | None = None) -> GateResult:
        """Score ``candidate`` and the reference model(s), each a ``(model, tokenizer)`` pair, and compare."""
        refs = reference if isinstance(reference, dict) else {"unmerged": reference}
        ref_scores = {name: self.score(*pair, tokenizer_source=tokenizer_source) for name, pair in refs.items()}
        return self.compare(self.score(*candidate, tokenizer_source=tokenizer_source), ref_scores)
