"""Pictures of attributions: heat-map overlays and a labelled grid (plain PyTorch + Pillow).

``saliency_grid`` draws one row per image: the image, then one overlay per named map (the
human map, each method's saliency), with column titles and an optional label per row. It
returns a ``(3, H, W)`` float tensor in [0, 1] that any logger can take
(``harmonia.callbacks.logging.log_image``) or ``save_png`` can write.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LINE = 12  # pixels of one line of the default font
LABEL_WIDTH = 56  # pixels of the row-label column


def _colormap(name: str) -> Tensor:
    """``(256, 3)`` RGB lookup table of a Matplotlib colormap."""
    from matplotlib import colormaps  # local: only pictures need Matplotlib

    return torch.from_numpy(colormaps[name](np.linspace(0, 1, 256))[:, :3]).float()


def normalize_map(attribution: Tensor, percentile: float = 99.0) -> Tensor:
    """``|attribution|`` of ``(N,1,H,W)`` maps scaled per map to [0, 1] by its ``percentile``.

    Display only: signed maps (SmoothGrad, Integrated Gradients) are shown by magnitude, and
    a few extreme pixels do not wash out the rest. An all-zero map stays zero.
    """
    a = attribution.detach().float().abs().flatten(1)
    top = torch.quantile(a, percentile / 100.0, dim=1, keepdim=True) if a.shape[1] else a
    top = torch.where(top > 0, top, a.amax(dim=1, keepdim=True).clamp_min(1e-12))
    return (a / top).clamp(0, 1).view_as(attribution)


def overlay(images: Tensor, attribution: Tensor, cmap: str = "jet", alpha: float = 0.7, dim: float = 0.6) -> Tensor:
    """Colour ``(N,1,H,W)`` maps and blend them over ``(N,C,H,W)`` images in [0, 1] → ``(N,3,H,W)``.

    Each pixel's colour weight is ``alpha ×`` its normalized importance, so unimportant pixels
    show the image itself (dimmed by ``dim`` so that colours stand out on bright pixels).
    """
    rgb = images.detach().float().cpu().clamp(0, 1) * dim
    rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb[:, :3]
    strength = normalize_map(attribution.detach().cpu())
    lut = _colormap(cmap)
    colour = lut[(strength[:, 0] * 255).round().long()].permute(0, 3, 1, 2)
    weight = alpha * strength
    return rgb * (1 - weight) + colour * weight


def _draw_text(canvas: Tensor, texts: Sequence[tuple[int, int, int, str]]) -> Tensor:
    """Write ``(x, y, max_width, text)`` items in white on a ``(3,H,W)`` canvas with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    pixels = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for x, y, width, text in texts:
        while text and draw.textlength(text, font=font) > width:  # clip to the cell
            text = text[:-1]
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255


def wrap_title(text: str, width: int) -> list[str]:
    """``text`` broken into lines that each fit ``width`` pixels of the default font.

    Breaks after ``_``, ``-`` or spaces where it can (``integrated_gradients`` → ``integrated_`` /
    ``gradients``), else inside a word, so a column title is shown whole, never cut off.
    """
    from PIL import ImageFont

    font = ImageFont.load_default()
    fits = lambda t: font.getlength(t) <= width  # noqa: E731
    lines: list[str] = []
    rest = text
    while rest:
        if fits(rest):
            lines.append(rest)
            break
        cut = max(1, max((i + 1 for i, ch in enumerate(rest) if ch in "_- " and fits(rest[: i + 1])), default=0))
        if cut == 1:  # no break point fits: as many characters as fit
            cut = max(1, max((i for i in range(1, len(rest) + 1) if fits(rest[:i])), default=1))
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return lines


def saliency_grid(
    images: Tensor,
    maps: Mapping[str, Tensor],
    row_labels: Sequence[str] | None = None,
    min_tile: int = 96,
    padding: int = 2,
) -> Tensor:
    """A ``(3, H, W)`` picture: one row per image; columns ``image`` then an overlay per map.

    Args:
        images: ``(N,C,H,W)`` in [0, 1].
        maps: column title → ``(N,1,H,W)`` maps (e.g. ``{"human": ..., "saliency": ...}``).
        row_labels: one short text per row (e.g. ``"y 3 / p 5"``), drawn left of the row.
        min_tile: tiles are upscaled (nearest) by an integer factor to at least this side, so
            small images (32×32 digits) stay legible.
        padding: pixels between tiles.
    """
    n, _, h, w = images.shape
    for title, m in maps.items():
        if m.shape[0] != n or tuple(m.shape[-2:]) != (h, w):
            raise ValueError(f"map {title!r} has shape {tuple(m.shape)}; expected ({n}, 1, {h}, {w})")
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    columns = [images.detach().float().cpu().clamp(0, 1)] + [overlay(images, m) for m in maps.values()]
    columns = [c.expand(-1, 3, -1, -1) if c.shape[1] == 1 else c[:, :3] for c in columns]
    left = LABEL_WIDTH if row_labels is not None else 0
    titles = [wrap_title(t, tw - 4) for t in ["image", *maps]]
    header = 2 + LINE * max(len(lines) for lines in titles)
    height = header + n * (th + padding)
    width = left + len(columns) * (tw + padding)
    canvas = torch.zeros(3, height, width)
    for col, tiles in enumerate(columns):
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest") if scale > 1 else tiles
        x0 = left + col * (tw + padding)
        for row in range(n):
            y0 = header + row * (th + padding)
            canvas[:, y0 : y0 + th, x0 : x0 + tw] = tiles[row]
    texts = [(left + c * (tw + padding) + 2, 1 + LINE * k, tw - 2, line)
             for c, lines in enumerate(titles) for k, line in enumerate(lines)]
    if row_labels is not None:
        texts += [(2, header + r * (th + padding) + th // 2 - 6, left - 4, str(lbl)) for r, lbl in enumerate(row_labels)]
    return _draw_text(canvas, texts)
