"""SIGTERM / Ctrl-C mid-run: the step finishes, a resumable checkpoint is written, the process exits 0 and prints the
command that resumes; resuming ends with the adapter of the uninterrupted run (bit-identical on the CPU)."""

from __future__ import annotations

import re
import shlex
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import fit_command, run_cli


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_run_checkpoints_the_step_exits_0_and_the_printed_command_resumes_it(name, tiny_model, tiny_data,
                                                                                       tmp_path):
    full = run_cli(fit_command(tiny_model, tiny_data, tmp_path / "full", steps=8))
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "stopped"
    stopped = run_cli([*fit_command(tiny_model, tiny_data, run, steps=8), "--trainer.callbacks+=tests.probes.SignalAt",
                       "--trainer.callbacks.step=4", f"--trainer.callbacks.name={name}"])
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0, output[-3000:]
    # the signal arrived as step 5 began: step 5 finished and its state was saved (checkpoints are every 2 steps)
    assert f"stopped by {name} after step 5" in output, output[-3000:]
    assert (run / "checkpoints" / "step=000005" / "resume.ckpt").is_file()
    assert not (run / "checkpoints" / "step=000006").exists()
    command = re.search(r"Resume with: (ftframe fit .*)", output).group(1)
    assert f"--ckpt_path {run / 'checkpoints' / 'step=000005'}" in command
    resumed = run_cli([sys.executable, "-m", "ftframe", *shlex.split(command)[1:]])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max())
