"""LoRA: low-rank adapters added to frozen linear layers.

Each targeted weight ``W`` is used as ``W + (alpha / r) * B @ A`` with ``A`` (r x in) and ``B`` (out x r) trained and
``B`` starting at zero, so training starts from the base model (Hu et al., 2021, https://arxiv.org/abs/2106.09685).
Built on ``peft.LoraConfig``; the saved adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any, Literal

from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule

__all__ = ["LoRA", "lora_config"]


def lora_config(
    r: int, alpha: float, dropout: float, target_modules: str | list[str], bias: str, use_rslora: bool = False
) -> Any:
    """Build a ``peft.LoraConfig`` after checking the values (shared by LoRA and QLoRA)."""
    from peft import LoraConfig

    if r < 1:
        raise UserError(f"r (LoRA rank) must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, list) and not target_modules:
        raise UserError("target_modules is empty; name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias=bias,
        use_rslora=use_rslora,
    )


class LoRA(FineTuneModule):
    """Low-rank adaptation of linear layers.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator; the update is scaled by ``alpha / r``.
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` for every linear layer
            except the output head.
        bias: Which biases to train alongside the adapters.
        use_rslora: Scale the update by ``alpha / sqrt(r)`` instead of ``alpha / r`` (rank-stabilised LoRA, Kalajdzievski,
            2023, https://arxiv.org/abs/2312.03732), which keeps the update's size steady as ``r`` grows.
        **kwargs: See :class:`FineTuneModule`.
    """

    # the frozen base weights are used only in matmuls: frozen_dtype: auto may store them in the autocast dtype
    cast_frozen_weights = True

    def __init__(
        self,
        *args,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        bias: Literal["none", "all", "lora_only"] = "none",
        use_rslora: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lora = dict(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, bias=bias,
                         use_rslora=use_rslora)
        self.peft_config()  # validate options now, not after the model has loaded

    def peft_config(self) -> Any:
        return lora_config(**self.lora)
