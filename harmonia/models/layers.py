"""Small layers Harmonia needs where deel-torchlip's version does not fit the double backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class L2NormPool2d(nn.Module):
    """L2-norm pooling over non-overlapping windows: 1-Lipschitz, same output as deel-torchlip's.

    Why it exists: ``deel.torchlip.ScaledL2NormPool2d`` (``nn.LPPool2d``) takes ``sqrt`` of a
    window's energy; on an all-zero window (image background, zero-initialized biases) its
    gradient is ``inf * 0 = NaN``, which the harmonization loss's double backward propagates
    into every parameter. Here the gradient at an all-zero window is 0 (a valid subgradient of
    the norm), and the forward value is identical.
    """

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        """``sqrt(Σ_window x²)`` per channel and window."""
        k = self.kernel_size
        energy = F.avg_pool2d(x * x, k, stride=k) * (k * k)
        positive = energy > 0
        # Double `where`: the masked-out branch sees 1, so no inf enters any derivative.
        return torch.where(positive, torch.where(positive, energy, 1.0).sqrt(), 0.0)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
