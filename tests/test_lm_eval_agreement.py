"""ftframe's multiple-choice scores agree with EleutherAI's lm-evaluation-harness on the real default model.

Both score the same 100 questions of every benchmark (MMLU's spread over its subjects) offline: lm-eval runs its
``hf`` backend on the converted SmolLM2 folder with a task YAML (written by ``ftframe.evaluation.harness``) pointing
at a local JSONL -- for the named benchmarks, lm-eval's own task YAML included with only the data redirected.
"""

from __future__ import annotations

import pytest

from tests.helpers import ROOT, real_assets_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not real_assets_available(), reason="run `ftframe download` first (CI does)"),
]

MODEL = "smollm2-135m-instruct"
N = 100


def run_lm_eval(task_dir, task: str, folder: str, batch_size: int = 8):
    """lm-eval's own API on a local folder: per-question log-likelihoods and its acc / acc_norm."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=folder, dtype="float32", batch_size=batch_size, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, num_fewshot=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return lls, out["results"][task]


# the letter format is MMLU's benchmark prompt: test_every_benchmark_scores_as_lm_eval_defines_it[mmlu] checks it;
# the YAML format is lm-eval's mmlu_continuation prompt as data, exported to lm-eval as Jinja
@pytest.mark.parametrize("fmt", ["continuation", "configs/prompts/mmlu_continuation.yaml"])
def test_same_predictions_and_accuracy_as_lm_eval(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ftframe.evaluation import (
        load_questions,
        resolve_prompt_format,
        sample_evenly,
        score_multiple_choice,
        summarize,
    )
    from ftframe.evaluation.harness import write_lm_eval_task, write_questions
    from ftframe.models import resolve_model
    from ftframe.tools.generate import Generator

    questions = sample_evenly(load_questions("mmlu"), N)
    assert len({q.subject for q in questions}) >= 50
    if fmt.endswith(".yaml"):
        fmt = resolve_prompt_format(str(ROOT / fmt))
    task = write_lm_eval_task(tmp_path, fmt, write_questions(questions, tmp_path / "questions.jsonl"))
    theirs, their_metrics = run_lm_eval(tmp_path, task, resolve_model(MODEL))

    loaded = Generator(model=MODEL, dtype="float32")
    result = score_multiple_choice(loaded.model, loaded.tokenizer, questions, fmt, batch_size=8, progress=False)
    ours = summarize(result.records)
    assert len(theirs) == len(result.records) == N
    for q, rec, their_lls in zip(questions, result.records, theirs, strict=True):
        their_pred = max(range(len(their_lls)), key=lambda i: their_lls[i])
        assert rec["pred"] == their_pred, (q.id, rec["loglikelihoods"], their_lls)
        assert rec["loglikelihoods"] == pytest.approx(their_lls, abs=1e-2)
    assert abs(ours["acc"] - their_metrics["acc,none"]) <= 0.005
    assert abs(ours["acc_norm"] - their_metrics["acc_norm,none"]) <= 0.005


#: every benchmark of ftframe/evaluation/benchmarks.yaml
BENCHMARKS = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "boolq", "openbookqa", "mmlu",
              "truthfulqa_mc1", "truthfulqa_mc2"]


def _truthfulqa_shaped(n: int) -> list[dict]:
    """TruthfulQA is on no reachable package index: its two definitions are checked on real questions put in its
    record shape -- MMLU questions, the right answer first in ``mc1_targets`` and, for MC2's several true answers,
    the first two choices marked true in ``mc2_targets``."""
    from ftframe.evaluation.benchmarks import load_docs

    docs = []
    for _, d in load_docs("mmlu", sample=n):
        gold = d["choices"][d["label"]]
        rest = [c for i, c in enumerate(d["choices"]) if i != d["label"]]
        docs.append({"question": d["question"], "mc1_targets": {"choices": [gold, *rest], "labels": [1, 0, 0, 0]},
                     "mc2_targets": {"choices": [gold, *rest], "labels": [1, 1, 0, 0]}})
    return docs


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_scores_as_lm_eval_defines_it(name, tmp_path, monkeypatch):
    """lm-eval runs its own task YAML (included, data redirected to the same local records) against ftframe's
    data definition of the benchmark: same choice per question, log-likelihoods within 0.01, metrics within 0.5."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ftframe.evaluation import score_multiple_choice
    from ftframe.evaluation.benchmarks import benchmark, load_docs, summarize_benchmark, to_question
    from ftframe.evaluation.harness import write_lm_eval_benchmark
    from ftframe.models import resolve_model
    from ftframe.tools.generate import Generator

    bench = benchmark(name)
    if name.startswith("truthfulqa"):
        docs = _truthfulqa_shaped(N)
    else:
        docs = [d for _, d in load_docs(name, limit=N, sample=N if name == "mmlu" else None)]
    questions = [to_question(bench, d, f"{name}[{i}]", i) for i, d in enumerate(docs)]
    assert len(questions) == N
    task = write_lm_eval_benchmark(tmp_path, name, docs)
    theirs, their_metrics = run_lm_eval(tmp_path, task, resolve_model(MODEL))

    loaded = Generator(model=MODEL, dtype="float32")
    result = score_multiple_choice(loaded.model, loaded.tokenizer, questions, "rendered", batch_size=8,
                                   progress=False)
    ours = summarize_benchmark(bench, result.records)
    assert len(theirs) == len(result.records) == N
    for q, rec, their_lls in zip(questions, result.records, theirs, strict=True):
        their_pred = max(range(len(their_lls)), key=lambda i: their_lls[i])
        assert rec["pred"] == their_pred, (q.id, rec["loglikelihoods"], their_lls)
        assert rec["loglikelihoods"] == pytest.approx(their_lls, abs=1e-2), q.id
    for metric in bench.metrics:
        theirs_value = their_metrics[f"{'acc' if metric == 'mc2' else metric},none"]
        assert abs(ours[metric] - theirs_value) <= 0.005, (metric, ours[metric], theirs_value)
    if name == "truthfulqa_mc2":  # a probability mass, not a 0/1 accuracy: the test would be weak otherwise
        assert 0 < ours["mc2"] < 1 and len({round(r["mc2"], 3) for r in result.records}) > 10
