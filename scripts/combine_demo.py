"""Combine two task adapters and score every model on both tasks: the two-task table of docs/merge.md.

    bash scripts/combine_demo.sh            # trains the two adapters first (about 8 minutes on 2 CPU cores)
    python scripts/combine_demo.py --first runs/demo/gsm8k/adapter --second runs/demo/chatterbot/adapter

For the base model, each adapter, and each ``ftframe merge --adapters`` combination, the response loss (mean NLL per
answer token, as validation measures it) on the 64 held-out examples of each task's data, and optionally GSM8K exact
match on the first held-out questions. Writes ``<out>/two_task.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ftframe.tools.evaluate import load_items, score
from ftframe.tools.generate import Generator
from ftframe.tools.merge import merge

#: each task: its data, and the options its training run used (so "val" is exactly the held-out split)
TASKS = {
    "gsm8k": {"task": "loss", "data": "gsm8k", "split": "val", "val_size": 64, "max_length": 512, "batch_size": 16},
    "chatterbot": {"task": "loss", "data": "chatterbot", "split": "val", "val_size": 64, "max_length": 256,
                   "batch_size": 16},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first", default="runs/demo/gsm8k/adapter", help="adapter trained on the first task")
    parser.add_argument("--second", default="runs/demo/chatterbot/adapter", help="adapter trained on the second task")
    parser.add_argument("--out", default="runs/demo", help="where combined adapters and the table go")
    parser.add_argument("--combinations", nargs="+", default=["linear", "ties", "dare_linear", "dare_ties", "svd"])
    parser.add_argument("--weights", nargs=2, type=float, default=[1.0, 1.0])
    parser.add_argument("--density", type=float, default=0.5, help="ties / dare: fraction of entries kept")
    parser.add_argument("--exact_match", type=int, default=0,
                        help="also score GSM8K exact match on this many held-out questions (slow: generation)")
    args = parser.parse_args()
    out = Path(args.out)
    models: dict[str, str | None] = {"base": None, "gsm8k adapter": args.first, "chatterbot adapter": args.second}
    for combination in args.combinations:
        folder = out / f"combined-{combination}"
        merge(adapters=[args.first, args.second], output=str(folder), combination=combination, weights=args.weights,
              density=args.density, overwrite=True)
        models[f"{combination} ({args.weights[0]:g}, {args.weights[1]:g})"] = str(folder)
    items = {name: load_items(opts, tokenizer=args.first) for name, opts in TASKS.items()}
    em_opts = {"task": "generation", "data": "gsm8k", "split": "val", "val_size": 64, "limit": args.exact_match,
               "max_new_tokens": 256, "batch_size": 8}
    em_items = load_items(em_opts, tokenizer=None) if args.exact_match else None
    base_name = json.loads((Path(args.first) / "adapter_config.json").read_text())["base_model_name_or_path"]
    rows = []
    for label, adapter in models.items():
        started = time.perf_counter()
        loaded = Generator(adapter=adapter, model=None if adapter else base_name)
        row: dict[str, object] = {"model": label}
        for name, opts in TASKS.items():
            row[f"{name} loss"] = score(loaded.model, loaded.tokenizer, items[name], opts)[0]["loss"]
        if em_items is not None:
            row["gsm8k exact match"] = score(loaded.model, loaded.tokenizer, em_items, em_opts)[0][
                "exact_match_flexible"]
        print(f"[demo] {label}: {row} ({time.perf_counter() - started:.0f} s)", flush=True)
        rows.append(row)
    columns = [c for c in rows[0] if c != "model"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    (out / "two_task.md").write_text(table)
    (out / "two_task.json").write_text(json.dumps(rows, indent=2))
    print(table)


if __name__ == "__main__":
    main()
