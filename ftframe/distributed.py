"""Multi-device helpers: FSDP wrapping policies for ftframe's models, and strategy errors users can act on.

Scaling goes through Lightning's own strategies (``configs/strategy/*.yaml``); this module only supplies what those
strategies need to know about fine-tuned models:

* :func:`fsdp_auto_wrap_policy` -- each transformer block is one FSDP unit, and so is every module whose own weights
  all train (LoRA's A/B, a classification head), so a flat parameter never mixes frozen and trainable weights;
* :func:`decoder_block_policy` -- activation checkpointing per transformer block;
* :func:`explain_strategy_error` -- turns Lightning's refusal of a strategy (FSDP or DeepSpeed on a CPU, DeepSpeed
  not installed) into a :class:`~ftframe.errors.UserError` naming the nearest working set-up.
"""

from __future__ import annotations

import torch

from ftframe.errors import UserError

__all__ = ["decoder_block_policy", "explain_strategy_error", "fsdp_auto_wrap_policy", "is_block"]

#: class-name endings of transformer blocks (LlamaDecoderLayer, GPT2Block, BertLayer, T5Block, ...)
BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Block", "Layer")


def is_block(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformer block (by its class name; norms, embeddings and linears are not)."""
    name = type(module).__name__
    return name.endswith(BLOCK_SUFFIXES) and not isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm))


def _trains_alone(module: torch.nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.requires_grad for p in own)


def fsdp_auto_wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP ``auto_wrap_policy``: wrap transformer blocks, and modules whose own weights all train, as units."""
    if recurse:
        return True  # look inside every module
    return is_block(module) or _trains_alone(module)


def decoder_block_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP ``activation_checkpointing_policy``: recompute each transformer block's activations in the backward."""
    return True if recurse else is_block(module)


def explain_strategy_error(error: Exception, strategy: object, accelerator: object) -> UserError | None:
    """A :class:`UserError` for Lightning's refusal of ``strategy``, or ``None`` when the error is something else."""
    text = str(error)
    name = str(strategy).rsplit(".", 1)[-1]
    if "requires a GPU" in text or ("FSDP" in text and "CUDA" in text):
        return UserError(f"strategy {name!r} needs CUDA GPUs (accelerator {accelerator!r} here). On CPUs use "
                         "configs/strategy/ddp.yaml (--trainer.strategy ddp --trainer.devices 2): every method works "
                         "under DDP.")
    if "No supported gpu backend" in text:
        return UserError(f"accelerator {accelerator!r} asks for GPUs and this machine has no CUDA GPU. Strategies "
                         f"such as {name!r} need them; on CPUs use configs/strategy/ddp.yaml (--trainer.accelerator "
                         "cpu --trainer.strategy ddp --trainer.devices 2): every method works under DDP.")
    if "DeepSpeed installed" in text or "deepspeed" in text.lower() and "install" in text.lower():
        return UserError("strategy 'deepspeed' needs the deepspeed package: pip install deepspeed (on a machine with "
                         "CUDA GPUs; Lightning refuses DeepSpeed on CPUs, where configs/strategy/ddp.yaml works)")
    return None
