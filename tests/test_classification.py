"""Sequence classification: every method with a head, pooling, metrics, labels linked by the CLI, error analysis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from transformers import AutoModelForSequenceClassification

from ftframe.cli import FTFrameCLI, main
from ftframe.data import ClassificationDataModule
from ftframe.errors import UserError
from ftframe.methods import (
    IA3,
    BottleneckAdapters,
    DoRA,
    FullFineTune,
    LastLayers,
    LoRA,
    PrefixTuning,
    PromptTuning,
    PTuning,
    QLoRA,
)
from ftframe.models import load_model
from ftframe.optim import OptimizerSettings
from ftframe.tasks import SequenceClassification
from tests.helpers import (
    CLASSIFICATION_WORDS,
    classification_cli_args,
    logits_one_by_one,
    padded_batch,
    tiny_trainer,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A tiny random BERT with a WordPiece tokenizer ([CLS] first, right padding)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("enc") / "tiny-bert"
    folder.mkdir(parents=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate([*special, *CLASSIFICATION_WORDS])})
    assert tok.unk_token_id not in tok("the film was great")["input_ids"]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _data(model: str, path: str, **kw) -> ClassificationDataModule:
    return ClassificationDataModule(train_files=path, tokenizer=model, batch_size=8, val_size=12, test_size=12, **kw)


def _reload_peft(folder, model, n):
    from peft import PeftModel

    base = load_model(model, AutoModelForSequenceClassification, num_labels=n)
    base.config.pad_token_id = base.config.eos_token_id  # the tiny tokenizer has no pad token (ftframe uses EOS)
    return PeftModel.from_pretrained(base, folder)


def _reload_full(folder, model, n):
    return AutoModelForSequenceClassification.from_pretrained(folder)


def _reload_bottleneck(folder, model, n):
    from ftframe.methods.bottleneck import load_bottleneck_adapters

    return load_bottleneck_adapters(folder, load_model(model, AutoModelForSequenceClassification, num_labels=n))


def _reload_qlora(folder, model, n):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    from ftframe.methods.qlora import keep_trainable_layout

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                               bnb_4bit_compute_dtype=torch.float32)
    base = load_model(model, AutoModelForSequenceClassification, quantization_config=quant, device_map={"": "cpu"},
                      num_labels=n)
    reloaded = PeftModel.from_pretrained(base, folder)
    keep_trainable_layout(reloaded)
    return reloaded


def _logits_before_and_after_reload(module, reload, model, data, tmp_path):
    """Save ``module``, reload it with ``reload``; (its logits, the reloaded model's, the batch) on a validation batch."""
    module.save_trained(tmp_path / "artifact")
    reloaded = reload(str(tmp_path / "artifact"), model, len(module.task.labels)).eval()
    module.model.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        return module.task.logits(module.model, batch), module.task.logits(reloaded, batch), batch


METHODS = {
    "FullFineTune": (FullFineTune, {}, _reload_full),
    "LoRA": (LoRA, {"r": 4, "dropout": 0.0}, _reload_peft),
    "DoRA": (DoRA, {"r": 4, "dropout": 0.0}, _reload_peft),
    "IA3": (IA3, {}, _reload_peft),
    "QLoRA": (QLoRA, {"r": 4, "dropout": 0.0, "compute_dtype": "float32", "double_quant": False}, _reload_qlora),
    "LastLayers": (LastLayers, {"num_layers": 1}, _reload_full),
    "LinearProbe": (LastLayers, {"num_layers": 0}, _reload_full),
    "PromptTuning": (PromptTuning, {"num_virtual_tokens": 4}, _reload_peft),
    "PTuning": (PTuning, {"num_virtual_tokens": 4, "encoder_hidden": 16}, _reload_peft),
    "BottleneckAdapters": (BottleneckAdapters, {"size": 8}, _reload_bottleneck),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_the_head_and_its_artifact_reproduces_logits(name, tiny_model, cls_data, tmp_path):
    cls, kwargs, reload = METHODS[name]
    data = _data(tiny_model, cls_data)
    seed_everything(0)
    module = cls(model_name=tiny_model, task=SequenceClassification(), optimizer=OptimizerSettings(learning_rate=1e-2), **kwargs)
    trainer = tiny_trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=data)
    head = module.task.head(module.model)
    # the fresh head trains (under peft: its modules_to_save copy; the original stays frozen)
    trained = sum(p.numel() for p in head.parameters() if p.requires_grad)
    assert trained >= 3 * module.model.config.hidden_size, "the fresh head must train"
    expected, got, batch = _logits_before_and_after_reload(module, reload, tiny_model, data, tmp_path)
    assert expected.shape == (len(batch["labels"]), 3)
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()


def test_lora_learns_the_cue_word_and_logs_every_metric(tiny_model, cls_data, tmp_path):
    data = _data(tiny_model, cls_data)
    seed_everything(0)
    module = LoRA(model_name=tiny_model, task=SequenceClassification(), optimizer=OptimizerSettings(learning_rate=5e-3), r=8, dropout=0.0)
    trainer = tiny_trainer(tmp_path, max_steps=60, limit_val_batches=None, val_check_interval=None,
                           check_val_every_n_epoch=3)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert float(metrics["val/accuracy"]) >= 0.9, dict(metrics)
    for key in ("val/f1_macro", "val/ece", *(f"val/{m}/{c}" for m in ("precision", "recall")
                                            for c in ("mid", "neg", "pos"))):
        assert key in metrics, key
    confusion = module.computed_metrics["val"]["confusion"]
    assert confusion.shape == (3, 3) and int(confusion.sum()) == 12  # rows: gold, every validation example once
    # the logged values agree with the predictions themselves
    results = trainer.test(module, datamodule=data, verbose=False)[0]
    preds, gold = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            preds += module.task.logits(module.model, batch).argmax(-1).tolist()
            gold += batch["labels"].tolist()
    accuracy = sum(p == g for p, g in zip(preds, gold, strict=True)) / len(gold)
    assert results["test/accuracy"] == pytest.approx(accuracy)
    recall_mid = sum(p == g == 0 for p, g in zip(preds, gold, strict=True)) / gold.count(0)
    assert results["test/recall/mid"] == pytest.approx(recall_mid)


def test_decoder_pools_the_last_real_token_whatever_the_padding(tiny_model):
    module = LoRA(model_name=tiny_model, task=SequenceClassification(labels=["a", "b"]), r=4)
    module.configure_model()
    module.model.eval()
    tok = module.tokenizer
    texts = ["one two three", "four", "five plus six is eleven"]
    ids = [tok(t)["input_ids"] for t in texts]
    ids[1] = ids[1] + [tok.pad_token_id]  # a text that itself ends with the pad token's id
    longest = max(map(len, ids)) + 2
    alone = logits_one_by_one(module, ids)
    with torch.no_grad():
        right = module.task.logits(module.model, padded_batch(ids, tok.pad_token_id, longest, "right"))
        left = module.task.logits(module.model, padded_batch(ids, tok.pad_token_id, longest, "left"))
        # what pooling the last position of a padded row would read instead: different logits
        last_pad = module.task.logits(module.model, {"input_ids": torch.tensor([ids[0] + [tok.pad_token_id] * 2]),
                                                     "attention_mask": torch.ones(1, len(ids[0]) + 2, dtype=torch.long)})
    assert not torch.allclose(last_pad[0], alone[0], atol=1e-3)  # so padding could show in the checks below
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)  # RoPE: shifted positions leave attention unchanged


def test_prompt_tuning_reads_the_last_real_token_of_right_padded_rows(tiny_model):
    module = PromptTuning(model_name=tiny_model, task=SequenceClassification(labels=["a", "b"]), num_virtual_tokens=3)
    module.configure_model()
    module.model.eval()
    ids = module.tokenizer("one two three four")["input_ids"]
    alone = logits_one_by_one(module, [ids])
    with torch.no_grad():
        padded = module.task.logits(module.model, padded_batch([ids], module.tokenizer.pad_token_id, len(ids) + 3))
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("name", ["LoRA", "FullFineTune", "PromptTuning"])
def test_encoder_classifier_trains_and_reloads(name, tiny_encoder, cls_data, tmp_path):
    cls, kwargs, reload = METHODS[name]
    data = _data(tiny_encoder, cls_data)
    seed_everything(0)
    lr = 3e-2 if name == "PromptTuning" else 5e-3
    module = cls(model_name=tiny_encoder, task=SequenceClassification(), optimizer=OptimizerSettings(learning_rate=lr), **kwargs)
    trainer = tiny_trainer(tmp_path, max_steps=30, limit_val_batches=None)
    trainer.fit(module, datamodule=data)
    if name != "PromptTuning":  # (virtual tokens learn too slowly on a random tiny encoder to check this)
        assert float(trainer.callback_metrics["val/loss"]) < 1.0986  # better than chance (ln 3)
    expected, got, _ = _logits_before_and_after_reload(module, reload, tiny_encoder, data, tmp_path)
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()


def test_prefix_tuning_is_refused_for_classification_with_the_alternatives(tiny_model):
    module = PrefixTuning(model_name=tiny_model, task=SequenceClassification(labels=["a", "b"]))
    with pytest.raises(UserError, match="PTuning or PromptTuning"):
        module.configure_model()


def test_balanced_class_weights_come_from_the_training_labels(tiny_model, tmp_path):
    records = [{"text": "great film", "label": "pos"}] * 30 + [{"text": "awful film", "label": "neg"}] * 10
    path = write_jsonl(tmp_path / "imb.jsonl", records)
    data = ClassificationDataModule(train_files=path, tokenizer=tiny_model, val_size=4, test_size=0)
    data.setup("fit")
    task = SequenceClassification(class_weights="balanced")
    task.bind(data)
    assert task.labels == ["neg", "pos"]
    n_neg, n_pos = data.datasets["train"].labels.count(0), data.datasets["train"].labels.count(1)
    expected = torch.tensor([(n_neg + n_pos) / (2 * n_neg), (n_neg + n_pos) / (2 * n_pos)])
    assert torch.allclose(task._weights, expected)
    with pytest.raises(UserError, match="2 labels"):
        SequenceClassification(class_weights=[1.0, 2.0, 3.0]).bind(data)


def test_task_labels_that_disagree_with_the_data_are_refused(tiny_model, cls_data):
    data = _data(tiny_model, cls_data)
    with pytest.raises(UserError, match=r"differ from the data's \['mid', 'neg', 'pos'\]"):
        SequenceClassification(labels=["neg", "pos"]).bind(data)
    with pytest.raises(UserError, match="no label names"):
        SequenceClassification().bind(None)


def test_cli_links_labels_from_the_data_and_test_writes_the_error_analysis(tiny_model, cls_data, tmp_path):
    run = tmp_path / "run"
    common = [*classification_cli_args(tiny_model, cls_data, run), "--model.init_args.r=4"]
    cli = FTFrameCLI(args=common, run=False)
    assert cli.model.task.labels == ["mid", "neg", "pos"]  # from the data, never typed
    ckpt = ["--trainer.callbacks+=AdapterCheckpoint", f"--trainer.callbacks.dirpath={run / 'ckpt'}",
            "--trainer.callbacks.every_n_train_steps=20"]
    main(["fit", *common, "--model.optimizer.learning_rate=0.005", "--trainer.max_steps=20", *ckpt,
          f"--adapter.dirpath={run / 'adapter'}"])
    meta = json.loads((run / "adapter" / "ftframe.json").read_text())
    assert meta["task"]["labels"] == ["mid", "neg", "pos"] and "val/accuracy" in meta["metrics"]
    saved = yaml.safe_load((run / "adapter" / "config.yaml").read_text())  # the linked labels are in the run config
    assert saved["model"]["init_args"]["task"]["init_args"]["labels"] == ["mid", "neg", "pos"]
    main(["test", *common, *ckpt, f"--ckpt_path={run / 'ckpt' / 'last'}"])
    out = run / "analysis" / "test"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 12
    assert set(records[0]) >= {"text", "gold", "predicted", "confidence", "probabilities", "where"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in records)
    assert all(r["where"].startswith(str(Path(cls_data))) for r in records)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 12)
    report = (out / "report.md").read_text()
    assert "Most confident mistakes" in report and "| gold \\ predicted | mid | neg | pos |" in report
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(["predict", *common, *ckpt, f"--ckpt_path={run / 'ckpt' / 'last'}"])
    predicted = [json.loads(line) for line in (run / "analysis" / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["where"], r["predicted"]) for r in predicted] == [(r["where"], r["predicted"]) for r in records]


def test_confident_mistakes_are_sorted_and_capped():
    from ftframe.evaluation.classification import classification_summary, confident_mistakes

    recs = [{"gold": "a", "predicted": "b", "correct": False, "confidence": c, "text": str(c)} for c in (.6, .9, .7)]
    recs += [{"gold": "b", "predicted": "b", "correct": True, "confidence": .8, "text": "ok"}]
    top = confident_mistakes(recs, per_class=2)
    assert [r["confidence"] for r in top["a"]] == [.9, .7] and "b" not in top
    summary = classification_summary(recs, ["a", "b"])
    assert summary["confusion"] == [[0, 3], [0, 1]] and summary["accuracy"] == 0.25
    assert summary["per_class"]["b"] == {"precision": 0.25, "recall": 1.0, "support": 1}
