"""ClickMe records through real DataLoader workers: the one decode path, errors and skips across
processes, and batches that stay valid however long they are kept and wherever they are sent."""

from __future__ import annotations

import contextlib
import queue
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from data_files import raw_record
from torch.utils.data import DataLoader, Subset
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg, encode_png

from harmonia.data import BadSampleError, ClickMeRecords, ClickMeSample, collate_samples
from harmonia.data.clickme import encode_clickme
from harmonia.data.example import encode_example
from harmonia.data.jpeg import decode_bytes
from harmonia.data.synthetic import synthetic_image
from harmonia.data.tfrecord import masked_crc32c


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _mixed_file(path: Path, size: int, bad: dict[int, str] | None = None, count: int = 12) -> Path:
    """Records of every kind the reader meets: plain JPEG, PNG maps, raw float32 arrays, extra
    features, and bad records at the given positions."""
    rng = np.random.default_rng(size)
    frames = []
    for i in range(count):
        image, heat = synthetic_image(rng, size)
        kind = (bad or {}).get(i, ["jpeg", "jpeg", "png_map", "raw", "jpeg", "click_count"][i % 6])
        data = {
            "jpeg": lambda: encode_clickme(image, heat, i % 10, quality=90),
            "crc": lambda: encode_clickme(image, heat, i % 10, quality=90),
            "png_map": lambda: encode_clickme(bytes(encode_jpeg(image)), bytes(encode_png(heat)), i % 10),
            "raw": lambda: raw_record(image.float(), heat.float() / 255, i % 10),
            "click_count": lambda: encode_clickme(image, heat, i % 10, click_count=7, quality=90),
            "label": lambda: encode_clickme(image, heat, 10, quality=90),
            "bad_jpeg": lambda: encode_example({"image": b"\xff\xd8\xff" + b"garbage" * 20, "label": 1,
                                                "heatmap": bytes(encode_jpeg(heat))}),
            "map_size": lambda: encode_clickme(image, heat[:, : size // 2, : size // 2].contiguous(), 1),
            "not_example": lambda: b"\xff" * 50,
        }[kind]()
        frames.append(bytearray(_frame(data)))
        if kind == "crc":
            frames[-1][40] ^= 0xFF
    path.write_bytes(b"".join(frames))
    return path


def _equal(a: tuple, b: tuple) -> None:
    assert type(a) is type(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


def _reference(dataset: ClickMeRecords, indices: list[int]) -> ClickMeSample:
    return collate_samples([dataset[i] for i in indices])


def test_records_of_every_kind_through_worker_processes(tmp_path: Path) -> None:
    """Batches from two worker processes equal the records read one by one in this process."""
    ds = ClickMeRecords(_mixed_file(tmp_path / "w.tfrecords", 32), num_classes=10, index_dir=str(tmp_path))
    batches = list(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_samples))
    assert [len(b.label) for b in batches] == [5, 5, 2]
    for k, batch in enumerate(batches):
        _equal(batch, _reference(ds, list(range(5 * k, min(5 * k + 5, 12)))))
        assert batch.image.shape[1:] == (32, 32, 3) and batch.coarse_map.shape[1:] == (1, 64, 64)
    subset = Subset(ds, [3, 1])
    _equal(collate_samples([subset[0], subset[1]]), _reference(ds, [3, 1]))


@pytest.mark.parametrize("case, message", [
    ("crc", "CRC mismatch"), ("label", r"label 10 out of range"), ("bad_jpeg", "cannot decode 'image'"),
    ("map_size", "human map is"), ("not_example", "not a tf.train.Example"),
])
def test_bad_records_in_workers_are_named_or_skipped(tmp_path: Path, case: str, message: str) -> None:
    """A worker's bad record reaches the main process as a BadSampleError naming file and record;
    with skip_bad_samples its batch is smaller and every worker's skips are counted."""
    path = _mixed_file(tmp_path / "b.tfrecords", 32, bad={4: case, 7: "label"})
    ds = ClickMeRecords(path, num_classes=10, index_dir=str(tmp_path))
    with pytest.raises(BadSampleError, match=rf"b\.tfrecords, record 4: .*{message}"):
        list(DataLoader(ds, batch_size=6, num_workers=1, collate_fn=collate_samples))
    skipping = ClickMeRecords(path, num_classes=10, skip_bad_samples=True, index_dir=str(tmp_path))
    batches = list(DataLoader(skipping, batch_size=6, num_workers=2, collate_fn=collate_samples))
    assert [len(b.label) for b in batches] == [5, 5]
    assert skipping.skips.skipped == 2 and skipping.skips.read == 10  # counted in the workers
    _equal(batches[1], _reference(skipping, [6, 8, 9, 10, 11]))
    with pytest.raises(BadSampleError, match="all 2 samples were bad"):
        collate_samples([skipping[4], skipping[7]])


def _receive(inbox: mp.Queue, outbox: mp.Queue) -> None:
    """Second process: take every batch, wait until told, then send back by value what it holds."""
    batches = inbox.get()
    outbox.put(len(batches))
    inbox.get()  # the sender has dropped its batches and run another epoch meanwhile
    outbox.put([tuple(t.numpy().copy() for t in batch) for batch in batches])  # arrays: no shared memory


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_kept_batches_survive_the_epoch_and_a_second_process(tmp_path: Path, context: str) -> None:
    """Two workers, pinned memory: every batch of an epoch is kept, handed to a second process
    (torch.multiprocessing) and must still hold its own records there after this process has
    dropped them and the workers have produced a whole new epoch."""
    path = _mixed_file(tmp_path / "k.tfrecords", 64, count=24)
    ds = ClickMeRecords(path, num_classes=10, index_dir=str(tmp_path))
    loader = DataLoader(ds, batch_size=4, num_workers=2, pin_memory=True, persistent_workers=True,
                        collate_fn=collate_samples, multiprocessing_context=context)
    with contextlib.nullcontext() if torch.cuda.is_available() else pytest.warns(UserWarning, match="pin_memory"):
        kept = list(loader)
    reference = [_reference(ds, list(range(k, k + 4))) for k in range(0, 24, 4)]
    assert len(kept) == len(reference) == 6
    for batch, expected in zip(kept, reference):
        _equal(batch, expected)
        assert batch.image.is_pinned() if torch.cuda.is_available() else batch.image.is_shared()
    ctx = mp.get_context(context)
    inbox, outbox = ctx.Queue(), ctx.Queue()
    receiver = ctx.Process(target=_receive, args=(inbox, outbox), daemon=True)
    receiver.start()
    try:
        inbox.put(kept)
        assert outbox.get(timeout=120) == 6
        del kept, batch
        for _ in loader:  # a second epoch, while the other process still holds the first one's batches
            pass
        inbox.put("check")
        returned = outbox.get(timeout=120)
    except queue.Empty:
        pytest.fail(f"the receiving process did not answer (exit code {receiver.exitcode})")
    finally:
        receiver.join(timeout=30)
        if receiver.is_alive():
            receiver.kill()
    for batch, expected in zip(returned, reference):
        _equal(ClickMeSample(*map(torch.from_numpy, batch)), expected)


def test_a_batch_of_records_of_different_sizes_is_a_clear_error(tmp_path: Path) -> None:
    first, second = _mixed_file(tmp_path / "a.tfrecords", 32, count=2), _mixed_file(tmp_path / "b.tfrecords", 48, count=2)
    ds = ClickMeRecords([str(first), str(second)], num_classes=10, index_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"one image size; got \[\(32, 32, 3\), \(48, 48, 3\)\]"):
        collate_samples([ds[1], ds[2]])


def test_simplejpeg_decodes_as_torchvision() -> None:
    """The pipeline's JPEG decoder gives torchvision's pixels, RGB and gray, from RGB and gray
    JPEGs; undecodable bytes are torchvision's error."""
    rng = np.random.default_rng(0)
    for size in (37, 64):
        image, heat = synthetic_image(rng, size)
        for pixels in (image, heat):
            data = bytes(encode_jpeg(pixels, quality=85))
            for gray, mode in ((False, ImageReadMode.RGB), (True, ImageReadMode.GRAY)):
                expected = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
                assert torch.equal(decode_bytes(data, gray), expected)
    with pytest.raises(RuntimeError):
        decode_bytes(b"\xff\xd8\xff" + b"garbage" * 20, gray=False)
