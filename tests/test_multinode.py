"""Two nodes on one machine: ``ftframe fit`` started as two separate launches, joined over gloo on localhost.

Each "node" is one CPU process (``configs/strategy/ddp_2nodes_cpu.yaml``: devices 1, num_nodes 2, DDP), started
either by its own ``torchrun --nnodes 2 --node-rank N`` (Lightning detects torchelastic) or as a plain process with the
variables SLURM's ``srun`` sets (Lightning's ``SLURMEnvironment``). Both must train like one process with the same
global batch (batch 2 on each node = batch 4 in one process; the completions all have the same token count), write
each checkpoint once, from global rank 0 only, and leave a step-2 checkpoint that one process resumes to the same
final adapter. The commands are the ones docs/distributed.md ("Several nodes") gives.

The torchrun launches share one output folder, as nodes on a shared file system do. The SLURM launches each run in a
folder of their own with relative output paths, as nodes without a shared disk: node 1's folder must then hold nothing
but its own tokenization cache (``prepare_data`` runs once per node), which shows that no output is written per node.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import DISTRIBUTED_STEPS, ROOT

pytestmark = pytest.mark.distributed

STEPS = DISTRIBUTED_STEPS
#: examples per node and step; one process with the same global batch takes twice as many
NODE_BATCH = 2
STRATEGY = "configs/strategy/ddp_2nodes_cpu.yaml"
#: seconds a launch (or a pair of them) may take before it is killed
TIMEOUT = 300
LOSS_REL = 1e-4
WEIGHT_ABS = 1e-4
#: what every checkpoint folder holds (a trained LoRA folder plus the resume state)
CHECKPOINT_FILES = {"resume.ckpt", "adapter_model.safetensors", "adapter_config.json", "ftframe.json", "config.yaml",
                    "tokenizer.json", "tokenizer_config.json"}
#: variables of an enclosing launcher or cluster job that must not reach the launches (each sets its own)
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


def _write_config(path: Path, out: str, cache: str, model: str, data: str, batch: int) -> Path:
    """The run's YAML (no devices, nodes or strategy: those come from the strategy config or the defaults)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# ftframe fit --config {path.name}
seed_everything: 7
trainer:
  accelerator: cpu
  max_steps: {STEPS}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: "", version: ""}}
  callbacks:
    - class_path: ftframe.callbacks.AdapterCheckpoint
      init_args: {{every_n_train_steps: 2, save_top_k: -1}}
model:
  class_path: ftframe.methods.LoRA
  init_args: {{model_name: {model}, r: 4, dropout: 0.0, optimizer: {{learning_rate: 0.005}}}}
data:
  class_path: ftframe.data.InstructionDataModule
  init_args: {{train_files: {data}, val_size: 8, batch_size: {batch}, cache_dir: {cache}}}
adapter:
  dirpath: {out}/adapter
""")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's or SLURM job's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launch and what it started: SIGTERM (torchrun passes it to its worker), then SIGKILL its group."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # each launch leads a session of its own (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def _launch(launches: list[tuple[list[str], dict[str, str], Path, Path]], what: str) -> float:
    """Start every ``(command, env, cwd, log)`` at once and wait for all; if one fails or time runs out, stop the rest.
    Returns the wall time in seconds."""
    start = time.monotonic()
    procs = []
    try:
        for cmd, env, cwd, log in launches:
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() - start > TIMEOUT:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            _stop(p)
    codes = [p.returncode for p in procs]
    report = "\n".join(f"--- launch {i} ({' '.join(cmd[:8])} ...), exit {code}:\n{_tail(log)}"
                       for i, ((cmd, _, _, log), code) in enumerate(zip(launches, codes, strict=True)))
    assert codes == [0] * len(procs), f"{what} failed or ran past {TIMEOUT} s:\n{report}"
    return time.monotonic() - start


def _losses(run: Path) -> list[float]:
    """The logged train/loss of every step (CSVLogger; rank 0 logs the step's mean over all processes)."""
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _single(config: Path, log: Path, *extra: str) -> float:
    """``ftframe fit`` in one process with the global batch (devices 1, num_nodes 1: no strategy config)."""
    cmd = [sys.executable, "-m", "ftframe", "fit", "--config", str(config), f"--data.batch_size={2 * NODE_BATCH}",
           *extra]
    return _launch([(cmd, _clean_env(), ROOT, log)], "the single-process run")


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> str:
    """The tokenization cache of the runs that share a disk."""
    return str(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def reference(tiny_model, even_data, token_cache, tmp_path_factory) -> Path:
    """One process, batch 4: what the two nodes of batch 2 must reproduce."""
    base = tmp_path_factory.mktemp("single")
    out = base / "run"
    _single(_write_config(base / "run.yaml", str(out), token_cache, tiny_model, even_data, NODE_BATCH),
            base / "log.txt")
    return out


def _torchrun_nodes(base: Path, model: str, data: str, cache: str) -> Path:
    """Two torchrun launches, node ranks 0 and 1, static rendezvous at 127.0.0.1:<free port>; one shared folder."""
    out = base / "run"
    config = _write_config(base / "run.yaml", str(out), cache, model, data, NODE_BATCH)
    port = _free_port()
    launches = []
    for node in (0, 1):
        cmd = [*_torchrun(), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "ftframe", "fit", "--config", str(config), "--config", STRATEGY]
        launches.append((cmd, _clean_env(OMP_NUM_THREADS="1"), ROOT, base / f"node{node}.log"))
    base.joinpath("seconds").write_text(f"{_launch(launches, 'the two torchrun launches'):.1f}")
    return out


def _slurm_nodes(base: Path, model: str, data: str, cache: str) -> Path:
    """Two plain processes with the variables srun sets for 2 nodes x 1 task; each in its own working folder (and
    tokenization cache: ``cache`` is not used)."""
    port = _free_port()
    launches = []
    for node in (0, 1):
        cwd = base / f"node{node}"
        config = _write_config(cwd / "run.yaml", "run", "tok", model, data, NODE_BATCH)  # outputs relative to cwd
        env = _clean_env(OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="ftframe-multinode",
                         SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="127.0.0.1",
                         SLURM_PROCID=str(node), SLURM_NODEID=str(node), SLURM_LOCALID="0",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "ftframe", "fit", "--config", str(config), "--config", str(ROOT / STRATEGY)]
        launches.append((cmd, env, cwd, base / f"node{node}.log"))
    base.joinpath("seconds").write_text(f"{_launch(launches, 'the two SLURM-like processes'):.1f}")
    return base / "node0" / "run"


@pytest.fixture(scope="module", params=["torchrun", "slurm"])
def two_nodes(request, tiny_model, even_data, token_cache, tmp_path_factory) -> tuple[str, Path]:
    base = tmp_path_factory.mktemp(request.param)
    start = _torchrun_nodes if request.param == "torchrun" else _slurm_nodes
    run = start(base, tiny_model, even_data, token_cache)
    print(f"\n[multinode] {request.param}: two launches took {(base / 'seconds').read_text()} s")
    return request.param, run


def test_two_nodes_train_like_one_process_with_the_same_global_batch(two_nodes, reference):
    launcher, run = two_nodes
    base = run.parent if launcher == "torchrun" else run.parents[1]
    for node in (0, 1):  # each launch joined as its own global rank (a rank read from the launcher's variables)
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in (base / f"node{node}.log").read_text()
    losses, single = _losses(run), _losses(reference)
    assert len(losses) == len(single) == STEPS and losses[-1] < losses[0]
    assert losses == pytest.approx(single, rel=LOSS_REL)
    worst = _max_diff(_weights(run / "adapter"), _weights(reference / "adapter"))
    assert worst < WEIGHT_ABS, f"final adapters differ by up to {worst}"
    step2 = Path("checkpoints") / "step=000002"
    worst = _max_diff(_weights(run / step2), _weights(reference / step2))
    assert worst < WEIGHT_ABS, f"step-2 checkpoints differ by up to {worst}"


def test_two_nodes_write_each_checkpoint_once_from_global_rank_zero(two_nodes):
    launcher, run = two_nodes
    checkpoints = run / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"step=000002", "step=000004", "last"}  # no .tmp-*, no copies
    assert os.readlink(checkpoints / "last") == "step=000004"
    for step in (2, 4):
        folder = checkpoints / f"step={step:06d}"
        assert CHECKPOINT_FILES <= {p.name for p in folder.iterdir()}, folder
        assert json.loads((folder / "ftframe.json").read_text())["global_step"] == step
        state = torch.load(folder / "resume.ckpt", weights_only=True, map_location="cpu")
        assert state["global_step"] == step and state["state_dict"]
        assert all("lora_" in k for k in state["state_dict"])  # trainable weights only
    base = run.parent if launcher == "torchrun" else run.parents[1]
    everything = [p for p in base.rglob("*") if p.is_file() or p.is_symlink()]
    assert sorted(p.relative_to(run) for p in everything if p.name == "resume.ckpt") == [
        Path("checkpoints/step=000002/resume.ckpt"), Path("checkpoints/step=000004/resume.ckpt")]
    assert sum(p.name == "metrics.csv" for p in everything) == 1
    assert sum(p.name == "adapter_model.safetensors" for p in everything) == 3  # the 2 checkpoints + the adapter
    if launcher == "slurm":  # node 1 has a disk of its own: only its tokenization cache (prepare_data, per node)
        node1 = base / "node1"
        written = {p.relative_to(node1).parts[0] for p in node1.rglob("*") if p.is_file()}
        assert written == {"run.yaml", "tok"}, sorted(str(p.relative_to(node1)) for p in node1.rglob("*"))


def test_a_two_node_checkpoint_resumes_in_one_process(two_nodes, tiny_model, even_data, token_cache, tmp_path):
    """Resuming step 2 with devices 1, num_nodes 1, batch 4 continues to the two nodes' final adapter."""
    launcher, run = two_nodes
    out = tmp_path / "run"
    config = _write_config(tmp_path / "run.yaml", str(out), token_cache, tiny_model, even_data, NODE_BATCH)
    _single(config, tmp_path / "log.txt", "--ckpt_path", str(run / "checkpoints" / "step=000002"))
    assert _losses(out) == pytest.approx(_losses(run)[2:], rel=LOSS_REL)  # steps 3 and 4
    worst = _max_diff(_weights(out / "adapter"), _weights(run / "adapter"))
    assert worst < WEIGHT_ABS, f"the resumed adapter differs from the two nodes' by up to {worst}"
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step=000004", "last"}
