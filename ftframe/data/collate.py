"""Batching: dynamic padding and a deterministic, resumable shuffling sampler."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ftframe.errors import UserError
from ftframe.packing import STEP_TOKENS, supervised_tokens

__all__ = ["LengthGroupedSampler", "PackCollator", "PadCollator", "PromptCollator", "ResumableSampler", "StepWindows",
           "TokenDataset",
           "linked_tokenizer", "pad_right"]


class TokenDataset(Dataset):
    """Tokenized examples: each item is ``{"input_ids": LongTensor(T), "labels": LongTensor(T), "index": i}``."""

    def __init__(self, input_ids: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> None:
        self.input_ids = list(input_ids)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "index": i}


class PadCollator:
    """Pad a list of examples to the longest one (rounded up to ``pad_to_multiple_of``), on the right.

    Labels are ``-100`` and the attention mask ``0`` on padding, so padding never reaches the loss.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of or 1

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], self.pad_token_id, self.multiple)
        labels = torch.full_like(input_ids, -100)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = e["labels"]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **_ids(examples)}


def pad_right(sequences: Sequence[torch.Tensor], pad_token_id: int,
              multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape (B, T): right-padded to the longest, rounded up to ``multiple``."""
    longest = max(len(x) for x in sequences)
    length = -(-longest // multiple) * multiple
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, x in enumerate(sequences):
        input_ids[i, : len(x)] = x
        attention_mask[i, : len(x)] = 1
    return input_ids, attention_mask


def linked_tokenizer(name: str | None) -> Any:
    """The tokenizer a data module uses: the model's, whose name the CLI links to ``data.tokenizer``."""
    if not name:
        raise UserError("the data module has no tokenizer: set model.model_name (the CLI links it to data.tokenizer) "
                        "or pass tokenizer= when using the class directly")
    from ftframe.models import load_tokenizer

    return load_tokenizer(name)


class PackCollator:
    """Concatenate a batch's examples into one row of shape ``(1, total tokens)``: no padding at all.

    ``position_ids`` restart at 0 for each example and ``cu_seq_lens`` holds the example boundaries (``[0, len0,
    len0 + len1, ...]``), which ftframe's attention uses to keep examples apart (see :mod:`ftframe.packing`). Each
    example's first label is set to ``-100``: in a row it would otherwise be predicted from the previous example's last
    token. The loss is over exactly the tokens the padded batch supervises, so the gradient is the same.
    """

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        labels = []
        for e in examples:
            lab = e["labels"].clone()
            lab[0] = -100
            labels.append(lab)
        return {
            "input_ids": torch.cat([e["input_ids"] for e in examples])[None],  # (1, N)
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
            "cu_seq_lens": torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32),
            "max_seq_len": torch.tensor(max(lengths)),
            **_ids(examples),
        }


def _ids(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``example_ids``: each example's position in its data set, when the data set gives it (to name bad batches)."""
    if "index" not in examples[0]:
        return {}
    return {"example_ids": torch.tensor([int(e["index"]) for e in examples])}


class PromptCollator:
    """Left-padded prompt-only batches for generation: each example is cut before its first supervised token.

    ``reference_ids`` holds the supervised tokens (the reference response), right-padded with ``-100``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        prompts, refs = [], []
        for e in examples:
            supervised = (e["labels"] != -100).nonzero()
            cut = int(supervised[0]) if len(supervised) else len(e["labels"])
            prompts.append(e["input_ids"][:cut])
            refs.append(e["labels"][cut:])
        n, t, r = len(examples), max(len(p) for p in prompts), max(len(x) for x in refs)
        input_ids = torch.full((n, t), self.pad_token_id, dtype=torch.long)  # (B, T), padded on the left
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        reference_ids = torch.full((n, max(r, 1)), -100, dtype=torch.long)
        for i, (p, ref) in enumerate(zip(prompts, refs, strict=True)):
            input_ids[i, t - len(p):] = p
            attention_mask[i, t - len(p):] = 1
            reference_ids[i, : len(ref)] = ref
        return {"input_ids": input_ids, "attention_mask": attention_mask, "reference_ids": reference_ids}


class ResumableSampler(Sampler[int]):
    """Shuffle with a permutation fixed by ``(seed, epoch)``, optionally skipping the first ``skip`` indices.

    Lightning calls :meth:`set_epoch` before each epoch. After a mid-epoch resume the data module sets
    :meth:`resume_from`, so the interrupted epoch continues exactly where it stopped and later epochs are unchanged.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples already consumed in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def _skip(self) -> int:
        if self._resume is not None and self._resume[0] == self.epoch:
            return min(self._resume[1], self.length)
        return 0

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        skip = self._skip()
        if skip:
            self._resume = None  # only the interrupted epoch is shortened
        return iter(order[skip:])

    def __len__(self) -> int:
        # The full epoch length even when resuming: Lightning counts batch indices from where the epoch stopped,
        # so it expects len() batches in total and iteration supplies only the remaining ones.
        return self.length


class LengthGroupedSampler(ResumableSampler):
    """Like :class:`ResumableSampler`, but batches hold examples of similar length (less padding when not packing).

    The shuffled order is cut into windows of ``window`` batches; each window is sorted by length and its batches
    are visited in random order, so batches stay random across the epoch while padding inside a batch is small.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, window: int = 50) -> None:
        super().__init__(len(lengths), seed=seed, shuffle=True)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.window = window

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        span = self.batch_size * self.window
        grouped: list[int] = []
        for w in range(0, self.length, span):
            chunk = sorted(order[w: w + span], key=lambda i: -self.lengths[i])
            batches = [chunk[b: b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
            for b in torch.randperm(len(batches), generator=g).tolist():
                grouped.extend(batches[b])
        skip = self._skip()
        if skip:
            self._resume = None
        return iter(grouped[skip:])


class RankShard(DistributedSampler):
    """This process's share of a sampler's order under DDP: positions ``rank, rank + world, ...`` of it.

    Lightning would otherwise wrap a custom sampler in a ``DistributedSampler`` that shuffles its order again; slicing
    the order instead keeps ftframe's seeded (and resumable) order, so one global batch of ``world x batch_size``
    examples holds exactly the examples a single process with that batch size would see. The order is padded by
    wrapping around to a multiple of ``world`` so that every rank takes the same number of steps.
    """

    def __init__(self, sampler: ResumableSampler, num_replicas: int, rank: int) -> None:
        super().__init__(range(len(sampler)), num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-(len(self.sampler) - self.sampler._skip()) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        if not order:
            return iter([])
        total = -(-len(order) // self.num_replicas) * self.num_replicas
        order += order[: total - len(order)]
        return iter(order[self.rank::self.num_replicas])


def world_size_of(trainer: Any) -> int:
    """Number of training processes (1 without a trainer)."""
    return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1


def shard_for(sampler: ResumableSampler, trainer: Any) -> Sampler[int]:
    """``sampler`` itself in one process, its :class:`RankShard` under a multi-process strategy."""
    world = world_size_of(trainer)
    if world <= 1:
        return sampler
    return RankShard(sampler, num_replicas=world, rank=int(trainer.global_rank))


class StepWindows:
    """A training loader whose batches say how many supervised tokens their optimizer step holds.

    Reads the batches of one optimizer step (``accumulate`` micro-batches, fewer at the end of an epoch, as Lightning
    steps on the last batch) ahead, and adds to each the supervised-token count of them all (``batch["step_tokens"]``,
    this process's share; the training step adds the other processes'). The loss of the step is then the mean over
    all its supervised tokens, whatever the split into micro-batches and processes (docs/distributed.md, "One step, one
    token mean"). Batches without per-token labels pass through unchanged. ``sampler`` / ``batch_sampler`` are the
    wrapped loader's, so Lightning still sets the sampler's epoch.
    """

    def __init__(self, loader: Iterable[Any], accumulate: int = 1,
                 count: Callable[[Any], torch.Tensor | None] = supervised_tokens) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.loader = loader
        self.accumulate = int(accumulate)
        self.count = count

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    @property
    def sampler(self) -> Any:
        return getattr(self.loader, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        return getattr(self.loader, "batch_sampler", None)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        while window := list(islice(batches, self.accumulate)):
            counts = [self.count(b) for b in window]
            if any(c is None for c in counts):
                yield from window
                continue
            total = torch.stack([c.reshape(()) for c in counts]).sum()
            for batch in window:
                batch[STEP_TOKENS] = total.clone()
                yield batch


def unwrap_windows(loader: Any) -> Any:
    """The loader inside a :class:`StepWindows` (for a mixture that regroups its members' batches), else ``loader``."""
    return loader.loader if isinstance(loader, StepWindows) else loader


def accumulation_of(trainer: Any) -> int:
    """The trainer's ``accumulate_grad_batches`` (1 without a trainer)."""
    return int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
