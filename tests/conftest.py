"""Shared fixtures: a tiny random Llama with a tiny trained BPE tokenizer and ChatML template, plus small data.

The functions they are built from live in tests/helpers.py.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import (
    WORDS,
    arithmetic_records,
    build_tiny_model,
    classification_records,
    preference_records,
    write_jsonl,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision: auto resolves to 32-true in every test process (subprocesses inherit this), whatever the CPU: the suite
# runs alike on CPUs with and without fast bfloat16. tests/test_device.py checks the resolution itself.
os.environ["FTFRAME_CPU_BF16"] = "slow"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Folder of a tiny random Llama (2 layers, hidden 64) with a ChatML tokenizer; no pad token on purpose."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """48 arithmetic prompt/completion records (tests.helpers.arithmetic_records) as JSONL."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "arith.jsonl", arithmetic_records())


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory) -> str:
    """96 three-class review records (tests.helpers.classification_records) as JSONL."""
    return write_jsonl(tmp_path_factory.mktemp("cls") / "reviews.jsonl", classification_records())


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory) -> str:
    """48 arithmetic preference pairs (tests.helpers.preference_records) as JSONL: text and chat-message records."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_records())


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "tok-cache")


@pytest.fixture(scope="session")
def even_data(tmp_path_factory) -> str:
    """Arithmetic in words; every completion is 6 tokens of the tiny tokenizer (each number word is one token)."""
    records = []
    for i in range(48):
        a, b = i % 10, (i * 7 + 3) % 10
        records.append({"prompt": f"What is {WORDS[a]} plus {WORDS[b]}?",
                        "completion": f"{WORDS[a]} plus {WORDS[b]} is {WORDS[(a + b) % 10]}."})
    return write_jsonl(tmp_path_factory.mktemp("even") / "even.jsonl", records)


@pytest.fixture
def compare_config(tiny_model, tiny_data, tmp_path) -> str:
    """An `ftframe compare` base config on the tiny model and data (LoRA, constant learning rate)."""
    path = tmp_path / "base.yaml"
    path.write_text(f"""seed_everything: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  num_sanity_val_steps: 0
model:
  class_path: ftframe.methods.LoRA
  init_args:
    model_name: {tiny_model}
    optimizer:
      lr_schedule: constant
data:
  class_path: ftframe.data.InstructionDataModule
  init_args:
    train_files: {tiny_data}
    val_size: 8
    batch_size: 4
    cache_dir: {tmp_path / 'cache'}
""")
    return str(path)
