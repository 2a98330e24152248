"""ClickMe records: the ``tf.train.Example`` schema, the one decode path, and the batched finish.

Schema of one record (serre-lab/harmonization ``clickme_dataset.py``)::

    image    bytes  JPEG 256×256×3   (or raw float32 H×W×3, little-endian; or a float_list)
    heatmap  bytes  JPEG 256×256×1   (or raw float32 H×W)
    label    int64  ImageNet class 0..999
    click_count int64  optional (some internal archives)
    height, width int64  optional: the shape of raw arrays (else square is assumed)

The encoding is detected **per record**: bytes starting with a JPEG/PNG signature are decoded
(libjpeg-turbo through ``simplejpeg``, PNG through torchvision.io); other bytes are raw float32.
Raw images are read in [0, ``raw_image_range``] (255 by default: the reference pipeline's float
range) and must lie there.

The path of one record, from file to ``training_step``:

1. in a DataLoader worker, :class:`ClickMeRecords` reads the record's bytes (both CRCs checked,
   :class:`~harmonia.data.tfrecord.RecordIndex`), parses it (:func:`parse_clickme`) and decodes it
   (:func:`decode_clickme`) into a :class:`ClickMeSample`: the image in ``uint8`` at its own size
   and the heatmap's 64-px map, the reference's first step (bilinear, no antialiasing), in [0, 1];
   every check happens here, so a bad record is named (file and record) or skipped;
2. the DataLoader batches these with its own collate (into its own shared memory) and, with
   ``pin_memory``, pins them;
3. on the training device, :func:`finish_clickme_batch` (called by
   ``ClickMeDataModule.on_after_batch_transfer``) does the rest for the whole batch: the
   reference's 10×10 Gaussian blur (σ = 10) and bilinear upsampling of the maps, then, in
   training, the same random resized crop and flip for image and map (else the reference's
   bilinear resize to 224 without antialiasing), colour jitter and normalization if asked, and
   returns the batch contract, :class:`~harmonia.data.sample.Sample`.

Two deliberate differences from the reference, both scale-only: maps are in [0, 1]
(heatmap/255) rather than [0, 255]; images end in [0, 1] rather than [0, 255]. The
harmonization loss standardizes each map, the alignment metric is a rank correlation, and
models normalize their own inputs, so neither is seen. ``map_normalization="minmax"`` is the
lab's pre-release variant: each final map is min–max scaled to [0, 1] (a constant map becomes
zeros: it carries no spatial information).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from google.protobuf.message import DecodeError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import encode_jpeg, encode_png

from harmonia.data.errors import BadSampleError, SkipCounter
from harmonia.data.example import decode_example, encode_example
from harmonia.data.heatmap import INTEGER_SCALE, blur_coarse_map, coarse_map, minmax
from harmonia.data.jpeg import JPEG_SIGNATURE, PNG_SIGNATURE, decode_bytes
from harmonia.data.sample import Sample
from harmonia.data.tfrecord import RecordIndex
from harmonia.data.transforms import JointTransform
from harmonia.data.validate import check_label, check_map, expand_files

MapNormalization = Literal["none", "minmax"]
RECORD_SUFFIXES = (".tfrecords", ".tfrecord", ".tfr")
IMAGE_SIGNATURES = (JPEG_SIGNATURE, PNG_SIGNATURE)


class ClickMeRecord(NamedTuple):
    """One record's fields as stored, before decoding (:func:`parse_clickme`).

    - ``image``: the encoded JPEG/PNG ``bytes``, or a raw float32 tensor ``(3,H,W)`` as stored
      (values in [0, raw image range]);
    - ``heatmap``: the encoded ``bytes``, or a raw float32 tensor ``(1,H,W)`` as stored;
    - ``label``: the int64 label (not yet range-checked);
    - ``click_count``: the optional click count, else None.
    """

    image: bytes | Tensor
    heatmap: bytes | Tensor
    label: int
    click_count: int | None


class ClickMeSample(NamedTuple):
    """A decoded ClickMe record, or a batch of them after ``default_collate``.

    - ``image``: ``uint8`` ``(H,W,3)`` (batched ``(N,H,W,3)``), channels last as the JPEG decoder
      lays pixels out (batching channels-first views would cost a strided copy per image);
    - ``coarse_map``: float ``(1,64,64)`` in [0, 1], the human map after the reference's first
      step (bilinear resize to 64×64), before its blur; zeros when ``has_map`` is False;
    - ``has_map``: bool; ``label``: int64.

    :func:`finish_clickme_batch` turns a batch of them into a :class:`Sample`.
    """

    image: Tensor
    coarse_map: Tensor
    has_map: Tensor
    label: Tensor


def _parse_array(value: list, where: str, what: str, channels: int, shape: tuple[int, int] | None) -> bytes | Tensor:
    """A feature's encoded bytes as they are, or its raw float32 values as a ``(C,H,W)`` tensor."""
    if value and isinstance(value[0], bytes):
        if len(value) != 1:
            raise BadSampleError(where, f"feature {what!r} holds {len(value)} byte strings, expected 1")
        data = value[0]
        if data.startswith(IMAGE_SIGNATURES):
            return data
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


def parse_clickme(data: bytes, where: str) -> ClickMeRecord:
    """The fields of one serialized ClickMe ``tf.train.Example``; errors name ``where``."""
    try:
        features = decode_example(data)
    except DecodeError as err:
        raise BadSampleError(where, f"not a tf.train.Example: {err}") from None
    height, width = _single_int(features, "height", where, False), _single_int(features, "width", where, False)
    shape = (height, width) if height is not None and width is not None else None
    image = _parse_array(features.get("image", []), where, "image", 3, shape)
    heatmap = _parse_array(features.get("heatmap", []), where, "heatmap", 1, shape)
    label = _single_int(features, "label", where, True)
    return ClickMeRecord(image, heatmap, label, _single_int(features, "click_count", where, False))


def _decode_pixels(value: bytes | Tensor, where: str, what: str, gray: bool) -> Tensor:
    """Encoded bytes → ``(C,H,W)`` uint8 (uint16 for a 16-bit PNG); a raw tensor as it is."""
    if isinstance(value, Tensor):
        return value
    try:
        return decode_bytes(value, gray=gray)
    except (RuntimeError, ValueError) as err:
        raise BadSampleError(where, f"cannot decode {what!r} ({len(value)} bytes): {err}") from None


def clickme_sample(image: Tensor, heatmap: Tensor | None, label: int, where: str) -> ClickMeSample:
    """A :class:`ClickMeSample` from a decoded image and heatmap (the map checked here).

    ``image``: ``(3,H,W)`` uint8, or float in [0, 1] (rounded to 8 bits, as JPEG-coded images
    are); ``heatmap``: ``(1,H,W)`` or ``(H,W)`` of the image's size, uint8/uint16 (scaled to
    [0, 1]) or float (kept as stored, checked finite and >= 0), or None (no map).
    """
    if image.is_floating_point():
        image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    image = image.permute(1, 2, 0).contiguous()  # a view of the decoder's own layout: no copy
    if heatmap is None:
        return ClickMeSample(image, torch.zeros(1, 64, 64), torch.tensor(False), torch.tensor(label, dtype=torch.int64))
    heatmap = check_map(heatmap, image.shape[:2], where)
    scale = INTEGER_SCALE.get(heatmap.dtype, 1.0)
    coarse = coarse_map(heatmap)
    if scale != 1.0:
        coarse = coarse.div_(scale)
    return ClickMeSample(image, coarse, torch.tensor(True), torch.tensor(label, dtype=torch.int64))


def decode_clickme(record: ClickMeRecord, where: str, num_classes: int | None = None,
                   raw_image_range: float = 255.0) -> ClickMeSample:
    """Decode and check one parsed record (:func:`parse_clickme`): the one decode path of a record.

    Checks: the image decodes (raw images: finite, within [0, ``raw_image_range``]), the
    heatmap decodes, has the image's size and (raw maps) is finite and >= 0, the label lies in
    ``[0, num_classes)``. Every error is a :class:`BadSampleError` naming ``where``.
    """
    label = check_label(record.label, num_classes, where)
    image = _decode_pixels(record.image, where, "image", gray=False)
    if image.is_floating_point():
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > raw_image_range * (1 + 1e-4):
            raise BadSampleError(where, f"raw image values outside [0, {raw_image_range:g}] (raw_image_range)")
        image = image / raw_image_range
    heatmap = _decode_pixels(record.heatmap, where, "heatmap", gray=True)
    return clickme_sample(image, heatmap, label, where)


def encode_clickme(
    image: Tensor | bytes,
    heatmap: Tensor | bytes,
    label: int,
    click_count: int | None = None,
    quality: int = 95,
) -> bytes:
    """Serialize a ClickMe record (the writer the tests and the synthetic data use).

    ``image``/``heatmap``: encoded bytes (kept as they are), a uint8 tensor ``(C,H,W)`` (JPEG
    encoded at ``quality``; saved as lossless PNG when ``quality`` is 100), or a float tensor,
    stored raw as float32 H×W×C with ``height``/``width`` features.
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


class ClickMeRecords(Dataset):
    """Map-style dataset of ClickMe TFRecord files, yielding :class:`ClickMeSample` (random access by index).

    Batches of these become ``Sample``\\ s on the training device (:func:`finish_clickme_batch`;
    ``ClickMeDataModule`` does it for you).

    Args:
        files: a folder (its ``*.tfrecords``/``*.tfrecord``/``*.tfr`` files), a glob, or a list.
        num_classes: labels must lie in ``[0, num_classes)``.
        skip_bad_samples: False → a bad record raises :class:`BadSampleError` naming the file
            and record index. True → it is counted (``self.skips``) and ``__getitem__``
            returns None, which :func:`~harmonia.data.sample.collate_samples` drops. A file
            whose framing is damaged keeps its records before the damage; the lost tail
            counts as one skip.
        index_dir: where record-offset indexes are cached (None: ``<file>.idx`` beside each file).
        verify_crc: check both CRCs of every record read (cheap; on by default).
        raw_image_range: value range of raw float32 images (255: the reference's float range).
    """

    def __init__(
        self,
        files: str | Sequence[str],
        num_classes: int | None = 1000,
        skip_bad_samples: bool = False,
        index_dir: str | None = None,
        verify_crc: bool = True,
        raw_image_range: float = 255.0,
    ) -> None:
        self.num_classes, self.skip_bad_samples, self.raw_image_range = num_classes, skip_bad_samples, raw_image_range
        self.skips = SkipCounter()
        self.index = RecordIndex(expand_files(files, RECORD_SUFFIXES), index_dir, verify_crc,
                                 keep_damaged=skip_bad_samples)
        for err in self.index.damaged:
            self.skips.add_skipped(err)

    @property
    def files(self) -> list:
        """The record files, in index order."""
        return self.index.files

    def __len__(self) -> int:
        return len(self.index)

    def where(self, i: int) -> str:
        """``"<file>, record <k>"`` for index ``i``."""
        return self.index.where(i)

    def record(self, i: int) -> ClickMeRecord:
        """Record ``i``'s fields as stored (CRC-checked and parsed, not decoded)."""
        return parse_clickme(self.index.read(i), self.where(i))

    def decode(self, i: int) -> ClickMeSample:
        """Record ``i`` read, decoded and checked; a bad record raises :class:`BadSampleError`."""
        return decode_clickme(self.record(i), self.where(i), self.num_classes, self.raw_image_range)

    def __getitem__(self, i: int) -> ClickMeSample | None:
        return self.skips.read_or_skip(lambda: self.decode(i), self.skip_bad_samples)

    def close(self) -> None:
        """Close the open record files (reopened on demand)."""
        self.index.close()


def finish_clickme_batch(batch: ClickMeSample, transform: JointTransform, map_normalization: MapNormalization = "none",
                         generator: torch.Generator | None = None) -> Sample:
    """A batch of :class:`ClickMeSample` → ``Sample``, where the batch lives (the training device).

    Maps: the reference's blur and bilinear upsampling, to the images' size in training (then
    cropped with them: ``transform.apply_batch``) or straight to ``transform.size`` otherwise
    (the reference's exact evaluation path, the image resized bilinearly without antialiasing).
    ``map_normalization="minmax"`` scales each final map to [0, 1]. ``generator`` draws the
    crop boxes and flips (None: torch's global generator).
    """
    if map_normalization not in ("none", "minmax"):
        raise ValueError(f"map_normalization must be 'none' or 'minmax'; got {map_normalization!r}")
    image = batch.image.permute(0, 3, 1, 2).float().div_(255.0)
    map_size = image.shape[-2:] if transform.train else (transform.size, transform.size)
    human_map = blur_coarse_map(batch.coarse_map.float(), map_size)
    image, human_map = transform.apply_batch(image, human_map, generator)
    if map_normalization == "minmax":
        human_map = minmax(human_map)
    return Sample(image.contiguous(), human_map.contiguous(), batch.has_map, batch.label)
