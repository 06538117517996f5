"""Pre-emption: SIGTERM ends ``ftframe fit`` after the current step, checkpointed, within seconds, with exit code 0 and
the command that resumes -- no validation, forgetting measurement or export after the signal -- and that command
resumes to the uninterrupted run's adapter bit for bit (tests.probes.SignalAt sends the signal from inside the run).
"""

from __future__ import annotations

import json
import random
import re
import shlex
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import fit_command, run_cli

STEPS = 10
#: a scheduler's kill follows SIGTERM by about 30 s; the tiny model's step takes well under a second
EXIT_WITHIN_S = 20.0


def _signalled(model, data, run, step, *extra):
    cmd = [*fit_command(model, data, run, steps=STEPS), "--trainer.callbacks+=tests.probes.SignalAt",
           f"--trainer.callbacks.step={step}", f"--trainer.callbacks.stamp={run / 'signal-sent'}", *extra]
    proc = run_cli(cmd)
    ended = time.time()
    sent = run / "signal-sent"
    waited = ended - float(sent.read_text()) if sent.is_file() else None
    return proc, waited


def _resume_command(proc) -> list[str]:
    found = re.search(r"Resume with: (ftframe fit --config \S+ --ckpt_path \S+)", proc.stdout + proc.stderr)
    assert found, (proc.stdout + proc.stderr)[-3000:]
    return [sys.executable, "-m", "ftframe", *shlex.split(found.group(1))[1:]]


def _same_adapters(a_folder, b_folder) -> None:
    a = load_file(str(a_folder / "adapter_model.safetensors"))
    b = load_file(str(b_folder / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max())


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    proc = run_cli(fit_command(tiny_model, tiny_data, run, steps=STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _forgetting_args(folder):
    reference = folder / "reference.txt"
    reference.write_text(" ".join(f"The river number {i} runs past the old mill and the quiet town." for i in range(40)))
    return ["--trainer.callbacks+=ftframe.callbacks.ForgettingMonitor", f"--trainer.callbacks.reference={reference}",
            "--trainer.callbacks.reference_windows=3", "--trainer.callbacks.window_tokens=32",
            "--trainer.callbacks.probe=null"]


# where the signal lands -> the step whose checkpoint is resumed: a step in flight finishes; a validation, a
# forgetting measurement and the rest of the step-4 checkpoint's write are not waited for beyond what they need
_STOPPED_AFTER = {"validation": 4, "checkpoint": 4, "forgetting": 4}


@pytest.mark.parametrize("during", ["step", "validation", "checkpoint", "forgetting"])
def test_sigterm_stops_in_seconds_with_a_checkpoint_and_resumes_bit_identically(during, tiny_model, tiny_data,
                                                                                tmp_path, uninterrupted):
    # validation (and the forgetting measurement) runs after steps 4 and 8 (fit_command), checkpoints every 2 steps;
    # a step signal arrives as step `step + 1` starts
    step = random.Random().randrange(2, STEPS - 1) if during == "step" else 4
    run = tmp_path / "run"
    extra = _forgetting_args(tmp_path) if during == "forgetting" else []
    proc, waited = _signalled(tiny_model, tiny_data, run, step, f"--trainer.callbacks.during={during}", *extra)
    out = proc.stdout + proc.stderr
    where = {"step": f"during step {step + 1}", "validation": "in the validation after step 4",
             "checkpoint": "while the step-4 checkpoint is written",
             "forgetting": "in the forgetting measurement after step 4"}[during]
    print(f"SIGTERM {where}: exit {proc.returncode} {waited:.1f}s after the signal")
    assert proc.returncode == 0, (step, out[-3000:])
    assert waited is not None and waited < EXIT_WITHIN_S, waited
    stopped = _STOPPED_AFTER.get(during, step + 1)
    assert f"stopped by SIGTERM after step {stopped}" in out, out[-3000:]
    last = (run / "checkpoints" / "last").resolve()
    assert last.name == f"step={stopped:06d}", last
    assert not (run / "adapter").exists()  # no export after the signal
    assert "validation after training" not in out
    if during == "forgetting":
        assert "forgetting (step 4): stopped by a signal" in out, out[-3000:]
    # the run summary says so too, on stdout and in summary.json, with the same resume command
    summary = json.loads((run / "summary.json").read_text())
    assert "[ftframe] run summary" in proc.stdout and f"stopped by SIGTERM after step {stopped}" in proc.stdout
    assert summary["finished"] is False and summary["step"] == stopped
    assert summary["resume"] and shlex.split(summary["resume"])[1:] == _resume_command(proc)[3:]
    resumed = run_cli(_resume_command(proc))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_adapters(uninterrupted / "adapter", run / "adapter")


def test_a_step_that_outlasts_the_grace_period_is_abandoned_and_the_last_finished_step_resumes(
        tiny_model, tiny_data, tmp_path):
    # accumulation 2 x batch 2: step 4 hangs in its second micro-batch, after the first was consumed -- the checkpoint
    # must rewind the data position, the loops and the random generators to the end of step 3
    accumulate = ["--trainer.accumulate_grad_batches=2", "--data.batch_size=2"]
    full = tmp_path / "full"
    proc = run_cli(fit_command(tiny_model, tiny_data, full, *accumulate, steps=STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    grace = 2.0
    proc, waited = _signalled(tiny_model, tiny_data, run, 3, *accumulate,
                              "--trainer.callbacks+=tests.probes.SlowStepAt", "--trainer.callbacks.step=3",
                              "--trainer.callbacks.micro=1", f"--trainer.callbacks.marker={run / 'slowed'}",
                              "--trainer.callbacks+=ftframe.callbacks.GracefulStop",
                              f"--trainer.callbacks.grace_s={grace}")
    out = proc.stdout + proc.stderr
    print(f"SIGTERM during step 4, which hangs (grace_s={grace}): exit {proc.returncode} {waited:.1f}s after the signal")
    assert proc.returncode == 0, out[-3000:]
    assert grace <= waited < grace + 10, waited
    assert "did not finish within grace_s=2.0s" in out and "stopped by SIGTERM after step 3" in out, out[-3000:]
    assert (run / "slowed").is_file()  # the hang was reached: step 4 was in its second micro-batch
    last = (run / "checkpoints" / "last").resolve()
    assert last.name == "step=000003", last
    ckpt = torch.load(last / "resume.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert not (run / "adapter").exists()
    resumed = run_cli(_resume_command(proc))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_adapters(full / "adapter", run / "adapter")


@pytest.mark.distributed
def test_sigterm_to_one_ddp_process_stops_every_rank_after_the_same_step(tiny_model, tiny_data, tmp_path):
    run = tmp_path / "ddp"
    proc, waited = _signalled(tiny_model, tiny_data, run, 3, "--trainer.callbacks.rank=1", "--trainer.devices=2",
                              "--trainer.strategy=ddp")
    out = proc.stdout + proc.stderr
    print(f"SIGTERM to rank 1 of 2 during step 4: exit {proc.returncode} {waited:.1f}s after the signal")
    assert proc.returncode == 0, out[-3000:]
    assert waited < EXIT_WITHIN_S
    assert "stopped by a signal to another process after step 4" in out or "stopped by SIGTERM after step 4" in out
    folder = run / "checkpoints"
    assert (folder / "last").resolve().name == "step=000004"
    assert sorted(p.name for p in folder.glob("step=*")) == ["step=000002", "step=000004"]  # once, by rank 0
    assert not list(folder.glob(".tmp-*")) and not (run / "adapter").exists()


def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint_intact(tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    proc, _ = _signalled(tiny_model, tiny_data, run, 3, "--trainer.callbacks.times=2")
    assert proc.returncode == -15, proc.stderr[-3000:]  # the default action of the second SIGTERM
    folder = run / "checkpoints"
    assert (folder / "last").resolve().name == "step=000002" and not list(folder.glob(".tmp-*"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(folder / "last"))
