"""Multiple-choice evaluation throughput: ftframe vs. lm-evaluation-harness on the same job.

Both score the same MMLU test questions (taken at even intervals through the file) with the same prompt format and
zero shots, on the same model in float32, with the same batch size. Model loading is excluded from both: lm-eval
gets a ready ``HFLM`` and ftframe a loaded model. The runs alternate (reversed in odd rounds); each figure is the
median over rounds, and the ratio is questions/s of ftframe over lm-eval. The predictions are compared too.

    python benchmarks/eval_throughput.py --questions 200 --rounds 2 [--format continuation]

With ``--suite standard`` (or a suite YAML) every benchmark of the suite is timed instead, ``--limit`` questions
each (default 100): lm-eval runs its own task YAML for the benchmark (data redirected to the same local records,
``ftframe.evaluation.harness.write_lm_eval_benchmark``) and ftframe its data definition; both timings include
turning records into requests (ftframe: reading and rendering the records; lm-eval: ``simple_evaluate``). The
figures are per benchmark and overall (all questions over all seconds). Before timing, each runner scores the
first benchmark once (first-call costs such as the allocator's warm-up are left out of both).

    python benchmarks/eval_throughput.py --suite standard --limit 100
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
from typing import Any

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
    parser.add_argument("--suite", default=None, help="time every benchmark of this suite (standard or a YAML)")
    parser.add_argument("--limit", type=int, default=100, help="--suite: questions per benchmark")
    args = parser.parse_args()
    if args.suite:
        return suite_main(args)

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


def suite_main(args: argparse.Namespace) -> None:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ftframe.device import inference_dtype, simulated_cpu
    from ftframe.evaluation import score_multiple_choice
    from ftframe.evaluation.benchmarks import benchmark, load_docs, load_suite, to_question
    from ftframe.evaluation.harness import write_lm_eval_benchmark
    from ftframe.models import resolve_model
    from ftframe.tools.generate import Generator

    suite = load_suite(args.suite)
    dtype = inference_dtype("auto", "cpu")
    lm = HFLM(pretrained=resolve_model(args.model), dtype=dtype, batch_size=args.batch_size, device="cpu")
    ours = Generator(model=args.model, dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix="ftframe-evalbench-"))
    rows = []
    warm = True  # each runner scores the first benchmark once untimed: first-call costs are nobody's throughput
    for run in suite.runs:
        bench = benchmark(run.name)
        limit = min(args.limit, run.limit or args.limit)
        docs = load_docs(run.name, data=run.data, limit=limit, sample=limit if run.sample else None)
        folder = tmp / run.name
        task = write_lm_eval_benchmark(folder, run.name, [d for _, d in docs])
        manager = TaskManager(include_path=str(folder))

        def run_lm_eval(task: str = task, manager: Any = manager) -> tuple[float, list[int]]:
            t = time.perf_counter()
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True,
                                          num_fewshot=0, verbosity="ERROR")
            seconds = time.perf_counter() - t
            samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            return seconds, [max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0]))
                             for s in samples]

        def run_ftframe(bench: Any = bench, docs: list = docs) -> tuple[float, list[int]]:
            t = time.perf_counter()
            questions = [to_question(bench, doc, where, i) for i, (where, doc) in enumerate(docs)]
            result = score_multiple_choice(ours.model, ours.tokenizer, questions, "rendered",
                                           batch_size=args.batch_size, progress=False)
            return time.perf_counter() - t, [r["pred"] for r in result.records]

        runners = {"ftframe": run_ftframe, "lm-eval": run_lm_eval}
        if warm:
            for runner in runners.values():
                runner()
            warm = False
        times: dict[str, list[float]] = {k: [] for k in runners}
        preds: dict[str, list[int]] = {}
        for r in range(args.rounds):
            for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
                seconds, preds[name] = runners[name]()
                times[name].append(seconds)
        med = {k: statistics.median(v) for k, v in times.items()}
        agree = sum(a == b for a, b in zip(preds["ftframe"], preds["lm-eval"], strict=True))
        row = {"benchmark": run.name, "title": bench.title, "questions": len(docs), "seconds": med,
               "questions_per_s": {k: len(docs) / v for k, v in med.items()}, "ratio": med["lm-eval"] / med["ftframe"],
               "same_prediction": agree}
        rows.append(row)
        print(f"{bench.title}: ftframe {med['ftframe']:.1f} s, lm-eval {med['lm-eval']:.1f} s, "
              f"{row['ratio']:.2f}x, same choice {agree}/{len(docs)}", flush=True)
    total_q = sum(r["questions"] for r in rows)
    total = {k: sum(r["seconds"][k] for r in rows) for k in ("ftframe", "lm-eval")}
    result = {
        "job": {"suite": suite.name, "questions_per_benchmark": args.limit, "batch_size": args.batch_size,
                "model": args.model, "dtype": dtype, "rounds": args.rounds, "shots": 0},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "lm_eval": lm_eval.__version__, "simulated": simulated_cpu()},
        "benchmarks": rows, "questions": total_q, "seconds": total,
        "questions_per_s": {k: total_q / v for k, v in total.items()},
        "ratio_ftframe_over_lm_eval": total["lm-eval"] / total["ftframe"],
    }
    lines = [f"suite `{suite.name}`: {args.limit} questions per benchmark, 0-shot, {dtype}, batch {args.batch_size}, "
             f"median of {args.rounds} round(s), {result['machine']['threads']} threads "
             f"({result['machine']['capability']}{', simulated: ' + simulated_cpu() if simulated_cpu() else ''})", "",
             "| benchmark | questions | ftframe q/s | lm-eval q/s | ratio | same choice |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['title']} | {r['questions']} | {r['questions_per_s']['ftframe']:.2f} | "
                     f"{r['questions_per_s']['lm-eval']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['same_prediction']}/{r['questions']} |")
    lines.append(f"| **all** | {total_q} | {result['questions_per_s']['ftframe']:.2f} | "
                 f"{result['questions_per_s']['lm-eval']:.2f} | **{result['ratio_ftframe_over_lm_eval']:.2f}x** | "
                 f"{sum(r['same_prediction'] for r in rows)}/{total_q} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"eval_throughput_suite_{suite.name}_cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
