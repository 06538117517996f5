"""ftframe: fine-tune large language models with PyTorch Lightning.

Methods are ``LightningModule`` subclasses (:mod:`ftframe.methods`), data formats ``LightningDataModule`` subclasses
(:mod:`ftframe.data`), cross-cutting concerns callbacks (:mod:`ftframe.callbacks`); the ``ftframe`` command
composes them from YAML.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

#: Process settings ftframe applies when it is imported before ``torch`` (as the ``ftframe`` command is); a value
#: already in the environment wins. ``THP_MEM_ALLOC_ENABLE=1``: PyTorch backs CPU tensors of 2 MB and more with
#: transparent huge pages -- on Linux, peak memory of the CPU training benchmark fell ~28% at the same speed
#: (glibc's heap otherwise fragments between the activations kept for the backward pass). ``=0`` opts out.
PROCESS_DEFAULTS: dict[str, str] = {"THP_MEM_ALLOC_ENABLE": "1"} if _sys.platform.startswith("linux") else {}

if "torch" not in _sys.modules:  # read once, when torch loads
    for _key, _value in PROCESS_DEFAULTS.items():
        _os.environ.setdefault(_key, _value)
