"""Named multiple-choice benchmarks and suites of them, defined as data.

``benchmarks.yaml`` (next to this file) says, per benchmark, how a raw record of its data becomes an
:class:`~ftframe.evaluation.multiple_choice.MCQuestion` -- the prompt, the choices and the gold answer as Jinja
templates over the record's fields, exactly as lm-evaluation-harness 0.4.13 writes its task YAMLs -- plus the
metrics it reports. Scoring is the one multiple-choice path of :mod:`ftframe.evaluation.multiple_choice` (the
``rendered`` prompt format); partial scoring (Winogrande) and MC2 (TruthfulQA) are fields of the question, not
code paths.

A *suite* is a YAML list of benchmarks with per-benchmark options (``limit``, ``k_shot``, ``data``); ``standard``
ships in ``suites/``. :func:`run_suite` scores a loaded model on every benchmark of a suite.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftframe.errors import UserError
from ftframe.evaluation.multiple_choice import MCQuestion, sample_evenly

__all__ = ["BENCHMARKS_FILE", "Benchmark", "BenchmarkRun", "Suite", "benchmark", "benchmark_names",
           "load_benchmark", "load_docs", "load_suite", "render_doc"]

HERE = Path(__file__).parent
BENCHMARKS_FILE = HERE / "benchmarks.yaml"
SUITES = HERE / "suites"
_FIELDS = {"title", "lm_eval", "data", "split", "description", "doc_to_text", "doc_to_choice", "doc_to_target",
           "doc_to_label", "doc_to_labels", "id", "subject", "scoring", "metrics", "primary", "few_shot", "include"}
METRICS = ("acc", "acc_norm", "mc2")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark definition (a ``benchmarks.yaml`` entry, ``include`` resolved)."""

    name: str
    title: str
    lm_eval: str
    data: str | None
    split: str
    doc_to_choice: str
    doc_to_target: str
    metrics: tuple[str, ...]
    primary: str
    doc_to_text: str = ""
    description: str = ""
    doc_to_label: str = ""
    doc_to_labels: str = ""
    id: str = ""
    subject: str = ""
    scoring: str = "choice"
    few_shot: str = "the evaluated split"


@functools.cache
def _definitions() -> dict[str, Benchmark]:
    import yaml

    raw = yaml.safe_load(BENCHMARKS_FILE.read_text(encoding="utf-8"))
    out: dict[str, Benchmark] = {}

    def resolve(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
        entry = dict(raw[name])
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise UserError(f"{BENCHMARKS_FILE}: {name}: unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
        parent = entry.pop("include", None)
        if parent:
            if parent in seen or parent not in raw:
                raise UserError(f"{BENCHMARKS_FILE}: {name}: include {parent!r} is not another benchmark")
            entry = {**resolve(parent, (*seen, name)), **entry}
        return entry

    for name in raw:
        entry = resolve(name)
        entry["metrics"] = tuple(entry["metrics"])
        out[name] = Benchmark(name=name, **entry)
    return out


def benchmark_names() -> list[str]:
    """The names ``benchmarks.yaml`` defines."""
    return list(_definitions())


def benchmark(name: str) -> Benchmark:
    """The definition of ``name``; an unknown name lists the known ones."""
    defs = _definitions()
    if name not in defs:
        import difflib

        close = difflib.get_close_matches(name, defs, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown benchmark {name!r}{hint}; known benchmarks: {', '.join(defs)}")
    return defs[name]


# ------------------------------------------------------------------------------------------------------ templates
@functools.cache
def _environment() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda text, pattern, repl="": re.sub(pattern, repl, str(text))
    return env


@functools.cache
def _template(source: str) -> Any:
    return _environment().from_string(source)


def render_doc(source: str, doc: dict[str, Any]) -> Any:
    """Render one template over a record; a result that reads as a Python literal (a list, a number) is that value.

    A bare field name (no ``{{``) is the field itself, as in lm-eval.
    """
    if "{" not in source and source in doc:
        return doc[source]
    text = _template(source).render(**doc)
    if text[:1] in "[(0123456789-" :
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    return text


def _gold(value: Any, choices: Sequence[str], where: str) -> int:
    if isinstance(value, str):
        value = value.strip()
        if value.lstrip("-").isdigit():
            value = int(value)
        elif value in choices:
            value = list(choices).index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
        raise UserError(f"{where}: the gold answer {value!r} is not a choice index 0..{len(choices) - 1}")
    return value


def to_question(bench: Benchmark, doc: dict[str, Any], where: str, number: int) -> MCQuestion:
    """One raw record as a question of ``bench``; a record the templates cannot render is an error naming ``where``.

    ``number`` (the record's line) makes the id of a benchmark whose records carry none.
    """
    from jinja2 import TemplateError

    try:
        choices = render_doc(bench.doc_to_choice, doc)
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: doc_to_choice gave {choices!r}, not a list of at least 2 strings")
        if bench.scoring == "partial":
            continuation = str(render_doc(bench.doc_to_target, doc))
            label = _gold(render_doc(bench.doc_to_label, doc), choices, where)
            question = ""
        else:
            continuation = None
            label = _gold(render_doc(bench.doc_to_target, doc), choices, where)
            question = str(render_doc(bench.doc_to_text, doc))
        true_labels = None
        if bench.doc_to_labels:
            true_labels = tuple(int(x) for x in render_doc(bench.doc_to_labels, doc))
            if len(true_labels) != len(choices):
                raise UserError(f"{where}: doc_to_labels gave {len(true_labels)} labels for {len(choices)} choices")
        description = str(render_doc(bench.description, doc)) if bench.description else ""
        qid = str(render_doc(bench.id, doc)) if bench.id else f"{bench.name}-{number}"
        subject = str(render_doc(bench.subject, doc)) if bench.subject else None
    except (TemplateError, KeyError, AttributeError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{where}: the record does not fit benchmark {bench.name!r} "
                        f"({type(e).__name__}: {e}); is this the benchmark's data?") from None
    return MCQuestion(id=qid, question=description + question, choices=tuple(choices), label=label, subject=subject,
                      continuation=continuation, true_labels=true_labels)


def data_path(bench: Benchmark, data: str | None = None) -> Path:
    """The JSONL a benchmark reads: ``data`` if given, else its asset file (an error names ``ftframe download``)."""
    from ftframe import assets

    source = data or bench.data
    if not source:
        raise UserError(f"benchmark {bench.name!r} has no offline data ({bench.title} is on no package index this "
                        "machine can reach); give its records as a JSONL file with `data:` in the suite")
    head, _, rest = source.partition("/")
    if assets.is_asset(head):
        base = assets.asset_path(head)  # raises with the `ftframe download --names ...` command
        return base / rest if rest else base
    path = Path(source)
    if not path.is_file():
        raise UserError(f"benchmark {bench.name!r}: data file {path} does not exist")
    return path


def load_docs(name: str, data: str | None = None, limit: int | None = None,
              sample: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The raw records of benchmark ``name`` with where each is (``file:line``): the first ``limit``, or ``sample``
    spread evenly through the file (``min(sample, limit)`` when both are given)."""
    bench = benchmark(name)
    path = data_path(bench, data)
    docs: list[tuple[str, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(doc, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(doc).__name__}")
            docs.append((f"{path}:{n}", doc))
            if limit is not None and sample is None and len(docs) >= limit:
                break
    if not docs:
        raise UserError(f"{path}: no records for benchmark {name!r}")
    if sample is not None:  # a lower limit samples fewer, still spread over the whole file
        docs = sample_evenly(docs, min(sample, limit) if limit is not None else sample)  # type: ignore[arg-type]
    return docs


def load_benchmark(name: str, data: str | None = None, limit: int | None = None,
                   sample: int | None = None) -> list[MCQuestion]:
    """The questions of benchmark ``name`` (its asset, or ``data``): the first ``limit``, or ``sample`` spread evenly."""
    bench = benchmark(name)
    return [to_question(bench, doc, where, int(where.rsplit(":", 1)[1]))
            for where, doc in load_docs(name, data=data, limit=limit, sample=sample)]


# ------------------------------------------------------------------------------------------------------ suites
@dataclass
class BenchmarkRun:
    """One benchmark of a suite with its options."""

    name: str
    limit: int | None = None
    sample: int | None = None
    k_shot: int = 0
    seed: int = 1234
    data: str | None = None
    where: str = ""


@dataclass
class Suite:
    name: str
    runs: list[BenchmarkRun] = field(default_factory=list)
    batch_size: int = 8
    source: str = ""


_RUN_KEYS = {"name", "limit", "sample", "k_shot", "seed", "data"}
_SUITE_KEYS = {"benchmarks", "limit", "sample", "k_shot", "seed", "batch_size"}


def _int_option(value: Any, where: str, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def load_suite(suite: str) -> Suite:
    """A suite by name (``standard``: ``suites/standard.yaml``) or YAML path; errors name the file, line and key."""
    import yaml

    path = SUITES / f"{suite}.yaml" if "/" not in suite and not suite.endswith((".yaml", ".yml")) else Path(suite)
    if not path.is_file():
        known = sorted(p.stem for p in SUITES.glob("*.yaml"))
        raise UserError(f"--suite {suite}: no such suite file; give a YAML path or one of: {', '.join(known)}")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise UserError(f"--suite {path}: not valid YAML: {e}") from None
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}: expected a mapping with a `benchmarks:` list")
    defaults: dict[str, Any] = {}
    entries: list[tuple[Any, str]] = []
    batch_size = 8
    for key_node, value_node in root.value:
        key, where = str(key_node.value), f"{path}:{key_node.start_mark.line + 1}"
        if key not in _SUITE_KEYS:
            raise UserError(f"{where}: unknown key {key!r}; a suite takes {sorted(_SUITE_KEYS)}")
        value = yaml.safe_load(yaml.serialize(value_node))
        if key == "benchmarks":
            if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                raise UserError(f"{where}: benchmarks must be a non-empty list of names or {{name: ..., limit: ...}}")
            entries = [(yaml.safe_load(yaml.serialize(n)), f"{path}:{n.start_mark.line + 1}") for n in value_node.value]
        elif key == "batch_size":
            batch_size = _int_option(value, where, key, 1)
        else:
            defaults[key] = (value, where)
    if not entries:
        raise UserError(f"{path}: no `benchmarks:` list")
    runs = []
    for entry, where in entries:
        spec = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(spec, dict) or "name" not in spec:
            raise UserError(f"{where}: a benchmark is a name or {{name: ..., limit: ...}}, got {entry!r}")
        unknown = sorted(set(spec) - _RUN_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {unknown} for benchmark {spec['name']!r}; a benchmark takes "
                            f"{sorted(_RUN_KEYS)}")
        try:
            benchmark(str(spec["name"]))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        run = BenchmarkRun(name=str(spec["name"]), where=where)
        for key in ("limit", "sample", "k_shot", "seed"):
            value, at = (spec[key], where) if key in spec else defaults.get(key, (getattr(run, key), where))
            if value is not None:
                setattr(run, key, _int_option(value, at, key, 0 if key in ("k_shot", "seed") else 1))
        if spec.get("data") is not None:
            run.data = str(spec["data"])
        runs.append(run)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: a benchmark appears twice: {sorted({n for n in names if names.count(n) > 1})}")
    return Suite(name=path.stem, runs=runs, batch_size=batch_size, source=str(path))


def suite_questions(suite: Suite, limit: int | None = None) -> dict[str, list[MCQuestion]]:
    """Every benchmark's questions, read and checked before any model is loaded; ``limit`` overrides the suite's."""
    return {r.name: load_benchmark(r.name, data=r.data, limit=limit or r.limit, sample=r.sample) for r in suite.runs}


def run_suite(model: Any, tokenizer: Any, suite: Suite, questions: dict[str, list[MCQuestion]],
              batch_size: int | None = None, progress: bool = True,
              on_result: Callable[[str, dict[str, Any], list[dict[str, Any]]], None] | None = None,
              ) -> dict[str, dict[str, Any]]:
    """Score every benchmark of ``suite``: name -> summary (``summarize``'s, plus ``mc2``, ``primary``, timing)."""
    import time

    from ftframe.evaluation.multiple_choice import score_multiple_choice

    results: dict[str, dict[str, Any]] = {}
    for run in suite.runs:
        bench = benchmark(run.name)
        qs = questions[run.name]
        started = time.perf_counter()
        scored = score_multiple_choice(model, tokenizer, qs, "rendered", k_shot=run.k_shot, seed=run.seed,
                                       batch_size=batch_size or suite.batch_size, overflow="truncate",
                                       progress=progress)
        seconds = time.perf_counter() - started
        summary = summarize_benchmark(bench, scored.records)
        summary.update(seconds=seconds, k_shot=run.k_shot, truncated=scored.truncated, split=bench.split,
                       title=bench.title, lm_eval=bench.lm_eval)
        results[run.name] = summary
        if on_result is not None:
            on_result(run.name, summary, scored.records)
    return results


def summarize_benchmark(bench: Benchmark, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``summarize`` plus MC2 where defined; ``primary`` / ``primary_stderr`` name the headline metric."""
    import math

    from ftframe.evaluation.multiple_choice import summarize

    out = summarize(records)
    if "mc2" in bench.metrics:
        values = [r["mc2"] for r in records]
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
        out["mc2"], out["mc2_stderr"] = mean, math.sqrt(var / n) if n > 1 else float("nan")
    out["metrics"] = list(bench.metrics)
    out["primary_metric"] = bench.primary
    out["primary"], out["primary_stderr"] = out[bench.primary], out[f"{bench.primary}_stderr"]
    return out
