"""Pre-emption: SIGTERM ends ``ftframe fit`` after the current step, checkpointed, within seconds, with exit code 0 and
the command that resumes -- no validation, forgetting measurement or export after the signal -- and that command
resumes to the uninterrupted run's adapter bit for bit (tests.probes.SignalAt sends the signal from inside the run).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("during", ["step", "validation"])
def test_sigterm_stops_in_seconds_with_a_checkpoint_and_resumes_bit_identically(during, tiny_model, tiny_data,
                                                                                tmp_path, uninterrupted):
    # validation runs after steps 4 and 8 (fit_command); a step signal arrives as step `step + 1` starts
    step = random.Random().randrange(2, STEPS - 1) if during == "step" else 4
    run = tmp_path / "run"
    proc, waited = _signalled(tiny_model, tiny_data, run, step, f"--trainer.callbacks.during={during}")
    out = proc.stdout + proc.stderr
    print(f"SIGTERM {'during step ' + str(step + 1) if during == 'step' else 'in the validation after step 4'}: "
          f"exit {proc.returncode} {waited:.1f}s after the signal")
    assert proc.returncode == 0, (step, out[-3000:])
    assert waited is not None and waited < EXIT_WITHIN_S, waited
    stopped = step + 1 if during == "step" else step  # the step in flight finishes; a validation is abandoned
    assert f"stopped by SIGTERM after step {stopped}" in out, out[-3000:]
    last = (run / "checkpoints" / "last").resolve()
    assert last.name == f"step={stopped:06d}", last
    assert not (run / "adapter").exists()  # no export after the signal
    assert "validation after training" not in out
    resumed = run_cli(_resume_command(proc))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_adapters(uninterrupted / "adapter", run / "adapter")


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
