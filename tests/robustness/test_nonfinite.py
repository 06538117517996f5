"""Non-finite loss or gradients: the step is skipped (weights and optimizer state unchanged) with a counted warning
naming the batch's examples; past ``max_nonfinite_steps`` training stops with an error, the last checkpoint intact."""

from __future__ import annotations

import re

import pytest
import torch

from ftframe.callbacks import AdapterCheckpoint, NonFiniteGuard
from ftframe.errors import UserError
from ftframe.methods import LoRA
from ftframe.optim import OptimizerSettings
from tests.helpers import fit_command, run_cli, tiny_instruction_data, tiny_trainer
from tests.probes import InfGradientAt, NaNLossTask, WeightsPerStep


def _fit(tiny_model, tiny_data, tmp_path, steps=4, callbacks=(), checkpointing=False, max_nonfinite_steps=10,
         **module_kwargs):
    """Train LoRA with the NonFiniteGuard (which ``ftframe fit`` adds to every run): (module, weights, guard)."""
    module = LoRA(model_name=tiny_model, optimizer=OptimizerSettings(learning_rate=1e-2), **module_kwargs)
    data = tiny_instruction_data(tiny_model, tiny_data, tmp_path)
    record, guard = WeightsPerStep(), NonFiniteGuard(max_nonfinite_steps=max_nonfinite_steps)
    trainer = tiny_trainer(tmp_path, max_steps=steps, callbacks=[guard, record, *callbacks],
                           enable_checkpointing=checkpointing)
    trainer.fit(module, datamodule=data)
    return module, record, guard


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["loss", "gradients"])
def test_a_nonfinite_step_is_skipped_with_a_warning_naming_its_examples(kind, tiny_model, tiny_data, tmp_path):
    extra = dict(task=NaNLossTask([2])) if kind == "loss" else {}
    callbacks = [InfGradientAt([2])] if kind == "gradients" else []
    with pytest.warns(UserWarning, match=rf"step 2: non-finite {kind}; step skipped, weights unchanged \(1 of at "
                                         r"most 10\); the batch held training examples \[\d+, \d+, \d+, \d+\]"):
        _, record, guard = _fit(tiny_model, tiny_data, tmp_path, callbacks=callbacks, **extra)
    assert guard.nonfinite_steps == 1
    weights = record.history
    assert _same(weights[1], weights[0])  # step 2 changed nothing ...
    assert record.optimizer_steps == [1, 1, 2, 3]  # ... not even AdamW's moments and step count
    assert not _same(weights[2], weights[1]) and all(torch.isfinite(v).all() for v in weights[-1].values())


def test_past_the_limit_training_stops_naming_the_examples_and_the_checkpoint_kept(tiny_model, tiny_data, tmp_path):
    checkpoints = AdapterCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1, monitor=None,
                                    save_top_k=-1)
    with pytest.warns(UserWarning, match="step 3: non-finite loss"), \
            pytest.raises(UserError, match=r"step 4: non-finite loss \(2 steps so far, more than max_nonfinite_steps"
                                           r"=1\); the batch held training examples \[[\d, ]+\] .*Training stopped\. "
                                           r"The last checkpoint, .*step=000003, holds the state before it"):
        _fit(tiny_model, tiny_data, tmp_path, steps=6, callbacks=[checkpoints], checkpointing=True,
             task=NaNLossTask([3, 4]), max_nonfinite_steps=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step=*")) == [f"step={i:06d}" for i in (1, 2, 3)]


def test_max_nonfinite_steps_must_not_be_negative():
    with pytest.raises(UserError, match="max_nonfinite_steps must be >= 0, got -1"):
        NonFiniteGuard(max_nonfinite_steps=-1)


@pytest.mark.distributed
def test_under_ddp_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tiny_model, tiny_data, tmp_path):
    result = run_cli([*fit_command(tiny_model, tiny_data, tmp_path, steps=4), "--trainer.devices=2",
                      "--trainer.strategy=ddp", "--model.task=tests.probes.NaNLossTask", "--model.task.steps=[2]",
                      "--model.task.rank=1"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]  # no hang, no crash: both ranks skipped step 2 together
    match = re.search(r"step 2: non-finite loss; step skipped, weights unchanged \(1 of at most 10\); the batch held "
                      r"training examples \[([\d, ]+)\]", output)
    assert match and len(match.group(1).split(",")) == 8, output[-3000:]  # 4 examples from each of the 2 ranks
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_batch_without_supervised_tokens_stops_training_instead_of_a_silent_zero_loss(tiny_model, tiny_data,
                                                                                        tmp_path):
    from tests.probes import UnsupervisedBatchAt

    with pytest.raises(UserError, match=r"step 2: a training batch has no supervised token \(every label is -100\), "
                                        r"so its loss would be 0 and teach nothing; it held \[\d+, \d+, \d+, \d+\]\. "
                                        r"Check the data with `ftframe inspect-data"):
        _fit(tiny_model, tiny_data, tmp_path, callbacks=[UnsupervisedBatchAt(2)])
