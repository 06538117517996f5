"""Prompt tuning: trained "virtual token" embeddings put in front of every input; the model stays frozen.

Only ``num_virtual_tokens x hidden`` numbers train (Lester et al., 2021, "The Power of Scale for Parameter-Efficient
Prompt Tuning", https://arxiv.org/abs/2104.08691). They can start from the embeddings of a text. Built on
``peft.PromptTuningConfig``; the saved adapter loads with ``peft.PeftModel.from_pretrained``, and
``PeftModel.generate`` puts the virtual tokens in front of the prompt.
"""

from __future__ import annotations

from typing import Any

from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant
from ftframe.models import resolve_model

__all__ = ["PromptTuning"]


class PromptTuning(FineTuneModule):
    """Learn ``num_virtual_tokens`` input embeddings prepended to every example.

    Packed batches are unpacked for these methods (the virtual tokens belong in front of each example), and the
    loss skips the virtual positions.

    Args:
        num_virtual_tokens: Number of trained embeddings.
        init_text: Start the embeddings from this text's token embeddings (repeated or cut to
            ``num_virtual_tokens``); ``null`` starts from random vocabulary embeddings.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {
        "PromptTuning": Variant({"num_virtual_tokens": 4}, "prompt_encoder", compare=("prompt_tuning", "prompt_tuning")),
        "PromptTuning-text": Variant({"num_virtual_tokens": 4, "init_text": "Answer the question."}, "prompt_encoder",
                                     matrix=False),
    }

    def __init__(self, *args, num_virtual_tokens: int = 20, init_text: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if num_virtual_tokens < 1:
            raise UserError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        if init_text is not None and not init_text.strip():
            raise UserError("init_text is empty; give a text, or null for random initialisation")
        self.num_virtual_tokens = num_virtual_tokens
        self.init_text = init_text

    def peft_config(self) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit

        if self.init_text is None:
            return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens,
                                      prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
        return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=self.init_text,
                                  tokenizer_name_or_path=resolve_model(self.model_name))
