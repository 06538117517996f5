"""`ftframe tune` on the quickstart: 8 trials over learning rate, LoRA r and warm-up (docs/tune.md).

    python benchmarks/tune_quickstart.py [--trials 8] [--eval_every 10] [--out runs/tune-bench] [--record]

Runs ``ftframe tune --config configs/quickstart.yaml --config configs/tune/quickstart.yaml --space
configs/tune/quickstart_space.yaml`` at the quickstart's own step budget (60 steps; 20 where precision resolves to
32-true) with the median pruner. Trial 0 runs the quickstart's own values, so the baseline -- the shipped
quickstart's val loss at the same budget -- is measured in the same invocation. Prints the trial table, the pruned
count, best vs. baseline val loss and the wall time; writes ``<out>/bench.json`` (and, with ``--record``,
``benchmarks/results/tune_quickstart.{json,md}`` and the plots under ``docs/img/tune_*.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--eval_every", type=int, default=10, help="validate (and maybe prune) every N steps")
    parser.add_argument("--out", default="runs/tune-bench")
    parser.add_argument("--resume", action="store_true", help="continue the study in --out instead of starting anew")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    out = ROOT / args.out
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "ftframe", "tune", "--config", "configs/quickstart.yaml", "--config",
            "configs/tune/quickstart.yaml", "--space", "configs/tune/quickstart_space.yaml", "--trials",
            str(args.trials), "--eval_every", str(args.eval_every), "--study", "quickstart", "--output_dir", str(out)]
    print("[bench]", " ".join(argv[1:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"[bench] ftframe tune failed (exit {proc.returncode})")
    rows = list(csv.DictReader(open(out / "trials.csv", encoding="utf-8")))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    baseline = next((r for r in rows if r["trial"] == "0"), None)
    if baseline is None or baseline["state"] != "COMPLETE":
        sys.exit("[bench] trial 0 (the quickstart's own values) did not complete; no baseline")
    best = min(done, key=lambda r: float(r["val/loss"]))
    import torch

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "date": time.strftime("%Y-%m-%d"), "trials": len(rows), "complete": len(done),
        "pruned": sum(r["state"] == "PRUNED" for r in rows), "failed": sum(r["state"] == "FAIL" for r in rows),
        "steps": int(float(baseline["steps"])), "wall_seconds": round(wall, 1),
        "baseline_val_loss": float(baseline["val/loss"]), "best_trial": int(best["trial"]),
        "best_val_loss": float(best["val/loss"]),
        "best_params": {k: best[k] for k in rows[0] if k.startswith("model.")},
        "ratio_best_to_baseline": round(float(best["val/loss"]) / float(baseline["val/loss"]), 4),
        "rows": rows,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    table = (out / "trials.md").read_text()
    summary = (f"{result['trials']} trials ({result['complete']} complete, {result['pruned']} pruned, "
               f"{result['failed']} failed) of {result['steps']} steps in {wall / 60:.1f} min on {result['machine']}; "
               f"val/loss: quickstart's values (trial 0) {result['baseline_val_loss']:.4f}, best (trial "
               f"{result['best_trial']}) {result['best_val_loss']:.4f} (ratio {result['ratio_best_to_baseline']})")
    print(table)
    print("[bench]", summary, flush=True)
    if args.record:
        (ROOT / "benchmarks/results/tune_quickstart.json").write_text(json.dumps(result, indent=1) + "\n")
        (ROOT / "benchmarks/results/tune_quickstart.md").write_text(f"{summary}\n\n{table}")
        for name in ("history.png", "importances.png", "intermediate.png"):
            if (out / name).exists():
                shutil.copy(out / name, ROOT / "docs/img" / f"tune_{name}")


if __name__ == "__main__":
    main()
