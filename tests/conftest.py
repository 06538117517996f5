"""Shared fixtures: a tiny random Llama with a tiny trained BPE tokenizer and ChatML template, plus small data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision: auto resolves to 32-true in every test process (subprocesses inherit this), whatever the CPU: the suite
# runs alike on CPUs with and without fast bfloat16. tests/test_device.py checks the resolution itself.
os.environ["FTFRAME_CPU_BF16"] = "slow"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def arithmetic_records(n: int = 48) -> list[dict[str, str]]:
    recs = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        recs.append({
            "id": f"ex{i}",
            "prompt": f"What is {WORDS[a]} plus {WORDS[b]}?",
            "completion": f"{WORDS[a]} plus {WORDS[b]} is {a + b}. #### {a + b}",
        })
    return recs


def build_tiny_model(folder: Path, hidden_size: int = 64) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = []
    for r in arithmetic_records(100):
        corpus += [r["prompt"], r["completion"]]
    corpus += ["user", "assistant", "system", "Hello there, how are you?", "The capital of France is Paris."]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Folder of a tiny random Llama (2 layers, hidden 64) with a ChatML tokenizer; no pad token on purpose."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records()), encoding="utf-8")
    return str(path)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "tok-cache")


def real_assets_available() -> bool:
    from ftframe import assets

    return all(assets.is_downloaded(n) for n in assets.DEFAULT_ASSETS)
