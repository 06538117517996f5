"""Benchmarks as data, suites, scorecards, comparisons and error analysis -- on a tiny model and crafted records.

Agreement with lm-evaluation-harness on the real model and data is tests/test_lm_eval_agreement.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ftframe.cli import main
from ftframe.errors import UserError
from ftframe.evaluation import MCQuestion, score_multiple_choice
from ftframe.evaluation.analysis import analyze
from ftframe.evaluation.benchmarks import benchmark, benchmark_names, load_benchmark, load_suite, to_question
from ftframe.evaluation.multiple_choice import FORMATS, encode_pair, mc2_score
from ftframe.evaluation.scorecard import compare
from ftframe.models import load_model, load_tokenizer

ARC = {"id": "q1", "question": "Which is a planet?", "answerKey": "B",
       "choices": {"text": ["the Moon", "Mars", "the Sun"], "label": ["A", "B", "C"]}}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model, AutoModelForCausalLM).eval(), load_tokenizer(tiny_model)


def _naive(model, tok, context, continuation):
    ctx, cont = encode_pair(tok, context, continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


# ---------------------------------------------------------------------------------------------- definitions
def test_records_render_as_lm_eval_templates_do():
    q = to_question(benchmark("arc_easy"), ARC, "x:1", 1)
    assert (q.question, q.choices, q.label, q.id) == ("Question: Which is a planet?\nAnswer:",
                                                        ("the Moon", "Mars", "the Sun"), 1, "q1")
    hs = {"ind": 7, "activity_label": "Baking", "ctx_a": "A man [title] mixes flour.", "ctx_b": "then he",
          "endings": [" adds  eggs [step] .", "sleeps."], "label": "1"}
    q = to_question(benchmark("hellaswag"), hs, "x:2", 2)
    # lm-eval's preprocess: " [title]" -> ". ", [brackets] dropped, double spaces collapsed; ctx_b capitalized
    assert q.question == "Baking: A man. mixes flour. Then he" and q.choices == ("adds eggs .", "sleeps.")
    assert (q.label, q.subject, q.id) == (1, "Baking", "hellaswag-7")
    wg = {"sentence": "Ann gave Bo a gift because _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "2"}
    q = to_question(benchmark("winogrande"), wg, "x:3", 3)
    assert q.choices == ("Ann gave Bo a gift because Ann", "Ann gave Bo a gift because Bo")
    assert (q.continuation, q.label) == ("was kind.", 1)
    bq = {"passage": "Water is wet.", "question": "is water wet", "answer": True}
    q = to_question(benchmark("boolq"), bq, "x:4", 4)
    assert (q.question, q.choices, q.label) == ("Water is wet.\nQuestion: is water wet?\nAnswer:", ("no", "yes"), 1)
    tq = {"question": "Is the sky green?", "mc1_targets": {"choices": ["No", "Yes"], "labels": [1, 0]},
          "mc2_targets": {"choices": ["No", "Not at all", "Yes"], "labels": [1, 1, 0]}}
    mc2 = to_question(benchmark("truthfulqa_mc2"), tq, "x:5", 5)
    assert mc2.question.endswith("Olympics were held in Barcelona, Spain.\n\nQ: Is the sky green?\nA:")
    assert mc2.question.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert mc2.true_labels == (1, 1, 0) and mc2.choices == ("No", "Not at all", "Yes")


def test_a_record_that_does_not_fit_names_its_line(tmp_path):
    bad = tmp_path / "arc.jsonl"
    bad.write_text(json.dumps(ARC) + "\n" + json.dumps({**ARC, "answerKey": "Z"}) + "\n")
    with pytest.raises(UserError, match=r"arc\.jsonl:2: the record does not fit benchmark 'arc_easy'"):
        load_benchmark("arc_easy", data=str(bad))
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"arc\.jsonl:1: .*is this the benchmark's data"):
        load_benchmark("arc_easy", data=str(bad))


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown benchmark 'hellaswg' \(did you mean hellaswag\?\); known "
                                        r"benchmarks: arc_easy, arc_challenge, hellaswag"):
        benchmark("hellaswg")
    assert {"arc_easy", "hellaswag", "winogrande", "truthfulqa_mc1", "truthfulqa_mc2", "mmlu"} <= set(benchmark_names())


def test_missing_asset_and_missing_data_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FTFRAME_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"asset 'benchmarks' is not downloaded yet .*ftframe download --names "
                                        r"benchmarks"):
        load_benchmark("piqa")
    with pytest.raises(UserError, match=r"'truthfulqa_mc1' has no offline data .*`data:` in the suite"):
        load_benchmark("truthfulqa_mc1")


# ---------------------------------------------------------------------------------------------- scoring
@pytest.fixture(params=["tree-sdpa", "tree-eager", "padded"])
def scoring_path(request, tiny, monkeypatch):
    """The tiny model on each scoring path: the one-pass token trees (from a model on sdpa or on eager attention,
    both switched to ftframe_varlen for the call), and the left-padded cached path that models whose attention
    cannot take trees keep."""
    from ftframe.evaluation import multiple_choice

    model, tok = tiny
    impl = "eager" if request.param == "tree-eager" else "sdpa"
    model.set_attn_implementation(impl)
    if request.param == "padded":
        monkeypatch.setattr(multiple_choice, "_segmentable", lambda *_: False)
    calls = []
    tree = multiple_choice._score_segments
    monkeypatch.setattr(multiple_choice, "_score_segments", lambda *a: calls.append(1) or tree(*a))
    yield model, tok
    assert bool(calls) == request.param.startswith("tree")  # the path under test is the path taken
    assert model.config._attn_implementation == impl  # put back after scoring
    model.set_attn_implementation("sdpa")


def test_partial_scoring_scores_the_shared_continuation_after_each_choice(scoring_path):
    model, tok = scoring_path
    qs = [MCQuestion(f"w{i}", "", (f"The cat sat on the {a}", f"The cat sat on the {b} and then"), i % 2,
                     continuation="because it was warm" + " there" * i)
          for i, (a, b) in enumerate([("mat", "rug"), ("chair", "big red sofa"), ("floor", "bed")])]
    for batch_size in (1, 2):
        records = score_multiple_choice(model, tok, qs, "rendered", batch_size=batch_size, progress=False).records
        for q, rec in zip(qs, records, strict=True):
            expected = [_naive(model, tok, c, " " + q.continuation) for c in q.choices]
            assert rec["loglikelihoods"] == pytest.approx(expected, abs=2e-4)
            assert rec["pred"] == max(range(2), key=lambda i: expected[i])


def test_choices_of_very_different_lengths_score_as_a_plain_forward(scoring_path):
    """Padded rows of the cached pass are grouped by length, trees of very different sizes share a row: every way
    must give the plain per-choice numbers."""
    model, tok = scoring_path
    choices = ("no", "a somewhat longer answer here", "word " * 30, "an answer of middling length, yes", "x " * 12)
    qs = [MCQuestion(f"l{i}", "Question: what now" + "?" * i * 7, choices, i % 5) for i in range(5)]
    records = score_multiple_choice(model, tok, qs, FORMATS["continuation"], batch_size=5, progress=False).records
    for q, rec in zip(qs, records, strict=True):
        ctx = FORMATS["continuation"].context(q)
        assert rec["loglikelihoods"] == pytest.approx([_naive(model, tok, ctx, " " + c) for c in q.choices], abs=2e-4)


def test_choices_that_begin_alike_share_their_first_tokens_and_score_as_a_plain_forward(scoring_path):
    """Choices with a common beginning are one branch until they part (fed once), and each still gets exactly its
    plain forward's log-likelihood; a choice that is a prefix of another is scored to its own end."""
    model, tok = scoring_path
    choices = ("the red cat sat down", "the red cat ran off", "the red dog", "the red", "a blue bird")
    qs = [MCQuestion(f"s{i}", "Which one" + "?" * (i + 1), choices, i % 5) for i in range(3)]
    records = score_multiple_choice(model, tok, qs, FORMATS["continuation"], batch_size=3, progress=False).records
    for q, rec in zip(qs, records, strict=True):
        ctx = FORMATS["continuation"].context(q)
        assert rec["loglikelihoods"] == pytest.approx([_naive(model, tok, ctx, " " + c) for c in q.choices], abs=2e-4)


def test_a_token_tree_feeds_common_beginnings_once():
    from ftframe.evaluation.multiple_choice import _Item, _token_tree, _tree_mask

    # prefix [1, 2]; choices [5, 6, 7], [5, 6, 8, 9], [5, 3], [4]: the last token of each is only predicted
    it = _Item(0, [1, 2], [[5, 6, 7], [5, 6, 8, 9], [5, 3], [4]], [0, 0, 0, 0], [3, 4, 2, 1])
    tokens, parents, predictors = _token_tree(it)
    assert tokens == [1, 2, 5, 6, 8]  # 5 and 6 once, 8 for the second choice; 7, 9, 3 and 4 never fed
    assert parents == [-1, 0, 1, 2, 3]
    assert predictors == [[1, 2, 3], [1, 2, 3, 4], [1, 2], [1]]
    mask = _tree_mask(parents, chain=2)
    assert mask.tolist() == [[j <= i for j in range(5)] for i in range(5)]  # here one path: causal
    it2 = _Item(0, [1], [[5, 6, 0], [7, 8, 0]], [0, 0], [3, 3])
    tokens, parents, _ = _token_tree(it2)
    assert tokens == [1, 5, 6, 7, 8] and parents == [-1, 0, 1, 0, 3]
    allowed = _tree_mask(parents, chain=1)
    assert allowed[4].tolist() == [True, False, False, True, True]  # 8 sees the root, 7 and itself, not 5 or 6
    assert _tree_mask([-1, 0, 1], chain=3) is None  # a plain chain: causal attention


def test_mc2_is_the_probability_mass_of_the_true_answers():
    lls = [-1.0, -2.0, -0.5, -3.0]
    p = [math.exp(v) for v in lls]
    assert mc2_score(lls, [1, 1, 0, 0]) == pytest.approx((p[0] + p[1]) / sum(p))
    assert mc2_score([-900.0, -901.0], [0, 1]) == pytest.approx(1 / (1 + math.e))  # no underflow


# ---------------------------------------------------------------------------------------------- suites
def test_suite_errors_name_file_line_and_key(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text("limit: 5\nbenchmarks:\n  - arc_easy\n  - {name: piqa, limt: 3}\n")
    with pytest.raises(UserError, match=r"s\.yaml:4: unknown key\(s\) \['limt'\] for benchmark 'piqa'"):
        load_suite(str(suite))
    suite.write_text("benchmarks: [arc_easy]\nshots: 5\n")
    with pytest.raises(UserError, match=r"s\.yaml:2: unknown key 'shots'; a suite takes"):
        load_suite(str(suite))
    suite.write_text("benchmarks:\n  - arc_easy\n  - hellaswg\n")
    with pytest.raises(UserError, match=r"s\.yaml:3: unknown benchmark 'hellaswg'"):
        load_suite(str(suite))
    suite.write_text("benchmarks:\n  - {name: arc_easy, k_shot: -1}\n")
    with pytest.raises(UserError, match=r"s\.yaml:2: k_shot must be an integer >= 0"):
        load_suite(str(suite))
    with pytest.raises(UserError, match=r"no such suite file; give a YAML path or one of: standard"):
        load_suite("nonstandard")
    std = load_suite("standard")
    assert [r.name for r in std.runs] == ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "piqa", "boolq",
                                          "openbookqa", "mmlu"]
    assert std.runs[-1].sample == 500 and all(r.limit == 500 and r.k_shot == 0 for r in std.runs)


def _suite_data(tmp_path):
    """An ARC-shaped and a Winogrande-shaped file, and a suite over them."""
    arc = tmp_path / "arc.jsonl"
    arc.write_text("".join(json.dumps({**ARC, "id": f"a{i}", "question": f"Which is planet number {i}?",
                                       "answerKey": "ABC"[i % 3]}) + "\n" for i in range(9)))
    wino = tmp_path / "wino.jsonl"
    wino.write_text("".join(json.dumps({"sentence": f"Ann met Bo {i} times because _ liked it.", "option1": "Ann",
                                        "option2": "Bo", "answer": "12"[i % 2]}) + "\n" for i in range(6)))
    suite = tmp_path / "mine.yaml"
    suite.write_text(f"# ftframe evaluate --suite {suite}\nbatch_size: 4\nbenchmarks:\n"
                     f"  - {{name: arc_easy, data: {arc}}}\n  - {{name: winogrande, data: {wino}, limit: 4}}\n")
    return suite


def test_suite_scorecard_then_compare(tiny_model, tmp_path, capsys):
    suite = _suite_data(tmp_path)
    for name, extra in (("a", []), ("b", ["--limit", "5"])):
        main(["evaluate", "--suite", str(suite), "--model", tiny_model, "--output", str(tmp_path / name), *extra])
    card = json.loads((tmp_path / "a" / "scorecard.json").read_text())
    assert list(card["benchmarks"]) == ["arc_easy", "winogrande"]
    arc, wino = card["benchmarks"]["arc_easy"], card["benchmarks"]["winogrande"]
    assert (arc["n"], wino["n"], arc["primary_metric"], wino["primary_metric"]) == (9, 4, "acc", "acc")
    records = [json.loads(x) for x in (tmp_path / "a" / "records" / "arc_easy.jsonl").read_text().splitlines()]
    assert arc["acc"] == pytest.approx(sum(r["correct"] for r in records) / 9)
    assert card["analysis"]["arc_easy"]["n"] == 9
    md = (tmp_path / "a" / "scorecard.md").read_text()
    assert "| ARC-Easy | validation | 9 | acc |" in md and "### Winogrande: error analysis (4 questions)" in md
    assert (tmp_path / "a" / "scorecard.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "b" / "scorecard.json").read_text())["benchmarks"]["arc_easy"]["n"] == 5

    capsys.readouterr()
    main(["evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "a"), "--output", str(tmp_path / "same")])
    same = json.loads((tmp_path / "same" / "comparison.json").read_text())
    assert all(r["paired"] and r["diff"] == 0 and r["verdict"] == "inside the noise" for r in same["rows"])
    assert "0 of 2 differences lie outside 1.96 standard errors" in capsys.readouterr().out
    main(["evaluate", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "ab")])
    ab = json.loads((tmp_path / "ab" / "comparison.json").read_text())
    row = ab["rows"][0]  # 9 vs 5 questions: not the same questions, so not paired
    assert not row["paired"] and row["diff_stderr"] == pytest.approx(math.hypot(row["a_stderr"], row["b_stderr"]))
    assert (tmp_path / "ab" / "comparison.png").is_file()
    with pytest.raises(SystemExit):
        main(["evaluate", "--compare", str(tmp_path / "a"), "--output", str(tmp_path / "x")])
    assert "--compare takes two scorecard folders" in capsys.readouterr().err


def test_paired_difference_and_its_standard_error(tmp_path):
    def card(folder, correct):
        folder.mkdir()
        (folder / "records").mkdir()
        (folder / "records" / "arc_easy.jsonl").write_text(
            "".join(json.dumps({"id": f"q{i}", "correct": c, "correct_norm": c}) + "\n" for i, c in enumerate(correct)))
        p = sum(correct) / len(correct)
        se = math.sqrt(p * (1 - p) / (len(correct) - 1))
        (folder / "scorecard.json").write_text(json.dumps({"suite": "s", "model": folder.name, "benchmarks": {
            "arc_easy": {"title": "ARC-Easy", "primary_metric": "acc", "n": len(correct), "primary": p,
                         "primary_stderr": se}}}))

    a = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0] * 4
    b = [1, 1, 1, 1, 1, 0, 1, 1, 1, 0] * 4  # B fixes 3 of every 10, breaks none
    card(tmp_path / "A", a)
    card(tmp_path / "B", b)
    row = compare(str(tmp_path / "A"), str(tmp_path / "B"), tmp_path / "out")["rows"][0]
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    assert row["paired"] and row["diff"] == pytest.approx(0.3) and row["diff_stderr"] == pytest.approx(se)
    assert row["verdict"] == "better"  # 0.3 / 0.073: far outside the noise


# ---------------------------------------------------------------------------------------------- analysis
def test_error_analysis_counts():
    qs = [MCQuestion(f"q{i}", f"question {i}", ("a", "bb", "cccc", "dddddddd"), i % 4, subject="s" + str(i % 2))
          for i in range(8)]
    # the model always picks A with acc and the longest (D) with acc_norm
    recs = [{"id": q.id, "gold": q.label, "pred": 0, "pred_norm": 3, "correct": q.label == 0,
             "correct_norm": q.label == 3, "loglikelihoods": [-1.0, -2.0, -3.0, -4.0 + 0.1 * i]}
            for i, q in enumerate(qs)]
    a = analyze(qs, recs)
    assert a["positions"][0] == {"position": "A", "offered": 8, "chosen": 1.0, "chosen_norm": 0.0, "correct": 0.25,
                                 "acc_when_correct_here": 1.0}
    assert a["positions"][3]["chosen_norm"] == 1.0 and a["positions"][3]["acc_when_correct_here"] == 0.0
    assert a["longest_choice"] == {"questions": 8, "is_correct": 0.25, "chosen_acc": 0.0, "chosen_acc_norm": 1.0}
    assert [q["n"] for q in a["length_quartiles"]] == [2, 2, 2, 2]
    assert [q["acc"] for q in a["length_quartiles"]] == [1.0, 0.0, 0.0, 0.0]
    assert a["acc_vs_acc_norm"] == {"disagree": 8, "acc_right": 2, "acc_norm_right": 2, "acc": 0.25,
                                    "acc_norm": 0.25}
    assert len(a["confident_mistakes"]) == 5 and all(not m["gold"] == 0 for m in a["confident_mistakes"])
    probs = [m["confidence"] for m in a["confident_mistakes"]]
    assert probs == sorted(probs, reverse=True)
    assert {s["subject"] for s in a["subjects"]} == {"s0", "s1"}


def test_the_suite_example_in_the_docs_parses(tmp_path):
    import re

    from tests.helpers import ROOT

    page = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S) if "benchmarks:" in b]
    (tmp_path / "my_suite.yaml").write_text(block)
    suite = load_suite(str(tmp_path / "my_suite.yaml"))
    assert [(r.name, r.limit, r.k_shot) for r in suite.runs] == [
        ("arc_challenge", 300, 0), ("hellaswag", 1000, 0), ("mmlu", 300, 5), ("truthfulqa_mc2", 300, 0)]
    assert suite.runs[2].sample == 500 and suite.runs[3].data == "data/truthful_qa_mc.jsonl"
