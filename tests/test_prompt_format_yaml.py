"""Prompt formats as YAML data: loading with file:line errors, scoring like the same PromptFormat object, the
``ftframe evaluate --prompt_format FILE`` command, and the lm-eval export of a format's templates."""

from __future__ import annotations

import ast
import json

import pytest
import yaml
from transformers import AutoModelForCausalLM

from ftframe.cli import main
from ftframe.errors import UserError
from ftframe.evaluation import MCQuestion, PromptFormat, load_prompt_format, score_multiple_choice
from ftframe.evaluation.harness import prompt_format_task
from ftframe.models import load_model, load_tokenizer
from tests.helpers import ROOT

EXAMPLE = ROOT / "configs" / "prompts" / "mmlu_continuation.yaml"


def _questions() -> list[MCQuestion]:
    return [MCQuestion(f"q{i}", f"What is {i} plus {i}?", (str(2 * i), str(2 * i + 1), "seven", "none"), i % 4,
                       "high_school_mathematics") for i in range(5)]


def test_the_example_is_lm_evals_mmlu_continuation_prompt():
    fmt = load_prompt_format(EXAMPLE)
    q = _questions()[1]
    assert fmt.name == "mmlu_continuation"
    assert fmt.context(q) == ("The following are questions (with answers) about high school mathematics.\n\n"
                              "Question: What is 1 plus 1?\nAnswer:")
    assert fmt.choice_texts(q) == ["2", "3", "seven", "none"] and fmt.delimiter == " "


@pytest.mark.parametrize(("text", "message"), [
    ("question: 'Q: {question}'\ncontinuation: '{text}'\nchoise_line: '{letter}'\n",
     r"f\.yaml:3: unknown key 'choise_line'; did you mean 'choice_line'\?"),
    ("question: 'Q: {question} {answer}'\ncontinuation: '{text}'\n",
     r"f\.yaml:1: question uses \{answer\}; it may use \{choices\}, \{question\}, \{subject\}"),
    ("question: 'Q: {question}'\ncontinuation: '{subject}'\n", r"f\.yaml:2: continuation uses \{subject\}"),
    ("question: 'Q: {question}'\n", r"f\.yaml: missing key\(s\) \['continuation'\]"),
    ("question: 'Q: {question}'\ncontinuation: '{text}'\ndelimiter: 3\n",
     r"f\.yaml:3: delimiter must be a string \(quote it\), got 3"),
    ("question: 'Q: {question'\ncontinuation: '{text}'\n", r"f\.yaml:1: question: .*brace"),
    ("question: 'Q: {question}'\ncontinuation: '{text!r}'\n", r"f\.yaml:2: continuation uses \{text!r\}; .*bare"),
    ("question: 'Q: {question.upper}'\ncontinuation: '{text}'\n", r"f\.yaml:1: question uses \{question\.upper\}"),
    ("question: '{question}\n{choices}'\ncontinuation: '{letter}'\n", r"uses \{choices\} but no choice_line"),
    ("- question\n", r"f\.yaml: a prompt format is a mapping"),
])
def test_mistakes_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_prompt_format(path)


def test_a_yaml_format_scores_exactly_as_the_same_object(tiny_model, tmp_path):
    model, tok = load_model(tiny_model, AutoModelForCausalLM).eval(), load_tokenizer(tiny_model)
    fields = {"question": "{question}\n{choices}Answer:", "choice_line": "({letter}) {text}\n",
              "continuation": "({letter})", "description": "Quiz on {subject}.\n\n", "delimiter": " ",
              "shot_separator": "\n---\n"}
    path = tmp_path / "paren.yaml"
    path.write_text(yaml.safe_dump(fields))
    from_yaml = score_multiple_choice(model, tok, _questions(), str(path), k_shot=1, progress=False).records
    same = score_multiple_choice(model, tok, _questions(), PromptFormat(name="paren", **fields), k_shot=1,
                                 progress=False).records
    assert [r["loglikelihoods"] for r in from_yaml] == [r["loglikelihoods"] for r in same]
    other = score_multiple_choice(model, tok, _questions(), "letter", k_shot=1, progress=False).records
    assert [r["loglikelihoods"] for r in other] != [r["loglikelihoods"] for r in same]  # the format matters


def test_evaluate_takes_a_prompt_format_file(tiny_model, tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q.question, "choices": list(q.choices), "label": q.label,
                                        "subject": q.subject}) + "\n" for q in _questions()))
    out = tmp_path / "out"
    main(["evaluate", "--model", tiny_model, "--data", str(data), "--prompt_format", str(EXAMPLE), "--output",
          str(out)])
    report = json.loads((out / "results.json").read_text())
    assert report["results"]["n"] == 5 and report["options"]["prompt_format"] == str(EXAMPLE)
    assert report["options"]["prompt_format_fields"]["question"] == "Question: {question}\nAnswer:"
    with pytest.raises(SystemExit) as stop:  # an unknown name: the user error, before the model loads
        main(["evaluate", "--model", tiny_model, "--data", str(data), "--prompt_format", "leter", "--output",
              str(out)])
    assert stop.value.code == 2


def test_the_lm_eval_export_renders_the_same_text():
    """The Jinja that the lm-eval task gets renders, for a record, the context and choices ftframe scores."""
    import jinja2

    env = jinja2.Environment(keep_trailing_newline=True)  # as lm-eval renders its templates
    for fmt in (load_prompt_format(EXAMPLE), PromptFormat("p", "{question}\n{choices}Answer:", "{letter}",
                                                          choice_line="{letter}. {text}\n",
                                                          description="About {subject}:\n"),
                PromptFormat("braces", "{{{subject}}} {{%}} {{#: {question}\n{choices}Answer:", "{letter}",
                             choice_line="{{{letter}}} {text}\n")):  # literal braces stay literal text in Jinja
        task = yaml.safe_load(prompt_format_task(fmt))
        q = _questions()[2]
        doc = {"question": q.question, "choices": list(q.choices), "subject": q.subject}
        text = env.from_string(task.get("description", "")).render(**doc) + env.from_string(
            task["doc_to_text"]).render(**doc)
        assert text == fmt.context(q)
        choices = task["doc_to_choice"]
        rendered = ast.literal_eval(env.from_string(choices).render(**doc)) if isinstance(choices, str) else choices
        assert rendered == fmt.choice_texts(q)
        assert task["target_delimiter"] == fmt.delimiter and task["fewshot_delimiter"] == fmt.shot_separator
