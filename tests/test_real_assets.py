"""On the real downloaded assets (``ftframe download``): SmolLM2-135M-Instruct GGUF and GSM8K. Marked slow."""

from __future__ import annotations

import json

import pytest
import torch

from ftframe import assets
from tests.helpers import chat_ids, logits_one_by_one, padded_batch, real_assets_available, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not real_assets_available(), reason="run `ftframe download` first (.ci/run does)"),
]
MODEL = "smollm2-135m-instruct"


def test_gguf_loads_converts_and_generates():
    from ftframe.models import resolve_model
    from ftframe.tools.generate import Generator

    folder = resolve_model(MODEL)
    assert (assets.cache_root() / "converted").as_posix() in folder
    gen = Generator(model=MODEL)
    answer = gen(["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_real_chat_template_masks(tmp_path):
    """Labels are -100 exactly on the prompt tokens of SmolLM2's own chat template; <|im_end|> is supervised."""
    from ftframe.data import InstructionDataModule
    from ftframe.models import load_tokenizer

    recs = [json.loads(line) for line in assets.asset_path("gsm8k").read_text().splitlines()[:3]]
    path = write_jsonl(tmp_path / "g.jsonl", recs)
    dm = InstructionDataModule(train_files=path, tokenizer=MODEL, val_size=0, cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    tok = load_tokenizer(MODEL)
    for rec, ex in zip(recs, dm.train_dataset, strict=True):
        prompt, full = chat_ids(tok, rec["prompt"], rec["completion"])
        assert ex["input_ids"].tolist() == full
        labels = ex["labels"].tolist()
        assert labels[: len(prompt)] == [-100] * len(prompt)
        supervised = [t for t in labels if t != -100]
        assert supervised == full[len(prompt): len(full) - 1]  # everything after the prompt but the final "\n"
        assert supervised[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


METHOD_ARGS = {"LoRA": ["--model.r=4"], "QLoRA": ["--model.r=4"], "DoRA": ["--model.r=4"], "IA3": [],
               "LastLayers": ["--model.num_layers=1"], "PromptTuning": ["--model.num_virtual_tokens=4"],
               "PTuning": ["--model.num_virtual_tokens=4"], "PrefixTuning": ["--model.num_virtual_tokens=4"],
               "BottleneckAdapters": ["--model.size=8"], "QLoRA-LoftQ": ["--model.r=4", "--model.init=loftq"]}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_two_step_fit_on_the_real_model(method, tmp_path):
    from ftframe.cli import main

    out = tmp_path / "adapter"
    main(["fit", f"--model=ftframe.methods.{method.split('-')[0]}", f"--model.model_name={MODEL}", *METHOD_ARGS[method],
          "--data.train_files=gsm8k", "--data.val_size=8", "--data.batch_size=2", "--data.max_length=256",
          "--data.max_train_examples=8", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
          "--trainer.accelerator=cpu", "--trainer.precision=auto", "--trainer.logger=false",
          "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
          f"--adapter.dirpath={out}"])
    from safetensors.torch import load_file

    if method == "LastLayers":  # a whole model folder
        weights = {}
        for f in out.glob("*.safetensors"):
            weights.update(load_file(str(f)))
        assert (out / "config.json").is_file() and weights
        assert all(torch.isfinite(w).all() for w in weights.values())
        return
    if method == "BottleneckAdapters":
        weights = load_file(str(out / "bottleneck_adapters.safetensors"))
        assert weights and all(torch.isfinite(w).all() for w in weights.values())
        return
    if method == "QLoRA-LoftQ":  # the adapter records the 4-bit base it belongs to
        assert json.loads((out / "ftframe_base_quantization.json").read_text())["quantization_config"]["load_in_4bit"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == MODEL


def test_mmlu_asset_is_the_full_test_split():
    from ftframe.evaluation import load_questions

    questions = load_questions("mmlu")
    assert len(questions) == 14042 and len({q.subject for q in questions}) == 57
    assert all(len(q.choices) == 4 and 0 <= q.label < 4 for q in questions)
    assert not any(q.question == "question" for q in questions)  # the file's repeated header rows are dropped


def test_truthfulqa_streams_out_of_the_bigbench_sdist(tmp_path, monkeypatch):
    """The optional asset: 299 questions read from a 358 MB sdist that is streamed, never stored or unpacked."""
    from ftframe.errors import UserError
    from ftframe.evaluation import load_questions

    monkeypatch.setenv("FTFRAME_HOME", str(tmp_path))
    try:
        path = assets.download(["truthfulqa-mc"], quiet=True)["truthfulqa-mc"]
    except UserError as e:
        # bigbench 1.0.0 left pypi.org in December 2026 (the index lists only 0.0.1, whose sdist holds no data).
        # Then the error must say so and name the way out; anything else (a network error, a changed sdist) fails.
        if f"does not list {assets.BIGBENCH_SDIST}" not in str(e):
            raise
        assert "FTFRAME_PYPI_SIMPLE" in str(e) and "removed from pypi.org" in str(e)
        folder = tmp_path / "assets" / "truthfulqa-mc"
        assert not folder.exists() or not any(folder.iterdir())  # no partial file left behind
        pytest.skip(f"the real asset is gone from the index: {e}")
    assert [p.name for p in path.parent.iterdir()] == ["truthfulqa_mc.jsonl"]  # nothing else kept
    questions = load_questions(path)
    assert len(questions) == 299 and all(2 <= len(q.choices) <= 5 for q in questions)
    assert all("canary GUID" in json.loads(line)["canary"] for line in path.read_text().splitlines())


def test_sotu_asset_and_the_forgetting_monitors_reference_windows():
    from ftframe.callbacks import ForgettingMonitor
    from ftframe.models import load_tokenizer

    lines = assets.asset_path("sotu").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 233 and records[0]["year"] == 1790 and records[-1]["year"] == 2021
    assert sum(len(r["text"].split()) for r in records) > 1_700_000
    monitor = ForgettingMonitor(reference="sotu", reference_windows=8, window_tokens=512)
    windows = monitor._reference_windows(load_tokenizer(MODEL))
    assert len(windows) == 8 and all(len(w) == 512 and scored == 511 for w, scored in windows)
    assert len({tuple(w) for w, _ in windows}) == 8  # eight different speeches


def test_rotten_tomatoes_asset_and_its_stratified_split():
    from ftframe.data import ClassificationDataModule

    records = [json.loads(line) for line in assets.asset_path("rotten-tomatoes").read_text().splitlines()]
    assert len(records) == 12808 and {r["label"] for r in records} == {"fresh", "rotten"}
    assert sum(r["label"] == "fresh" for r in records) == 7403 and all(r["text"].strip() for r in records)
    dm = ClassificationDataModule(train_files="rotten-tomatoes", tokenizer=MODEL)
    dm.setup("fit")
    assert dm.label_names == ["fresh", "rotten"]
    assert {k: len(d) for k, d in dm.datasets.items()} == {"train": 10246, "val": 1281, "test": 1281}
    for split in ("val", "test"):  # the 57.8% fresh of the whole, within one example
        fresh = sum(label == 0 for label in dm.datasets[split].labels)
        assert abs(fresh / len(dm.datasets[split]) - 7403 / 12808) < 1 / len(dm.datasets[split])


def test_smollm2_classifier_pools_the_last_real_token_and_its_adapter_reloads(tmp_path):
    """SmolLM2 pads with its end-of-turn token: pooling by the mask, not by pad ids, is what makes padding harmless."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ftframe.methods import LoRA
    from ftframe.models import load_model
    from ftframe.tasks import SequenceClassification

    module = LoRA(model_name=MODEL, task=SequenceClassification(labels=["fresh", "rotten"]), r=4)
    module.configure_model()
    module.model.eval()
    tok = module.tokenizer
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["A triumph.", "Two hours I will never get back, and the popcorn was stale too."]
    ids = [tok(t)["input_ids"] + [tok.pad_token_id] for t in texts]  # each text ends with the pad token itself
    right = padded_batch(ids, tok.pad_token_id, max(map(len, ids)))
    alone = logits_one_by_one(module, ids)
    with torch.no_grad():
        padded = module.task.logits(module.model, right)
    assert torch.allclose(alone, padded, atol=1e-4)
    module.save_trained(tmp_path / "adapter")
    base = load_model(MODEL, AutoModelForSequenceClassification, num_labels=2)
    base.config.pad_token_id = tok.pad_token_id
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(module.task.logits(reloaded, right), padded, atol=1e-5)
