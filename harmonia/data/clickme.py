"""ClickMe records (SPEC §2): the ``tf.train.Example`` schema, decoding, reference preprocessing.

Schema of one record (serre-lab/harmonization ``clickme_dataset.py``)::

    image    bytes  JPEG 256×256×3   (or raw float32 H×W×3, little-endian; or a float_list)
    heatmap  bytes  JPEG 256×256×1   (or raw float32 H×W)
    label    int64  ImageNet class 0..999
    click_count int64  optional (some internal archives)
    height, width int64  optional: the shape of raw arrays (else square is assumed)

The encoding is detected **per record**: bytes starting with a JPEG/PNG signature are decoded
(torchvision.io, libjpeg-turbo); other bytes are raw float32. Raw images are read in
[0, ``raw_image_range``] (255 by default: the reference pipeline's float range) and must lie
there; decoded 8-bit images and maps are divided by 255.

Reference preprocessing, followed by default (``map_normalization="none"``): image resized to
224×224 bilinear (no antialiasing, TF's ``tf.image.resize``); heatmap resized to 64×64
bilinear, blurred by the reference's 10×10 Gaussian (σ = 10, built as the reference builds it:
offsets −5..4 across and 4..−5 down, TF "SAME" zero padding 4 before / 5 after), resized to
224×224 bilinear. Two deliberate differences, both scale-only or rounding-only:
- maps are in [0, 1] (heatmap/255) rather than [0, 255]: the harmonization loss standardizes
  each map and the alignment metric is a rank correlation, so the scale does not matter;
- the image is resized in uint8 (torch's vectorized fixed-point kernel, ~3× faster than in
  float): it differs from the reference's float result by at most 1/255 (tested).
``map_normalization="minmax"`` is the lab's pre-release variant: each final map is min–max
scaled to [0, 1] (a constant map becomes zeros: it carries no spatial information, and the
loss's standardize-cut maps it to zeros anyway).

With a training transform (random resized crop, flip), the blurred map is brought back to the
image's own size and the two are cropped together (one resampling of the image, from 256 px).

Every path needs only the heatmap's 64-px map (the blur and the resizes are applied to it), so
the dataset decodes straight to it: ``map_decode="exact"`` decodes the full map and takes the
reference's bilinear samples (:func:`~harmonia.data.heatmap.low_res_heatmap`);
``map_decode="scaled"`` decodes a JPEG map of side ≥ 128 px by libjpeg-turbo's DCT-domain
scaling (``simplejpeg``) at the smallest M/8 scale that keeps 64 px (128/256/512 px, e.g.
ClickMe's 256: directly at 64 px; 224 px: at 84 px, then the reference's bilinear step to 64).
The scaled map averages blocks where the reference samples a few pixels; after the σ = 10 blur
the final maps differ by < 1% of their peak on ClickMe-like maps (tested at 256 and 224 px),
far below what the rank-based alignment metric or the standardized loss can see. Other maps
(PNG, raw, under 128 px, anything simplejpeg refuses) use ``exact``. Batches of records are
read by :mod:`harmonia.data.clickme_batch` (``ClickMeRecords.__getitems__``), with the same results.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import BinaryIO, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import encode_jpeg, encode_png

from harmonia.data.clickme_batch import read_decoded_batch
from harmonia.data.collate import CollatedBatch
from harmonia.data.device_geometry import DecodedSample, decoded_sample
from harmonia.data.errors import BadSampleError, SkipCounter
from harmonia.data.heatmap import blur_low_map, dct_scaled_map, minmax, unit_map
from harmonia.data.example import decode_example, encode_example
from harmonia.data.jpeg import JPEG_SIGNATURE, PNG_SIGNATURE, decode_bytes
from harmonia.data.sample import Sample
from harmonia.data.tfrecord import pread_record, record_offsets
from harmonia.data.transforms import JointTransform, to_float_image
from harmonia.data.validate import check_label, check_map, expand_files

MapNormalization = Literal["none", "minmax"]
MapDecode = Literal["full", "exact", "scaled"]
RECORD_SUFFIXES = (".tfrecords", ".tfrecord", ".tfr")
IMAGE_SIGNATURES = (JPEG_SIGNATURE, PNG_SIGNATURE)


class ClickMeRecord(NamedTuple):
    """One decoded record: image uint8 or float in [0,1] ``(3,H,W)``, heatmap float ``(1,H,W)``
    (or, decoded with ``map_decode`` ``"exact"``/``"scaled"``, its 64-px map ``(1,64,64)``)."""

    image: Tensor
    heatmap: Tensor
    label: int
    click_count: int | None


def _decode_array(value: list, where: str, what: str, channels: int, shape: tuple[int, int] | None) -> Tensor:
    """A JPEG/PNG (uint8 ``(C,H,W)``) or a raw float32 array (float ``(C,H,W)``)."""
    if value and isinstance(value[0], bytes):
        if len(value) != 1:
            raise BadSampleError(where, f"feature {what!r} holds {len(value)} byte strings, expected 1")
        data = value[0]
        if data.startswith(IMAGE_SIGNATURES):
            try:
                return decode_bytes(data, gray=channels == 1)
            except (RuntimeError, ValueError) as err:
                raise BadSampleError(where, f"cannot decode {what!r} ({len(data)} bytes): {err}") from None
        if len(data) % 4:
            raise BadSampleError(where, f"{what!r} is neither JPEG/PNG nor float32 ({len(data)} bytes)")
        array = np.frombuffer(data, dtype="<f4")
    elif value and isinstance(value[0], float):
        array = np.asarray(value, dtype=np.float32)
    else:
        raise BadSampleError(where, f"feature {what!r} is missing or empty")
    if shape is None:
        side = math.isqrt(len(array) // channels)
        if side * side * channels != len(array):
            raise BadSampleError(where, f"raw {what!r} has {len(array)} values: not a square {channels}-channel array"
                                 " (add int64 features 'height' and 'width')")
        shape = (side, side)
    if shape[0] * shape[1] * channels != len(array):
        raise BadSampleError(where, f"raw {what!r} has {len(array)} values, expected {shape[0]}×{shape[1]}×{channels}")
    # Raw arrays are stored H×W×C as the reference's tensors; we want C×H×W.
    return torch.from_numpy(array.copy()).view(shape[0], shape[1], channels).permute(2, 0, 1).contiguous()


def _single_int(features: dict, key: str, where: str, required: bool) -> int | None:
    value = features.get(key)
    if value is None or value == []:
        if required:
            raise BadSampleError(where, f"feature {key!r} is missing")
        return None
    if len(value) != 1 or not isinstance(value[0], int):
        raise BadSampleError(where, f"feature {key!r} must be one int64; got {value!r:.60}")
    return value[0]


def decode_clickme(data: bytes, where: str, raw_image_range: float = 255.0, map_decode: MapDecode = "full") -> ClickMeRecord:
    """Decode one serialized ClickMe ``tf.train.Example`` and check its map; errors name ``where``.

    ``map_decode``: ``"full"`` (the heatmap at its size, in [0, 1] for 8/16-bit maps),
    ``"exact"`` (the reference's 64-px map) or ``"scaled"`` (the same, DCT-scaled from JPEG
    when possible; module docstring). The label is not range-checked here (the caller knows
    ``num_classes``).
    """
    try:
        features = decode_example(data)
    except DecodeError as err:
        raise BadSampleError(where, f"not a tf.train.Example: {err}") from None
    height, width = _single_int(features, "height", where, False), _single_int(features, "width", where, False)
    shape = (height, width) if height is not None and width is not None else None
    image = _decode_array(features.get("image", []), where, "image", 3, shape)
    if image.is_floating_point():
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > raw_image_range * (1 + 1e-4):
            raise BadSampleError(where, f"raw image values outside [0, {raw_image_range:g}] (raw_image_range)")
        image = image / raw_image_range
    heatmap = decode_heatmap(features.get("heatmap", []), where, image.shape[-2:], shape, map_decode)
    label = _single_int(features, "label", where, True)
    return ClickMeRecord(image, heatmap, label, _single_int(features, "click_count", where, False))


def decode_heatmap(value: list, where: str, image_hw: Sequence[int], shape: tuple[int, int] | None = None,
                   map_decode: MapDecode = "full") -> Tensor:
    """A record's heatmap, checked against its image's size (and, for float maps, its values).

    Returns float ``(1,H,W)`` (``"full"``) or the 64-px map ``(1,64,64)`` (``"exact"``,
    ``"scaled"``); 8/16-bit maps are scaled to [0, 1], raw float maps kept as stored.
    """
    data = value[0] if len(value) == 1 and isinstance(value[0], bytes) else b""
    if map_decode == "scaled" and data.startswith(IMAGE_SIGNATURES[0]):
        low = dct_scaled_map(data, where, image_hw)
        if low is not None:
            return low
    heatmap = check_map(_decode_array(value, where, "heatmap", 1, shape), image_hw, where)
    return unit_map(heatmap, low_res=map_decode != "full")


def encode_clickme(
    image: Tensor | bytes,
    heatmap: Tensor | bytes,
    label: int,
    click_count: int | None = None,
    quality: int = 95,
) -> bytes:
    """Serialize a ClickMe record (the writer the tests and the converter use).

    ``image``/``heatmap``: encoded bytes (kept as they are), a uint8 tensor ``(C,H,W)`` (JPEG
    encoded at ``quality``; a heatmap is saved as lossless PNG when ``quality`` is 100), or a
    float tensor, stored raw as float32 H×W×C with ``height``/``width`` features.
    """
    features: dict = {"label": int(label)}

    def encode(x: Tensor | bytes) -> bytes:
        if isinstance(x, bytes):
            return x
        if x.dtype == torch.uint8:
            return bytes(encode_png(x) if quality >= 100 else encode_jpeg(x, quality=quality))
        features["height"], features["width"] = int(x.shape[-2]), int(x.shape[-1])
        return x.detach().float().permute(1, 2, 0).contiguous().numpy().astype("<f4").tobytes()

    features["image"] = encode(image)
    features["heatmap"] = encode(heatmap if isinstance(heatmap, bytes) or heatmap.dim() == 3 else heatmap[None])
    if click_count is not None:
        features["click_count"] = int(click_count)
    return encode_example(features)


def _reference_image(image: Tensor, size: int) -> Tensor:
    """Bilinear resize without antialiasing (TF's), in uint8 when the image is uint8."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]


class ClickMeRecords(Dataset):
    """Map-style dataset of ClickMe TFRecord files, yielding ``Sample`` (random access by index).

    Args:
        files: a folder (its ``*.tfrecords``/``*.tfrecord``/``*.tfr`` files), a glob, or a list.
        num_classes: labels must lie in ``[0, num_classes)``.
        size: output side when ``transform`` is None (the reference evaluation path).
        transform: a :class:`JointTransform`; None → the exact reference preprocessing at
            ``size``. A resize-only transform also uses the reference path at its size (then
            its photometric part, e.g. normalization); a training transform crops the image
            and the blurred map together from the native resolution.
        map_normalization: ``"none"`` (reference) or ``"minmax"`` (pre-release variant).
        skip_bad_samples: False → a bad record raises :class:`BadSampleError` naming the file
            and record index. True → it is counted (``self.skips``) and ``__getitem__``
            returns None, which :func:`harmonia.data.collate.collate_samples` drops.
        index_dir: where record-offset indexes are cached (None: ``<file>.idx`` beside each file).
        verify_crc: check both CRCs of every record read (cheap; on by default).
        raw_image_range: value range of raw float32 images (255: the reference's float range).
        augment_on: ``"worker"`` (default) applies ``transform`` here; ``"device"`` (training
            transform only) returns :class:`~harmonia.data.device_geometry.DecodedSample`\ s, to
            be batched by :class:`~harmonia.data.device_geometry.DeviceCollate`, whose crop, flip
            and map blur run batched on the training device (``ClickMeDataModule`` does it in
            ``on_after_batch_transfer``; see :mod:`harmonia.data.device_geometry`).
        map_decode: how samples get the heatmap's 64-px map: ``"exact"`` (the reference) or
            ``"scaled"`` (DCT-scaled JPEG decoding; module docstring).

    A truncated file is found while indexing: an error, or with ``skip_bad_samples`` the
    records before the damage are kept and the lost tail is counted as one skip.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        num_classes: int = 1000,
        size: int = 224,
        transform: JointTransform | None = None,
        map_normalization: MapNormalization = "none",
        skip_bad_samples: bool = False,
        index_dir: str | None = None,
        verify_crc: bool = True,
        raw_image_range: float = 255.0,
        augment_on: Literal["worker", "device"] = "worker",
        map_decode: Literal["exact", "scaled"] = "exact",
    ) -> None:
        if map_decode not in ("exact", "scaled"):
            raise ValueError(f"map_decode must be 'exact' or 'scaled'; got {map_decode!r}")
        self.map_decode = map_decode
        if augment_on not in ("worker", "device"):
            raise ValueError(f"augment_on must be 'worker' or 'device'; got {augment_on!r}")
        if augment_on == "device" and (transform is None or not transform.train or transform.jitters):
            raise ValueError("augment_on='device' needs a training JointTransform without colour jitter")
        self.augment_on = augment_on
        if map_normalization not in ("none", "minmax"):
            raise ValueError(f"map_normalization must be 'none' or 'minmax'; got {map_normalization!r}")
        self.files = expand_files(files, RECORD_SUFFIXES)
        self.num_classes, self.transform = num_classes, transform
        self.size = transform.size if transform is not None else size
        self.map_normalization, self.skip_bad_samples = map_normalization, skip_bad_samples
        self.verify_crc, self.raw_image_range = verify_crc, raw_image_range
        self.skips = SkipCounter()
        offsets, owners = [], []
        for number, path in enumerate(self.files):
            try:
                found = record_offsets(path, index_dir)
            except BadSampleError as err:
                if not skip_bad_samples:
                    raise
                self.skips.add_skipped(err)
                found = err.partial_offsets  # the records before the damaged frame
            offsets.append(found)
            owners.append(np.full(len(found), number, dtype=np.int32))
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.owners = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        starts = np.cumsum([0] + [len(o) for o in offsets])
        self.local_index = np.arange(len(self.offsets)) - starts[self.owners]
        self._handles: dict[int, BinaryIO] = {}
        self._pid = os.getpid()
        self.scratch: dict = {}  # reusable buffers of the batched reader (harmonia.data.clickme_batch)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        """``"<file>, record <k>"`` for global index ``i``."""
        return f"{self.files[self.owners[i]]}, record {self.local_index[i]}"

    def fd(self, number: int) -> int:
        """The descriptor of record file ``number``, opened on first use in this process."""
        if self._pid != os.getpid():  # a forked worker: its own files, never the parent's
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = open(self.files[number], "rb")
        return self._handles[number].fileno()

    def read(self, i: int, map_decode: MapDecode = "full") -> ClickMeRecord:
        """The decoded, checked (not preprocessed) record ``i``; its heatmap as ``map_decode`` says."""
        number = int(self.owners[i])
        data = pread_record(self.fd(number), int(self.offsets[i]), self.files[number], int(self.local_index[i]),
                            self.verify_crc)
        return self.decode(data, i, map_decode)

    def decode(self, data: bytes, i: int, map_decode: MapDecode | None = None) -> ClickMeRecord:
        """Decode and check the bytes of record ``i`` (``map_decode`` None: the dataset's own)."""
        where = self.where(i)
        record = decode_clickme(data, where, self.raw_image_range, map_decode or self.map_decode)
        check_label(record.label, self.num_classes, where)
        return record

    def __getitem__(self, i: int) -> Sample | DecodedSample | None:
        record = self.skips.read_or_skip(lambda: self.read(i, self.map_decode), self.skip_bad_samples)
        if record is None:
            return None
        if self.augment_on == "device":
            return decoded_sample(record.image, record.heatmap, record.label)
        image, human_map = preprocess_clickme(record.image, record.heatmap, self.size, self.transform,
                                              self.map_normalization)
        return Sample(image, human_map, torch.tensor(True), torch.tensor(record.label, dtype=torch.int64))

    def __getitems__(self, indices: Sequence[int]) -> CollatedBatch | list:
        """A batch of samples in one call (DataLoader uses it): with ``augment_on="device"``
        already collated (:mod:`harmonia.data.clickme_batch`), else ``[self[i] for i in indices]``."""
        if self.augment_on == "device":
            return read_decoded_batch(self, indices)
        return [self[i] for i in indices]

    def close(self) -> None:
        """Close the open record files (reopened on demand)."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["scratch"] = {}, {}
        return state


def preprocess_clickme(
    image: Tensor,
    low_map: Tensor,
    size: int,
    transform: JointTransform | None = None,
    map_normalization: MapNormalization = "none",
) -> tuple[Tensor, Tensor]:
    """Reference preprocessing (+ optional joint augmentation) of a decoded record.

    ``low_map`` is the heatmap's 64-px map ``(1,64,64)``
    (:func:`~harmonia.data.heatmap.low_res_heatmap` of the full map, or a record decoded with
    ``map_decode`` ``"exact"``/``"scaled"``). Returns ``(image float (3,size,size) in [0,1]
    (uint8 if the transform asks for it), map float (1,size,size) >= 0)``.
    """
    if transform is None or transform.resize_only:
        image = _reference_image(image, size)
        image = to_float_image(image) if transform is None else transform.finish(image)
        human_map = blur_low_map(low_map, (size, size)).clamp_(min=0.0)
    else:
        human_map = blur_low_map(low_map, image.shape[-2:])
        image, human_map = transform(image, human_map)
    if map_normalization == "minmax":
        human_map = minmax(human_map)
    return image, human_map
