"""Checks every reader applies to a decoded sample before it enters a batch.

Each check raises :class:`~harmonia.data.errors.BadSampleError` naming the sample, so a bad
map or label stops the run with a message a user can act on (or is counted and skipped with
``skip_bad_samples=True``) instead of training on garbage.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from harmonia.data.errors import BadSampleError


def check_label(label: int, num_classes: int | None, where: str) -> int:
    """``label`` as an int in ``[0, num_classes)`` (no upper bound when ``num_classes`` is None)."""
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise BadSampleError(where, f"label {label} out of range {bound}")
    return int(label)


def check_map_size(map_hw: Sequence[int], image_hw: Sequence[int], where: str) -> None:
    """A human map must have its image's height and width."""
    if tuple(map_hw) != tuple(image_hw):
        raise BadSampleError(where, f"human map is {tuple(map_hw)} but the image is {tuple(image_hw)} (H, W)")


def check_map(human_map: Tensor, image_hw: Sequence[int], where: str) -> Tensor:
    """A human map ``(1,H,W)`` of the image's size, finite and >= 0.

    Unsigned 8/16-bit maps (decoded JPEG/PNG) cannot be NaN or negative: only their shape is
    checked, and they are returned as they are (the caller scales them). Float maps (raw
    arrays, ``.npy``) get the full check.
    """
    if human_map.dim() == 2:
        human_map = human_map[None]
    if human_map.dim() != 3 or human_map.shape[0] != 1:
        raise BadSampleError(where, f"human map must be (H,W) or (1,H,W); got shape {tuple(human_map.shape)}")
    check_map_size(human_map.shape[-2:], image_hw, where)
    if human_map.dtype in (torch.uint8, torch.uint16):
        return human_map
    human_map = human_map.float()  # any other dtype gets the value checks
    low, high = (float(v) for v in human_map.aminmax())  # NaN propagates: two cheap reductions
    if not (math.isfinite(low) and math.isfinite(high)):
        raise BadSampleError(where, f"human map has {int((~torch.isfinite(human_map)).sum())} NaN/inf value(s)")
    if low < 0:
        raise BadSampleError(where, f"human map has negative values (min {low:.4g}); maps must be >= 0")
    return human_map


def expand_files(spec: str | Sequence[str], suffixes: Sequence[str]) -> list[Path]:
    """Files named by ``spec``: a folder, a glob, or a list of them.

    A folder contributes its files ending with one of ``suffixes`` or, when it has none, all
    its files (TensorFlow shards are often named ``train-00000-of-00318``). Index caches
    (``*.idx``) and hidden files (temporary files of an interrupted write) never count. The
    result is sorted: a stable order keeps indices and shard assignments reproducible.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    files: list[Path] = []
    for item in specs:
        item = str(item)
        if os.path.isdir(item):
            found = [p for p in Path(item).iterdir() if p.is_file() and _is_data(p)]
            matching = [p for p in found if any(p.name.endswith(s) for s in suffixes)]
            found = matching or found
        elif any(c in item for c in "*?["):
            found = [p for p in map(Path, glob.glob(item)) if p.is_file() and _is_data(p)]
        else:
            found = [Path(item)]
        if not found:
            raise FileNotFoundError(f"no files match {item!r} (expected {', '.join(suffixes)} files)")
        for path in found:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
        files.extend(sorted(found))
    return files


def _is_data(path: Path) -> bool:
    return not path.name.startswith(".") and not path.name.endswith(".idx")
