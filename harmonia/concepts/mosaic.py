"""Pictures of concepts: a mosaic of each concept's top crops, and concept attribution overlays.

Both return a ``(3, H, W)`` float image in [0, 1] that any logger (or ``save_png``) takes.
Each concept keeps one colour in both pictures, so a reader can match a mosaic row to the
regions an overlay paints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Matplotlib's "tab10" colours (RGB in [0, 1]); concepts past ten reuse them in order.
PALETTE = (
    (0.122, 0.467, 0.706), (1.000, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133), (0.090, 0.745, 0.812),
)
BACKGROUND = 0.12


def concept_color(j: int) -> tuple[float, float, float]:
    """The colour of concept ``j``."""
    return PALETTE[j % len(PALETTE)]


def _rgb(images: Tensor, cell: int) -> Tensor:
    """``(N, C, h, w)`` → ``(N, 3, s·h, s·w)`` in [0, 1], nearest-upscaled by the integer ``s`` reaching ``cell``."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        images = images[:, :3]
    scale = max(1, math.ceil(cell / max(images.shape[-2:])))
    return F.interpolate(images, scale_factor=scale, mode="nearest").clamp(0, 1) if scale > 1 else images.clamp(0, 1)


def _label(text: str, color: tuple[float, float, float], height: int, width: int) -> Tensor:
    """A ``(3, height, width)`` tile: a colour bar and ``text`` in that colour."""
    from PIL import Image, ImageDraw, ImageFont

    tile = Image.new("RGB", (width, height), tuple(int(BACKGROUND * 255) for _ in range(3)))
    draw = ImageDraw.Draw(tile)
    rgb = tuple(int(c * 255) for c in color)
    draw.rectangle([0, 0, 5, height - 1], fill=rgb)
    for line, text_line in enumerate(text.split("\n")):
        draw.text((10, 4 + 12 * line), text_line, fill=rgb, font=ImageFont.load_default())
    return torch.from_numpy(np.asarray(tile).copy()).permute(2, 0, 1).float() / 255


def _grid(rows: list[list[Tensor]], pad: int) -> Tensor:
    """Tiles ``(3, h, w)`` laid out row by row (rows padded to the widest) on a dark background."""
    heights = [max(t.shape[1] for t in row) for row in rows]
    widths = [sum(t.shape[2] for t in row) + pad * (len(row) + 1) for row in rows]
    canvas = torch.full((3, sum(heights) + pad * (len(rows) + 1), max(widths)), BACKGROUND)
    y = pad
    for row, h in zip(rows, heights):
        x = pad
        for tile in row:
            canvas[:, y : y + tile.shape[1], x : x + tile.shape[2]] = tile
            x += tile.shape[2] + pad
        y += h + pad
    return canvas


def concept_mosaic(
    top_crops: Tensor, labels: Sequence[str], colors: Sequence[int] | None = None, cell: int = 48, pad: int = 2
) -> Tensor:
    """One row per concept: a label tile, then its top crops.

    Args:
        top_crops: ``(k, n, C, p, p)`` crops in [0, 1], rows in display order.
        labels: one text per row (e.g. ``"concept 3\\nimp 0.41"``; ``\\n`` starts a new line).
        colors: palette index of each row (default ``0..k-1``).
        cell: crops are upscaled (nearest, integer factor) to at least this many pixels.
    """
    if top_crops.ndim != 5 or len(labels) != len(top_crops):
        raise ValueError(f"need (k, n, C, p, p) crops and k labels; got {tuple(top_crops.shape)} and {len(labels)} labels")
    colors = list(range(len(top_crops))) if colors is None else list(colors)
    rows = []
    for crops, text, color in zip(top_crops, labels, colors):
        tiles = list(_rgb(crops, cell))
        rows.append([_label(text, concept_color(color), tiles[0].shape[1], 84), *tiles])
    return _grid(rows, pad)


def attribution_overlay(
    images: Tensor, maps: Tensor, colors: Sequence[int] | None = None, cell: int = 64, pad: int = 2, alpha: float = 0.75
) -> Tensor:
    """One row per image: the image, then the image tinted by each concept's map in its colour.

    ``maps`` ``(N, m, H, W)`` ≥ 0 (e.g. :meth:`Craft.attribution_maps` for the ``m`` concepts to
    show); each concept's map is scaled by its maximum over all ``N`` images, so a row also
    shows how strongly each image expresses the concept.
    """
    if maps.ndim != 4 or len(maps) != len(images) or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"maps {tuple(maps.shape)} must be (N, m, H, W) for images {tuple(images.shape)}")
    colors = list(range(maps.shape[1])) if colors is None else list(colors)
    maps = maps.detach().float().cpu()
    maps = maps / maps.amax(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
    base = _rgb(images, cell)
    strength = F.interpolate(maps, size=base.shape[-2:], mode="nearest")
    rows = []
    for img, heat in zip(base, strength):
        gray = img.mean(0, keepdim=True).expand(3, -1, -1) * 0.6
        tiles = [img]
        for m, color in zip(heat, colors):
            tint = torch.tensor(concept_color(color)).view(3, 1, 1)
            weight = alpha * m[None]
            tiles.append(gray * (1 - weight) + tint * weight)
        rows.append(tiles)
    return _grid(rows, pad)
