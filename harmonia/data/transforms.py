"""Joint image + human-map transforms (torchvision.transforms.v2).

Geometric transforms (random resized crop, horizontal flip, resize) must move the human map
with the image, or the harmonization loss would teach the model to look at the wrong place.
Each call samples the geometry **once** (``v2.RandomResizedCrop.make_params`` and one coin
for the flip) and applies that same box and flip to both tensors, with the same resampling
convention (bilinear, half-pixel centres, as ``v2.functional.resized_crop``):
- the image with v2's antialiased bilinear resize, kept in ``uint8`` through the geometry
  (torch's vectorized uint8 kernel) and converted to float in [0, 1] once, at output size;
- the map with plain bilinear interpolation in float (no quantization). Maps are smooth
  (ClickMe maps are blurred with σ = 40 px at 256 px), so antialiasing them would change
  nothing measurable while costing as much as the image's resize. Bilinear weights are
  non-negative, so a non-negative map stays non-negative (clamped at 0 against rounding).
Photometric transforms (colour jitter, optional normalization, v2) touch the image only.

Normalization is **off by default**: Harmonia's models own their input normalization, and
batches carry images in [0, 1] (the batch contract), so saliency is taken w.r.t. the [0, 1]
image. ``normalize=True`` is for models that expect normalized inputs and do not normalize.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
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
        uint8_output: return ``uint8`` images (the float conversion then happens on the
            training device: ``ClickMeDataModule.on_after_batch_transfer``). Batches of uint8
            are 4× smaller to collate and to pass between processes, which at 224 px costs a
            worker about as much as a JPEG decode. Ignored when ``normalize`` is on.
        antialias: antialiased resampling of the image when shrinking (torchvision's
            default). The ClickMe reference resizes without antialiasing; ``ClickMeRecords``
            follows it in its evaluation path (see :mod:`harmonia.data.clickme`).

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
        if self.jitters:
            photometric.append(v2.ColorJitter(*color_jitter))
        if self.normalization is not None:
            photometric.append(self.normalization)
        self.photometric = v2.Compose(photometric) if photometric else _identity

    @property
    def resize_only(self) -> bool:
        """True when the geometry is a deterministic resize (evaluation)."""
        return not self.train

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

    def __repr__(self) -> str:
        geometry = f"{self.crop}, hflip={self.hflip}" if self.train else f"Resize({self.size})"
        return f"JointTransform({geometry}, antialias={self.antialias}, photometric={self.photometric})"


def _identity(image: Tensor) -> Tensor:
    return image


def to_float_image(image: Tensor) -> Tensor:
    """A uint8 image (batch) as float in [0, 1]; float images are returned as they are."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image
