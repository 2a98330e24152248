"""GroupSort2 and L2-norm pooling as cheap tensor ops, same values as deel-torchlip's.

Why these exist: deel-torchlip 1.0.5's ``GroupSort2`` takes ``min``/``max`` along a size-2
axis and concatenates (its backward a ``scatter``); ``ScaledL2NormPool2d`` is ``nn.LPPool2d``
(``avg_pool2d`` in NCHW), whose gradient is NaN on an all-zero window. Written as strided
elementwise ops with a hand-written backward, the same functions cost a fraction of those
(benchmarks/README.md, ``lipschitz_cost.py``) and have a finite gradient everywhere.

Both backward passes are built from differentiable tensor ops, so the double backward of the
harmonization loss (gradient of the input gradient) goes through them too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _PairSwap(torch.autograd.Function):
    """``out[:, g] = (x[:, g, 1], x[:, g, 0]) where swap[:, g] == 1 else x[:, g]`` on ``(N, G, 2, R)``.

    A permutation given a fixed 0/1 mask: linear and its own transpose, so its backward is
    itself (hence differentiable to any order). ``lerp`` with a 0/1 weight selects exactly
    and, unlike ``torch.where`` on a bool mask, vectorizes on the CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, swap: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(swap)
        out = torch.empty_like(x)
        first, second = x[:, :, 0], x[:, :, 1]
        torch.lerp(first, second, swap, out=out[:, :, 0])
        torch.lerp(second, first, swap, out=out[:, :, 1])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (swap,) = ctx.saved_tensors
        return _PairSwap.apply(grad.contiguous(), swap), None


class _GroupSort2(torch.autograd.Function):
    """Pairwise sort of ``(N, G, 2, R)``; the gradient is the sorting permutation."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        first, second = x[:, :, 0], x[:, :, 1]
        swap = torch.gt(first, second, out=torch.empty_like(first))  # 0/1 in x's dtype
        ctx.save_for_backward(swap)
        out = torch.empty_like(x)
        torch.minimum(first, second, out=out[:, :, 0])
        torch.maximum(first, second, out=out[:, :, 1])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (swap,) = ctx.saved_tensors
        return _PairSwap.apply(grad.contiguous(), swap)


def group_sort2(x: Tensor) -> Tensor:
    """Sort each pair of channels ``(2j, 2j+1)`` of ``x (N, C, *)`` ascending (deel-torchlip's order).

    Equal to ``deel.torchlip.functional.group_sort(x, 2)`` in value. Its derivative is the
    pair permutation that sorts ``x``; on a tie (``x[2j] == x[2j+1]``, common on zero image
    background at initialization) the pair is left in place, so the Jacobian is still a
    permutation and input gradients keep their norm. deel-torchlip's ``torch.min``/``max``
    route both output gradients to the first channel of a tied pair instead (a Jacobian of
    norm √2 there); away from ties the two gradients are identical.
    """
    if x.dim() < 2 or x.shape[1] % 2:
        raise ValueError(f"GroupSort2 needs (N, C, *) with an even C; got shape {tuple(x.shape)}")
    pairs = x.reshape(x.shape[0], x.shape[1] // 2, 2, math.prod(x.shape[2:]))  # -1 fails on empty batches
    if torch.is_grad_enabled() and x.requires_grad:
        return _GroupSort2.apply(pairs).view(x.shape)
    # Inference: no permutation mask to keep (a third of the cost).
    out = torch.empty_like(pairs)
    torch.minimum(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 0])
    torch.maximum(pairs[:, :, 0], pairs[:, :, 1], out=out[:, :, 1])
    return out.view(x.shape)


class GroupSort2(nn.Module):
    """GroupSort with groups of 2 channels: 1-Lipschitz and gradient-norm preserving.

    Same output as ``deel.torchlip.GroupSort2`` at a fraction of the cost (see the module
    docstring); tie-breaking of the gradient documented in :func:`group_sort2`.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Pairwise ascending sort along the channel axis."""
        return group_sort2(x)


def _window_sum(x: Tensor, k: int) -> Tensor:
    """Sum of ``x`` over non-overlapping ``k×k`` windows of an ``(N, C, k·h, k·w)`` tensor.

    Strided adds rather than ``avg_pool2d``, whose NCHW CPU kernel is slower for ``k = 2``.
    """
    rows = x[..., 0::k]
    for i in range(1, k):
        rows = rows + x[..., i::k]
    n, c, height, width = rows.shape
    rows = rows.view(n, c, height // k, k, width)
    out = rows[:, :, :, 0]
    for i in range(1, k):
        out = out + rows[:, :, :, i]
    return out


class _L2NormPool(torch.autograd.Function):
    """``y = sqrt(Σ_window x²)``; gradient ``x · g / y`` per window, 0 where ``y = 0``."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:  # type: ignore[override]
        y = _window_sum(x * x, k).sqrt_()
        ctx.save_for_backward(x, y)
        ctx.k = k
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        k = ctx.k
        with torch.no_grad():  # constant 0/1 masks (arithmetic: bool `where` is slow on CPU)
            positive = torch.gt(y, 0, out=torch.empty_like(y))
            empty = 1 - positive
        # An empty window divides by 1 and is then zeroed: no inf enters any derivative.
        ratio = grad / (y + empty) * positive
        n, c, h, w = ratio.shape
        # Upsample along the width (a copy of 1/k of the input's size), then broadcast over
        # the k rows of each window with the contiguous width innermost (vectorizes).
        wide = ratio.unsqueeze(-1).expand(n, c, h, w, k).reshape(n, c, h, 1, w * k)
        return (x.view(n, c, h, k, w * k) * wide).view(x.shape), None


class L2NormPool2d(nn.Module):
    """L2-norm pooling over non-overlapping ``k×k`` windows: 1-Lipschitz and norm preserving.

    Same values as ``deel.torchlip.ScaledL2NormPool2d(k)`` (``nn.LPPool2d(2, k)``; rows and
    columns that do not fill a window are dropped, as there). Why it exists: deel-torchlip's
    layer takes ``sqrt`` of a window's energy through autograd, so on an all-zero window
    (image background, zero-initialized biases) its gradient is ``inf · 0 = NaN``, which the
    harmonization loss's double backward spreads into every parameter; here the gradient at
    an all-zero window is 0 (a valid subgradient of the norm). It is also 4× cheaper (see the
    module docstring).
    """

    def __init__(self, kernel_size: int = 2) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1; got {kernel_size}")
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        """``sqrt(Σ_window x²)`` per channel and window."""
        k = self.kernel_size
        if x.dim() != 4:
            raise ValueError(f"L2NormPool2d expects (N, C, H, W); got shape {tuple(x.shape)}")
        # Drop the incomplete border, as LPPool2d does (autograd gives it a zero gradient).
        x = x[..., : x.shape[-2] // k * k, : x.shape[-1] // k * k]
        return _L2NormPool.apply(x.contiguous(), k)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"
