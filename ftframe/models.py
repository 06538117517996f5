"""Loading backbones and tokenizers: the one place that knows about hub ids, local folders and ``.gguf`` files.

A model name may be

* a registered asset name (``smollm2-135m-instruct``; see ``ftframe download``),
* a local Hugging Face folder (``config.json`` + weights + tokenizer),
* a local ``.gguf`` file: transformers dequantizes it, ftframe copies the weights into a plain model (a GGUF-loaded
  model refuses ``save_pretrained``) and caches that folder, so the slow conversion happens once,
* a Hugging Face Hub id, loaded by transformers when the network allows.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from ftframe import assets
from ftframe.errors import UserError

__all__ = [
    "DTYPES", "DTypeName", "check_target_modules", "load_model", "load_tokenizer", "logical_numel", "resolve_model",
    "transformer_blocks", "transformers_model",
]

DTypeName = Literal["float32", "bfloat16", "float16"]
#: a dtype, or ``auto``: resolved from the device by :func:`ftframe.device.inference_dtype`
InferenceDType = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_like_path(name: str) -> bool:
    # a hub id is "name" or "owner/name": more than one "/" can only be a path
    return (name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") > 1
            or os.sep in name and Path(name).exists())


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts: a local folder or a hub id.

    Raises:
        UserError: the path does not exist, the asset is not downloaded, or a folder is not a model folder.
    """
    if not name or not isinstance(name, str):
        raise UserError(f"model name must be a non-empty string, got {name!r}")
    if assets.is_asset(name):
        if assets.ASSETS[name].kind != "model":
            raise UserError(f"'{name}' is a data asset, not a model; model assets: "
                            f"{sorted(n for n, a in assets.ASSETS.items() if a.kind == 'model')}")
        return resolve_model(str(assets.asset_path(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist; check --model.model_name (or download it first)")
        return str(_convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; pass a Hugging Face model folder, a .gguf file, "
                            f"a hub id or an asset name ({sorted(assets.ASSETS)})")
        return str(path)
    if _looks_like_path(name) or path.exists():
        raise UserError(f"model path {name!r} does not exist; pass a local folder, a .gguf file, a hub id, "
                        f"or an asset name ({sorted(n for n, a in assets.ASSETS.items() if a.kind == 'model')})")
    return name  # a hub id


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a plain, saveable model folder in the cache and return that folder."""
    from filelock import FileLock

    st = path.resolve().stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = assets.cache_root() / "converted" / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():  # another process converted it while we waited
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"[ftframe] converting {path.name} to a plain model folder (once; cached in {out})", flush=True)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: readers see a complete folder or none
    return out


def load_tokenizer(name: str, padding_side: Literal["left", "right"] = "right") -> Any:
    """Load the tokenizer that belongs to model ``name``; sets a pad token when the tokenizer has none."""
    from transformers import AutoTokenizer

    folder = Path(name).expanduser()
    # an adapter folder carries its tokenizer but no model config
    resolved = str(folder) if (folder / "tokenizer_config.json").is_file() else resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except OSError as e:
        raise UserError(f"could not load the tokenizer for {name!r}: {e}") from e
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS (or UNK) is safe.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = padding_side
    return tok


def load_model(
    name: str,
    auto_class: Any,
    dtype: DTypeName = "float32",
    quantization_config: Any = None,
    device_map: Any = None,
    **kwargs: Any,
) -> Any:
    """Load a backbone with ``auto_class.from_pretrained`` from any name :func:`resolve_model` accepts."""
    resolved = resolve_model(name)
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    try:
        model = auto_class.from_pretrained(
            resolved, dtype=DTYPES[dtype], quantization_config=quantization_config, device_map=device_map, **kwargs
        )
    except OSError as e:
        raise UserError(f"could not load model {name!r}: {e}. Pass a local folder, a .gguf file, a reachable hub id "
                        f"or an asset name ({sorted(assets.ASSETS)}).") from e
    return model


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``transformers`` model inside a ``peft`` wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: its longest ``ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise UserError(f"{type(model).__name__} has no list of transformer blocks")
    return max(lists, key=len)


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for: a bitsandbytes 4-bit tensor packs two per byte."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def check_target_modules(model: torch.nn.Module, targets: Any, method: str) -> None:
    """Fail early, naming the valid choices, when a peft config's ``target_modules`` are not modules of ``model``."""
    if targets is None or isinstance(targets, str):  # None: peft's per-architecture default; str: regex/"all-linear"
        return
    names = [name for name, _ in model.named_modules() if name]
    leaf_names = {name.rsplit(".", 1)[-1] for name in names}
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = sorted(t for t in targets if t not in leaf_names and not any(n.endswith(t) for n in names))
    if missing:
        raise UserError(f"{method}: target_modules {missing} not found in {type(model).__name__}. Linear modules of "
                        f"this model: {linear}; or use target_modules: all-linear")
