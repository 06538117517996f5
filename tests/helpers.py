"""Helpers shared by tests (plain functions and constants; the fixtures built on them are in tests/conftest.py).

A test module imports what it shares with another from here, never a private name of another test module.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay lazy: tests/conftest.py imports this module in every pytest process
    import torch
    from lightning.pytorch import Trainer

    from ftframe.data import InstructionDataModule

#: the repository root (the folder holding pyproject.toml)
ROOT = Path(__file__).resolve().parents[1]
#: optimizer steps of the multi-process runs (tests/test_distributed.py, tests/test_gpu.py)
DISTRIBUTED_STEPS = 4

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: the vocabulary of :func:`classification_records` (and of the tiny BERT's WordPiece tokenizer)
CLASSIFICATION_WORDS = ["good", "fine", "great", "bad", "dull", "awful", "film", "plot", "actors", "the", "a", "was",
                        "very"]


# ------------------------------------------------------------------------------------------------- data
def arithmetic_records(n: int = 48) -> list[dict[str, str]]:
    """``n`` prompt/completion records "What is A plus B?" -> "A plus B is S. #### S" (GSM8K's answer format)."""
    recs = []
    for i in range(n):
        a, b = i % 10, (i * 7) % 10
        recs.append({
            "id": f"ex{i}",
            "prompt": f"What is {WORDS[a]} plus {WORDS[b]}?",
            "completion": f"{WORDS[a]} plus {WORDS[b]} is {a + b}. #### {a + b}",
        })
    return recs


def preference_records(n: int = 48) -> list[dict[str, Any]]:
    """``n`` pairs: an arithmetic prompt, the right answer as chosen and a wrong one as rejected; the lengths differ
    within and across pairs (one rejected answer in three rambles), and every fourth record uses chat messages."""
    recs = []
    for i, rec in enumerate(arithmetic_records(n)):
        a, b = i % 10, (i * 7) % 10
        wrong = f"{WORDS[a]} plus {WORDS[b]} is {a + b + 1}. #### {a + b + 1}"
        if i % 3 == 0:
            wrong = f"Let me think. {WORDS[a]} and then {WORDS[b]}, so maybe {a + b + 2}. #### {a + b + 2}"
        pair: dict[str, Any] = {"prompt": rec["prompt"], "chosen": rec["completion"], "rejected": wrong}
        if i % 4 == 3:
            pair = {"prompt": [{"role": "user", "content": rec["prompt"]}],
                    "chosen": [{"role": "assistant", "content": rec["completion"]}],
                    "rejected": [{"role": "assistant", "content": wrong}]}
        recs.append(pair)
    return recs


def classification_records(n: int = 96) -> list[dict[str, str]]:
    """Three classes told apart by one word; the rest is shared filler."""
    words = CLASSIFICATION_WORDS
    cues = {"pos": "great", "neg": "awful", "mid": "fine"}
    out = []
    for i in range(n):
        label = ["pos", "neg", "mid"][i % 3]
        filler = " ".join(words[6 + (i + j) % 7] for j in range(1 + i % 5))
        out.append({"id": f"r{i}", "text": f"{filler} {cues[label]} {words[6 + i % 3]}", "label": label})
    return out


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> str:
    """Write ``records`` to ``path`` as JSON lines (UTF-8) and return the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def tiny_instruction_data(model: str, data: str, tmp_path: Path, **kwargs: Any) -> InstructionDataModule:
    """An InstructionDataModule for short CPU runs: 8 held-out examples, batches of 4, cache under ``tmp_path``."""
    from ftframe.data import InstructionDataModule

    kwargs = {"val_size": 8, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return InstructionDataModule(train_files=data, tokenizer=model, **kwargs)


def chat_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """The token ids of a one-turn chat as the tokenizer's chat template writes them: (prompt with the generation
    prompt, whole conversation)."""
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                             tokenize=True, return_dict=False)
    return prompt_ids, full_ids


# ------------------------------------------------------------------------------------------------- models
def build_tiny_model(folder: Path, hidden_size: int = 64) -> Path:
    """Write a tiny random Llama (2 layers) with a tiny trained BPE tokenizer and a ChatML template to ``folder``."""
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


def real_assets_available() -> bool:
    """Whether every default asset (``ftframe download``) is in the cache."""
    from ftframe import assets

    return all(assets.is_downloaded(n) for n in assets.DEFAULT_ASSETS)


def padded_batch(ids: Sequence[Sequence[int]], pad_id: int, length: int, side: str = "right") -> dict[str, torch.Tensor]:
    """``ids`` padded with ``pad_id`` to ``length`` on ``side`` ("right" or "left"), with the attention mask."""
    import torch

    def pad(row: list[int], fill: int) -> list[int]:
        extra = [fill] * (length - len(row))
        return extra + row if side == "left" else row + extra

    return {"input_ids": torch.tensor([pad(list(x), pad_id) for x in ids]),
            "attention_mask": torch.tensor([pad([1] * len(x), 0) for x in ids])}


def logits_one_by_one(module: Any, ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """The task's logits of each row of ``ids`` on its own (no padding), stacked."""
    import torch

    with torch.no_grad():
        return torch.cat([module.task.logits(module.model, {"input_ids": torch.tensor([list(x)]),
                                                            "attention_mask": torch.ones(1, len(x), dtype=torch.long)})
                          for x in ids])


# ------------------------------------------------------------------------------------------------- training
def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    from lightning.pytorch import Trainer

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                    num_sanity_val_steps=0, limit_val_batches=0)
    defaults.update(kwargs)
    return Trainer(**defaults)


def checkpointing_trainer(tmp_path, folder: Path, max_steps: int, every_n_train_steps: int, **kwargs) -> Trainer:
    """:func:`tiny_trainer` with an AdapterCheckpoint writing to ``folder`` every ``every_n_train_steps`` steps."""
    from ftframe.callbacks import AdapterCheckpoint

    checkpoint = AdapterCheckpoint(dirpath=str(folder), every_n_train_steps=every_n_train_steps, monitor=None)
    return tiny_trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True,
                        callbacks=[checkpoint, *kwargs.pop("callbacks", [])], **kwargs)


def tiny_fit_args(model: str, data: str, tmp_path, adapter, *extra: str, steps: int = 2) -> list[str]:
    """``ftframe fit`` arguments for a short CPU run of the default method on ``model``, writing ``adapter``."""
    return ["fit", f"--model.model_name={model}", f"--data.train_files={data}", f"--data.cache_dir={tmp_path / 'c'}",
            "--data.val_size=8", f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
            f"--adapter.dirpath={adapter}", *extra]


def classification_cli_args(model: str, data: str, root_dir) -> list[str]:
    """``ftframe`` arguments (after the subcommand) of a LoRA sequence classifier on the CPU: 12 validation and 12
    test examples, batches of 8, runs under ``root_dir``; the labels are linked from the data."""
    return ["--model=LoRA", f"--model.model_name={model}", "--model.task=SequenceClassification",
            "--data=ClassificationDataModule", f"--data.train_files={data}", "--data.val_size=12",
            "--data.test_size=12", "--data.batch_size=8", "--trainer.accelerator=cpu", "--trainer.logger=false",
            f"--trainer.default_root_dir={root_dir}"]


def fit_command(model, data, run_dir, *extra, steps=12):
    """``python -m ftframe fit`` (a subprocess command) of a seeded LoRA run on the CPU under ``run_dir``: a
    validation every 4 steps, an AdapterCheckpoint every 2, the adapter in ``run_dir / "adapter"``."""
    return [sys.executable, "-m", "ftframe", "fit", f"--model.model_name={model}", "--model.r=4",
            "--model.dropout=0.1", "--model.optimizer.learning_rate=0.005", f"--data.train_files={data}",
            f"--data.cache_dir={run_dir.parent / 'tok'}", "--data.val_size=8", "--data.batch_size=4",
            f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={run_dir}", "--trainer.val_check_interval=4",
            "--trainer.check_val_every_n_epoch=null", "--seed_everything=11", f"--adapter.dirpath={run_dir / 'adapter'}",
            "--trainer.callbacks+=ftframe.callbacks.AdapterCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
            *extra]


def run_cli(cmd, **kw):
    """Run ``cmd`` from the repository root, capturing text output, for at most 10 minutes."""
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def loss_gate(folder, data: str, max_drop: float, on_fail: str = "refuse") -> str:
    """Write an evaluation gate YAML (``--eval``) on the response loss of ``data``'s 8 held-out examples."""
    path = folder / "gate.yaml"
    path.write_text(f"on_fail: {on_fail}\nevaluations:\n  - task: loss\n    data: {data}\n    split: val\n"
                    f"    val_size: 8\n    max_drop: {max_drop}\n")
    return str(path)


# ------------------------------------------------------------------------------------------------- downloads
def tar_gz(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A gzip-compressed tarball holding ``(name, content)`` members, in that order."""
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return blob.getvalue()


def serve_downloads(monkeypatch, tmp_path, payload: bytes) -> list[str]:
    """Answer every ``urllib.request.urlopen`` with ``payload``; the asset cache is ``tmp_path`` and the npm registry
    ``https://npm.example/``. Returns the list the requested URLs are appended to."""
    import urllib.request

    seen: list[str] = []

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("FTFRAME_HOME", str(tmp_path))
    monkeypatch.setenv("FTFRAME_NPM_REGISTRY", "https://npm.example/")
    return seen
