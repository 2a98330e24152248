"""The fixed Fourier magnitude MACO draws its images with, computed from the user's own images.

MACO (Fel et al., NeurIPS 2023) optimizes only the phase of an image; the magnitude of its
spectrum stays that of natural images. The reference implementations download an ImageNet
spectrum at run time; here it comes from local data instead: the mean ``|rfft2|`` of a set of
images taken in the space MACO optimizes in, i.e. each image mapped back through the
pointwise steps of the parametrization (value range → inverse sigmoid → inverse colour
matrix), as horama's ``inverse_image_spectrum`` does. The result is small (``C × H × (W/2+1)``
floats) and saved next to a run with :meth:`Spectrum.save`.

Colour: for RGB the fixed "square root of the ImageNet colour correlation" matrix of Lucid
(also used by xplique and horama) maps decorrelated channels to RGB, as a right
multiplication of each pixel's row vector; grey images (and any channel count other than 3)
use the identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# Lucid's ImageNet colour correlation (square root, from an SVD), as in xplique/horama.
IMAGENET_COLOR_CORRELATION = torch.tensor(
    [
        [0.56282854, 0.58447580, 0.58447580],
        [0.19482528, 0.00000000, -0.19482528],
        [0.04329450, -0.10823626, 0.06494176],
    ]
)
FORMAT_VERSION = 1


def default_color_matrix(channels: int) -> Tensor:
    """The ImageNet matrix for 3 channels, the identity for any other count."""
    if channels < 1:
        raise ValueError(f"an image needs at least one channel; got {channels}")
    return IMAGENET_COLOR_CORRELATION.clone() if channels == 3 else torch.eye(channels)


def recorrelate(x: Tensor, matrix: Tensor) -> Tensor:
    """Map decorrelated channels to image channels: each pixel's row vector times ``matrix`` (``(N,C,H,W)``)."""
    return torch.einsum("nchw,cd->ndhw", x, matrix.to(x))


def decorrelate(x: Tensor, matrix: Tensor) -> Tensor:
    """Inverse of :func:`recorrelate`."""
    return torch.einsum("nchw,cd->ndhw", x, torch.linalg.inv(matrix.double()).to(x))


def self_conjugate_columns(width: int) -> list[int]:
    """Columns of an ``rfft2`` layout whose entries pair with entries of the same column (0, and W/2 for even W)."""
    return [0, width // 2] if width % 2 == 0 and width > 1 else [0]


def hermitian_mean(values: Tensor, width: int, sign: float) -> Tensor:
    """Make ``values`` (``(..., H, W//2+1)``) consistent with the spectrum of a real image.

    On the self-conjugate columns, entry ``k`` and entry ``-k mod H`` describe the same
    frequency: a magnitude must be equal there (``sign=+1``: their mean) and a phase opposite
    (``sign=-1``: half their difference, so self-paired entries get phase 0). Elsewhere the
    values are free. ``irfft2`` of a spectrum made so returns a real image whose ``rfft2`` is
    that spectrum exactly (up to rounding); without it, ``irfft2`` silently keeps only the
    Hermitian part and the magnitude would change.
    """
    height = values.shape[-2]
    cols = torch.tensor(self_conjugate_columns(width), device=values.device)
    neg = (-torch.arange(height, device=values.device)) % height
    part = values.index_select(-1, cols)
    fixed = (part + sign * part.index_select(-2, neg)) / 2
    return values.index_copy(-1, cols, fixed)


@dataclass
class Spectrum:
    """A fixed magnitude spectrum for MACO and the space it was measured in.

    Attributes:
        magnitude: ``(C, H, W//2+1)`` mean ``|rfft2|`` in the decorrelated, pre-sigmoid space.
        size: ``(H, W)`` of the canvas MACO draws (the spectrum's image size).
        color_matrix: ``(C, C)`` decorrelated → image channels (see :func:`recorrelate`).
        value_range: the model's input range ``(low, high)``; images are ``low + (high-low)·sigmoid``.
    """

    magnitude: Tensor
    size: tuple[int, int]
    color_matrix: Tensor
    value_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        height, width = self.size
        if self.magnitude.ndim != 3 or tuple(self.magnitude.shape[1:]) != (height, width // 2 + 1):
            raise ValueError(
                f"magnitude must have shape (C, {height}, {width // 2 + 1}) for a {height}×{width} canvas; "
                f"got {tuple(self.magnitude.shape)}"
            )
        channels = self.magnitude.shape[0]
        if tuple(self.color_matrix.shape) != (channels, channels):
            raise ValueError(f"color_matrix must be {channels}×{channels}; got {tuple(self.color_matrix.shape)}")
        if not torch.isfinite(self.magnitude).all() or (self.magnitude < 0).any():
            raise ValueError("magnitude must be finite and non-negative")
        low, high = float(self.value_range[0]), float(self.value_range[1])
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low; got {self.value_range}")
        self.value_range = (low, high)
        self.magnitude = hermitian_mean(self.magnitude.detach().float(), width, +1.0)
        self.color_matrix = self.color_matrix.detach().float()

    @property
    def channels(self) -> int:
        """Image channels ``C``."""
        return self.magnitude.shape[0]

    @classmethod
    def flat(cls, channels: int, size: int | tuple[int, int], value_range: tuple[float, float] = (0.0, 1.0)) -> Spectrum:
        """Every frequency with the same magnitude (white noise): for tests and toy models."""
        height, width = (size, size) if isinstance(size, int) else size
        return cls(torch.ones(channels, height, width // 2 + 1), (height, width), default_color_matrix(channels), value_range)

    @classmethod
    def from_images(
        cls,
        images: Tensor | Iterable,
        size: int | tuple[int, int] | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        color_matrix: Tensor | None = None,
        max_images: int | None = None,
        eps: float = 1e-3,
    ) -> Spectrum:
        """The mean magnitude of ``images`` in MACO's optimization space.

        Args:
            images: a tensor ``(N, C, H, W)`` or an iterable of batches (a ``DataLoader``): each
                batch a tensor, a tuple/list whose first item is the images, a mapping with
                ``"image"`` or an object with an ``image`` attribute (Harmonia's ``Sample``).
            size: canvas ``(H, W)`` (int: square); images of another size are resized
                (bilinear, antialiased). Default: the images' own size.
            value_range: the range the images (and the model's inputs) live in.
            color_matrix: ``(C, C)``; default :func:`default_color_matrix`.
            max_images: stop after this many images.
            eps: pixels are clamped to ``[eps, 1-eps]`` of the range before the inverse sigmoid.
        """
        total: Tensor | None = None
        count = 0
        target = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        for batch in _batches(images):
            if max_images is not None:
                batch = batch[: max_images - count]
            if len(batch) == 0:
                break
            if batch.ndim != 4:
                raise ValueError(f"images must be (N, C, H, W); got a batch of shape {tuple(batch.shape)}")
            batch = batch.detach().float()
            if target is None:
                target = tuple(batch.shape[-2:])
            if tuple(batch.shape[-2:]) != target:
                batch = F.interpolate(batch, size=target, mode="bilinear", align_corners=False, antialias=True)
            if color_matrix is None:
                color_matrix = default_color_matrix(batch.shape[1])
            if total is not None and batch.shape[1] != total.shape[0]:
                raise ValueError(f"images have {batch.shape[1]} channels after batches of {total.shape[0]}")
            low, high = value_range
            unit = ((batch - low) / (high - low)).clamp(eps, 1 - eps)
            pre = decorrelate(torch.logit(unit), color_matrix.to(batch.device))
            magnitude = torch.fft.rfft2(pre).abs().sum(0)
            total = magnitude if total is None else total + magnitude.to(total.device)
            count += len(batch)
            if max_images is not None and count >= max_images:
                break
        if total is None or count == 0:
            raise ValueError("no images to compute a spectrum from (empty tensor or loader)")
        return cls((total / count).cpu(), target, color_matrix.cpu(), value_range)

    def to(self, device: torch.device | str) -> Spectrum:
        """A copy with its tensors on ``device`` (cloned: also normal tensors when ``self`` was built under inference mode)."""
        return Spectrum(self.magnitude.to(device).clone(), self.size, self.color_matrix.to(device).clone(), self.value_range)

    def resized(self, size: int | tuple[int, int]) -> Spectrum:
        """The magnitude interpolated to another canvas (frequencies kept centred while interpolating)."""
        height, width = (size, size) if isinstance(size, int) else size
        shifted = torch.fft.fftshift(self.magnitude, dim=-2)[None]
        resized = F.interpolate(shifted, size=(height, width // 2 + 1), mode="bilinear", align_corners=True)[0]
        return Spectrum(torch.fft.ifftshift(resized, dim=-2), (height, width), self.color_matrix, self.value_range)

    def save(self, path: str | Path) -> Path:
        """Write the spectrum with ``torch.save`` (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {
                "format": FORMAT_VERSION,
                "magnitude": self.magnitude.cpu(),
                "size": list(self.size),
                "color_matrix": self.color_matrix.cpu(),
                "value_range": list(self.value_range),
            },
            tmp,
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Spectrum:
        """Read a spectrum written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no spectrum file at {path}")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a MACO spectrum file (format {FORMAT_VERSION}; see Spectrum.save)")
        return cls(data["magnitude"], tuple(data["size"]), data["color_matrix"], tuple(data["value_range"]))


def image_spectrum(images: Tensor | Iterable, **kwargs) -> Spectrum:
    """Shortcut for :meth:`Spectrum.from_images`."""
    return Spectrum.from_images(images, **kwargs)


def _batches(images: Tensor | Iterable) -> Iterable[Tensor]:
    """Image tensors from a tensor or from the batches of a loader (see :meth:`Spectrum.from_images`)."""
    if isinstance(images, Tensor):
        yield images
        return
    for index, batch in enumerate(images):
        if isinstance(batch, Tensor):
            yield batch
        elif hasattr(batch, "image"):
            yield batch.image
        elif isinstance(batch, dict) and "image" in batch:
            yield batch["image"]
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            yield batch[0]
        else:
            raise ValueError(
                f"batch {index} is a {type(batch).__name__}; expected a tensor, (images, ...) tuple, "
                "a mapping with 'image' or an object with an 'image' attribute"
            )
