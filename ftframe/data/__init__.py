"""Data modules and the pieces they are built from."""

from ftframe.data.instruction import InstructionDataModule

__all__ = ["InstructionDataModule"]
