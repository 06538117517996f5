"""``MultitaskDataModule``: one run over several data sets, mixed with given weights, with metrics per data set.

Each member is an ordinary data module (``InstructionDataModule``, ``ClassificationDataModule``, yours) configured
as usual. Every training batch comes from one member, drawn at random with probability proportional to its weight
(seeded, so a run is repeatable), which keeps batches homogeneous -- padding, packing and the task's loss stay those
of the member. Validation and test run every member's own split, and the module logs ``val/<name>/...`` for each
member (loss and the task's metrics) besides the overall ``val/loss``.

All members must produce batches for the same task: instruction members for causal-LM tuning (a classification file
joins an instruction mixture as prompt/completion pairs: ``prompt_field: text, completion_field: label``), or
classification members, which then share one label space (the union of their labels, in order of appearance).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info

from ftframe.data.collate import StepWindows, accumulation_of, unwrap_windows
from ftframe.errors import UserError

__all__ = ["MultitaskDataModule", "WeightedMixture"]


class WeightedMixture:
    """An iterable of batches drawn from several loaders: each step picks a loader with probability ``weight / sum``.

    A loader that runs out starts over (its own sampler reshuffles). One pass yields ``length`` batches.
    """

    def __init__(self, loaders: dict[str, Any], weights: dict[str, float], length: int, seed: int) -> None:
        self.loaders = loaders
        self.names = list(loaders)
        self.probs = torch.tensor([weights[n] for n in self.names], dtype=torch.float64)
        self.probs = self.probs / self.probs.sum()
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # batches of the current pass already consumed (set when resuming)

    def __len__(self) -> int:
        return self.length

    def choices(self, epoch: int) -> list[str]:
        """Which member each batch of pass ``epoch`` comes from (deterministic in ``seed`` and ``epoch``)."""
        gen = torch.Generator().manual_seed(self.seed + 1000003 * epoch)
        picks = torch.multinomial(self.probs, self.length, replacement=True, generator=gen)
        return [self.names[i] for i in picks.tolist()]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.choices(self.epoch)
        iterators: dict[str, Iterator[Any]] = {}

        def next_batch(name: str) -> Any:
            if name not in iterators:
                iterators[name] = iter(self.loaders[name])
            try:
                return next(iterators[name])
            except StopIteration:
                iterators[name] = iter(self.loaders[name])
                return next(iterators[name])

        for i, name in enumerate(order):
            batch = next_batch(name)
            if i < self.skip:
                continue
            yield batch
        self.skip = 0
        self.epoch += 1


class MultitaskDataModule(LightningDataModule):
    """Several data sets in one run, mixed by weight, with per-data-set validation metrics.

    Args:
        datasets: Name -> data module (each a ``class_path`` + ``init_args`` in YAML).
        weights: Name -> sampling weight of its training batches (relative; default 1 each). Weights proportional to
            the data sets' sizes reproduce plain concatenation; equal weights up-sample the small ones.
        steps_per_epoch: Training batches per epoch; ``None`` = the members' batches per epoch added up.
        tokenizer: Tokenizer for every member; the CLI links it to ``model.model_name``.
        seed: Seed of the mixture's draws.
    """

    def __init__(self, datasets: dict[str, LightningDataModule], weights: dict[str, float] | None = None,
                 steps_per_epoch: int | None = None, tokenizer: str | None = None, seed: int = 42) -> None:
        super().__init__()
        if not datasets:
            raise UserError("datasets is empty; name at least one data module")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(datasets))
        if unknown:
            raise UserError(f"weights names {unknown}, which are not among datasets {sorted(datasets)}")
        bad = {k: v for k, v in weights.items() if not v > 0}
        if bad:
            raise UserError(f"weights must be > 0, got {bad}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise UserError(f"steps_per_epoch must be >= 1 or null, got {steps_per_epoch}")
        kinds = {type(dm).__name__ for dm in datasets.values()}
        if len({hasattr(type(dm), "num_labels") for dm in datasets.values()}) > 1:
            raise UserError(f"datasets mixes classification and other data modules ({sorted(kinds)}); one run trains "
                            "one task. Give classification files to an InstructionDataModule as prompt/completion "
                            "pairs (prompt_field: text, completion_field: label) to mix them with instruction data")
        self.members = dict(datasets)
        self.weights = {name: float(weights.get(name, 1.0)) for name in datasets}
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.tokenizer_name = tokenizer
        if tokenizer is not None:
            for dm in self.members.values():
                dm.tokenizer_name = tokenizer
        self._mixture: WeightedMixture | None = None
        self._resume: dict[str, int] | None = None
        self.label_names: list[str] | None = None

    @property
    def dataset_names(self) -> list[str]:
        """Member names, in the order of the validation / test dataloaders."""
        return list(self.members)

    # ------------------------------------------------------------------ classification members
    @property
    def num_labels(self) -> int:
        return len(self.label_names_from_data())

    def label_names_from_data(self) -> list[str]:
        """The union of the classification members' labels (in order of appearance); they all use these ids."""
        if self.label_names is None:
            union: list[str] = []
            for dm in self.members.values():
                if not hasattr(dm, "label_names_from_data"):
                    raise UserError(f"{type(dm).__name__} has no labels: MultitaskDataModule's labels come from "
                                    "ClassificationDataModule members")
                union += [n for n in dm.label_names_from_data() if n not in union]
            for dm in self.members.values():
                if dm.label_names != union:
                    dm.given_labels, dm.label_names = union, None  # decided again, with the shared ids
            self.label_names = union
        return list(self.label_names)

    def class_weights(self) -> torch.Tensor:
        raise UserError("class_weights: balanced is not supported with MultitaskDataModule; use the weights option")

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if all(hasattr(type(dm), "num_labels") for dm in self.members.values()):
            self.label_names_from_data()
        for dm in self.members.values():
            if getattr(dm, "tokenizer_name", None) is None:
                dm.tokenizer_name = self.tokenizer_name
            dm.trainer = self.trainer
            dm.setup(stage)

    def train_dataloader(self) -> StepWindows:
        # the members' own batches, regrouped into optimizer steps after mixing
        loaders = {name: unwrap_windows(dm.train_dataloader()) for name, dm in self.members.items()}
        length = self.steps_per_epoch or sum(len(loader) for loader in loaders.values())
        self._mixture = WeightedMixture(loaders, self.weights, length, self.seed)
        if self._resume is not None:
            self._mixture.epoch, self._mixture.skip = self._resume["epoch"], self._resume["batches"]
            self._resume = None
        shares = ", ".join(f"{n} {100 * p:.1f}%" for n, p in zip(self._mixture.names, self._mixture.probs.tolist(),
                                                                    strict=True))
        rank_zero_info(f"[ftframe] multitask: {length} training batches per epoch drawn from {shares}")
        return StepWindows(self._mixture, accumulation_of(self.trainer))

    def val_dataloader(self) -> list[Any]:
        return [dm.val_dataloader() for dm in self.members.values()]

    def test_dataloader(self) -> list[Any]:
        return [dm.test_dataloader() for dm in self.members.values()]

    def predict_dataloader(self) -> list[Any]:
        return [dm.predict_dataloader() for dm in self.members.values()]

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        state: dict[str, Any] = {"label_names": self.label_names}
        if trainer is not None and trainer.state.fn == "fit":
            state.update(epoch=trainer.current_epoch,
                         batches=trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("label_names")
        if saved is not None and self.label_names is not None and saved != self.label_names:
            raise UserError(f"the checkpoint was trained with labels {saved}, this data has {self.label_names}")
        if state_dict.get("batches"):
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
