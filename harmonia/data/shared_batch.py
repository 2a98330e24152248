"""A DataLoader worker's batch in one recycled block of shared memory.

Why: a worker hands each batch to the main process through shared memory, and torch gives
every tensor of it a fresh segment. Each batch then pays, in the worker, a page fault per
4 KB of new memory (which the kernel zero-fills first) and one file-descriptor handover per
tensor (a connection to multiprocessing's resource sharer, with an authentication handshake).
Measured on the 2-core development machine with a 64×224×224×3 uint8 batch: ~10 ms of
worker CPU per batch of six fresh tensors, 1 ms when one recycled block holds them all
(benchmarks/README.md, ``data_throughput.py``, ``loader`` row).

How:
- A worker keeps up to :data:`SLOTS` blocks (:class:`_Pool`). :func:`new_block` hands out a
  free one (or a fresh one when every slot is busy); a batch's tensors are carved from it
  with :meth:`Block.take`.
- :func:`lease` marks the finished batch (a NamedTuple of tensors) so that it pickles as the
  block's storage (one descriptor) plus each field's view, and the main process rebuilds the
  same NamedTuple type (:func:`_receive`).
- A block is reused only after the main process has dropped every tensor of its batch: the
  main process keeps a weak reference to each received block and, whenever a batch arrives,
  clears the flag of each block whose storage has died in the worker's *board*, a small
  shared int32 array. A batch still referenced anywhere (kept in a list, a view held by a
  metric) is never overwritten; the worker allocates a fresh block while its slots are busy.
- The board travels with the worker's batches until the main process acknowledges it
  (its last flag), then only its token does.

Limit: only the process that received the batch is watched. A batch it passes on, uncopied, to
a third process (through a ``torch.multiprocessing`` queue) is protected only while the
receiving process still holds it too; copy it (``clone()``) before handing it on.

Outside a DataLoader worker :func:`new_block` returns ordinary memory and :func:`lease`
returns the batch unchanged.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

SLOTS = 8  # blocks a worker recycles: its in-flight batches (prefetch_factor) plus the ones consumed
ALIGN = 64  # byte alignment of each view (a cache line)
_MAX_BOARDS = 256  # boards the main process remembers (one per worker process seen)


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


def view_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes :meth:`Block.take` uses for a view of this shape and dtype."""
    return aligned(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())


class Block:
    """A span of memory (shared in a worker) carved into a batch's tensors, front to back."""

    def __init__(self, storage: torch.UntypedStorage, slot: int = -1, pool: _Pool | None = None) -> None:
        self.storage, self.slot, self.pool, self.used = storage, slot, pool, 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The next uninitialized contiguous ``shape`` tensor of ``dtype`` in the block."""
        nbytes = view_bytes(shape, dtype)
        if self.used + nbytes > self.storage.nbytes():
            raise ValueError(f"block of {self.storage.nbytes()} bytes has {self.storage.nbytes() - self.used} left; "
                             f"{tuple(shape)} {dtype} needs {nbytes}")
        view = self.view_at(self.used, shape, dtype)
        self.used += nbytes
        return view

    def release(self) -> None:
        """Give a block that was never handed over back to its pool (its batch failed)."""
        if self.pool is not None:
            self.pool.flags[self.slot] = 0

    def view_at(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` at byte ``offset`` (a span already taken,
        seen with another dtype or shape)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if offset % itemsize or offset + math.prod(shape) * itemsize > self.storage.nbytes():
            raise ValueError(f"no {tuple(shape)} {dtype} view at byte {offset} of a {self.storage.nbytes()}-byte block")
        return torch.empty(0, dtype=dtype).set_(self.storage, offset // itemsize, shape)


class _Pool:
    """A worker process's recyclable blocks and the board of their flags (0 free, 1 in use)."""

    def __init__(self) -> None:
        self.pid, self.token = os.getpid(), uuid.uuid4().hex
        self.board = torch.empty(0, dtype=torch.int32).set_(torch.UntypedStorage._new_shared(4 * (SLOTS + 1)))
        self.flags = self.board.numpy()  # plain memory reads/writes: no tensor indexing per batch
        self.flags[:] = 0
        self.blocks: list[torch.UntypedStorage | None] = [None] * SLOTS
        self.fresh = 0  # blocks allocated (pooled or not), for tests and curiosity

    def acquire(self, nbytes: int) -> Block:
        """A free block of at least ``nbytes`` (reused where possible), marked in use."""
        for slot in range(SLOTS):
            if self.flags[slot] == 0:
                storage = self.blocks[slot]
                if storage is None or storage.nbytes() < nbytes:
                    storage = self.blocks[slot] = torch.UntypedStorage._new_shared(nbytes)
                    self.fresh += 1
                self.flags[slot] = 1
                return Block(storage, slot, self)
        self.fresh += 1  # every slot held by the main process: a one-off block
        return Block(torch.UntypedStorage._new_shared(nbytes))


_pool: _Pool | None = None


def worker_pool() -> _Pool:
    """This worker process's pool (a forked child never shares its parent's)."""
    global _pool
    if _pool is None or _pool.pid != os.getpid():
        _pool = _Pool()
    return _pool


def new_block(nbytes: int) -> Block:
    """A block of ``nbytes``: recycled shared memory in a DataLoader worker, else ordinary memory."""
    if torch.utils.data.get_worker_info() is None:
        return Block(torch.empty(nbytes, dtype=torch.uint8).untyped_storage())
    return worker_pool().acquire(nbytes)


def lease(batch: NamedTuple, block: Block) -> NamedTuple:
    """``batch`` (every field a view of ``block``), marked to travel as the block and to be
    recycled once the main process drops it; unchanged outside a worker or for a one-off block."""
    if block.pool is None:
        return batch
    for value in batch:
        if not isinstance(value, Tensor) or value.untyped_storage().data_ptr() != block.storage.data_ptr():
            raise ValueError(f"lease: every field of {type(batch).__name__} must be a view of the block")
    leased = _leased_type(type(batch))(*batch)
    leased._block = block
    return leased


_leased_types: dict[type, type] = {}


def _leased_type(base: type) -> type:
    """A subclass of the NamedTuple ``base`` that pickles as :func:`_receive` arguments."""
    if base not in _leased_types:
        def __reduce__(self: Any) -> tuple:
            block: Block = self._block
            pool = block.pool
            layout = [(t.dtype, t.storage_offset(), tuple(t.shape), t.stride()) for t in self]
            board = None if pool.flags[SLOTS] else pool.board  # until the main process has it
            # As a uint8 TypedStorage: multiprocessing sends it as one descriptor; a plain pickle
            # (which cannot save an UntypedStorage) as its bytes.
            storage = torch.TypedStorage(wrap_storage=block.storage, dtype=torch.uint8, _internal=True)
            return _receive, (base, storage, layout, pool.pid, pool.token, block.slot, board)

        _leased_types[base] = type(f"Leased{base.__name__}", (base,), {"__reduce__": __reduce__})
    return _leased_types[base]


_lock = threading.Lock()  # the pin-memory thread and the main thread may both receive batches
_boards: dict[str, tuple[Tensor, np.ndarray]] = {}  # token → (board, its flags), in the main process
_held: list[tuple[StorageWeakRef, np.ndarray, int]] = []  # received blocks: weak ref, board flags, slot


def _release_dropped() -> None:
    """Free the slot of every received block whose storage the main process no longer holds."""
    alive = []
    for ref, flags, slot in _held:
        if ref.expired():
            flags[slot] = 0
        else:
            alive.append((ref, flags, slot))
    _held[:] = alive


def _remember_board(token: str, board: Tensor) -> None:
    """Keep a worker's board; forget the oldest ones no held block uses (their workers must
    then send them again: the acknowledgement flag is cleared)."""
    if token not in _boards:
        _boards[token] = (board, board.numpy())
    _boards[token][1][SLOTS] = 1
    excess = len(_boards) - _MAX_BOARDS
    if excess > 0:
        in_use = {id(flags) for _, flags, _ in _held}
        for old in list(_boards):  # oldest first
            if excess == 0:
                break
            if old != token and id(_boards[old][1]) not in in_use:
                _boards.pop(old)[1][SLOTS] = 0
                excess -= 1


def _receive(base: type, typed: torch.TypedStorage, layout: list, sender: int, token: str, slot: int,
             board: Tensor | None) -> NamedTuple:
    """Rebuild a leased batch (in the receiving process) and track its block for recycling."""
    storage = typed._untyped_storage
    fields = [torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride) for dtype, offset, shape, stride in layout]
    if os.getpid() != sender and storage.is_shared():  # a copy (deepcopy, plain pickle) is no lease
        with _lock:
            if board is not None:
                _remember_board(token, board)
            _release_dropped()
            known = _boards.get(token)
            # None only if the board was forgotten while this batch was in flight (256 newer
            # workers): its slot then stays taken, and that worker has one block fewer to recycle.
            if known is not None:
                _held.append((StorageWeakRef(storage), known[1], slot))
    return base(*fields)
