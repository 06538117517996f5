"""Data modules and the pieces they are built from."""

from ftframe.data.classification import ClassificationDataModule
from ftframe.data.instruction import InstructionDataModule

__all__ = ["ClassificationDataModule", "InstructionDataModule"]
