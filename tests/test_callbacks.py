"""The callbacks of issue 6: forgetting monitor, adapter checkpoints (atomic, exact resume), early stopping under DDP.

Crash tests run ``ftframe fit`` in a subprocess and SIGKILL it (tests/probes.py), so nothing in the process gets a
chance to clean up, exactly as after an OOM kill or a lost node.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from safetensors.torch import load_file

from ftframe.callbacks import AdapterCheckpoint, ForgettingMonitor
from ftframe.callbacks.adapter_checkpoint import resolve_resume_path
from ftframe.data import InstructionDataModule
from ftframe.errors import UserError
from ftframe.methods import BottleneckAdapters, FullFineTune, LoRA
from ftframe.optim import OptimizerSettings
from tests.helpers import fit_command as _fit_cmd
from tests.helpers import real_assets_available, tiny_trainer
from tests.helpers import run_cli as _run

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "Hello there, how are you? The capital of France is Paris. "


@pytest.fixture(scope="session")
def knowing_model(tiny_model, tmp_path_factory) -> str:
    """The tiny Llama after a little full training on the reference sentences: a base with something to forget."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("knowing") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[tok.bos_token_id, *tok.encode(REFERENCE * 6)]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def reference_and_probe(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("forgetting")
    ref = folder / "reference.txt"
    ref.write_text(REFERENCE * 20, encoding="utf-8")
    probe = folder / "probe.jsonl"
    probe.write_text("".join(json.dumps({"question": f"What is {a} plus {b}?", "label": 0,
                                         "choices": [str(a + b), str(a + b + 1), str(a + b + 2)]}) + "\n"
                             for a in range(4) for b in range(3)), encoding="utf-8")
    return str(ref), str(probe)


def _monitor(reference_and_probe, **kwargs) -> ForgettingMonitor:
    ref, probe = reference_and_probe
    defaults = dict(reference=ref, reference_windows=4, window_tokens=32, probe=probe, probe_size=12)
    defaults.update(kwargs)
    return ForgettingMonitor(**defaults)


def _fit(module, tiny_data, cache_dir, tmp_path, callbacks, max_steps=12, val_every=3, **trainer_kwargs):
    data = InstructionDataModule(train_files=tiny_data, tokenizer=module.model_name, val_size=8, batch_size=4,
                                 cache_dir=cache_dir)
    trainer = tiny_trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, val_check_interval=val_every,
                           limit_val_batches=None, check_val_every_n_epoch=None, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return trainer


# ---------------------------------------------------------------------------------------------------- forgetting
def test_harmful_lr_is_stopped_by_the_budget_and_gentle_lr_is_not(knowing_model, tiny_data, cache_dir, tmp_path,
                                                                   reference_and_probe):
    results = {}
    for name, lr in (("harmful", 0.05), ("gentle", 3e-4)):
        seed_everything(1)
        monitor = _monitor(reference_and_probe, max_ppl_increase=0.5, on_budget="stop")
        module = LoRA(model_name=knowing_model, r=4, dropout=0.0, optimizer=OptimizerSettings(learning_rate=lr, lr_schedule="constant"))
        trainer = _fit(module, tiny_data, cache_dir, tmp_path / name, [monitor], max_steps=24)
        results[name] = (trainer, monitor)
    harmful, monitor = results["harmful"]
    assert harmful.global_step < 24, "the drift should have stopped training early"
    over = [r for r in monitor.history if r["over_budget"]]
    assert len(over) == 1 and monitor.history[-1] is over[0]  # stopped at the first measurement over budget
    assert over[0]["ppl_increase"] > 0.5 and all(r["ppl_increase"] <= 0.5 for r in monitor.history[:-1])
    assert float(harmful.callback_metrics["forgetting/over_budget"]) == 1.0
    gentle, monitor = results["gentle"]
    assert gentle.global_step == 24
    assert not any(r["over_budget"] for r in monitor.history)
    assert [r["step"] for r in monitor.history] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    report = json.loads((tmp_path / "gentle" / "forgetting.json").read_text())
    assert report["history"] == json.loads(json.dumps(monitor.history))
    assert report["best_tradeoff"]["step"] in {3, 6, 9, 12, 15, 18, 21, 24}
    png = (tmp_path / "gentle" / "forgetting.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("method, kwargs, kl", [
    (LoRA, {"r": 4, "dropout": 0.0}, "adapters_off"),
    (BottleneckAdapters, {"size": 8}, "adapters_off"),
    (LoRA, {"r": 4, "dropout": 0.0, "init": "pissa"}, "initial_weights"),
    (FullFineTune, {"optimizer": OptimizerSettings(learning_rate=3e-4, lr_schedule="constant")}, "initial_weights"),
], ids=["lora", "bottleneck", "pissa", "full"])
def test_kl_is_zero_before_training_and_grows(method, kwargs, kl, knowing_model, tiny_data, cache_dir, tmp_path,
                                              reference_and_probe):
    seed_everything(2)
    kwargs = {"optimizer": OptimizerSettings(learning_rate=3e-3, lr_schedule="constant"), **kwargs}
    # full fine-tuning copies the whole model for KL only when asked: kl: initial_weights
    monitor = _monitor(reference_and_probe, probe=None, kl="initial_weights" if method is FullFineTune else "auto")
    _fit(method(model_name=knowing_model, **kwargs), tiny_data, cache_dir, tmp_path, [monitor], max_steps=9)
    assert monitor._kl_mode == kl
    kls = [r["kl"] for r in monitor.history]
    assert abs(kls[0]) < 1e-6, kls  # adapters start as the identity: the tuned model is the base
    assert min(kls[1:]) > 1e-5, kls  # and moves away from it once training changes the weights


@pytest.mark.skipif(not real_assets_available(), reason="run `ftframe download` first (CI does)")
@pytest.mark.parametrize("probe", ["winogrande", "benchmark:mmlu"])
def test_any_benchmark_can_be_the_probe(probe, knowing_model, tiny_data, cache_dir, tmp_path, reference_and_probe):
    """A suite benchmark as the probe: its own prompt (Winogrande's partial scoring too) and headline metric; the
    step-0 probe accuracy is the benchmark's score of the untrained model on the same questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftframe.evaluation import score_multiple_choice
    from ftframe.evaluation.benchmarks import benchmark, load_benchmark

    monitor = _monitor(reference_and_probe, probe=probe, probe_size=10, kl="off")
    _fit(LoRA(model_name=knowing_model, r=4, dropout=0.0), tiny_data, cache_dir, tmp_path, [monitor], max_steps=3)
    name = probe.split(":")[-1]
    questions = load_benchmark(name, sample=10)
    assert [q.id for q in monitor._questions] == [q.id for q in questions]
    assert (questions[0].continuation is not None) == (name == "winogrande")
    key = "correct_norm" if benchmark(name).primary == "acc_norm" else "correct"
    base = AutoModelForCausalLM.from_pretrained(knowing_model)
    records = score_multiple_choice(base, AutoTokenizer.from_pretrained(knowing_model), questions, "rendered",
                                    overflow="truncate", progress=False).records
    assert monitor.history[0]["probe_acc"] == pytest.approx(sum(r[key] for r in records) / 10)


def test_full_fine_tuning_skips_kl_unless_the_copy_is_accepted(knowing_model, tiny_data, cache_dir, tmp_path,
                                                                reference_and_probe, caplog):
    monitor = _monitor(reference_and_probe, probe=None)
    _fit(FullFineTune(model_name=knowing_model), tiny_data, cache_dir, tmp_path, [monitor], max_steps=3)
    assert monitor._kl_mode == "off" and "kl" not in monitor.history[0] and "ref_ppl" in monitor.history[0]
    assert "set kl: initial_weights to accept that memory" in caplog.text


def test_best_tradeoff_checkpoint_is_within_budget(knowing_model, tiny_data, cache_dir, tmp_path, reference_and_probe):
    def run(name, **budget):
        seed_everything(3)
        monitor = _monitor(reference_and_probe, on_budget="warn", **budget)
        ckpt = AdapterCheckpoint(dirpath=str(tmp_path / name), monitor="forgetting/tradeoff", mode="min",
                                 save_top_k=1, save_last=False, save_on_train_end=False)
        module = LoRA(model_name=knowing_model, r=4, dropout=0.0, optimizer=OptimizerSettings(learning_rate=1e-3, lr_schedule="constant"))
        _fit(module, tiny_data, cache_dir, tmp_path / name, [monitor, ckpt], max_steps=24, enable_checkpointing=True)
        return monitor

    free = run("free")  # no budget: where does the drift go?
    increases = sorted(r["ppl_increase"] for r in free.history[1:])
    budget = (increases[len(increases) // 2] + increases[len(increases) // 2 - 1]) / 2  # half the steps exceed it
    with pytest.warns(UserWarning, match="forgetting budget exceeded"):
        monitor = run("budget", max_ppl_increase=budget)  # the same training (same seed), now with a budget
    over = [r for r in monitor.history if r["over_budget"]]
    assert over and len(over) < len(monitor.history) - 1
    best = monitor.best()
    assert best is not None and not best["over_budget"] and best["ppl_increase"] <= budget
    assert all(r["tradeoff"] == float("inf") for r in over)
    kept = sorted(p.name for p in (tmp_path / "budget").glob("step=*"))
    assert kept == [f"step={best['step']:06d}"]
    meta = json.loads((tmp_path / "budget" / kept[0] / "ftframe.json").read_text())
    assert meta["score"] == pytest.approx(best["tradeoff"])
    # without the budget the best trade-off may be a step the budget rules out
    assert free.best()["tradeoff"] <= best["tradeoff"]


def test_measuring_does_not_change_training(knowing_model, tiny_data, cache_dir, tmp_path, reference_and_probe):
    weights = []
    for name, callbacks in (("plain", []), ("monitored", [_monitor(reference_and_probe)])):
        seed_everything(6)
        module = LoRA(model_name=knowing_model, r=4, dropout=0.1, optimizer=OptimizerSettings(learning_rate=3e-3))
        _fit(module, tiny_data, cache_dir, tmp_path / name, callbacks, max_steps=9)
        weights.append(module.trainable_state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # no RNG draws, no mode left changed


def test_forgetting_options_are_checked(reference_and_probe):
    with pytest.raises(UserError, match="window_tokens must be >= 2"):
        ForgettingMonitor(window_tokens=1)
    with pytest.raises(UserError, match="max_ppl_increase must be >= 0"):
        ForgettingMonitor(max_ppl_increase=-0.1)
    with pytest.raises(UserError, match="nothing to measure"):
        ForgettingMonitor(reference=None, probe=None)


# ---------------------------------------------------------------------------------------------- adapter checkpoints
def test_checkpoint_folders_load_in_peft_and_hold_resume_state(tiny_model, tiny_data, cache_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed_everything(4)
    ckpt = AdapterCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=2)
    module = LoRA(model_name=tiny_model, r=4, dropout=0.1)
    _fit(module, tiny_data, cache_dir, tmp_path, [ckpt], max_steps=7, val_every=None, enable_checkpointing=True)
    folder = tmp_path / "ckpt"
    # every 2 steps -> 2, 4, 6; the final step 7 is saved too; the 2 most recent are kept
    assert sorted(p.name for p in folder.iterdir()) == ["last", "step=000006", "step=000007"]
    assert (folder / "last").resolve() == (folder / "step=000007").resolve()
    last = folder / "last"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "ftframe.json", "resume.ckpt"):
        assert (last / name).is_file(), name
    meta = json.loads((last / "ftframe.json").read_text())
    assert meta["method"] == "ftframe.methods.lora.LoRA" and meta["model_name"] == tiny_model
    assert meta["global_step"] == 7 and "train/loss" in meta["metrics"] and meta["hparams"]["r"] == 4
    state = torch.load(last / "resume.ckpt", weights_only=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(state["state_dict"]) == trainable  # never the frozen base
    assert state["optimizer_states"] and state["lr_schedulers"] and state["loops"]
    assert state["InstructionDataModule"] == {"epoch": 0, "batches": 7, "examples": 28}  # 7 steps x batch 4
    assert len(state["ftframe_rng_states"]) == 1
    # the folder is a plain peft adapter: same logits as the trained module
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, str(last)).eval()
    ids = AutoTokenizer.from_pretrained(str(last))("What is two plus three?", return_tensors="pt")["input_ids"]
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, module.model(input_ids=ids).logits)
    assert not list(folder.glob(".tmp-*"))


def test_top_k_by_monitored_metric(tiny_model, tiny_data, cache_dir, tmp_path):
    seed_everything(5)
    ckpt = AdapterCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/loss", save_top_k=2, save_last=True)
    module = LoRA(model_name=tiny_model, r=4, dropout=0.0, optimizer=OptimizerSettings(learning_rate=0.05, lr_schedule="constant"))
    trainer = _fit(module, tiny_data, cache_dir, tmp_path, [ckpt], max_steps=12, val_every=2,
                   enable_checkpointing=True)
    scores = {}
    for p in (tmp_path / "ckpt").glob("step=*"):
        scores[p.name] = json.loads((p / "ftframe.json").read_text())["score"]
    ranked = sorted((s, n) for n, s in ckpt.saved.items() if s is not None)
    best_two = {n for _, n in ranked[:2]}
    assert set(scores) == best_two | {"step=000012"}
    assert ckpt.best_model_path.endswith(f"{ranked[0][1]}/resume.ckpt")
    assert float(ckpt.best_model_score) == pytest.approx(min(s for s in scores.values() if s is not None))
    assert trainer.checkpoint_callback is ckpt


class _ValLossAt(Callback):
    """Record ``val/loss`` after every validation of ``fit``, by step."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.at[trainer.global_step] = float(trainer.callback_metrics["val/loss"])


class _LastAt(Callback):
    """Record, as each step begins, where ``last`` points and which checkpoint folders exist."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.at: dict[int, tuple[str, list[str]]] = {}

    def on_train_batch_start(self, trainer, *args) -> None:
        if (self.folder / "last").exists():
            self.at[trainer.global_step] = ((self.folder / "last").resolve().name,
                                            sorted(p.name for p in self.folder.glob("step=*")))


def test_a_step_checkpoint_is_ranked_by_the_validation_of_its_own_step(tiny_model, tiny_data, cache_dir, tmp_path):
    # ModelCheckpoint's top-k with every_n_train_steps: the save at a step that a validation follows waits for that
    # validation, so no step is ranked (or evicts a better one) by the previous validation's loss
    seed_everything(5)
    losses = _ValLossAt()
    ckpt = AdapterCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, monitor="val/loss", save_top_k=2)
    module = LoRA(model_name=tiny_model, r=4, dropout=0.0, optimizer=OptimizerSettings(learning_rate=0.05, lr_schedule="constant"))
    _fit(module, tiny_data, cache_dir, tmp_path, [losses, ckpt], max_steps=12, val_every=2, enable_checkpointing=True)
    kept = {p.name: json.loads((p / "ftframe.json").read_text()) for p in (tmp_path / "ckpt").glob("step=*")}
    best = sorted(losses.at, key=losses.at.get)[:2]
    assert sorted(losses.at) == list(range(2, 13, 2))
    assert set(kept) == {f"step={s:06d}" for s in best} | {"step=000012"}
    for step in best:
        meta = kept[f"step={step:06d}"]
        assert meta["monitor"] == "val/loss" and meta["score"] == pytest.approx(losses.at[step])
        assert meta["metrics"]["val/loss"] == pytest.approx(losses.at[step])  # written after its validation
    assert ckpt.best_model_path.endswith(f"step={best[0]:06d}/resume.ckpt")
    assert ckpt.saved.keys() == {f"step={s:06d}" for s in best}


def test_between_validations_the_newest_step_is_kept_as_the_last(tiny_model, tiny_data, cache_dir, tmp_path):
    # every step is due, validations come every 4: each step is on disk (and `last`) until the next one replaces it,
    # and only the best validated step is kept besides it (save_top_k=1)
    seed_everything(5)
    folder = tmp_path / "ckpt"
    losses, last = _ValLossAt(), _LastAt(folder)
    ckpt = AdapterCheckpoint(dirpath=str(folder), every_n_train_steps=1, monitor="val/loss", save_top_k=1)
    module = LoRA(model_name=tiny_model, r=4, dropout=0.0, optimizer=OptimizerSettings(learning_rate=0.05, lr_schedule="constant"))
    _fit(module, tiny_data, cache_dir, tmp_path, [losses, last, ckpt], max_steps=10, val_every=4,
         enable_checkpointing=True)
    assert sorted(losses.at) == [4, 8]
    assert sorted(last.at) == list(range(1, 10))
    for step, (target, folders) in last.at.items():
        assert target == f"step={step:06d}", (step, target)
        best = [s for s in losses.at if s <= step]
        best = min(best, key=losses.at.get) if best else None
        assert folders == sorted({target} | ({f"step={best:06d}"} if best else set())), (step, folders)
    best = min(losses.at, key=losses.at.get)
    assert sorted(p.name for p in folder.glob("step=*")) == sorted({f"step={best:06d}", "step=000010"})
    assert json.loads((folder / "step=000010" / "ftframe.json").read_text())["score"] is None  # not ranked


def test_ckpt_path_accepts_folders_and_explains_export_folders(tmp_path):
    step = tmp_path / "checkpoints" / "step=000004"
    step.mkdir(parents=True)
    (step / "resume.ckpt").write_bytes(b"x")
    (tmp_path / "checkpoints" / "last").symlink_to("step=000004")
    assert resolve_resume_path(step) == str(step / "resume.ckpt")
    assert resolve_resume_path(tmp_path / "checkpoints") == str(tmp_path / "checkpoints" / "last" / "resume.ckpt")
    assert resolve_resume_path(tmp_path / "checkpoints" / "last") == str(tmp_path / "checkpoints" / "last" /
                                                                        "resume.ckpt")
    export = tmp_path / "adapter"
    export.mkdir()
    (export / "ftframe.json").write_text("{}")
    with pytest.raises(UserError, match="without training state"):
        resolve_resume_path(export)


def test_cli_resumes_from_ckpt_path_last(tiny_model, tiny_data, tmp_path, caplog):
    from ftframe.cli import main

    args = ["fit", f"--model.model_name={tiny_model}", "--model.r=4", f"--data.train_files={tiny_data}",
            f"--data.cache_dir={tmp_path / 'c'}", "--data.val_size=8", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            f"--adapter.dirpath={tmp_path / 'adapter'}", "--trainer.callbacks+=ftframe.callbacks.AdapterCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2"]
    with pytest.raises(SystemExit) as exit_info:  # nothing saved yet: a clear error, not a silent fresh start
        main([*args, "--trainer.max_steps=4", "--ckpt_path=last"])
    assert exit_info.value.code == 2
    main([*args, "--trainer.max_steps=4"])
    assert (tmp_path / "checkpoints" / "last").resolve().name == "step=000004"
    main([*args, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert "Restored all states from the checkpoint" in caplog.text
    assert (tmp_path / "checkpoints" / "last").resolve().name == "step=000006"
    assert json.loads((tmp_path / "adapter" / "ftframe.json").read_text())["global_step"] == 6


def test_checkpoint_options_are_checked():
    with pytest.raises(UserError, match="save_top_k must be >= -1"):
        AdapterCheckpoint(save_top_k=-2)
    with pytest.raises(UserError, match="would never save"):
        AdapterCheckpoint(every_n_train_steps=0, monitor=None, save_on_train_end=False)


# ---------------------------------------------------------------------------------------------- crashes (subprocess)

def _monitor_args(reference_and_probe):
    ref, probe = reference_and_probe
    return ["--trainer.callbacks+=ftframe.callbacks.ForgettingMonitor", f"--trainer.callbacks.reference={ref}",
            "--trainer.callbacks.reference_windows=3", "--trainer.callbacks.window_tokens=32",
            f"--trainer.callbacks.probe={probe}", "--trainer.callbacks.probe_size=12"]


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(knowing_model, tiny_data, tmp_path,
                                                               reference_and_probe):
    # 40 training examples / batch 4 = 10 batches per epoch: 14 steps cross an epoch boundary
    monitor = _monitor_args(reference_and_probe)
    full = _run(_fit_cmd(knowing_model, tiny_data, tmp_path / "full", *monitor, steps=14))
    assert full.returncode == 0, full.stderr[-3000:]
    kill_at = int(os.environ.get("FTFRAME_TEST_KILL_AT", 0)) or random.Random().randrange(3, 14)  # printed on failure
    crashed = _run([*_fit_cmd(knowing_model, tiny_data, tmp_path / "crash", *monitor, steps=14),
                    "--trainer.callbacks+=tests.probes.KillAt", f"--trainer.callbacks.step={kill_at}"])
    assert crashed.returncode == -9, (kill_at, crashed.stderr[-3000:])
    last = (tmp_path / "crash" / "checkpoints" / "last").resolve()
    # checkpoints every 2 steps; KillAt runs before the checkpoint callback of its own step, which is never written
    assert last.name == f"step={(kill_at - 1) // 2 * 2:06d}", (kill_at, last)
    start = time.perf_counter()
    resumed = _run([*_fit_cmd(knowing_model, tiny_data, tmp_path / "crash", *monitor, steps=14),
                    f"--ckpt_path={tmp_path / 'crash' / 'checkpoints' / 'last'}"])
    print(f"killed after step {kill_at}; resumed from {last.name} in {time.perf_counter() - start:.1f}s")
    assert resumed.returncode == 0, (kill_at, resumed.stderr[-3000:])
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), (kill_at, key, (a[key] - b[key]).abs().max())
    # the forgetting monitor resumed too: its history is the uninterrupted one
    h_full = json.loads((tmp_path / "full" / "forgetting.json").read_text())["history"]
    h_crash = json.loads((tmp_path / "crash" / "forgetting.json").read_text())["history"]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in h_full]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in h_crash]


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    crashed = _run([*_fit_cmd(tiny_model, tiny_data, run, steps=8), "--trainer.callbacks+=tests.probes.KillDuringSave",
                    "--trainer.callbacks.step=6"])
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    folder = run / "checkpoints"
    assert (folder / ".tmp-step=000006").is_dir()  # the half-written one, under its temporary name
    assert (folder / "last").resolve().name == "step=000004"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(folder / "last"))
    resumed = _run([*_fit_cmd(tiny_model, tiny_data, run, steps=8), f"--ckpt_path={folder / 'last'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "an incomplete checkpoint from a run that stopped while saving" in resumed.stderr
    assert not list(folder.glob(".tmp-*"))
    assert (folder / "last").resolve().name == "step=000008"


@pytest.mark.distributed
def test_ddp_two_processes_checkpoint_once_agree_on_stopping_and_resume_in_one(knowing_model, tiny_data, tmp_path,
                                                                                 reference_and_probe):
    run = tmp_path / "ddp"
    cmd = [*_fit_cmd(knowing_model, tiny_data, run, steps=20), "--trainer.devices=2", "--trainer.strategy=ddp",
           "--model.optimizer.learning_rate=0.05", "--trainer.val_check_interval=2", *_monitor_args(reference_and_probe),
           "--trainer.callbacks.max_ppl_increase=0.5", "--trainer.callbacks.on_budget=stop",
           "--trainer.callbacks+=tests.probes.RankRecord", f"--trainer.callbacks.folder={run / 'ranks'}"]
    at = cmd.index("--trainer.callbacks.every_n_train_steps=2")  # options apply to the callback added last
    cmd[at:at + 1] = ["--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1"]
    ddp = _run(cmd)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # the forgetting budget stopped both ranks at the same step, from the same (reduced) measurements
    assert ranks[0]["global_step"] == ranks[1]["global_step"] < 20
    assert ranks[0]["should_stop"] and ranks[1]["should_stop"]
    measured = [{k: v for k, v in r["metrics"].items() if k != "forgetting/seconds"} for r in ranks]
    assert measured[0] == measured[1] and measured[0]["forgetting/over_budget"] == 1.0
    stop = ranks[0]["global_step"]
    folder = run / "checkpoints"
    # written once per step by rank 0: one folder per step, nothing half-written, one set of files in each
    assert sorted(p.name for p in folder.glob("step=*")) == [f"step={s:06d}" for s in range(1, stop + 1)]
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob("*.old"))
    state = torch.load(folder / "last" / "resume.ckpt", weights_only=True)
    assert len(state["ftframe_rng_states"]) == 2  # one per rank
    # a DDP checkpoint resumes in a single process
    single = _run([*_fit_cmd(knowing_model, tiny_data, run, steps=stop + 2), f"--ckpt_path={folder / 'last'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert "random states of 2 process(es)" in single.stderr
    assert (folder / "last").resolve().name == f"step={stop + 2:06d}"
