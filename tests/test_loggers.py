"""Metrics on disk as they happen: the shipped TensorBoard example next to the CSV logger, on a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from ftframe.cli import main
from tests.helpers import ROOT

EXAMPLE = ROOT / "configs" / "loggers" / "tensorboard.yaml"


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_the_tensorboard_example_logs_training_validation_and_forgetting(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    config = yaml.safe_load(EXAMPLE.read_text())
    for logger in config["trainer"]["logger"]:  # the example, pointed at this test's folder
        logger["init_args"]["save_dir"] = str(run)
    composed = tmp_path / "loggers.yaml"
    composed.write_text(yaml.safe_dump(config))
    reference = tmp_path / "reference.txt"
    reference.write_text(" ".join(f"The river number {i} runs past the old mill and the quiet town." for i in range(40)))
    main(["fit", "--config", str(composed), f"--model.model_name={tiny_model}", f"--data.train_files={tiny_data}",
          f"--data.cache_dir={tmp_path / 'tok'}", "--data.val_size=8", "--data.batch_size=4", "--trainer.max_steps=6",
          "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=3",
          "--trainer.check_val_every_n_epoch=null", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={run}", "--seed_everything=5",
          "--trainer.callbacks+=ftframe.callbacks.ForgettingMonitor", f"--trainer.callbacks.reference={reference}",
          "--trainer.callbacks.reference_windows=3", "--trainer.callbacks.window_tokens=32",
          "--trainer.callbacks.probe=null"])
    scalars = _scalars(run / "tensorboard")
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == sorted(steps) and len(steps) >= 5 and max(steps) >= 5  # every step (log_every_n_steps: 1)
    val_steps = [s for s, _ in scalars["val/loss"]]
    assert len(val_steps) == 2 and val_steps[1] - val_steps[0] == 3  # validation after steps 3 and 6
    forgetting = {tag for tag in scalars if tag.startswith("forgetting/")}
    assert {"forgetting/ref_nll", "forgetting/ref_ppl", "forgetting/kl", "forgetting/seconds"} <= forgetting
    assert {s for s, _ in scalars["forgetting/ref_nll"]} >= {0, 3, 6}  # baseline and after each validation
    assert all(math.isfinite(v) for values in scalars.values() for _, v in values)
    csv = (run / "metrics.csv").read_text().splitlines()  # the CSV logger of the same run, still first
    assert "train/loss" in csv[0] and "val/loss" in csv[0] and len(csv) > 6
