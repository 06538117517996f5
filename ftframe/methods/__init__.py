"""Adaptation methods: one ``FineTuneModule`` subclass per file."""

from ftframe.methods.base import FineTuneModule
from ftframe.methods.full import FullFineTune
from ftframe.methods.lora import LoRA
from ftframe.methods.qlora import QLoRA

__all__ = ["FineTuneModule", "FullFineTune", "LoRA", "QLoRA"]
