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

        from ftframe.artifacts import read_trained

        self.dtype = dtype = inference_dtype(dtype, "cpu")  # (models load on the CPU; a 4-bit base on CUDA if any)
        # what the folder holds: a peft adapter, ftframe's bottleneck adapters, or a full model
        info = read_trained(adapter) if adapter else None
        adapter_dir = info.path if info is not None else None
        kind = info.kind if info is not None else None
        if model is None:
            model = str(adapter_dir) if kind == "full" else (info.base if info is not None else None)
            if not model:
                raise UserError("no base model: pass --model (an asset name, folder, .gguf file or hub id)")
        tok_source = str(adapter_dir) if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file() \
            else model
        self.tokenizer = load_tokenizer(tok_source, padding_side="left")
        if info is not None and info.quantization is not None and kind == "peft":
            # QLoRA / LoftQ adapters were trained on a 4-bit base: rebuild that base, the model that was trained
            from transformers import BitsAndBytesConfig

            quant = BitsAndBytesConfig.from_dict(info.quantization)
            base = load_model(model, AutoModelForCausalLM, dtype=dtype, quantization_config=quant,
                              device_map={"": "cuda" if torch.cuda.is_available() else "cpu"})
        else:
            base = load_model(model, AutoModelForCausalLM, dtype=dtype)
        if kind == "peft":
            base = _load_peft(base, adapter_dir, model)
        elif kind == "bottleneck":
            from ftframe.methods.bottleneck import load_bottleneck_adapters

            base = load_bottleneck_adapters(str(adapter_dir), base)
        self.model = base.eval()

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


def _load_peft(base: Any, adapter_dir: Path, model_name: str) -> Any:
    """``PeftModel.from_pretrained``, with a mismatch between adapter and base reported as one clear error."""
    import warnings

    from peft import PeftModel

    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    hint = (f"the adapter {adapter_dir} was trained on {recorded!r}; it does not fit the base {model_name!r}. "
            "Pass the base it was trained on (--model), or omit --model to use the recorded one")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loaded = PeftModel.from_pretrained(base, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise UserError(f"{hint} ({type(e).__name__}: {first})") from None
    missing = [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    if missing:
        raise UserError(f"{hint} (peft: {str(missing[0].message).splitlines()[0][:300]})")
    for w in caught:
        if "missing adapter keys" not in str(w.message).lower():
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded
