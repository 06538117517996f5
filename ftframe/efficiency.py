"""Speed and memory levers for the training path that change no result (see docs/performance.md).

Each is applied by :class:`ftframe.methods.FineTuneModule` in ``configure_model`` and switched by one of its options.
"""

from __future__ import annotations

import math
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ftframe.models import transformer_blocks, transformers_model
from ftframe.packing import token_lengths

__all__ = ["add_neftune", "apply_levers", "cast_frozen_linear", "frozen_storage_dtype", "compile_blocks", "lean_activations", "own_mapped_weights"]

# Architectures whose MLP is ``down(silu(gate(x)) * up(x))``
SWIGLU_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def cast_frozen_linear(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store frozen ``nn.Linear`` weights/biases in ``dtype``; returns how many tensors were converted.

    Under autocast to ``dtype`` a linear layer computes in ``dtype`` whatever its weights are stored in, so this changes
    no result. Parameters shared with an embedding (a tied output head) are left alone: the embedding lookup is not
    autocast and would change.
    """
    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    converted = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for p in module.parameters(recurse=False):
            if (type(p) is torch.nn.Parameter and not p.requires_grad and p.is_floating_point()
                    and p.dtype != dtype and id(p) not in embedding):
                p.data = p.data.to(dtype)
                converted += 1
    return converted


def _mapped_checkpoint_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped checkpoint files (Linux ``/proc/self/maps``)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip().endswith((".safetensors", ".bin", ".pt", ".pth")):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:  # not Linux: nothing to do
        return []
    return ranges


def own_mapped_weights(model: torch.nn.Module) -> int:
    """Copy parameters and buffers that still point into a memory-mapped checkpoint file; returns how many.

    ``transformers`` loads safetensors without copying where it can, so a weight kept in its stored dtype (the fp32
    embedding, norm scales) is a view of the file mapping, and that one view keeps the whole file resident --
    including the pages of every weight :func:`cast_frozen_linear` has already replaced. Giving those few tensors
    their own memory lets the mapping go (~400 MB for SmolLM2-135M in fp32). Values are unchanged.
    """
    ranges = _mapped_checkpoint_ranges()
    if not ranges:
        return 0
    copied = 0
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if any(start <= ptr < end for start, end in ranges):
                t.data = t.data.clone()
                copied += 1
    return copied


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` every repeated transformer block in place (regional compilation); returns how many."""
    layers = transformer_blocks(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _cast_input_if_not_autocast(self: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        return x  # autocast casts at the matmul; an explicit cast here only makes a copy
    return x.to(dtype) if getattr(self, "cast_input_dtype_enabled", True) else x


class _SharedCastLinear(torch.autograd.Function):
    """``linear(x, w)`` exactly as autocast computes it, given ``x16`` (``x`` already cast to the 16-bit dtype).

    Autocast casts ``x`` separately for every layer that reads it and each layer keeps its own copy for the backward
    pass; layers reading the same ``x`` (q, k, v; gate, up; and every LoRA A next to them) share one copy here. The
    forward and backward run the same operations on the same values; the gradient for ``x`` is returned in ``x``'s
    dtype per layer, so gradients from several layers are summed in full precision as before.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, x16):  # type: ignore[override]
        w16 = weight.to(x16.dtype)
        b16 = bias.to(x16.dtype) if bias is not None else None
        ctx.save_for_backward(x16 if ctx.needs_input_grad[1] else None, w16)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x16, w16, b16)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x16, w16 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        g2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ w16).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ x16.reshape(-1, x16.shape[-1])).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


_last_cast: list[Any] = [None]  # (weak reference to x, x's version, x16): consumers of one x run back to back


def _shared_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    last = _last_cast[0]
    if last is not None and last[0]() is x and last[1] == x._version and last[2].dtype == dtype:
        return last[2]
    x16 = x.detach().to(dtype)
    _last_cast[0] = (weakref.ref(x), x._version, x16)
    return x16


def _shared_cast_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    kind = x.device.type
    if not torch.is_autocast_enabled(kind) or not torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    dtype = torch.get_autocast_dtype(kind)
    if x.dtype == dtype or not x.is_floating_point() or x.dtype == torch.float64:
        return F.linear(x, self.weight, self.bias)
    return _SharedCastLinear.apply(x, self.weight, self.bias, _shared_cast(x, dtype))


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` that keeps only ``gate`` and ``up`` for the backward pass (``silu(gate)`` is recomputed).

    Forward and backward use the same operations as autograd does for the unfused expression, so values and
    gradients are identical; one ``(tokens x intermediate)`` activation per block is not kept.
    """

    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


class _FusedLoRALinear(torch.autograd.Function):
    """``linear(x, W, bias) + scaling * (x @ A.T) @ B.T`` in one function, for inputs and weights of one dtype.

    The same products as peft's vanilla LoRA path, with ``scaling`` applied to the rank-``r`` factor instead of the
    full-width output, the adapter's output accumulated into the base output in place (``addmm_``) and, in the
    backward pass, the adapter's input gradient accumulated into the base one: two full-width passes and two
    full-width temporaries fewer per layer and direction. The saved tensors are peft's (``x`` for A, ``x @ A.T`` for B).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.t()
        y = F.linear(x2, weight, bias)
        y.addmm_(h, b.t(), alpha=scaling)
        _, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        ctx.save_for_backward(x2 if (need_w or need_a) else None, h if need_b else None, weight, a, b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, h, weight, a, b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gh = (g2 @ b).mul_(ctx.scaling) if (need_x or need_a) else None
        if need_x:
            grad_x = (g2 @ weight).addmm_(gh, a).view(ctx.x_shape)
        if need_w:
            grad_w = g2.t() @ x2
        if need_bias:
            grad_bias = g2.sum(0)
        if need_a:
            grad_a = gh.t() @ x2
        if need_b:
            grad_b = (g2.t() @ h).mul_(ctx.scaling)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def _hooked(*modules: torch.nn.Module) -> bool:
    """Whether calling these modules would run hooks (DeepSpeed ZeRO-3 gathers weights in them, for instance)."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks:
        return True
    return any(m._forward_pre_hooks or m._forward_hooks for m in modules)


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward``, through :class:`_FusedLoRALinear` where that computes the same thing: one
    vanilla adapter (no DoRA or other variant, no dropout, no adapter bias), not merged, outside autocast, with the
    input, the base and the adapter weights all of one dtype, and no hooks on the adapter's layers."""
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
        return self._ftframe_peft_forward(x, *args, **kwargs)
    name = active[0]
    base = self.base_layer
    if name not in self.lora_A or name not in self.lora_B or name not in self.lora_dropout:
        return self._ftframe_peft_forward(x, *args, **kwargs)
    lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
    inert_dropout = type(dropout) is torch.nn.Identity or (
        type(dropout) is torch.nn.Dropout and (dropout.p == 0 or not dropout.training))
    if (not inert_dropout or name in getattr(self, "lora_variant", {}) or type(base) is not torch.nn.Linear
            or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
            or getattr(self, "fan_in_fan_out", False) or lora_a.bias is not None or lora_b.bias is not None
            or torch.is_autocast_enabled(x.device.type)
            or not (x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype)
            or _hooked(base, lora_a, lora_b, dropout)):
        return self._ftframe_peft_forward(x, *args, **kwargs)
    return _FusedLoRALinear.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name])


def lean_activations(model: torch.nn.Module) -> int:
    """Keep fewer activation copies for the backward pass, with identical results; returns the modules changed.

    * LoRA branches: peft casts a 16-bit input to the adapter's fp32 before the adapter's matmul, where autocast
      casts it back to 16 bits -- an exact round trip that leaves a second 16-bit copy saved for the backward pass.
      Under autocast the input now goes straight to the matmul (outside autocast peft's cast is kept).
    * Linear layers (and LoRA A layers) reading the same full-precision input under autocast share one 16-bit copy
      of it instead of each casting and keeping its own (see :class:`_SharedCastLinear`).
    * The SwiGLU MLP keeps ``gate`` and ``up`` but not ``silu(gate)``, recomputing it in the backward pass
      (architectures in :data:`SWIGLU_TYPES`).
    * Outside autocast (``32-true``, ``bf16-true``), a vanilla LoRA layer runs as one function
      (:class:`_FusedLoRALinear`): the same products and saved tensors, fewer full-width passes and temporaries.
      Results agree with peft's path to float rounding (the scaling is applied to the rank-``r`` factor).
    """
    config = getattr(transformers_model(model), "config", None)
    swiglu = (getattr(config, "model_type", None) in SWIGLU_TYPES
              and getattr(config, "hidden_act", None) in ("silu", "swish"))
    changed = 0
    for module in model.modules():
        if (hasattr(module, "lora_A") and callable(getattr(module, "_cast_input_dtype", None))
                and not any(getattr(module, "use_dora", {}).values())):  # DoRA uses the input outside matmuls
            module._cast_input_dtype = types.MethodType(_cast_input_if_not_autocast, module)
            if type(module).__name__ == "Linear" and type(module).__module__.startswith("peft.tuners.lora"):
                module._ftframe_peft_forward = module.forward
                module.forward = types.MethodType(_fused_lora_forward, module)
            changed += 1
        elif type(module) is torch.nn.Linear and type(module.weight) is torch.nn.Parameter:
            module.forward = types.MethodType(_shared_cast_forward, module)
            changed += 1
        elif swiglu and all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    return changed


def add_neftune(model: torch.nn.Module, alpha: float) -> None:
    """NEFTune (Jain et al., 2023, https://arxiv.org/abs/2310.05914): in training mode, add uniform noise of size
    ``alpha / sqrt(length x hidden)`` to the input embeddings' output (``length``: each example's own length in packed
    batches, the padded length otherwise)."""
    embeddings = model.get_input_embeddings()

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return out
        lengths = token_lengths()
        if lengths is not None and lengths.numel() == out.shape[1]:
            scale = alpha / torch.sqrt(lengths.to(out.device, torch.float32) * out.shape[-1])[None, :, None]
        else:
            scale = alpha / math.sqrt(out.shape[1] * out.shape[-1])
        return out + torch.empty_like(out).uniform_(-1, 1) * scale

    embeddings.register_forward_hook(hook)


def frozen_storage_dtype(choice: str, cast_ok: bool, precision: Any, sharded: bool) -> torch.dtype | None:
    """The dtype to store frozen linear weights in (``FineTuneModule.frozen_dtype``), ``None``: as loaded.

    ``auto``: the 16-bit type ``bf16-mixed`` / ``16-mixed`` autocast computes them in anyway, for methods whose frozen
    weights are used only in matmuls (``cast_ok``), and not under a sharding strategy (each unit casts itself there).
    """
    if choice != "auto":
        return getattr(torch, choice) if choice != "float32" else None
    if not cast_ok or sharded:
        return None
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision or ""))


def apply_levers(model: torch.nn.Module, frozen_dtype: torch.dtype | None, lean: bool, neftune_alpha: float | None,
                 compile: bool, gradient_checkpointing: bool) -> None:
    """Apply the training-path options of ``FineTuneModule`` (see its docstring) to the adapted ``model``."""
    if frozen_dtype is not None and cast_frozen_linear(model, frozen_dtype):
        own_mapped_weights(model)  # else the few fp32 weights left would keep the whole checkpoint file resident
    if lean:
        lean_activations(model)
    if neftune_alpha is not None:
        add_neftune(model, neftune_alpha)
    if compile:
        compile_blocks(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
