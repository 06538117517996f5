"""``ftframe generate``: answer prompts with a base model plus a saved adapter (chat template applied)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ftframe.device import inference_dtype
from ftframe.errors import UserError
from ftframe.models import InferenceDType, load_model, load_tokenizer

__all__ = ["Generator", "generate"]


class Generator:
    """A loaded model (base, or base + adapter, or a full fine-tuned folder) ready to answer prompts.

    Args:
        adapter: Folder written by ``ftframe fit``: a peft adapter, bottleneck adapters, or a full model folder (full
            fine-tuning, LastLayers). A QLoRA / LoftQ adapter (``ftframe_base_quantization.json``, or QLoRA recorded
            in ``ftframe.json``) is applied to the base quantized as in training.
        model: Base model; ``None`` = the base recorded in the adapter folder.
        dtype: dtype to load the weights in; ``auto``: float32 on a CPU, bfloat16 (or float16) on a CUDA GPU (see
            :mod:`ftframe.device`). An explicit 16-bit dtype on a CPU without fast 16-bit matmuls is warned about.
    """

    def __init__(self, adapter: str | None = None, model: str | None = None, dtype: InferenceDType = "auto") -> None:
        from transformers import AutoModelForCausalLM

        from ftframe.methods import load_trained

        self.dtype = dtype = inference_dtype(dtype, "cpu")  # (models load on the CPU; a 4-bit base on CUDA if any)
        if adapter:
            # loaded by the method that wrote the folder (FineTuneModule.load_trained): adapter + base, or a model
            loaded, info = load_trained(adapter, model, dtype)
            tok_source = str(info.path) if (info.path / "tokenizer_config.json").is_file() else model or info.base
        elif model:
            loaded, tok_source = load_model(model, AutoModelForCausalLM, dtype=dtype), model
        else:
            raise UserError("no base model: pass --model (an asset name, folder, .gguf file or hub id)")
        self.tokenizer = load_tokenizer(tok_source or str(info.path), padding_side="left")
        self.model = loaded.eval()

    def prompt_text(self, prompt: str, system_prompt: str | None = None) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": prompt}]
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        from ftframe.data.templates import TEMPLATES

        return TEMPLATES["alpaca"].user.format(content=prompt)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 system_prompt: str | None = None) -> list[str]:
        tok = self.tokenizer
        texts = [self.prompt_text(p, system_prompt) for p in prompts]
        add_special = not getattr(tok, "chat_template", None)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        sample = temperature > 0
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None,
            pad_token_id=tok.pad_token_id,
        )
        return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def generate(
    prompt: str | list[str] | None = None,
    adapter: str | None = None,
    model: str | None = None,
    prompts_file: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    dtype: InferenceDType = "auto",
    seed: int = 0,
) -> list[str]:
    """Answer prompts with a base model plus a saved adapter.

    Args:
        prompt: Prompt to answer, or a list (``--prompt '[a, b]'``). With none and no prompts_file, read stdin lines.
        adapter: Folder written by ``ftframe fit`` (``<log_dir>/adapter``); omit to use the base model alone.
        model: Base model (asset name, folder, .gguf, hub id); default: the base recorded in the adapter.
        prompts_file: Text file with one prompt per line, or JSONL with a ``prompt`` field per line.
        max_new_tokens: Maximum tokens to generate per prompt.
        temperature: 0 = greedy decoding; > 0 samples.
        top_p: Nucleus sampling threshold (when sampling).
        system_prompt: System message for chat templates (default: the template's own).
        dtype: dtype to load the model in; ``auto``: float32 on a CPU (see :mod:`ftframe.device`).
        seed: Random seed (for sampling).
    """
    torch.manual_seed(seed)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts_file {prompts_file!r} does not exist")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{i}: expected a JSON object with a 'prompt' field ({e})") from None
            else:
                prompts.append(line)
    interactive = not prompts
    gen = Generator(adapter=adapter, model=model, dtype=dtype)
    answers: list[str] = []
    if interactive:
        print("[ftframe] reading prompts from stdin, one per line (Ctrl-D to end)", file=sys.stderr)
        prompts_iter: Any = (ln.rstrip("\n") for ln in sys.stdin)
    else:
        prompts_iter = prompts
    for p in prompts_iter:
        if not p.strip():
            continue
        (answer,) = gen([p], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        system_prompt=system_prompt)
        answers.append(answer)
        print(f">>> {p}\n{answer}\n", flush=True)
    return answers
