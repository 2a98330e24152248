"""Joint image + human-map transforms (torchvision.transforms.v2), per sample or per batch.

Geometric transforms (random resized crop, horizontal flip, resize) must move the human map
with the image, or the harmonization loss would teach the model to look at the wrong place.
One :class:`JointTransform` holds the options and applies them two ways:

- ``transform(image, map)``, one sample (image folders and plain shards, whose images differ
  in size, so they are cropped in the DataLoader workers before batching): the geometry is
  sampled **once** (``v2.RandomResizedCrop.make_params`` and one coin for the flip) and the
  same box and flip move both tensors, with the same resampling convention (bilinear,
  half-pixel centres, as ``v2.functional.resized_crop``): the image with v2's (antialiased)
  resize, kept in ``uint8`` through the geometry, the map with plain bilinear interpolation in
  float. Maps are smooth, so antialiasing them would change nothing measurable.
- ``transform.apply_batch(images, maps)``, a whole batch of one size on the training device
  (ClickMe records): every sample's box is drawn as ``make_params`` draws it
  (:func:`draw_boxes`), then one ``torchvision.ops.roi_align`` call resamples image and map
  together at the pixel centres of ``resized_crop`` (bilinear, no antialiasing: ClickMe crops
  shrink by at most 256 → 224 px), and the flips are applied by mask.

Bilinear weights are non-negative, so a non-negative map stays non-negative (clamped at 0
against rounding). Photometric transforms (colour jitter, optional normalization, v2) touch
the image only.

Normalization is **off by default**: Harmonia's models own their input normalization, and
batches carry images in [0, 1] (the batch contract), so saliency is taken w.r.t. the [0, 1]
image. ``normalize=True`` is for models that expect normalized inputs and do not normalize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class JointTransform:
    """Apply the same geometry to ``(image (C,H,W), map (1,H,W))``; photometry to the image only.

    Args:
        size: output side (square) in pixels.
        train: random resized crop + flip (+ jitter) when True; a plain resize when False.
        scale: area range of the random crop, as a fraction of the image (torchvision default
            ``(0.08, 1.0)``; use e.g. ``(0.35, 1.0)`` to keep most of a human map in view).
        ratio: aspect-ratio range of the random crop.
        hflip: probability of a horizontal flip (train only).
        color_jitter: ``(brightness, contrast, saturation, hue)`` for ``v2.ColorJitter``, image
            only, train only; ``None`` disables it.
        normalize: normalize the image with ``mean``/``std`` (off: models normalize themselves).
        mean, std: normalization statistics (ImageNet's by default).
        uint8_output: per sample, return ``uint8`` images (the float conversion then happens
            on the training device: ``ClickMeDataModule.on_after_batch_transfer``): batches of
            uint8 are 4× smaller to collate and to pass between processes. Ignored when
            ``normalize`` is on.
        antialias: antialiased resampling of the image when shrinking, per sample
            (torchvision's default). ``apply_batch`` never antialiases: the ClickMe reference
            resizes without it.

    Returns from ``__call__``: ``(image float (C,size,size) in [0,1] unless normalized (uint8
    with ``uint8_output``), map float (1,size,size) >= 0)``.
    """

    def __init__(
        self,
        size: int = 224,
        train: bool = False,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: Sequence[float] | None = None,
        normalize: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        antialias: bool = True,
        uint8_output: bool = False,
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive; got {size}")
        self.size, self.train, self.hflip, self.antialias = size, train, hflip, antialias
        self.crop = v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=antialias)
        self.jitters = train and color_jitter is not None
        self.normalization = v2.Normalize(list(mean), list(std)) if normalize else None
        self.uint8_output = uint8_output and not normalize
        photometric: list[v2.Transform] = [] if self.uint8_output else [v2.ToDtype(torch.float32, scale=True)]
        self.jitter = v2.ColorJitter(*color_jitter) if self.jitters else None
        if self.jitter is not None:
            photometric.append(self.jitter)
        if self.normalization is not None:
            photometric.append(self.normalization)
        self.photometric = v2.Compose(photometric) if photometric else _identity

    def __call__(self, image: Tensor, human_map: Tensor) -> tuple[Tensor, Tensor]:
        """Transform one sample; ``image`` uint8 or float in [0,1], ``human_map`` float."""
        if image.shape[-2:] != human_map.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and map {tuple(human_map.shape)} differ in size")
        size = [self.size, self.size]
        if self.train:
            box = self.crop.make_params([image])  # one box for both
            top, left, height, width = box["top"], box["left"], box["height"], box["width"]
            image = TF.resized_crop(image, top, left, height, width, size, antialias=self.antialias)
            human_map = human_map[:, top : top + height, left : left + width]
        else:
            image = TF.resize(image, size, antialias=self.antialias)
        if tuple(human_map.shape[-2:]) != tuple(size):
            human_map = F.interpolate(human_map[None], size=size, mode="bilinear", align_corners=False)[0]
        if self.train and self.hflip > 0 and torch.rand(()) < self.hflip:  # one coin for both
            image, human_map = image.flip(-1), human_map.flip(-1)
        return self.finish(image), human_map.clamp(min=0.0)

    def finish(self, image: Tensor) -> Tensor:
        """Photometric part on a geometrically final image, in the requested output dtype.

        With ``uint8_output`` a float image (from a raw float32 record) is rounded to 8 bits,
        as JPEG-coded ones are, so that every image of a batch has one dtype.
        """
        if self.uint8_output:
            if image.is_floating_point():
                image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
            return self.photometric(image)
        return self.photometric(to_float_image(image))

    def apply_batch(self, image: Tensor, human_map: Tensor,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Transform a batch where it lives: ``image`` float ``(N,C,H,W)`` in [0, 1], ``human_map``
        float ``(N,1,H,W)`` (or already ``(N,1,size,size)`` when not training: then kept as it is).

        Training: a random resized crop and a flip per sample, one box and one coin for image
        and map, then colour jitter (per sample) and normalization. Otherwise: a bilinear
        resize to ``size`` without antialiasing (the ClickMe reference's), then normalization.
        Boxes and flips are drawn on the CPU from ``generator`` (None: torch's global one).
        Returns ``(image float (N,C,size,size), map float (N,1,size,size) >= 0)``.
        """
        if image.shape[-2:] != human_map.shape[-2:] and (self.train or human_map.shape[-2:] != (self.size, self.size)):
            raise ValueError(f"images {tuple(image.shape)} and maps {tuple(human_map.shape)} differ in size")
        n, channels, height, width = image.shape
        size = (self.size, self.size)
        if self.train:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
            boxes = draw_boxes(n, height, width, self.crop.scale, self.crop.ratio, rng).to(image.device)
            flips = (torch.rand(n, generator=generator) < self.hflip).to(image.device)
            out = crop_resize_flip(torch.cat([image, human_map.to(image.dtype)], dim=1), boxes, flips, self.size)
            image, human_map = out[:, :channels], out[:, channels:]
        else:
            if image.shape[-2:] != size:
                image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=False)
            if human_map.shape[-2:] != size:
                human_map = F.interpolate(human_map, size=size, mode="bilinear", align_corners=False, antialias=False)
        image = image.clamp(0.0, 1.0)  # out of place: the caller's tensors stay as they were
        if self.jitter is not None:
            image = torch.stack([self.jitter(one) for one in image])  # its own factors and order per sample
        if self.normalization is not None:
            image = self.normalization(image)
        return image, human_map.clamp(min=0.0)

    def __repr__(self) -> str:
        geometry = f"{self.crop}, hflip={self.hflip}" if self.train else f"Resize({self.size})"
        return f"JointTransform({geometry}, antialias={self.antialias}, photometric={self.photometric})"


def _identity(image: Tensor) -> Tensor:
    return image


def to_float_image(image: Tensor) -> Tensor:
    """A uint8 image (batch) as float in [0, 1]; float images are returned as they are."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def draw_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
               rng: np.random.Generator | None = None) -> Tensor:
    """``(n, 4)`` random-resized-crop boxes ``(left, top, right, bottom)`` for ``height×width`` images.

    The distribution of ``v2.RandomResizedCrop.make_params`` (tested), drawn for a whole batch
    at once: each sample gets 10 tries of an area fraction uniform in ``scale`` and a
    log-aspect uniform in ``log(ratio)``; the first box that fits is placed uniformly; a sample
    whose 10 tries all fail gets torchvision's fallback, the largest central crop whose aspect
    lies in ``ratio``. ``rng`` None: a generator seeded from torch's (so ``seed_everything``
    governs it).
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


def crop_resize_flip(stack: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Bilinear crop-and-resize of each ``(C,H,W)`` of ``stack`` to its box ``(left, top, right,
    bottom)``, then its horizontal flip where ``flips`` is True: ``(N,C,size,size)``.

    ``roi_align`` with ``aligned=True`` and one sample per output pixel is bilinear resampling
    at the pixel centres of ``resized_crop``.
    """
    rois = torch.cat([torch.arange(len(stack), device=stack.device, dtype=stack.dtype)[:, None],
                      boxes.to(stack.dtype)], dim=1)
    out = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
