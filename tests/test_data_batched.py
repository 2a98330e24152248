"""Batched record reading (ClickMeRecords.__getitems__) equals the per-sample path; JPEG via simplejpeg."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import raw_record
from torch.utils.data import DataLoader, Subset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg, encode_png

from harmonia.data import BadSampleError, ClickMeRecords, JointTransform
from harmonia.data.clickme import encode_clickme
from harmonia.data.collate import CollatedBatch, collate_samples
from harmonia.data.device_geometry import DeviceBatch, DeviceCollate, apply_device_geometry, low_maps
from harmonia.data.example import encode_example
from harmonia.data.jpeg import decode_bytes
from harmonia.data.synthetic import synthetic_image, write_synthetic_clickme
from harmonia.data.tfrecord import masked_crc32c

TRAIN = JointTransform(32, train=True, uint8_output=True)


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _mixed_file(path: Path, size: int, bad: dict[int, str] | None = None) -> Path:
    """Records of every kind the reader meets: plain JPEG (fast path), PNG maps, raw float32
    arrays, extra features (general path), and bad records at the given positions."""
    rng = np.random.default_rng(size)
    frames = []
    for i in range(12):
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


@pytest.mark.parametrize("size, map_decode", [(32, "exact"), (160, "scaled"), (128, "scaled")])
def test_batched_records_equal_the_per_sample_path(tmp_path: Path, size: int, map_decode: str) -> None:
    """__getitems__ + collate == [ds[i]] + collate, value for value, on records of every kind
    (160 px: DCT-scaled to 80 px then bilinear; 128 px: DCT-scaled to 64 px)."""
    ds = ClickMeRecords(_mixed_file(tmp_path / "m.tfrecords", size), num_classes=10, transform=TRAIN,
                        augment_on="device", map_decode=map_decode, index_dir=str(tmp_path))
    order = [5, 0, 3, 11, 2, 8, 1, 4, 9, 6, 10, 7]
    general = []  # records the batched reader hands to the per-sample decoder
    decode = ds.decode
    ds.decode = lambda data, i, map_decode=None: general.append(i) or decode(data, i, map_decode)
    for indices in (order, order[:5]):  # a second, smaller batch reuses the scratch buffers
        general.clear()
        batched = ds.__getitems__(indices)
        assert sorted(general) == sorted(i for i in indices if i % 6 in (2, 3, 5))  # PNG map, raw, extra feature
        assert isinstance(batched, CollatedBatch) and len(batched) == len(indices)
        _equal(collate_samples(batched), collate_samples([ds[i] for i in indices]))
        _equal(default_collate(list(batched)), collate_samples(batched))  # a plain list of samples too
    assert ds.skips.read == 2 * (12 + 5) and ds.skips.skipped == 0


@pytest.mark.parametrize("size, small", [(160, 80), (224, 84), (256, 64)])
def test_uniform_scaled_maps_ship_as_pixels_and_resample_as_per_sample(tmp_path: Path, size: int, small: int) -> None:
    """Plain JPEG records (ClickMe's case): the batch carries the uint8 DCT-scaled map pixels;
    low_maps() (the device's first step) gives the per-sample path's 64-px maps exactly, and the
    device stage gives the same batch from either."""
    path = write_synthetic_clickme(tmp_path / "u.tfrecords", 6, size=size, num_classes=10)
    ds = ClickMeRecords(path, num_classes=10, transform=TRAIN, augment_on="device", map_decode="scaled",
                        index_dir=str(tmp_path))
    batched = collate_samples(ds.__getitems__([4, 1, 5, 0]))
    per_sample = collate_samples([ds[i] for i in (4, 1, 5, 0)])
    assert batched.low_map.dtype == torch.uint8 and batched.low_map.shape == (4, 1, small, small)
    assert torch.equal(batched.image, per_sample.image) and torch.equal(batched.label, per_sample.label)
    assert torch.equal(low_maps(batched.low_map), per_sample.low_map)
    box, flip = torch.tensor([[0.0, 0.0, size, size]] * 4), torch.tensor([False, True, False, True])
    ours, theirs = (apply_device_geometry(DeviceBatch(b.image, b.low_map, torch.ones(4, dtype=torch.bool), b.label,
                                                      box, flip), 32) for b in (batched, per_sample))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(ValueError, match="64×64"):
        low_maps(torch.zeros(1, 1, 32, 32))
    # The device's step stays on the maps' device (a GPU in training; "meta" here: no data, same rules).
    on_meta = low_maps(batched.low_map.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (4, 1, 64, 64) and on_meta.dtype == torch.float32


@pytest.mark.parametrize("case, message", [
    ("crc", "CRC mismatch"), ("label", r"label 10 out of range"), ("bad_jpeg", "cannot decode 'image'"),
    ("map_size", "human map is"), ("not_example", "not a tf.train.Example"),
])
def test_batched_bad_records_are_named_or_skipped_as_per_sample(tmp_path: Path, case: str, message: str) -> None:
    """The first bad record of the batch is named; with skip_bad_samples the batch equals the
    per-sample batch and the same skips are counted."""
    path = _mixed_file(tmp_path / "b.tfrecords", 32, bad={4: case, 7: "label"})
    ds = ClickMeRecords(path, num_classes=10, transform=TRAIN, augment_on="device", index_dir=str(tmp_path))
    with pytest.raises(BadSampleError, match=rf"b\.tfrecords, record 4: .*{message}"):
        ds.__getitems__([0, 4, 7])
    skipping = ClickMeRecords(path, num_classes=10, transform=TRAIN, augment_on="device", skip_bad_samples=True,
                              index_dir=str(tmp_path))
    batched = skipping.__getitems__(list(range(12)))
    assert [batched[k] is None for k in range(12)] == [k in (4, 7) for k in range(12)]
    assert skipping.skips.skipped == 2 and skipping.skips.read == 10
    _equal(collate_samples(batched), collate_samples([skipping[i] for i in range(12)]))
    with pytest.raises(BadSampleError, match="all 2 samples were bad"):
        collate_samples(skipping.__getitems__([4, 7]))


def test_dataloader_workers_use_the_batched_path(tmp_path: Path) -> None:
    """Through a DataLoader (a worker process: batches in shared memory) and Subset."""
    ds = ClickMeRecords(_mixed_file(tmp_path / "w.tfrecords", 32), num_classes=10, transform=TRAIN,
                        augment_on="device", index_dir=str(tmp_path))
    collate = DeviceCollate(TRAIN.crop, TRAIN.hflip)
    batches = list(DataLoader(ds, batch_size=6, num_workers=1, collate_fn=collate))
    assert [len(b.label) for b in batches] == [6, 6] and batches[0].image.is_shared()
    for k, batch in enumerate(batches):
        expected = collate_samples([ds[i] for i in range(6 * k, 6 * k + 6)])
        _equal((batch.image, batch.low_map, batch.label), tuple(expected))
    subset = Subset(ds, [3, 1])
    _equal(collate_samples(subset.__getitems__([0, 1])), collate_samples([ds[3], ds[1]]))


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

