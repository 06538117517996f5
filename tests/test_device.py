"""precision: auto -- the resolution table (CPU capability and CUDA faked), warnings on slow explicit choices, the
probe, the record in ftframe.json, when_precision, and that every shipped config leaves the choice to the device."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import ftframe.device as device
from ftframe.cli import FTFrameCLI, main
from ftframe.errors import UserError
from tests.helpers import tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu(monkeypatch):
    """Fake the CPU's measured bfloat16 / float16 speed (relative to float32); no CUDA."""
    monkeypatch.delenv(device.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    speeds: dict[torch.dtype, float] = {}

    def fake(dtype=torch.bfloat16):
        return speeds[dtype]

    monkeypatch.setattr(device, "cpu_matmul_speed", fake)
    return speeds


@pytest.fixture
def cuda(monkeypatch):
    """Fake a visible CUDA GPU; returns a dict whose ``bf16`` entry says whether it supports bfloat16."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0) if state["bf16"] else (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    return state


@pytest.mark.parametrize(("bf16_speed", "expected"), [(2.5, "bf16-mixed"), (1.3, "bf16-mixed"), (0.9, "32-true"),
                                                       (0.4, "32-true"), (0.017, "32-true")])
def test_cpu_resolution_follows_the_measured_bf16_speed(cpu, bf16_speed, expected):
    cpu[torch.bfloat16] = bf16_speed
    plan = device.plan_for("auto", "cpu")
    assert plan.device == "cpu" and plan.precision == expected and plan.requested == "auto"
    assert plan.bf16_speed == pytest.approx(bf16_speed)
    assert plan.inference_dtype == "float32" and plan.warning is None
    assert ("as fast as" if expected == "bf16-mixed" else "slower than") in plan.reason


@pytest.mark.parametrize(("bf16", "expected", "inference"), [(True, "bf16-mixed", "bfloat16"),
                                                            (False, "16-mixed", "float16")])
def test_cuda_resolution_follows_bf16_support(cuda, bf16, expected, inference):
    cuda["bf16"] = bf16
    for accelerator in ("gpu", "cuda", "auto"):
        plan = device.plan_for("auto", accelerator)
        assert (plan.device, plan.precision, plan.inference_dtype) == ("cuda", expected, inference)
        assert "Fake GPU" in plan.name
    assert device.inference_dtype("auto", "cuda") == inference


def test_accelerator_cpu_wins_over_a_visible_gpu(cuda, monkeypatch):
    monkeypatch.setenv(device.CPU_BF16_ENV, "slow")
    assert device.plan_for("auto", "cpu").precision == "32-true"


def test_a_slow_explicit_choice_wins_with_a_warning_naming_the_measured_factor(cpu):
    cpu[torch.bfloat16] = 1 / 58
    plan = device.plan_for("bf16-mixed", "cpu")
    assert plan.precision == "bf16-mixed" and plan.requested == "bf16-mixed"
    assert "58x slower" in plan.warning and "auto picks 32-true" in plan.warning
    cpu[torch.float16] = 1 / 40
    plan = device.plan_for("16-mixed", "cpu")
    assert plan.precision == "16-mixed" and "40x slower" in plan.warning
    assert device.plan_for("32-true", "cpu").warning is None  # the fast choice here: nothing to say
    assert device.plan_for("32", "cpu").precision == "32-true"  # Lightning's aliases are understood


def test_float32_on_a_fast_bf16_cpu_is_warned_about(cpu):
    cpu[torch.bfloat16] = 2.5
    plan = device.plan_for("32-true", "cpu")
    assert plan.precision == "32-true" and "2.5x as fast" in plan.warning
    assert device.plan_for("bf16-mixed", "cpu").warning is None


def test_float32_on_a_gpu_is_warned_about(cuda):
    plan = device.plan_for("32-true", "gpu")
    assert plan.precision == "32-true" and "bf16-mixed" in plan.warning


def test_the_environment_declares_the_cpu_instead_of_the_probe(cpu, monkeypatch):
    cpu[torch.bfloat16] = 2.5  # would say fast; the declaration wins and nothing is probed
    monkeypatch.setenv(device.CPU_BF16_ENV, "slow")
    plan = device.plan_for("auto", "cpu")
    assert plan.precision == "32-true" and device.CPU_BF16_ENV in plan.reason and plan.bf16_speed is None
    monkeypatch.setenv(device.CPU_BF16_ENV, "fast")
    assert device.plan_for("auto", "cpu").precision == "bf16-mixed"
    monkeypatch.setenv(device.CPU_BF16_ENV, "quick")
    with pytest.raises(UserError, match=r"FTFRAME_CPU_BF16='quick': expected fast, slow"):
        device.plan_for("auto", "cpu")


def test_the_probe_measures_this_cpu_and_is_cached():
    device.cpu_matmul_speed.cache_clear()
    speed = device.cpu_matmul_speed(torch.bfloat16)
    assert speed > 0 and device.cpu_matmul_speed(torch.bfloat16) == speed  # one measurement per process
    assert device.cpu_matmul_speed.cache_info().hits >= 1


def test_inference_dtype_auto_is_float32_on_a_cpu_and_a_slow_16_bit_choice_is_warned_about(cpu):
    cpu[torch.bfloat16] = 0.02
    assert device.inference_dtype("auto", "cpu") == "float32"
    with pytest.warns(UserWarning, match=r"dtype bfloat16 on this CPU: bfloat16 matmuls measured 50x slower"):
        assert device.inference_dtype("bfloat16", "cpu") == "bfloat16"
    cpu[torch.bfloat16] = 2.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.inference_dtype("bfloat16", "cpu") == "bfloat16"


def test_ftframe_trainer_resolves_auto_and_keeps_the_plan(cpu):
    cpu[torch.bfloat16] = 0.02
    trainer = device.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.precision == "32-true" and trainer.device_plan.precision == "32-true"
    cpu[torch.bfloat16] = 2.5
    trainer = device.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert trainer.precision == "bf16-mixed"
    with pytest.warns(UserWarning, match="precision 32-true on a CPU with fast bfloat16"):
        trainer = device.Trainer(accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False)
    assert trainer.precision == "32-true"


def test_fit_prints_the_choice_and_records_it_in_ftframe_json(tiny_model, tiny_data, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    main(tiny_fit_args(tiny_model, tiny_data, tmp_path, adapter))  # FTFRAME_CPU_BF16=slow (conftest): 32-true
    assert "precision 32-true (FTFRAME_CPU_BF16=slow" in capsys.readouterr().out
    record = json.loads((adapter / "ftframe.json").read_text())["device"]
    assert record["precision"] == "32-true" and record["requested"] == "auto" and record["device"] == "cpu"
    assert "FTFRAME_CPU_BF16=slow" in record["reason"]


def test_frozen_weights_and_qlora_compute_follow_the_resolved_precision(tiny_model, monkeypatch):
    from ftframe.methods import QLoRA

    for declared, precision, compute in (("slow", "32-true", "float32"), ("fast", "bf16-mixed", "bfloat16")):
        monkeypatch.setenv(device.CPU_BF16_ENV, declared)
        cli = FTFrameCLI(args=["--model", "QLoRA", f"--model.model_name={tiny_model}", "--trainer.accelerator=cpu",
                               "--data.train_files=x.jsonl"], run=False)
        assert cli.trainer.precision == precision
        module = cli.model
        module._trainer = cli.trainer
        assert isinstance(module, QLoRA) and module.resolved_compute_dtype() == compute
        assert module.quantization_config().bnb_4bit_compute_dtype == getattr(torch, compute)


def test_when_precision_applies_the_settings_of_the_resolved_precision(tiny_model, monkeypatch, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("when_precision:\n  32-true:\n    trainer.max_steps: 7\n    data.init_args.max_length: 96\n"
                      "  bf16-mixed:\n    trainer.max_steps: 11\n")
    args = ["--config", str(config), f"--model.model_name={tiny_model}", "--trainer.accelerator=cpu",
            "--trainer.max_steps=60", "--data.train_files=x.jsonl"]
    monkeypatch.setenv(device.CPU_BF16_ENV, "slow")
    cli = FTFrameCLI(args=args, run=False)
    assert cli.trainer.max_steps == 60 and cli.datamodule.max_length == 96  # a flag wins over when_precision
    out = capsys.readouterr().out
    assert "precision 32-true: trainer.max_steps = 60 kept (given as a flag; when_precision would set 7)" in out
    assert "precision 32-true: data.init_args.max_length = 96 (was" in out
    without_flag = [a for a in args if not a.startswith("--trainer.max_steps")]
    cli = FTFrameCLI(args=without_flag, run=False)
    assert cli.trainer.max_steps == 7
    assert "precision 32-true: trainer.max_steps = 7 (was -1; from when_precision)" in capsys.readouterr().out
    monkeypatch.setenv(device.CPU_BF16_ENV, "fast")
    cli = FTFrameCLI(args=without_flag, run=False)
    assert cli.trainer.max_steps == 11 and cli.datamodule.max_length != 96


def test_when_precision_names_a_bad_key(tiny_model, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("when_precision:\n  32-true:\n    trainer.max_stepz: 7\n")
    with pytest.raises(UserError, match=r"when_precision.32-true: 'trainer.max_stepz' is not a config key"):
        FTFrameCLI(args=["--config", str(config), f"--model.model_name={tiny_model}", "--data.train_files=x.jsonl"],
                   run=False)
    config.write_text("when_precision:\n  fp32:\n    trainer.max_steps: 7\n")
    with pytest.raises(UserError, match=r"when_precision: \['fp32'\] are not precisions"):
        FTFrameCLI(args=["--config", str(config), f"--model.model_name={tiny_model}", "--data.train_files=x.jsonl"],
                   run=False)


def test_when_precision_reaches_a_callback_by_class_name(tiny_model, monkeypatch, tmp_path, capsys):
    from ftframe.callbacks import ForgettingMonitor

    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: ftframe.callbacks.ForgettingMonitor\n"
                      "      init_args: {probe_size: 80}\n    - class_path: ftframe.callbacks.AdapterCheckpoint\n"
                      "when_precision:\n  32-true:\n    trainer.callbacks.ForgettingMonitor.probe_size: 30\n"
                      "    trainer.callbacks.ForgettingMonitor.reference_windows: 3\n")
    args = ["--config", str(config), f"--model.model_name={tiny_model}", "--trainer.accelerator=cpu",
            "--data.train_files=x.jsonl"]
    monkeypatch.setenv(device.CPU_BF16_ENV, "slow")
    cli = FTFrameCLI(args=args, run=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ForgettingMonitor)]
    assert (monitor.probe_size, monitor.reference_windows) == (30, 3)
    out = capsys.readouterr().out
    assert "trainer.callbacks.ForgettingMonitor.probe_size = 30 (was 80" in out
    assert "reference_windows = 3 (was 8" in out
    monkeypatch.setenv(device.CPU_BF16_ENV, "fast")
    (monitor,) = [c for c in FTFrameCLI(args=args, run=False).trainer.callbacks if isinstance(c, ForgettingMonitor)]
    assert monitor.probe_size == 80
    monkeypatch.setenv(device.CPU_BF16_ENV, "slow")
    for bad, message in (("trainer.callbacks.ForgettingMonitor.probe_sise", "ForgettingMonitor has no argument "
                          "'probe_sise'"), ("trainer.callbacks.EarlyStopping.patience", "holds no such class")):
        config.write_text("trainer:\n  callbacks:\n    - class_path: ftframe.callbacks.ForgettingMonitor\n"
                          f"when_precision:\n  32-true:\n    {bad}: 1\n")
        with pytest.raises(UserError, match=message):
            FTFrameCLI(args=args, run=False)


TRAINING_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "eval")


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in TRAINING_CONFIGS])
def test_every_shipped_config_leaves_precision_to_the_device(path):
    config = yaml.safe_load(path.read_text()) or {}
    trainer = config.get("trainer") or {}
    if "model" in config and "data" in config:  # a complete run (not a diff): it says auto, for readers
        assert trainer.get("precision") == "auto", f"{path}: a run config must set trainer.precision: auto"
    if "precision" in trainer:
        assert trainer["precision"] == "auto", f"{path}: trainer.precision {trainer['precision']!r}; use auto"
    init = (config.get("model") or {}).get("init_args") or {}
    for key in ("compute_dtype", "frozen_dtype", "dtype"):
        assert init.get(key, "auto") in ("auto", "float32"), f"{path}: model.{key} hard-codes {init[key]!r}"
    for values in (config.get("when_precision") or {}).values():
        assert "trainer.precision" not in values, f"{path}: when_precision must not change the precision itself"
