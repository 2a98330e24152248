"""Joint image + human-map transforms (torchvision.transforms.v2).

Geometric transforms (random resized crop, horizontal flip, resize) must move the human map
with the image, or the harmonization loss would teach the model to look at the wrong place.
v2 applies one set of sampled parameters to every tensor of a call, so image and map are passed
*together* to one ``v2.Compose``. Both are wrapped as ``tv_tensors.Image`` so that the map is
resampled **bilinearly** (a ``Mask`` would use nearest neighbour, which turns a smooth map into
blocks); photometric transforms (colour jitter, optional normalization) are then applied to the
image alone, so the map is never colour-jittered. Bilinear resampling has non-negative weights,
so a non-negative map stays non-negative (clamped at 0 against float rounding only).

Speed: the image stays ``uint8`` through the geometric ops (torch's vectorized uint8 kernels)
and becomes float in [0, 1] once, at output size.

Normalization is **off by default**: Harmonia's models own their input normalization, and
batches carry images in [0, 1] (the batch contract), so saliency is taken w.r.t. the [0, 1]
image. ``normalize=True`` is for models that expect normalized inputs and do not normalize.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

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
        antialias: antialiased resampling when shrinking (torchvision's default). The ClickMe
            reference resizes without antialiasing; ``ClickMeRecords`` follows it exactly in
            its evaluation path (see :mod:`harmonia.data.clickme`).

    Returns from ``__call__``: ``(image float (C,size,size) in [0,1] unless normalized,
    map float (1,size,size) >= 0)``.
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
    ) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive; got {size}")
        self.size, self.train = size, train
        if train:
            geometric: list[v2.Transform] = [
                v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), antialias=antialias)
            ]
            if hflip > 0:
                geometric.append(v2.RandomHorizontalFlip(hflip))
        else:
            geometric = [v2.Resize((size, size), antialias=antialias)]
        self.geometric = v2.Compose(geometric)
        photometric: list[v2.Transform] = [v2.ToDtype(torch.float32, scale=True)]
        if train and color_jitter is not None:
            photometric.append(v2.ColorJitter(*color_jitter))
        if normalize:
            photometric.append(v2.Normalize(list(mean), list(std)))
        self.photometric = v2.Compose(photometric)

    @property
    def resize_only(self) -> bool:
        """True when the geometry is a deterministic resize (evaluation)."""
        return not self.train

    def __call__(self, image: Tensor, human_map: Tensor) -> tuple[Tensor, Tensor]:
        """Transform one sample; ``image`` uint8 or float in [0,1], ``human_map`` float."""
        if image.shape[-2:] != human_map.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape)} and map {tuple(human_map.shape)} differ in size")
        image, human_map = self.geometric(tv_tensors.Image(image), tv_tensors.Image(human_map))
        image = self.photometric(image).as_subclass(Tensor)
        return image, human_map.as_subclass(Tensor).clamp_(min=0.0)

    def __repr__(self) -> str:
        return f"JointTransform(geometric={self.geometric}, photometric={self.photometric})"
