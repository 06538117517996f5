"""Training throughput and memory: ftframe vs. Hugging Face ``Trainer`` + PEFT on the same job, side by side.

    python benchmarks/train_throughput.py                      # CPU: ftframe vs the HF configurations, 2 rounds
    python benchmarks/train_throughput.py --ablate             # also ftframe with each speed lever switched off
    python benchmarks/train_throughput.py --device cuda --model llama-1b   # GPU: 1B-class Llama, random weights

The job (identical for every runner): LoRA r=16, alpha=32, no dropout, on every linear layer of the model, GSM8K
question -> answer with loss on the answer only, max length 512, batch 8 (no accumulation), AdamW at a constant
lr of 2e-4, seed 0, the same examples in the same order (ftframe's tokenization, so the tokens are identical).
Each run is a fresh subprocess; runs alternate (A B C, then C B A, ...) so drift of the machine hits every runner alike.

ftframe runs with ``precision: auto`` -- what the device resolution (``ftframe.device``) picks here: bf16-mixed on a
GPU or a CPU with fast bfloat16, 32-true on other CPUs -- and with the process settings the ``ftframe`` command applies
to itself (``ftframe.PROCESS_DEFAULTS``: huge pages for large CPU tensors on Linux). The HF baselines are ``Trainer`` in fp32 and with
``bf16=True``; ``hf-bf16`` runs only where bfloat16 is fast (on an AVX2-only CPU it is ~50x slower per matmul and
would take hours; ``--only hf-bf16`` forces it). The script prints the CPU capability, each runner's precision and the
matmul peak of each dtype a runner computes in.

Figures per run:
  * useful tokens/s -- tokens of the examples (no padding) per second over the timed steps (the first
    ``--warmup`` optimizer steps are excluded);
  * peak RSS -- the process's resident-memory high-water mark (loading included, same for all runners);
  * loss/token -- mean cross-entropy per supervised token over all steps (the same examples for every runner);
  * MFU -- model FLOPs of the job per second over the matmul peak of the dtype the runner computes in (bf16 for
    bf16 runners, fp32 for fp32 ones), measured by this script on this machine in a few seconds.
The table shows each runner's median over rounds and its ratio to the faster HF baseline; ``--json`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ftframe's speed levers and the value that switches each off (``--ablate`` runs one config per lever)
LEVERS: dict[str, tuple[str, Any]] = {
    "packing": ("data.packing", False),
    "chunked_loss": ("task.loss_chunk_size", None),
    "frozen_bf16": ("model.frozen_dtype", "float32"),
    "lean_activations": ("model.lean_activations", False),
    "fused_adamw": ("model.optimizer.fused", False),
    "huge_pages": ("env.THP_MEM_ALLOC_ENABLE", "0"),  # a process setting: see ftframe.PROCESS_DEFAULTS
}


# ----------------------------------------------------------------------------------------------------------- job
def job_examples(args: argparse.Namespace) -> tuple[Any, list[int]]:
    """ftframe's tokenized GSM8K train set and the indices of the examples the run consumes, in order."""
    from ftframe.data import InstructionDataModule
    from ftframe.data.collate import ResumableSampler

    dm = InstructionDataModule(train_files="gsm8k", tokenizer=args.model_name, max_length=args.max_length,
                               val_size=0, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    order = list(ResumableSampler(len(dm.train_dataset), seed=args.seed))
    n = args.steps * args.batch_size
    if n > len(order):
        raise SystemExit(f"--steps x --batch-size = {n} exceeds the {len(order)} training examples")
    return dm, order[:n]


def model_name(args: argparse.Namespace) -> str:
    """Resolve ``--model``: an asset / folder (``--random-weights``: its architecture, re-initialized), or ``llama-1b``
    (random weights, for GPU MFU)."""
    if args.random_weights and args.model != "llama-1b":
        return random_copy(args.model)
    if args.model != "llama-1b":
        return args.model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftframe.models import resolve_model

    folder = Path(tempfile.gettempdir()) / "ftframe-bench-llama-1b"
    if not (folder / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(resolve_model(args.tokenizer))
        config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def random_copy(name: str) -> str:
    """A folder with ``name``'s config and tokenizer and freshly initialized weights (seed 0), made once."""
    import hashlib

    from transformers import AutoConfig, AutoModelForCausalLM

    from ftframe.models import load_tokenizer, resolve_model

    source = resolve_model(name)
    folder = Path(tempfile.gettempdir()) / f"ftframe-bench-random-{hashlib.sha256(source.encode()).hexdigest()[:12]}"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(folder)
        load_tokenizer(source).save_pretrained(folder)
    return str(folder)


def job_flops(config: Any, lengths: list[int], supervised: list[int], lora_params: int) -> float:
    """Model FLOPs of one LoRA training pass over examples of the given lengths (no padding, no recomputation).

    Forward: 2 x (frozen linear + LoRA params) per token, causal attention 2 x L^2 x heads x head_dim per layer, and the
    output layer on supervised positions only. Backward: the same again for input gradients (attention: twice), plus
    2 x LoRA params per token for the LoRA weight gradients.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    per_layer = d * heads * head_dim * 2 + d * kv * 2 + d * config.intermediate_size * 3
    linear = per_layer * layers
    tokens, sup = sum(lengths), sum(supervised)
    attention = sum(2 * n * n * heads * head_dim for n in lengths) * layers
    head = 2 * d * config.vocab_size * sup
    forward = 2 * (linear + lora_params) * tokens + attention + head
    backward = 2 * linear * tokens + 2 * attention + head + 4 * lora_params * tokens
    return float(forward + backward)


def matmul_peak(dtype: torch.dtype, device: str, budget_s: float = 3.0) -> float:
    """Best ``dtype`` matmul FLOP/s on ``device`` (square GEMMs), measured within about ``budget_s`` seconds.

    Starts at 512 x 512 and doubles the size while one product takes under a tenth of the budget, so a slow kernel
    (bf16 on an AVX2-only CPU: ~1 GFLOP/s) costs a fraction of a second, not minutes.
    """
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    best, n, spent = 0.0, 512, 0.0
    while True:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        sync()
        t = time.perf_counter()
        a @ b  # warm-up (kernel choice, packing)
        sync()
        one = time.perf_counter() - t
        reps = max(1, min(20, int(budget_s / 4 / max(one, 1e-6))))
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        took = time.perf_counter() - t
        spent += one + took
        best = max(best, 2 * n**3 * reps / took)
        if one > budget_s / 10 or spent > budget_s / 2 or n >= (8192 if device == "cuda" else 2048):
            return best
        n *= 2


#: the dtype each Lightning precision computes its matmuls in
COMPUTE_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                 "16-true": torch.float16}


# ------------------------------------------------------------------------------------------------------- runners
class StepClock:
    """Wall-clock time at the end of every optimizer step, plus per-step (loss, supervised tokens)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ends: list[float] = []
        self.losses: list[tuple[float, int]] = []

    def tick(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def run_ftframe(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl

    from ftframe.device import Trainer
    from ftframe.methods import LoRA
    from ftframe.optim import OptimizerSettings
    from ftframe.tasks import CausalLM

    dm, order = job_examples(args)
    dm.packing = overrides.pop("data.packing", True)
    task_opts = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("task.")}
    model_opts = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
    if len(task_opts) + len(model_opts) != len(overrides):
        raise SystemExit(f"--set keys must start with data., task. or model.: {sorted(overrides)}")
    clock = StepClock(args.device)

    class Fixed(pl.LightningDataModule):
        """The job's examples in the job's order, through the data module's own collator."""

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(torch.utils.data.Subset(dm.train_dataset, order),
                                               batch_size=args.batch_size, shuffle=False, collate_fn=dm._collator())

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # noqa: ANN001
            clock.tick()
            n = int((batch["labels"][:, 1:] != -100).sum())
            clock.losses.append((float(outputs["loss"]), n))

    # everything not named by --set is ftframe's default, precision included (auto: resolved from the device)
    optim_opts = {k.split(".", 1)[1]: model_opts.pop(k) for k in list(model_opts) if k.startswith("optimizer.")}
    module = LoRA(model_name=args.model_name, task=CausalLM(**task_opts), r=16, alpha=32, dropout=0.0,
                  optimizer=OptimizerSettings(learning_rate=args.lr, lr_schedule="constant", warmup_steps=0,
                                              **optim_opts), **model_opts)
    pl.seed_everything(args.seed, verbose=False)
    trainer = Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
                      max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      callbacks=[Clock()])
    trainer.fit(module, datamodule=Fixed())
    return summarize(args, clock, dm, order, module.model)


def run_hf(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from ftframe.models import load_tokenizer, resolve_model

    dm, order = job_examples(args)
    clock = StepClock(args.device)
    tok = load_tokenizer(args.model_name)
    data = [{"input_ids": dm.train_dataset.input_ids[i].tolist(), "labels": dm.train_dataset.labels[i].tolist()}
            for i in order]
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model_name), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.tick()

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            value = loss[0] if isinstance(loss, tuple) else loss
            clock.losses.append((float(value), int((inputs["labels"][:, 1:] != -100).sum())))
            return loss

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                  lr_scheduler_type="constant", max_steps=args.steps, bf16=bf16, seed=args.seed,
                                  use_cpu=args.device == "cpu", save_strategy="no", report_to=[], logging_steps=10**6,
                                  disable_tqdm=True, remove_unused_columns=False,
                                  train_sampling_strategy="sequential")
        trainer = Recording(model=model, args=targs, train_dataset=data, callbacks=[Clock()],
                            data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        trainer.train()
    return summarize(args, clock, dm, order, model)


def summarize(args: argparse.Namespace, clock: StepClock, dm: Any, order: list[int], model: Any) -> dict[str, Any]:
    lengths = [len(dm.train_dataset.input_ids[i]) for i in order]
    sup = [int((dm.train_dataset.labels[i][1:] != -100).sum()) for i in order]
    bs, w = args.batch_size, args.warmup
    if len(clock.ends) != args.steps:
        raise RuntimeError(f"expected {args.steps} optimizer steps, timed {len(clock.ends)}")
    timed = slice(w * bs, args.steps * bs)
    seconds = clock.ends[-1] - clock.ends[w - 1]
    tokens = sum(lengths[timed])
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    flops = job_flops(config, lengths[timed], sup[timed], lora)
    total_loss = sum(loss * n for loss, n in clock.losses)
    return {
        "tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / (args.steps - w),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        "loss_per_token": total_loss / sum(n for _, n in clock.losses),
        "flops_per_s": flops / seconds,
        "step_losses": [round(loss, 5) for loss, _ in clock.losses],
    }


# ---------------------------------------------------------------------------------------------------------- main
def runners(args: argparse.Namespace, fast_bf16: bool) -> dict[str, list[str]]:
    """Runner name -> extra worker arguments (``hf-bf16`` only where bf16 is fast, or when asked for by ``--only``)."""
    out = {"ftframe": [], "hf-fp32": []}
    if fast_bf16 or "hf-bf16" in (args.only or "").split(","):
        out["hf-bf16"] = []
    if args.ablate:
        for lever, (key, off) in LEVERS.items():
            out[f"ftframe -{lever}"] = ["--set", f"{key}={json.dumps(off)}"]
    for extra in args.variant:
        name, _, sets = extra.partition(":")
        out[name] = [a for s in sets.split(",") if s for a in ("--set", s)]
    return out


def worker(args: argparse.Namespace) -> None:
    args.model_name = model_name(args)
    if args.worker == "ftframe":
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        result = run_ftframe(args, overrides)
    else:
        result = run_hf(args, bf16=args.worker == "hf-bf16")
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from timing (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; each runner runs once per round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model asset/folder, or llama-1b (1B-class Llama with random weights)")
    p.add_argument("--ablate", action="store_true", help="also run ftframe with each speed lever switched off")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=JSON,...",
                   help='an extra ftframe runner, e.g. "compiled:model.compile=true"')
    p.add_argument("--only", default=None, help="comma-separated runner names to run (default: all)")
    p.add_argument("--precision", default="auto",
                   help="ftframe runners' precision (default auto: resolved from the device, as ftframe fit does)")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--docs", default=None, help="write the table into this Markdown file (e.g. docs/performance.md), "
                   "between <!-- benchmark:SECTION --> and <!-- /benchmark:SECTION -->")
    p.add_argument("--section", default=None, help="the block name for --docs (default: DEVICE-PRECISION, e.g. cpu-32-true)")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct", help="llama-1b's tokenizer (asset or folder)")
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture with random weights (for a GPU machine without the weights; speed "
                        "and memory are the model's, the loss is not)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup < 1 or args.warmup >= args.steps:
        p.error("--warmup must be >= 1 and < --steps")
    if args.worker:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to PyTorch here")

    from ftframe import PROCESS_DEFAULTS
    from ftframe.device import plan_for

    plan = plan_for(args.precision, args.device)
    fast_bf16 = plan_for("auto", args.device).precision == "bf16-mixed"  # what the device resolution says of bf16
    table = runners(args, fast_bf16)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    if not fast_bf16 and "hf-bf16" not in table:
        print("hf-bf16 not run: bfloat16 is slow on this device (--only hf-bf16 runs it anyway)", flush=True)
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
              "--max-length", str(args.max_length), "--lr", str(args.lr), "--seed", str(args.seed),
              "--device", args.device, "--model", args.model, "--precision", args.precision,
              "--tokenizer", args.tokenizer, *(["--random-weights"] if args.random_weights else [])]
    # the assets, once (a machine without network access must have them in its cache already)
    from ftframe.assets import is_downloaded

    wanted = [n for n in ("smollm2-135m-instruct", "gsm8k") if not is_downloaded(n)
              and (n == "gsm8k" or args.model == "smollm2-135m-instruct")]
    if wanted:
        subprocess.run([sys.executable, "-m", "ftframe", "download", "--names", json.dumps(wanted)], check=True)
    print(f"device: {plan.name}; CPU capability {torch.backends.cpu.get_cpu_capability()}; ftframe precision "
          f"{plan.precision} ({plan.reason})", flush=True)
    precision = {name: ("bf16-mixed" if name == "hf-bf16" else "32-true" if name == "hf-fp32" else plan.precision)
                 for name in table}
    dtypes = sorted({COMPUTE_DTYPE.get(p, torch.float32) for p in precision.values()}, key=str)
    peaks = {dtype: matmul_peak(dtype, args.device) for dtype in dtypes}
    for dtype, value in peaks.items():
        print(f"{str(dtype).removeprefix('torch.')} matmul peak on this machine: {value / 1e9:,.1f} GFLOP/s", flush=True)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in table}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    for r in range(args.rounds):
        # odd rounds run the runners in reverse, so no runner always goes first (the first run of a round is often
        # a little slower) and drift during a round hits every runner alike
        for name, extra in (list(table.items()) if r % 2 == 0 else list(table.items())[::-1]):
            kind = "ftframe" if name.startswith("ftframe") or name not in ("hf-fp32", "hf-bf16") else name
            run_env, sets = dict(env), []
            if kind == "ftframe":  # what the ftframe command sets for itself
                run_env.update({k: v for k, v in PROCESS_DEFAULTS.items() if k not in os.environ})
            for flag, value in zip(extra[::2], extra[1::2], strict=True):
                key, _, raw = value.partition("=")
                if key.startswith("env."):
                    run_env[key[4:]] = str(json.loads(raw))
                else:
                    sets += [flag, value]
            cmd = [sys.executable, __file__, "--worker", kind, *common, *sets]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"runner {name!r} failed (exit {proc.returncode})")
            res = json.loads(lines[-1][len("RESULT "):])
            res["precision"] = precision[name]
            res["mfu"] = res["flops_per_s"] / peaks[COMPUTE_DTYPE.get(precision[name], torch.float32)]
            results[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name:<26} {res['tokens_per_s']:8.1f} tok/s  "
                  f"{res['peak_rss_gb']:5.2f} GB  loss {res['loss_per_token']:.4f}  MFU {100 * res['mfu']:4.1f}%  "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    report(args, plan, {str(k).removeprefix("torch."): v for k, v in peaks.items()}, results)


def report(args: argparse.Namespace, plan: Any, peaks: dict[str, float], results: dict[str, list[dict[str, Any]]]) -> None:
    from ftframe.device import simulated_cpu

    mem = "peak_gpu_gb" if args.device == "cuda" else "peak_rss_gb"  # on a GPU the device memory is what limits
    med = {k: {f: statistics.median(r[f] for r in runs) for f in ("tokens_per_s", mem, "loss_per_token", "mfu",
                                                                  "seconds_per_step")}
           for k, runs in results.items() if runs}
    hf = [k for k in ("hf-fp32", "hf-bf16") if k in med]
    base = max(hf, key=lambda k: med[k]["tokens_per_s"]) if hf else None
    label = "peak GPU GB" if mem == "peak_gpu_gb" else "peak RSS GB"
    peak_text = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items())
    lines = [f"{time.strftime('%Y-%m-%d')}, {plan.name}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
             f"{' (simulated: ' + simulated_cpu() + ')' if simulated_cpu() else ''}; ftframe precision {plan.precision} "
             f"({plan.reason}); matmul peaks measured by the script: {peak_text}. Medians over {args.rounds} "
             f"alternating rounds of {args.steps} steps x {args.batch_size} examples, the first {args.warmup} untimed; "
             f"baseline = {base or 'none'} (the faster HF run). Command: `python benchmarks/train_throughput.py "
             f"{' '.join(sys.argv[1:])}`", "",
             f"| runner | precision | useful tok/s | s/step | {label} | loss/token | MFU | tok/s ratio | memory ratio | "
             "loss diff |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in med.items():
        if base:
            b = med[base]
            ratios = (f"{m['tokens_per_s'] / b['tokens_per_s']:.2f}x | {m[mem] / b[mem]:.2f}x | "
                      f"{100 * (m['loss_per_token'] / b['loss_per_token'] - 1):+.2f}%")
        else:
            ratios = "- | - | -"
        name = f"**{k}**" if k == "ftframe" else f"{k} (baseline)" if k == base else k
        lines.append(f"| {name} | {results[k][0]['precision']} | {m['tokens_per_s']:.1f} | {m['seconds_per_step']:.2f} | "
                     f"{m[mem]:.2f} | {m['loss_per_token']:.4f} | {100 * m['mfu']:.1f}% | {ratios} |")
    print("\n" + "\n".join(lines))
    if args.docs:
        write_section(Path(args.docs), args.section or f"{args.device}-{plan.precision}",
                      lines)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": plan.as_dict(),
                                               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                               "matmul_peak_flops": peaks, "baseline": base, "medians": med,
                                               "runs": results}, indent=1))
        print(f"\nwrote {args.json}")


def write_section(path: Path, name: str, lines: list[str]) -> None:
    """Replace the block between ``<!-- benchmark:NAME -->`` and ``<!-- /benchmark:NAME -->`` in ``path``."""
    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"--docs {path}: no {start} ... {end} block to replace; add one where the table goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail, encoding="utf-8")
    print(f"wrote the {name} table into {path}")


if __name__ == "__main__":
    main()
