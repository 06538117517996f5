"""The training path's speed/memory levers change no result: packing, chunked loss, frozen bf16, lean activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from ftframe.data import InstructionDataModule
from ftframe.data.collate import LengthGroupedSampler, PackCollator, PadCollator
from ftframe.efficiency import cast_frozen_linear, lean_activations
from ftframe.losses import linear_cross_entropy
from ftframe.methods import LoRA
from ftframe.optim import OptimizerSettings
from ftframe.packing import enable_varlen_attention, packing_mode, unpack
from ftframe.tasks import CausalLM
from tests.helpers import tiny_trainer

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _examples(tiny_model, tiny_data, cache_dir, n=6):
    dm = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, cache_dir=cache_dir, val_size=0)
    dm.setup("fit")
    return [dm.train_dataset[i] for i in range(n)]


def _model(tiny_model, varlen=True):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    if varlen:
        assert enable_varlen_attention(model)
    return model


def _lora(tiny_model, **kw):
    module = LoRA(model_name=tiny_model, r=4, dropout=0.0, **kw)
    module.configure_model()
    # make the adapters non-trivial so a wrong path would show
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return module


# ------------------------------------------------------------------------------------------------------- packing
def test_packed_examples_never_attend_to_each_other(tiny_model, tiny_data, cache_dir):
    examples = _examples(tiny_model, tiny_data, cache_dir)
    packed = PackCollator()(examples)
    model = _model(tiny_model)
    from ftframe.packing import packed_forward, varlen_kwargs

    with torch.no_grad(), packed_forward():
        row = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], **varlen_kwargs(packed)).logits
    edges = packed["cu_seq_lens"].tolist()
    for i, e in enumerate(examples):
        with torch.no_grad():
            alone = model(input_ids=e["input_ids"][None]).logits[0]
        torch.testing.assert_close(row[0, edges[i]: edges[i + 1]], alone, rtol=1e-5, atol=1e-5)


def test_changing_one_example_does_not_change_another_in_the_packed_row(tiny_model, tiny_data, cache_dir):
    examples = _examples(tiny_model, tiny_data, cache_dir, n=3)
    model = _model(tiny_model)
    from ftframe.packing import packed_forward, varlen_kwargs

    def logits(batch):
        with torch.no_grad(), packed_forward():
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         **varlen_kwargs(batch)).logits[0]

    a = PackCollator()(examples)
    changed = [dict(e) for e in examples]
    changed[0] = {"input_ids": examples[0]["input_ids"].flip(0), "labels": examples[0]["labels"]}
    b = PackCollator()(changed)
    start = int(a["cu_seq_lens"][1])
    assert not torch.equal(logits(a)[:start], logits(b)[:start])
    torch.testing.assert_close(logits(a)[start:], logits(b)[start:], rtol=1e-5, atol=1e-5)


def test_packing_supervises_exactly_the_padded_batchs_tokens(tiny_model, tiny_data, cache_dir):
    examples = _examples(tiny_model, tiny_data, cache_dir)
    packed, padded = PackCollator()(examples), PadCollator(0)(examples)
    targets_packed = packed["labels"][0, 1:][packed["labels"][0, 1:] != -100]
    targets_padded = padded["labels"][:, 1:][padded["labels"][:, 1:] != -100]
    assert torch.equal(targets_packed, targets_padded)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))  # no padding at all
    back = unpack(packed)
    assert torch.equal(back["input_ids"][back["attention_mask"].bool()], padded["input_ids"][padded["attention_mask"].bool()])


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_loss_and_gradients_equal_the_padded_batchs(tiny_model, tiny_data, cache_dir, autocast):
    examples = _examples(tiny_model, tiny_data, cache_dir)
    module = _lora(tiny_model)
    results = []
    for batch in (PadCollator(0)(examples), PackCollator()(examples)):
        module.model.zero_grad()
        with torch.autocast(**AUTOCAST, enabled=autocast):
            loss, n = module.task.loss(module.model, batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), n, grads))
    (l1, n1, g1), (l2, n2, g2) = results
    assert int(n1) == int(n2) > 0
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(l2, l1, **tol)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], **tol)


def test_models_without_the_attention_interface_get_the_batch_unpacked(tiny_model, tiny_data, cache_dir):
    examples = _examples(tiny_model, tiny_data, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="eager")
    assert packing_mode(model) == "unpack"
    task = CausalLM()
    with torch.no_grad():
        packed_loss, _ = task.loss(model, PackCollator()(examples))
        padded_loss, _ = task.loss(model, PadCollator(0)(examples))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)


def test_length_grouped_batches_hold_similar_lengths_and_cover_every_example_once():
    lengths = [((i * 37) % 101) + 1 for i in range(400)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, window=10)
    order = list(sampler)
    assert sorted(order) == list(range(400))
    spread = [max(lengths[i] for i in order[b: b + 8]) - min(lengths[i] for i in order[b: b + 8])
              for b in range(0, 400, 8)]
    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    random_spread = [max(lengths[i] for i in shuffled[b: b + 8]) - min(lengths[i] for i in shuffled[b: b + 8])
                     for b in range(0, 400, 8)]
    assert sum(spread) < sum(random_spread) / 4
    sampler.resume_from(0, 80)
    assert list(sampler) == order[80:]


# -------------------------------------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_chunked_loss_equals_the_plain_loss_values_and_gradients(smoothing, trainable_head):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(trainable_head)
    hidden = torch.randn(77, 32, requires_grad=True)
    labels = torch.randint(0, 500, (77,))
    plain = F.cross_entropy(head(hidden), labels, reduction="sum", label_smoothing=smoothing)
    plain.backward()
    expected = (plain.detach(), hidden.grad.clone(), head.weight.grad.clone() if trainable_head else None)
    for chunk in (16, 77, 1000):
        hidden.grad, head.weight.grad = None, None
        got = linear_cross_entropy(hidden, head, labels, smoothing, chunk)
        got.backward()
        torch.testing.assert_close(got, expected[0], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(hidden.grad, expected[1], rtol=1e-5, atol=1e-6)
        if trainable_head:
            torch.testing.assert_close(head.weight.grad, expected[2], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(linear_cross_entropy(hidden, head, labels, smoothing, chunk), expected[0],
                                       rtol=1e-5, atol=1e-4)


def test_chunked_loss_under_autocast_matches_the_plain_bf16_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    hidden = torch.randn(64, 32, requires_grad=True)
    labels = torch.randint(0, 500, (64,))
    with torch.autocast(**AUTOCAST):
        plain = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    plain.backward()
    g = hidden.grad.clone()
    hidden.grad = None
    with torch.autocast(**AUTOCAST):
        got = linear_cross_entropy(hidden, head, labels, 0.0, 16)
    got.backward()
    torch.testing.assert_close(got, plain.detach(), rtol=1e-6, atol=1e-4)  # same bf16 logits, fp32 softmax
    torch.testing.assert_close(hidden.grad, g, rtol=1e-2, atol=1e-3)


def test_other_heads_are_chunked_through_the_module_with_recomputation():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(32, 500))  # not a plain bias-free Linear: generic path
    hidden = torch.randn(50, 32, requires_grad=True)
    labels = torch.randint(0, 500, (50,))
    plain = F.cross_entropy(head(hidden), labels, reduction="sum")
    grads = torch.autograd.grad(plain, [hidden, head[0].weight])
    got = linear_cross_entropy(hidden, head, labels, 0.0, 8)
    for a, b in zip(torch.autograd.grad(got, [hidden, head[0].weight]), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_split_loss_path_is_refused_when_the_model_post_processes_logits(tiny_model, tiny_data, cache_dir):
    examples = _examples(tiny_model, tiny_data, cache_dir)
    model = _model(tiny_model)
    batch = PackCollator()(examples)
    task = CausalLM()
    with torch.no_grad():
        fast, _ = task.loss(model, batch)
    assert model._ftframe_split_ok is True
    # a model whose logits are scaled after the head: the split path would be wrong, so the plain one is used
    scaled = _model(tiny_model)
    forward = scaled.forward

    def scaled_forward(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 2.0
        return out

    scaled.forward = scaled_forward
    with torch.no_grad():
        loss, _ = task.loss(scaled, batch)
    assert scaled._ftframe_split_ok is False
    assert abs(float(loss) - float(fast)) > 1e-3


# ------------------------------------------------------------------------------------ frozen bf16, lean activations
def _logits_and_grads(module, batch):
    module.model.zero_grad()
    with torch.autocast(**AUTOCAST):
        out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}


def test_frozen_linears_in_bf16_change_nothing_under_autocast(tiny_model, tiny_data, cache_dir):
    batch = PadCollator(0)(_examples(tiny_model, tiny_data, cache_dir))
    torch.manual_seed(0)
    ref = _lora(tiny_model, frozen_dtype="float32", lean_activations=False)
    torch.manual_seed(0)
    lean = _lora(tiny_model, frozen_dtype="float32", lean_activations=False)
    lean.model.load_state_dict(ref.model.state_dict())
    converted = cast_frozen_linear(lean.model, torch.bfloat16)
    assert converted == 2 * 7  # q, k, v, o, gate, up, down base weights of 2 layers; the tied head is skipped
    dtypes = {n: p.dtype for n, p in lean.model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "embed" in n or "norm" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer" in n)
    (l1, g1), (l2, g2) = _logits_and_grads(ref, batch), _logits_and_grads(lean, batch)
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)


def _saved_bytes(module, batch):
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(**AUTOCAST):
        module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sum(storages.values())


def test_lean_activations_give_identical_results_and_keep_less(tiny_model, tiny_data, cache_dir):
    batch = PadCollator(0)(_examples(tiny_model, tiny_data, cache_dir))
    torch.manual_seed(0)
    ref = _lora(tiny_model, lean_activations=False)
    lean = _lora(tiny_model, lean_activations=False)
    lean.model.load_state_dict(ref.model.state_dict())
    linears = sum(type(m) is torch.nn.Linear for m in lean.model.modules())  # bases, LoRA A and B, the head
    assert lean_activations(lean.model) == 2 + 2 * 7 + linears  # + 1 MLP and 7 LoRA layers per block
    (l1, g1), (l2, g2) = _logits_and_grads(ref, batch), _logits_and_grads(lean, batch)
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert _saved_bytes(lean, batch) < 0.9 * _saved_bytes(ref, batch)
    # outside autocast the hooks are inert: fp32 in, fp32 out
    with torch.no_grad():
        out = lean.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.dtype == torch.float32


def _fp32_logits_and_grads(module, batch):
    module.model.zero_grad()
    out = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out.pow(2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in module.model.named_parameters() if p.grad is not None}


def test_fused_lora_matches_peft_outside_autocast_and_steps_aside_otherwise(tiny_model, tiny_data, cache_dir,
                                                                          monkeypatch):
    import ftframe.efficiency as eff

    calls = []
    apply = eff._FusedLoRALinear.apply
    monkeypatch.setattr(eff._FusedLoRALinear, "apply", lambda *a: calls.append(1) or apply(*a))
    batch = PadCollator(0)(_examples(tiny_model, tiny_data, cache_dir))
    torch.manual_seed(0)
    ref = _lora(tiny_model, lean_activations=False)
    for name, p in ref.model.named_parameters():
        if "lora_A" in name:
            with torch.no_grad():
                p.mul_(3.0)  # larger adapters: a wrong scaling or a missing term would show
    lean = _lora(tiny_model, lean_activations=False)
    lean.model.load_state_dict(ref.model.state_dict())
    lean_activations(lean.model)
    (l1, g1), (l2, g2) = _fp32_logits_and_grads(ref, batch), _fp32_logits_and_grads(lean, batch)
    assert len(calls) == 2 * 7  # every LoRA layer of both blocks took the fused path
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and any("lora_A" in k for k in g1) and any("lora_B" in k for k in g1)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7)
    # under autocast, with dropout while training, or with the adapter disabled: peft's own path
    calls.clear()
    with torch.autocast(**AUTOCAST):
        lean.model(input_ids=batch["input_ids"])
    dropped = LoRA(model_name=tiny_model, r=4, dropout=0.5)
    dropped.configure_model()
    dropped.model.train()(input_ids=batch["input_ids"])
    with lean.model.disable_adapter(), torch.no_grad():
        plain = lean.model(input_ids=batch["input_ids"]).logits
    assert calls == []
    with torch.no_grad():
        base = _model(tiny_model, varlen=False)(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(plain, base)


def test_fused_adamw_takes_the_same_step(tiny_model, tiny_data, cache_dir, tmp_path):
    params = {}
    for fused in (False, True):
        module = LoRA(model_name=tiny_model, r=4, dropout=0.0, optimizer=OptimizerSettings(fused=fused, learning_rate=1e-2))
        data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, cache_dir=cache_dir, val_size=0,
                                     batch_size=4)
        torch.manual_seed(0)
        tiny_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)
        params[fused] = {k: v.clone() for k, v in module.trainable_state_dict().items()}
    assert params[True].keys() == params[False].keys()
    for k in params[True]:
        torch.testing.assert_close(params[True][k], params[False][k], rtol=1e-5, atol=1e-6)


def test_every_lever_is_a_typed_cli_option(tiny_model, tiny_data, tmp_path):
    from ftframe.cli import main

    main(["fit", f"--model.model_name={tiny_model}", "--model.r=4", f"--data.train_files={tiny_data}",
               f"--data.cache_dir={tmp_path / 'c'}", "--data.val_size=4", "--trainer.accelerator=cpu",
               "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
               "--trainer.precision=bf16-mixed", f"--adapter.dirpath={tmp_path / 'a'}",
               "--data.packing=false", "--data.group_by_length=true", "--model.frozen_dtype=bfloat16",
               "--model.lean_activations=false", "--model.optimizer.fused=false", "--model.compile=false",
               "--model.task=ftframe.tasks.CausalLM", "--model.task.loss_chunk_size=8"])
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["fit", f"--model.model_name={tiny_model}", "--model.frozen_dtype=int8"])


def test_weights_left_in_fp32_stop_pinning_the_checkpoint_file(tiny_model):
    from ftframe.efficiency import _mapped_checkpoint_ranges, own_mapped_weights

    def mapped(model):
        ranges = _mapped_checkpoint_ranges()
        return [n for n, p in model.named_parameters()
                if any(a <= p.untyped_storage().data_ptr() < b for a, b in ranges)]

    module = LoRA(model_name=tiny_model, r=4, frozen_dtype="float32")  # nothing converted: weights may stay mapped
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    assert mapped(module.model), "transformers no longer maps checkpoints; this lever is moot"
    assert own_mapped_weights(module.model) > 0
    assert not mapped(module.model)
    assert all(torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    converted = LoRA(model_name=tiny_model, r=4, frozen_dtype="bfloat16")
    converted.configure_model()
    assert not mapped(converted.model)


def test_neftune_noise_is_scaled_per_example_in_training_and_off_in_eval(tiny_model, tiny_data, cache_dir):
    from ftframe.packing import packed_forward

    module = LoRA(model_name=tiny_model, r=4, neftune_alpha=5.0)
    module.configure_model()
    emb = module.model.get_input_embeddings()
    examples = _examples(tiny_model, tiny_data, cache_dir, n=3)
    batch = PackCollator()(examples)
    clean = emb.weight[batch["input_ids"]].detach()
    emb.train()
    with packed_forward(batch["cu_seq_lens"]):
        noisy = emb(batch["input_ids"]).detach()
    noise = (noisy - clean)[0]
    d = clean.shape[-1]
    edges = batch["cu_seq_lens"].tolist()
    for s, e in zip(edges[:-1], edges[1:], strict=True):
        bound = 5.0 / (((e - s) * d) ** 0.5)
        assert noise[s:e].abs().max() <= bound * (1 + 1e-5)
        assert noise[s:e].abs().max() > 0.5 * bound  # uniform noise fills its range
    emb.eval()
    assert torch.equal(emb(batch["input_ids"]), clean)
    with pytest.raises(Exception, match="neftune_alpha must be > 0"):
        LoRA(model_name=tiny_model, neftune_alpha=0.0)
