"""Multiple-choice evaluation throughput: ftframe vs. lm-evaluation-harness on the same job.

Both score the same MMLU test questions (taken at even intervals through the file) with the same prompt format and
zero shots, on the same model in float32, with the same batch size. Model loading is excluded from both: lm-eval
gets a ready ``HFLM`` and ftframe a loaded model. The runs alternate (reversed in odd rounds); each figure is the
median over rounds, and the ratio is questions/s of ftframe over lm-eval. The predictions are compared too.

    python benchmarks/eval_throughput.py --questions 200 --rounds 2 [--format continuation]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--format", choices=["letter", "continuation"], default="letter")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--output", default=None,
                        help="path stem for .json/.txt (default benchmarks/results/eval_throughput_FORMAT_cpu)")
    args = parser.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ftframe.device import inference_dtype
    from ftframe.evaluation import load_questions, sample_evenly, score_multiple_choice, summarize
    from ftframe.evaluation.harness import write_lm_eval_task, write_questions
    from ftframe.models import resolve_model
    from ftframe.tools.generate import Generator

    questions = sample_evenly(load_questions("mmlu"), args.questions)
    tmp = Path(tempfile.mkdtemp(prefix="ftframe-evalbench-"))
    task = write_lm_eval_task(tmp, args.format, write_questions(questions, tmp / "questions.jsonl"))
    manager = TaskManager(include_path=str(tmp))
    dtype = inference_dtype("auto", "cpu")  # the device resolution's evaluation dtype (float32 on every CPU)
    lm = HFLM(pretrained=resolve_model(args.model), dtype=dtype, batch_size=args.batch_size, device="cpu")
    ours = Generator(model=args.model, dtype=dtype)

    def run_lm_eval() -> tuple[float, list[int], float]:
        t = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                                      num_fewshot=0, verbosity="ERROR")
        seconds = time.perf_counter() - t
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        preds = [max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0]))
                 for s in samples]
        return seconds, preds, out["results"][task]["acc,none"]

    def run_ftframe() -> tuple[float, list[int], float]:
        t = time.perf_counter()
        result = score_multiple_choice(ours.model, ours.tokenizer, questions, args.format,
                                       batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - t
        return seconds, [r["pred"] for r in result.records], summarize(result.records)["acc"]

    runners = {"ftframe": run_ftframe, "lm-eval": run_lm_eval}
    times: dict[str, list[float]] = {k: [] for k in runners}
    preds: dict[str, list[int]] = {}
    accs: dict[str, float] = {}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            seconds, p, acc = runners[name]()
            times[name].append(seconds)
            preds[name], accs[name] = p, acc
            print(f"round {r + 1} {name}: {seconds:.1f} s ({len(questions) / seconds:.2f} questions/s), "
                  f"acc {100 * acc:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    agree = sum(a == b for a, b in zip(preds["ftframe"], preds["lm-eval"], strict=True))
    result = {
        "job": {"questions": len(questions), "format": args.format, "batch_size": args.batch_size,
                "model": args.model, "dtype": dtype, "rounds": args.rounds},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "lm_eval": lm_eval.__version__},
        "seconds": med,
        "questions_per_s": {k: len(questions) / v for k, v in med.items()},
        "ratio_ftframe_over_lm_eval": med["lm-eval"] / med["ftframe"],
        "same_prediction": f"{agree}/{len(questions)}",
        "acc": accs,
    }
    lines = [f"{len(questions)} MMLU questions, format {args.format}, 0-shot, float32, batch {args.batch_size}, "
             f"median of {args.rounds} rounds ({result['machine']['threads']} threads)",
             "", "| runner | seconds | questions/s | acc |", "|---|---:|---:|---:|"]
    for k in runners:
        lines.append(f"| {k} | {med[k]:.1f} | {len(questions) / med[k]:.2f} | {100 * accs[k]:.2f} |")
    lines += ["", f"ftframe / lm-eval throughput: {result['ratio_ftframe_over_lm_eval']:.2f}x; "
              f"same predicted choice on {agree}/{len(questions)} questions"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"eval_throughput_{args.format}_cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
