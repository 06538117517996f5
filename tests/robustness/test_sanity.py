"""The data sanity report (printed before training, and by ``ftframe inspect-data``) and the checks it drives."""

from __future__ import annotations

import pytest
import torch

from ftframe.cli import main
from ftframe.data import InstructionDataModule
from ftframe.data.sanity import render_mask
from ftframe.errors import UserError
from tests.helpers import write_jsonl


def test_inspect_data_reports_what_training_would_learn_from(tiny_model, tiny_data, tmp_path, caplog):
    report = None

    import ftframe.cli as cli

    original = cli.inspect_data

    def keep(argv):
        nonlocal report
        report = original(argv)
        return report

    cli.inspect_data = keep
    try:
        main(["inspect-data", f"--model.model_name={tiny_model}", f"--data.train_files={tiny_data}",
              f"--data.cache_dir={tmp_path / 'c'}", "--data.val_size=8", "--trainer.accelerator=cpu",
              "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"])
    finally:
        cli.inspect_data = original
    train, val = report["splits"]["train"], report["splits"]["val"]
    assert (train["records"], train["examples"], val["examples"]) == (40, 40, 8)
    assert 0 < train["supervised_fraction_min"] <= train["supervised_fraction_median"] < 1
    assert train["terminator_supervised"] == 40 and train["zero_supervised_examples"] == 0
    # the prompt is outside the markers, the whole response and its terminator inside
    first = report["first_example"]
    assert first.count("[[") == 1 and first.rstrip().endswith("<|im_end|>]]") and "user" in first.split("[[")[0]
    assert "data sanity report" in caplog.text and "response end (" in caplog.text
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained or saved


def test_render_mask_brackets_exactly_the_supervised_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.tensor(tok.encode("one two three four five", add_special_tokens=False))
    labels = ids.clone()
    labels[:2] = -100
    labels[4:] = -100
    text = render_mask(tok, ids, labels)
    inside = text.split("[[")[1].split("]]")[0]
    assert tok.decode(ids[2:4]) == inside and text.replace("[[", "").replace("]]", "") == tok.decode(ids)


def test_training_data_with_almost_no_supervised_tokens_is_refused(tiny_model, tmp_path):
    path = tmp_path / "long_prompts.jsonl"
    write_jsonl(path, [{"prompt": "one two three " * 40, "completion": "four"}] * 12)
    dm = InstructionDataModule(train_files=str(path), tokenizer=tiny_model, val_size=2, cache_dir=str(tmp_path / "c"),
                               min_supervised_fraction=0.2)
    with pytest.raises(UserError, match=r"only \d+\.\d+% of the training tokens are supervised "
                                        r"\(min_supervised_fraction=0.2\).*output_field / completion_field"):
        dm.setup("fit")
    with pytest.raises(UserError, match=r"min_supervised_fraction must be in \[0, 1\), got 1.5"):
        InstructionDataModule(train_files=str(path), min_supervised_fraction=1.5)


def test_responses_that_do_not_supervise_their_end_are_reported(tiny_model, tiny_data, tmp_path, monkeypatch):
    import ftframe.data.sanity as sanity

    monkeypatch.setattr(sanity, "terminator_ids", lambda tokenizer: set())  # as if no token ended a turn
    dm = InstructionDataModule(train_files=tiny_data, tokenizer=tiny_model, val_size=8, cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning, match=r"40 of 40 complete training responses do not end with a supervised .*may "
                                         r"not learn to stop"):
        dm.setup("fit")
    assert dm.sanity["splits"]["train"]["terminator_supervised"] == 0


def test_strict_turns_truncated_and_dropped_records_into_an_error_naming_them(tiny_model, tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [{"prompt": "one two", "completion": "three"}] * 6
    records[2] = {"prompt": "one", "completion": "two three " * 30}  # the response runs past max_length
    records[4] = {"prompt": "one two " * 30, "completion": "three"}  # the prompt alone fills it
    write_jsonl(path, records)
    lenient = InstructionDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, max_length=32,
                                    cache_dir=str(tmp_path / "c"), min_supervised_fraction=0)
    lenient.setup("fit")
    assert (lenient.stats["train"]["truncated"], lenient.stats["train"]["dropped_prompt_too_long"]) == (1, 1)
    strict = InstructionDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, max_length=32,
                                   cache_dir=str(tmp_path / "c"), min_supervised_fraction=0, strict=True)
    with pytest.raises(UserError, match=r"strict: 2 train record\(s\) of \[.*mixed.jsonl'\] would be truncated or "
                                        r"dropped at max_length=32: record 2 \(truncated\), record 4 \(prompt alone "
                                        r">= max_length\) \(0-based, in file order\)"):
        strict.setup("fit")


def test_duplicate_record_ids_are_reported_and_refused_in_strict_mode(tiny_model, tmp_path):
    path = tmp_path / "ids.jsonl"
    records = [{"id": i % 4, "prompt": f"one {i}", "completion": "two"} for i in range(6)]
    write_jsonl(path, records)
    dm = InstructionDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, cache_dir=str(tmp_path / "c"),
                               min_supervised_fraction=0)
    with pytest.warns(UserWarning, match=r"2 record\(s\) repeat an earlier record's id: .*ids.jsonl:5 repeats id 0 of "
                                         r".*ids.jsonl:1; .*ids.jsonl:6 repeats id 1 of .*ids.jsonl:2 \(kept; strict"):
        dm.setup("fit")
    assert dm.stats["train"]["examples"] == 6
    strict = InstructionDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, strict=True,
                                   cache_dir=str(tmp_path / "c"), min_supervised_fraction=0)
    with pytest.raises(UserError, match=r"strict: 2 record\(s\) repeat an earlier record's id.*give them distinct ids"):
        strict.setup("fit")


def test_strict_classification_data_refuses_empty_texts_and_truncation(tiny_model, tmp_path):
    from ftframe.data import ClassificationDataModule

    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"one two {i}", "label": ["good", "bad"][i % 2]} for i in range(10)]
    rows[3]["text"] = ""
    write_jsonl(path, rows)
    lenient = ClassificationDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, test_size=0)
    lenient.setup("fit")
    assert lenient.stats["train"]["examples"] == 9
    strict = ClassificationDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, test_size=0,
                                      strict=True)
    with pytest.raises(UserError, match=r"reviews.jsonl:4"):
        strict.setup("fit")
    rows[3]["text"] = "one two " * 50
    write_jsonl(path, rows)
    strict = ClassificationDataModule(train_files=str(path), tokenizer=tiny_model, val_size=0, test_size=0,
                                      max_length=16, strict=True)
    with pytest.raises(UserError, match=r"strict: 1 train example\(s\) are longer than max_length=16 tokens"):
        strict.setup("fit")
