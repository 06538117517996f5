"""Tasks: *what* is learned, composed into every method (see docs/design.md, "The seams").

A task knows which ``transformers`` auto-class builds the backbone, which ``peft`` task type adapters use, and how
to turn a batch into a loss. Methods never branch on the task; they call these members. One file per task:

* :class:`CausalLM` (``causal_lm.py``) -- instruction tuning, loss on the response tokens;
* :class:`SequenceClassification` (``classification.py``) -- a label per text or text pair;
* :class:`Preference` (``preference.py``) -- DPO-family preference tuning on chosen / rejected pairs.
"""

from ftframe.tasks.base import Task, decoder_and_head, virtual_tokens
from ftframe.tasks.causal_lm import CausalLM
from ftframe.tasks.classification import SequenceClassification
from ftframe.tasks.preference import Preference

__all__ = ["CausalLM", "Preference", "SequenceClassification", "Task", "decoder_and_head", "virtual_tokens"]
