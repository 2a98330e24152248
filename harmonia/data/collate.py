"""Batching of ``Sample``s that tolerates skipped (``None``) samples, and batches collated in advance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch.utils.data import default_collate

from harmonia.data.errors import BadSampleError
from harmonia.data.sample import Sample
from harmonia.data.shared_batch import lease


class CollatedBatch(Sequence):
    """What a dataset's ``__getitems__`` returns when it builds the batch itself.

    ``batch`` is the collated batch of the samples kept (a NamedTuple of tensors, one row per
    sample); ``rows[k]`` is the row of the ``k``-th requested index, or None for a bad sample
    that was skipped. :func:`collate_samples` hands ``batch`` on as it is (no per-sample
    stacking); for any other consumer (``Subset``, ``StackDataset``, ``default_collate``) this
    is the usual list of samples: item ``k`` is row ``rows[k]`` (views) or None. ``block``: the
    :class:`~harmonia.data.shared_batch.Block` the batch's tensors are views of, when it has
    room left for the collate function's tensors (``DeviceCollate``).
    """

    def __init__(self, batch: NamedTuple, rows: list[int | None], block: Any = None) -> None:
        self.batch, self.rows, self.block = batch, rows, block

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> Any:  # type: ignore[override]
        row = self.rows[k]
        return None if row is None else type(self.batch)(*(field[row] for field in self.batch))


def collate_samples(batch: Sequence[Sample | None]) -> Sample:
    """``default_collate`` over the samples that are not None (a :class:`CollatedBatch`: its batch).

    Datasets built with ``skip_bad_samples=True`` return None for a bad sample (already counted
    and logged); dropping it here makes that batch one sample smaller rather than padding it
    with a fake or a repeated sample. A batch in which *every* sample was bad is an error.
    """
    if isinstance(batch, CollatedBatch):
        if all(row is None for row in batch.rows):
            if batch.block is not None:
                batch.block.release()
            raise BadSampleError("batch", f"all {len(batch)} samples were bad (skip_bad_samples): check the data")
        # In a worker, a batch read into a recycled block travels as that block (shared_batch.py).
        return batch.batch if batch.block is None else lease(batch.batch, batch.block)
    kept = [s for s in batch if s is not None]
    if not kept:
        raise BadSampleError("batch", f"all {len(batch)} samples were bad (skip_bad_samples): check the data")
    return default_collate(kept)
