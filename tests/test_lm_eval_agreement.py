"""ftframe's multiple-choice scores agree with EleutherAI's lm-evaluation-harness on the real default model.

Both score the same 100 MMLU test questions (spread over the file, so over the subjects) with the same prompt,
offline: lm-eval runs its ``hf`` backend on the converted SmolLM2 folder with a task YAML (written by
``ftframe.evaluation.harness``) pointing at a local JSONL.
"""

from __future__ import annotations

import pytest

from tests.helpers import real_assets_available

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


@pytest.mark.parametrize("fmt", ["letter", "continuation"])
def test_same_predictions_and_accuracy_as_lm_eval(fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ftframe.evaluation import load_questions, sample_evenly, score_multiple_choice, summarize
    from ftframe.evaluation.harness import write_lm_eval_task, write_questions
    from ftframe.models import resolve_model
    from ftframe.tools.generate import Generator

    questions = sample_evenly(load_questions("mmlu"), N)
    assert len({q.subject for q in questions}) >= 50
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
