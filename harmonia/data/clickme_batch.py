"""Reading a whole batch of ClickMe records in one call (``ClickMeRecords.__getitems__``).

Why: a DataLoader worker decoding 224-px records spends ~0.33 ms per image in libjpeg-turbo
and, sample by sample, about as much again around it: a Python file object, a dict built
from every Example feature, one small tensor and NamedTuple per field and sample, then
``default_collate`` copying everything into the batch. Given the whole batch of indices
(DataLoader calls ``__getitems__`` when a dataset has it), a worker instead, per record: two
``os.pread`` calls and both CRCs, the Example parsed with only the three ClickMe features
looked up, the image JPEG decoded straight into its slot of the preallocated uint8 batch,
the heatmap JPEG into a uint8 slot (at 64 px in the DCT domain with ``map_decode="scaled"``);
then once per batch: the maps' 64-px resampling and float conversion, the labels' tensor.

The result equals what ``__getitem__`` + ``collate_samples`` give, value for value (tested),
including every error and skip: a record that is not the plain JPEG schema (raw float32
arrays, PNG, extra features, anything the fast path does not recognise or that simplejpeg
refuses) is read by the per-sample path (``ClickMeRecords.read``) and copied into its slot.
Errors are raised in record order, as sample by sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import simplejpeg
import torch
from google.protobuf.message import DecodeError

from harmonia.data.collate import CollatedBatch
from harmonia.data.device_geometry import DecodedSample, decoded_sample
from harmonia.data.errors import BadSampleError
from harmonia.data.example import Example
from harmonia.data.heatmap import LOW_RES, low_res_heatmap, scaled_map_pixels
from harmonia.data.jpeg import JPEG_SIGNATURE, jpeg_size
from harmonia.data.tfrecord import pread_record
from harmonia.data.validate import check_label, check_map_size

if TYPE_CHECKING:
    from harmonia.data.clickme import ClickMeRecords



def jpeg_fields(data: bytes) -> tuple[bytes, bytes, int] | None:
    """``(image JPEG, heatmap JPEG, label)`` of a record holding exactly the three ClickMe
    features as one JPEG each and one int64; None for anything else (unparsable included)."""
    try:
        feature = Example.FromString(data).features.feature
    except DecodeError:
        return None
    if len(feature) != 3:  # height/width/click_count or foreign features: the general path checks them
        return None
    image, heatmap, label = feature["image"].bytes_list.value, feature["heatmap"].bytes_list.value, \
        feature["label"].int64_list.value
    if len(image) != 1 or len(heatmap) != 1 or len(label) != 1:
        return None
    image, heatmap = image[0], heatmap[0]
    if not (image.startswith(JPEG_SIGNATURE) and heatmap.startswith(JPEG_SIGNATURE)):
        return None
    return image, heatmap, label[0]


def _batch_tensor(*shape: int) -> torch.Tensor:
    """An uninitialized uint8 tensor; in a DataLoader worker in shared memory, as
    ``default_collate`` allocates it, so that handing the batch over copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class _Batch:
    """Preallocated uint8 slots for one batch; filled row by row, finished once.

    ``scratch``: a dict kept by the dataset (one per process) holding the full-size map
    buffer between batches: it never leaves the worker, and fresh memory would cost a page
    fault per 4 KB on every batch.
    """

    def __init__(self, n: int, map_decode: str, scratch: dict) -> None:
        self.n, self.scaled, self.scratch = n, map_decode == "scaled", scratch
        self.images: torch.Tensor | None = None  # (n,H,W,3) uint8, allocated at the first record's size
        self.full_maps: torch.Tensor | None = None  # (n,H,W,1) uint8 full-size maps (exact decode), scratch
        self.small: list[np.ndarray | None] = [None] * n  # maps decoded DCT-scaled (h,w,1) uint8
        self.low = torch.empty(n, 1, LOW_RES, LOW_RES)  # the 64-px maps, float in [0, 1]
        self.kind = np.zeros(n, np.int8)  # per row: 0 general path (low written), 1 scaled, 2 full
        self.labels: list[int] = []

    def image_slot(self, row: int, height: int, width: int) -> np.ndarray | None:
        """The row's (H,W,3) uint8 slot, or None if the batch's images have another size."""
        if self.images is None:
            self.images = _batch_tensor(self.n, height, width, 3)
            self._images_np = self.images.numpy()
        if self.images.shape[1:3] != (height, width):
            return None
        return self._images_np[row]

    def decode_map(self, row: int, data: bytes, side: tuple[int, int]) -> bool:
        """Decode the row's heatmap JPEG (size already checked) into its uint8 slot."""
        if self.scaled:
            small = scaled_map_pixels(data, side)
            if small is not None:
                self.small[row], self.kind[row] = small, 1
                return True
        if self.full_maps is None:
            maps = self.scratch.get("maps")
            if maps is None or maps.shape[1:3] != self.images.shape[1:3] or len(maps) < self.n:
                maps = self.scratch["maps"] = torch.empty(self.n, *self.images.shape[1:3], 1, dtype=torch.uint8)
            self.full_maps = maps[: self.n]
            self._full_np = self.full_maps.numpy()
        simplejpeg.decode_jpeg(data, colorspace="GRAY", buffer=self._full_np[row])
        self.kind[row] = 2
        return True

    def put(self, row: int, sample: DecodedSample, where: str) -> None:
        """Copy a sample read by the per-sample path into the row."""
        height, width = sample.image.shape[:2]
        if self.image_slot(row, height, width) is None:
            raise ValueError(f"{where}: image is {height}×{width} but the batch's are "
                             f"{tuple(self.images.shape[1:3])}; augment_on='device' needs one size per batch")
        self.images[row] = sample.image
        self.low[row] = sample.low_map
        self.kind[row] = 0

    def finish(self, rows: int) -> DecodedSample:
        """The collated batch of the first ``rows`` rows: 64-px maps to float, once for all."""
        kind = self.kind[:rows]
        scaled = np.flatnonzero(kind == 1)
        shapes = {self.small[k].shape for k in scaled}
        if len(shapes) == 1:  # the usual case: one size, one batched resampling
            small = torch.from_numpy(np.stack([self.small[k] for k in scaled])).permute(0, 3, 1, 2)
            self.low[torch.from_numpy(scaled)] = low_res_heatmap(small).div_(255.0)
        else:
            for k in scaled:
                self.low[k] = low_res_heatmap(torch.from_numpy(self.small[k]).permute(2, 0, 1)).div_(255.0)
        full = np.flatnonzero(kind == 2)
        if len(full) == rows:  # one kind for the whole batch: no gather
            self.low[:rows] = low_res_heatmap(self.full_maps[:rows].permute(0, 3, 1, 2), self.scratch).div_(255.0)
        elif len(full):
            picked = self.full_maps[torch.from_numpy(full)].permute(0, 3, 1, 2)
            self.low[torch.from_numpy(full)] = low_res_heatmap(picked, self.scratch).div_(255.0)
        images = self.images[:rows] if self.images is not None else torch.empty(0, 0, 0, 3, dtype=torch.uint8)
        return DecodedSample(images, self.low[:rows], torch.tensor(self.labels, dtype=torch.int64))


def read_decoded_batch(dataset: ClickMeRecords, indices: Sequence[int]) -> CollatedBatch:
    """Records ``indices`` of ``dataset`` (``augment_on="device"``) as one collated
    :class:`DecodedSample` batch, bad ones raised or (``skip_bad_samples``) left out and counted."""
    batch = _Batch(len(indices), dataset.map_decode, dataset.scratch)
    rows: list[int | None] = []
    kept = 0
    for i in indices:
        try:
            _read_into(dataset, int(i), batch, kept)
        except BadSampleError as err:
            if not dataset.skip_bad_samples:
                raise
            dataset.skips.add_skipped(err)
            rows.append(None)
            continue
        rows.append(kept)
        kept += 1
    dataset.skips.add_read(kept)
    return CollatedBatch(batch.finish(kept), rows)


def _read_into(dataset: ClickMeRecords, i: int, batch: _Batch, row: int) -> None:
    """Record ``i`` into ``batch`` row ``row``: the fast JPEG path, else the per-sample path."""
    number = int(dataset.owners[i])
    path, local = dataset.files[number], int(dataset.local_index[i])
    data = pread_record(dataset.fd(number), int(dataset.offsets[i]), path, local, dataset.verify_crc)
    fields = jpeg_fields(data)
    if fields is not None and _decode_fast(fields, batch, row, dataset, i):
        label = fields[2]
        if label < 0 or label >= dataset.num_classes:
            check_label(label, dataset.num_classes, dataset.where(i))
        batch.labels.append(label)
        return
    record = dataset.decode(data, i)
    batch.put(row, decoded_sample(record.image, record.heatmap, record.label), dataset.where(i))
    batch.labels.append(record.label)


def _decode_fast(fields: tuple[bytes, bytes, int], batch: _Batch, row: int, dataset: ClickMeRecords, i: int) -> bool:
    """Decode a plain JPEG record into the row; False where the general path must take over."""
    image, heatmap, _ = fields
    size, map_size = jpeg_size(image), jpeg_size(heatmap)
    if size is None or map_size is None:
        return False
    slot = batch.image_slot(row, *size)
    if slot is None:
        return False  # another size: the general path names it
    try:
        simplejpeg.decode_jpeg(image, colorspace="RGB", buffer=slot)
    except ValueError:
        return False  # CMYK, corrupt, …: torchvision decodes it or names the problem
    if map_size != size:
        check_map_size(map_size, size, dataset.where(i))
    try:
        return batch.decode_map(row, heatmap, map_size)
    except ValueError:
        return False
