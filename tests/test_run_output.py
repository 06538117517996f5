"""What a run shows: progress lines in a log file, the run summary and summary.json, the help page, a quiet stderr,
and the CSV logger's flush interval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from ftframe.cli import COMMANDS, main
from tests.helpers import ROOT, real_assets_available

#: a progress line: step, loss, learning rate, tok/s, elapsed, ETA, peak memory
LINE = re.compile(r"^\[ftframe\] step (\d+)/(\d+) \(\d+%\) epoch \d+: loss (\d+\.\d+), lr \S+, (\d+) tok/s, "
                  r"elapsed \S+, ETA \S+, peak mem \d+\.\d GB$")
#: how a Python warning (or Lightning's advertising) looks on stderr
WARNING = re.compile(r"\b\w*Warning\b|^\S+\.py:\d+: |💡", re.M)


def _fit(tiny_model, tiny_data, run, *extra, steps):
    return [sys.executable, "-m", "ftframe", "fit", f"--model.model_name={tiny_model}", f"--data.train_files={tiny_data}",
            f"--data.cache_dir={run.parent / 'tok'}", "--data.val_size=8", "--data.batch_size=4",
            f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={run}", "--seed_everything=3", "--validate_before_fit=true",
            "--trainer.enable_model_summary=false", *extra]


def test_a_log_file_sees_progress_lines_while_training_and_the_summary_at_the_end(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    log, err = tmp_path / "run.log", tmp_path / "err.log"
    env = {k: v for k, v in os.environ.items() if k != "FTFRAME_PROGRESS"}  # stdout a file: lines by itself
    interval = 0.5
    with log.open("w") as out, err.open("w") as errors:
        proc = subprocess.Popen(_fit(tiny_model, tiny_data, run, f"--progress_interval={interval}", steps=400),
                                stdout=out, stderr=errors, cwd=ROOT, env=env)
        started = first = None
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            text = log.read_text()
            if started is None and "[ftframe] training from step 0/400" in text:
                started = time.monotonic()
            if started is not None and any(LINE.match(line) for line in text.splitlines()):
                first = time.monotonic()
                break
            time.sleep(0.05)
        assert proc.wait(timeout=300) == 0, err.read_text()[-3000:]
    text = log.read_text()
    assert started is not None and first is not None, text[-3000:]
    assert first - started < interval + 5.0  # seen in the file while training, within an interval (+ start-up)
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    assert len(lines) >= 2, text[-3000:]
    steps = [int(m.group(1)) for m in lines]
    assert steps == sorted(steps) and all(int(m.group(2)) == 400 and int(m.group(4)) > 0 for m in lines)
    assert "\r" not in text  # no redrawn bars in a log
    assert re.search(r"^\[ftframe\] validation at step \d+: val/loss \d+\.\d+", text, re.M)

    # the summary block, and summary.json with the same numbers
    block = text[text.index("[ftframe] run summary"):]
    summary = json.loads((run / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == summary["max_steps"] == 400
    assert summary["method"] == "LoRA" and 0 < summary["trainable_parameters"] < summary["total_parameters"]
    before, after = summary["validation"]["val/loss"]["before"], summary["validation"]["val/loss"]["after"]
    assert f"val/loss     {before:.4f} -> {after:.4f}" in block and after < before
    t = summary["seconds"]
    assert t["training"] > 0 and t["validation"] > 0 and t["wall"] >= t["training"] + t["validation"]
    assert summary["tokens_per_s"] > 0 and f"{summary['tokens_per_s']:.0f} useful tok/s" in block
    assert summary["peak_memory_bytes"] > 10**7
    assert summary["adapter"] and (run / "lightning_logs" / "version_0" / "adapter").is_dir()
    for key in ("trained", "device", "steps", "wall time", "throughput", "peak memory", "adapter", "evaluate"):
        assert f"\n  {key} " in block, block


def test_the_summary_names_the_checkpoints_and_the_resume_command(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(_fit(tiny_model, tiny_data, run, "--trainer.callbacks+=ftframe.callbacks.AdapterCheckpoint",
                               "--trainer.callbacks.every_n_train_steps=2", "--trainer.logger=false", steps=4),
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_checkpoint"].endswith("step=000004") and summary["seconds"]["checkpointing"] > 0
    assert summary["resume"] == f"ftframe fit --config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints' / 'last'}"
    assert f"  resume       {summary['resume']}" in proc.stdout


def test_help_lists_every_command(capsys):
    from ftframe.__main__ import COMMANDS as LAYER_ABOVE
    from ftframe.cli import _tools

    every = {"fit", "validate", "test", "predict", "inspect-data"} | set(_tools()) | set(LAYER_ABOVE)
    assert set(COMMANDS) == every  # a new tool without a help line (or a line for a tool that is gone) fails
    for argv in (["--help"], ["-h"], []):
        main(argv)
        page = capsys.readouterr().out
        for name in every:
            assert re.search(rf"^  {re.escape(name)} +\S", page, re.M), (name, page)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_its_own_help(command, capsys):
    from ftframe.__main__ import COMMANDS as LAYER_ABOVE

    try:
        main([command, "--help"], commands=LAYER_ABOVE)
    except SystemExit as stop:  # argparse's help exits 0
        assert stop.code in (0, None)
    out = capsys.readouterr().out
    assert len(out) > 200 and ("usage" in out.lower() or command in out), out[:500]


def test_csv_metrics_reach_the_file_every_logging_interval(tiny_model, tiny_data, tmp_path):
    from ftframe.cli import FTFrameCLI

    args = [f"--model.model_name={tiny_model}", f"--data.train_files={tiny_data}", "--trainer.max_steps=1",
            "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", "--trainer.log_every_n_steps=5",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    cli = FTFrameCLI(args=args, run=False)
    assert cli.trainer.logger._flush_logs_every_n_steps == 5  # Lightning's default would be 100
    cli = FTFrameCLI(args=[*args, "--trainer.logger.flush_logs_every_n_steps=7"], run=False)
    assert cli.trainer.logger._flush_logs_every_n_steps == 7  # the user's own value stays


@pytest.mark.slow
@pytest.mark.skipif(not real_assets_available(), reason="run `ftframe download` first (CI does)")
def test_the_quickstart_writes_no_warning_to_stderr(tmp_path):
    """The quickstart config itself (real model, data, forgetting monitor), 2 steps: stderr carries ftframe's and
    Lightning's messages but no Python warning; stdout (a file) has progress lines and the summary."""
    run = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "ftframe", "fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps=2",
           f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}", "--data.val_size=8",
           f"--adapter.dirpath={run / 'adapter'}", "--progress_interval=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "FTFRAME_PROGRESS")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = WARNING.findall(proc.stderr)
    assert not found, "\n".join(line for line in proc.stderr.splitlines() if WARNING.search(line))
    assert "[ftframe] trained: step 2/2" in proc.stdout and "[ftframe] run summary" in proc.stdout
    assert (run / "summary.json").is_file()
