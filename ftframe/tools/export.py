"""``ftframe export --format gguf``: write a llama-architecture model (a base, a merged folder, or a base plus a LoRA
adapter merged in memory) as one GGUF v3 file for llama.cpp and its relatives, then prove the file by loading it
back with transformers and comparing token ids, chat template, logits and greedy generations with the source.
Tensor names come from ``gguf``'s own ``TensorNameMap``; q/k projections are permuted to llama.cpp's interleaved
rotary layout (transformers' GGUF loader permutes them back); the tokenizer is written as a byte-level BPE
(``tokenizer.ggml.model = "gpt2"``), its merges, special token ids and chat template by ``gguf.SpecialVocab``.
Anything the llama GGUF layout cannot hold (biases, another activation, rope scaling, an unmapped tensor, a
sentencepiece tokenizer) is refused instead of silently dropped.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from ftframe.errors import UserError

__all__ = ["DEFAULT_PROMPTS", "OutType", "SUPPORTED_MODEL_TYPES", "TOLERANCES", "check_roundtrip", "export",
           "write_gguf"]

OutType = Literal["f32", "f16", "bf16", "q8_0"]

# outtype -> (ggml type of the 2-D weights, llama.cpp's general.file_type)
_OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# transformers model_type -> what must hold for it to be llama.cpp's "llama" architecture unchanged
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "always",
    "mistral": "sliding_window null (or at least max_position_embeddings): llama.cpp's llama graph has no window",
}

# Round-trip logit tolerance per outtype: max |logit_gguf - logit_source| <= atol + rtol * max |logit_source|.
# Per weight, f16 rounds to 11 significant bits (relative error <= 2^-11 ~ 0.05%), bf16 to 8 (<= 2^-8 ~ 0.4%), and
# q8_0 to 1/254 of its block's largest weight (~1% of a typical weight, more than bf16). Measured on the default
# model (docs/export.md), max logit diff / logit scale: f32 0 (the same numbers read back), f16 0.11%, bf16 0.72%,
# q8_0 3.4%; on the tests' random tiny llama (std 0.2, chaotic): f16 0.2%, bf16 1.5%, q8_0 5.2%. Each bound leaves
# 1.5-5x room over the larger measurement, and is far below what a broken file does (omitting the q/k
# permutation moves the tiny llama's logits by 143% of their scale).
TOLERANCES: dict[str, tuple[float, float]] = {
    "f32": (1e-4, 1e-5),
    "f16": (1e-3, 0.01),
    "bf16": (1e-3, 0.04),
    "q8_0": (1e-3, 0.08),
}

DEFAULT_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]

_Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]  # 32 weights per block


def _check_supported(model: Any) -> None:
    """Refuse models the llama GGUF layout (and transformers' reader of it) cannot represent exactly."""
    if hasattr(model, "peft_config"):
        raise UserError(f"{type(model).__name__} is a peft-wrapped model: merge the adapter first "
                        "(`ftframe export --adapter FOLDER` merges it in memory)")
    config = model.config
    arch = type(model).__name__
    model_type = getattr(config, "model_type", None)
    supported = sorted(SUPPORTED_MODEL_TYPES)
    if model_type not in SUPPORTED_MODEL_TYPES or model.get_output_embeddings() is None:
        raise UserError(f"cannot export {arch} (config.model_type={model_type!r}) to GGUF: ftframe writes causal "
                        f"language models of model_type {supported} (llama.cpp's 'llama' architecture). Convert "
                        "other architectures with llama.cpp's convert_hf_to_gguf.py")
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (llama uses 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True (transformers' GGUF reader of llama drops biases)")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope} (transformers' GGUF reader of llama does not read rope scaling back, "
                        "so the round trip could not be checked)")
    if model_type == "mistral":
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            problems.append(f"sliding_window={window} < max_position_embeddings={config.max_position_embeddings} "
                            f"({SUPPORTED_MODEL_TYPES['mistral']})")
    if problems:
        raise UserError(f"cannot export {arch} (config.model_type={model_type!r}) to GGUF without changing what it "
                        f"computes: {'; '.join(problems)}. Use llama.cpp's convert_hf_to_gguf.py for such models")


def _rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings as one dict: transformers 5's ``rope_parameters``, or 4.x's ``rope_theta`` / ``rope_scaling``."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        rope.update(scaling)
        rope.setdefault("rope_type", scaling.get("type", "default"))
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (``convert_hf_to_gguf.py``'s ``permute``).

    Within each head, rows [0..d/2) and [d/2..d) are the two halves of the rotary pairs; llama.cpp wants pair i at
    rows 2i, 2i+1. transformers' ``LlamaTensorProcessor`` applies the inverse when it reads the file.
    """
    # (n_head * head_dim, in) -> (n_head, 2, head_dim/2, in) -> (n_head, head_dim/2, 2, in)
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer's pre-tokenizer."""

    def byte_level(p: dict[str, Any], regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == regex)

    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and byte_level(steps[0], regex=True):
        return "gpt-2"
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1], regex=True)):
        return "smollm"  # SmolLM's own tokenizer.json; transformers' GGUF reader does not split digits for it
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], regex=False):
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:  # transformers < 5 has no table of split regexes
            GGUF_PRE_TOKENIZER_SPLITS = {}
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == pattern:
                return name
    raise UserError(f"the tokenizer's pre-tokenizer {json.dumps(pre)} is not one ftframe can name for llama.cpp "
                    "(plain byte-level, digits + byte-level, or a split regex transformers' GGUF reader knows); "
                    "convert this model with llama.cpp's convert_hf_to_gguf.py")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """Write a byte-level BPE tokenizer as llama.cpp's "gpt2" model; return what was written (for the report)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; GGUF export needs a fast one "
                        "(a tokenizer.json): save the model folder with a fast tokenizer")
    spec = json.loads(backend.to_str())
    bpe = spec["model"]
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(f"the tokenizer is not a byte-level BPE (model {bpe.get('type')}, byte_fallback "
                        f"{bpe.get('byte_fallback')}, decoder {(spec.get('decoder') or {}).get('type')}): ftframe "
                        "exports byte-level BPE tokenizers (GPT-2 / SmolLM / Llama 3 style) only; convert sentencepiece "
                        "models with llama.cpp's convert_hf_to_gguf.py")
    if spec.get("normalizer") is not None:
        raise UserError(f"the tokenizer has a normalizer ({spec['normalizer'].get('type')}), which a GGUF "
                        "byte-level tokenizer cannot hold")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                        f"{vocab_size}: resize the embeddings (model.resize_token_embeddings) before exporting")
    # ids the tokenizer does not use (a vocab padded to a multiple of 64): llama.cpp's "[PAD<id>]", type UNUSED
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        # special -> CONTROL (never produced from text unless asked); others stay whole in text -> USER_DEFINED
        tokens[i] = added.content
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # whether encoding adds BOS / EOS is a property of the post-processor: read it off an encoding
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    add_bos = ids["bos"] is not None and len(full) > len(plain) and full[0] == ids["bos"]
    add_eos = ids["eos"] is not None and len(full) > len(plain) and full[-1] == ids["eos"]
    if full != [ids["bos"]] * add_bos + plain + [ids["eos"]] * add_eos:
        raise UserError(f"the tokenizer adds special tokens other than BOS / EOS ({full} for {plain}), which GGUF "
                        "cannot describe")
    # merges, special token ids and the chat template(s): gguf's SpecialVocab reads them from the saved tokenizer
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    read = {k: special.special_token_ids.get(k) for k in ids}
    if read != ids:
        raise UserError(f"gguf.SpecialVocab reads the special token ids {read} from the saved tokenizer, but the "
                        f"tokenizer has {ids}; the file would not match the tokenizer, so nothing was written")
    # SpecialVocab takes add_*_token from tokenizer_config.json or a simple post-processor, if it finds them there
    # (transformers 5 saves neither for a plain tokenizers backend); the encoding above is what the tokenizer does
    special.add_special_token.update(bos=add_bos, eos=add_eos)
    special.add_to_gguf(writer, quiet=True)
    return {"pre": pre, "tokens": len(vocab), "merges": len(special.merges), "add_bos": add_bos, "add_eos": add_eos,
            "control": sum(t == gguf.TokenType.CONTROL for t in types),
            "user_defined": sum(t == gguf.TokenType.USER_DEFINED for t in types),
            "chat_template": bool(special.chat_template), **{f"{k}_id": v for k, v in ids.items()}}


def write_gguf(model: Any, tokenizer: Any, path: Path, outtype: OutType = "f16", name: str | None = None) -> dict:
    """Write ``model`` (a transformers ``LlamaForCausalLM``, or a Mistral without sliding window) and its tokenizer
    as one GGUF v3 file.

    2-D weights are stored as ``outtype``; norm weights and other 1-D tensors stay f32 (as llama.cpp does). q8_0
    needs rows of a multiple of 32 weights: other tensors fall back to f16 (counted in the result). A tied output
    layer is not written (llama.cpp and transformers reuse ``token_embd``).

    Args:
        model: The model, float32 / bfloat16 / float16, on any device.
        tokenizer: Its fast tokenizer (byte-level BPE).
        path: File to write (overwritten).
        outtype: Storage type of the 2-D weights.
        name: ``general.name``; default: the name of the model's folder.

    Returns:
        ``{"path", "outtype", "bytes", "tensors": {ggml type: count}, "q8_0_fallback_f16", "tokenizer", "seconds"}``.

    Raises:
        UserError: the architecture, a config feature, a tensor or the tokenizer cannot be represented.
    """
    start = time.perf_counter()
    if outtype not in _OUTTYPES:
        raise UserError(f"outtype {outtype!r} is not supported; choose one of {list(_OUTTYPES)}")
    _check_supported(model)
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    n_blocks = config.num_hidden_layers
    qtype, file_type = _OUTTYPES[outtype]
    path = Path(path)

    # map every tensor first: an unmapped one stops the export before anything is written
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tied = outputs.data_ptr() == inputs.data_ptr()
    state = model.state_dict()
    output_key = next(n for n, m in model.named_modules() if m is model.get_output_embeddings()) + ".weight"
    mapped: list[tuple[str, torch.Tensor]] = []
    unmapped = []
    for key, tensor in state.items():
        if tied and key == output_key:
            continue
        gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unmapped.append(key)
        else:
            mapped.append((gguf_name, tensor))
    if unmapped:
        raise UserError(f"{type(model).__name__} has tensors with no place in llama's GGUF layout: {unmapped[:8]}"
                        f"{' ...' if len(unmapped) > 8 else ''}; they would be dropped, so nothing was written")

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    name = name or Path(str(getattr(config, "name_or_path", "") or path.stem)).name or path.stem
    # transformers' reader takes a llama file named exactly "mistral" for an architecture it then cannot map
    writer.add_name(f"{name}-llama" if name == "mistral" else name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.do_sample:  # llama.cpp's default sampler settings for this model
        for key, add in (("temperature", writer.add_sampling_temp), ("top_k", writer.add_sampling_top_k),
                         ("top_p", writer.add_sampling_top_p)):
            if getattr(generation, key, None) is not None:
                add(getattr(generation, key))
    tokenizer_info = _add_tokenizer(writer, tokenizer, config.vocab_size)

    counts: Counter[str] = Counter()
    fallback = 0
    for gguf_name, tensor in mapped:
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()  # numpy has no bfloat16
        if gguf_name.endswith("attn_q.weight"):
            data = _permute(data, n_head)
        elif gguf_name.endswith("attn_k.weight"):
            data = _permute(data, n_kv)
        kind = qtype if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % _Q8_0_BLOCK:
            kind = gguf.GGMLQuantizationType.F16
            fallback += 1
        stored = gguf.quants.quantize(data, kind)
        raw = kind if kind in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16) else None
        writer.add_tensor(gguf_name, stored, raw_dtype=raw)
        counts[kind.name] += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"path": str(path), "outtype": outtype, "bytes": path.stat().st_size, "tensors": dict(sorted(counts.items())),
            "q8_0_fallback_f16": fallback, "tied_embeddings": tied, "tokenizer": tokenizer_info,
            "seconds": round(time.perf_counter() - start, 3)}


def _load_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    # From an empty folder: next to tokenizer files (a file written into a model folder), transformers would mix
    # those into the GGUF's tokenizer, and the check would compare the source tokenizer with itself.
    with tempfile.TemporaryDirectory() as empty:
        tokenizer = AutoTokenizer.from_pretrained(empty, gguf_file=str(path))
        model = AutoModelForCausalLM.from_pretrained(empty, gguf_file=str(path), dtype=torch.float32)
    return model.eval(), tokenizer


def _prompt_text(tokenizer: Any, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def _compare(source: Any, tokenizer: Any, loaded: Any, loaded_tokenizer: Any, outtype: str, prompts: list[str],
             max_new_tokens: int) -> dict[str, Any]:
    """The round-trip numbers of :func:`check_roundtrip`, for models already loaded."""
    from transformers import GenerationConfig

    atol, rtol = TOLERANCES[outtype]
    texts = [_prompt_text(tokenizer, p) for p in prompts]
    token_mismatches = []
    for text in [*texts, *prompts]:
        ids, loaded_ids = tokenizer(text)["input_ids"], loaded_tokenizer(text)["input_ids"]
        if ids != loaded_ids or tokenizer.decode(ids) != loaded_tokenizer.decode(loaded_ids):
            token_mismatches.append({"text": text, "source": ids, "gguf": loaded_ids})
    template_match = getattr(tokenizer, "chat_template", None) == getattr(loaded_tokenizer, "chat_template", None)

    device = next(source.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    greedy = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    max_diff = scale = 0.0
    agree = positions = 0
    generations = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            a = source(ids.to(device)).logits[0].float().cpu()  # (seq, vocab)
            b = loaded(ids).logits[0].float()
            max_diff = max(max_diff, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            positions += a.shape[0]
            mask = torch.ones_like(ids)
            out_a = source.generate(ids.to(device), attention_mask=mask.to(device),
                                    generation_config=greedy)[0, ids.shape[1]:].cpu().tolist()
            out_b = loaded.generate(ids, attention_mask=mask, generation_config=greedy)[0, ids.shape[1]:].tolist()
            generations.append({"prompt": text, "source": out_a, "gguf": out_b, "identical": out_a == out_b})
    tolerance = atol + rtol * scale
    for g in generations:
        if g["identical"]:
            continue
        # Where greedy decoding split. If both models' logits there are within the tolerance of each other and the
        # source's two best tokens are within twice of it, the files legitimately disagree on a near-tie (and
        # everything after it differs); otherwise the split is a real difference.
        n = next((i for i, (x, y) in enumerate(zip(g["source"], g["gguf"], strict=False)) if x != y),
                 min(len(g["source"]), len(g["gguf"])))
        prefix = torch.tensor([tokenizer(g["prompt"])["input_ids"] + g["source"][:n]])
        with torch.no_grad():
            a = source(prefix.to(device)).logits[0, -1].float().cpu()  # (vocab,)
            b = loaded(prefix).logits[0, -1].float()
        top2 = a.topk(2).values
        g.update(first_difference=n, source_margin=(top2[0] - top2[1]).item(),
                 logits_max_abs_diff_there=(a - b).abs().max().item())
        g["near_tie"] = g["source_margin"] <= 2 * tolerance and g["logits_max_abs_diff_there"] <= tolerance
    logits_ok = max_diff <= tolerance
    generations_ok = all(g["identical"] or g["near_tie"] for g in generations)
    return {
        "outtype": outtype,
        "tokens_identical": not token_mismatches,
        "token_mismatches": token_mismatches[:3],
        "chat_template_identical": template_match,
        "logits_max_abs_diff": max_diff,
        "logits_max_abs": scale,
        "logits_relative_diff": max_diff / scale if scale else 0.0,
        "tolerance": {"atol": atol, "rtol": rtol, "abs": tolerance},
        "logits_within_tolerance": logits_ok,
        "top1_agreement": agree / positions if positions else 1.0,
        "greedy_identical": sum(g["identical"] for g in generations),
        "greedy_total": len(generations),
        "generations": generations,
        "passed": not token_mismatches and template_match and logits_ok and generations_ok,
    }


def _outtype_of(path: Path) -> str:
    """The outtype a GGUF file was written with, from ``general.file_type``."""
    field = gguf.GGUFReader(path).fields.get(gguf.Keys.General.FILE_TYPE)
    file_type = int(field.contents()) if field is not None else None
    for name, (_, written) in _OUTTYPES.items():
        if written == file_type:
            return name
    raise UserError(f"{path}: general.file_type {file_type} is none of the types ftframe writes ({list(_OUTTYPES)}), "
                    "so there is no tolerance to check it against")


def check_roundtrip(source_model: Any, tokenizer: Any, path: Path, prompts: list[str],
                    max_new_tokens: int = 16) -> dict:
    """Load a written GGUF back with transformers and compare it with the model it came from.

    Compares (a) the token ids of each prompt, chat-templated with the source's template when it has one, and of
    the plain prompt, plus the chat template string; (b) the logits on the templated prompts: max abs difference,
    the logit scale (max abs source logit), top-1 agreement; (c) greedy generations of ``max_new_tokens``, per
    prompt. Passes when the tokens and template are identical, the logit difference is within
    ``TOLERANCES[outtype]`` (``atol + rtol * scale``), and every greedy generation is identical or first differs
    where the source's two best tokens were within twice that tolerance (a near-tie).

    Args:
        source_model: The model the file was written from.
        tokenizer: Its tokenizer.
        path: The GGUF file.
        prompts: User messages to compare on.
        max_new_tokens: Length of the greedy generations.

    Returns:
        The numbers above and ``passed``.
    """
    path = Path(path)
    loaded, loaded_tokenizer = _load_gguf(path)
    return _compare(source_model.eval(), tokenizer, loaded, loaded_tokenizer, _outtype_of(path), prompts,
                    max_new_tokens)


def _summary(result: dict[str, Any]) -> str:
    tol = result["tolerance"]["abs"]
    return (f"tokens {'identical' if result['tokens_identical'] else 'DIFFER'}, chat template "
            f"{'identical' if result['chat_template_identical'] else 'DIFFERS'}; logits max |diff| "
            f"{result['logits_max_abs_diff']:.3g} = {result['logits_relative_diff']:.2%} of the logit scale "
            f"{result['logits_max_abs']:.3g} (tolerance {tol:.3g}); top-1 agreement {result['top1_agreement']:.1%}; "
            f"greedy generations identical {result['greedy_identical']}/{result['greedy_total']}")


def export(
    model: str | None = None,
    adapter: str | None = None,
    output: str = "model.gguf",
    format: Literal["gguf"] = "gguf",
    outtype: OutType = "f16",
    prompts: list[str] | None = None,
    check: bool = True,
    max_new_tokens: int = 16,
    eval: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Export a model (or a base plus a LoRA adapter, merged) as a GGUF file for llama.cpp, checked by a round trip.

    The file is written under a temporary name next to ``--output`` and renamed into place only after the check
    passed; a JSON report (``<output>.json``) records the source, sizes and round-trip numbers.

    Args:
        model: Model to export: an asset name (smollm2-135m-instruct), a Hugging Face folder (e.g. one
            ``ftframe merge`` wrote), a .gguf file or a hub id. With --adapter: its base; default: the base recorded
            in the adapter folder.
        adapter: Folder ``ftframe fit`` wrote (a LoRA adapter); merged into its base in memory before exporting.
        output: GGUF file to write (must end in .gguf); the report goes to ``<output>.json``.
        format: Output format; only gguf.
        outtype: Storage type of the 2-D weights: f32, f16, bf16 or q8_0 (8-bit blocks of 32, ~half of f16's size).
            Norms stay f32.
        prompts: User messages for the round-trip check (chat template applied); default: two short questions.
        check: Load the file back with transformers and compare tokens, logits and greedy generations with the
            source; a failed check removes the file. false skips it.
        max_new_tokens: Length of the greedy generations the check compares.
        eval: Eval-gate YAML: run its checks on the exported model against the source; its on_fail decides whether a
            failure refuses the file (refuse) or is recorded in the report (mark).
        overwrite: Replace an existing --output file.

    Returns:
        The report written to ``<output>.json``.
    """
    from transformers import AutoModelForCausalLM

    from ftframe.artifacts import check_writable
    from ftframe.models import load_model, load_tokenizer

    start = time.perf_counter()
    if format != "gguf":
        raise UserError(f"--format {format!r} is not supported; choose one of ['gguf']")
    if outtype not in _OUTTYPES:
        raise UserError(f"--outtype {outtype!r} is not supported; choose one of {list(_OUTTYPES)}")
    if model is None and adapter is None:
        raise UserError("nothing to export: pass --model (an asset name, folder, .gguf file or hub id) and/or "
                        "--adapter (a folder `ftframe fit` wrote)")
    out = Path(output).expanduser()
    if out.suffix != ".gguf":
        raise UserError(f"--output {output!r} must end in .gguf")
    if out.is_dir():
        raise UserError(f"--output {output!r} is a folder; pass a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise UserError(f"--output {output!r} already exists; pass --overwrite true to replace it, or another path")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if check and not prompts:
        raise UserError("--prompts is empty; give at least one prompt for the round-trip check, or --check false")
    check_writable(out.parent, "--output")
    gate = None
    if eval is not None:
        from ftframe.tools.gate import EvalGate

        gate = EvalGate.from_file(eval)
        gate.prepare(adapter or model)  # read the gate's data now, not after the export

    merge_info = None
    if adapter is not None:
        from ftframe.tools.merge import merge_in_memory

        print(f"[ftframe] merging adapter {adapter} into {model or 'its base'}", flush=True)
        source, tokenizer, merge_info = merge_in_memory(adapter=adapter, model=model, dtype="float32")
        merge_info = {k: v for k, v in merge_info.items() if k != "unmerged"}  # a model, not report material
    else:
        print(f"[ftframe] loading {model}", flush=True)
        source = load_model(str(model), AutoModelForCausalLM, dtype="float32")
        tokenizer = load_tokenizer(str(model))
    source.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{os.getpid()}.gguf")
    report: dict[str, Any] = {"source": {"model": model, "adapter": adapter, "merge": merge_info},
                              "output": str(out), "format": format, "outtype": outtype}
    try:
        print(f"[ftframe] writing {outtype} GGUF", flush=True)
        written = write_gguf(source, tokenizer, tmp, outtype,
                             name=Path(adapter).name if adapter else Path(str(model)).stem)
        written["path"] = str(out)
        report["file"] = written
        params = sum(p.numel() for p in source.parameters())
        print(f"[ftframe] wrote {sum(written['tensors'].values())} tensors {written['tensors']}, "
              f"{written['bytes'] / 2**20:.1f} MiB ({8 * written['bytes'] / params:.2f} bits/parameter) in "
              f"{written['seconds']:.1f} s" + (f"; {written['q8_0_fallback_f16']} tensors with rows not a multiple "
                                               f"of {_Q8_0_BLOCK} kept as f16" if written["q8_0_fallback_f16"] else ""),
              flush=True)
        if check or gate is not None:
            print("[ftframe] loading the GGUF back with transformers", flush=True)
            loaded, loaded_tokenizer = _load_gguf(tmp)
        if check:
            result = _compare(source, tokenizer, loaded, loaded_tokenizer, outtype, prompts, max_new_tokens)
            report["roundtrip"] = result
            print(f"[ftframe] round trip: {_summary(result)}", flush=True)
            if not result["passed"]:
                details = f"; first token mismatch {result['token_mismatches'][0]}" if result["token_mismatches"] else ""
                raise UserError(f"the exported GGUF does not reproduce the source model ({_summary(result)}{details}); "
                                "nothing was written. Pass --check false to keep such a file anyway")
        if gate is not None:
            gate_result = gate.check(candidate=(loaded, loaded_tokenizer), reference={"source": (source, tokenizer)},
                                     tokenizer_source=adapter or model)
            print(gate_result.markdown(), flush=True)
            if not gate_result.passed and gate.on_fail == "refuse":
                raise UserError(f"{gate_result.markdown()}\nthe evaluation gate ({eval}) failed: nothing was written")
            report["eval_gate"] = gate_result.as_dict()
        report["seconds"] = round(time.perf_counter() - start, 2)
        report_file = out.with_name(out.name + ".json")
        tmp_report = tmp.with_name(tmp.name + ".json")
        tmp_report.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, out)  # atomic: readers see the old file or the checked new one
        os.replace(tmp_report, report_file)
    except OSError as e:
        _remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(out.parent).free
            raise UserError(f"no space left on the device while writing {out} ({free / 2**20:.0f} MiB free); the "
                            "partial file was removed") from e
        raise
    except BaseException:
        _remove(tmp)
        raise
    marked = "eval_gate" in report and not report["eval_gate"]["passed"]
    print(f"[ftframe] wrote {out} ({written['bytes'] / 2**20:.1f} MiB, {outtype}) and {report_file.name} in "
          f"{report['seconds']:.1f} s" + (f" -- MARKED: the evaluation gate failed (see {report_file.name})"
                                          if marked else ""), flush=True)
    return report


def _remove(tmp: Path) -> None:
    for file in (tmp, tmp.with_name(tmp.name + ".json")):
        file.unlink(missing_ok=True)
