"""One error type for bad input, and one counter for the samples skipped because of it.

Every reader in ``harmonia.data`` raises :class:`BadSampleError` naming *where* (a file and a
record index, or a CSV row) and *what* is wrong. With ``skip_bad_samples=True`` a dataset
catches it, counts the sample in a :class:`SkipCounter` and moves on; nothing is replaced by
zeros. The counter lives in shared memory so that DataLoader worker processes add to the same
numbers that the DataModule reports in the main process.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("harmonia.data")
MAX_LOGGED = 5  # per process: the reasons of the first few skips, not a flood


class BadSampleError(ValueError):
    """A sample (or the file holding it) cannot be read as valid data.

    Args:
        where: the file and the record index / CSV row, e.g. ``"train-0.tfrecords, record 17"``.
        what: what is wrong, e.g. ``"CRC mismatch in record data"``. Omitted, ``where`` is the
            whole message (how a DataLoader re-raises a worker's error in the main process,
            which keeps it a ``BadSampleError``).
    """

    def __init__(self, where: str, what: str | None = None) -> None:
        super().__init__(where if what is None else f"{where}: {what}")
        self.where = where
        self.what = what


class SkipCounter:
    """Shared-memory count of skipped and of read samples (safe across DataLoader workers).

    Workers only ever add to their own slots (one per worker id), so no lock is needed; the
    totals are sums over slots. ``report()`` warns once per call with the new skips.
    """

    def __init__(self, slots: int = 64) -> None:
        self._counts = torch.zeros(slots, 2, dtype=torch.int64).share_memory_()
        self._reported = 0
        self._logged = 0

    def _slot(self) -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else (info.id + 1) % len(self._counts)

    def add_skipped(self, error: BadSampleError) -> None:
        """Count one skipped sample; log the reason of the first few in this process."""
        self._counts.numpy()[self._slot(), 0] += 1
        if self._logged < MAX_LOGGED:
            self._logged += 1
            log.warning("skipping bad sample: %s", error)

    def add_read(self, count: int = 1) -> None:
        """Count ``count`` samples read successfully."""
        # through a NumPy view of the same shared memory: a plain memory write, where torch's
        # indexed in-place add would dispatch a kernel on every sample
        self._counts.numpy()[self._slot(), 1] += count

    def read_or_skip(self, read: Callable[[], T], skip: bool) -> T | None:
        """``read()``, counted; its ``BadSampleError`` propagates, or with ``skip`` is counted
        and logged and None returned (the caller leaves the sample out)."""
        try:
            value = read()
        except BadSampleError as err:
            if not skip:
                raise
            self.add_skipped(err)
            return None
        self.add_read()
        return value

    @property
    def skipped(self) -> int:
        """Samples skipped so far (all workers)."""
        return int(self._counts[:, 0].sum())

    @property
    def read(self) -> int:
        """Samples read successfully so far (all workers)."""
        return int(self._counts[:, 1].sum())

    def report(self, name: str) -> int:
        """Warn about samples skipped since the last report; return the total skipped."""
        total = self.skipped
        if total > self._reported:
            warnings.warn(
                f"{name}: skipped {total - self._reported} bad sample(s) "
                f"({total} in all, {self.read} read); rerun with skip_bad_samples=False to see why",
                stacklevel=2,
            )
            self._reported = total
        return total
