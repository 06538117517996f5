"""Adapter-only checkpoints that a crash cannot damage and that resume training exactly.

Each checkpoint is one folder, ``<dirpath>/step=000040``, holding

* a trained folder :mod:`peft` loads as it is (``adapter_config.json`` + ``adapter_model.safetensors``, or a whole model
  for full fine-tuning), with the tokenizer, the run's ``config.yaml`` and ``ftframe.json`` (method, base model,
  step, metrics, hyperparameters) -- the same layout :class:`~ftframe.callbacks.AdapterExport` writes;
* ``resume.ckpt``: a Lightning checkpoint with the trainable weights only (never the frozen base), the optimizer and
  LR-scheduler state, the loop counters, every callback's state, the data module's position in the epoch and the
  random-number generators of every rank.

A folder is written under a temporary name (``.tmp-step=...``) and renamed into place once complete, so killing the
process mid-save leaves every earlier checkpoint intact; the ``last`` link is swapped atomically too. Leftover
temporary folders are removed when the next run starts. Resume with ``ftframe fit ... --ckpt_path <dirpath>/last``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ftframe.artifacts import (
    METADATA_FILE,
    check_writable,
    gather_trained,
    log_dir,
    metadata,
    replace_dir,
    write_trained,
    writing,
)
from ftframe.errors import UserError

__all__ = ["AdapterCheckpoint", "resolve_resume_path"]

RESUME_FILE = "resume.ckpt"
LAST_LINK = "last"
_RNG_KEY = "ftframe_rng_states"
_NAME = re.compile(r"^step=(\d+)$")


class AdapterCheckpoint(Checkpoint):
    """Save adapter-only checkpoints every N steps and/or when a monitored metric improves; keep the top-k and the last.

    Args:
        dirpath: Folder of the checkpoint folders; ``None`` = ``<trainer.log_dir>/checkpoints``.
        every_n_train_steps: Save every N optimizer steps (``0`` = never on a step count).
        monitor: A logged metric (e.g. ``val/loss``, ``forgetting/tradeoff``). When set, a checkpoint is saved after
            every validation and the ``save_top_k`` best by this metric are kept; step-count checkpoints are then
            kept only as the last one.
        mode: Whether lower (``min``) or higher (``max``) values of ``monitor`` are better.
        save_top_k: How many checkpoints to keep besides the last: the best by ``monitor``, or the most recent when
            there is no monitor. ``-1`` keeps every checkpoint.
        save_last: Always keep the most recent checkpoint (pointed to by the ``last`` link), whatever its rank.
        save_on_train_end: Save the final state when training ends (also after early stopping).

    Raises:
        UserError: on an invalid option (before training starts).

    Example:
        ``ftframe fit --config configs/quickstart.yaml --trainer.callbacks+=ftframe.callbacks.AdapterCheckpoint
        --trainer.callbacks.every_n_train_steps=20``; after a crash, the same command with
        ``--ckpt_path runs/quickstart/checkpoints/last`` continues exactly where the last checkpoint left off.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 0,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        save_on_train_end: bool = True,
    ) -> None:
        if every_n_train_steps < 0:
            raise UserError(f"AdapterCheckpoint: every_n_train_steps must be >= 0, got {every_n_train_steps}")
        if save_top_k < -1:
            raise UserError(f"AdapterCheckpoint: save_top_k must be >= -1 (-1 keeps all), got {save_top_k}")
        if mode not in ("min", "max"):
            raise UserError(f"AdapterCheckpoint: mode must be 'min' or 'max', got {mode!r}")
        if not every_n_train_steps and monitor is None and not save_on_train_end:
            raise UserError("AdapterCheckpoint would never save: set every_n_train_steps, monitor or save_on_train_end")
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_n_train_steps = every_n_train_steps
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.save_on_train_end = save_on_train_end
        #: checkpoint folder name -> monitored score (``None``: saved on a step count, not ranked)
        self.saved: dict[str, float | None] = {}
        self.last_name: str | None = None
        self._previous: str | None = None  # the checkpoint before the one being written
        self._rng_to_restore: list[dict[str, Any]] | None = None
        self._before_validation: str | None = None  # the step folder written just before a validation may run

    # ------------------------------------------------------------------ Lightning-compatible attributes
    @property
    def state_key(self) -> str:
        # not the folder: a resumed run may write elsewhere and still continue the ranking (see load_state_dict)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, every_n_train_steps=self.every_n_train_steps)

    @property
    def best_model_path(self) -> str:
        """``resume.ckpt`` of the best checkpoint (so ``ftframe validate --ckpt_path best`` works after ``fit``)."""
        best = self._best_names(1)
        return str(self._dir() / best[0] / RESUME_FILE) if best else ""

    @property
    def best_model_score(self) -> torch.Tensor | None:
        best = self._best_names(1)
        return torch.tensor(self.saved[best[0]]) if best and self.saved[best[0]] is not None else None

    @property
    def last_model_path(self) -> str:
        return str(self._dir() / self.last_name / RESUME_FILE) if self.last_name else ""

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = log_dir(trainer) / "checkpoints"
        if stage == "fit":
            check_writable(Path(self.dirpath), "the AdapterCheckpoint's dirpath")
        if stage == "fit" and trainer.is_global_zero and self.dirpath.is_dir():
            for leftover in self.dirpath.glob(".tmp-*"):
                rank_zero_warn(f"[ftframe] removing {leftover}: an incomplete checkpoint from a run that stopped while "
                               "saving (the checkpoints next to it are intact)")
                shutil.rmtree(leftover, ignore_errors=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = bool(self.every_n_train_steps) and step > 0 and step % self.every_n_train_steps == 0
        # the final state is saved here, inside the epoch, rather than in on_train_end: a checkpoint written after the
        # loop has wound up records a finished epoch and would skip the rest of it on resume
        final = self.save_on_train_end and step > 0 and (
            trainer.should_stop or (trainer.max_steps > 0 and step >= trainer.max_steps))
        if (due or final) and self._may_save(trainer):
            self.save(trainer, pl_module, ranked=False)
            self._before_validation = self.last_name

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit" or not self._may_save(trainer):
            return
        # A validation right after a step checkpoint: write that step again, now with the validation's results and
        # callback states (e.g. the forgetting measurement) in it. Resuming from the first version would skip this
        # validation -- Lightning does not repeat a validation after a checkpoint of the batch before it.
        refresh = self._before_validation == f"step={trainer.global_step:06d}"
        self._before_validation = None
        if self.monitor is not None:
            self.save(trainer, pl_module, ranked=True, refresh=refresh)
        elif refresh or (self.save_on_train_end and trainer.should_stop and trainer.global_step > 0):
            self.save(trainer, pl_module, ranked=False, refresh=refresh)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # fallback for ends the hooks above cannot see coming (e.g. max_epochs or max_time)
        name = f"step={trainer.global_step:06d}"
        if self.save_on_train_end and self._may_save(trainer) and trainer.global_step > 0 and self.last_name != name:
            self.save(trainer, pl_module, ranked=False)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Restore the generators right before the first step after a resume: whatever ran in between (setup,
        # validation, data loader creation) then cannot shift them, and dropout draws the same numbers it would have.
        if self._rng_to_restore is not None:
            states = self._rng_to_restore
            self._rng_to_restore = None
            rank = trainer.global_rank
            if len(states) != trainer.world_size:
                rank_zero_warn(f"[ftframe] the checkpoint holds random states of {len(states)} process(es), this run has "
                               f"{trainer.world_size}; using rank {min(rank, len(states) - 1)}'s (dropout noise will "
                               "differ from an uninterrupted run)")
            _set_rng_states(states[min(rank, len(states) - 1)])

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = [_rng_states()]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states[0])  # every rank calls this inside save_checkpoint
            states = gathered
        checkpoint[_RNG_KEY] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(_RNG_KEY)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath), "saved": dict(self.saved), "last_name": self.last_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath") != str(self.dirpath) or self.dirpath is None:
            return  # checkpoints of another folder: start a fresh ranking here
        self.saved = {k: v for k, v in state_dict.get("saved", {}).items() if (self._dir() / k).is_dir()}
        self.last_name = state_dict.get("last_name")

    # ------------------------------------------------------------------ saving
    def save(self, trainer: Trainer, pl_module: LightningModule, ranked: bool, refresh: bool = False) -> Path:
        """Write the checkpoint of the current step (collective: every rank calls it; rank 0 writes).

        A step already on disk is written again only with ``refresh``; otherwise only its score is recorded.
        """
        name = f"step={trainer.global_step:06d}"
        final = self._dir() / name
        score = self._score(trainer) if ranked else None
        if ranked and score is None:
            rank_zero_warn(f"[ftframe] AdapterCheckpoint: monitor {self.monitor!r} was not logged; logged metrics: "
                           f"{sorted(trainer.callback_metrics)}. Saving without a score.")
        if not refresh and name == self.last_name and final.is_dir():  # e.g. a step count and a validation
            if score is not None:
                self.saved[name] = score
                if trainer.is_global_zero:  # the folder was written before validation: record the score and metrics
                    meta_path = final / METADATA_FILE
                    meta = json.loads(meta_path.read_text())
                    meta.update(score=score, monitor=self.monitor, metrics=metadata(trainer, pl_module)["metrics"])
                    meta_path.with_name(METADATA_FILE + ".tmp").write_text(json.dumps(meta, indent=2))
                    os.replace(meta_path.with_name(METADATA_FILE + ".tmp"), meta_path)
            self._prune(trainer)
            return final
        self._previous = self.last_name
        self.saved[name] = score  # before writing: the state saved inside the checkpoint lists the checkpoint itself
        self.last_name = name
        tmp = self._dir() / f".tmp-{name}"
        run_dir = log_dir(trainer)  # collective under DDP: every rank, before the rank-0 block
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("ftframe_checkpoint_mkdir")
        kept = (f"the last complete checkpoint, {self._dir() / self._previous}, is intact" if self._previous
                else "no earlier checkpoint exists")
        with writing(final, tmp, kept):
            trainer.save_checkpoint(tmp / RESUME_FILE, weights_only=False)  # collective: the strategy gathers what it shards; rank 0 writes
        weights = gather_trained(trainer, pl_module)  # collective: whole tensors on rank 0 under FSDP / ZeRO-3
        if trainer.is_global_zero:
            with writing(final, tmp, kept):
                write_trained(trainer, pl_module, tmp, run_dir, weights, resume=RESUME_FILE, monitor=self.monitor,
                              score=score)
            replace_dir(tmp, final)
            _point_link(self._dir() / LAST_LINK, name)
        self._prune(trainer)
        trainer.strategy.barrier("ftframe_checkpoint_saved")
        rank_zero_info(f"[ftframe] checkpoint {final}" + (f" ({self.monitor}={score:.4f})" if score is not None else ""))
        return final

    def _prune(self, trainer: Trainer) -> None:
        keep = set(self.saved) if self.save_top_k == -1 else set(self._best_names(self.save_top_k))
        if self.save_last and self.last_name:
            keep.add(self.last_name)
        for name in [n for n in self.saved if n not in keep]:
            del self.saved[name]
            if trainer.is_global_zero:
                shutil.rmtree(self._dir() / name, ignore_errors=True)

    def _best_names(self, k: int) -> list[str]:
        if k == 0:
            return []
        if self.monitor is None:  # the most recent k
            return sorted(self.saved)[-k:] if k > 0 else sorted(self.saved)
        scored = [(s, n) for n, s in self.saved.items() if s is not None]
        scored.sort(key=lambda t: t[0], reverse=self.mode == "max")
        return [n for _, n in scored[:k]] if k > 0 else [n for _, n in scored]

    def _score(self, trainer: Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        return float(value) if value is not None else None

    def _dir(self) -> Path:
        if self.dirpath is None:
            raise RuntimeError("AdapterCheckpoint.setup() has not run")
        return self.dirpath

    @staticmethod
    def _may_save(trainer: Trainer) -> bool:
        return not (trainer.sanity_checking or trainer.fast_dev_run)


def resolve_resume_path(path: str | Path) -> str:
    """``--ckpt_path`` as Lightning needs it: a checkpoint folder (or its ``last`` link) becomes its ``resume.ckpt``.

    Raises:
        UserError: for a folder without resume state (an exported adapter), naming what to pass instead.
    """
    p = Path(path)
    if not p.is_dir():
        return str(path)
    if (p / RESUME_FILE).exists():  # a file, or a folder of shards (FSDP state_dict_type: sharded)
        return str(p / RESUME_FILE)
    if (p / LAST_LINK / RESUME_FILE).exists():  # the checkpoints folder itself
        return str(p / LAST_LINK / RESUME_FILE)
    hint = ""
    meta = p / "ftframe.json"
    if meta.is_file():
        hint = (" It is a trained-adapter folder without training state (written by AdapterExport); pass a folder "
                "written by AdapterCheckpoint, e.g. <log_dir>/checkpoints/last")
    raise UserError(f"--ckpt_path {path}: folder has no {RESUME_FILE}.{hint}")


def _point_link(link: Path, target: str) -> None:
    """Make ``link`` a relative symlink to ``target``, replacing the old link atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _rng_states() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array is stored as a tensor: checkpoints load with torch.load(weights_only=True)
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
