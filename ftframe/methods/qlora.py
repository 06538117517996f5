"""QLoRA: LoRA adapters on a base model stored in 4-bit NormalFloat (NF4).

The frozen base is quantized at load time by bitsandbytes (optionally with double quantization of the scales);
adapters train in the compute dtype (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314). Runs on CUDA and,
with bitsandbytes >= 0.46, on CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule
from ftframe.methods.lora import lora_config
from ftframe.models import DTYPES, load_model

__all__ = ["QLoRA"]


class QLoRA(FineTuneModule):
    """LoRA on a 4-bit quantized base model.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt, or ``all-linear``.
        bias: Which biases to train alongside the adapters.
        quant_type: 4-bit data type of the frozen weights.
        double_quant: Also quantize the quantization constants (saves ~0.4 bit per parameter).
        compute_dtype: dtype the 4-bit weights are dequantized to for matmuls.
        **kwargs: See :class:`FineTuneModule`.
    """

    def __init__(
        self,
        *args,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        bias: Literal["none", "all", "lora_only"] = "none",
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lora = dict(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, bias=bias)
        self.quant_type = quant_type
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.peft_config()

    def peft_config(self) -> Any:
        return lora_config(**self.lora)

    def load_base_model(self) -> torch.nn.Module:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UserError("QLoRA needs bitsandbytes: pip install 'bitsandbytes>=0.46'") from e
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
        )
        # bitsandbytes quantizes while loading, so weights must land directly on the training device
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        model = load_model(self.model_name, self.task.auto_class(), dtype=self.dtype_name,
                           quantization_config=quant, device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.gradient_checkpointing)
        keep_trainable_layout(model)
        return model


def keep_trainable_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns the layers changed.

    On CPUs with AVX512-BF16, a ``Linear4bit`` called in eval mode without gradients (a validation pass) converts its
    weight in place to a layout whose matmul kernel has no autograd support, and keeps it: the training steps that
    follow would then get no gradient through the quantized layers. A training model must keep the plain layout.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
