"""Classification: ftframe's recipes against a TF-IDF + logistic-regression baseline, on the same split, in one run.

    python benchmarks/classification.py                                   # Rotten Tomatoes: baseline, MiniLM, SmolLM2
    python benchmarks/classification.py --recipes minilm_lora             # the baseline and MiniLM + LoRA only
    python benchmarks/classification.py --data configs/data/spam_assassin.yaml --recipes minilm_lora --name spam

The split is ``ClassificationDataModule``'s deterministic stratified one (seed 42, 10% validation, 10% test) and is
identical for every runner. The baseline (scikit-learn) fits TF-IDF word 1-2 grams + logistic regression on the
training split, picks C on the validation split and scores the test split. Each ftframe recipe runs as the user runs
it: ``ftframe fit --config configs/classification/<recipe>.yaml`` (+ ``--data``), then ``ftframe test`` on its last
checkpoint, in fresh subprocesses; its test metrics come from the report ``ftframe test`` writes. Wall times are
measured here. Targets (issue 7): MiniLM + LoRA beats the baseline's test accuracy with at most 10 minutes of CPU
training; SmolLM2 + LoRA beats it too. Results go to ``benchmarks/results/classification_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_FIT_SECONDS = 600


def _data_args(data_config: str | None) -> dict[str, Any]:
    """The data module's init args: the recipe's data section, replaced by ``--data`` when given."""
    recipe = yaml.safe_load((ROOT / "configs/classification/minilm_lora.yaml").read_text())
    section = recipe["data"]
    if data_config:
        section = yaml.safe_load(Path(data_config).read_text())["data"]
    return dict(section.get("init_args") or {})


def baseline(data_config: str | None) -> dict[str, Any]:
    """TF-IDF (word 1-2 grams) + logistic regression, C chosen on the validation split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from ftframe.data import ClassificationDataModule

    args = {k: v for k, v in _data_args(data_config).items() if k not in ("batch_size", "max_length")}
    dm = ClassificationDataModule(tokenizer="all-minilm-l6-v2", **args)  # tokenizer only to build the datasets
    dm.setup("fit")

    def split(name: str) -> tuple[list[str], list[int]]:
        data = dm.datasets[name]
        texts = [t if p is None else f"{t}\n{p}" for t, p in zip(data.texts, data.pairs, strict=True)]
        return texts, list(data.labels)

    start = time.perf_counter()
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = split("train"), split("val"), split("test")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    train_m = vectorizer.fit_transform(train_x)
    best = None
    for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(train_m, train_y)
        acc = accuracy_score(val_y, clf.predict(vectorizer.transform(val_x)))
        if best is None or acc > best[0]:
            best = (acc, c, clf)
    assert best is not None
    pred = best[2].predict(vectorizer.transform(test_x))
    return {"runner": f"TF-IDF + logistic regression (C={best[1]})", "accuracy": accuracy_score(test_y, pred),
            "f1_macro": f1_score(test_y, pred, average="macro"), "fit_s": time.perf_counter() - start,
            "total_s": time.perf_counter() - start, "examples": {k: len(v) for k, v in dm.datasets.items()}}


def recipe(name: str, data_config: str | None, out: Path, extra: list[str]) -> dict[str, Any]:
    """``ftframe fit`` then ``ftframe test`` with the recipe, as a user runs them; test metrics from the report."""
    config = ROOT / "configs/classification" / f"{name}.yaml"
    run = out / name
    args = ["--config", str(config), *(["--config", data_config] if data_config else []),
            f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
            f"--trainer.callbacks.dirpath={run / 'checkpoints'}", *extra]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ftframe", "fit", *args, f"--adapter.dirpath={run / 'adapter'}"],
                   check=True, cwd=ROOT)
    fit_s = time.perf_counter() - start
    subprocess.run([sys.executable, "-m", "ftframe", "test", *args, f"--ckpt_path={run / 'checkpoints' / 'last'}"],
                   check=True, cwd=ROOT)
    total_s = time.perf_counter() - start
    summary = json.loads((run / "analysis" / "test" / "metrics.json").read_text())
    model = yaml.safe_load(config.read_text())["model"]["init_args"]["model_name"]
    return {"runner": f"{model} + LoRA ({name})", "accuracy": summary["accuracy"], "f1_macro": summary["f1_macro"],
            "fit_s": fit_s, "total_s": total_s, "report": str((run / "analysis" / "test").relative_to(ROOT))
            if run.is_relative_to(ROOT) else str(run / "analysis" / "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=["minilm_lora", "smollm2_lora"],
                        help="configs/classification/<name>.yaml to run")
    parser.add_argument("--data", default=None, help="a YAML whose data section replaces the recipes' (another data set)")
    parser.add_argument("--name", default="rotten_tomatoes", help="results file suffix")
    parser.add_argument("--runs", default="runs/benchmark-classification", help="where the recipes' runs go")
    parser.add_argument("--extra", nargs="*", default=[], help="more ftframe arguments for every recipe")
    opts = parser.parse_args()
    out = (ROOT / opts.runs / opts.name).resolve()
    rows = [baseline(opts.data)]
    print(f"[benchmark] baseline: {rows[0]}", flush=True)
    for name in opts.recipes:
        rows.append(recipe(name, opts.data, out, opts.extra))
        print(f"[benchmark] {name}: {rows[-1]}", flush=True)
    base = rows[0]["accuracy"]
    lines = [f"Classification on {opts.name} ({time.strftime('%Y-%m-%d')}, test split of "
             f"{rows[0]['examples']['test']} examples; train {rows[0]['examples']['train']})", "",
             "| runner | test accuracy | macro-F1 | vs baseline (accuracy) | fit wall time | fit + test |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runner']} | {r['accuracy']:.4f} | {r['f1_macro']:.4f} | {r['accuracy'] - base:+.4f} | "
                     f"{r['fit_s'] / 60:.1f} min | {r['total_s'] / 60:.1f} min |")
    lines.append("")
    for r in rows[1:]:
        beats = r["accuracy"] > base
        target = f"; fit {'within' if r['fit_s'] <= TARGET_FIT_SECONDS else 'OVER'} 10 min" if "minilm" in r[
            "runner"] else ""
        lines.append(f"- {r['runner']}: {'beats' if beats else 'DOES NOT beat'} the baseline{target}")
    text = "\n".join(lines)
    print(text)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"classification_{opts.name}.json").write_text(json.dumps(rows, indent=2))
    (results / f"classification_{opts.name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
