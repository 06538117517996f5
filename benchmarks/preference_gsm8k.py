"""SFT alone vs SFT + DPO on the default model, in one invocation (docs/preference.md).

    python benchmarks/preference_gsm8k.py [--questions 160] [--steps 40] [--out runs/preference-bench]

1. the SFT adapter: ``runs/quickstart/adapter`` if it exists (``--sft_adapter``), else ``ftframe fit --config
   configs/quickstart.yaml`` is run first (timed);
2. ``ftframe make-preferences`` samples answers to GSM8K training questions from that adapter and writes pairs;
3. ``ftframe compare`` runs ``configs/preference/dpo_gsm8k.yaml`` twice from the same adapter: with 0 steps (SFT
   alone) and with ``--steps`` DPO steps (SFT + DPO), scoring both on the 64 GSM8K questions the quickstart held out
   (greedy exact match) and on the held-out pairs (reward accuracy); the DPO run also measures forgetting.

Prints one table and writes ``<out>/results.{json,md}`` (and ``benchmarks/results/preference_gsm8k.{json,md}`` with
``--record``). Every figure comes from this invocation.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], log: Path) -> float:
    print(f"[bench] {' '.join(argv)}  (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"[bench] failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_adapter", default="runs/quickstart/adapter")
    parser.add_argument("--questions", type=int, default=160, help="GSM8K training questions sampled")
    parser.add_argument("--samples", type=int, default=4, help="answers sampled per question")
    parser.add_argument("--pairs_per_question", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="DPO optimizer steps")
    parser.add_argument("--metric_examples", type=int, default=64)
    parser.add_argument("--out", default="runs/preference-bench")
    parser.add_argument("--record", action="store_true", help="also write benchmarks/results/preference_gsm8k.*")
    parser.add_argument("--reuse_pairs", action="store_true", help="keep <out>/pairs.jsonl if it exists (its time is "
                        "then the one recorded in pairs.jsonl.meta.json)")
    args = parser.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    ftframe = [sys.executable, "-m", "ftframe"]
    started = time.perf_counter()
    timings: dict[str, float] = {}
    adapter = ROOT / args.sft_adapter
    if not (adapter / "adapter_config.json").is_file():
        timings["sft_fit_s"] = run([*ftframe, "fit", "--config", "configs/quickstart.yaml",
                                    f"--adapter.dirpath={adapter}"], out / "sft.log")
    pairs = out / "pairs.jsonl"
    if args.reuse_pairs and Path(f"{pairs}.meta.json").is_file():
        timings["make_preferences_s"] = json.loads(Path(f"{pairs}.meta.json").read_text())["seconds"]
    else:
        timings["make_preferences_s"] = run([*ftframe, "make-preferences", f"--adapter={adapter}",
                                             f"--output={pairs}",
                                             f"--limit={args.questions}", f"--samples={args.samples}",
                                             f"--pairs_per_question={args.pairs_per_question}"], out / "pairs.log")
    meta = json.loads(Path(f"{pairs}.meta.json").read_text())
    config = "configs/preference/dpo_gsm8k.yaml"
    common = f"--model.init_args.init_adapter={adapter} --data.init_args.train_files={pairs}"
    forgetting = shlex.quote("--trainer.callbacks+=" + json.dumps({"class_path": "ftframe.callbacks.ForgettingMonitor"}))
    methods = {"SFT (quickstart adapter)": f"{config} {common} --trainer.max_steps=0 "
                                           "--model.init_args.optimizer.lr_schedule=constant",
               "SFT + DPO": f"{config} {common} {forgetting}"}
    compare_dir = out / "compare"
    if compare_dir.exists():
        shutil.rmtree(compare_dir)
    timings["compare_s"] = run([*ftframe, "compare", "--fit_config", config, "--methods", json.dumps(methods),
                                f"--steps={args.steps}", f"--output={compare_dir}", "--metric_data=gsm8k",
                                f"--metric_examples={args.metric_examples}"], out / "compare.log")
    rows = json.loads((compare_dir / "results.json").read_text())["rows"]
    by = {r["method"]: r for r in rows}
    sft, dpo = by["SFT (quickstart adapter)"], by["SFT + DPO"]
    drift = json.loads(next((compare_dir).rglob("forgetting.json")).read_text())
    first, last = drift["history"][0], drift["history"][-1]  # before DPO (the SFT adapter) and after it
    total = time.perf_counter() - started
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "pairs": meta["counts"], "sample_accuracy_of_the_sft_adapter": meta["sample_accuracy"],
        "dpo_steps": args.steps, "timings_s": {k: round(v, 1) for k, v in timings.items()}, "total_s": round(total, 1),
        "sft": {"exact_match": sft["task_metric"], "n": sft["task_metric_n"], "reward_accuracy": sft["reward_accuracy"],
                "forgetting": first},
        "sft_dpo": {"exact_match": dpo["task_metric"], "n": dpo["task_metric_n"],
                    "reward_accuracy": dpo["reward_accuracy"], "wall_s": dpo["wall_s"], "forgetting": last},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    def forgetting_cell(m: dict) -> str:
        ppl, kl, probe = m.get("ref_ppl"), m.get("kl"), m.get("probe_acc")
        parts = [f"ppl {ppl:.2f}" if ppl is not None else None, f"KL {kl:.3f}" if kl is not None else None,
                 f"MMLU {100 * probe:.0f}%" if probe is not None else None]
        return ", ".join(p for p in parts if p) or "–"

    table = "\n".join([
        f"SFT alone vs SFT + DPO ({args.steps} DPO steps on {meta['counts']['pairs']} pairs made from "
        f"{meta['counts']['questions']} GSM8K training questions; one invocation, {total / 60:.1f} min)",
        "",
        "| run | held-out reward accuracy | GSM8K exact match (64 held-out) | forgetting vs the base | time |",
        "|---|---:|---:|---|---:|",
        f"| SFT (quickstart adapter) | {sft['reward_accuracy']:.3f} | {100 * sft['task_metric']:.1f}% | "
        f"{forgetting_cell(first)} | – |",
        f"| SFT + DPO | {dpo['reward_accuracy']:.3f} | {100 * dpo['task_metric']:.1f}% | {forgetting_cell(last)} | "
        f"{dpo['wall_s'] / 60:.1f} min |",
        "",
        f"pairs: {timings['make_preferences_s'] / 60:.1f} min (sampled answers correct "
        f"{100 * meta['sample_accuracy']:.1f}%)",
    ]) + "\n"
    (out / "results.md").write_text(table)
    print(table)
    if args.record:
        (ROOT / "benchmarks/results/preference_gsm8k.json").write_text(json.dumps(result, indent=2) + "\n")
        (ROOT / "benchmarks/results/preference_gsm8k.md").write_text(table)


if __name__ == "__main__":
    main()
