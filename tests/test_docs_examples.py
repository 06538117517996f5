"""The code on docs/extending/new_method.md runs and gives a working method."""

from __future__ import annotations

import re

import torch

from ftframe.optim import OptimizerSettings
from tests.helpers import ROOT, tiny_instruction_data, tiny_trainer

PAGE = ROOT / "docs" / "extending" / "new_method.md"


def test_new_method_page_code_trains_and_saves_adapters(tiny_model, tiny_data, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(PAGE), "exec"), namespace)  # noqa: S102 - our own docs page
    method = namespace["MyBottleneck"](model_name=tiny_model, size=4, optimizer=OptimizerSettings(learning_rate=1e-2))
    method.configure_model()
    trainable = {n for n, p in method.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n for n in trainable)
    # starts as the base model: the up-projections are zero
    ids = torch.tensor([[1, 5, 9, 14]])
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(method.model(input_ids=ids).logits, base(input_ids=ids).logits)
    data = tiny_instruction_data(tiny_model, tiny_data, tmp_path, val_size=0)
    tiny_trainer(tmp_path, max_steps=2).fit(method, datamodule=data)
    with torch.no_grad():
        assert not torch.allclose(method.model(input_ids=ids).logits, base(input_ids=ids).logits)
    method.save_trained(tmp_path / "out")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "adapters.safetensors"))
    assert set(saved) == {k for k in method.model.state_dict() if ".adapter_" in k} and saved
