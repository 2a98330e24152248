"""Small data files for the data-layer tests: ClickMe records and hand-made folders."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg, encode_png

from harmonia.data.clickme import encode_clickme
from harmonia.data.synthetic import synthetic_image
from harmonia.data.tfrecord import TFRecordWriter


def records(path: Path, count: int = 6, size: int = 64, num_classes: int = 10, seed: int = 0) -> tuple[Path, list]:
    """JPEG ClickMe records; returns the file and the ``(image, heatmap, label)`` written."""
    rng = np.random.default_rng(seed)
    written = []
    with TFRecordWriter(path) as writer:
        for i in range(count):
            image, heat = synthetic_image(rng, size)
            image_bytes, heat_bytes = bytes(encode_jpeg(image, quality=90)), bytes(encode_png(heat))
            writer.write(encode_clickme(image_bytes, heat_bytes, i % num_classes))
            written.append((image_bytes, heat_bytes, i % num_classes))
    return path, written


def folder(root: Path, count: int = 6, size: int = 48, mapped: tuple[int, ...] = (0, 1, 2, 4), map_column: bool = True,
           labels: list[int] | None = None) -> Path:
    """``root/images``, ``root/maps`` (even: PNG, odd: .npy) and ``root/index.csv``."""
    rng = np.random.default_rng(1)
    (root / "images" / "a").mkdir(parents=True, exist_ok=True)
    (root / "maps" / "a").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, heat = synthetic_image(rng, size)
        name = f"a/{i:03d}.png"
        (root / "images" / name).write_bytes(bytes(encode_png(image)))
        map_name = ""
        if i in mapped:
            if i % 2 == 0:
                map_name = f"a/{i:03d}.png"
                (root / "maps" / map_name).write_bytes(bytes(encode_png(heat)))
            else:
                map_name = f"a/{i:03d}.npy"
                np.save(root / "maps" / map_name, heat[0].numpy().astype(np.float32) / 255.0)
        label = labels[i] if labels is not None else i % 3
        rows.append([name, str(label), map_name] if map_column else [name, str(label)])
    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "map"] if map_column else ["path", "label"])
        writer.writerows(rows)
    return root


def rewrite_index(root: Path, edit) -> None:
    """Apply ``edit(rows)`` to the rows (header excluded) of ``root/index.csv``."""
    with open(root / "index.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows = [rows[0]] + edit(rows[1:])
    with open(root / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def raw_record(image: torch.Tensor, heat: torch.Tensor, label: int) -> bytes:
    """A record with raw float32 image/heatmap arrays."""
    return encode_clickme(image.float(), heat.float(), label)
