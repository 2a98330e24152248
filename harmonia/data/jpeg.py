"""Encoded image bytes → uint8 tensors: JPEG through ``simplejpeg``, anything else through torchvision.io.

Why not ``torchvision.io.decode_jpeg`` for JPEG: torchvision 0.29 deprecated its decoders and
issues a ``DeprecationWarning`` on *every* call (its Python wrapper also needs the encoded
bytes copied into a tensor first); together ~25% of a 224-px decode. ``simplejpeg`` calls the
same library, libjpeg-turbo, with the same settings (accurate integer IDCT, fancy
upsampling), so the pixels are bit-identical (tested), straight from ``bytes`` and, when
asked, into a caller's buffer (a slot of a batch tensor: no copy when batching).
Measured in benchmarks/README.md (`data_throughput.py`).

A JPEG that simplejpeg refuses (CMYK, or any libjpeg warning, which simplejpeg's strict mode
turns into an error, e.g. a truncated scan) goes to torchvision, which decodes what it can
and names what it cannot; PNG (8 or 16 bits) and other formats always do.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG"


def decode_bytes(data: bytes, gray: bool, out: np.ndarray | None = None) -> Tensor:
    """Decode JPEG/PNG/… bytes to ``(C,H,W)`` (C = 1 if ``gray`` else 3), uint8 (uint16 for 16-bit PNG).

    The result is a channels-last tensor seen as ``(C,H,W)`` (``permute(1, 2, 0)`` gives the
    contiguous ``(H,W,C)``). ``out``: an ``(H,W,C)`` uint8 array to decode a JPEG into, used
    when its shape matches the image. Raises torchvision's ``RuntimeError`` (or ``ValueError``)
    for bytes no decoder accepts.
    """
    if data.startswith(JPEG_SIGNATURE):
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", buffer=out)
            return torch.from_numpy(pixels).permute(2, 0, 1)
        except ValueError:
            pass  # refused (CMYK, corrupt, too small a buffer): torchvision decodes it or names the problem
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(encoded, mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's header, or None when it cannot be read (not a JPEG)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width
