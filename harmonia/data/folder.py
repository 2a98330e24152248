"""An image folder a user can make by hand: ``images/``, ``maps/`` and a CSV index.

Layout::

    root/
      index.csv            path,label[,map]   (header line required)
      images/cat/001.jpg   any format torchvision.io decodes (JPEG, PNG, WebP, GIF)
      maps/cat/001.png     8/16-bit greyscale PNG (scaled to [0, 1]) or .npy float (H,W)/(1,H,W)

``path`` is relative to ``images/``, ``map`` to ``maps/``. A map must have its image's size
and be finite and >= 0.

Which samples have a map:
- with a ``map`` column, exactly the rows whose cell is not empty; a named map file that does
  not exist is an **error** (a typo must not silently turn into "no map");
- without one, a sample has a map when ``maps/`` holds a file with the image's relative name
  and suffix ``.npy`` or ``.png`` (found by one scan of ``maps/``); the count is in
  ``mapped_count``. Samples without a map carry a zero map and ``has_map=False``: that is the
  batch contract, and they train the classification objective only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from harmonia.data.errors import BadSampleError, SkipCounter
from harmonia.data.jpeg import decode_bytes
from harmonia.data.sample import Sample
from harmonia.data.transforms import JointTransform
from harmonia.data.validate import check_label, check_map

MAP_SUFFIXES = (".npy", ".png")


def _read_index(csv_path: Path) -> tuple[list[str], list[str], list[str | None], bool, list[int]]:
    """``(paths, labels, maps, has_map_column, line numbers)`` of an index file."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: a BOM (Excel) is not part of the header
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["path", "label"] or len(header) > 3 or (len(header) == 3 and header[2] != "map"):
            raise BadSampleError(f"{csv_path}, line 1", f"header must be 'path,label' or 'path,label,map'; got {header}")
        has_map_column = len(header) == 3
        paths, labels, maps, lines = [], [], [], []
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) not in (2, 3) or (len(row) == 3 and not has_map_column):
                raise BadSampleError(f"{csv_path}, line {line}", f"expected {len(header)} columns; got {row}")
            paths.append(row[0].strip())
            labels.append(row[1].strip())
            maps.append(row[2].strip() or None if len(row) == 3 else None)
            lines.append(line)
    return paths, labels, maps, has_map_column, lines


def _scan_maps(maps_dir: Path) -> dict[str, str]:
    """``{relative name without suffix: relative file name}`` of every map under ``maps_dir``."""
    found: dict[str, str] = {}
    for folder, _, names in os.walk(maps_dir):
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in MAP_SUFFIXES:
                rel = os.path.relpath(os.path.join(folder, stem), maps_dir)
                found.setdefault(rel, os.path.relpath(os.path.join(folder, name), maps_dir))
    return found


def load_map(path: Path, where: str) -> Tensor:
    """A map file as float ``(1,H,W)``: ``.npy`` values as stored, PNG scaled to [0, 1]."""
    if not path.is_file():
        raise BadSampleError(where, f"map file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if not np.issubdtype(array.dtype, np.number):
                raise BadSampleError(where, f"map {path} has dtype {array.dtype}, expected numbers")
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if suffix == ".png":
            raw = decode_bytes(path.read_bytes(), gray=True)
            scale = 65535.0 if raw.dtype == torch.uint16 else 255.0
            return raw.float() / scale
    except (RuntimeError, ValueError, OSError) as err:
        raise BadSampleError(where, f"cannot read map {path}: {err}") from None
    raise BadSampleError(where, f"map {path}: unsupported suffix {suffix!r} (use .png or .npy)")


def load_image(path: Path, where: str) -> Tensor:
    """An image file as uint8 RGB ``(3,H,W)``."""
    if not path.is_file():
        raise BadSampleError(where, f"image file {path} does not exist")
    try:
        return decode_bytes(path.read_bytes(), gray=False)
    except (RuntimeError, ValueError, OSError) as err:
        raise BadSampleError(where, f"cannot decode image {path}: {err}") from None


class FolderDataset(Dataset):
    """Samples listed in ``root/<index>`` (see the module docstring for the layout).

    Args:
        root: the folder holding ``images/``, ``maps/`` and the index.
        index: the CSV file name (relative to ``root``) or an absolute path.
        num_classes: labels must lie in ``[0, num_classes)``; None checks only ``>= 0``.
        size: output side when ``transform`` is None (a plain resize).
        transform: a :class:`JointTransform` (e.g. the training one).
        skip_bad_samples: as in :class:`~harmonia.data.clickme.ClickMeRecords`.
    """

    def __init__(
        self,
        root: str,
        index: str = "index.csv",
        num_classes: int | None = None,
        size: int = 224,
        transform: JointTransform | None = None,
        skip_bad_samples: bool = False,
    ) -> None:
        self.root = Path(root)
        self.csv_path = self.root / index
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"{self.csv_path}: index file not found (expected CSV 'path,label[,map]')")
        paths, labels, maps, has_map_column, self.lines = _read_index(self.csv_path)
        self.images_dir, self.maps_dir = self.root / "images", self.root / "maps"
        self.num_classes, self.skip_bad_samples = num_classes, skip_bad_samples
        self.transform = transform or JointTransform(size, train=False)
        self.skips = SkipCounter()
        self.paths = paths
        self.labels = self._parse_labels(labels)
        if not has_map_column:
            available = _scan_maps(self.maps_dir) if self.maps_dir.is_dir() else {}
            maps = [available.get(os.path.splitext(p)[0]) for p in paths]
        self.maps = maps
        self.mapped_count = sum(m is not None for m in maps)

    def _parse_labels(self, labels: Sequence[str]) -> np.ndarray:
        """Labels as int64; a malformed one is an error (or -1, skipped on read, when skipping)."""
        out = np.empty(len(labels), dtype=np.int64)
        for i, text in enumerate(labels):
            try:
                out[i] = int(text)
            except ValueError:
                if not self.skip_bad_samples:
                    raise BadSampleError(self.where(i), f"label {text!r} is not an integer") from None
                out[i] = -1
        return out

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """``"<index.csv>, line <n> (<image path>)"``."""
        return f"{self.csv_path}, line {self.lines[i]} ({self.paths[i]})"

    def read(self, i: int) -> tuple[Tensor, Tensor | None, int]:
        """Decoded image (uint8), map (float or None) and label of sample ``i``, all checked."""
        where = self.where(i)
        label = check_label(int(self.labels[i]), self.num_classes, where)
        image = load_image(self.images_dir / self.paths[i], where)
        human_map = None
        if self.maps[i] is not None:
            human_map = check_map(load_map(self.maps_dir / self.maps[i], where), image.shape[-2:], where)
        return image, human_map, label

    def __getitem__(self, i: int) -> Sample | None:
        decoded = self.skips.read_or_skip(lambda: self.read(i), self.skip_bad_samples)
        if decoded is None:
            return None
        image, human_map, label = decoded
        has_map = human_map is not None
        if human_map is None:
            human_map = torch.zeros((1, *image.shape[-2:]))
        image, human_map = self.transform(image, human_map)
        return Sample(image, human_map, torch.tensor(has_map), torch.tensor(label, dtype=torch.int64))
