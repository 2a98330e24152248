"""Batching of ``Sample``s that tolerates skipped (``None``) samples."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import default_collate

from harmonia.data.errors import BadSampleError
from harmonia.data.sample import Sample


def collate_samples(batch: Sequence[Sample | None]) -> Sample:
    """``default_collate`` over the samples that are not None.

    Datasets built with ``skip_bad_samples=True`` return None for a bad sample (already counted
    and logged); dropping it here makes that batch one sample smaller rather than padding it
    with a fake or a repeated sample. A batch in which *every* sample was bad is an error.
    """
    kept = [s for s in batch if s is not None]
    if not kept:
        raise BadSampleError("batch", f"all {len(batch)} samples were bad (skip_bad_samples): check the data")
    return default_collate(kept)
