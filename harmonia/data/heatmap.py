"""The ClickMe reference's heatmap preprocessing (SPEC §2), as separable matrices.

serre-lab/harmonization ``clickme_dataset.py`` turns a 256-px click heatmap into a training
map by: bilinear resize to 64×64 (TF, no antialiasing) → 10×10 Gaussian blur, σ = 10 (TF
``conv2d`` "SAME", zero padding) → bilinear resize to 224×224. Both the blur and the resize
are linear and separable, so after the downsampling they are applied as one ``(out, 64)``
matrix per axis (``rows @ low @ colsᵀ``): equal to resize-conv-resize up to float rounding
(tested against a NumPy transcription of the reference), and several times faster on a core.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BLUR_SIZE, BLUR_SIGMA, LOW_RES = 10, 10.0, 64


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


@functools.lru_cache(maxsize=32)
def blur_upsample_matrix(out: int, axis: int) -> Tensor:
    """``(out, 64)``: blur (rows: axis 0, columns: axis 1) then bilinear resize 64 → ``out``."""
    up = F.interpolate(torch.eye(LOW_RES, dtype=torch.float64)[None, None], size=(out, LOW_RES),
                       mode="bilinear", align_corners=False)[0, 0]
    return (up @ _blur_matrix(reference_kernel()[axis], LOW_RES)).float()


def blur_heatmap(heatmap: Tensor, size: Sequence[int]) -> Tensor:
    """Reference map preprocessing: ``(1,H,W)`` → 64×64 bilinear → Gaussian blur → ``size``."""
    return blur_upsample_matrix(int(size[0]), 0) @ low_res_heatmap(heatmap) @ blur_upsample_matrix(int(size[1]), 1).T


def low_res_heatmap(heatmap: Tensor) -> Tensor:
    """The reference's first step: bilinear resize (no antialiasing) of ``(1,H,W)`` to 64×64."""
    return F.interpolate(heatmap[None], size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)[0]


def minmax(human_map: Tensor) -> Tensor:
    """Scale a map to [0, 1] (the pre-release variant); a constant map becomes zeros."""
    low, high = human_map.min(), human_map.max()
    span = high - low
    return (human_map - low) / span if span > 0 else torch.zeros_like(human_map)
