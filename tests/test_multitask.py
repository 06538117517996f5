"""MultitaskDataModule: weighted mixing, one label space, per-data-set metrics, and the mixes that are refused."""

from __future__ import annotations

from collections import Counter

import pytest
from lightning.pytorch import Callback, seed_everything

from ftframe.data import ClassificationDataModule, InstructionDataModule, MultitaskDataModule
from ftframe.data.multitask import WeightedMixture
from ftframe.errors import UserError
from ftframe.methods import LoRA
from ftframe.optim import OptimizerSettings
from ftframe.tasks import SequenceClassification
from tests.helpers import tiny_trainer, write_jsonl


def test_mixture_draws_in_proportion_repeatably_and_restarts_short_loaders():
    loaders = {"a": [{"x": i} for i in range(3)], "b": [{"x": 100 + i} for i in range(50)]}
    mix = WeightedMixture(loaders, {"a": 3.0, "b": 1.0}, length=4000, seed=7)
    first = mix.choices(0)
    assert first == WeightedMixture(loaders, {"a": 3.0, "b": 1.0}, 4000, 7).choices(0)  # repeatable
    assert first != mix.choices(1)  # a new draw each epoch
    share = Counter(first)["a"] / len(first)
    assert 0.72 < share < 0.78
    batches = list(mix)
    assert len(batches) == len(mix) == 4000
    from_a = [b["x"] for b in batches if b["x"] < 100]
    assert from_a[:7] == [0, 1, 2, 0, 1, 2, 0]  # a 3-batch loader starts over when it runs out


def test_resume_skips_exactly_the_consumed_batches():
    loaders = {"a": [{"x": i} for i in range(5)], "b": [{"x": 100 + i} for i in range(5)]}
    whole = list(WeightedMixture(loaders, {"a": 1.0, "b": 1.0}, 12, 3))
    resumed = WeightedMixture(loaders, {"a": 1.0, "b": 1.0}, 12, 3)
    resumed.skip = 5
    assert list(resumed) == whole[5:]


def test_classification_members_share_one_label_space_and_report_per_data_set(tiny_model, tmp_path):
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"{w} film {i}", "label": lab} for i in range(40)
                                                       for w, lab in [("great", "fresh"), ("awful", "rotten")]])
    mails = write_jsonl(tmp_path / "mails.jsonl", [{"text": f"{w} offer {i}", "label": lab} for i in range(20)
                                                   for w, lab in [("hello", "ham"), ("cash", "spam")]])
    data = MultitaskDataModule(
        datasets={"reviews": ClassificationDataModule(train_files=reviews, val_size=10, test_size=0, batch_size=8),
                  "mail": ClassificationDataModule(train_files=mails, val_size=8, test_size=0, batch_size=8)},
        weights={"reviews": 1, "mail": 1}, tokenizer=tiny_model)
    assert data.label_names_from_data() == ["fresh", "rotten", "ham", "spam"]

    class Seen(Callback):
        counts: Counter = Counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            labels = set(batch["labels"].tolist())
            self.counts["reviews" if labels <= {0, 1} else "mail"] += 1
            assert labels <= {0, 1} or labels <= {2, 3}  # a batch comes from one data set

    seen = Seen()
    seed_everything(0)
    module = LoRA(model_name=tiny_model, task=SequenceClassification(), r=4, optimizer=OptimizerSettings(learning_rate=5e-3))
    trainer = tiny_trainer(tmp_path, max_steps=24, limit_val_batches=None, callbacks=[seen])
    trainer.fit(module, datamodule=data)
    assert module.task.labels == ["fresh", "rotten", "ham", "spam"] and module.model.config.num_labels == 4
    assert seen.counts["reviews"] > 4 and seen.counts["mail"] > 4
    m = trainer.callback_metrics
    for name in ("reviews", "mail"):
        for key in ("loss", "accuracy", "f1_macro"):
            assert f"val/{name}/{key}" in m, sorted(m)
    assert "val/loss" in m and "val/accuracy" in m
    # the overall accuracy is the member accuracies weighted by their validation sizes (10 and 8 examples)
    overall = (10 * float(m["val/reviews/accuracy"]) + 8 * float(m["val/mail/accuracy"])) / 18
    assert float(m["val/accuracy"]) == pytest.approx(overall, abs=1e-6)


def test_instruction_members_log_a_loss_each(tiny_model, tiny_data, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hello {i}"},
                                                               {"role": "assistant", "content": f"Hi there {i}"}]}
                                                 for i in range(30)])
    data = MultitaskDataModule(
        datasets={"arith": InstructionDataModule(train_files=tiny_data, val_size=8, batch_size=4,
                                                 cache_dir=str(tmp_path / "c")),
                  "chat": InstructionDataModule(train_files=chat, val_size=6, batch_size=4, cache_dir=str(tmp_path / "c"))},
        weights={"arith": 2, "chat": 1}, steps_per_epoch=6, tokenizer=tiny_model)
    module = LoRA(model_name=tiny_model, r=4)
    trainer = tiny_trainer(tmp_path, max_steps=6, limit_val_batches=None)
    trainer.fit(module, datamodule=data)
    m = trainer.callback_metrics
    a, c, overall = float(m["val/arith/loss"]), float(m["val/chat/loss"]), float(m["val/loss"])
    assert min(a, c) <= overall <= max(a, c) and a != c


def test_bad_mixtures_are_refused(tiny_model, tiny_data, tmp_path):
    cls = ClassificationDataModule(train_files=tiny_data)
    ins = InstructionDataModule(train_files=tiny_data)
    with pytest.raises(UserError, match="mixes classification and other data modules"):
        MultitaskDataModule(datasets={"a": cls, "b": ins})
    with pytest.raises(UserError, match=r"weights names \['c'\]"):
        MultitaskDataModule(datasets={"a": ins}, weights={"c": 1.0})
    with pytest.raises(UserError, match="must be > 0"):
        MultitaskDataModule(datasets={"a": ins}, weights={"a": 0})


def test_causal_lm_task_refuses_classification_data(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(20)])
    module = LoRA(model_name=tiny_model, r=4)
    trainer = tiny_trainer(tmp_path, max_steps=1)
    with pytest.raises(UserError, match="--model.task SequenceClassification"):
        trainer.fit(module, datamodule=ClassificationDataModule(train_files=path, tokenizer=tiny_model))
