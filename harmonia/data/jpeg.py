"""Encoded image bytes → uint8 tensors: JPEG through ``simplejpeg``, anything else through torchvision.io.

Why not ``torchvision.io.decode_jpeg`` for JPEG: torchvision 0.29 deprecated its decoders and
issues a ``DeprecationWarning`` on *every* call, and its Python wrapper needs the encoded bytes
copied into a tensor first, both paid on every image. ``simplejpeg`` calls the same library,
libjpeg-turbo, with the same settings (accurate integer IDCT, fancy upsampling), so the pixels
are bit-identical (tested), straight from ``bytes``.

A JPEG that simplejpeg refuses (CMYK, or any libjpeg warning, which simplejpeg's strict mode
turns into an error, e.g. a truncated scan) goes to torchvision, which decodes what it can
and names what it cannot; PNG (8 or 16 bits) and other formats always do.
"""

from __future__ import annotations

import simplejpeg
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG"


def decode_bytes(data: bytes, gray: bool) -> Tensor:
    """Decode JPEG/PNG/… bytes to ``(C,H,W)`` (C = 1 if ``gray`` else 3), uint8 (uint16 for 16-bit PNG).

    A JPEG comes back as a channels-last tensor seen as ``(C,H,W)`` (``permute(1, 2, 0)`` gives
    the contiguous ``(H,W,C)`` without a copy). Raises torchvision's ``RuntimeError`` (or
    ``ValueError``) for bytes no decoder accepts.
    """
    if data.startswith(JPEG_SIGNATURE):
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGB")
            return torch.from_numpy(pixels).permute(2, 0, 1)
        except ValueError:
            pass  # refused (CMYK, corrupt): torchvision decodes it or names the problem
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(encoded, mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)
