"""Reading a whole batch of ClickMe records in one call (``ClickMeRecords.__getitems__``).

Why: a DataLoader worker decoding 224-px records spends ~0.33 ms per image in libjpeg-turbo
and, sample by sample, about as much again around it: a Python file object, a dict built
from every Example feature, one small tensor and NamedTuple per field and sample, then
``default_collate`` copying everything into the batch. Given the whole batch of indices
(DataLoader calls ``__getitems__`` when a dataset has it), a worker instead, per record: two
``os.pread`` calls and both CRCs, the Example parsed with only the three ClickMe features
looked up, the image JPEG decoded straight into its slot of the preallocated uint8 batch,
the heatmap JPEG into a uint8 slot (at 64-88 px in the DCT domain with ``map_decode="scaled"``);
then once per batch the labels' tensor. DCT-scaled maps of one size (the usual case) are
shipped as those uint8 pixels: the training device takes the bilinear step to 64 px
(:func:`~harmonia.data.device_geometry.low_maps`); a batch whose maps came different ways gets
its 64-px float maps here.

The result equals what ``__getitem__`` + ``collate_samples`` give, value for value once its
maps are through :func:`~harmonia.data.device_geometry.low_maps` (tested),
including every error and skip: a record that is not the plain JPEG schema (raw float32
arrays, PNG, extra features, anything the fast path does not recognise or that simplejpeg
refuses) is read by the per-sample path (``ClickMeRecords.read``) and copied into its slot.
Errors are raised in record order, as sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import simplejpeg
import torch
from google.protobuf.message import DecodeError

from harmonia.data.collate import CollatedBatch
from harmonia.data.device_geometry import DecodedSample, decoded_sample, device_batch_bytes
from harmonia.data.errors import BadSampleError
from harmonia.data.example import Example
from harmonia.data.heatmap import LOW_RES, low_res_heatmap
from harmonia.data.jpeg import JPEG_SIGNATURE, jpeg_size
from harmonia.data.shared_batch import Block, new_block
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


class _Batch:
    """Preallocated uint8 slots for one batch; filled row by row, finished once.

    ``scratch``: a dict kept by the dataset (one per process) holding the full-size map
    buffer between batches: it never leaves the worker, and fresh memory would cost a page
    fault per 4 KB on every batch.

    The batch's tensors (and those :class:`~harmonia.data.device_geometry.DeviceCollate`
    adds) are views of one :class:`~harmonia.data.shared_batch.Block`, allocated at the first
    record's size: in a DataLoader worker a recycled block of shared memory, so that handing
    the batch over copies nothing and faults in no fresh pages. The block's map span holds
    either the 64-px float maps or, when every map of the batch was DCT-scaled to one size
    (ClickMe's case), those uint8 pixels as decoded: the training device then takes the
    bilinear step to 64 px (:func:`~harmonia.data.device_geometry.low_maps`), so the worker
    does no map arithmetic at all.
    """

    def __init__(self, n: int, map_decode: str, scratch: dict) -> None:
        self.n, self.scaled, self.scratch = n, map_decode == "scaled", scratch
        self.block: Block | None = None
        self.images: torch.Tensor | None = None  # (n,H,W,3) uint8, allocated at the first record's size
        self.low: torch.Tensor | None = None  # (n,1,64,64) float view of the block's map span
        self.small_shape: tuple[int, int] | None = None  # the batch's DCT-scaled map size, from its first scaled map
        self.small_u8: np.ndarray | None = None  # (n,h,w,1) uint8 view of the same span: maps of that size
        self.small: list[np.ndarray | None] = [None] * n  # DCT-scaled maps of another size (rare)
        self.general: list[torch.Tensor | None] = [None] * n  # 64-px maps from the per-sample path
        self.full_maps: torch.Tensor | None = None  # (n,H,W,1) uint8 full-size maps (exact decode), scratch
        self.kind = np.zeros(n, np.int8)  # per row: 0 general path, 1 scaled (span), 2 full, 3 scaled (other size)
        self.labels: list[int] = []

    def image_slot(self, row: int, height: int, width: int) -> np.ndarray | None:
        """The row's (H,W,3) uint8 slot, or None if the batch's images have another size."""
        if self.images is None:
            self.block = new_block(device_batch_bytes(self.n, height, width))
            self.images = self.block.take((self.n, height, width, 3), torch.uint8)
            self._map_offset = self.block.used
            self.low = self.block.take((self.n, 1, LOW_RES, LOW_RES), torch.float32)
            self._images_np = self.images.numpy()
        if self.images.shape[1:3] != (height, width):
            return None
        return self._images_np[row]

    def decode_map(self, row: int, data: bytes, side: tuple[int, int]) -> bool:
        """Decode the row's heatmap JPEG (size already checked) into its uint8 slot."""
        if self.scaled and min(side) >= 2 * LOW_RES and self._decode_scaled(row, data):
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

    def _decode_scaled(self, row: int, data: bytes) -> bool:
        """The row's map decoded in the DCT domain (:func:`~harmonia.data.heatmap.scaled_map_pixels`),
        into the block's map span when it has the batch's scaled size; False if simplejpeg refuses it."""
        scaled = {"colorspace": "GRAY", "min_height": LOW_RES, "min_width": LOW_RES}
        try:
            shape = tuple(simplejpeg.decode_jpeg_header(data, min_height=LOW_RES, min_width=LOW_RES)[:2])
            if self.small_shape is None and shape[0] * shape[1] <= 4 * LOW_RES * LOW_RES:  # fits the float span
                self.small_shape = shape
                self.small_u8 = self.block.view_at(self._map_offset, (self.n, *shape, 1), torch.uint8).numpy()
            if shape == self.small_shape:
                simplejpeg.decode_jpeg(data, buffer=self.small_u8[row], **scaled)
                self.kind[row] = 1
            else:
                self.small[row], self.kind[row] = simplejpeg.decode_jpeg(data, **scaled), 3
        except ValueError:
            return False  # the full decode takes over (and names a truly undecodable map)
        return True

    def put(self, row: int, sample: DecodedSample, where: str) -> None:
        """Copy a sample read by the per-sample path into the row."""
        height, width = sample.image.shape[:2]
        if self.image_slot(row, height, width) is None:
            raise ValueError(f"{where}: image is {height}×{width} but the batch's are "
                             f"{tuple(self.images.shape[1:3])}; augment_on='device' needs one size per batch")
        self.images[row] = sample.image
        self.general[row] = sample.low_map
        self.kind[row] = 0

    def finish(self, rows: int) -> DecodedSample:
        """The collated batch of the first ``rows`` rows."""
        if self.block is None:  # no record kept
            return DecodedSample(torch.empty(0, 0, 0, 3, dtype=torch.uint8), torch.empty(0, 1, LOW_RES, LOW_RES),
                                 torch.empty(0, dtype=torch.int64))
        if rows and (self.kind[:rows] == 1).all():  # every map DCT-scaled to one size: shipped as decoded
            maps = self.block.view_at(self._map_offset, (rows, 1, *self.small_shape), torch.uint8)
        else:
            maps = self._low_maps(rows)
        labels = self.block.take((rows,), torch.int64)
        labels.numpy()[:] = self.labels
        return DecodedSample(self.images[:rows], maps, labels)

    def _low_maps(self, rows: int) -> torch.Tensor:
        """The 64-px float maps of a batch whose maps came different ways, in the block's map span."""
        kind = self.kind[:rows]
        full = np.flatnonzero(kind == 2)
        if len(full) == rows:  # one kind for the whole batch (exact maps): no gather, no temporary
            self.low[:rows] = low_res_heatmap(self.full_maps[:rows].permute(0, 3, 1, 2), self.scratch).div_(255.0)
            return self.low[:rows]
        low = torch.empty(rows, 1, LOW_RES, LOW_RES)  # all read before the span (which may hold them) is written
        in_span = np.flatnonzero(kind == 1)
        if len(in_span):
            small = torch.from_numpy(self.small_u8[in_span]).permute(0, 3, 1, 2)  # a copy out of the span
            low[torch.from_numpy(in_span)] = low_res_heatmap(small).div_(255.0)
        for k in np.flatnonzero(kind == 3):
            low[k] = low_res_heatmap(torch.from_numpy(self.small[k]).permute(2, 0, 1)).div_(255.0)
        if len(full):
            picked = self.full_maps[torch.from_numpy(full)].permute(0, 3, 1, 2)
            low[torch.from_numpy(full)] = low_res_heatmap(picked, self.scratch).div_(255.0)
        for k in np.flatnonzero(kind == 0):
            low[k] = self.general[k]
        self.low[:rows] = low
        return self.low[:rows]


def read_decoded_batch(dataset: ClickMeRecords, indices: Sequence[int]) -> CollatedBatch:
    """Records ``indices`` of ``dataset`` (``augment_on="device"``) as one collated
    :class:`DecodedSample` batch, bad ones raised or (``skip_bad_samples``) left out and counted."""
    batch = _Batch(len(indices), dataset.map_decode, dataset.scratch)
    rows: list[int | None] = []
    kept = 0
    try:
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
        finished = batch.finish(kept)
    except BaseException:
        if batch.block is not None:  # the batch is not handed over: its block is free again
            batch.block.release()
        raise
    dataset.skips.add_read(kept)
    return CollatedBatch(finished, rows, batch.block)


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
