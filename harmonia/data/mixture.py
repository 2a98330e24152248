"""Mix a mapped dataset with an unmapped one at a fixed fraction per batch (e.g. 20% ClickMe).

The lab's pre-release pipeline trained on batches of 20% ClickMe (with human maps) and 80%
ImageNet (without). :class:`MixtureSampler` yields whole batches of indices into
:class:`MixtureDataset` (``mapped`` first, then ``unmapped``):

- **Per-batch share.** Global batch ``g`` holds ``floor((g+1)·f·B) − floor(g·f·B)`` mapped
  samples (error diffusion): every batch has ``floor(f·B)`` or ``ceil(f·B)`` of them and over
  the epoch the share is ``f`` to within one sample, even when ``f·B`` is not an integer.
- **Epoch.** By default the unmapped dataset defines the epoch (each of its samples once,
  in a fresh order) while the smaller mapped one is cycled, reshuffled at every pass
  (``epoch_by="mapped"`` swaps the roles; an int fixes the number of batches per rank).
- **Determinism and DDP.** Orders are drawn from ``numpy.random.default_rng([seed, epoch])``;
  every rank computes the same global schedule and takes global batches ``rank,
  rank + world, …``, so ranks see disjoint samples and the same number of batches.
  The sampler subclasses ``DistributedSampler`` so that Lightning does not wrap it in
  another one, and calls its ``set_epoch`` every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

from harmonia.data.errors import BadSampleError
from harmonia.data.sample import collate_samples


class MixedBatch(NamedTuple):
    """One mixture batch: its ``mapped`` part then its ``unmapped`` part, each collated by its
    own dataset's rules (e.g. ClickMe records and an image folder yield different intermediate
    forms), or None when the batch holds none of that source. The DataModule finishes each part
    on the training device and concatenates them, mapped first."""

    mapped: Any
    unmapped: Any


class MixtureDataset(Dataset):
    """Indices ``0..len(mapped)-1`` are the mapped dataset, the rest the unmapped one.

    Indexed with a *list* (one batch from :class:`MixtureSampler`) it returns the
    :class:`MixedBatch`, so a DataLoader worker builds whole batches (``batch_size=None`` in
    the loader).
    """

    def __init__(self, mapped: Dataset, unmapped: Dataset) -> None:
        self.mapped, self.unmapped = mapped, unmapped
        self.boundary = len(mapped)

    def __len__(self) -> int:
        return self.boundary + len(self.unmapped)

    def __getitem__(self, index: int | list[int]) -> Any:
        if isinstance(index, (list, tuple)):
            parts = [[s for s in (self[i] for i in index if (i < self.boundary) == mapped) if s is not None]
                     for mapped in (True, False)]  # None: a bad sample, skipped
            if not parts[0] and not parts[1]:
                raise BadSampleError("batch", f"all {len(index)} samples were bad (skip_bad_samples): check the data")
            return MixedBatch(*(collate_samples(part) if part else None for part in parts))
        return self.mapped[index] if index < self.boundary else self.unmapped[index - self.boundary]


class MixtureSampler(DistributedSampler):
    """Batches with a fixed share ``mapped_fraction`` of mapped samples (see module docstring).

    Args:
        dataset: the :class:`MixtureDataset`.
        batch_size: samples per batch (per process).
        mapped_fraction: share of mapped samples per batch, in [0, 1].
        seed: order seed (the same on every rank).
        rank, world_size: this process and the number of processes.
        epoch_by: ``"unmapped"`` | ``"mapped"`` | number of batches per rank.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        batch_size: int,
        mapped_fraction: float,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_by: Literal["unmapped", "mapped"] | int = "unmapped",
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        if not 0.0 <= mapped_fraction <= 1.0:
            raise ValueError(f"mapped_fraction must lie in [0, 1]; got {mapped_fraction}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        self.batch_size, self.fraction, self.epoch_by = batch_size, mapped_fraction, epoch_by
        self.n_mapped, self.n_unmapped = dataset.boundary, len(dataset) - dataset.boundary
        if mapped_fraction > 0 and self.n_mapped == 0:
            raise ValueError("mapped_fraction > 0 but the mapped dataset is empty")
        if mapped_fraction < 1 and self.n_unmapped == 0:
            raise ValueError("mapped_fraction < 1 but the unmapped dataset is empty")
        self.batches_per_rank = self._batches_per_rank()

    def _mapped_before(self, g: int | np.ndarray) -> int | np.ndarray:
        """Mapped samples in global batches ``0..g-1`` (error diffusion, exact integers)."""
        return np.floor(np.asarray(g, dtype=np.float64) * self.fraction * self.batch_size + 1e-9).astype(np.int64)

    def _batches_per_rank(self) -> int:
        if isinstance(self.epoch_by, int):
            return self.epoch_by
        if self.epoch_by not in ("unmapped", "mapped"):
            raise ValueError(f"epoch_by must be 'unmapped', 'mapped' or an int; got {self.epoch_by!r}")
        share = self.fraction if self.epoch_by == "mapped" else 1.0 - self.fraction
        if share == 0:
            raise ValueError(f"epoch_by={self.epoch_by!r} but no batch holds {self.epoch_by} samples")
        size = self.n_mapped if self.epoch_by == "mapped" else self.n_unmapped
        g = math.floor(size / (share * self.batch_size)) + 1  # upper estimate, walked down
        while g > 0 and self._consumed(g) > size:
            g -= 1
        return g // self.num_replicas

    def _consumed(self, g: int) -> int:
        mapped = int(self._mapped_before(g))
        return mapped if self.epoch_by == "mapped" else g * self.batch_size - mapped

    def __len__(self) -> int:
        return self.batches_per_rank

    @staticmethod
    def _stream(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
        """``count`` indices: concatenated fresh permutations of ``range(size)``."""
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        passes = -(-count // size)
        return np.concatenate([rng.permutation(size) for _ in range(passes)])[:count]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.batches_per_rank * self.num_replicas
        starts = self._mapped_before(np.arange(total + 1))
        mapped = self._stream(rng, self.n_mapped, int(starts[-1])) if self.n_mapped else np.zeros(0, np.int64)
        unmapped_starts = np.arange(total + 1) * self.batch_size - starts
        unmapped = self._stream(rng, self.n_unmapped, int(unmapped_starts[-1])) if self.n_unmapped else mapped[:0]
        for g in range(self.rank, total, self.num_replicas):
            batch = mapped[starts[g] : starts[g + 1]].tolist()
            batch += (unmapped[unmapped_starts[g] : unmapped_starts[g + 1]] + self.n_mapped).tolist()
            yield batch
