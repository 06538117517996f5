"""Adding a method is one file (plus its YAML): a method in a package of its own, found through the ``ftframe.methods``
entry-point group, passes the contract tests and runs through ``ftframe compare``, ``merge`` and ``generate`` with no
edit to ftframe or its tests (docs/design.md, "Adding a method")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

METHOD = '''
"""Train only the normalization scales (a BitFit-like method), with its test variant and comparison."""

from pathlib import Path

from ftframe.methods import FineTuneModule, Variant


class NormOnly(FineTuneModule):
    """Train only the RMSNorm scales.

    Args:
        **kwargs: See :class:`FineTuneModule`.
    """

    variants = {"NormOnly": Variant({}, r"norm\\.weight$",
                                    compare=("norm_only", str(Path(__file__).with_name("norm_only.yaml"))))}

    def adapt(self, model):
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.requires_grad_(True)
        return model
'''

YAML = """model:
  class_path: ftframe_plugin_methods.norm_only.NormOnly
  init_args:
    optimizer:
      learning_rate: 1.0e-2
      lr_schedule: constant
"""


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """An environment in which a package ``ftframe_plugin_methods`` is installed (a dist-info with the entry point)."""
    site = tmp_path_factory.mktemp("site")
    package = site / "ftframe_plugin_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "norm_only.py").write_text(METHOD)
    (package / "norm_only.yaml").write_text(YAML)
    info = site / "ftframe_plugin_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ftframe-plugin-methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ftframe.methods]\nNormOnly = ftframe_plugin_methods.norm_only:NormOnly\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def _run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_the_registry_finds_a_method_of_another_package(plugin_env):
    code = ("from ftframe.methods import METHODS, variants; from ftframe.tools.compare import DEFAULT_METHODS; "
            "print(METHODS['NormOnly'].__module__, 'NormOnly' in variants(matrix=True), 'norm_only' in DEFAULT_METHODS)")
    out = _run([sys.executable, "-c", code], plugin_env).stdout.split()
    assert out == ["ftframe_plugin_methods.norm_only", "True", "True"]


def test_a_plugin_method_passes_the_contract_tests_unedited(plugin_env, tmp_path):
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods_contract.py",
                 "-k", "NormOnly", f"--basetemp={tmp_path / 'pytest'}"], plugin_env)
    summary = proc.stdout.strip().splitlines()[-1]
    # the parametrized contract: trainable set, every trainable tensor moves, save -> load_trained logits,
    # trainable-only checkpoints, a run through the CLI, and two steps under the Preference task
    assert "6 passed" in summary and "failed" not in summary, summary


def test_a_plugin_method_runs_through_compare_merge_and_generate(plugin_env, compare_config, tmp_path):
    ftframe = [sys.executable, "-m", "ftframe"]
    out = tmp_path / "cmp"
    _run([*ftframe, "compare", "--fit_config", compare_config, "--only", "norm_only", "--steps", "2", "--output", str(out),
          "--metric_examples", "0", "--configs_dir", str(ROOT / "configs")], plugin_env)
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    (row,) = rows
    assert row["method"] == "norm_only"
    assert row["trainable_params"] == 64 * 5  # 2 blocks x 2 norms + the final norm, hidden size 64
    assert row["val_loss_after"] != row["val_loss_before"]
    trained = next(out.glob("norm_only/**/ftframe.json")).parent
    assert json.loads((trained / "ftframe.json").read_text())["method"] == "ftframe_plugin_methods.norm_only.NormOnly"
    merged = tmp_path / "merged"
    # merge and generate (the library functions under the commands) in one fresh process that finds the plugin
    script = ("import json, sys, torch; from ftframe.tools.merge import merge; from ftframe.tools.generate import "
              "Generator; merge(adapter=sys.argv[1], output=sys.argv[2]); g = [Generator(adapter=f) for f in sys.argv[1:]]; "
              "ids = torch.arange(3, 19)[None]; logits = [x.model(input_ids=ids).logits for x in g]; "
              "print(json.dumps([float((logits[0] - logits[1]).abs().max()), float(logits[0].abs().max()), "
              "[x(['What is one plus two?'], max_new_tokens=4) for x in g]]))")
    proc = _run([sys.executable, "-c", script, str(trained), str(merged)], plugin_env)
    assert (merged / "config.json").is_file()
    assert json.loads((merged / "ftframe.json").read_text())["method"].endswith("NormOnly")
    diff, scale, (trained_answer, merged_answer) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scale > 0 and diff <= 1e-5, diff  # the merged folder computes what the trained one does
    assert trained_answer == merged_answer
