"""The ftframe prompt formats as lm-evaluation-harness task YAMLs, to score the same prompts with both tools.

``write_lm_eval_task(folder, "letter", "questions.jsonl")`` writes ``folder/ftframe_letter.yaml``; run it with
``lm_eval --model hf --model_args pretrained=MODEL_FOLDER --include_path folder --tasks ftframe_letter``. The JSONL
holds ``question``, ``choices``, ``label`` (an index) and ``subject`` per line, as ``ftframe evaluate`` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ftframe.evaluation.multiple_choice import MCQuestion, PromptFormat

__all__ = ["LM_EVAL_TASKS", "prompt_format_task", "write_lm_eval_benchmark", "write_lm_eval_task", "write_questions"]

_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

#: format name -> the task-specific part of the YAML (``FORMATS[name]`` renders the same text)
LM_EVAL_TASKS = {
    "letter": 'description: "The following are multiple choice questions (with answers) about {{subject}}.\\n\\n"\n'
              'doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}'
              '\\nD. {{choices[3]}}\\nAnswer:"\n'
              'doc_to_choice: ["A", "B", "C", "D"]\n',
    "continuation": 'doc_to_text: "Question: {{question.strip()}}\\nAnswer:"\n'
                    "doc_to_choice: choices\n",
}


def write_questions(questions: Sequence[MCQuestion], path: str | Path) -> Path:
    """Write questions as the JSONL both tools read."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for q in questions:
            f.write(json.dumps({"id": q.id, "subject": q.subject, "question": q.question, "choices": list(q.choices),
                                "label": q.label}) + "\n")
    return path


def write_lm_eval_task(folder: str | Path, fmt: str | PromptFormat, data: str | Path, n_choices: int = 4) -> str:
    """Write the lm-eval task YAML for ``fmt`` over the JSONL ``data`` into ``folder``; returns the task name.

    ``fmt``: a built-in name (the ``letter`` task assumes four choices, MMLU) or a :class:`PromptFormat` (a YAML
    one included), whose templates become lm-eval's Jinja ``description`` / ``doc_to_text`` / ``doc_to_choice`` and
    its ``target_delimiter`` / ``fewshot_delimiter``; a continuation of ``{letter}`` scores ``n_choices`` letters.
    """
    name = f"ftframe_{fmt if isinstance(fmt, str) else fmt.name}"
    body = LM_EVAL_TASKS[fmt] if isinstance(fmt, str) else prompt_format_task(fmt, n_choices)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"task: {name}\n" + _COMMON.format(data=json.dumps(str(Path(data).resolve())))
                                         + body)
    return name


def _jinja(template: str, names: dict[str, str]) -> str:
    """A ``str.format`` template as Jinja: ``{name}`` -> ``names[name]``, literal text (and ``{{`` / ``}}``) kept."""
    import re
    import string

    out = []
    for literal, field, _, _ in string.Formatter().parse(template):
        # one pass: a brace in literal text becomes a Jinja string expression (a second replace would rewrite the
        # braces of the first one's output)
        out.append(re.sub(r"[{}]", lambda m: "{{ '" + m.group() + "' }}", literal))
        if field is not None:
            out.append(names[field])
    return "".join(out)


def prompt_format_task(fmt: PromptFormat, n_choices: int = 4) -> str:
    """The task-specific part of an lm-eval task YAML that renders what ``fmt`` renders for ``write_questions``'
    records (``question``, ``choices``, ``subject``, ``label``)."""
    from ftframe.errors import UserError
    from ftframe.evaluation.multiple_choice import LETTERS

    letter = "{{ '" + LETTERS + "'[loop.index0] }}"
    block = "{% for c in choices %}" + _jinja(fmt.choice_line, {"letter": letter, "text": "{{ c }}"}) + "{% endfor %}"
    text = _jinja(fmt.question, {"question": "{{ question.strip() }}", "subject": "{{ subject or '' }}",
                                 "choices": block})
    lines = [f"doc_to_text: {json.dumps(text)}"]
    if fmt.description:
        lines.append("description: " + json.dumps(_jinja(fmt.description,
                                                            {"subject": "{{ (subject or '').replace('_', ' ') }}"})))
    if fmt.continuation == "{text}":
        lines.append('doc_to_choice: "{{ choices }}"')
    elif "{text}" not in fmt.continuation:
        lines.append("doc_to_choice: " + json.dumps([fmt.continuation.format(letter=LETTERS[i])
                                                     for i in range(n_choices)]))
    else:
        raise UserError(f"prompt format {fmt.name!r}: its continuation {fmt.continuation!r} mixes {{letter}} and "
                        "{text}; the lm-eval export takes {text} alone or a template of {letter}")
    lines += [f"target_delimiter: {json.dumps(fmt.delimiter)}", f"fewshot_delimiter: {json.dumps(fmt.shot_separator)}"]
    return "\n".join(lines) + "\n"


#: records whose field names differ from those lm-eval's dataset copy uses: BoolQ is google/boolq here
#: (``answer: true/false``), super_glue's ``label: 0/1`` in lm-eval
_LM_EVAL_FIELDS = {"boolq": lambda doc: {**doc, "label": int(bool(doc["answer"]))}}


def write_lm_eval_benchmark(folder: str | Path, benchmark: str, docs: Sequence[dict]) -> str:
    """lm-eval's own task YAML for ``benchmark`` (its ``lm_eval`` task, included as lm-eval 0.4.13 ships it), reading
    ``docs`` from a local JSONL instead of the Hub; returns the task name to run with ``--include_path folder``.

    lm-eval's prompt, choices, target, preprocessing and metrics are then lm-eval's own, not a copy of ftframe's.
    """
    from lm_eval.tasks import TaskManager

    from ftframe.evaluation.benchmarks import benchmark as definition

    bench = definition(benchmark)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{benchmark}.jsonl"
    fix = _LM_EVAL_FIELDS.get(benchmark, lambda d: d)
    with open(data, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(fix(doc)) + "\n")
    name = f"ftframe_{benchmark}"
    if benchmark == "mmlu":  # lm-eval's MMLU is 57 tasks over hails/mmlu_no_train; the one-task prompt is ours
        write_questions([_mmlu_question(d) for d in docs], data)
        return write_lm_eval_task(folder, "letter", data)
    included = TaskManager().task_index[bench.lm_eval].yaml_path
    (folder / f"{name}.yaml").write_text(
        f"include: {json.dumps(str(included))}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: null\n")
    return name


def _mmlu_question(doc: dict) -> MCQuestion:
    return MCQuestion(id=doc["id"], question=doc["question"], choices=tuple(doc["choices"]), label=doc["label"],
                      subject=doc["subject"])
