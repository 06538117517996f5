"""``ftframe compare``: same budget per method, a table, a chart, resumable; the answer extraction behind its metric."""

from __future__ import annotations

import json

import pytest
import yaml

from ftframe.errors import UserError
from ftframe.evaluation import extract_answer
from ftframe.optim import OptimizerSettings
from ftframe.tools.compare import compare
from tests.helpers import ROOT


@pytest.mark.parametrize(("text", "expected"), [
    ("She pays 3 * 2 = <<3*2=6>>6 dollars.\n#### 6", "6"),
    ("#### 1,234", "1234"),
    ("first #### 3 then #### -4.50", "-4.50"),
    ("#### 12.0", "12"),
    ("The answer is 7.", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_compare_runs_each_method_with_the_same_budget(compare_config, tmp_path, capsys):
    out = tmp_path / "cmp"
    methods = {"base": "lora --trainer.max_steps=0", "lora": "lora --model.r=2", "ia3": "ia3"}
    rows = compare(compare_config, methods=methods, steps=2, output=str(out), metric_examples=4, max_new_tokens=4,
                   configs_dir=str(ROOT / "configs"))
    assert [r["method"] for r in rows] == ["base", "lora", "ia3"]
    base, lora, ia3 = rows
    # the untrained base has no trainable-parameter or speed figures; its loss is the same before and after
    assert base["trainable_params"] is None and base["tokens_per_s"] is None and base["artifact_bytes"] is None
    assert base["val_loss_before"] == base["val_loss_after"]
    # LoRA r=2 on all 7 linear layers of 2 blocks of a hidden-64 model: 2 * (in + out) per layer
    assert lora["trainable_params"] == 2 * 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    for r in (lora, ia3):
        assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["artifact_bytes"] > 0
        assert r["val_loss_before"] == pytest.approx(base["val_loss_before"])  # same data, same base
        assert r["val_loss_after"] != r["val_loss_before"]
        assert r["task_metric_n"] == 4 and 0.0 <= r["task_metric"] <= 1.0
        assert (4 * r["task_metric"]).is_integer()  # exact match: a count of right answers out of 4
        probe = json.loads((out / r["method"] / "probe.json").read_text())
        assert probe["steps"] == 2 and probe["max_steps"] == 2  # the same budget
    assert ia3["trainable_params"] < lora["trainable_params"]
    # each row's learning rate is the one its run used: the methods' default for LoRA (its YAML sets none), IA3's YAML's
    lora_default = OptimizerSettings().learning_rate
    ia3_yaml = yaml.safe_load((ROOT / "configs" / "methods" / "ia3.yaml").read_text())["model"]["init_args"]
    assert lora["learning_rate"] == lora_default
    assert ia3["learning_rate"] == float(ia3_yaml["optimizer"]["learning_rate"])
    assert ia3["learning_rate"] > lora["learning_rate"]
    # the share of trainable parameters is the counts' ratio; both runs froze the same base
    for r in (lora, ia3):
        assert r["trainable_pct"] == pytest.approx(100 * r["trainable_params"] / r["total_params"])
    assert lora["total_params"] - lora["trainable_params"] == ia3["total_params"] - ia3["trainable_params"] > 0
    assert 0 < ia3["trainable_pct"] < lora["trainable_pct"] < 100 and base["trainable_pct"] is None
    # results.json holds the rows the table and chart are drawn from; the table has a row per method
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    table = (out / "results.md").read_text()
    assert all(f"\n| {label} |" in table for label in methods)
    assert (out / "results.png").stat().st_size > 10_000
    # resumable: finished methods are skipped, the table is rebuilt from their results
    capsys.readouterr()
    again = compare(compare_config, methods=methods, steps=2, output=str(out), metric_examples=4, max_new_tokens=4,
                    configs_dir=str(ROOT / "configs"))
    assert capsys.readouterr().out.count("results exist") == 3 and again == rows


def test_compare_checks_every_method_before_running_any(compare_config, tmp_path):
    with pytest.raises(UserError, match=r"method 'mine': .*nope\.yaml does not exist; method YAMLs: \[.*'lora'"):
        compare(compare_config, methods={"lora": "lora", "mine": "nope"}, output=str(tmp_path / "cmp"),
                configs_dir=str(ROOT / "configs"))
    assert not (tmp_path / "cmp" / "lora").exists()


def test_compare_sft_against_sft_plus_dpo_on_the_same_held_out_questions(tiny_model, tiny_data, pair_data, tmp_path):
    """The preference recipe's comparison: the starting adapter (0 steps) and DPO from it, both scored on the held-out
    questions of the instruction data (metric_data) and on the held-out pairs (reward accuracy)."""
    from ftframe.methods import LoRA

    start = tmp_path / "sft"
    sft = LoRA(model_name=tiny_model, r=4)
    sft.configure_model()
    sft.save_trained(start)
    config = tmp_path / "dpo.yaml"
    config.write_text(f"""seed_everything: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  num_sanity_val_steps: 0
model:
  class_path: ftframe.methods.LoRA
  init_args:
    model_name: {tiny_model}
    r: 4
    init_adapter: {start}
    task:
      class_path: ftframe.tasks.Preference
      init_args: {{beta: 0.5}}
    optimizer: {{learning_rate: 0.02, lr_schedule: constant}}
data:
  class_path: ftframe.data.PreferenceDataModule
  init_args:
    train_files: {pair_data}
    val_size: 8
    batch_size: 4
    cache_dir: {tmp_path / 'cache'}
""")
    out = tmp_path / "cmp"
    rows = compare(str(config), methods={"SFT": f"{config} --trainer.max_steps=0", "SFT + DPO": str(config)}, steps=6,
                   output=str(out), metric_examples=8, max_new_tokens=6, metric_data=tiny_data, metric_val_size=8)
    sft_row, dpo_row = rows
    assert sft_row["reward_accuracy"] == 0.0  # policy == reference: every reward is 0, none is ahead
    assert dpo_row["reward_accuracy"] > 0.5
    assert sft_row["val_loss_before"] == pytest.approx(0.6931, abs=1e-4)  # log 2: DPO's loss at the reference
    assert dpo_row["val_loss_after"] < sft_row["val_loss_after"]
    for r in rows:
        assert r["task_metric_n"] == 8 and (8 * r["task_metric"]).is_integer()
        probe = json.loads((out / r["method"].replace(" + ", "_").replace(" ", "_") / "probe.json").read_text())
        assert probe["task_metric"]["data"] == tiny_data
    table = (out / "results.md").read_text()
    assert "| val loss after | reward accuracy | exact match |" in table
