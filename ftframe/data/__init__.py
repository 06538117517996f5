"""Data modules and the pieces they are built from."""

from ftframe.data.classification import ClassificationDataModule
from ftframe.data.instruction import InstructionDataModule
from ftframe.data.multitask import MultitaskDataModule
from ftframe.data.preference import PreferenceDataModule

__all__ = ["ClassificationDataModule", "InstructionDataModule", "MultitaskDataModule", "PreferenceDataModule"]
