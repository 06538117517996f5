"""IA3: learned rescaling vectors on attention keys/values and the MLP's input to its down projection.

Each targeted activation is multiplied element-wise by a trained vector initialised to ones, so training starts
from the base model; about 0.01% of the parameters train (Liu et al., 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", https://arxiv.org/abs/2205.05638). Built on
``peft.IA3Config``; the saved adapter loads with ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

from typing import Any

from ftframe.errors import UserError
from ftframe.methods.base import FineTuneModule, Variant

__all__ = ["IA3"]


class IA3(FineTuneModule):
    """Scale keys, values and the feed-forward activations by trained vectors.

    Args:
        target_modules: Modules whose output (or, for ``feedforward_modules``, input) is rescaled; ``null`` uses
            peft's default for the architecture (Llama: ``k_proj``, ``v_proj``, ``down_proj``).
        feedforward_modules: The subset of ``target_modules`` whose *input* is rescaled; ``null`` = peft's default.
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {"IA3": Variant({}, "ia3_l", compare=("ia3", "ia3"))}

    def __init__(self, *args, target_modules: list[str] | None = None,
                 feedforward_modules: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if target_modules is not None and not target_modules:
            raise UserError("target_modules is empty; name modules (e.g. [k_proj, v_proj, down_proj]) or use null")
        if feedforward_modules and target_modules is not None and not set(feedforward_modules) <= set(target_modules):
            raise UserError(f"feedforward_modules {feedforward_modules} must be a subset of target_modules "
                            f"{target_modules}")
        if feedforward_modules is not None and target_modules is None:
            raise UserError("feedforward_modules needs target_modules too (peft requires both or neither)")
        self.target_modules = target_modules
        self.feedforward_modules = feedforward_modules

    def peft_config(self) -> Any:
        from peft import IA3Config

        return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules)
