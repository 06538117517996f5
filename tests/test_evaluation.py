"""Evaluation on a tiny model: multiple-choice scoring against a plain per-choice computation, the reports of
``ftframe evaluate``, perplexity windows, generation exact match, and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ftframe.cli import main
from ftframe.errors import UserError
from ftframe.evaluation import (
    FORMATS,
    MCQuestion,
    load_generation_records,
    load_questions,
    perplexity,
    score_multiple_choice,
    summarize,
)
from ftframe.evaluation.multiple_choice import encode_pair, few_shot
from ftframe.models import load_model, load_tokenizer
from tests.helpers import build_tiny_model, tiny_fit_args, tiny_instruction_data, tiny_trainer

CHOICES = ("three apples", "four", "five pears and more", "six")


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(tiny_model, AutoModelForCausalLM).eval(), load_tokenizer(tiny_model)


def _questions(n=7):
    return [MCQuestion(f"q{i}", "What is one plus " + "two " * (i + 1) + "?", CHOICES, i % 4,
                       "math" if i % 2 else "words") for i in range(n)]


def _naive_loglikelihood(model, tokenizer, context, continuation):
    """One full forward per (context, choice), no padding, no cache."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logprobs = F.log_softmax(logits[logits.shape[0] - ids.shape[1]:].float(), dim=-1)  # after any virtual tokens
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


@pytest.mark.parametrize("fmt", ["letter", "continuation"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_equal_a_plain_forward_per_choice(tiny, fmt, batch_size):
    model, tok = tiny
    qs = _questions()
    result = score_multiple_choice(model, tok, qs, fmt, batch_size=batch_size, progress=False)
    f = FORMATS[fmt]
    for q, rec in zip(qs, result.records, strict=True):
        expected = [_naive_loglikelihood(model, tok, f.context(q), f.delimiter + t) for t in f.choice_texts(q)]
        assert rec["loglikelihoods"] == pytest.approx(expected, abs=2e-4)
        assert rec["pred"] == max(range(4), key=lambda i: expected[i])
        # acc_norm divides by the choice's length in characters (without the delimiter), as the harness does
        normed = [ll / len(t) for ll, t in zip(expected, f.choice_texts(q), strict=True)]
        assert rec["pred_norm"] == max(range(4), key=lambda i: normed[i])
        assert rec["gold"] == q.label and rec["correct"] == (rec["pred"] == q.label)


def test_letter_format_renders_like_the_harness_mmlu_prompt():
    q = MCQuestion("x", " 2+2? ", ("3", "4"), 1, "elementary_mathematics")
    shot = MCQuestion("y", "1+1?", ("2", "5"), 0, "elementary_mathematics")
    assert FORMATS["letter"].context(q, [shot]) == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "1+1?\nA. 2\nB. 5\nAnswer: A\n\n2+2?\nA. 3\nB. 4\nAnswer:")
    assert FORMATS["continuation"].context(q) == "Question: 2+2?\nAnswer:"
    assert FORMATS["continuation"].choice_texts(q) == ["3", "4"]


def test_few_shot_draws_other_questions_of_the_same_subject_reproducibly():
    qs = _questions(9)
    a, b = few_shot(qs, 2, seed=1), few_shot(qs, 2, seed=1)
    assert a == b and few_shot(qs, 2, seed=2) != a
    for q, shots in zip(qs, a, strict=True):
        assert len(shots) == 2 and q not in shots and all(s.subject == q.subject for s in shots)
    with pytest.raises(UserError, match=r"k_shot=4 but subject 'math' has only 4 questions"):
        few_shot(qs, 4, seed=1)


def test_summary_accuracy_and_subjects(tiny):
    model, tok = tiny
    result = score_multiple_choice(model, tok, _questions(), "letter", progress=False)
    s = summarize(result.records)
    assert s["n"] == 7 and s["acc"] == sum(r["correct"] for r in result.records) / 7
    assert set(s["subjects"]) == {"math", "words"} and sum(v["n"] for v in s["subjects"].values()) == 7


def test_context_longer_than_the_window(tiny):
    model, tok = tiny
    qs = _questions(3)
    with pytest.raises(UserError, match=r"question q0: \d+ context \+ \d+ choice tokens exceed max_length=12; "
                                         r"set overflow: truncate"):
        score_multiple_choice(model, tok, qs, "letter", max_length=12, progress=False)
    skipped = score_multiple_choice(model, tok, qs, "letter", max_length=40, overflow="skip", progress=False)
    kept = score_multiple_choice(model, tok, qs, "letter", max_length=40, overflow="truncate", progress=False)
    assert skipped.skipped and len(skipped.records) == 3 - len(skipped.skipped)
    assert kept.truncated == len(skipped.skipped) and len(kept.records) == 3
    assert all(r["context_tokens"] + 1 <= 40 for r in kept.records)


def test_prompt_learning_models_are_scored_with_their_virtual_tokens(tiny_model, tiny):
    from peft import PromptTuningConfig, get_peft_model

    _, tok = tiny
    model = get_peft_model(load_model(tiny_model, AutoModelForCausalLM),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    qs = _questions(3)
    rec = score_multiple_choice(model, tok, qs, "continuation", batch_size=2, progress=False).records[0]
    f = FORMATS["continuation"]
    expected = [_naive_loglikelihood(model, tok, f.context(qs[0]), " " + t) for t in f.choice_texts(qs[0])]
    assert rec["loglikelihoods"] == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q", "choices": ["a"], "label": 0}', r"bad\.jsonl:2: field 'choices' has 1 choice\(s\); .* at least 2"),
    ('{"question": "q", "choices": ["a", "b"], "label": 2}', r"bad\.jsonl:2: field 'label' = 2 is not a choice: use an "
                                                            r"index in 0\.\.1, a letter A\.\.B"),
    ('{"question": "q", "choices": ["a", "b"], "label": "C"}', r"bad\.jsonl:2: field 'label' = 'C' is not a choice"),
    ('{"question": "q", "label": 0}', r"bad\.jsonl:2: missing field 'choices' \(fields present: \['label', 'question'\]\)"),
    ('{"question": "q", "choices": "a,b", "label": 0}', r"bad\.jsonl:2: field 'choices' must be a list of strings"),
    ('{"question": "q", "choices": ["a", "b"], ', r"bad\.jsonl:2: not valid JSON"),
])
def test_bad_questions_name_file_line_and_field(line, message, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "choices": ["a", "b"], "label": "b"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        load_questions(path)


def test_labels_as_index_letter_or_text(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "choices": ["x", "y", "z"], "label": lab}) + "\n"
                            for lab in (2, "C", "z", "2")))
    assert [q.label for q in load_questions(path)] == [2, 2, 2, 2]


def test_perplexity_windows(tiny):
    model, tok = tiny
    text = "one plus two is three. " * 12
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    nll = -sum(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1))
    whole = perplexity(model, tok, [text], max_length=len(ids), progress=False)
    assert whole["tokens"] == len(ids) - 1 and whole["windows"] == 1
    assert whole["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    # shorter windows: every token scored exactly once; overlapping windows give it more context than disjoint ones
    disjoint = perplexity(model, tok, [text], max_length=16, progress=False)
    sliding = perplexity(model, tok, [text], max_length=16, stride=4, progress=False)
    assert disjoint["tokens"] == sliding["tokens"] == len(ids) - 1
    assert sliding["windows"] > disjoint["windows"] > 1
    with pytest.raises(UserError, match=r"stride must be in 1\.\.max_length \(16\)"):
        perplexity(model, tok, [text], max_length=16, stride=32, progress=False)


def test_held_out_split_matches_the_data_module(tiny_model, tiny_data, tmp_path):
    dm = tiny_instruction_data(tiny_model, tiny_data, tmp_path, seed=3)
    dm.setup("fit")
    tok = load_tokenizer(tiny_model)
    val_texts = sorted(tok.decode(dm.val_dataset[i]["input_ids"]) for i in range(len(dm.val_dataset)))
    records = load_generation_records(tiny_data, split="val", val_size=8, split_seed=3)
    assert len(records) == 8
    assert all(any(r.prompt in t and r.reference in t for t in val_texts) for r in records)


def test_evaluate_command_writes_reports(tiny, tiny_model, tiny_data, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": q.id, "question": q.question, "choices": list(q.choices),
                                             "label": q.label, "subject": q.subject}) + "\n" for q in _questions()))
    out = tmp_path / "mc"
    main(["evaluate", f"--model={tiny_model}", f"--data={questions}", f"--output={out}", "--k_shot=1", "--sample=7",
          "--batch_size=4"])
    report = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert report["results"]["n"] == 7 == len(records)
    assert report["results"]["acc"] == sum(r["correct"] for r in records) / 7
    assert "| **all** | 7 |" in (out / "results.md").read_text() and "| math | 3 |" in capsys.readouterr().out
    gen = tmp_path / "gen"
    main(["evaluate", "--task=generation", f"--model={tiny_model}", f"--data={tiny_data}", f"--output={gen}",
          "--split=val", "--val_size=4", "--max_new_tokens=4"])
    report = json.loads((gen / "results.json").read_text())
    records = [json.loads(line) for line in (gen / "records.jsonl").read_text().splitlines()]
    assert report["results"]["n"] == 4 == len(records)
    assert set(records[0]) >= {"prompt", "answer", "gold", "strict", "flexible", "correct_strict"}
    # the scores are the records' own verdicts, and each verdict compares its extracted answer with the gold one
    for kind in ("strict", "flexible"):
        assert all(r[f"correct_{kind}"] == (r[kind] == r["gold"]) for r in records)
        assert report["results"][f"exact_match_{kind}"] == sum(r[f"correct_{kind}"] for r in records) / 4
    text = tmp_path / "t.txt"
    text.write_text("one plus two is three. " * 40)
    ppl = tmp_path / "ppl"
    main(["evaluate", "--task=perplexity", f"--model={tiny_model}", f"--data={text}", f"--output={ppl}",
          "--window=32", "--stride=16"])
    result = json.loads((ppl / "results.json").read_text())["results"]
    model, tok = tiny
    direct = perplexity(model, tok, [text.read_text()], max_length=32, stride=16, progress=False)
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-4) and result["perplexity"] > 1
    assert (result["tokens"], result["windows"]) == (direct["tokens"], direct["windows"])


def test_adapter_that_does_not_fit_the_base(tiny_model, tiny_data, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    main(tiny_fit_args(tiny_model, tiny_data, tmp_path, adapter, steps=1))
    other = build_tiny_model(tmp_path / "other", hidden_size=32)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["evaluate", f"--model={other}", f"--adapter={adapter}", f"--data={tiny_data}", "--task=generation"])
    err = capsys.readouterr().err
    assert f"the adapter {adapter} was trained on '{tiny_model}'; it does not fit the base '{other}'" in err


def test_scoring_from_a_callback_uses_the_model_being_trained(tiny_model, tiny_data, tmp_path):
    """bf16-mixed LoRA with 16-bit frozen weights: scoring mid-training needs no second model and no Trainer help."""
    from lightning.pytorch import Callback

    from ftframe.methods import LoRA

    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            before = sum(1 for _ in pl_module.parameters())
            mc = score_multiple_choice(pl_module.model, pl_module.tokenizer, _questions(3), "continuation",
                                       progress=False)
            ppl = perplexity(pl_module.model, pl_module.tokenizer, ["one plus two is three."], progress=False)
            assert pl_module.model.training  # mode restored
            assert sum(1 for _ in pl_module.parameters()) == before
            seen.append((mc.records[0]["loglikelihoods"], ppl["perplexity"]))

    module = LoRA(model_name=tiny_model, r=2)
    trainer = tiny_trainer(tmp_path, max_steps=2, precision="bf16-mixed", callbacks=[Probe()])
    trainer.fit(module, datamodule=tiny_instruction_data(tiny_model, tiny_data, tmp_path))
    assert any(p.dtype == torch.bfloat16 for p in module.model.parameters())  # frozen weights were 16-bit
    assert len(seen) == 2 and all(math.isfinite(p) for _, p in seen)
    assert seen[0][0] != seen[1][0]  # the second call sees the weights the step changed


def test_loss_task_is_the_validation_loss_of_a_run(tiny_model, tiny_data, tmp_path):
    """``ftframe evaluate --task loss --split val`` scores the held-out examples as ``ftframe validate`` does."""
    from ftframe.cli import FTFrameCLI
    from ftframe.tools.evaluate import evaluate

    cli = FTFrameCLI(args=["validate", f"--model.model_name={tiny_model}", "--model=FullFineTune",
                           f"--data.train_files={tiny_data}", f"--data.cache_dir={tmp_path / 'c'}",
                           "--data.val_size=8", "--trainer.accelerator=cpu", "--trainer.logger=false",
                           f"--trainer.default_root_dir={tmp_path}", "--adapter.save_on_fit_end=false"])
    val_loss = float(cli.trainer.callback_metrics["val/loss"])
    report = evaluate(task="loss", data=tiny_data, model=tiny_model, split="val", val_size=8,
                      output=str(tmp_path / "eval"))
    assert report["results"]["loss"] == pytest.approx(val_loss, rel=1e-5)
    assert report["results"]["examples"] == 8 and report["results"]["tokens"] > 8
    assert "| loss (NLL / token) |" in (tmp_path / "eval" / "results.md").read_text()
    train = evaluate(task="loss", data=tiny_data, model=tiny_model, split="train", val_size=8,
                     output=str(tmp_path / "eval2"))
    assert train["results"]["examples"] == 40
