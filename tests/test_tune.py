"""ftframe tune: the space file, its errors before any trial, and a short study on the tiny model (pruning by step,
resume, outputs)."""

from __future__ import annotations

import json
import sys

import pytest

from ftframe.errors import UserError
from ftframe.tune import _parse_run, check_space, load_space, logged_metrics, to_flags
from tests.helpers import run_cli


@pytest.fixture
def run_yaml(tiny_model, tiny_data, tmp_path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(f"""seed_everything: 0
trainer:
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  max_steps: 6
  logger: false
model:
  class_path: ftframe.methods.LoRA
  init_args:
    model_name: {tiny_model}
    r: 4
    optimizer:
      learning_rate: 0.001
data:
  class_path: ftframe.data.InstructionDataModule
  init_args:
    train_files: {tiny_data}
    val_size: 8
    batch_size: 4
    cache_dir: {tmp_path / 'cache'}
""")
    return str(path)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_space_resolves_into_lightningcli_overrides(tmp_path, run_yaml):
    space = write(tmp_path, "model.init_args.optimizer.learning_rate: {type: float, low: 1e-5, high: 1e-2, log: true}\n"
                            "model.init_args.r: {type: int, low: 2, high: 16, step: 2}\n"
                            "model.class_path: [ftframe.methods.LoRA, ftframe.methods.DoRA]\n")
    params = load_space(space)
    assert [(p.kind, p.low, p.high, p.log) for p in params[:2]] == [("float", 1e-5, 1e-2, True), ("int", 2, 16, False)]
    flags = to_flags({"model.init_args.optimizer.learning_rate": 1e-5, "model.init_args.r": 8,
                      "model.class_path": "ftframe.methods.DoRA"})
    assert flags == ["--model.init_args.optimizer.learning_rate=1.0e-05", "--model.init_args.r=8",
                     "--model.class_path=ftframe.methods.DoRA"]
    _, config = _parse_run(["--config", run_yaml, *flags], apply_when_precision=False)
    assert config["model.init_args.optimizer.learning_rate"] == 1e-5  # a float, not the YAML 1.1 string "1e-05"
    assert config["model.init_args.r"] == 8 and config["model.class_path"] == "ftframe.methods.DoRA"
    check_space(params, ["--config", run_yaml], _parse_run(["--config", run_yaml])[1])


@pytest.mark.parametrize("text, message", [
    ("model.init_args.rank: [4, 8]\n", "space.yaml:1: 'model.init_args.rank' is not a key of the run config; did you "
                                       "mean model.init_args.r"),
    ("model.init_args.r: {type: int, low: 16, high: 4}\n", "space.yaml:1: model.init_args.r: the range is inverted"),
    ("a: [1]\nmodel.init_args.dropout: {type: float, low: 0.1, high: 0.1}\n", "space.yaml:2: model.init_args.dropout: "
                                                                              "the range is empty"),
    ("model.init_args.dropout: {type: float, low: 0, high: 0.2, log: true}\n", "a log range needs low > 0"),
    ("model.class_path: [ftframe.methods.LoRA, ftframe.methods.NoSuch]\n", "the class path 'ftframe.methods.NoSuch' "
                                                                           "does not import"),
    ("model.init_args.r: {type: float, low: 2.5, high: 8}\n", "model.init_args.r=2.5 is refused by the run config"),
    ("model.init_args.r: {type: int, low: 2, hi: 8}\n", "space.yaml:1: model.init_args.r: int takes"),
])
def test_bad_space_is_an_error_before_any_trial(tmp_path, run_yaml, text, message):
    from ftframe.tune import tune

    with pytest.raises(UserError, match=None) as e:
        tune([run_yaml], write(tmp_path, text), trials=1, output_dir=str(tmp_path / "out"))
    assert message in str(e.value)
    assert not (tmp_path / "out" / "trials").exists() or not any((tmp_path / "out" / "trials").iterdir())


def test_an_objective_the_run_never_logs_is_an_error(tmp_path, run_yaml):
    from ftframe.tune import tune

    _, config = _parse_run(["--config", run_yaml])
    assert "val/loss" in logged_metrics(config) and "val/accuracy" not in logged_metrics(config)
    with pytest.raises(UserError, match="val/acuracy: this run never logs it"):
        tune([run_yaml], write(tmp_path, "model.init_args.r: [2, 4]\n"), objectives=["val/acuracy"],
             output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match="did you mean forgetting/ppl_increase"):
        tune([run_yaml], write(tmp_path, "model.init_args.r: [2, 4]\n"), output_dir=str(tmp_path / "out"),
             objectives=["val/loss", "forgetting/ref_ppl_increase"],
             fit_args=["--trainer.callbacks+=ftframe.callbacks.ForgettingMonitor",
                       "--trainer.callbacks.probe=null"])


def test_study_prunes_by_step_resumes_and_writes_its_outputs(tmp_path, run_yaml):
    out = tmp_path / "out"
    # a learning rate of 1e-7 learns nothing: after two trials at 3e-2, the median pruner stops it at step 2
    space = write(tmp_path, "model.init_args.optimizer.learning_rate: [0.03, 1.0e-7]\n")
    cmd = [sys.executable, "-m", "ftframe", "tune", "--config", run_yaml, "--space", space, "--trials", "2",
           "--eval_every", "2", "--output_dir", str(out), "--baseline", "false", "--startup_trials", "2"]
    first = run_cli(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("complete in") == 2, first.stdout
    import optuna

    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2
    # every trial validated at steps 2, 4, 6 and reported each, keyed on the global step
    assert all(sorted(t.intermediate_values) == [2, 4, 6] for t in study.trials)
    # rerun with a larger budget: the study continues at trial 2 (not from 0); force the bad value to see pruning
    study.enqueue_trial({"model.init_args.optimizer.learning_rate": 1e-7})
    second = run_cli([*cmd[:cmd.index("--trials") + 1], "3", *cmd[cmd.index("--trials") + 2:]])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 of 3 trials done" in second.stdout and "trial 2 " in second.stdout
    trials = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials
    assert len(trials) == 3
    result = json.loads((out / "trials" / "002" / "result.json").read_text())
    assert trials[2].state.name == "PRUNED", trials[2].intermediate_values  # pruned at its first report, step 2
    assert result["pruned_at"] == 2 and result["steps"] == 2 and "pruned at step 2" in second.stdout
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial,state,model.init_args.optimizer.learning_rate")
    assert "PRUNED" in (out / "trials.md").read_text()
    assert (out / "history.png").stat().st_size > 1000
    best = (out / "best.yaml").read_text()
    assert "learning_rate: 0.03" in best and "TrialReporter" not in best and "trials/" not in best
    _, config = _parse_run(["--config", str(out / "best.yaml")])  # runnable by ftframe fit
    assert config["model.init_args.optimizer.learning_rate"] == 0.03


def _tune_cmd(run_yaml, space, out, *extra):
    return [sys.executable, "-m", "ftframe", "tune", "--config", run_yaml, "--space", space, "--output_dir", str(out),
            *extra]


def test_two_workers_share_one_study_and_run_trials_at_the_same_time(tmp_path, run_yaml):
    import subprocess

    import optuna

    out = tmp_path / "out"
    space = write(tmp_path, "model.init_args.optimizer.learning_rate: {type: float, low: 1.0e-4, high: 3.0e-2, "
                            "log: true}\nmodel.init_args.r: [2, 4, 8]\n")
    cmd = _tune_cmd(run_yaml, space, out, "--trials", "4", "--pruner", "none")
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # each worker stops once the study has 4 finished trials; one that was mid-trial then finishes it (so 4 or 5)
    assert 4 <= len(complete) <= 5 and len(trials) == len(complete), [(t.number, t.state) for t in trials]
    assert sum(t.user_attrs.get("note") == "the run config's own values" for t in trials) == 1  # one baseline
    by_worker = {}
    for t in complete:
        by_worker.setdefault(t.user_attrs["worker"], []).append(t)
    assert len(by_worker) == 2, by_worker.keys()
    a, b = by_worker.values()
    overlap = any(x.datetime_start < y.datetime_complete and y.datetime_start < x.datetime_complete
                  for x in a for y in b)
    assert overlap, "the two workers never ran a trial at the same time"
    assert sum(len(log.split("starts:")) - 1 for log in logs) == len(trials)


def test_forgetting_as_a_second_objective_gives_a_pareto_front(tmp_path, run_yaml):
    import optuna

    out = tmp_path / "out"
    ref = tmp_path / "reference.txt"
    ref.write_text("The committee met on Tuesday to discuss the budget for the coming year. " * 40)
    space = write(tmp_path, "model.init_args.optimizer.learning_rate: [1.0e-4, 3.0e-3, 3.0e-2]\n")
    cmd = _tune_cmd(run_yaml, space, out, "--trials", "3", "--startup_trials", "3",
                    "--objectives", "val/loss", "forgetting/ppl_increase",
                    "--trainer.callbacks+=ftframe.callbacks.ForgettingMonitor", f"--trainer.callbacks.reference={ref}",
                    "--trainer.callbacks.reference_windows=2", "--trainer.callbacks.window_tokens=32",
                    "--trainer.callbacks.probe=null", "--trainer.callbacks.kl=off")
    done = run_cli(cmd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(trials) == 3 and all(len(t.values) == 2 for t in trials)
    # the front is exactly the trials no other trial beats on both objectives
    dominated = {t.number for t in trials for u in trials
                 if all(b <= a for a, b in zip(t.values, u.values, strict=True)) and u.values != t.values}
    front = {t.number for t in trials} - dominated
    assert {t.number for t in study.best_trials} == front and front
    table = (out / "trials.md").read_text()
    assert table.count("**Pareto**") == len(front) and "forgetting/ppl_increase (minimize)" in table
    assert (out / "pareto.png").stat().st_size > 1000 and "Pareto front: trials" in done.stdout
    result = json.loads((out / "trials" / "000" / "result.json").read_text())
    assert result["metrics"]["forgetting/ppl_increase"] == pytest.approx(trials[0].values[1])


def test_a_trial_whose_worker_is_killed_is_marked_failed_and_not_counted(tmp_path, run_yaml):
    import os
    import signal
    import subprocess
    import time

    import optuna

    out = tmp_path / "out"
    space = write(tmp_path, "model.init_args.r: [2, 4]\n")
    cmd = _tune_cmd(run_yaml, space, out, "--trials", "2", "--heartbeat", "1", "--pruner", "none")
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in worker.stdout:
        if "trial 0 starts" in line:
            break
    time.sleep(3)  # the trial's own `ftframe fit` is running
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=60)
    study = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["RUNNING"]
    again = run_cli(cmd)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "trial [0] had been running when its worker stopped: marked failed" in again.stdout
    trials = optuna.load_study(study_name="run", storage=f"sqlite:///{out / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "died mid-trial" in trials[0].user_attrs["note"]
    assert "0 of 2 trials done" in again.stdout
