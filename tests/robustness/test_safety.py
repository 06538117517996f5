"""Safety rules over the whole code base: nothing is unpickled beyond tensors, no remote code runs, and what a run
saves loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import ast

import torch

from tests.helpers import ROOT

SOURCES = sorted(p for folder in ("ftframe", "callbacks", "scripts", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def _calls(sources, name: str):
    """(where, call) for every call of a function or method named ``name`` in ``sources``: (label, text) pairs."""
    for label, text in sources:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == name
                                               or getattr(node.func, "id", None) == name):
                yield f"{label}:{node.lineno}", node


def _unsafe_torch_loads(sources) -> list[str]:
    """Where ``torch.load`` is called without ``weights_only=True``."""
    loads = [(w, n) for w, n in _calls(sources, "load") if getattr(n.func, "value", None) is not None
             and getattr(n.func.value, "id", None) == "torch"]
    return [w for w, n in loads
            if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in n.keywords)]


def _remote_code_trusted(sources) -> list[str]:
    """Where a loader gets ``trust_remote_code`` at all, or the text ``trust_remote_code=True`` appears."""
    keywords = [w for name in ("from_pretrained", "AutoTokenizer", "load_dataset") for w, n in _calls(sources, name)
                for k in n.keywords if k.arg == "trust_remote_code"]
    return keywords + [label for label, text in sources if "trust_remote_code=True" in text]


def _code_base():
    return [(str(p.relative_to(ROOT)), p.read_text(encoding="utf-8")) for p in SOURCES]


def test_every_torch_load_is_weights_only():
    assert len(SOURCES) > 20 and all(p.suffix == ".py" for p in SOURCES)
    unsafe = _unsafe_torch_loads(_code_base())
    assert not unsafe, unsafe  # (today ftframe itself calls no torch.load: Lightning loads checkpoints)


def test_the_torch_load_check_finds_an_unsafe_call():
    snippet = ("import torch\n"
               "a = torch.load('x')\n"
               "b = torch.load('x', weights_only=False)\n"
               "c = torch.load('x', map_location='cpu', weights_only=True)\n"
               "d = json.load(f)\n")
    assert _unsafe_torch_loads([("m.py", snippet)]) == ["m.py:2", "m.py:3"]


def test_remote_code_is_never_trusted():
    trusted = _remote_code_trusted(_code_base())
    assert not trusted, trusted


def test_the_remote_code_check_finds_a_trusting_loader():
    snippet = ("AutoModel.from_pretrained('m', trust_remote_code=flag)\n"
               "AutoTokenizer.from_pretrained('m')\n"
               "load_dataset('d', trust_remote_code=False)\n")
    assert _remote_code_trusted([("m.py", snippet)]) == ["m.py:1", "m.py:3"]
    assert _remote_code_trusted([("m.py", "HINT = 'pass trust_remote_code=True'\n")]) == ["m.py"]


def test_a_resume_checkpoint_loads_with_weights_only(tiny_model, tiny_data, tmp_path):
    from ftframe.methods import LoRA
    from tests.helpers import checkpointing_trainer, tiny_instruction_data

    folder = tmp_path / "checkpoints"
    trainer = checkpointing_trainer(tmp_path, folder, max_steps=2, every_n_train_steps=2)
    trainer.fit(LoRA(model_name=tiny_model), datamodule=tiny_instruction_data(tiny_model, tiny_data, tmp_path))
    state = torch.load(folder / "step=000002" / "resume.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 2 and all("lora_" in k for k in state["state_dict"])
    assert (folder / "step=000002" / "adapter_model.safetensors").is_file()
