"""ClickMe training geometry on the training device, for a whole batch at once.

Why: in a DataLoader worker, decoding a 256-px ClickMe record costs ~0.7 ms and resampling
it to 224 px (image crop/resize, map blur and crop) another ~1 ms on one core, so workers
would spend more time resampling than decoding (benchmarks/README.md). With
``augment_on="device"`` the worker does only what must happen per sample on the CPU (read,
CRC, parse, decode, checks, the map's 256 → 64 downsampling, drawing the crop box and the
flip) and the batch goes to the GPU as ``uint8``; :func:`apply_device_geometry` then does the
rest in a few batched kernels (``ClickMeDataModule.on_after_batch_transfer``).

Semantics, the same as the worker path up to resampling details:
- the map: blurred as the reference (64 px, 10×10 Gaussian σ = 10) and upsampled to the
  image's size with the same separable matrices as :func:`harmonia.data.heatmap.blur_heatmap`;
- image and map: one ``torchvision.ops.roi_align`` call on the 4-channel stack, with the box
  drawn by ``v2.RandomResizedCrop`` in the worker, ``aligned=True`` and one sample per output
  pixel, i.e. bilinear resampling at the pixel centres of ``resized_crop`` (no antialiasing:
  crops are at most 256 → 224 px); the same flip for both;
- the image becomes float in [0, 1]; optional normalization; no colour jitter (per-sample
  jitter on the device is not implemented: use the worker path for it).
All records of a batch must share one size (ClickMe: 256×256).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

from harmonia.data.heatmap import LOW_RES, blur_upsample_matrix, low_res_heatmap
from harmonia.data.sample import Sample


class DeviceSample(NamedTuple):
    """A sample (or, collated, a batch) whose geometry is still to be applied on the device.

    - ``image``: uint8 ``(H,W,3)``, channels last: that is how the JPEG decoder lays pixels
      out, so batching is a plain copy (stacking ``(3,H,W)`` views of it costs as much as a
      quarter of the decode); ``low_map``: float ``(1,64,64)`` (the heatmap downsampled
      to 64 px, before the blur); ``has_map``, ``label``: as in ``Sample``;
    - ``box``: float ``(4,)`` crop box ``(left, top, right, bottom)`` in pixels;
    - ``flip``: bool, horizontal flip.
    """

    image: Tensor
    low_map: Tensor
    has_map: Tensor
    label: Tensor
    box: Tensor
    flip: Tensor


def draw_geometry(image: Tensor, heatmap: Tensor, label: int, crop: v2.RandomResizedCrop, hflip: float) -> DeviceSample:
    """Worker side: decode-time work only (downsample the map, draw the box and the flip)."""
    params = crop.make_params([image])
    top, left, height, width = params["top"], params["left"], params["height"], params["width"]
    box = torch.tensor([left, top, left + width, top + height], dtype=torch.float32)
    flip = torch.rand(()) < hflip
    if image.is_floating_point():  # raw float32 records: back to 8 bits, as the JPEG ones
        image = image.mul(255.0).round_().to(torch.uint8)
    return DeviceSample(image.permute(1, 2, 0), low_res_heatmap(heatmap), torch.tensor(True), torch.tensor(label),
                        box, flip)


def crop_resize_flip(stack: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Bilinear crop-and-resize of each ``(C,H,W)`` in ``stack`` to its box, then its flip."""
    rois = torch.cat([torch.arange(len(stack), device=stack.device, dtype=stack.dtype)[:, None],
                      boxes.to(stack.dtype)], dim=1)
    out = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)


def apply_device_geometry(batch: DeviceSample, size: int, normalize: v2.Normalize | None = None,
                          map_normalization: str = "none") -> Sample:
    """Device side: blur + upsample the maps, crop/resize/flip image and map, to ``Sample``.

    ``map_normalization="minmax"`` scales each final map to [0, 1] (constant maps → zeros).
    """
    image = batch.image.permute(0, 3, 1, 2).float().div_(255.0)
    height, width = image.shape[-2:]
    rows = blur_upsample_matrix(height, 0).to(image.device)
    cols = blur_upsample_matrix(width, 1).to(image.device)
    if batch.low_map.shape[-2:] != (LOW_RES, LOW_RES):
        raise ValueError(f"low_map must be 64×64; got {tuple(batch.low_map.shape)}")
    human_map = rows @ batch.low_map.float() @ cols.T  # (N,1,H,W), the reference blur
    out = crop_resize_flip(torch.cat([image, human_map], dim=1), batch.box, batch.flip, size)
    image, human_map = out[:, :3].clamp_(0.0, 1.0), out[:, 3:].clamp_(min=0.0)
    if map_normalization == "minmax":
        low = human_map.amin(dim=(1, 2, 3), keepdim=True)
        span = human_map.amax(dim=(1, 2, 3), keepdim=True) - low
        human_map = torch.where(span > 0, (human_map - low) / span.clamp(min=1e-30), torch.zeros_like(human_map))
    if normalize is not None:
        image = normalize(image)
    return Sample(image, human_map, batch.has_map, batch.label)
