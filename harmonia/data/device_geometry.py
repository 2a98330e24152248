"""ClickMe training geometry on the training device, for a whole batch at once.

Why: in a DataLoader worker, decoding a 256-px ClickMe record costs ~0.55 ms and resampling
it to 224 px (image crop/resize, map blur and crop) as much again on one core, so workers
would spend more time resampling than decoding (benchmarks/README.md). With
``augment_on="device"`` a worker does only what must happen per sample on the CPU (read,
CRCs, parse, decode, checks, the heatmap's 64-px map) and returns a :class:`DecodedSample`;
:class:`DeviceCollate` batches them (``uint8`` images) and draws every sample's crop box and
flip in one vectorized call; :func:`apply_device_geometry` then does the rest in a few
batched kernels on the training device (``ClickMeDataModule.on_after_batch_transfer``).

Semantics, the same as the worker path up to resampling details:
- crop boxes: ``v2.RandomResizedCrop``'s sampling (10 tries of area and log-aspect, first fit,
  else its central fallback), vectorized over the batch (:func:`draw_boxes`), drawn in the
  worker with the worker's torch seed; a fair coin per sample for the flip;
- the map: blurred as the reference (64 px, 10×10 Gaussian σ = 10) and upsampled to the
  image's size with the same separable matrices as :func:`harmonia.data.heatmap.blur_heatmap`;
- image and map: one ``torchvision.ops.roi_align`` call on the 4-channel stack, with
  ``aligned=True`` and one sample per output pixel, i.e. bilinear resampling at the pixel
  centres of ``resized_crop`` (no antialiasing: crops are at most 256 → 224 px); the same
  flip for both;
- the image becomes float in [0, 1]; optional normalization; no colour jitter (per-sample
  jitter on the device is not implemented: use the worker path for it).
All records of a batch must share one size (ClickMe: 256×256).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

from harmonia.data.collate import collate_samples
from harmonia.data.heatmap import LOW_RES, blur_upsample_matrix, low_res_heatmap
from harmonia.data.sample import Sample
from harmonia.data.shared_batch import lease, view_bytes


class DecodedSample(NamedTuple):
    """What a worker returns per sample with ``augment_on="device"``.

    - ``image``: uint8 ``(H,W,3)``, channels last: that is how the JPEG decoder lays pixels
      out, so batching is a plain copy (stacking ``(3,H,W)`` views of it costs as much as a
      quarter of the decode);
    - ``low_map``: float ``(1,64,64)``, the heatmap's 64-px map (before the blur); a batch read
      by ``ClickMeRecords.__getitems__`` may instead carry the uint8 DCT-scaled map pixels
      ``(N,1,h,w)`` as decoded, which :func:`low_maps` resamples to 64 px on the device;
    - ``label``: int (collated into one tensor per batch, not one per sample).
    """

    image: Tensor
    low_map: Tensor
    label: int


class DeviceBatch(NamedTuple):
    """A batch whose geometry is still to be applied on the device (:class:`DeviceCollate`).

    ``image`` uint8 ``(N,H,W,3)``; ``low_map`` float ``(N,1,64,64)`` or uint8 ``(N,1,h,w)`` (see
    :class:`DecodedSample`; :func:`low_maps` gives the float maps); ``has_map``, ``label``: as
    in ``Sample``; ``box`` float ``(N,4)`` crop boxes ``(left, top, right, bottom)`` in pixels;
    ``flip`` bool ``(N,)``, horizontal flips.
    """

    image: Tensor
    low_map: Tensor
    has_map: Tensor
    label: Tensor
    box: Tensor
    flip: Tensor


def decoded_sample(image: Tensor, low_map: Tensor, label: int) -> DecodedSample:
    """Worker side: a decoded image ``(3,H,W)`` (uint8, or float in [0, 1] from raw records) and its map."""
    if image.is_floating_point():  # raw float32 records: back to 8 bits, as the JPEG ones
        image = image.mul(255.0).round_().to(torch.uint8)
    return DecodedSample(image.permute(1, 2, 0), low_map, label)


def draw_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
               rng: np.random.Generator | None = None) -> Tensor:
    """``(n, 4)`` random-resized-crop boxes ``(left, top, right, bottom)`` for ``height×width`` images.

    The distribution of ``v2.RandomResizedCrop.make_params`` (tested), drawn for a whole batch
    at once: per sample, ``make_params`` costs a worker ~75 µs, a seventh of a JPEG decode;
    this costs ~1 µs (NumPy: torch's per-op overhead would make it ~6). Each sample gets 10
    tries of an area fraction uniform in ``scale`` and a log-aspect uniform in ``log(ratio)``;
    the first box that fits is placed uniformly; a sample whose 10 tries all fail gets
    torchvision's fallback, the largest central crop whose aspect lies in ``ratio``.
    ``rng`` None: a generator seeded from torch's (so a DataLoader worker's seed governs it).
    """
    if rng is None:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
    target = rng.uniform(scale[0], scale[1], (n, 10)) * (height * width)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10)))
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))  # half to even, as round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)  # the first try that fits
    rows = np.arange(n)
    w, h, found = w[rows, first], h[rows, first], fits.any(axis=1)
    fallback_w, fallback_h = _central_crop(height, width, ratio)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    u = rng.random((2, n))
    top = np.where(found, np.floor(u[0] * (height - h + 1)), (height - fallback_h) // 2)
    left = np.where(found, np.floor(u[1] * (width - w + 1)), (width - fallback_w) // 2)
    return torch.from_numpy(np.stack([left, top, left + w, top + h], axis=1).astype(np.float32))


def _central_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """torchvision's fallback box size ``(w, h)``: the whole image, cut to the nearest allowed aspect."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


class DeviceCollate:
    """``collate_fn`` of ``augment_on="device"``: :class:`DecodedSample`\ s → one :class:`DeviceBatch`.

    Drops skipped (None) samples as :func:`~harmonia.data.collate.collate_samples` does, and
    draws the batch's crop boxes (``crop.scale``, ``crop.ratio``) and flips (probability
    ``hflip``) in one go, in the worker, whose torch seed DataLoader/Lightning set per worker.
    """

    def __init__(self, crop: v2.RandomResizedCrop, hflip: float) -> None:
        self.scale, self.ratio, self.hflip = tuple(crop.scale), tuple(crop.ratio), hflip

    def __call__(self, samples: Sequence[DecodedSample | None]) -> DeviceBatch:
        """Collate one batch (in the block of a batch read by ``__getitems__``, when it has one)."""
        block = getattr(samples, "block", None)
        image, low_map, label = collate_samples(samples)  # (which gives the block back if it raises)
        n, height, width = image.shape[:3]
        box = draw_boxes(n, height, width, self.scale, self.ratio)
        flip = torch.rand(n) < self.hflip
        if block is None:
            return DeviceBatch(image, low_map, torch.ones(n, dtype=torch.bool), label, box, flip)
        batch = DeviceBatch(image, low_map, block.take((n,), torch.bool).fill_(True), label,
                            block.take((n, 4), torch.float32).copy_(box), block.take((n,), torch.bool).copy_(flip))
        return lease(batch, block)


def device_batch_bytes(n: int, height: int, width: int) -> int:
    """Bytes of a :class:`DeviceBatch` of ``n`` ``height``×``width`` images carved from one
    :class:`~harmonia.data.shared_batch.Block` (each field aligned)."""
    fields = [((n, height, width, 3), torch.uint8), ((n, 1, LOW_RES, LOW_RES), torch.float32),
              ((n,), torch.bool), ((n,), torch.int64), ((n, 4), torch.float32), ((n,), torch.bool)]
    return sum(view_bytes(shape, dtype) for shape, dtype in fields)


def crop_resize_flip(stack: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Bilinear crop-and-resize of each ``(C,H,W)`` in ``stack`` to its box, then its flip."""
    rois = torch.cat([torch.arange(len(stack), device=stack.device, dtype=stack.dtype)[:, None],
                      boxes.to(stack.dtype)], dim=1)
    out = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


def low_maps(low_map: Tensor) -> Tensor:
    """The float 64-px maps ``(N,1,64,64)`` of a batch's ``low_map`` field: as they are, or, for
    the uint8 DCT-scaled pixels a batched reader ships, the reference's bilinear step to 64 px
    (:func:`~harmonia.data.heatmap.low_res_heatmap`, the worker's own function) and ÷ 255."""
    if low_map.dtype == torch.uint8:
        low_map = low_res_heatmap(low_map).div_(255.0)
    if low_map.shape[-2:] != (LOW_RES, LOW_RES):
        raise ValueError(f"low_map must be 64×64 (or uint8 maps to resample); got {tuple(low_map.shape)} {low_map.dtype}")
    return low_map.float()


def apply_device_geometry(batch: DeviceBatch, size: int, normalize: v2.Normalize | None = None,
                          map_normalization: str = "none") -> Sample:
    """Device side: blur + upsample the maps, crop/resize/flip image and map, to ``Sample``.

    ``map_normalization="minmax"`` scales each final map to [0, 1] (constant maps → zeros).
    """
    image = batch.image.permute(0, 3, 1, 2).float().div_(255.0)
    height, width = image.shape[-2:]
    rows = blur_upsample_matrix(height, 0).to(image.device)
    cols = blur_upsample_matrix(width, 1).to(image.device)
    human_map = rows @ low_maps(batch.low_map) @ cols.T  # (N,1,H,W), the reference blur
    out = crop_resize_flip(torch.cat([image, human_map], dim=1), batch.box, batch.flip, size)
    image, human_map = out[:, :3].clamp_(0.0, 1.0), out[:, 3:].clamp_(min=0.0)
    if map_normalization == "minmax":
        low = human_map.amin(dim=(1, 2, 3), keepdim=True)
        span = human_map.amax(dim=(1, 2, 3), keepdim=True) - low
        human_map = torch.where(span > 0, (human_map - low) / span.clamp(min=1e-30), torch.zeros_like(human_map))
    if normalize is not None:
        image = normalize(image)
    return Sample(image, human_map, batch.has_map, batch.label)
