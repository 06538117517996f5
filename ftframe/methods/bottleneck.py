"""Bottleneck adapters: small down-project / nonlinearity / up-project modules after each block's attention and MLP.

Each adapter maps ``h`` to ``h + up(act(down(h)))`` with ``up`` initialised to zero, so training starts from the
base model (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751).
``peft`` has no such tuner: this method overrides :meth:`FineTuneModule.adapt` and :meth:`save_trained` itself, and is
the worked example of ``docs/extending/new_method.md``. The artifact is ``bottleneck_adapters.safetensors`` plus
``bottleneck_config.json``; :func:`load_bottleneck_adapters` puts them back on a base model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ftframe.artifacts import TrainedFolder
from ftframe.distributed import trainable_names
from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant
from ftframe.models import transformer_blocks

__all__ = ["Bottleneck", "BottleneckAdapters", "add_bottleneck_adapters", "load_bottleneck_adapters"]

WEIGHTS, CONFIG = "bottleneck_adapters.safetensors", "bottleneck_config.json"


class Bottleneck(torch.nn.Module):
    """``h + up(act(down(h)))``, with ``up`` zero so the module starts as the identity."""

    def __init__(self, hidden: int, size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = torch.nn.Linear(hidden, size)
        self.up = torch.nn.Linear(size, hidden)
        self.act = torch.nn.GELU()
        self.dropout = torch.nn.Dropout(dropout)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        return h + self.up(self.dropout(self.act(self.down(h))))


def _after(adapter: Bottleneck):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # attention modules return (output, weights)
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def add_bottleneck_adapters(model: torch.nn.Module, size: int, after: list[str], dropout: float = 0.0) -> int:
    """Attach a :class:`Bottleneck` after each named submodule of every block; returns how many were added.

    The adapters become submodules of their block (``<block>.bottleneck_<name>``), so they appear in
    ``named_parameters`` and ``state_dict`` and move with the model.
    """
    hidden = model.config.hidden_size
    added = 0
    for block in transformer_blocks(model):
        for name in after:
            target = getattr(block, name, None)
            if not isinstance(target, torch.nn.Module):
                children = [n for n, _ in block.named_children()]
                raise UserError(f"BottleneckAdapters: after={after}, but a block of {type(model).__name__} has no "
                                f"{name!r}; its submodules are {children}")
            adapter = Bottleneck(hidden, size, dropout)
            ref = next(block.parameters())
            adapter.to(device=ref.device, dtype=torch.float32)
            block.add_module(f"bottleneck_{name}", adapter)
            target.register_forward_hook(_after(adapter))
            added += 1
    return added


def load_bottleneck_adapters(folder: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Attach the adapters saved in ``folder`` to ``model`` (the same base) and load their weights."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    add_bottleneck_adapters(model, config["size"], config["after"], 0.0)
    weights = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any("bottleneck_" in k for k in missing):
        raise UserError(f"{folder}: the adapters do not match this model (unexpected {unexpected[:3]}, missing "
                        f"{[k for k in missing if 'bottleneck_' in k][:3]})")
    return model


class BottleneckAdapters(FineTuneModule):
    """Houlsby-style adapters after the attention and MLP of every block; the base model stays frozen.

    Args:
        size: Bottleneck width (the down-projection's output size).
        after: Submodules of each block to put an adapter after (Llama-style names by default).
        dropout: Dropout inside the adapter.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {"BottleneckAdapters": Variant({"size": 8}, "bottleneck_", compare=("bottleneck", "bottleneck"))}

    cast_frozen_weights = True  # the frozen base is used only through matmuls

    def __init__(self, *args, size: int = 64, after: list[str] | None = None, dropout: float = 0.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if size < 1:
            raise UserError(f"size must be >= 1, got {size}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {dropout}")
        self.size = size
        self.after = list(after) if after is not None else ["self_attn", "mlp"]
        if not self.after:
            raise UserError("after is empty; name the block submodules to follow, e.g. [self_attn, mlp]")
        self.adapter_dropout = dropout

    def adapt(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        add_bottleneck_adapters(model, self.size, self.after, self.adapter_dropout)
        return model

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        assert self.model is not None, "configure_model() has not run"
        adapters = [m for m in self.model.modules() if isinstance(m, Bottleneck)]
        for m in adapters:
            m.enabled = False
        try:
            yield
        finally:
            for m in adapters:
                m.enabled = True

    def saves_trained_weights_only(self) -> bool:
        return True  # the adapters (and a trained head), never the base

    def save_trained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        assert self.model is not None, "configure_model() has not run"
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # the adapters, plus any other trained weight (a classification head); gathered ones under FSDP / ZeRO-3
        trained = {n.removeprefix("model.") for n in trainable_names(self)}
        source = ({k.removeprefix("model."): v for k, v in state_dict.items()} if state_dict is not None
                  else self.model.state_dict())
        weights = {k: v.detach().cpu().contiguous() for k, v in source.items() if "bottleneck_" in k or k in trained}
        save_file(weights, str(directory / WEIGHTS))
        (directory / CONFIG).write_text(json.dumps({"size": self.size, "after": self.after,
                                                   "base_model_name_or_path": self.model_name}, indent=1))

    @classmethod
    def load_trained(cls, folder: TrainedFolder, model: str | None = None, dtype: Any = "float32") -> torch.nn.Module:
        config = json.loads((folder.path / CONFIG).read_text(encoding="utf-8"))
        name = folder.base_name(model or config.get("base_model_name_or_path"))
        return load_bottleneck_adapters(folder.path, cls.load_base(folder, name, dtype))

    @classmethod
    def merge_trained(cls, folder: TrainedFolder, model: str | None = None) -> tuple[torch.nn.Module, str]:
        raise UserError(f"{folder.path} holds bottleneck adapters: small networks (down-projection, nonlinearity, "
                        "up-projection) added after each block. A nonlinearity cannot be folded into the base's "
                        "linear weights, so there is nothing to merge; use the folder with `ftframe generate "
                        "--adapter` / `ftframe evaluate --adapter`, or train LoRA / DoRA / IA3 to get a mergeable model")
