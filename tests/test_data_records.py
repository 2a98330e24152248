"""TFRecord framing, RecordIndex, tf.train.Example, ClickMe decoding and reference preprocessing, bad records."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import raw_record, records
from torchvision.io import decode_image, encode_jpeg

from harmonia.data import BadSampleError, ClickMeRecords, JointTransform, RecordIndex, collate_samples
from harmonia.data.clickme import encode_clickme, finish_clickme_batch
from harmonia.data.example import decode_example, encode_example
from harmonia.data.heatmap import blur_heatmap, coarse_map
from harmonia.data.tfrecord import TFRecordWriter, iter_records, masked_crc32c, record_offsets


def test_masked_crc_matches_the_tfrecord_definition() -> None:
    # CRC32C("123456789") = 0xE3069283 (the standard check value), then TF's mask.
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_example_wire_format_is_tensorflows() -> None:
    # Example{features{feature{key:"label" value{int64_list{value:[7]}}}}} encoded by hand from
    # TF's example.proto/feature.proto field numbers, independently of the protobuf library.
    wire = bytes.fromhex("0a10" "0a0e" "0a05") + b"label" + bytes.fromhex("1205" "1a03" "0a0107")
    assert decode_example(wire) == {"label": [7]}
    assert encode_example({"label": 7}) == wire
    both = decode_example(encode_example({"b": [b"x", b"yz"], "f": [0.5, 2.0], "i": [-3, 2**40]}))
    assert both == {"b": [b"x", b"yz"], "f": [0.5, 2.0], "i": [-3, 2**40]}


def test_writer_reader_and_offset_index(tmp_path: Path) -> None:
    path = tmp_path / "x.tfrecords"
    payloads = [bytes([i]) * (i * 37) for i in range(5)]
    with TFRecordWriter(path) as writer:
        for p in payloads:
            writer.write(p)
    assert [d for _, d in iter_records(path)] == payloads
    offsets = record_offsets(path)
    assert (tmp_path / "x.tfrecords.idx").exists()
    np.testing.assert_array_equal(record_offsets(path), offsets)  # from the cache
    with TFRecordWriter(path) as writer:  # the file changes: the cached index must not be used
        writer.write(b"only")
    assert len(record_offsets(path)) == 1
    # a failed write leaves the old file in place (atomic)
    with pytest.raises(RuntimeError), TFRecordWriter(path) as writer:
        writer.write(b"new")
        raise RuntimeError("boom")
    assert [d for _, d in iter_records(path)] == [b"only"]


def test_record_index_reads_every_file_by_global_index(tmp_path: Path) -> None:
    paths = []
    for k, count in enumerate((3, 0, 2)):  # an empty file in the middle
        paths.append(tmp_path / f"{k}.tfrecords")
        with TFRecordWriter(paths[-1]) as writer:
            for i in range(count):
                writer.write(f"{k}-{i}".encode())
    index = RecordIndex(paths, index_dir=tmp_path / "idx")
    assert len(index) == 5 and [index.read(i) for i in range(5)] == [b"0-0", b"0-1", b"0-2", b"2-0", b"2-1"]
    assert index.where(4).endswith("2.tfrecords, record 1")
    with pytest.raises(IndexError, match="record 5 out of range"):
        index.read(5)
    import pickle

    copy = pickle.loads(pickle.dumps(index))  # what a spawned worker gets: no open file travels
    assert copy._fds == {} and copy.read(3) == b"2-0"


def test_clickme_records_read_back_exactly(tmp_path: Path) -> None:
    path, written = records(tmp_path / "c.tfrecords", count=4, size=64)
    rng = torch.Generator().manual_seed(0)
    image, heat = torch.rand(3, 32, 32, generator=rng) * 255, torch.rand(1, 32, 32, generator=rng) * 3
    with open(path, "ab") as f:  # append a raw-float32 record with a click count, framed by hand
        data = encode_clickme(image, heat, 9, click_count=12)
        header = struct.pack("<Q", len(data))
        f.write(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))
    ds = ClickMeRecords(path, num_classes=10)
    assert len(ds) == 5
    for i, (image_bytes, heat_bytes, label) in enumerate(written):
        assert ds.record(i).image == image_bytes and ds.record(i).heatmap == heat_bytes
        sample = ds[i]
        expected = decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8))
        assert sample.image.dtype == torch.uint8 and torch.equal(sample.image, expected.permute(1, 2, 0))
        full_map = decode_image(torch.frombuffer(bytearray(heat_bytes), dtype=torch.uint8)).float() / 255
        torch.testing.assert_close(sample.coarse_map, coarse_map(full_map), rtol=0, atol=1e-6)
        assert sample.label == label and sample.has_map and ds.record(i).click_count is None
    raw = ds.record(4)
    assert torch.equal(raw.image, image) and torch.equal(raw.heatmap, heat) and raw.click_count == 12
    assert torch.equal(ds[4].image, image.round().to(torch.uint8).permute(1, 2, 0))  # 8 bits, as JPEG images
    torch.testing.assert_close(ds[4].coarse_map, coarse_map(heat), rtol=0, atol=1e-6)  # raw maps as stored
    batch = finish_clickme_batch(collate_samples([ds[0], ds[1]]), JointTransform(224))
    assert batch.image.shape == (2, 3, 224, 224) and batch.human_map.shape == (2, 1, 224, 224)
    assert batch.has_map.all() and 0 <= batch.image.min() and batch.image.max() <= 1


def _tf_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """tf.image.resize bilinear (half-pixel centres, no antialias) as a matrix."""
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    lo = np.floor(src).astype(int)
    hi, w = np.minimum(lo + 1, n_in - 1), src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def _reference_map(heat: np.ndarray, out: int) -> np.ndarray:
    """NumPy transcription of the reference: resize 64, 10×10 σ=10 kernel, SAME conv, resize."""
    low = _tf_resize_matrix(heat.shape[0], 64) @ heat @ _tf_resize_matrix(heat.shape[1], 64).T
    size, sigma = 10, 10
    xs, ys = np.meshgrid(np.arange(-(size - 1) // 2, (size - 1) // 2 + 1),
                         np.arange((size - 1) // 2, -(size - 1) // 2 - 1, -1))
    kernel = np.exp(-(xs**2 + ys**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    kernel /= kernel.sum()
    padded = np.pad(low, ((4, 5), (4, 5)))
    blurred = np.array([[np.sum(padded[y:y + size, x:x + size] * kernel) for x in range(64)] for y in range(64)])
    return _tf_resize_matrix(64, out) @ blurred @ _tf_resize_matrix(64, out).T


def test_reference_preprocessing(tmp_path: Path) -> None:
    """The evaluation path (decode in the worker, finish batched) is the reference's: image
    resized bilinear without antialiasing, map 64 px → 10×10 Gaussian σ=10 → 224 px."""
    rng = np.random.default_rng(0)
    heat = rng.random((256, 256)).astype(np.float32)
    ours = blur_heatmap(torch.from_numpy(heat)[None], (224, 224))[0].double().numpy()
    np.testing.assert_allclose(ours, _reference_map(heat.astype(np.float64), 224), rtol=0, atol=1e-6)
    image = torch.from_numpy(rng.integers(0, 256, (3, 256, 256), dtype=np.uint8))
    path = tmp_path / "r.tfrecords"
    with TFRecordWriter(path) as writer:  # a raw map: decoded exactly as stored
        writer.write(encode_clickme(bytes(encode_jpeg(image, quality=100)), torch.from_numpy(heat)[None], 3))
    ds = ClickMeRecords(path, num_classes=10)
    decoded = ds[0].image.permute(2, 0, 1).double().numpy()
    out = finish_clickme_batch(collate_samples([ds[0]]), JointTransform(224))
    reference = np.stack([_tf_resize_matrix(256, 224) @ c @ _tf_resize_matrix(256, 224).T for c in decoded])
    np.testing.assert_allclose(out.image[0].double().numpy(), reference / 255, rtol=0, atol=1e-4)  # float32 rounding
    np.testing.assert_allclose(out.human_map[0, 0].double().numpy(), _reference_map(heat.astype(np.float64), 224),
                               rtol=0, atol=1e-5)
    scaled = finish_clickme_batch(collate_samples([ds[0]]), JointTransform(224), map_normalization="minmax")
    assert scaled.human_map.min() == 0 and scaled.human_map.max() == 1


def test_coarse_map_by_strided_picks_is_the_bilinear_resize() -> None:
    """Maps whose sides are multiples of 64 take strided picks: the values of F.interpolate."""
    gen = torch.Generator().manual_seed(0)
    for height, width in ((256, 256), (192, 320), (64, 128), (100, 90), (32, 32)):
        heat = (torch.rand(1, height, width, generator=gen) * 255).to(torch.uint8)
        reference = torch.nn.functional.interpolate(heat[None].float(), size=(64, 64), mode="bilinear",
                                                    align_corners=False)[0]
        torch.testing.assert_close(coarse_map(heat), reference, rtol=0, atol=1e-4)


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def test_corrupted_record_is_named_or_skipped(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "c.tfrecords", count=4, size=32)
    blob = bytearray(path.read_bytes())
    offsets = record_offsets(path)
    blob[int(offsets[2]) + 40] ^= 0xFF  # a bit flip inside record 2's data
    path.write_bytes(bytes(blob))
    ds = ClickMeRecords(path, num_classes=10, index_dir=str(tmp_path / "idx"))
    assert ds[1] is not None
    with pytest.raises(BadSampleError, match=r"c\.tfrecords, record 2: CRC mismatch"):
        ds[2]
    skipping = ClickMeRecords(path, num_classes=10, skip_bad_samples=True, index_dir=str(tmp_path / "idx"))
    assert [skipping[i] is None for i in range(4)] == [False, False, True, False]
    assert skipping.skips.skipped == 1 and skipping.skips.read == 3


def test_truncated_file_is_named_or_skipped(tmp_path: Path) -> None:
    path, _ = records(tmp_path / "t.tfrecords", count=4, size=32)
    offsets = record_offsets(path, cache=False)
    path.write_bytes(path.read_bytes()[: int(offsets[3]) + 30])  # record 3 cut short
    with pytest.raises(BadSampleError, match=r"t\.tfrecords, record 3: truncated file"):
        ClickMeRecords(path, num_classes=10)
    with pytest.raises(BadSampleError, match="record 3: truncated"):
        list(iter_records(path))
    ds = ClickMeRecords(path, num_classes=10, skip_bad_samples=True)
    assert len(ds) == 3 and ds.skips.skipped == 1


@pytest.mark.parametrize("case, message", [
    ("map_size", r"human map is \(16, 16\) but the image is \(32, 32\)"),
    ("nan_map", "NaN/inf"),
    ("negative_map", "negative values"),
    ("bad_jpeg", "cannot decode 'image'"),
    ("bad_map_jpeg", "cannot decode 'heatmap'"),
    ("label", r"label 10 out of range \[0, 10\)"),
    ("not_example", "not a tf.train.Example"),
])
def test_bad_records_are_named_or_skipped(tmp_path: Path, case: str, message: str) -> None:
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    heat = torch.rand(1, 32, 32)
    good = encode_clickme(image, (heat * 255).to(torch.uint8), 1)
    bad = {
        "map_size": lambda: encode_clickme(image, (torch.rand(1, 16, 16) * 255).to(torch.uint8), 1),
        "nan_map": lambda: encode_example({"image": bytes(encode_jpeg(image)), "label": 1,
                                           "heatmap": np.where(np.eye(32) > 0, np.nan, 1).astype("<f4").tobytes()}),
        "negative_map": lambda: raw_record(image, heat - 0.5, 1),
        "bad_jpeg": lambda: encode_example({"image": b"\xff\xd8\xff" + b"garbage" * 20, "label": 1,
                                            "heatmap": bytes(encode_jpeg((heat * 255).to(torch.uint8)))}),
        "bad_map_jpeg": lambda: encode_example({"image": bytes(encode_jpeg(image)), "label": 1,
                                                "heatmap": b"\xff\xd8\xff" + b"garbage" * 20}),
        "label": lambda: encode_clickme(image, (heat * 255).to(torch.uint8), 10),
        "not_example": lambda: b"\xff" * 50,
    }[case]()
    path = tmp_path / "b.tfrecords"
    path.write_bytes(_frame(good) + _frame(bad) + _frame(good))
    ds = ClickMeRecords(path, num_classes=10)
    with pytest.raises(BadSampleError, match=rf"b\.tfrecords, record 1: .*{message}"):
        ds[1]
    skipping = ClickMeRecords(path, num_classes=10, skip_bad_samples=True)
    assert skipping[0] is not None and skipping[1] is None and skipping[2] is not None
    assert skipping.skips.skipped == 1


def test_record_files_by_folder_glob_or_list(tmp_path: Path) -> None:
    from harmonia.data.validate import expand_files

    for name in ("train-00000-of-00002", "train-00001-of-00002"):  # TF-style names, no suffix
        records(tmp_path / "tf" / name, count=2, size=16)
    ds = ClickMeRecords(str(tmp_path / "tf"), num_classes=10)  # writes .idx files beside them
    assert len(ds) == 4 and len(list((tmp_path / "tf").glob("*.idx"))) == 2
    assert len(ClickMeRecords(str(tmp_path / "tf" / "train-*"), num_classes=10)) == 4  # .idx ignored
    records(tmp_path / "mixed" / "a.tfrecords", count=1, size=16)
    (tmp_path / "mixed" / "README").write_text("not a record")
    assert [p.name for p in expand_files(str(tmp_path / "mixed"), (".tfrecords",))] == ["a.tfrecords"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        expand_files(str(tmp_path / "nothing-*"), (".tfrecords",))
