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
import math
from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from torch import Tensor

from harmonia.data.jpeg import jpeg_size
from harmonia.data.validate import check_map_size

BLUR_SIZE, BLUR_SIGMA, LOW_RES = 10, 10.0, 64
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


@functools.lru_cache(maxsize=32)
def blur_upsample_matrix(out: int, axis: int) -> Tensor:
    """``(out, 64)``: blur (rows: axis 0, columns: axis 1) then bilinear resize 64 → ``out``."""
    up = F.interpolate(torch.eye(LOW_RES, dtype=torch.float64)[None, None], size=(out, LOW_RES),
                       mode="bilinear", align_corners=False)[0, 0]
    return (up @ _blur_matrix(reference_kernel()[axis], LOW_RES)).float()


def blur_heatmap(heatmap: Tensor, size: Sequence[int]) -> Tensor:
    """Reference map preprocessing: ``(1,H,W)`` → 64×64 bilinear → Gaussian blur → ``size``."""
    return blur_low_map(low_res_heatmap(heatmap), size)


def blur_low_map(low_map: Tensor, size: Sequence[int]) -> Tensor:
    """The reference's last two steps on a 64-px map ``(…,64,64)``: Gaussian blur, bilinear to ``size``."""
    return blur_upsample_matrix(int(size[0]), 0) @ low_map @ blur_upsample_matrix(int(size[1]), 1).T


def low_res_heatmap(heatmap: Tensor, scratch: dict | None = None) -> Tensor:
    """The reference's first step: bilinear resize (no antialiasing) of ``(…,H,W)`` to 64×64, in float.

    An integer map keeps its units (a uint8 map gives values in [0, 255]). Any leading dims
    (one map or a batch). The half-pixel bilinear resampling reads two rows and two columns
    per output, so it picks them on the map as stored (without converting the other ¾ of a
    256-px map to float first) and weights them: the values of ``F.interpolate`` up to the
    order of float additions, several times cheaper. When both sides are multiples of 64
    (ClickMe: 256) the rows and columns are fixed strides with weights ½ (even factors) or 1
    (odd ones): strided picks. ``scratch``: a dict of reusable intermediate buffers (a batch
    reader's; fresh multi-MB temporaries would cost a page fault per 4 KB each time); the
    result then lives in it too, until the next call.
    """
    height, width = heatmap.shape[-2:]
    if height % LOW_RES or width % LOW_RES:
        rows = _resample_rows(heatmap, height, scratch, "rows")
        transposed = _buffer(scratch, "transposed", rows.shape[:-2] + (width, LOW_RES), torch.float32, rows.device)
        return _resample_rows(transposed.copy_(rows.transpose(-1, -2)), width, scratch, "cols").transpose(-1, -2)
    rows = _pick_columns(heatmap.transpose(-1, -2), height // LOW_RES).transpose(-1, -2)
    return _pick_columns(rows, width // LOW_RES)


@functools.lru_cache(maxsize=32)
def _bilinear_taps(size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Half-pixel bilinear resampling ``size`` → 64 without antialiasing (``F.interpolate``'s
    rule): output ``i`` is input ``first[i]``, moved towards input ``second[i]`` by ``weight[i]``."""
    source = ((torch.arange(LOW_RES, dtype=torch.float64) + 0.5) * (size / LOW_RES) - 0.5).clamp_(min=0.0)
    first = source.floor().long().clamp_(max=size - 1)
    second = (first + 1).clamp_(max=size - 1)
    return first, second, (source - first).float()


def _buffer(scratch: dict | None, name: str, shape: Sequence[int], dtype: torch.dtype,
            device: torch.device | str = "cpu") -> Tensor:
    """An uninitialized tensor on ``device``: fresh, or a reused one from ``scratch`` (a CPU
    reader's buffers)."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffer = scratch.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = scratch[name] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def _resample_rows(x: Tensor, height: int, scratch: dict | None, name: str) -> Tensor:
    """Bilinear 64-row resampling of ``(…,H,W)``: two rows picked per output in the input's
    dtype (a uint8 map is converted to float only at 64 rows), then interpolated. (Picking
    whole rows is a copy; picking columns, an element-wise gather, costs ~2× more: columns
    are resampled as rows of the transpose.)"""
    first, second, weight = (t.to(x.device) for t in _bilinear_taps(height))  # no-op on the CPU
    if scratch is None:  # one map: fewest ops (the same values as with buffers)
        return x.index_select(-2, first).float().lerp_(x.index_select(-2, second).float(), weight[:, None])
    shape = x.shape[:-2] + (LOW_RES, x.shape[-1])
    taps = []
    for index, tag in ((first, "first"), (second, "second")):
        out = _buffer(scratch, f"{name}_{tag}", shape, torch.float32)
        if x.dtype == torch.float32:
            taps.append(torch.index_select(x, -2, index, out=out))
        else:
            taps.append(out.copy_(torch.index_select(x, -2, index, out=_buffer(scratch, f"{name}_raw", shape, x.dtype))))
    return taps[0].lerp_(taps[1], weight[:, None])


def _pick_columns(x: Tensor, factor: int) -> Tensor:
    """Half-pixel bilinear downsampling of the last axis by an integer ``factor``, in float.

    Output ``i`` samples input coordinate ``factor·i + (factor-1)/2``: one column when
    ``factor`` is odd, the mean of two neighbours when it is even.
    """
    first = (factor - 1) // 2
    lower = x[..., first::factor].float()
    if factor % 2:
        return lower
    return (lower + x[..., first + 1 :: factor].float()).mul_(0.5)


def unit_map(heatmap: Tensor, low_res: bool) -> Tensor:
    """A checked decoded map in float: 8/16-bit maps scaled to [0, 1] (float maps as stored),
    at its own size or, with ``low_res``, as its 64-px map (taken before the conversion)."""
    scale = INTEGER_SCALE.get(heatmap.dtype, 1.0)
    if low_res:
        return low_res_heatmap(heatmap).div_(scale)
    return heatmap.float().div_(scale) if scale != 1.0 else heatmap


def dct_scaled_map(data: bytes, where: str, image_hw: Sequence[int]) -> Tensor | None:
    """The 64-px map ``(1,64,64)`` in [0, 1] of a JPEG heatmap whose sides are ≥ 128 px, decoded
    in the DCT domain at the smallest libjpeg-turbo scale (M/8) that keeps both sides ≥ 64
    (via ``simplejpeg``; 128/256/512 px: exactly 64 px, else e.g. 224 → 84 px, then the
    reference's bilinear step to 64 px, :func:`low_res_heatmap`).

    Checks the map's size (JPEG header) against ``image_hw``. Returns None for smaller maps
    (little to save) or when simplejpeg refuses the data: the caller then decodes it in full
    (which names a truly undecodable map). Why and how close to the reference:
    :mod:`harmonia.data.clickme`.
    """
    size = jpeg_size(data)
    if size is None:
        return None
    check_map_size(size, image_hw, where)
    small = scaled_map_pixels(data, size)
    return None if small is None else low_res_heatmap(torch.from_numpy(small).permute(2, 0, 1)).div_(255.0)


def scaled_map_pixels(data: bytes, size: Sequence[int]) -> np.ndarray | None:
    """The DCT-scaled decode ``(h,w,1)`` uint8 of :func:`dct_scaled_map`, None where it does not apply."""
    if min(size) < 2 * LOW_RES:
        return None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=LOW_RES, min_width=LOW_RES)
    except ValueError:
        return None


def minmax(human_map: Tensor) -> Tensor:
    """Scale a map to [0, 1] (the pre-release variant); a constant map becomes zeros."""
    low, high = human_map.min(), human_map.max()
    span = high - low
    return (human_map - low) / span if span > 0 else torch.zeros_like(human_map)
