"""WebDataset tar shards: streaming on many GPUs and nodes, each sample once per epoch.

A shard set is a folder of ``<prefix>-000000.tar`` files (WebDataset format, read and written
with ``webdataset``) and a manifest ``shards.json`` listing every shard with its sample
count. One sample is the tar members sharing a key:

    <key>.jpg | .png | .webp | image.npy   the image (encoded bytes kept as converted, or float32 (3,H,W) in [0,1])
    <key>.map.png | .map.jpg | .map.npy    the human map (optional: no member → has_map False)
    <key>.cls                              the label, decimal text
    <key>.json                             where it came from (file and record / CSV line)

The manifest's ``map_preprocessing`` says how maps are turned into training maps:
``"clickme"`` (raw ClickMe heatmaps, a lossless repackaging of the records: samples are
decoded exactly as records are, into :class:`~harmonia.data.clickme.ClickMeSample`, and
blurred, cropped and flipped batched on the training device) or ``"none"`` (maps used as
stored: samples are cropped in the worker by a :class:`JointTransform`, as image folders).

**Splitting.** Every epoch the shard list is shuffled with ``(seed, epoch)`` (the same on all
ranks). Shard ``j`` goes to rank ``j mod world``; a rank's ``k``-th shard goes to its worker
``k mod num_workers``. Ranks and workers therefore read disjoint shards: no sample is seen twice
in an epoch. DDP needs the same number of batches on every rank, so each worker slot ``w``
stops after ``min over ranks`` of the samples assigned to slot ``w`` (from the manifest's
counts, no communication needed); with equal shards this drops at most the ``world − 1``
shards that do not divide evenly, and a different set every epoch. A warning says how many.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.io import ImageReadMode

from harmonia.data.clickme import ClickMeSample, clickme_sample
from harmonia.data.errors import BadSampleError, SkipCounter
from harmonia.data.heatmap import INTEGER_SCALE
from harmonia.data.jpeg import decode_bytes
from harmonia.data.sample import Sample
from harmonia.data.transforms import JointTransform
from harmonia.data.validate import check_label, check_map

MANIFEST = "shards.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image.npy")
MAP_KEYS = ("map.png", "map.jpg", "map.npy")


class ShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples, plus the manifest.

    Each shard is written to a temporary file and renamed when complete; the manifest is
    written last, so a folder with a manifest holds only complete shards.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_count: int = 1000,
                 map_preprocessing: str = "none") -> None:
        if max_count <= 0:
            raise ValueError(f"max_count must be positive; got {max_count}")
        self.out_dir, self.prefix, self.max_count = Path(out_dir), prefix, max_count
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.map_preprocessing = map_preprocessing
        self.shards: list[dict[str, Any]] = []
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._tmp = ""
        self._count = 0

    def _open(self) -> None:
        fd, self._tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".shard.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False)
        self._count = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # also closes the file object
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"name": name, "count": self._count})
        self._tar = None

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample: ``{"__key__": str, "<ext>": bytes, ...}``."""
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.max_count:
            self._finish_shard()

    def close(self) -> dict[str, Any]:
        """Finish the last shard and write the manifest; returns it."""
        self._finish_shard()
        manifest = {"format": "harmonia-shards/1", "map_preprocessing": self.map_preprocessing,
                    "total": sum(s["count"] for s in self.shards), "shards": self.shards}
        fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, self.out_dir / MANIFEST)
        return manifest

    def abort(self) -> None:
        """Remove the unfinished shard (finished ones stay, without a manifest)."""
        if self._tar is not None:
            self._tar.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._tar = None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a shard folder, checked (every listed shard must exist)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (write shards with `harmonia convert`)")
    manifest = json.loads(path.read_text())
    for shard in manifest.get("shards", []):
        if not (Path(folder) / shard["name"]).is_file():
            raise FileNotFoundError(f"{Path(folder) / shard['name']}: listed in {path} but missing")
    return manifest


def assign_shards(
    counts: list[int], world_size: int, num_workers: int, epoch: int, seed: int, shuffle: bool = True
) -> tuple[list[list[list[int]]], list[int]]:
    """Which shards each ``(rank, worker)`` reads this epoch, and each worker slot's quota.

    Returns ``(shards[rank][worker] = list of shard indices, quota[worker])``: the worker in
    slot ``w`` of *every* rank stops after ``quota[w]`` samples, so all ranks produce the same
    number of batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(counts)) if shuffle else np.arange(len(counts))
    plan: list[list[list[int]]] = [[[] for _ in range(num_workers)] for _ in range(world_size)]
    for position, shard in enumerate(order.tolist()):
        rank = position % world_size
        k = position // world_size
        plan[rank][k % num_workers].append(shard)
    quota = [min(sum(counts[s] for s in plan[r][w]) for r in range(world_size)) for w in range(num_workers)]
    return plan, quota


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardDataset(IterableDataset):
    """Stream samples from a shard folder, split by rank and worker (module docstring).

    ClickMe shards yield :class:`~harmonia.data.clickme.ClickMeSample` (as ClickMe records do);
    other shards yield ``Sample`` (through ``transform``).

    Args:
        folder: the shard folder (with ``shards.json``).
        num_classes: labels must lie in ``[0, num_classes)``; None checks only ``>= 0``.
        size: output side when ``transform`` is None (shards whose maps are used as stored).
        transform: a :class:`JointTransform` for shards whose maps are used as stored (None: a
            resize to ``size``); ClickMe shards are transformed batched, after the loader.
        shuffle: shuffle shards every epoch and samples in a buffer of ``shuffle_buffer``.
        seed: order seed, the same on every rank.
        skip_bad_samples: skip (and count) bad samples instead of raising.
        rank, world_size: override the process's place (default: torch.distributed, else the
            ``RANK``/``WORLD_SIZE`` variables, else 0/1).
        num_workers: the DataLoader's worker count (``__len__`` needs it to compute the quotas;
            iteration uses the real one).
    """

    def __init__(
        self,
        folder: str,
        num_classes: int | None = None,
        size: int = 224,
        transform: JointTransform | None = None,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        skip_bad_samples: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        manifest = read_manifest(folder)
        self.names = [s["name"] for s in manifest["shards"]]
        self.counts = [int(s["count"]) for s in manifest["shards"]]
        self.map_preprocessing = manifest.get("map_preprocessing", "none")
        if self.map_preprocessing not in ("clickme", "none"):
            raise ValueError(f"{folder}: unknown map_preprocessing {self.map_preprocessing!r} in {MANIFEST}")
        self.num_classes, self.size = num_classes, size
        self.transform = transform or JointTransform(size)
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.skip_bad_samples = skip_bad_samples
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.skips = SkipCounter()
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # seen by persistent workers

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order (call before iterating; shared with the workers)."""
        self._epoch.fill_(epoch)

    def _place(self) -> tuple[int, int, int, int]:
        rank, world = _dist_info()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world, worker, workers

    def _plan(self, world: int, workers: int) -> tuple[list[list[list[int]]], list[int]]:
        return assign_shards(self.counts, world, workers, int(self._epoch), self.seed, self.shuffle)

    def __len__(self) -> int:
        """Samples this rank yields in the current epoch (all its workers together)."""
        rank, world, _, _ = self._place()
        return sum(self._plan(world, max(self.num_workers, 1))[1])

    def __iter__(self) -> Iterator[Sample | ClickMeSample | None]:
        rank, world, worker, workers = self._place()
        plan, quota = self._plan(world, workers)
        if worker == 0 and rank == 0:
            unused = sum(self.counts) - world * sum(quota)
            if unused:
                warnings.warn(f"{self.folder}: {unused} of {sum(self.counts)} samples unused this epoch to keep "
                              f"{world} rank(s) × {workers} worker(s) equal; write more, equal shards to avoid it",
                              stacklevel=2)
        stream = self._samples(plan[rank][worker])
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _buffer_shuffle(stream, self.shuffle_buffer,
                                     np.random.default_rng([self.seed, int(self._epoch), rank, worker]))
        yielded = 0
        for sample in stream:
            if yielded >= quota[worker]:
                break
            yielded += 1
            yield sample

    def _samples(self, shards: list[int]) -> Iterator[Sample | ClickMeSample | None]:
        for shard in shards:
            url = str(self.folder / self.names[shard])
            position = -1
            try:
                for position, raw in enumerate(wds.tariterators.tarfile_samples([{"url": url}])):
                    yield self._decode(raw, f"{url}, sample {position} ({raw.get('__key__')})")
            except BadSampleError:
                raise
            except Exception as err:  # noqa: BLE001 - tar/IO errors come in many types
                error = BadSampleError(f"{url}, after sample {position}", f"unreadable shard: {err}")
                if not self.skip_bad_samples:
                    raise error from None
                self.skips.add_skipped(error)
                yield None  # keeps quotas honest: the lost sample still counts

    def _decode(self, raw: dict[str, Any], where: str) -> Sample | ClickMeSample | None:
        return self.skips.read_or_skip(lambda: self.decode(raw, where), self.skip_bad_samples)

    def decode(self, raw: dict[str, Any], where: str) -> Sample | ClickMeSample:
        """One tar sample (its members by extension) decoded and checked; errors name ``where``."""
        image, human_map, label = decode_shard_sample(raw, where, self.num_classes)
        if self.map_preprocessing == "clickme":
            return clickme_sample(image, human_map, label, where)
        has_map = human_map is not None
        if has_map:
            human_map = check_map(human_map, image.shape[-2:], where)
            scale = INTEGER_SCALE.get(human_map.dtype)
            human_map = human_map.float().div_(scale) if scale else human_map
        else:
            human_map = torch.zeros((1, *image.shape[-2:]))
        image, human_map = self.transform(image, human_map)
        return Sample(image, human_map, torch.tensor(has_map), torch.tensor(label, dtype=torch.int64))


def _load_npy(data: bytes, where: str, what: str) -> torch.Tensor:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise BadSampleError(where, f"{what}: not a .npy array ({err})") from None
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def decode_shard_sample(raw: dict[str, Any], where: str, num_classes: int | None) -> tuple:
    """``(image uint8 (3,H,W) or float in [0, 1], map or None, label)`` of one tar sample.

    The map is decoded but not yet checked or scaled: ``(1,H,W)`` uint8/uint16 (PNG/JPEG) or
    float (``.npy``, as stored).
    """
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise BadSampleError(where, f"no image member (one of {IMAGE_KEYS}); members: {sorted(k for k in raw if not k.startswith('__'))}")
    image = _decode_member(raw, image_key, where, "image", ImageReadMode.RGB)
    if "cls" not in raw:
        raise BadSampleError(where, "no label member (.cls)")
    try:
        label = int(raw["cls"].decode().strip())
    except ValueError:
        raise BadSampleError(where, f"label {raw['cls'][:20]!r} is not an integer") from None
    check_label(label, num_classes, where)
    map_key = next((k for k in MAP_KEYS if k in raw), None)
    if map_key is None:
        return image, None, label
    return image, _decode_member(raw, map_key, where, "map", ImageReadMode.GRAY), label


def _decode_member(raw: dict[str, Any], key: str, where: str, what: str, mode: ImageReadMode) -> torch.Tensor:
    """An image or map member: ``.npy`` as stored (float32), JPEG/PNG decoded (uint8/uint16)."""
    if key.endswith(".npy"):
        return _load_npy(raw[key], where, what)
    try:
        return decode_bytes(raw[key], gray=mode == ImageReadMode.GRAY)
    except (RuntimeError, ValueError) as err:
        raise BadSampleError(where, f"cannot decode {what} ({key}): {err}") from None


def _buffer_shuffle(stream: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream through a buffer of ``size`` items (WebDataset's approach, seeded)."""
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
