"""TFRecord framing, tf.train.Example, ClickMe decoding and reference preprocessing, bad records."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import raw_record, records
from torchvision.io import decode_image, encode_jpeg

from harmonia.data import BadSampleError, ClickMeRecords
from harmonia.data.clickme import decode_clickme, encode_clickme, preprocess_clickme
from harmonia.data.heatmap import blur_heatmap, blur_low_map, low_res_heatmap
from harmonia.data.synthetic import synthetic_image
from harmonia.data.example import decode_example, encode_example
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
        record = ds.read(i)
        assert torch.equal(record.image, decode_image(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8)))
        expected = decode_image(torch.frombuffer(bytearray(heat_bytes), dtype=torch.uint8)).float() / 255
        assert torch.equal(record.heatmap, expected)
        assert record.label == label and record.click_count is None
    raw = ds.read(4)
    torch.testing.assert_close(raw.image, image / 255, rtol=0, atol=1e-6)
    assert torch.equal(raw.heatmap, heat) and raw.click_count == 12
    sample = ds[0]
    assert sample.image.shape == (3, 224, 224) and sample.human_map.shape == (1, 224, 224)
    assert sample.has_map.item() and 0 <= sample.image.min() and sample.image.max() <= 1


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
    rng = np.random.default_rng(0)
    heat = rng.random((256, 256)).astype(np.float32)
    ours = blur_heatmap(torch.from_numpy(heat)[None], (224, 224))[0].double().numpy()
    np.testing.assert_allclose(ours, _reference_map(heat.astype(np.float64), 224), rtol=0, atol=1e-6)
    image = torch.from_numpy(rng.integers(0, 256, (3, 256, 256), dtype=np.uint8))
    out, human_map = preprocess_clickme(image, low_res_heatmap(torch.from_numpy(heat)[None]), 224)
    reference = np.stack([_tf_resize_matrix(256, 224) @ c @ _tf_resize_matrix(256, 224).T for c in image.double().numpy()])
    assert np.abs(out.double().numpy() - reference / 255).max() <= 1 / 255 + 1e-6  # uint8 fixed point only
    assert human_map.min() >= 0
    _, scaled = preprocess_clickme(image, low_res_heatmap(torch.from_numpy(heat)[None]), 224, map_normalization="minmax")
    assert scaled.min() == 0 and scaled.max() == 1


def test_low_res_map_by_strided_picks_is_the_bilinear_resize() -> None:
    """Maps whose sides are multiples of 64 take strided picks: the values of F.interpolate."""
    gen = torch.Generator().manual_seed(0)
    for height, width in ((256, 256), (192, 320), (64, 128), (100, 90)):
        heat = (torch.rand(1, height, width, generator=gen) * 255).to(torch.uint8)
        reference = torch.nn.functional.interpolate(heat[None].float(), size=(64, 64), mode="bilinear",
                                                    align_corners=False)[0]
        torch.testing.assert_close(low_res_heatmap(heat), reference, rtol=0, atol=1e-4)


def test_scaled_map_decode_stays_within_one_percent_of_the_reference() -> None:
    """map_decode='scaled' (DCT-domain decode of a JPEG map: 256 px at 1/4 scale; 224 px at 3/8,
    84 px, then bilinear to 64): after the blur, within 1% of the peak of the exact path; maps
    under 128 px fall back to the exact path."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for size in (256, 256, 224, 224):
        image, heat = synthetic_image(rng, size)
        data = encode_clickme(image, heat, 3)
        exact = decode_clickme(data, "r", map_decode="exact").heatmap
        scaled = decode_clickme(data, "r", map_decode="scaled").heatmap
        assert exact.shape == scaled.shape == (1, 64, 64) and not torch.equal(exact, scaled)
        reference, ours = blur_low_map(exact, (224, 224)), blur_low_map(scaled, (224, 224))
        worst = max(worst, float((ours - reference).abs().max() / reference.max()))
    assert worst < 0.01
    image, heat = synthetic_image(rng, 96)  # under 128 px: the exact path
    data = encode_clickme(image, heat, 3)
    assert torch.equal(decode_clickme(data, "r", map_decode="scaled").heatmap,
                       decode_clickme(data, "r", map_decode="exact").heatmap)
    full = decode_clickme(data, "r").heatmap
    assert full.shape == (1, 96, 96) and full.dtype == torch.float32 and full.max() <= 1


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
    ds[1]
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
    for map_decode in ("exact", "scaled"):  # the DCT-scaled map decode names the same errors
        ds = ClickMeRecords(path, num_classes=10, size=32, map_decode=map_decode)
        with pytest.raises(BadSampleError, match=rf"b\.tfrecords, record 1: .*{message}"):
            ds[1]
        skipping = ClickMeRecords(path, num_classes=10, size=32, skip_bad_samples=True, map_decode=map_decode)
        assert skipping[0] is not None and skipping[1] is None and skipping[2] is not None
        assert skipping.skips.skipped == 1


def test_record_files_by_folder_glob_or_list(tmp_path: Path) -> None:
    from harmonia.data.validate import expand_files

    for name in ("train-00000-of-00002", "train-00001-of-00002"):  # TF-style names, no suffix
        records(tmp_path / "tf" / name, count=2, size=16)
    ds = ClickMeRecords(str(tmp_path / "tf"), num_classes=10, size=16)  # writes .idx files beside them
    assert len(ds) == 4 and len(list((tmp_path / "tf").glob("*.idx"))) == 2
    assert len(ClickMeRecords(str(tmp_path / "tf" / "train-*"), num_classes=10, size=16)) == 4  # .idx ignored
    records(tmp_path / "mixed" / "a.tfrecords", count=1, size=16)
    (tmp_path / "mixed" / "README").write_text("not a record")
    assert [p.name for p in expand_files(str(tmp_path / "mixed"), (".tfrecords",))] == ["a.tfrecords"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        expand_files(str(tmp_path / "nothing-*"), (".tfrecords",))
