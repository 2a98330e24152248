"""``harmonia convert``: a folder or ClickMe records → WebDataset tar shards.

    harmonia convert SOURCE OUT [--max-count 1000] [--prefix shard] [--num-classes 1000] [--skip-bad-samples]

SOURCE is a folder with ``index.csv`` (see :mod:`harmonia.data.folder`) or ClickMe TFRecords
(a file, a folder of ``*.tfrecords``, or a glob). Every sample is decoded and checked exactly
as training would read it, so bad data is found now, with the file and record/line named,
not hours into a run; ``--skip-bad-samples`` leaves such samples out and says how many.
Encoded images and maps are copied byte for byte (no re-encoding, no quality loss); raw float
arrays are stored as ``.npy``. ClickMe heatmaps are stored raw and blurred at read time.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harmonia.data.clickme import IMAGE_SIGNATURES, ClickMeRecords, decode_clickme
from harmonia.data.errors import BadSampleError
from harmonia.data.folder import FolderDataset
from harmonia.data.shards import ShardWriter


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _suffix(data: bytes) -> str:
    return "jpg" if data.startswith(IMAGE_SIGNATURES[0]) else "png"


def folder_samples(root: str, num_classes: int | None, skip: bool, skipped: list[str]) -> Iterator[dict[str, Any]]:
    """Tar samples of a folder dataset, each checked by decoding it."""
    dataset = FolderDataset(root, num_classes=num_classes, skip_bad_samples=skip)
    for i in range(len(dataset)):
        try:
            dataset.read(i)
        except BadSampleError as err:
            if not skip:
                raise
            skipped.append(str(err))
            continue
        image_path = dataset.images_dir / dataset.paths[i]
        sample = {"__key__": f"{i:09d}", "cls": str(int(dataset.labels[i])).encode(),
                  "json": json.dumps({"source": dataset.where(i)}).encode()}
        extension = image_path.suffix.lower().lstrip(".")
        sample["jpg" if extension in ("jpg", "jpeg") else extension] = image_path.read_bytes()
        if dataset.maps[i] is not None:
            map_path = dataset.maps_dir / dataset.maps[i]
            sample[f"map.{map_path.suffix.lower().lstrip('.')}"] = map_path.read_bytes()
        yield sample


def clickme_samples(source: str | Sequence[str], num_classes: int, skip: bool,
                    skipped: list[str]) -> Iterator[dict[str, Any]]:
    """Tar samples of ClickMe records, each checked by decoding it as training does (CRCs included)."""
    records = ClickMeRecords(source, num_classes, skip_bad_samples=skip)
    skipped.extend(f"{err} (rest of the file)" for err in records.index.damaged)
    for i in range(len(records)):
        where = records.where(i)
        try:
            record = records.record(i)
            decode_clickme(record, where, num_classes, records.raw_image_range)  # checks the map too
        except BadSampleError as err:
            if not skip:
                raise
            skipped.append(str(err))
            continue
        sample = {"__key__": f"{i:09d}", "cls": str(record.label).encode(),
                  "json": json.dumps({"source": where, "click_count": record.click_count}).encode()}
        if isinstance(record.image, bytes):
            sample[_suffix(record.image)] = record.image
        else:  # raw float32: stored in [0, 1], as the shard reader expects
            sample["image.npy"] = _npy(record.image.numpy() / records.raw_image_range)
        if isinstance(record.heatmap, bytes):
            sample[f"map.{_suffix(record.heatmap)}"] = record.heatmap
        else:
            sample["map.npy"] = _npy(record.heatmap.numpy())
        yield sample


def convert(source: str, out: str, max_count: int = 1000, prefix: str = "shard", num_classes: int | None = None,
            skip_bad_samples: bool = False) -> dict[str, Any]:
    """Convert ``source`` (folder with index.csv, or ClickMe records) into shards under ``out``.

    Returns the manifest, with ``skipped`` (the reasons) added. Zero samples to write (an empty
    source, or every sample skipped) is a ``ValueError``, and ``out`` is left as it was: shards
    of nothing would train nothing, silently.
    """
    skipped: list[str] = []
    created = not Path(out).exists()  # an output folder we make is removed again on failure
    if Path(source).is_dir() and (Path(source) / "index.csv").is_file():
        samples = folder_samples(source, num_classes, skip_bad_samples, skipped)
        writer = ShardWriter(out, prefix, max_count, map_preprocessing="none")
    else:
        samples = clickme_samples(source, num_classes or 1000, skip_bad_samples, skipped)
        writer = ShardWriter(out, prefix, max_count, map_preprocessing="clickme")
    try:
        written = 0
        for sample in samples:
            writer.write(sample)
            written += 1
        if written == 0:
            reason = f" (all {len(skipped)} skipped as bad; first: {skipped[0]})" if skipped else ""
            raise ValueError(f"{source}: no samples to convert{reason}")
    except BaseException:
        writer.abort()
        if created and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()
        raise
    manifest = writer.close()
    manifest["skipped"] = skipped
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry of ``harmonia convert``."""
    parser = argparse.ArgumentParser(prog="harmonia convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder with index.csv, or ClickMe TFRecords (file, folder or glob)")
    parser.add_argument("out", help="output folder for the shards and shards.json")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--prefix", default="shard", help="shard file prefix (default 'shard')")
    parser.add_argument("--num-classes", type=int, default=None, help="labels must be below this")
    parser.add_argument("--skip-bad-samples", action="store_true", help="leave bad samples out instead of failing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"harmonia convert: output {out} exists and is a file, not a folder; give a new folder")
    if (out / "shards.json").exists():
        raise SystemExit(f"harmonia convert: {out} already holds converted shards (shards.json); "
                         "remove them or give another folder")
    try:
        manifest = convert(args.source, args.out, args.max_count, args.prefix, args.num_classes, args.skip_bad_samples)
    except (BadSampleError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"harmonia convert: {err}") from None
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shard(s) to {args.out}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} bad sample(s); first: {manifest['skipped'][0]}")
