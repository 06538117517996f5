"""Safety rules over the whole code base: nothing is unpickled beyond tensors, no remote code runs, and what a run
saves loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("ftframe", "callbacks", "scripts", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def _calls(name: str):
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == name
                                               or getattr(node.func, "id", None) == name):
                yield path, node


def test_every_torch_load_is_weights_only():
    loads = [(p, n) for p, n in _calls("load") if getattr(n.func, "value", None) is not None
             and getattr(n.func.value, "id", None) == "torch"]
    unsafe = [f"{p.relative_to(ROOT)}:{n.lineno}" for p, n in loads
              if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in n.keywords)]
    assert SOURCES and not unsafe, unsafe  # (today ftframe itself calls no torch.load: Lightning loads checkpoints)


def test_remote_code_is_never_trusted():
    trusting = [f"{p.relative_to(ROOT)}:{n.lineno}" for name in ("from_pretrained", "AutoTokenizer", "load_dataset")
                for p, n in _calls(name) for k in n.keywords if k.arg == "trust_remote_code"]
    text = [str(p.relative_to(ROOT)) for p in SOURCES if "trust_remote_code=True" in p.read_text(encoding="utf-8")]
    assert not trusting and not text, (trusting, text)


def test_a_resume_checkpoint_loads_with_weights_only(tiny_model, tiny_data, tmp_path):
    from ftframe.callbacks import AdapterCheckpoint
    from ftframe.data import InstructionDataModule
    from ftframe.methods import LoRA
    from tests.helpers import tiny_trainer

    folder = tmp_path / "checkpoints"
    data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=8, batch_size=4,
                                 cache_dir=str(tmp_path / "cache"))
    trainer = tiny_trainer(tmp_path, max_steps=2, enable_checkpointing=True,
                           callbacks=[AdapterCheckpoint(dirpath=str(folder), every_n_train_steps=2, monitor=None)])
    trainer.fit(LoRA(model_name=tiny_model), datamodule=data)
    state = torch.load(folder / "step=000002" / "resume.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 2 and all("lora_" in k for k in state["state_dict"])
    assert (folder / "step=000002" / "adapter_model.safetensors").is_file()
