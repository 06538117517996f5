"""Adaptation methods: one ``FineTuneModule`` subclass per file."""

from ftframe.methods.base import FineTuneModule
from ftframe.methods.bottleneck import BottleneckAdapters
from ftframe.methods.dora import DoRA
from ftframe.methods.full import FullFineTune
from ftframe.methods.ia3 import IA3
from ftframe.methods.last_layers import LastLayers
from ftframe.methods.lora import LoRA
from ftframe.methods.prefix_tuning import PrefixTuning, PTuning
from ftframe.methods.prompt_tuning import PromptTuning
from ftframe.methods.qlora import QLoRA

__all__ = ["BottleneckAdapters", "DoRA", "FineTuneModule", "FullFineTune", "IA3", "LastLayers", "LoRA", "PrefixTuning", "PromptTuning", "PTuning", "QLoRA"]
