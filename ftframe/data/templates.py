"""From records to conversations, and from conversations to text with the supervised character spans.

Two ways to render a conversation:

* the tokenizer's own chat template (default): assistant spans are found by rendering growing prefixes of the
  conversation, so whatever the template puts after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ...) is
  part of the supervised span -- the model learns to stop;
* a named simple template from :data:`TEMPLATES` for models without one; the tokenizer's EOS ends each response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ftframe.data.readers import Record
from ftframe.errors import UserError

__all__ = ["TEMPLATES", "Format", "SimpleTemplate", "render", "to_messages"]

Format = Literal["auto", "alpaca", "chat", "prompt_completion"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SimpleTemplate:
    """Format strings per role; ``{content}`` is the message, ``{eos}`` the tokenizer's EOS token."""

    system: str
    user: str
    assistant: str


TEMPLATES: dict[str, SimpleTemplate] = {
    "alpaca": SimpleTemplate(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n### Response:\n",
        assistant="{content}{eos}\n\n",
    ),
    "chatml": SimpleTemplate(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
    ),
    "plain": SimpleTemplate(system="{content}\n", user="{content}\n", assistant="{content}{eos}\n"),
}


def _field(rec: Record, name: str, required: bool = True) -> Any:
    if name not in rec.data or rec.data[name] is None:
        if not required:
            return None
        raise UserError(f"{rec.where}: field '{name}' is missing (record has {sorted(rec.data)}). Add it, or map "
                        f"your column with the data module's *_field options.")
    value = rec.data[name]
    if not isinstance(value, str):
        raise UserError(f"{rec.where}: field '{name}' must be a string, got {type(value).__name__} {value!r:.60}")
    return value


def detect_format(rec: Record, fields: dict[str, str]) -> str:
    """Pick the record format from which configured fields the first record has."""
    if fields["messages"] in rec.data:
        return "chat"
    if fields["instruction"] in rec.data and fields["output"] in rec.data:
        return "alpaca"
    if fields["prompt"] in rec.data and fields["completion"] in rec.data:
        return "prompt_completion"
    raise UserError(
        f"{rec.where}: cannot tell the record format from its fields {sorted(rec.data)}. Expected "
        f"'{fields['messages']}' (chat), '{fields['instruction']}'+'{fields['output']}' (alpaca) or "
        f"'{fields['prompt']}'+'{fields['completion']}' (prompt_completion); set format and the *_field options."
    )


def check_messages(rec: Record, field: str, raw: list[Any], roles: tuple[str, ...] = ROLES) -> list[dict[str, str]]:
    """``raw`` (the list in ``rec``'s ``field``) as ``[{role, content}]``, or a :class:`UserError` naming the message
    and what is wrong with it."""
    messages = []
    for i, m in enumerate(raw):
        path = f"{field}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{rec.where}: field '{path}' must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in roles:
            raise UserError(f"{rec.where}: field '{path}.role' is {m['role']!r}; use one of {list(roles)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{rec.where}: field '{path}.content' must be a string, got {type(m['content']).__name__}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def to_messages(rec: Record, fmt: str, fields: dict[str, str], system_prompt: str | None) -> list[dict[str, str]]:
    """Convert one record into ``[{role, content}]`` with at least one assistant message."""
    if fmt == "alpaca":
        instruction = _field(rec, fields["instruction"])
        extra = _field(rec, fields["input"], required=False)
        user = instruction if not extra else f"{instruction}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _field(rec, fields["output"])}]
    elif fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": _field(rec, fields["prompt"])},
            {"role": "assistant", "content": _field(rec, fields["completion"])},
        ]
    elif fmt == "chat":
        raw = rec.data.get(fields["messages"])
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{rec.where}: field '{fields['messages']}' must be a non-empty list of "
                            f"{{role, content}} objects, got {raw!r:.80}")
        messages = check_messages(rec, fields["messages"], raw)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{rec.where}: field '{fields['messages']}' has no assistant message, so nothing would be "
                            "learned from it; add one or remove the record")
    else:
        raise UserError(f"format {fmt!r} is not one of ['alpaca', 'chat', 'prompt_completion', 'auto']")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render(messages: list[dict[str, str]], tokenizer: Any, template: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation to text and return it with the character spans to supervise (assistant turns)."""
    if template == "chat_template":
        return _render_chat_template(messages, tokenizer)
    tpl = TEMPLATES[template]
    eos = tokenizer.eos_token or ""
    text, spans = "", []
    for m in messages:
        piece = getattr(tpl, m["role"]).format(content=m["content"], eos=eos)
        if m["role"] == "assistant":
            # supervise content + EOS, not the separator after it
            end = len(text) + len(m["content"]) + len(eos) if "{eos}" in tpl.assistant else len(text) + len(piece)
            spans.append((len(text), end))
        text += piece
    return text, spans


def _render_chat_template(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise UserError(
                "the tokenizer's chat template renders a conversation prefix differently from the full conversation "
                "(it rewrites earlier turns), so assistant tokens cannot be located; use a named template "
                f"(template: one of {sorted(TEMPLATES)})"
            )
        # span = assistant content plus the template's turn terminator; trailing newlines are left unsupervised
        end = len(upto.rstrip("\n")) if upto.rstrip("\n") != before else len(upto)
        spans.append((len(before), end))
    return full, spans
