"""The contract every method keeps (docs/design.md, "Adding a method"), parametrized over all methods on a tiny Llama."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftframe.artifacts import read_trained, write_trained
from ftframe.data import InstructionDataModule, PreferenceDataModule
from ftframe.methods import METHODS, LastLayers, LoRA, PrefixTuning, PromptTuning, PTuning, QLoRA, variants
from ftframe.models import load_model
from ftframe.optim import OptimizerSettings
from ftframe.packing import unpack
from ftframe.tasks import Preference
from tests.helpers import tiny_trainer

#: label -> (method class, Variant): every shipped method's test configurations (ftframe.methods)
VARIANTS = variants()
# Max |logit difference| allowed after save -> load: exact for every method.
# PiSSA/OLoRA adapters are saved converted to rank-2r adapters on the original weights: equal up to float rounding.
LOGIT_TOLERANCE: dict[str, float] = {"PiSSA": 1e-4, "OLoRA": 1e-4}


@pytest.fixture(params=list(VARIANTS))
def method_name(request):
    return request.param


@pytest.fixture
def method(method_name):
    return VARIANTS[method_name]


def _build(method, tiny_model, tiny_data, cache_dir, tmp_path, max_steps=2):
    cls, variant = method
    module = cls(model_name=tiny_model, optimizer=OptimizerSettings(learning_rate=1e-2), **variant.options)
    data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=8, batch_size=4,
                                 cache_dir=cache_dir)
    trainer = tiny_trainer(tmp_path, max_steps=max_steps)
    return module, data, trainer


def test_trainable_parameters_are_exactly_the_methods(method, tiny_model, tiny_data, cache_dir, tmp_path):
    module, _, _ = _build(method, tiny_model, tiny_data, cache_dir, tmp_path)
    module.configure_model()
    _, variant = method
    names = [n for n, _ in module.model.named_parameters()]
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable, "no trainable parameters"
    assert trainable == {n for n in names if re.search(variant.trains, n)}


def test_two_steps_change_every_trainable_parameter_and_nothing_else(method, tiny_model, tiny_data, cache_dir,
                                                                   tmp_path):
    module, data, trainer = _build(method, tiny_model, tiny_data, cache_dir, tmp_path)
    module.configure_model()

    def tensors():  # parameters and buffers (bitsandbytes' quantization statistics are neither)
        return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers())}

    before = {k: v.detach().clone() for k, v in tensors().items()}
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    after = tensors()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed, "two optimizer steps changed nothing"
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    # every trainable tensor moved (LoRA's B starts at 0 and moves at step 1; A receives gradient from step 2 on)
    assert changed == trainable, f"trainable tensors that never moved: {sorted(trainable - changed)[:5]}"


def test_every_method_trains_under_the_preference_task(method, tiny_model, pair_data, cache_dir, tmp_path):
    """DPO composes with every method unchanged: two steps move exactly the method's parameters, with the reference
    the method's own (adapters off) or precomputed where it has none."""
    cls, variant = method
    module = cls(model_name=tiny_model, task=Preference(), optimizer=OptimizerSettings(learning_rate=1e-2),
                 **variant.options)
    data = PreferenceDataModule(train_files=pair_data, tokenizer=tiny_model, val_size=8, batch_size=4,
                                cache_dir=cache_dir)
    module.configure_model()
    tensors = lambda: {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers())}  # noqa: E731
    before = {k: v.detach().clone() for k, v in tensors().items()}
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
    changed = {k for k, v in tensors().items() if not torch.equal(before[k], v)}
    assert changed == trainable, (f"frozen tensors changed: {sorted(changed - trainable)[:5]}; trainable tensors that "
                                  f"never moved: {sorted(trainable - changed)[:5]}")
    precomputed = module.task._table is not None
    assert precomputed == (module.reference_context() is None)


def test_saved_artifact_reproduces_logits(method, method_name, tiny_model, tiny_data, cache_dir, tmp_path):
    module, data, trainer = _build(method, tiny_model, tiny_data, cache_dir, tmp_path)
    trainer.fit(module, datamodule=data)
    out = tmp_path / "artifact"
    module.save_trained(out)  # and the method's own counterpart loads it back (QLoRA: the 4-bit base rebuilt)
    cls, _ = method
    reloaded = cls.load_trained(read_trained(str(out)), tiny_model).eval()
    module.model.eval()
    batch = unpack(next(iter(data.val_dataloader())))  # a padded batch, as users call the model
    with torch.no_grad():
        expected = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = (expected - got).abs().max().item()
    assert diff <= LOGIT_TOLERANCE.get(method_name, 0.0), f"max abs diff {diff}"


def test_checkpoint_holds_only_trainable_weights(method, tiny_model, tiny_data, cache_dir, tmp_path):
    module, data, trainer = _build(method, tiny_model, tiny_data, cache_dir, tmp_path)
    trainer.fit(module, datamodule=data)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert set(state["state_dict"]) == trainable
    assert state["optimizer_states"], "optimizer state missing"
    assert "loops" in state


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fast_dev_run_through_cli(name, tiny_model, tiny_data, tmp_path):
    from ftframe.cli import main
    from ftframe.methods import load_trained

    out = tmp_path / "adapter"
    main([
        "fit", f"--model={METHODS[name].__module__}.{name}", f"--model.model_name={tiny_model}",
        f"--data.train_files={tiny_data}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.val_size=8",
        "--data.batch_size=4", "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}", f"--adapter.dirpath={out}",
    ])
    assert (out / "tokenizer_config.json").is_file()
    model, info = load_trained(str(out))  # by the method recorded in ftframe.json
    assert info.method == name
    assert sum(p.numel() for p in model.parameters()) > 0


def test_gradual_unfreezing_trains_one_more_block_every_n_steps(tiny_model, tiny_data, cache_dir, tmp_path):
    module = LastLayers(model_name=tiny_model, num_layers=0, unfreeze_every=2, optimizer=OptimizerSettings(learning_rate=1e-2))
    data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=0, batch_size=4,
                                 cache_dir=cache_dir)
    module.configure_model()
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}

    def changed():
        return {n.split(".layers.")[1].split(".")[0] for n, p in module.model.named_parameters()
                if ".layers." in n and not torch.equal(p, start[n])}

    tiny_trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert changed() == set()  # steps 0-1: the head alone
    tiny_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)
    assert changed() == {"1"}  # step 2: the top block joins
    tiny_trainer(tmp_path, max_steps=6).fit(module, datamodule=data)
    assert changed() == {"0", "1"}  # step 4: the next block down


@pytest.mark.parametrize("name,converts", [("LoRA", True), ("LastLayers", True), ("DoRA", False), ("IA3", False)])
def test_frozen_weights_go_bf16_only_where_they_are_used_in_matmuls_alone(name, converts, tiny_model, tmp_path):
    from ftframe import methods

    module = getattr(methods, name)(model_name=tiny_model, **({"num_layers": 1} if name == "LastLayers" else {}))
    module.trainer = tiny_trainer(tmp_path, precision="bf16-mixed")
    module.configure_model()
    frozen = [p for m in module.model.modules() if isinstance(m, torch.nn.Linear)
              for p in m.parameters(recurse=False) if not p.requires_grad]
    assert frozen
    assert any(p.dtype == torch.bfloat16 for p in frozen) is converts


@pytest.mark.parametrize("cls", [PromptTuning, PTuning, PrefixTuning])
def test_prompt_learning_loss_equals_peft_and_generation_works(cls, tiny_model, tiny_data, cache_dir):
    from ftframe.data.collate import PromptCollator

    module = cls(model_name=tiny_model, num_virtual_tokens=4)
    module.configure_model()
    data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=0, batch_size=4,
                                 cache_dir=cache_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # packed: the task unpacks it for prompt tuning
    loss, n = module.task.loss(module.model, batch)
    padded = unpack(batch)
    # peft's own loss, which prepends ignored labels for the virtual tokens
    reference = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                             labels=padded["labels"]).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert int(n) == int((padded["labels"][:, 1:] != -100).sum())
    examples = [data.train_dataset[i] for i in range(2)]
    prompts = PromptCollator(module.tokenizer.pad_token_id)(examples)
    out = module.task.predict(module.model.eval(), prompts, module.tokenizer)
    assert len(out) == 2 and all(isinstance(o["prediction"], str) for o in out)


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (LastLayers, {"num_layers": 5}, r"num_layers=5, but .* has 2 blocks; use 0\.\.2"),
    (LoRA, {"target_modules": ["qkv"]}, r"target_modules \['qkv'\] not found .* Linear modules of this model: .*q_proj"),
    (QLoRA, {"target_modules": ["q_proj", "dense"]}, r"\['dense'\] not found .*down_proj.*all-linear"),
])
def test_incompatible_settings_fail_before_weights_load(cls, kwargs, message, tiny_model, monkeypatch):
    from ftframe.errors import UserError

    module = cls(model_name=tiny_model, **kwargs)

    def no_load():
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(module, "load_base_model", no_load)
    with pytest.raises(UserError, match=message):
        module.configure_model()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loftq_starts_closer_to_the_full_precision_model(tiny_model):
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit

    full = load_model(tiny_model, AutoModelForCausalLM).eval()
    full_weights = dict(full.named_parameters())
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = _logits(full, ids)
    errors = {}
    for init in ("default", "loftq"):
        module = QLoRA(model_name=tiny_model, r=16, dropout=0.0, compute_dtype="float32", double_quant=False,
                       init=init)
        module.configure_model()
        errors[init] = (_logits(module.model.eval(), ids) - reference).abs().mean().item()
        if init == "default":
            continue
        layers = {n: m for n, m in module.model.named_modules() if isinstance(m, Linear4bit)}
        assert len(layers) == 14
        for name, layer in layers.items():
            w = full_weights[name.split("base_model.model.", 1)[1] + ".weight"]
            q = layer.get_base_layer().weight
            residual = w - bnb.functional.dequantize_4bit(q.data, q.quant_state)
            with torch.no_grad():
                left = residual - layer.get_delta_weight("default")
            # the adapter is the best rank-16 approximation of the quantization error (Eckart-Young)
            best = torch.linalg.svdvals(residual)[16:].square().sum().sqrt()
            torch.testing.assert_close(left.norm(), best, rtol=1e-4, atol=1e-6)
            assert left.norm() < 0.8 * residual.norm()
    assert errors["loftq"] < 0.8 * errors["default"], errors


def test_loftq_is_refused_without_a_quantized_base(tiny_model):
    from ftframe.errors import UserError

    with pytest.raises(UserError, match=r"loftq needs a quantized base.*ftframe\.methods\.QLoRA --model\.init=loftq"):
        LoRA(model_name=tiny_model, init="loftq")


@pytest.mark.parametrize("name", ["BottleneckAdapters", "QLoRA", "LoftQ"])
def test_generate_loads_non_peft_and_quantized_artifacts(name, tiny_model, tiny_data, cache_dir, tmp_path):
    from ftframe.tools.generate import Generator

    module, data, trainer = _build(VARIANTS[name], tiny_model, tiny_data, cache_dir, tmp_path)
    trainer.fit(module, datamodule=data)
    out = tmp_path / "artifact"
    write_trained(trainer, module, out, tmp_path)  # as ftframe fit writes it: the method recorded in ftframe.json
    gen = Generator(adapter=str(out))  # base read from the folder; QLoRA / LoftQ: re-quantized as recorded
    ids = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    diff = (_logits(gen.model, ids) - _logits(module.model.eval(), ids)).abs().max().item()
    assert diff == 0.0, diff  # the same weights in the same layout (QLoRA: the 4-bit base kept as training had it)
    prompt = gen.tokenizer(gen.prompt_text("What is one plus two?"), return_tensors="pt",
                           add_special_tokens=not getattr(gen.tokenizer, "chat_template", None))
    with torch.no_grad():
        expected = module.model.generate(**prompt, max_new_tokens=3, do_sample=False,
                                         pad_token_id=gen.tokenizer.pad_token_id)
    answer = gen(["What is one plus two?"], max_new_tokens=3)[0]
    assert answer == gen.tokenizer.decode(expected[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
