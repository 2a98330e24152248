"""Execution helpers shared by plain-PyTorch code (no Lightning here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_cpu_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """One intra-op CPU thread inside the block (when ``device`` is the CPU), restored afterwards.

    For loops of many tiny operations (an NMF sweep over ``(n, k)`` matrices, power iteration
    of one layer on a batch of one): threads cannot split such work usefully, and when the
    cores are busy every operation waits at a thread barrier, which can cost more than the
    operation itself.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
