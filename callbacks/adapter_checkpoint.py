"""Adapter-only checkpoints that a crash cannot damage and that resume training exactly.

:class:`AdapterCheckpoint` is Lightning's ``ModelCheckpoint``, whose code decides when to save and which checkpoints
to keep; this class changes what a checkpoint is and how it is written. Each is one folder, ``<dirpath>/step=000040``:
a trained folder :mod:`peft` loads as it is (the layout :class:`~ftframe.callbacks.AdapterExport` writes, with
``ftframe.json``: method, base model, step, metrics, hyperparameters, monitor, score) plus ``resume.ckpt``, a
Lightning checkpoint of the trainable weights only (never the frozen base), the optimizer and LR-scheduler state, the
loops, every callback's state, the data module's position and the random-number generators of every rank.

A folder is written as ``.tmp-step=...`` and renamed into place once complete, and the ``last`` link to the newest
folder is swapped atomically before any older folder is deleted, so killing the process mid-save leaves every earlier
checkpoint intact (the next run removes the leftover). Resume with ``ftframe fit ... --ckpt_path <dirpath>/last``.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ftframe.artifacts import check_writable, gather_trained, log_dir, replace_dir, write_trained, writing
from ftframe.callbacks.graceful_stop import uninterrupted
from ftframe.errors import UserError

__all__ = ["AdapterCheckpoint", "resolve_resume_path"]

RESUME_FILE = "resume.ckpt"
LAST_LINK = "last"
_RNG_KEY = "ftframe_rng_states"


class AdapterCheckpoint(ModelCheckpoint):
    """Save adapter-only checkpoint folders every N steps and/or when a monitored metric improves; keep top-k and last.

    Args:
        dirpath: Folder of the checkpoint folders; ``None`` = ``<trainer.log_dir>/checkpoints``.
        every_n_train_steps: Save every N optimizer steps (``0`` = never on a step count).
        monitor: A metric a validation logs (e.g. ``val/loss``, ``forgetting/tradeoff``): the ``save_top_k`` best by
            it are kept. Checkpoints are ranked after validations only: with no interval set, after every one; a save
            due at a training step is ranked after the next validation, and kept as the last until then.
        mode: Whether lower (``min``) or higher (``max``) values of ``monitor`` are better.
        save_top_k: How many checkpoints to keep besides the last: the best by ``monitor``, or the most recent when
            there is no monitor. ``-1`` keeps every checkpoint.
        save_last: Also keep the newest state whatever its rank (``last`` always links to the newest folder).
        save_on_train_end: Save the final state when training ends (also after early stopping or a graceful stop).
        every_n_epochs: Save every N epochs (instead of ``every_n_train_steps`` / ``train_time_interval``).
        train_time_interval: Save at this interval of training time.
        save_on_train_epoch_end: Save on an epoch interval at the end of the training epoch rather than after
            validation (``None``: as Lightning decides).

    Raises:
        UserError: on an invalid option (before training starts).
    """

    # Lightning's checkpoint paths (best_model_path, best_k_models, last_model_path) name <dirpath>/step=N/resume.ckpt
    FILE_EXTENSION = os.sep + RESUME_FILE

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0, monitor: str | None = None,
                 mode: Literal["min", "max"] = "min", save_top_k: int = 1, save_last: bool = True,
                 save_on_train_end: bool = True, every_n_epochs: int | None = None,
                 train_time_interval: timedelta | None = None, save_on_train_epoch_end: bool | None = None) -> None:
        if save_top_k < -1:
            raise UserError(f"AdapterCheckpoint: save_top_k must be >= -1 (-1 keeps all), got {save_top_k}")
        scheduled = bool(every_n_train_steps or monitor or every_n_epochs or train_time_interval)
        if not scheduled and not save_on_train_end:
            raise UserError("AdapterCheckpoint would never save: set every_n_train_steps, every_n_epochs, "
                            "train_time_interval, monitor or save_on_train_end")
        by_step = monitor is None and save_top_k not in (-1, 0, 1)  # ModelCheckpoint's k most recent: the k best steps
        try:
            super().__init__(
                dirpath=dirpath, filename="step={step:06d}", auto_insert_metric_name=False,
                monitor="step" if by_step else monitor, mode="max" if by_step else mode, save_top_k=save_top_k,
                save_last=save_last, every_n_train_steps=every_n_train_steps or None,
                every_n_epochs=every_n_epochs if scheduled else 0,  # (not Lightning's default of every epoch)
                train_time_interval=train_time_interval, save_on_train_epoch_end=save_on_train_epoch_end,
                enable_version_counter=False)
        except MisconfigurationException as e:
            raise UserError(f"AdapterCheckpoint: {e}") from e
        self.dirpath = Path(self.dirpath) if self.dirpath else None  # (a Path: ftframe's CLI joins it)
        self.ranked_by = monitor  # the user's monitor, recorded in ftframe.json
        self.write_seconds = 0.0  # time spent writing checkpoints in this process
        self.save_on_train_end = save_on_train_end
        self._last_only = ""  # the newest folder, kept only as the last (not ranked among the top-k)
        self._at_step = self._deferred = False  # (see _monitor_candidates)
        self._rng_to_restore: list[dict[str, Any]] | None = None

    @property
    def saved(self) -> dict[str, float]:
        """The ranked checkpoints: folder name -> monitored value."""
        return {Path(p).parent.name: float(s) for p, s in self.best_k_models.items()}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = log_dir(trainer) / "checkpoints"  # collective under DDP: every rank
        with warnings.catch_warnings():  # resuming into the folder is what it is for
            warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)
        self.dirpath = Path(self.dirpath)
        if stage == "fit":
            check_writable(self.dirpath, "the AdapterCheckpoint's dirpath")
            for leftover in self.dirpath.glob(".tmp-*") if trainer.is_global_zero else ():
                rank_zero_warn(f"[ftframe] removing {leftover}: an incomplete checkpoint from a run that stopped while "
                               "saving (the checkpoints next to it are intact)")
                shutil.rmtree(leftover, ignore_errors=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._at_step, self._deferred = True, False
        try:
            super().on_train_batch_end(trainer, pl_module, *args)
        finally:
            self._at_step = False
        # the final state is saved here, inside the epoch, rather than in on_train_end: a checkpoint written after the
        # loop has wound up records a finished epoch and would skip the rest of it on resume
        final = self.save_on_train_end and (trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step)
        if final or self._deferred:
            self._save_now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        # A validation right after a step was saved: that step is written again, now with the validation's results and
        # callback states (e.g. the forgetting measurement) in it. Resuming from the first version would skip this
        # validation -- Lightning does not repeat a validation after a checkpoint of the batch before it.
        written = self._last_checkpoint_saved if fitting and self._last_global_step_saved == trainer.global_step else ""
        if written:
            self._last_global_step_saved = -1  # Lightning's own code may now save (and rank) the step again
        super().on_validation_end(trainer, pl_module)
        if written and self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, written)
        if fitting and self.save_on_train_end and trainer.should_stop:
            self._save_now(trainer, validated=True)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # an end the hooks above cannot see coming (max_epochs, max_time); this replaces ModelCheckpoint's fallback of a
        # last checkpoint when none was saved, so save_on_train_end=False turns both off
        if self.save_on_train_end:
            self._save_now(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Restore the generators right before the first step after a resume: whatever ran in between (setup,
        # validation, data loader creation) then cannot shift them, and dropout draws the same numbers it would have.
        if self._rng_to_restore is not None:
            states, self._rng_to_restore = self._rng_to_restore, None
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

    def state_dict(self) -> dict[str, Any]:  # (a str dirpath: resume.ckpt loads with torch.load(weights_only=True))
        return {**super().state_dict(), "dirpath": str(self.dirpath), "last_only": self._last_only}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        folder = Path(state_dict["dirpath"]) if state_dict.get("dirpath") else self.dirpath
        super().load_state_dict({**state_dict, "dirpath": folder})
        if folder == self.dirpath:
            self._last_only = state_dict.get("last_only", "")

    # ------------------------------------------------------------------ what a checkpoint is, how it is written
    def _monitor_candidates(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        if self._at_step and self.ranked_by:  # a save is due at a training step: ModelCheckpoint asks for the metrics
            # absent, so that ModelCheckpoint defers the save to the next validation rather than rank this step by an
            # earlier validation's result
            candidates.pop(self.monitor, None)
            self._deferred = True
        return candidates

    def _should_save_on_train_epoch_end(self, trainer: Trainer) -> bool:
        # a deferred save is made after the validation, also where Lightning would otherwise wait for the epoch end
        return not self._defer_save_until_validation and super()._should_save_on_train_epoch_end(trainer)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:  # a warning, not Lightning's error
            rank_zero_warn(f"[ftframe] AdapterCheckpoint: monitor {self.monitor!r} was not logged; logged metrics: "
                           f"{sorted(trainer.callback_metrics)}. This step is not ranked.")
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_now(self, trainer: Trainer, validated: bool = False) -> None:
        """Save this step as ModelCheckpoint saves a due one: ranked (by a validation's result), or deferred + last."""
        candidates = self._monitor_candidates(trainer)
        if self._should_skip_saving_checkpoint(trainer) or self.last_model_path == self.format_checkpoint_name(candidates):
            return  # (also: a resumed run that took no step)
        if self.ranked_by and not validated:
            self._defer_save_until_validation = True
        else:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def save_stopping_state(self, trainer: Trainer) -> str | None:
        """Write the current step now, unranked (a run stopped by a signal; collective), unless it is written already.
        Returns the folder holding that step, or ``None`` when this callback keeps no ``last``."""
        if not self.save_last:
            return None
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return str(Path(self.last_model_path).parent) if self.last_model_path else None

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        """The last is the newest state's own folder: written unless the top-k just saved this step."""
        if not self.save_last:
            return
        previous, self._last_only = self._last_only, ""
        if self._last_global_step_saved != trainer.global_step:
            self._last_only = self.format_checkpoint_name(monitor_candidates)
            self._save_checkpoint(trainer, self._last_only)
        if (previous and previous != self._last_only and previous not in self.best_k_models
                and self._should_remove_checkpoint(trainer, previous, self.last_model_path)):
            self._remove_checkpoint(trainer, previous)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        """Write the folder of ``filepath`` (``<dirpath>/step=N/resume.ckpt``). Collective; rank 0 writes. A signal's
        grace period does not abandon it (``GracefulStop``): stopping would mean writing it again."""
        start = time.monotonic()
        with uninterrupted():
            self._write_checkpoint(trainer, filepath)
        self.write_seconds += time.monotonic() - start  # the run summary's checkpointing time

    def _write_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        pl_module = trainer.lightning_module
        final = Path(filepath).parent
        tmp = final.with_name(f".tmp-{final.name}")
        kept = (f"the last complete checkpoint, {Path(self.last_model_path).parent}, is intact" if self.last_model_path
                else "no earlier checkpoint exists")
        score = float(self.best_k_models[filepath]) if self.ranked_by and filepath in self.best_k_models else None
        # before writing: the callback state saved inside the checkpoint names the checkpoint itself
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = self.last_model_path = filepath
        run_dir = log_dir(trainer)  # collective under DDP: every rank, before the rank-0 block
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("ftframe_checkpoint_mkdir")
        with writing(final, tmp, kept):
            # collective: the strategy gathers what it shards; rank 0 writes
            trainer.save_checkpoint(tmp / RESUME_FILE, weights_only=False)
        weights = gather_trained(trainer, pl_module)  # collective: whole tensors on rank 0 under FSDP / ZeRO-3
        if trainer.is_global_zero:
            with writing(final, tmp, kept):
                write_trained(trainer, pl_module, tmp, run_dir, weights, resume=RESUME_FILE, monitor=self.ranked_by,
                              score=score)
            replace_dir(tmp, final)
            link = final.with_name(f".{LAST_LINK}.tmp")  # `last` -> this folder, swapped atomically before any older
            link.unlink(missing_ok=True)                 # folder is deleted
            os.symlink(final.name, link)
            os.replace(link, final.with_name(LAST_LINK))
        trainer.strategy.barrier("ftframe_checkpoint_saved")
        rank_zero_info(f"[ftframe] checkpoint {final}" + (f" ({self.ranked_by}={score:.4f})" if score is not None
                                                          else ""))

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            shutil.rmtree(Path(filepath).parent, ignore_errors=True)


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
    hint = (" It is a trained-adapter folder without training state (written by AdapterExport); pass a folder "
            "written by AdapterCheckpoint, e.g. <log_dir>/checkpoints/last") if (p / "ftframe.json").is_file() else ""
    raise UserError(f"--ckpt_path {path}: folder has no {RESUME_FILE}.{hint}")


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
