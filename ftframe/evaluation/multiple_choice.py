"""Multiple-choice evaluation by log-likelihood, scored the way lm-evaluation-harness scores it.

A question is rendered into a *context* (optional description, k worked examples, the question) and each choice
into a *continuation* (``" " + choice text``, or ``" A"`` ... for the letter format). The score of a choice is the
sum of the log-probabilities of its continuation tokens given the context; ``acc`` takes the best score,
``acc_norm`` the best score divided by the choice's length in characters. Tokenization follows the harness: trailing
spaces of the context move to the continuation, the continuation's tokens are those of ``context + continuation``
after the context's own tokens, and the tokenizer's default special tokens are used.

A batch of questions is scored in one forward pass without padding: each question is a token tree (its shared
context, then every choice as a branch; choices that begin alike share those tokens) and the trees are spans of one
row, attention kept within each span along the tree's paths. Models whose attention cannot take that run the padded
path: one pass over the left-padded contexts, then the choices on top of their key/value cache.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ftframe.errors import UserError
from ftframe.evaluation.common import scoring_mode

__all__ = [
    "FORMATS",
    "MCQuestion",
    "PromptFormat",
    "load_prompt_format",
    "load_questions",
    "resolve_prompt_format",
    "sample_evenly",
    "score_multiple_choice",
    "summarize",
]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question. ``label`` is the index of the correct choice.

    ``continuation`` set means *partial* scoring (Winogrande): each choice completes the context in place of the
    question, and the shared ``continuation`` is what is scored. ``true_labels`` (0/1 per choice) marks every true
    answer, for TruthfulQA's MC2 (the probability mass of the true answers).
    """

    id: str
    question: str
    choices: tuple[str, ...]
    label: int
    subject: str | None = None
    continuation: str | None = None
    true_labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class PromptFormat:
    """How questions become text: data, not code, so new formats need no new scoring code.

    ``question`` is a ``str.format`` template with ``{question}``, ``{choices}`` (the choices block, rendered line by
    line with ``choice_line``) and ``{subject}``; ``continuation`` renders each choice as scored (``{letter}``,
    ``{text}``), after ``delimiter``; ``description`` goes in front of the examples (``{subject}`` available).
    ``norm_text`` is what ``acc_norm`` divides by the length of: the continuation without the delimiter.
    """

    name: str
    question: str
    continuation: str
    choice_line: str = ""
    description: str = ""
    delimiter: str = " "
    shot_separator: str = "\n\n"

    def render_question(self, q: MCQuestion, choice: int | None = None) -> str:
        """The question as text; for a partial-scoring question, ``choice`` (default: gold) stands in its place."""
        if q.continuation is not None:
            return q.choices[q.label if choice is None else choice]
        block = "".join(self.choice_line.format(letter=LETTERS[i], text=c) for i, c in enumerate(q.choices))
        return self.question.format(question=q.question.strip(), choices=block, subject=q.subject or "")

    def choice_texts(self, q: MCQuestion) -> list[str]:
        """What is scored for each choice (after ``delimiter``): the choice, or the shared continuation (partial)."""
        if q.continuation is not None:
            return [q.continuation] * len(q.choices)
        return [self.continuation.format(letter=LETTERS[i], text=c) for i, c in enumerate(q.choices)]

    def context(self, q: MCQuestion, shots: Sequence[MCQuestion] = (), choice: int | None = None) -> str:
        parts = [self.render_question(s) + self.delimiter + self.choice_texts(s)[s.label] for s in shots]
        parts.append(self.render_question(q, choice))
        desc = self.description.format(subject=(q.subject or "").replace("_", " ")) if self.description else ""
        return desc + self.shot_separator.join(parts)

    def contexts(self, q: MCQuestion, shots: Sequence[MCQuestion] = ()) -> list[str]:
        """One context per choice: the same one, or (partial scoring) each completed by its choice."""
        if q.continuation is None:
            return [self.context(q, shots)] * len(q.choices)
        return [self.context(q, shots, j) for j in range(len(q.choices))]


FORMATS: dict[str, PromptFormat] = {
    # lm-evaluation-harness's MMLU prompt: letters as choices, the subject in a description line
    "letter": PromptFormat(
        name="letter",
        description="The following are multiple choice questions (with answers) about {subject}.\n\n",
        question="{question}\n{choices}Answer:",
        choice_line="{letter}. {text}\n",
        continuation="{letter}",
    ),
    # the choice text itself is scored after "Answer:" (ARC / HellaSwag style)
    "continuation": PromptFormat(
        name="continuation",
        question="Question: {question}\nAnswer:",
        continuation="{text}",
    ),
    # the question is already the whole prompt (a benchmark definition rendered it, see ftframe.evaluation.benchmarks)
    "rendered": PromptFormat(name="rendered", question="{question}", continuation="{text}"),
}


#: the placeholders each template of a PromptFormat may use
PLACEHOLDERS = {"question": {"question", "choices", "subject"}, "continuation": {"letter", "text"},
                "choice_line": {"letter", "text"}, "description": {"subject"}, "delimiter": set(),
                "shot_separator": set(), "name": set()}
_REQUIRED = ("question", "continuation")


def load_prompt_format(path: str | Path) -> PromptFormat:
    """A :class:`PromptFormat` from a YAML file of its fields (``ftframe evaluate --prompt_format FILE``).

    Keys: ``question`` (required; ``{question}``, ``{choices}``, ``{subject}``), ``continuation`` (required: what is
    scored for each choice; ``{letter}``, ``{text}``), ``choice_line`` (one line of the ``{choices}`` block;
    ``{letter}``, ``{text}``), ``description`` (before the examples; ``{subject}``, underscores as spaces),
    ``delimiter`` (between context and continuation, lm-eval's ``target_delimiter``; default one space),
    ``shot_separator`` (between worked examples, lm-eval's ``fewshot_delimiter``; default a blank line) and ``name``
    (default: the file's stem). A mistake names the file and line.
    """
    import difflib
    import string

    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except OSError as e:
        raise UserError(f"--prompt_format {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}: a prompt format is a mapping of {sorted(PLACEHOLDERS)} to strings")
    fields: dict[str, str] = {}
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if key not in PLACEHOLDERS:
            close = difflib.get_close_matches(key, sorted(PLACEHOLDERS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{path}:{line}: unknown key {key!r}; {hint}the keys are {sorted(PLACEHOLDERS)}")
        value = yaml.safe_load(yaml.serialize(value_node))
        if not isinstance(value, str):
            raise UserError(f"{path}:{line}: {key} must be a string (quote it), got {value!r}")
        try:
            parsed = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
        except ValueError as e:
            raise UserError(f"{path}:{line}: {key}: {e} (a literal brace is written {{{{ or }}}})") from None
        # a bare {name} only: attributes, indexing, !conversions and :specs would not survive the lm-eval export
        for f, conv, spec in parsed:
            if conv or spec or not f.isidentifier():
                raise UserError(f"{path}:{line}: {key} uses {{{f}{'!' + conv if conv else ''}"
                                f"{':' + spec if spec else ''}}}; write a placeholder as a bare {{name}}")
        used = {f for f, _, _ in parsed}
        bad = sorted(used - PLACEHOLDERS[key])
        if bad:
            allowed = ", ".join(f"{{{p}}}" for p in sorted(PLACEHOLDERS[key])) or "none"
            raise UserError(f"{path}:{line}: {key} uses {', '.join(f'{{{b}}}' for b in bad)}; it may use {allowed}")
        fields[key] = value
    missing = [k for k in _REQUIRED if k not in fields]
    if missing:
        raise UserError(f"{path}: missing key(s) {missing}; a prompt format needs question and continuation")
    if "{choices}" in fields["question"] and not fields.get("choice_line"):
        raise UserError(f"{path}: question uses {{choices}} but no choice_line says how a choice is listed")
    fields.setdefault("name", path.stem)
    return PromptFormat(**fields)


def resolve_prompt_format(value: str | PromptFormat) -> PromptFormat:
    """A format by name (``letter``, ``continuation``, ``rendered``) or a YAML file of one (:func:`load_prompt_format`)."""
    if isinstance(value, PromptFormat):
        return value
    if value in FORMATS:
        return FORMATS[value]
    if str(value).endswith((".yaml", ".yml")):
        return load_prompt_format(value)
    raise UserError(f"prompt format {value!r}: use one of {sorted(FORMATS)} or a YAML file of a PromptFormat's "
                    "fields (see docs/evaluation.md, prompt formats from YAML)")


# ---------------------------------------------------------------------------------------------------------- data
def load_questions(
    path: str | Path,
    question_field: str = "question",
    choices_field: str = "choices",
    label_field: str = "label",
    subject_field: str = "subject",
    id_field: str = "id",
    limit: int | None = None,
    subjects: Iterable[str] | None = None,
) -> list[MCQuestion]:
    """Read multiple-choice questions from JSONL (an asset name such as ``mmlu`` also works).

    ``label`` may be the index of the correct choice, its letter (``"B"``) or its text. Every problem is an error naming
    the file, line and field.
    """
    from ftframe import assets

    path = assets.asset_path(str(path)) if assets.is_asset(str(path)) else Path(path)
    if not path.is_file():
        raise UserError(f"questions file {path} does not exist; pass a JSONL file with {question_field}/"
                        f"{choices_field}/{label_field} per line, or an asset name (e.g. mmlu)")
    wanted = set(subjects) if subjects else None
    out: list[MCQuestion] = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key in (question_field, choices_field, label_field):
                if key not in rec:
                    raise UserError(f"{where}: missing field '{key}' (fields present: {sorted(rec)})")
            question, choices, label = rec[question_field], rec[choices_field], rec[label_field]
            if not isinstance(question, str):
                raise UserError(f"{where}: field '{question_field}' must be a string, got {type(question).__name__}")
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise UserError(f"{where}: field '{choices_field}' must be a list of strings")
            if len(choices) < 2:
                raise UserError(f"{where}: field '{choices_field}' has {len(choices)} choice(s); a multiple-choice "
                                "question needs at least 2")
            index = _label_index(label, choices)
            if index is None:
                raise UserError(f"{where}: field '{label_field}' = {label!r} is not a choice: use an index in "
                                f"0..{len(choices) - 1}, a letter A..{LETTERS[len(choices) - 1]}, or a choice's text")
            subject = rec.get(subject_field)
            if wanted is not None and subject not in wanted:
                continue
            out.append(MCQuestion(id=str(rec.get(id_field, f"{path.stem}-{n}")), question=question,
                                  choices=tuple(choices), label=index, subject=subject))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise UserError(f"{path}: no questions" + (f" for subjects {sorted(wanted)}" if wanted else ""))
    return out


def sample_evenly(questions: Sequence[MCQuestion], n: int) -> list[MCQuestion]:
    """``n`` questions taken at even intervals (MMLU's file is sorted by subject: this keeps most subjects in)."""
    if n >= len(questions):
        return list(questions)
    step = len(questions) / n
    return [questions[int(i * step)] for i in range(n)]


def _label_index(label: Any, choices: list[str]) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label if 0 <= label < len(choices) else None
    if isinstance(label, str):
        if len(label) == 1 and label in LETTERS[: len(choices)]:
            return LETTERS.index(label)
        if label in choices:
            return choices.index(label)
        if label.isdigit() and int(label) < len(choices):
            return int(label)
    return None


def few_shot(questions: Sequence[MCQuestion], k: int, seed: int) -> list[list[MCQuestion]]:
    """For each question, ``k`` other questions of the same subject, drawn with a fixed seed."""
    if k == 0:
        return [[] for _ in questions]
    by_subject: dict[Any, list[int]] = {}
    for i, q in enumerate(questions):
        by_subject.setdefault(q.subject, []).append(i)
    rng = random.Random(seed)
    shots = []
    for i, q in enumerate(questions):
        pool = [j for j in by_subject[q.subject] if j != i]
        if len(pool) < k:
            raise UserError(f"k_shot={k} but subject {q.subject!r} has only {len(pool) + 1} questions; lower k_shot")
        shots.append([questions[j] for j in rng.sample(pool, k)])
    return shots


# ---------------------------------------------------------------------------------------------------------- scoring
@dataclass
class _Item:
    """One question's token sequences: ``prefix`` (shared by every choice, run once) + ``rests[j]`` is choice j's
    whole sequence; its scored tokens are ``rests[j][offsets[j]:]`` (the rest before them is choice j's own
    context, as in partial scoring)."""

    index: int
    prefix: list[int]
    rests: list[list[int]]
    offsets: list[int]
    norm_lengths: list[int]
    truncated: int = 0


def _split_shared(pairs: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[list[int]], list[int]]:
    """(context, continuation) token pairs -> their longest shared prefix (never past a context's end), the rests and
    where each rest's scored tokens start."""
    fulls = [c + t for c, t in pairs]
    n = min(len(c) for c, _ in pairs)
    shared = 0
    while shared < n and all(f[shared] == fulls[0][shared] for f in fulls):
        shared += 1
    return fulls[0][:shared], [f[shared:] for f in fulls], [len(c) - shared for c, _ in pairs]


@dataclass
class MCResult:
    """Per-question records and the counts of questions truncated or skipped for length."""

    records: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens exactly as lm-evaluation-harness's ``hf`` backend makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _encode(tokenizer: Any, text: str) -> list[int]:
    bos = tokenizer.bos_token
    special = not (bos and text.startswith(bos))  # the tokenizer's default, unless the text starts with BOS already
    return tokenizer.encode(text, add_special_tokens=special)


def _max_length(model: Any, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and value < 1_000_000 else 2048


def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[MCQuestion],
    prompt_format: PromptFormat | str = "letter",
    k_shot: int = 0,
    seed: int = 1234,
    batch_size: int = 8,
    max_length: int | None = None,
    overflow: Literal["error", "truncate", "skip"] = "error",
    progress: bool = True,
) -> MCResult:
    """Score every choice of every question; returns per-question records (scores, prediction, gold).

    Works on any causal LM, including a model being trained (call it from a callback: the model is put in eval
    mode for the call and restored). ``overflow`` says what to do with a question whose context plus longest choice
    exceeds ``max_length`` (default: the model's context window): ``error`` stops naming the question,
    ``truncate`` drops context tokens from the left (as lm-evaluation-harness does), ``skip`` leaves it out and
    counts it.
    """
    fmt = resolve_prompt_format(prompt_format)
    limit = max_length or _max_length(model, tokenizer)
    result = MCResult()
    shots = few_shot(questions, k_shot, seed)
    items: list[_Item] = []
    for i, q in enumerate(questions):
        texts = fmt.choice_texts(q)
        pairs = [encode_pair(tokenizer, ctx, fmt.delimiter + t)
                 for ctx, t in zip(fmt.contexts(q, shots[i]), texts, strict=True)]
        if any(len(c) == 0 for c, _ in pairs):
            raise UserError(f"question {q.id}: the context encodes to no tokens; check the prompt format")
        if any(len(c) == 0 for _, c in pairs):
            raise UserError(f"question {q.id}: a choice encodes to no tokens; check the prompt format")
        prefix, rests, offsets = _split_shared(pairs)
        longest = max(len(r) for r in rests)
        item = _Item(i, prefix, rests, offsets, [len(t) for t in texts])
        if len(prefix) + longest > limit:
            if overflow == "error":
                raise UserError(f"question {q.id}: {len(prefix)} context + {longest} choice tokens exceed "
                                f"max_length={limit}; set overflow: truncate (drop context from the left) or skip, "
                                "or use fewer shots")
            if overflow == "skip":
                result.skipped.append(q.id)
                continue
            if longest >= limit:
                raise UserError(f"question {q.id}: a choice alone has {longest} tokens, more than max_length={limit}")
            item.truncated = len(prefix) + longest - limit
            item.prefix = prefix[item.truncated:]
            result.truncated += 1
        items.append(item)

    from ftframe.progress import bar as progress_bar

    bar = progress_bar(total=len(items), desc="[ftframe] multiple choice", unit="question", disable=not progress)
    scores: dict[int, tuple[list[float], list[bool]]] = {}
    try:
        from ftframe.models import transformers_model
        from ftframe.packing import varlen_attention_scope

        attention = nullcontext() if _uses_prompt_learning(model) else varlen_attention_scope(transformers_model(model))
        with scoring_mode(model) as device, attention:
            # longest questions first: similar lengths share a batch (less padding), and memory problems show at once
            order = sorted(items, key=lambda it: -(len(it.prefix) + max(len(r) for r in it.rests)))
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                for it, (lls, greedy) in zip(batch, _score_batch(model, batch, tokenizer, device), strict=True):
                    scores[it.index] = (lls, greedy)
                bar.update(len(batch))
    finally:
        bar.close()

    for it in items:
        q = questions[it.index]
        lls, greedy = scores[it.index]
        normed = [ll / n for ll, n in zip(lls, it.norm_lengths, strict=True)]
        pred, pred_norm = _argmax(lls), _argmax(normed)
        record = {
            "id": q.id, "subject": q.subject, "gold": q.label, "pred": pred, "pred_norm": pred_norm,
            "correct": pred == q.label, "correct_norm": pred_norm == q.label, "loglikelihoods": lls,
            "greedy": greedy, "context_tokens": len(it.prefix) + min(it.offsets), "truncated_tokens": it.truncated,
            "choice_chars": it.norm_lengths,
        }
        if q.true_labels is not None:
            record["mc2"] = mc2_score(lls, q.true_labels)
        result.records.append(record)
    return result


def mc2_score(loglikelihoods: Sequence[float], true_labels: Sequence[int]) -> float:
    """TruthfulQA MC2: the probability mass of the true answers, the choices' probabilities normalised to sum to 1."""
    top = max(loglikelihoods)
    probs = [math.exp(ll - top) for ll in loglikelihoods]  # shifted: same ratios, no underflow
    return sum(p for p, t in zip(probs, true_labels, strict=True) if t == 1) / sum(probs)


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    import inspect

    from ftframe.models import transformers_model

    try:
        return argument in inspect.signature(transformers_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The key/value cache as the model's forward names it: ``cache`` (transformers 5.2x), else ``past_key_values``."""
    return {"cache" if _accepts(model, "cache") else "past_key_values": cache}


def _cache_of(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _uses_prompt_learning(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and getattr(config, "is_prompt_learning", False))


def _score_batch(model: torch.nn.Module, batch: list[_Item], tokenizer: Any,
                 device: torch.device) -> list[tuple[list[float], list[bool]]]:
    if _uses_prompt_learning(model) or any(not it.prefix for it in batch):
        return _score_full_sequences(model, batch, tokenizer, device)
    if _segmentable(model, batch):
        return _score_segments(model, batch, tokenizer, device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # 1. shared prefixes, left-padded: the last column is every question's last shared token
    t = max(len(it.prefix) for it in batch)
    ids = torch.full((len(batch), t), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for r, it in enumerate(batch):
        ids[r, t - len(it.prefix):] = torch.tensor(it.prefix)
        mask[r, t - len(it.prefix):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # only the last position's logits are needed: skip the output layer (and a (B, T, vocab) tensor) elsewhere
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (Q, V): every rest's first token
    results: list[tuple[list[float], list[bool]]] = []
    for r, it in enumerate(batch):
        top = int(first[r].argmax())
        lls = [float(first[r, rest[0]]) if off == 0 else 0.0 for rest, off in zip(it.rests, it.offsets, strict=True)]
        results.append((lls, [rest[0] == top or off > 0 for rest, off in zip(it.rests, it.offsets, strict=True)]))
    # 2. rests longer than one token, on the prefix cache repeated per row; rows sorted by length and cut into
    #    groups of similar length, so a few long choices do not pad every short one
    groups = _length_groups(batch)
    for k, group in enumerate(groups):
        cache = _cache_of(out) if k == len(groups) - 1 else copy.deepcopy(_cache_of(out))
        _score_rests(model, batch, group, cache, mask, pad, device, results)
    return results


def _length_groups(batch: list[_Item]) -> list[list[tuple[int, int]]]:
    """The padded path's second pass: (question, choice) rows of choices longer than one token, longest first, cut
    into groups of similar length so that a few long choices do not pad every short one."""
    rows = [(r, j) for r, it in enumerate(batch) for j, rest in enumerate(it.rests) if len(rest) > 1]
    rows.sort(key=lambda rj: -len(batch[rj[0]].rests[rj[1]]))
    groups: list[list[tuple[int, int]]] = []
    for rj in rows:
        length = len(batch[rj[0]].rests[rj[1]]) - 1
        longest = len(batch[groups[-1][0][0]].rests[groups[-1][0][1]]) - 1 if groups else 0
        if not groups or (4 * length < 3 * longest and longest - length >= 16):
            groups.append([rj])  # under 3/4 of the group's longest and 16+ tokens shorter: a pass of its own pays
        else:
            groups[-1].append(rj)
    return groups


def _score_rests(model: torch.nn.Module, batch: list[_Item], rows: list[tuple[int, int]], cache: Any,
                 mask: torch.Tensor, pad: int, device: torch.device,
                 results: list[tuple[list[float], list[bool]]]) -> None:
    """Add the log-likelihood of tokens 2..n of each (question, choice) row, run on its question's prefix cache."""
    index = torch.tensor([r for r, _ in rows], device=device)
    cache.batch_select_indices(index)  # one cache row per (question, choice)
    m = max(len(batch[r].rests[j]) - 1 for r, j in rows)
    cont = torch.full((len(rows), m), pad, dtype=torch.long)
    cont_mask = torch.zeros((len(rows), m), dtype=torch.long)
    for k, (r, j) in enumerate(rows):
        tokens = batch[r].rests[j][:-1]  # the last token is only predicted, never fed
        cont[k, : len(tokens)] = torch.tensor(tokens)
        cont_mask[k, : len(tokens)] = 1
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    full_mask = torch.cat([mask[index], cont_mask], dim=1)
    cont_positions = (mask[index].sum(-1, keepdim=True) + torch.arange(m, device=device)[None, :])
    logits = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_positions, use_cache=True,
                   **_cache_kwarg(model, cache)).logits.float()
    logprobs = F.log_softmax(logits, dim=-1)  # (rows, m, V): predictions of rest tokens 2..n
    for k, (r, j) in enumerate(rows):
        rest, start = batch[r].rests[j], max(batch[r].offsets[j] - 1, 0)  # prediction i is of rest[i + 1]
        targets = rest[1 + start:]
        lp = logprobs[k, start: start + len(targets)]
        tgt = torch.tensor(targets, device=device)
        results[r][0][j] += float(lp.gather(-1, tgt[:, None]).sum())
        results[r][1][j] = results[r][1][j] and bool((lp.argmax(-1) == tgt).all())


def _segmentable(model: torch.nn.Module, batch: list[_Item]) -> bool:
    """The one-pass tree path needs ``ftframe_varlen`` attention (switched on for the scoring call), position ids and
    ``logits_to_keep``, no attention-logit soft-capping, and no sliding window shorter than a question's tree."""
    from ftframe.models import transformers_model
    from ftframe.packing import ATTENTION

    config = getattr(transformers_model(model), "config", None)
    if getattr(config, "_attn_implementation", None) != ATTENTION:
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    window = getattr(config, "sliding_window", None)
    longest = max(len(it.prefix) + sum(len(r) for r in it.rests) for it in batch)
    if isinstance(window, int) and getattr(config, "use_sliding_window", True) and window < longest:
        return False
    return _accepts(model, "logits_to_keep") and _accepts(model, "position_ids")


def _token_tree(it: _Item) -> tuple[list[int], list[int], list[list[int]]]:
    """A question as one token tree: the shared prefix, then every choice's tokens (all but the last, which is only
    predicted) as a branch; choices that begin alike share those nodes. Returns the nodes' tokens, their parents
    (-1 for the root) and, per choice, the node that predicts each of its rest tokens."""
    tokens = list(it.prefix)
    parents = list(range(-1, len(tokens) - 1))
    child: dict[tuple[int, int], int] = {}
    predictors = []
    for rest in it.rests:
        node = len(it.prefix) - 1
        path = [node]  # path[i] predicts rest[i]
        for t in rest[:-1]:
            nxt = child.get((node, t))
            if nxt is None:
                nxt = child[(node, t)] = len(tokens)
                tokens.append(t)
                parents.append(node)
            node = nxt
            path.append(node)
        predictors.append(path)
    return tokens, parents, predictors


def _tree_mask(parents: list[int], chain: int) -> torch.Tensor | None:
    """``(n, n)`` booleans: node i attends to node k when k is i or one of its ancestors. ``None`` when the tree is
    a plain chain (causal attention)."""
    n = len(parents)
    if n == chain:
        return None
    allowed = torch.ones(n, n, dtype=torch.bool).tril_()
    allowed[chain:] = False
    for i in range(chain, n):  # parents come before their children
        allowed[i] = allowed[parents[i]]
        allowed[i, i] = True
    return allowed


def _score_segments(model: torch.nn.Module, batch: list[_Item], tokenizer: Any,
                    device: torch.device) -> list[tuple[list[float], list[bool]]]:
    """One forward pass for the whole batch, without padding: every question's token tree (:func:`_token_tree`) is
    a span of a single row, positions counting depth in the tree, attention within the span along the tree's paths
    (``ftframe_varlen``). Each token is run once, choices' common beginnings too, and the output layer runs only
    where a scored token is predicted."""
    from ftframe.packing import packed_forward

    ids: list[int] = []
    positions: list[int] = []
    bounds = [0]
    masks: list[torch.Tensor | None] = []
    wanted: list[tuple[int, int, int, int]] = []  # (question, choice, row column predicting the token, token)
    for r, it in enumerate(batch):
        tokens, parents, predictors = _token_tree(it)
        depth = list(range(len(it.prefix)))
        for p in parents[len(it.prefix):]:
            depth.append(depth[p] + 1)
        base = len(ids)
        ids += tokens
        positions += depth
        bounds.append(len(ids))
        masks.append(_tree_mask(parents, len(it.prefix)))
        for j, (rest, path) in enumerate(zip(it.rests, predictors, strict=True)):
            wanted += [(r, j, base + path[i], rest[i]) for i in range(it.offsets[j], len(rest))]
    keep = sorted({c for _, _, c, _ in wanted})
    column = {c: k for k, c in enumerate(keep)}
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    with packed_forward(cu, [m if m is None else m.to(device) for m in masks]):
        logits = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions],
                       device=device), use_cache=False, logits_to_keep=torch.tensor(keep, device=device),
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest).logits[0]
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (kept columns, V)
    cols = torch.tensor([column[c] for _, _, c, _ in wanted], device=device)
    targets = torch.tensor([t for _, _, _, t in wanted], device=device)
    values = logprobs[cols, targets].tolist()
    hits = (logprobs.argmax(-1)[cols] == targets).tolist()
    results = [([0.0] * len(it.rests), [True] * len(it.rests)) for it in batch]
    for (r, j, _, _), v, hit in zip(wanted, values, hits, strict=True):
        results[r][0][j] += v
        results[r][1][j] = results[r][1][j] and hit
    return results


def _score_full_sequences(model: torch.nn.Module, batch: list[_Item], tokenizer: Any,
                          device: torch.device) -> list[tuple[list[float], list[bool]]]:
    """One row per (question, choice) with its whole sequence: for peft prompt-learning models, whose virtual
    tokens or prefixes the cached path cannot carry, and for choices that share no first token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [(r, j) for r, it in enumerate(batch) for j in range(len(it.rests))]
    seqs = [batch[r].prefix + batch[r].rests[j] for r, j in rows]
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.tensor(s)
        mask[k, : len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    virtual = logits.shape[1] - t  # prompt tuning / P-tuning put virtual tokens in front
    logprobs = F.log_softmax(logits[:, virtual:], dim=-1)
    results = [([0.0] * len(it.rests), [True] * len(it.rests)) for it in batch]
    for k, (r, j) in enumerate(rows):
        n_ctx = len(batch[r].prefix) + batch[r].offsets[j]
        cont = seqs[k][n_ctx:]
        lp = logprobs[k, n_ctx - 1: n_ctx - 1 + len(cont)]
        tgt = torch.tensor(cont, device=lp.device)
        results[r][0][j] = float(lp.gather(-1, tgt[:, None]).sum())
        results[r][1][j] = bool((lp.argmax(-1) == tgt).all())
    return results


# ---------------------------------------------------------------------------------------------------------- report
def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` with their standard errors, overall and per subject."""

    def stats(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(recs)
        acc = sum(r["correct"] for r in recs) / n
        acc_norm = sum(r["correct_norm"] for r in recs) / n

        def se(p: float) -> float:
            return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

        return {"n": n, "acc": acc, "acc_stderr": se(acc), "acc_norm": acc_norm, "acc_norm_stderr": se(acc_norm)}

    if not records:
        return {"n": 0}
    out = stats(records)
    subjects: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("subject") is not None:
            subjects.setdefault(r["subject"], []).append(r)
    if subjects:
        out["subjects"] = {s: stats(rs) for s, rs in sorted(subjects.items())}
    return out
