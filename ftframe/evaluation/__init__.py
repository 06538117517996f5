"""Evaluation: multiple-choice benchmarks (lm-evaluation-harness's scoring), perplexity, generation exact match.

The scoring functions take a model and a tokenizer and nothing else, so a callback can call them on the model being
trained (no second copy); ``ftframe evaluate`` (:func:`ftframe.tools.evaluate.evaluate`) loads a model and writes
reports.
"""

from ftframe.evaluation.generation import (
    GSM8K_ANSWER,
    evaluate_generation,
    extract_answer,
    load_generation_records,
    summarize_generation,
)
from ftframe.evaluation.multiple_choice import (
    FORMATS,
    MCQuestion,
    PromptFormat,
    load_prompt_format,
    load_questions,
    resolve_prompt_format,
    sample_evenly,
    score_multiple_choice,
    summarize,
)
from ftframe.evaluation.perplexity import perplexity, read_texts

__all__ = [
    "FORMATS",
    "GSM8K_ANSWER",
    "MCQuestion",
    "PromptFormat",
    "evaluate_generation",
    "extract_answer",
    "load_generation_records",
    "load_prompt_format",
    "load_questions",
    "perplexity",
    "read_texts",
    "resolve_prompt_format",
    "sample_evenly",
    "score_multiple_choice",
    "summarize",
    "summarize_generation",
]
