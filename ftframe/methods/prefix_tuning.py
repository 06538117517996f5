"""Prefix tuning and P-tuning: trained virtual tokens, as attention keys/values in every layer or as encoded inputs.

* ``PrefixTuning`` learns key/value vectors prepended to the attention of every layer (Li & Liang, 2021,
  "Prefix-Tuning", https://arxiv.org/abs/2101.00190), built on ``peft.PrefixTuningConfig``.
* ``PTuning`` learns virtual input embeddings produced by a small prompt encoder (an MLP or LSTM over trained
  vectors; Liu et al., 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385), built on
  ``peft.PromptEncoderConfig``.

Both leave the model frozen; their adapters load with ``peft.PeftModel.from_pretrained``. Packed batches are
unpacked for them, as for :class:`ftframe.methods.PromptTuning`.
"""

from __future__ import annotations

from typing import Any, Literal

from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant

__all__ = ["PTuning", "PrefixTuning"]


def _check_tokens(n: int) -> None:
    if n < 1:
        raise UserError(f"num_virtual_tokens must be >= 1, got {n}")


class PrefixTuning(FineTuneModule):
    """Trained key/value prefixes in every attention layer.

    Args:
        num_virtual_tokens: Length of the prefix.
        projection: Produce the prefixes through a two-layer MLP (more stable training; the MLP is not needed
            afterwards, peft folds it into the saved prefixes).
        projection_hidden: Hidden size of that MLP.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {"PrefixTuning": Variant({"num_virtual_tokens": 4}, "prompt_encoder",
                                        compare=("prefix_tuning", "prefix_tuning"))}

    def __init__(self, *args, num_virtual_tokens: int = 20, projection: bool = False, projection_hidden: int = 512,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_tokens(num_virtual_tokens)
        self.num_virtual_tokens = num_virtual_tokens
        self.projection = projection
        self.projection_hidden = projection_hidden

    def check_base(self, config: Any) -> None:
        if not getattr(config, "use_cache", True) or getattr(config, "is_encoder_decoder", False):
            raise UserError(f"PrefixTuning needs a decoder-only model with a key/value cache; {self.model_name!r} "
                            f"({getattr(config, 'model_type', '?')}) has none. Use PromptTuning or PTuning instead")

    def peft_config(self) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.projection,
                                  encoder_hidden_size=self.projection_hidden)


class PTuning(FineTuneModule):
    """Virtual input embeddings from a trained prompt encoder.

    Args:
        num_virtual_tokens: Number of virtual tokens.
        encoder: ``MLP`` or ``LSTM`` prompt encoder.
        encoder_hidden: Hidden size of the encoder.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {"PTuning": Variant({"num_virtual_tokens": 4, "encoder_hidden": 16}, "prompt_encoder",
                                   compare=("p_tuning", "p_tuning"))}

    def __init__(self, *args, num_virtual_tokens: int = 20, encoder: Literal["MLP", "LSTM"] = "MLP",
                 encoder_hidden: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_tokens(num_virtual_tokens)
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder = encoder
        self.encoder_hidden = encoder_hidden

    def peft_config(self) -> Any:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(num_virtual_tokens=self.num_virtual_tokens, encoder_reparameterization_type=self.encoder,
                                   encoder_hidden_size=self.encoder_hidden)
