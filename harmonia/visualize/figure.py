"""Draw a MACO image with its transparency as alpha.

As xplique's and horama's ``plot_maco``: the image is clipped to its [1, 99] percentiles and
stretched to [0, 1]; the transparency is averaged over channels, clipped at its 80th
percentile and divided by its maximum, so the top fifth of the pixels are fully opaque and
the rest fade with how little the objective's gradient touched them.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _quantile(x: Tensor, q: float) -> Tensor:
    """Per-row quantile of ``x`` ``(B, ...)`` (``q`` in [0, 1]) as ``(B, 1, 1, 1)``."""
    return torch.quantile(x.flatten(1).float(), q, dim=1).view(-1, 1, 1, 1)


def alpha_mask(alpha: Tensor, percentile: float = 80.0) -> Tensor:
    """``(B, 1, H, W)`` in [0, 1] from a transparency ``(B, C, H, W)`` (channel mean, clipped, max-normalized)."""
    mean = alpha.detach().float().mean(1, keepdim=True)
    clipped = torch.minimum(mean, _quantile(mean, percentile / 100))
    return clipped / clipped.flatten(1).amax(1).view(-1, 1, 1, 1).clamp_min(1e-12)


def normalize_image(image: Tensor, percentile: float = 1.0) -> Tensor:
    """Clip each image ``(B, C, H, W)`` to its ``[p, 100-p]`` percentiles and stretch to [0, 1]."""
    image = image.detach().float()
    low, high = _quantile(image, percentile / 100), _quantile(image, 1 - percentile / 100)
    return ((image - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)


def maco_figure(
    image: Tensor,
    alpha: Tensor,
    percentile: float = 80.0,
    background: float | Sequence[float] = 1.0,
    rgba: bool = False,
    normalize: bool = True,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """The picture of a MACO result: RGB composited over ``background``, or RGBA.

    Args:
        image, alpha: ``(C, H, W)`` or batched ``(B, C, H, W)`` (as :func:`~harmonia.visualize.maco` returns).
        percentile: the transparency is clipped at this percentile (xplique's plot: 80).
        background: grey level or RGB triple the transparent parts show (RGB output only).
        rgba: return ``(4, H, W)`` (image + alpha channel) instead of a composite.
        normalize: stretch the image's [1, 99] percentiles to [0, 1]; otherwise map
            ``value_range`` to [0, 1].
    Returns:
        ``(3, H, W)`` / ``(4, H, W)`` floats in [0, 1] (batched if the input is).
    """
    batched = image.ndim == 4
    if not batched:
        image, alpha = image[None], alpha[None]
    if image.ndim != 4 or alpha.ndim != 4 or image.shape[-2:] != alpha.shape[-2:] or len(image) != len(alpha):
        raise ValueError(f"image {tuple(image.shape)} and alpha {tuple(alpha.shape)} must be (C, H, W) or (B, C, H, W) alike")
    if normalize:
        pixels = normalize_image(image)
    else:
        low, high = value_range
        pixels = ((image.detach().float() - low) / (high - low)).clamp(0, 1)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif pixels.shape[1] != 3:
        raise ValueError(f"can draw 1- or 3-channel images; got {pixels.shape[1]} channels")
    mask = alpha_mask(alpha.to(pixels.device), percentile)
    if rgba:
        out = torch.cat([pixels, mask], 1)
    else:
        bg = torch.as_tensor(background, dtype=pixels.dtype, device=pixels.device).reshape(-1)
        bg = (bg.expand(3) if bg.numel() == 1 else bg).view(1, 3, 1, 1)
        out = pixels * mask + bg * (1 - mask)
    return out if batched else out[0]


def figure_grid(pictures: Tensor, cell: int = 96, pad: int = 2, columns: int | None = None, fill: float = 1.0) -> Tensor:
    """Lay ``(B, 3|4, H, W)`` pictures out in a grid, each nearest-upscaled by an integer factor to ≥ ``cell`` px."""
    if pictures.ndim != 4:
        raise ValueError(f"pictures must be (B, C, H, W); got {tuple(pictures.shape)}")
    scale = max(1, math.ceil(cell / max(pictures.shape[-2:])))
    tiles = F.interpolate(pictures.float(), scale_factor=scale, mode="nearest") if scale > 1 else pictures.float()
    count = len(tiles)
    columns = columns or min(count, 10)
    rows = math.ceil(count / columns)
    h, w = tiles.shape[-2:]
    canvas = torch.full((tiles.shape[1], rows * h + (rows + 1) * pad, columns * w + (columns + 1) * pad), fill)
    for k, tile in enumerate(tiles.cpu()):
        r, c = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y : y + h, x : x + w] = tile
    return canvas


def save_figure(picture: Tensor, path: str | Path) -> Path:
    """Write a ``(3|4, H, W)`` picture in [0, 1] as an RGB/RGBA PNG (atomically); return the path."""
    from PIL import Image

    if picture.ndim != 3 or picture.shape[0] not in (3, 4):
        raise ValueError(f"a picture is (3, H, W) or (4, H, W); got {tuple(picture.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (picture.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
