"""Perplexity of a text with a sliding window.

Each text is tokenized once, after a BOS token. Windows of up to ``max_length`` tokens advance by ``stride`` tokens;
each window scores only the ``stride`` tokens no earlier window scored, with the rest of the window (at least one
token) as their context. ``stride = max_length`` (the default) gives back-to-back windows (fastest, least context;
they overlap by the one token a window's first prediction needs); smaller strides give every token more context.
Every token after BOS is scored exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ftframe.errors import UserError
from ftframe.evaluation.common import scoring_mode

__all__ = ["pad_windows", "perplexity", "read_texts", "text_windows"]


def read_texts(source: str | Path, field: str = "text") -> list[str]:
    """Texts from a ``.txt`` file (the whole file), or JSONL / a folder of JSON files with a ``field`` per record."""
    import json

    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl")) + sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"{path}: no .txt, .json or .jsonl files")
        return [t for f in files for t in read_texts(f, field)]
    if not path.is_file():
        raise UserError(f"text source {path} does not exist; pass a .txt file, a JSONL file or a folder")
    raw = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".txt":
        return [raw]
    records: list[Any] = []
    if path.suffix == ".json":
        records = [json.loads(raw)]
    else:
        for n, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    texts = []
    for n, rec in enumerate(records, start=1):
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise UserError(f"{path} record {n}: expected an object with a string field '{field}'")
        texts.append(rec[field])
    return texts


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    max_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-level perplexity of ``texts`` (each scored on its own), with negative log-likelihood and token count.

    Returns ``{"perplexity", "nll_per_token", "tokens", "bits_per_byte", "windows"}``.
    """
    windows, n_bytes = text_windows(tokenizer, texts, max_length, stride)
    stride = stride or max_length
    from ftframe.progress import bar as progress_bar

    nll, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with scoring_mode(model) as device:
        for i in progress_bar(range(0, len(windows), batch_size), desc="[ftframe] perplexity", unit="batch",
                      disable=not progress):
            chunk = windows[i:i + batch_size]
            ids, mask = pad_windows(chunk, pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            for r, (w, scored) in enumerate(chunk):
                lp = F.log_softmax(logits[r, len(w) - scored - 1: len(w) - 1], dim=-1)
                tgt = torch.tensor(w[len(w) - scored:], device=lp.device)
                nll -= float(lp.gather(-1, tgt[:, None]).sum())
                count += scored
    per_token = nll / count
    return {"perplexity": math.exp(per_token), "nll_per_token": per_token, "tokens": count,
            "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "windows": len(windows),
            "max_length": max_length, "stride": stride}


def text_windows(tokenizer: Any, texts: Iterable[str], max_length: int,
                 stride: int | None = None) -> tuple[list[tuple[list[int], int]], int]:
    """Split tokenized ``texts`` into scoring windows: ``([(token ids, how many at the end are scored)], n_bytes)``."""
    stride = stride or max_length
    if max_length < 2:
        raise UserError(f"max_length must be >= 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise UserError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    windows: list[tuple[list[int], int]] = []
    n_bytes = 0
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        ids = [bos, *tokenizer.encode(text, add_special_tokens=False)]  # the first real token is predicted from BOS
        scored_until = 1  # tokens before this position are scored already (position 0, BOS, never is)
        step = min(stride, max_length - 1)  # a window's first token is context only
        while scored_until < len(ids):
            end = min(scored_until + step, len(ids))
            start = max(0, end - max_length)
            windows.append((ids[start:end], end - scored_until))
            scored_until = end
    if not windows:
        raise UserError("perplexity: the texts are empty")
    return windows, n_bytes


def pad_windows(windows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)`` of shape (len(windows), longest window)."""
    t = max(len(w) for w, _ in windows)
    ids = torch.full((len(windows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(windows), t), dtype=torch.long)
    for r, (w, _) in enumerate(windows):
        ids[r, : len(w)] = torch.tensor(w)
        mask[r, : len(w)] = 1
    return ids, mask
