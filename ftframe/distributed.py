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

import os
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from ftframe.errors import UserError

__all__ = ["RootForward", "any_rank", "build_model", "clean_name", "decoder_block_policy", "explain_strategy_error", "fsdp_auto_wrap_policy",
           "gather_objects", "gather_weights", "is_block", "mark_tied_parameters", "meta_init_here", "prepare_meta_init",
           "save_pretrained", "shards_parameters", "trainable_names", "zero3_loading_config"]

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


# ---------------------------------------------------------------------------------------------- collectives
def any_rank(trainer: Any, device: torch.device, *flags: bool) -> Any:
    """Whether each flag is set on any process (one collective for all); a single flag gives a single bool."""
    if trainer is not None and trainer.world_size > 1:
        t = torch.tensor([float(f) for f in flags], device=device)
        flags = tuple(bool(v) for v in trainer.strategy.reduce(t, reduce_op="max").tolist())
    return flags[0] if len(flags) == 1 else flags


def sum_over_ranks(trainer: Any, value: torch.Tensor) -> torch.Tensor:
    """``value`` added up over all processes (itself in a single process). Collective."""
    if trainer is not None and trainer.world_size > 1:
        return trainer.strategy.reduce(value.clone(), reduce_op="sum")
    return value


def gather_objects(trainer: Any, mine: list[Any]) -> list[Any]:
    """Every process's list concatenated in rank order (``mine`` alone in a single process). Collective."""
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        every: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(every, mine)
        mine = [i for rank in every for i in rank]
    return mine


# ---------------------------------------------------------------------------------------------- building the model
def zero3_loading_config(trainer: Any) -> Any:
    """transformers' ``HfDeepSpeedConfig`` for a DeepSpeed ZeRO-3 run (its existence switches ``from_pretrained`` to
    loading into partitioned weights; keep it alive for the run), else ``None``."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if not getattr(strategy, "zero_stage_3", False):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(strategy.config)


def build_model(trainer: Any, meta_allowed: bool, skeleton: Any, load: Any) -> tuple[torch.nn.Module, bool, Any]:
    """``(model, built on meta, ZeRO-3 loading config)``: ``skeleton()`` on the meta device where FSDP fills it
    (:func:`meta_init_here`), else ``load()`` -- under ZeRO-3 with transformers' partitioned loading switched on
    (keep the returned config alive for the run)."""
    if meta_init_here(trainer, meta_allowed):
        with torch.device("meta"):
            return skeleton(), True, None
    zero3 = zero3_loading_config(trainer)
    return load(), False, zero3


def meta_init_here(trainer: Any, allowed: bool) -> bool:
    """Whether this process builds the model on the meta device: FSDP with several processes, ranks other than 0
    (rank 0 reads the weights and FSDP broadcasts them while it wraps the model). Tells FSDP to broadcast them."""
    if not (allowed and trainer is not None and trainer.world_size > 1
            and "FSDPStrategy" in {t.__name__ for t in type(trainer.strategy).__mro__}):
        return False
    trainer.strategy.kwargs.setdefault("sync_module_states", True)  # rank 0's weights to every rank
    return trainer.global_rank != 0


def prepare_meta_init(trainer: Any, model: torch.nn.Module) -> None:
    """Give FSDP the ``param_init_fn`` that fills a meta-device ``model`` unit by unit, tied weights kept as one."""
    users: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            users.setdefault(id(param), []).append((module, name))
    tied = {key: holders for key, holders in users.items() if len(holders) > 1}
    trainer.strategy.kwargs["param_init_fn"] = partial(_materialize, device=trainer.strategy.root_device, tied=tied)


def _materialize(module: torch.nn.Module, device: torch.device,
                 tied: dict[int, list[tuple[torch.nn.Module, str]]]) -> None:
    """FSDP ``param_init_fn``: storage for a meta-device module's own tensors (their values come from rank 0).

    ``tied``: the modules holding each shared parameter (by the meta parameter's id), which receive the new tensor
    too -- ``to_empty`` replaces a parameter in its own module only, and a broken tie would change the model.
    """
    own = dict(module.named_parameters(recurse=False))
    if not any(t.is_meta for t in (*own.values(), *module.buffers(recurse=False))):
        return  # (FSDP passes modules around the meta ones too, e.g. metrics)
    module.to_empty(device=device, recurse=False)
    for name, before in own.items():
        for holder, attr in tied.get(id(before), []):
            if holder is not module:
                setattr(holder, attr, getattr(module, name))


# ---------------------------------------------------------------------------------------------- saving
def save_pretrained(model: torch.nn.Module, directory: str, state_dict: dict[str, torch.Tensor] | None = None,
                    offline: bool = False, **extra: Any) -> None:
    """``model.save_pretrained`` in safetensors, from ``state_dict`` (keyed as the LightningModule's: ``model.``...,
    gathered by :func:`gather_weights` under a sharding strategy) or the model's own weights.

    ``offline``: the base is local (asset, folder, gguf): peft must not look its name up on the hub while saving.
    ``extra``: more ``save_pretrained`` arguments.
    """
    kwargs: dict[str, Any] = dict(extra)
    prompt = None
    if state_dict is not None:
        weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        prompt = state_dict.get(PROMPT_EMBEDDINGS)
        kwargs["state_dict"] = weights
    gathered = state_dict is not None and hasattr(model, "peft_config")
    if gathered:
        # peft picks an adapter's entries by the module names it walks, which under FSDP hold the wrappers' parts:
        # name the gathered tensors that way, and take the parts out of the written file again (a module wrapped
        # alone -- "lora_A.default._fsdp_wrapped_module.weight" -- keeps its own part clean: peft takes the adapter
        # name out of the last two parts of a key)
        wrapped = {clean_name(n): _unwrap_leaf(n) for n, _ in model.named_parameters(remove_duplicate=False)}
        kwargs["state_dict"] = {wrapped.get(k, k): v for k, v in kwargs["state_dict"].items()}
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"} if offline else {}):
        if prompt is None:
            model.save_pretrained(directory, safe_serialization=True, **kwargs)
        else:
            # prompt learning under sharding: peft would run the prompt encoder here, on rank 0 alone, where the
            # encoder's weights are shards; its output was computed by every rank beforehand (gather_weights)
            with mock.patch.object(model, "get_prompt_embedding_to_save", lambda adapter_name: prompt):
                model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if gathered:
        _clean_saved_names(Path(directory))


def _unwrap_leaf(name: str) -> str:
    """``name`` without a wrapper part right before its last component (the wrapped module's own parameter)."""
    head, _, leaf = name.rpartition(".")
    while head and clean_name(head.rpartition(".")[2] + ".") == "":
        head = head.rpartition(".")[0]
    return f"{head}.{leaf}" if head else leaf


def _clean_saved_names(directory: Path) -> None:
    """Rewrite ``directory``'s safetensors files with parameter names free of wrapper parts (FSDP's)."""
    from safetensors.torch import load_file, save_file

    for path in directory.glob("*.safetensors"):
        tensors = load_file(str(path))
        if any(clean_name(k) != k for k in tensors):
            save_file({clean_name(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
