"""The Preference task (DPO family): losses against TRL's, the reference without a second model, the data module."""

from __future__ import annotations

import gc
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedModel

from ftframe.data import PreferenceDataModule
from ftframe.errors import UserError
from ftframe.methods import FullFineTune, LoRA
from ftframe.optim import OptimizerSettings
from ftframe.tasks import CausalLM, Preference
from tests.helpers import tiny_trainer, write_jsonl

#: ftframe's loss name -> (TRL trainer, TRL loss type, Preference options)
TRL_LOSSES = {
    "dpo": ("dpo", "sigmoid", {"beta": 0.1}),
    "ipo": ("dpo", "ipo", {"beta": 0.1}),
    "hinge": ("dpo", "hinge", {"beta": 0.5}),
    "robust": ("dpo", "robust", {"beta": 0.2, "label_smoothing": 0.1}),
    "simpo": ("cpo", "simpo", {"beta": 2.0, "simpo_gamma": 0.6, "label_smoothing": 0.1, "sft_weight": 0.5}),
    "orpo": ("orpo", None, {"beta": 0.25}),
}


def _pairs(tiny_model, pair_data, cache_dir, **kwargs):
    data = PreferenceDataModule(train_files=pair_data, tokenizer=tiny_model, val_size=8, batch_size=4,
                                cache_dir=cache_dir, **kwargs)
    data.setup("fit")
    return data


def _lora(tiny_model, task, **kwargs):
    module = LoRA(model_name=tiny_model, task=task, dropout=0.0, **kwargs)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that already changed the model: policy and reference differ
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module


def _naive_token_logps(model, batch):
    """Per-token log-probabilities (2B, T-1), zero off the responses: each row run alone, unpadded, full logits."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    rows = []
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        logits = model(input_ids=ids[r: r + 1, :n]).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[r, 1:n, None]).squeeze(-1)
        keep = (labels[r, 1:n] != -100).float()
        rows.append(torch.cat([lp * keep, lp.new_zeros(ids.shape[1] - n)]))
    out = torch.stack(rows)
    return out


def _trl_loss(kind, module, batch, options):
    """The loss TRL 1.16 computes from the same log-probabilities (its own loss code, fed by a plain forward)."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer, loss_type, _ = TRL_LOSSES[kind]
    model = module.model
    b = batch["input_ids"].shape[0] // 2
    completion = (batch["labels"] != -100).long()
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    per_token = _naive_token_logps(model, batch)
    if trainer == "dpo":
        with torch.no_grad(), model.disable_adapter():
            ref = _naive_token_logps(model, batch).sum(1)
        shape = per_token.shape
        outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                                  is_top1=torch.zeros(shape, dtype=torch.bool))
        fake = SimpleNamespace(
            model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
            loss_types=[loss_type], loss_weights=[1.0], beta=options["beta"],
            label_smoothing=options.get("label_smoothing", 0.0), use_weighting=False,
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": completion, "ref_chosen_logps": ref[:b], "ref_rejected_logps": ref[b:]}
        return DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, return_outputs=False)
    counts = completion[:, 1:].sum(1)
    sums = per_token.sum(1)
    average = sums / counts
    nll = -sums[:b].sum() / counts[:b].sum()  # TRL: cross-entropy over every chosen token of the batch
    if trainer == "cpo":
        fake = SimpleNamespace(alpha=0.0, accelerator=accelerator, loss_type="simpo", beta=options["beta"],
                               simpo_gamma=options["simpo_gamma"], label_smoothing=options["label_smoothing"])
        losses, _, _ = CPOTrainer.cpo_loss(fake, average[:b], average[b:])
        return losses.mean() + options["sft_weight"] * nll  # CPOTrainer.get_batch_loss_metrics, cpo_alpha = sft_weight
    fake = SimpleNamespace(accelerator=accelerator, beta=options["beta"])
    losses = ORPOTrainer.odds_ratio_loss(fake, average[:b], average[b:])[0]
    return nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics


@pytest.mark.parametrize("kind", list(TRL_LOSSES))
def test_loss_and_gradients_equal_trls(kind, tiny_model, pair_data, cache_dir):
    options = TRL_LOSSES[kind][2]
    task = Preference(loss=kind, **options)
    module = _lora(tiny_model, task)
    batch = next(iter(_pairs(tiny_model, pair_data, cache_dir).val_dataloader()))
    assert batch["input_ids"].shape[0] == 8  # 4 pairs: chosen rows, then rejected rows
    lengths = (batch["labels"][:, 1:] != -100).sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs responses of different lengths"
    params = {n: p for n, p in module.model.named_parameters() if p.requires_grad}

    def grads(loss):
        module.model.zero_grad()
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in params.items()}

    ours = task.compute(module.model, batch)[0]
    ours_grad = grads(ours)
    theirs = _trl_loss(kind, module, batch, options)
    theirs_grad = grads(theirs)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
    for name in params:
        diff = (ours_grad[name] - theirs_grad[name]).norm() / theirs_grad[name].norm().clamp(min=1e-12)
        assert diff < 1e-5, f"{kind}: gradient of {name} differs by {float(diff):.2e} (relative)"
    assert any(g.abs().sum() > 0 for g in ours_grad.values())


def test_no_second_model_for_adapter_methods(tiny_model, pair_data, tiny_data, cache_dir, tmp_path):
    """The reference is the same model with its adapters off (or a frozen starting adapter): no model copy."""
    from ftframe.data import InstructionDataModule

    def build(task, **kwargs):
        gc.collect()
        before = {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}
        module = LoRA(model_name=tiny_model, task=task, **kwargs)
        trainer = tiny_trainer(tmp_path, max_steps=1)
        data = (_pairs(tiny_model, pair_data, cache_dir) if isinstance(task, Preference) else
                InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=8, cache_dir=cache_dir))
        trainer.fit(module, datamodule=data)
        gc.collect()
        live = {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel) and id(o) not in before}
        inside = {id(m) for m in module.modules() if isinstance(m, PreTrainedModel)}
        assert live == inside, "a transformers model outside the trained one was built"
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for p in [*module.parameters(), *module.buffers()]}
        return module, len(inside), sum(p.numel() for p in module.parameters()), sum(storages.values())

    sft, sft_models, sft_params, sft_bytes = build(CausalLM())
    del sft
    dpo, dpo_models, dpo_params, dpo_bytes = build(Preference())
    assert dpo.task.reference_source().startswith("the base with the adapters switched off")
    assert (dpo_models, dpo_params, dpo_bytes) == (sft_models, sft_params, sft_bytes)
    assert dpo_models == 2  # LlamaForCausalLM and the LlamaModel inside it
    adapter = tmp_path / "start"
    dpo.save_trained(adapter)
    adapter_params = sum(p.numel() for p in dpo.parameters() if p.requires_grad)
    del dpo
    warm, warm_models, warm_params, _ = build(Preference(), init_adapter=str(adapter))
    assert "starting adapter" in warm.task.reference_source()
    assert warm_models == 2
    assert warm_params == sft_params + adapter_params  # one frozen adapter copy, not a model


def test_starting_adapter_is_the_reference_and_is_saved_alone(tiny_model, pair_data, cache_dir, tmp_path):
    data = _pairs(tiny_model, pair_data, cache_dir)
    first = LoRA(model_name=tiny_model, task=Preference(), optimizer=OptimizerSettings(learning_rate=1e-2))
    tiny_trainer(tmp_path, max_steps=3).fit(first, datamodule=data)
    start = tmp_path / "sft"
    first.save_trained(start)
    module = LoRA(model_name=tiny_model, task=Preference(), init_adapter=str(start), dropout=0.0,
                  optimizer=OptimizerSettings(learning_rate=1e-2))
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=None, num_sanity_val_steps=0)
    module.configure_model()
    batch = next(iter(data.val_dataloader()))
    # before training, policy == starting adapter == reference: every reward is exactly 0 (the base would differ)
    from ftframe.tasks.preference import sequence_logps

    _, _, stats = module.task.compute(module.model, batch)
    assert torch.equal(stats[:, 0], torch.zeros(4)) and torch.equal(stats[:, 1], torch.zeros(4))
    with torch.no_grad():
        mine = sequence_logps(module.model.eval(), batch)[0]
        with module.disable_adapters():
            base = sequence_logps(module.model, batch)[0]
    module.model.train()
    assert not torch.allclose(mine, base)  # the base is not where this run starts
    trainer.fit(module, datamodule=data)
    frozen = {n: p for n, p in module.model.named_parameters() if ".reference." in n}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    from safetensors.torch import load_file

    loaded = load_file(str(start / "adapter_model.safetensors"))
    for name, p in frozen.items():  # the reference never moved
        assert torch.equal(p.detach(), loaded[name.replace(".reference.", ".")])
    out = tmp_path / "dpo"
    module.save_trained(out)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert not (out / "reference").exists() and not any("reference" in k for k in saved)
    assert set(saved) == set(loaded)
    assert any(not torch.equal(saved[k], loaded[k]) for k in saved)  # what was trained is the default adapter


def test_init_adapter_with_other_settings_is_refused(tiny_model, pair_data, cache_dir, tmp_path):
    first = LoRA(model_name=tiny_model, r=4)
    first.configure_model()
    first.save_trained(tmp_path / "r4")
    module = LoRA(model_name=tiny_model, r=8, task=Preference(), init_adapter=str(tmp_path / "r4"))
    with pytest.raises(UserError, match=r"r: 4 there, 8 here"):
        module.configure_model()
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        LoRA(model_name=tiny_model, init_adapter=str(tmp_path)).configure_model()


def test_full_fine_tuning_precomputes_the_reference_once_and_resumes_with_it(tiny_model, pair_data, cache_dir,
                                                                           tmp_path):
    from ftframe.callbacks import AdapterCheckpoint

    data = _pairs(tiny_model, pair_data, cache_dir)
    module = FullFineTune(model_name=tiny_model, task=Preference(), optimizer=OptimizerSettings(learning_rate=1e-3))
    module.configure_model()
    assert module.reference_context() is None
    ckpt = AdapterCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, monitor=None)
    trainer = tiny_trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt])
    # the reference log-probabilities equal the untrained model's on every pair
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        from ftframe.tasks.preference import sequence_logps

        start, _ = sequence_logps(module.model.eval(), batch)
    module.model.train()
    trainer.fit(module, datamodule=data)
    table = module.task.state_dict()["reference_logps"]
    assert table.shape == (48, 2) and not torch.isnan(table).any()
    ids = batch["pair_id"]
    torch.testing.assert_close(table[ids], torch.stack([start[:4], start[4:]], 1), rtol=1e-5, atol=1e-5)
    saved = torch.load(sorted((tmp_path / "ckpt").rglob("*.ckpt"))[-1], weights_only=True)
    assert torch.equal(saved["ftframe_task"]["reference_logps"], table)
    # a resumed run restores the table instead of recomputing it from the trained weights
    resumed = FullFineTune(model_name=tiny_model, task=Preference(), optimizer=OptimizerSettings(learning_rate=1e-3))
    calls = []
    original = resumed.task._precompute
    resumed.task._precompute = lambda m: calls.append(1) or original(m)
    path = sorted((tmp_path / "ckpt").rglob("*.ckpt"))[-1]
    tiny_trainer(tmp_path, max_steps=3).fit(resumed, datamodule=_pairs(tiny_model, pair_data, cache_dir),
                                            ckpt_path=str(path))
    assert not calls
    assert torch.equal(resumed.task._table, table)


def test_metrics_are_logged_every_step_and_at_validation(tiny_model, pair_data, cache_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = LoRA(model_name=tiny_model, task=Preference(beta=0.5), optimizer=OptimizerSettings(learning_rate=2e-2))
    trainer = tiny_trainer(tmp_path, max_steps=10, limit_val_batches=None, val_check_interval=5,
                           logger=CSVLogger(str(tmp_path), name="log"), log_every_n_steps=1)
    trainer.fit(module, datamodule=_pairs(tiny_model, pair_data, cache_dir))
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "log").rglob("metrics.csv")))))
    names = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
             "logps/rejected"]
    train = [r for r in rows if r.get("train/rewards/margins")]
    val = [r for r in rows if r.get("val/rewards/margins")]
    assert len(train) == 10 and len(val) == 2
    for r in train + val:
        stage = "train" if r in train else "val"
        values = {n: float(r[f"{stage}/{n}"]) for n in names}
        assert abs(values["rewards/margins"] - (values["rewards/chosen"] - values["rewards/rejected"])) < 1e-5
        assert 0.0 <= values["rewards/accuracy"] <= 1.0
    # the model learns the preference: validation margin and accuracy grow
    assert float(val[-1]["val/rewards/margins"]) > float(val[0]["val/rewards/margins"]) > 0
    assert float(val[-1]["val/rewards/accuracy"]) >= 0.75


def test_pair_records_errors_name_file_line_and_field(tiny_model, cache_dir, tmp_path):
    good = {"prompt": "What is one plus one?", "chosen": "2", "rejected": "3"}
    cases = [
        ({"prompt": "x", "chosen": "2"}, r"bad\.jsonl:2: field 'rejected' is missing"),
        ({"prompt": "x", "chosen": 2, "rejected": "3"}, r"bad\.jsonl:2: field 'chosen' must be a string or a non-empty"),
        ({"prompt": "x", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"},
         r"bad\.jsonl:2: field 'chosen\[0\]\.role' is 'user'; use one of \['assistant'\]"),
        ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "2",
          "rejected": "3"}, r"bad\.jsonl:2: field 'prompt' ends with an assistant message"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record, good])
        with pytest.raises(UserError, match=message):
            PreferenceDataModule(train_files=path, tokenizer=tiny_model, val_size=1, cache_dir=cache_dir).setup()
    same = write_jsonl(tmp_path / "same.jsonl", [good, {**good, "rejected": "2"}, good, good])
    data = PreferenceDataModule(train_files=same, tokenizer=tiny_model, val_size=1, cache_dir=cache_dir)
    data.setup()
    assert data.stats["train"]["identical"] + data.stats["val"]["identical"] == 1
    with pytest.raises(UserError, match=r"strict: 1 .* \(chosen == rejected\)"):
        PreferenceDataModule(train_files=same, tokenizer=tiny_model, val_size=1, cache_dir=cache_dir,
                             strict=True).setup()


def test_pair_batches_hold_chosen_then_rejected_with_responses_supervised(tiny_model, pair_data, cache_dir):
    data = _pairs(tiny_model, pair_data, cache_dir)
    tok = data._get_tokenizer()
    records = [json.loads(line) for line in open(pair_data)]
    batch = next(iter(data.val_dataloader()))
    b = len(batch["pair_id"])
    ids = set()
    for i in range(b):
        chosen = batch["labels"][i][batch["labels"][i] != -100]
        rejected = batch["labels"][b + i][batch["labels"][b + i] != -100]
        text_c = tok.decode(chosen, skip_special_tokens=True).strip()
        text_r = tok.decode(rejected, skip_special_tokens=True).strip()
        pair = [r for r in records if (r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][0]["content"])
                == text_c]
        assert pair, text_c
        wanted = pair[0]["rejected"] if isinstance(pair[0]["rejected"], str) else pair[0]["rejected"][0]["content"]
        assert text_r == wanted
        # the prompt (everything before the first supervised token) is the same in both rows
        first_c = int((batch["labels"][i] != -100).nonzero()[0])
        first_r = int((batch["labels"][b + i] != -100).nonzero()[0])
        assert first_c == first_r and torch.equal(batch["input_ids"][i, :first_c], batch["input_ids"][b + i, :first_r])
        ids.add(int(batch["pair_id"][i]))
    train_ids = {int(i) for batch in data.reference_dataloaders()[0][0] for i in batch["pair_id"]}
    assert ids.isdisjoint(train_ids) and len(train_ids) == 40 and min(ids) == 40


def test_preference_refuses_other_data_and_loss_options(tiny_model, tiny_data, cache_dir, tmp_path):
    from ftframe.data import InstructionDataModule

    module = LoRA(model_name=tiny_model, task=Preference())
    data = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=8, cache_dir=cache_dir)
    with pytest.raises(UserError, match="needs chosen / rejected pairs.*PreferenceDataModule"):
        tiny_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    with pytest.raises(UserError, match="label_smoothing applies to the robust and simpo losses"):
        Preference(loss="dpo", label_smoothing=0.1)
    with pytest.raises(UserError, match="loss must be one of"):
        Preference(loss="kto")
    with pytest.raises(UserError, match="sft_weight applies to the simpo loss"):
        Preference(loss="orpo", sft_weight=1.0)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["LoRA", "FullFineTune"])
def test_two_processes_train_like_one_with_the_same_global_batch(method, tiny_model, pair_data, tmp_path):
    """DDP (2 CPU processes x 2 pairs) and accumulation (2 x 2 pairs) give the weights of 1 process x 4 pairs."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    results = {}
    for label, devices, batch, accumulate in (("1x4", 1, 4, 1), ("2x2", 2, 2, 1), ("1x2x2", 1, 2, 2)):
        out = tmp_path / label
        proc = subprocess.run([sys.executable, str(root / "tests" / "preference_job.py"), str(out), tiny_model,
                               pair_data, str(devices), str(batch), str(accumulate), "3", method],
                              cwd=root, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[label] = (load_file(str(out / "trained.safetensors")), json.loads((out / "metrics.json").read_text()))
    reference, ref_metrics = results["1x4"]
    for label in ("2x2", "1x2x2"):
        weights, metrics = results[label]
        assert set(weights) == set(reference)
        for name, value in reference.items():
            diff = (weights[name] - value).norm() / value.norm().clamp(min=1e-12)
            assert diff < 1e-5, f"{label}: {name} differs by {float(diff):.2e} (relative)"
        for name in ("val/loss", "val/rewards/margins", "val/rewards/accuracy"):
            assert abs(metrics[name] - ref_metrics[name]) <= 1e-5 * max(1.0, abs(ref_metrics[name])), name
    assert ref_metrics["val/rewards/margins"] != 0.0


def test_pick_pairs_rejects_wrong_final_numbers_and_prefers_a_sampled_correct_answer():
    import random

    from ftframe.evaluation.generation import GSM8K_ANSWER
    from ftframe.tools.make_preferences import pick_pairs

    answers = ["2 + 3 = 5\n#### 5", "2 + 3 = 7\n#### 7", "so it is 5", "no idea", "2 + 3 = 7\n#### 7 ", ""]
    pairs = pick_pairs(answers, "2 + 3 = <<2+3=5>>5\n#### 5", "5", "sampled", 3, random.Random(0), GSM8K_ANSWER)
    assert sorted(p["rejected"] for p in pairs) == ["2 + 3 = 7\n#### 7", "no idea"]  # distinct; the right number
    assert all(p["chosen"] == "2 + 3 = 5\n#### 5" and p["chosen_source"] == "sampled" for p in pairs)  # out of format
    assert {p["rejected_answer"] for p in pairs} == {"7", None}  # is neither chosen nor rejected
    gold = pick_pairs(answers, "ref #### 5", "5", "reference", 1, random.Random(0), GSM8K_ANSWER)
    assert len(gold) == 1 and gold[0]["chosen"] == "ref #### 5" and gold[0]["chosen_source"] == "reference"
    assert pick_pairs(["#### 5", "5 #### 5"], "ref #### 5", "5", "sampled", 2, random.Random(0), GSM8K_ANSWER) == []


def test_make_preferences_writes_pairs_that_train_through_the_cli(tiny_model, tiny_data, tmp_path):
    from ftframe.cli import main
    from ftframe.data.instruction import split_indices

    out = tmp_path / "pairs.jsonl"
    main(["make-preferences", f"--model={tiny_model}", f"--data={tiny_data}", "--val_size=8", "--limit=12",
          "--samples=3", "--max_new_tokens=12", f"--output={out}", "--seed=3"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    recorded = json.loads((tmp_path / "pairs.jsonl.meta.json").read_text())
    assert recorded["samples"] == 3 and recorded["temperature"] == 0.8 and recorded["seed"] == 3
    assert recorded["counts"]["questions"] == 12 and recorded["counts"]["pairs"] == len(lines) > 0
    assert recorded["counts"]["samples"] == 36
    records = [json.loads(line) for line in open(tiny_data)]
    train, val = split_indices(len(records), 8, 42)
    held_out = {records[i]["id"] for i in val}
    assert not held_out & {p["id"].rsplit("-", 1)[0] for p in lines}  # only training questions
    for p in lines:  # a random tiny model is never right: the reference solution is chosen, its own answer rejected
        assert p["chosen_source"] == "reference" and p["chosen"].endswith(f"#### {p['gold']}")
        assert p["rejected_answer"] != p["gold"]
    run = tmp_path / "run"
    main(["fit", f"--model.model_name={tiny_model}", "--model.task=ftframe.tasks.Preference",
          "--model.task.loss=ipo", "--data=ftframe.data.PreferenceDataModule", f"--data.train_files={out}",
          "--data.val_size=2", "--data.batch_size=2", f"--data.cache_dir={tmp_path / 'c'}", "--trainer.max_steps=2",
          "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
          f"--trainer.default_root_dir={run}", f"--adapter.dirpath={run / 'adapter'}"])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
