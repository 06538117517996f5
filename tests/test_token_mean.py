"""One optimizer step, one token mean: the loss of a step is the mean over all its supervised tokens, however the step
is split into micro-batches (gradient accumulation) and processes (DDP).

On data whose responses differ in length -- a crafted set alternating 1-word and 100-word answers, and real GSM8K
problems -- 1 process x batch 4, 1 process x 2 accumulated batches of 2, 2 processes x batch 2 and 2 processes x 2
accumulated batches of 1 see the same 4 examples in each step and must give the same logged loss and the same
gradients (float32), padded and packed (tests/token_mean_job.py trains and records them).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.helpers import WORDS, fit_command, real_assets_available, run_cli, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
#: (processes, examples per micro-batch, micro-batches per step): 4 examples per step in every split
SPLITS = [(1, 4, 1), (1, 2, 2), (2, 2, 1), (2, 1, 2)]
REL = 1e-5  # float32: the same sums in another order

pytestmark = pytest.mark.distributed


def crafted_records(n: int = 16) -> list[dict[str, str]]:
    """Answers of 1 word and of 100 words, alternating."""
    return [{"prompt": f"Count from {WORDS[i % 10]}.",
             "completion": WORDS[i % 10] if i % 2 == 0 else " ".join(WORDS[(i + j) % 10] for j in range(100))}
            for i in range(n)]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("uneven")
    files = [write_jsonl(folder / "crafted.jsonl", crafted_records())]
    if real_assets_available():  # .ci/run downloads them; the crafted set alone runs without
        from ftframe import assets

        lines = assets.asset_path("gsm8k").read_text(encoding="utf-8").splitlines()[:16]
        files.append(write_jsonl(folder / "gsm8k.jsonl", [json.loads(line) for line in lines]))
    return files


@pytest.fixture(scope="module")
def runs(tiny_model, uneven, tmp_path_factory) -> dict[tuple[int, int, int], Path]:
    out = tmp_path_factory.mktemp("token-mean")
    folders = {}
    for split in SPLITS:
        folders[split] = out / "-".join(map(str, split))
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "token_mean_job.py"), str(folders[split]),
                               tiny_model, *map(str, split), str(STEPS), *uneven],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return folders


def _cases(uneven: list[str]) -> list[str]:
    return [f"{Path(f).stem}-{mode}" for f in uneven for mode in ("padded", "packed")]


def test_every_split_of_a_step_gives_the_same_loss_and_gradients(runs, uneven):
    reference = runs[SPLITS[0]]
    for case in _cases(uneven):
        want = json.loads((reference / case / "steps.json").read_text())
        want_grads = load_file(str(reference / case / "grads.safetensors"))
        assert len(want) == STEPS and len(want_grads) > 0
        for split in SPLITS[1:]:
            got = json.loads((runs[split] / case / "steps.json").read_text())
            assert [s["ids"] for s in got] == [s["ids"] for s in want], (case, split)  # the same examples per step
            assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in want], rel=REL), (case, split)
            grads = load_file(str(runs[split] / case / "grads.safetensors"))
            assert grads.keys() == want_grads.keys(), (case, split)
            for key, g in want_grads.items():
                worst = float((grads[key] - g).abs().max())
                assert worst <= REL * float(g.abs().max()) + 1e-12, (case, split, key, worst)


def test_the_logged_loss_is_the_mean_over_every_supervised_token_of_the_step(runs, uneven, tiny_model, tmp_path):
    """Step 1 starts from the base model (LoRA's B is zero): its logged loss is the base model's cross-entropy summed
    over the step's supervised tokens and divided by their number -- not the mean of per-example means."""
    from transformers import AutoModelForCausalLM

    from ftframe.data import InstructionDataModule

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for data in uneven:
        step = json.loads((runs[SPLITS[0]] / f"{Path(data).stem}-padded" / "steps.json").read_text())[0]
        dm = InstructionDataModule(train_files=data, tokenizer=tiny_model, val_size=0, max_length=256, seed=3,
                                   cache_dir=str(tmp_path / "cache"))
        dm.setup("fit")
        sums, counts = [], []
        with torch.no_grad():
            for i in step["ids"]:
                item = dm.train_dataset[i]
                logits = model(input_ids=item["input_ids"][None]).logits[0, :-1]
                targets = item["labels"][1:]
                keep = targets != -100
                sums.append(float(F.cross_entropy(logits[keep], targets[keep], reduction="sum")))
                counts.append(int(keep.sum()))
        token_mean = sum(sums) / sum(counts)
        assert step["loss"] == pytest.approx(token_mean, rel=REL)
        for split in SPLITS:  # train/tokens: the whole step's, however it is split over micro-batches and processes
            first = json.loads((runs[split] / f"{Path(data).stem}-padded" / "steps.json").read_text())[0]
            assert first["tokens"] == sum(counts), (split, first["tokens"], sum(counts))
        assert max(counts) > 2 * min(counts), counts  # the step's examples really differ in length
        example_mean = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(counts)
        assert abs(example_mean - token_mean) > 1e-3 * token_mean  # so weighing examples equally would differ


def test_a_kill_halfway_through_an_accumulated_step_resumes_bit_identically(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "crafted.jsonl", crafted_records(40))
    extra = ["--trainer.accumulate_grad_batches=2", "--data.batch_size=2", "--model.dropout=0.0"]
    full = run_cli(fit_command(tiny_model, data, tmp_path / "full", *extra, steps=8))
    assert full.returncode == 0, full.stderr[-3000:]
    # micro-batches 2k and 2k + 1 make step k + 1; an even micro-batch is the first half of its step
    kill_at = 2 * random.Random().randrange(2, 7)
    crashed = run_cli([*fit_command(tiny_model, data, tmp_path / "crash", *extra, steps=8),
                       "--trainer.callbacks+=tests.probes.KillAtBatch", f"--trainer.callbacks.batch={kill_at}"])
    assert crashed.returncode == -9, (kill_at, crashed.stderr[-3000:])
    last = tmp_path / "crash" / "checkpoints" / "last"
    assert last.resolve().name == f"step={kill_at // 2 // 2 * 2:06d}", (kill_at, last.resolve())
    resumed = run_cli([*fit_command(tiny_model, data, tmp_path / "crash", *extra, steps=8), f"--ckpt_path={last}"])
    assert resumed.returncode == 0, (kill_at, resumed.stderr[-3000:])
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), (kill_at, key, (a[key] - b[key]).abs().max())


def test_step_windows_count_the_tokens_of_each_step_and_regroup_after_mixing():
    from ftframe.data.collate import StepWindows, unwrap_windows
    from ftframe.packing import STEP_TOKENS

    def batch(tokens: int) -> dict[str, torch.Tensor]:
        labels = torch.full((1, 8), -100)
        labels[0, 8 - tokens:] = 1
        return {"labels": labels}

    loader = [batch(t) for t in (1, 7, 2, 3, 4)]
    windows = StepWindows(loader, accumulate=2)
    assert len(windows) == 5 and unwrap_windows(windows) is loader
    # every batch's labels end with its t targets (none at position 0, which no token predicts)
    assert [int(b[STEP_TOKENS]) for b in windows] == [1 + 7, 1 + 7, 2 + 3, 2 + 3, 4]  # the last step is short
    classification = [{"labels": torch.tensor([0, 1])}]
    assert STEP_TOKENS not in next(iter(StepWindows(classification, 2)))
