"""The ClickMe reference's heatmap preprocessing, as separable matrices.

serre-lab/harmonization ``clickme_dataset.py`` turns a 256-px click heatmap into a training
map by: bilinear resize to 64×64 (TF, no antialiasing) → 10×10 Gaussian blur, σ = 10 (TF
``conv2d`` "SAME", zero padding) → bilinear resize to 224×224. Harmonia splits this in two:
:func:`coarse_map` (the first step, in the DataLoader workers: a 64×64 map is all a batch
needs to carry) and :func:`blur_coarse_map` (the other two, batched on the training device).
Both the blur and the resize are linear and separable, so they are applied as one
``(out, 64)`` matrix per axis (``rows @ coarse @ colsᵀ``): equal to resize-conv-resize up to
float rounding (tested against a NumPy transcription of the reference).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BLUR_SIZE, BLUR_SIGMA, COARSE = 10, 10.0, 64
INTEGER_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}  # decoded 8/16-bit maps → [0, 1]


def reference_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> tuple[Tensor, Tensor]:
    """The reference's Gaussian blur kernel as its two 1-D factors ``(rows, cols)``.

    serre-lab/harmonization ``blur.py`` builds ``exp(-(x² + y²) / 2σ²)``, normalized, with
    columns at offsets ``-(size-1)//2 .. (size-1)//2`` and rows running the other way; for an
    even size this is asymmetric by one pixel, which we keep so that results match. The
    kernel is separable: ``outer(rows, cols)`` is the reference's 2-D kernel (tested).
    """
    lo, hi = -(size - 1) // 2, (size - 1) // 2  # Python precedence: (-(size-1)) // 2, as the reference
    xs = torch.arange(lo, hi + 1, dtype=torch.float64)
    ys = torch.arange(hi, lo - 1, -1, dtype=torch.float64)
    rows, cols = torch.exp(-(ys**2) / (2 * sigma**2)), torch.exp(-(xs**2) / (2 * sigma**2))
    return rows / rows.sum(), cols / cols.sum()


def _blur_matrix(factor: Tensor, n: int) -> Tensor:
    """``(n, n)`` matrix of a 1-D cross-correlation with TF "SAME" zero padding."""
    before = (len(factor) - 1) // 2
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i, weight in enumerate(factor.tolist()):
        offset = i - before  # output y reads input y + offset
        matrix += torch.diag(torch.full((n - abs(offset),), weight, dtype=torch.float64), offset)
    return matrix


@functools.lru_cache(maxsize=64)
def blur_upsample_matrix(out: int, axis: int, device: str = "cpu") -> Tensor:
    """``(out, 64)`` float32 on ``device``: blur (rows: axis 0, columns: axis 1) then bilinear resize 64 → ``out``."""
    up = F.interpolate(torch.eye(COARSE, dtype=torch.float64)[None, None], size=(out, COARSE),
                       mode="bilinear", align_corners=False)[0, 0]
    return (up @ _blur_matrix(reference_kernel()[axis], COARSE)).float().to(device)


def blur_coarse_map(coarse: Tensor, size: Sequence[int]) -> Tensor:
    """The reference's last two steps on 64-px maps ``(…,64,64)``: Gaussian blur, bilinear to ``size``.

    Runs where ``coarse`` lives (the training device, for a whole batch at once).
    """
    if coarse.shape[-2:] != (COARSE, COARSE):
        raise ValueError(f"coarse maps must be 64×64; got {tuple(coarse.shape)}")
    device = str(coarse.device)
    return blur_upsample_matrix(int(size[0]), 0, device) @ coarse @ blur_upsample_matrix(int(size[1]), 1, device).T


def blur_heatmap(heatmap: Tensor, size: Sequence[int]) -> Tensor:
    """The whole reference map preprocessing: ``(…,H,W)`` → 64×64 bilinear → Gaussian blur → ``size``."""
    return blur_coarse_map(coarse_map(heatmap), size)


def coarse_map(heatmap: Tensor) -> Tensor:
    """The reference's first step: bilinear resize (no antialiasing) of ``(…,H,W)`` to 64×64, in float.

    An integer map keeps its units (a uint8 map gives values in [0, 255]). Half-pixel bilinear
    resampling reads two rows (then two columns) per output: they are picked from the map as
    stored and only those are converted to float, so a 256-px map is never converted whole.
    The values of ``F.interpolate`` up to the order of float additions (tested).
    """
    rows = _resample(heatmap, -2)
    return _resample(rows, -1)


@functools.lru_cache(maxsize=32)
def _taps(size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Half-pixel bilinear resampling ``size`` → 64 without antialiasing (``F.interpolate``'s
    rule): output ``i`` is input ``first[i]`` moved towards input ``second[i]`` by ``weight[i]``."""
    source = ((torch.arange(COARSE, dtype=torch.float64) + 0.5) * (size / COARSE) - 0.5).clamp_(min=0.0)
    first = source.floor().long().clamp_(max=size - 1)
    second = (first + 1).clamp_(max=size - 1)
    return first, second, (source - first).float()


def _resample(x: Tensor, axis: int) -> Tensor:
    """Bilinear resampling of ``x`` to 64 along ``axis`` (-2 or -1), in float."""
    first, second, weight = _taps(x.shape[axis])
    if x.device.type != "cpu":
        first, second, weight = first.to(x.device), second.to(x.device), weight.to(x.device)
    weight = weight[:, None] if axis == -2 else weight
    return x.index_select(axis, first).float().lerp_(x.index_select(axis, second).float(), weight)


def minmax(maps: Tensor) -> Tensor:
    """Scale each map of a batch ``(N,1,H,W)`` to [0, 1] (the pre-release variant); a constant map becomes zeros."""
    low = maps.amin(dim=(1, 2, 3), keepdim=True)
    span = maps.amax(dim=(1, 2, 3), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp(min=1e-30), torch.zeros_like(maps))
