"""Recycled shared-memory batches (harmonia.data.shared_batch) through real DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from harmonia.data import ClickMeRecords, JointTransform
from harmonia.data.device_geometry import DeviceBatch, DeviceCollate, device_batch_bytes
from harmonia.data.shared_batch import Block, lease, new_block, worker_pool
from harmonia.data.synthetic import write_synthetic_clickme

TRAIN = JointTransform(32, train=True, uint8_output=True)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> ClickMeRecords:
    path = write_synthetic_clickme(tmp_path_factory.mktemp("shm") / "r.tfrecords", 40, size=128, num_classes=10)
    return ClickMeRecords(path, num_classes=10, transform=TRAIN, augment_on="device", map_decode="scaled")


class _CountingCollate(DeviceCollate):
    """DeviceCollate that also records, in shared memory, how many blocks its worker allocated."""

    def __init__(self, fresh: torch.Tensor) -> None:
        super().__init__(TRAIN.crop, TRAIN.hflip)
        self.fresh = fresh

    def __call__(self, samples):  # noqa: D102
        batch = super().__call__(samples)
        self.fresh[torch.utils.data.get_worker_info().id] = worker_pool().fresh
        return batch


def _reference(dataset: ClickMeRecords, indices: list[int]) -> DeviceBatch:
    return DeviceCollate(TRAIN.crop, TRAIN.hflip)(dataset.__getitems__(indices))


def _check(batch: DeviceBatch, ref: DeviceBatch) -> None:
    assert type(batch) is DeviceBatch  # the contract's type, not the worker's leased subclass
    for name in ("image", "low_map", "has_map", "label"):  # box and flip are random per worker
        assert torch.equal(getattr(batch, name), getattr(ref, name)), name
    assert batch.box.shape == ref.box.shape and batch.flip.shape == ref.flip.shape


@pytest.mark.parametrize("context", ["fork", "spawn"])  # spawn: the pool and the leases survive pickling of everything
def test_batches_kept_by_the_consumer_are_never_overwritten(records: ClickMeRecords, context: str) -> None:
    """Every batch is kept until the end (nothing is released): each must still hold its own
    records after the worker has produced all the later ones."""
    orders = [torch.randperm(len(records), generator=torch.Generator().manual_seed(e)).tolist() for e in range(3)]
    batches = [order[k : k + 8] for order in orders for k in range(0, len(order), 8)]
    loader = DataLoader(records, batch_sampler=batches, num_workers=1, collate_fn=DeviceCollate(TRAIN.crop, TRAIN.hflip),
                        multiprocessing_context=context)
    kept = list(loader)
    assert len(kept) == len(batches) == 15
    for batch, indices in zip(kept, batches):
        _check(batch, _reference(records, indices))
        # one block per batch: all six fields are views of a single shared storage
        assert len({t.untyped_storage().data_ptr() for t in batch}) == 1
        assert batch.image.untyped_storage().is_shared()


def test_dropped_batches_are_recycled(records: ClickMeRecords) -> None:
    """A consumer that drops each batch: the workers reuse a handful of blocks for 60 batches."""
    fresh = torch.zeros(2, dtype=torch.int64).share_memory_()
    batches = [list(range(k, k + 8)) for k in range(0, len(records), 8)] * 12
    loader = DataLoader(records, batch_sampler=batches, num_workers=2, collate_fn=_CountingCollate(fresh))
    for n, batch in enumerate(loader):
        _check(batch, _reference(records, batches[n]))
        del batch
    assert 0 < fresh.max() <= 5, fresh  # prefetch 2 + the one consumed + one awaiting release, per worker
    assert n + 1 == 60


def test_outside_a_worker_nothing_is_leased() -> None:
    block = new_block(device_batch_bytes(2, 4, 4))
    assert block.pool is None and not block.storage.is_shared()
    fields = [block.take((2, 4, 4, 3), torch.uint8), block.take((2, 1, 64, 64), torch.float32),
              block.take((2,), torch.bool), block.take((2,), torch.int64), block.take((2, 4), torch.float32),
              block.take((2,), torch.bool)]
    assert block.used <= block.storage.nbytes()
    assert all(t.data_ptr() % 64 == 0 for t in fields)  # each view aligned
    batch = DeviceBatch(*fields)
    assert lease(batch, block) is batch
    with pytest.raises(ValueError, match="needs"):
        block.take((1000,), torch.float32)


def test_a_leased_batch_pickled_in_its_own_process_is_a_plain_copy() -> None:
    """pickle/deepcopy in the worker itself: rebuilt as the base type, and no lease registered."""
    pool = worker_pool()
    block = pool.acquire(device_batch_bytes(1, 2, 2))
    fields = [block.take((1, 2, 2, 3), torch.uint8).fill_(7), block.take((1, 1, 64, 64), torch.float32).fill_(0.5),
              block.take((1,), torch.bool).fill_(True), block.take((1,), torch.int64).fill_(3),
              block.take((1, 4), torch.float32).fill_(1), block.take((1,), torch.bool).fill_(False)]
    leased = lease(DeviceBatch(*fields), block)
    assert isinstance(leased, DeviceBatch) and type(leased) is not DeviceBatch
    copy = pickle.loads(pickle.dumps(leased))
    assert type(copy) is DeviceBatch
    assert all(torch.equal(a, b) for a, b in zip(copy, leased))
    assert pool.flags[block.slot] == 1  # still in use: only the receiving process releases it
    with pytest.raises(ValueError, match="view of the block"):
        lease(DeviceBatch(*fields[:5], torch.zeros(1, dtype=torch.bool)), block)


def test_the_main_process_forgets_old_boards_but_never_one_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Boards of workers seen long ago are dropped (their workers must send them again: the
    acknowledgement flag is cleared), except a board whose block the main process still holds."""
    from harmonia.data import shared_batch as sb

    monkeypatch.setattr(sb, "_boards", {})
    monkeypatch.setattr(sb, "_held", [])
    monkeypatch.setattr(sb, "_MAX_BOARDS", 3)
    boards = [torch.zeros(sb.SLOTS + 1, dtype=torch.int32) for _ in range(5)]
    held = torch.zeros(4, dtype=torch.uint8).untyped_storage()
    sb._remember_board("w0", boards[0])
    sb._held.append((sb.StorageWeakRef(held), sb._boards["w0"][1], 2))  # a batch of w0 still alive
    boards[0][2] = 1
    for k in range(1, 5):
        sb._remember_board(f"w{k}", boards[k])
    assert list(sb._boards) == ["w0", "w3", "w4"]  # w1, w2 forgotten; w0 kept: its block is held
    assert [int(b[sb.SLOTS]) for b in boards] == [1, 0, 0, 1, 1]
    del held
    sb._release_dropped()
    assert int(boards[0][2]) == 0 and sb._held == []  # the dropped batch's slot is free again


def test_a_block_whose_batch_failed_goes_back_to_the_pool() -> None:
    pool = worker_pool()
    block = pool.acquire(128)
    assert pool.flags[block.slot] == 1
    block.release()
    assert pool.flags[block.slot] == 0 and pool.acquire(64).slot == block.slot  # reused, not a fresh one


def test_plain_collate_of_a_device_dataset_is_leased_too(records: ClickMeRecords) -> None:
    """collate_samples instead of DeviceCollate: the DecodedSample batch also travels as its block."""
    from harmonia.data.collate import collate_samples

    batches = [list(range(k, k + 8)) for k in range(0, len(records), 8)] * 3
    for n, batch in enumerate(DataLoader(records, batch_sampler=batches, num_workers=1, collate_fn=collate_samples)):
        expected = collate_samples(records.__getitems__(batches[n]))
        assert type(batch) is type(expected) and all(torch.equal(a, b) for a, b in zip(batch, expected))
        assert len({t.untyped_storage().data_ptr() for t in batch}) == 1
