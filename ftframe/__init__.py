"""ftframe: fine-tune large language models with PyTorch Lightning.

Methods are ``LightningModule`` subclasses (:mod:`ftframe.methods`), data formats ``LightningDataModule`` subclasses
(:mod:`ftframe.data`), cross-cutting concerns callbacks (:mod:`ftframe.callbacks`); the ``ftframe`` command
composes them from YAML.
"""

__version__ = "0.1.0"
