"""Multi-device helpers: FSDP wrapping policies for ftframe's models, and strategy errors users can act on.

Scaling goes through Lightning's own strategies (``configs/strategy/*.yaml``); this module only supplies what those
strategies need to know about fine-tuned models:

* :func:`fsdp_auto_wrap_policy` -- each transformer block is one FSDP unit, and so is every module whose own weights
  all train (LoRA's A/B, a classification head), so a flat parameter never mixes frozen and trainable weights;
* :func:`decoder_block_policy` -- activation checkpointing per transformer block;
* :func:`gather_weights` -- whole trained tensors on rank 0 under a strategy that shards parameters (FSDP, ZeRO-3),
  for the trained-folder writers;
* :func:`explain_strategy_error` -- turns Lightning's refusal of a strategy (FSDP or DeepSpeed on a CPU, DeepSpeed
  not installed) into a :class:`~ftframe.errors.UserError` naming the nearest working set-up.
"""

from __future__ import annotations

from typing import Any

import torch

from ftframe.errors import UserError

__all__ = ["RootForward", "clean_name", "decoder_block_policy", "explain_strategy_error", "fsdp_auto_wrap_policy", "gather_weights",
           "is_block", "mark_tied_parameters", "shards_parameters", "trainable_names"]

#: key of :func:`gather_weights`'s result holding a prompt-learning adapter's virtual-token embeddings
PROMPT_EMBEDDINGS = "__ftframe_prompt_embeddings__"

#: module-name parts that wrappers insert (FSDP units, activation checkpointing, torch.compile); state dicts leave
#: them out
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: class-name endings of transformer blocks (LlamaDecoderLayer, GPT2Block, BertLayer, T5Block, ...)
BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Block", "Layer")


def is_block(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformer block (by its class name; norms, embeddings and linears are not)."""
    name = type(module).__name__
    return name.endswith(BLOCK_SUFFIXES) and not isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm))


#: attribute set on a parameter that a module other than its own reads: it must not be an FSDP unit of its own
TIED = "_ftframe_tied"


def mark_tied_parameters(model: torch.nn.Module) -> None:
    """Mark the parameters other modules read, so the FSDP policy leaves them in the enclosing unit.

    Those are weights several modules hold (an output layer tied to the input embeddings) and DoRA's factors and
    magnitudes (the magnitude module reads ``lora_A`` / ``lora_B``'s weights directly, outside their forward).
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        if len(getattr(module, "lora_magnitude_vector", ())):  # a peft LoRA layer with DoRA
            for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
                for p in getattr(module, part).parameters():
                    setattr(p, TIED, True)
    for p in model.parameters():
        if owners.get(id(p), 0) > 1:
            setattr(p, TIED, True)


def _trains_alone(module: torch.nn.Module) -> bool:
    if isinstance(module, (torch.nn.ParameterDict, torch.nn.ParameterList)):
        return False  # no forward of their own: their owner reads them (IA3's scalings), so they stay with it
    own = list(module.parameters(recurse=False))
    # a tied weight (an output layer sharing the input embeddings) must stay in the unit that holds both users
    return bool(own) and all(p.requires_grad and not getattr(p, TIED, False) for p in own)


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


# ---------------------------------------------------------------------------------------------- gathering shards
def clean_name(name: str) -> str:
    """A parameter name as a state dict spells it: without the parts FSDP, checkpoint or compile wrappers insert."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def trainable_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of ``module``'s trainable parameters (tied names included), wrapper parts removed."""
    return {clean_name(n) for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


def shards_parameters(trainer: Any) -> bool:
    """Whether ranks hold slices of parameters rather than whole ones (FSDP, ModelParallel, DeepSpeed ZeRO-3)."""
    strategy = getattr(trainer, "strategy", None)
    kinds = {t.__name__ for t in type(strategy).__mro__}
    if kinds & {"FSDPStrategy", "ModelParallelStrategy"}:
        return True
    return "DeepSpeedStrategy" in kinds and bool(getattr(strategy, "zero_stage_3", False))


def gather_weights(trainer: Any, pl_module: torch.nn.Module, trainable_only: bool = True
                   ) -> dict[str, torch.Tensor] | None:
    """Whole weights of ``pl_module``, keyed as its state dict, gathered from the shards onto rank 0 (on the CPU).

    Collective: every rank calls it. Returns ``None`` when the strategy does not shard parameters (every rank holds
    whole tensors: read them from the module); otherwise rank 0 gets the tensors (the other ranks may get ``{}``).
    ``trainable_only`` gathers just the trained weights (an adapter's), never the frozen base: one tensor at a time
    under ZeRO-3, and through ``torch.distributed.checkpoint``'s full state dict under FSDP.
    """
    if not shards_parameters(trainer):
        return None
    wanted = trainable_names(pl_module) if trainable_only else None
    out = _gather(trainer, pl_module, wanted)
    # a tied weight once, under its first name (an output layer tied to the embeddings), as a single process saves it
    first: dict[int, str] = {}
    for name, param in pl_module.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), clean_name(name)) != clean_name(name):
            out.pop(clean_name(name), None)
    return _with_prompt_embeddings(trainer, pl_module, out)


def _gather(trainer: Any, pl_module: torch.nn.Module, wanted: set[str] | None) -> dict[str, torch.Tensor]:
    strategy = trainer.strategy
    if "DeepSpeedStrategy" in {t.__name__ for t in type(strategy).__mro__}:
        import deepspeed

        out: dict[str, torch.Tensor] = {}
        for name, param in pl_module.named_parameters():
            name = clean_name(name)
            if wanted is not None and name not in wanted:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):  # one tensor at a time
                if trainer.is_global_zero:
                    out[name] = param.detach().to("cpu", copy=True)
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_gpu = strategy.root_device.type != "cpu"  # offloading pins memory, which needs CUDA
    state = get_model_state_dict(strategy.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=on_gpu, ignore_frozen_params=wanted is not None))
    if on_gpu and not trainer.is_global_zero:
        return {}
    return {k: v.detach().to("cpu") for k, v in state.items() if wanted is None or k in wanted}


def _with_prompt_embeddings(trainer: Any, pl_module: torch.nn.Module, out: dict[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    model = getattr(pl_module, "model", None)
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        # peft saves the prompt encoder's *output*, computed by a forward pass: every rank runs it together
        with torch.no_grad():
            embeddings = model.get_prompt_embedding_to_save(adapter_name=model.active_adapter)
        if trainer.is_global_zero:
            out[PROMPT_EMBEDDINGS] = embeddings.detach().to("cpu")
    return out


class RootForward(torch.nn.Module):
    """The bare model's interface with its forward run through the strategy's wrapped root.

    Under FSDP the root unit's weights (embeddings, final norm) are gathered only by the root's own forward, so code
    that calls the model outside the training step (evaluation callbacks) goes through ``trainer.strategy.model``,
    which calls ``LightningModule.forward`` -> the model. Every other attribute (config, parameters, peft switches)
    is the model's. Every rank must make the same calls: each forward gathers weights collectively.
    """

    def __init__(self, root: torch.nn.Module, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_root", root)  # not a submodule: its parameters are the model's

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._root(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)
