"""Synthetic ClickMe-format data: smoke-test a pipeline or a config without the real files.

Images are photo-like (smooth colour fields, a few blobs, sensor noise: JPEG sizes close to
ImageNet's at 256 px) and each heatmap marks the brightest blob, so a label-to-location
relation exists. Used by the tests, ``benchmarks/data_throughput.py`` and the README's
smoke run; never a substitute for the real ClickMe data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harmonia.data.clickme import encode_clickme
from harmonia.data.tfrecord import TFRecordWriter


def synthetic_image(rng: np.random.Generator, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A photo-like uint8 image ``(3,size,size)`` and a uint8 heatmap ``(1,size,size)``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((3, size, size), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(2, 9, 3)
        image[c] = 0.5 + 0.25 * np.sin(a * xx + p) * np.cos(b * yy + c)
    heat = np.zeros((size, size), np.float32)
    for k in range(rng.integers(2, 5)):
        cy, cx, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        image += blob[None] * rng.uniform(-0.4, 0.4, (3, 1, 1)).astype(np.float32)
        if k == 0:
            heat = blob
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    to_u8 = lambda x: torch.from_numpy(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))  # noqa: E731
    return to_u8(image), to_u8(heat[None])


def write_synthetic_clickme(path: str | Path, count: int, size: int = 256, num_classes: int = 10, seed: int = 0,
                            quality: int = 90, raw: bool = False) -> Path:
    """Write ``count`` ClickMe records (JPEG, or raw float32 when ``raw``) to ``path``."""
    rng = np.random.default_rng(seed)
    with TFRecordWriter(path) as writer:
        for i in range(count):
            image, heat = synthetic_image(rng, size)
            if raw:
                writer.write(encode_clickme(image.float(), heat.float() / 255.0, i % num_classes, click_count=i))
            else:
                writer.write(encode_clickme(image, heat, i % num_classes, quality=quality))
    return Path(path)
