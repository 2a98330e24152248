"""GroupSort2 and L2-norm pooling as cheap tensor ops, same values as deel-torchlip's.

Why these exist (measured on the default digits model, 1 CPU thread, batch 64; see
benchmarks/README.md "lipschitz_cost.py"): deel-torchlip 1.0.5's ``GroupSort2`` takes
``min``/``max`` along a size-2 axis and concatenates (25 ms forward, 40 ms forward+backward
on a 64×32×32×32 tensor, its backward a ``scatter``); ``ScaledL2NormPool2d`` is
``nn.LPPool2d`` (``avg_pool2d`` in NCHW, 12 ms forward) whose gradient is NaN on an all-zero
window. Written as strided elementwise ops with a hand-written backward, the same functions
cost 3 ms (GroupSort2) and 2 ms (pooling) forward, less than the twin's ReLU + MaxPool2d.

Both backward passes are built from differentiable tensor ops, so the double backward of the
harmonization loss (gradient of the input gradient) goes through them too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


class _PairSwap(torch.autograd.Function):
    """``out[:, g] = (x[:, g, 1], x[:, g, 0]) where swap[:, g] == 1 else x[:, g]`` on ``(N, G, 2, R)``.

    A permutation given a fixed 0/1 mask: linear and its own transpose, so its backward is
    itself (hence differentiable to any order). ``lerp`` with a 0/1 weight selects exactly
    and, unlike ``torch.where`` on a bool mask, vectorizes (0.3 ms vs 4.4 ms per 1M values here).
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


def _window_dot(a: Tensor, b: Tensor, k: int) -> Tensor:
    """``Σ_window a·b`` over non-overlapping ``k×k`` windows of two ``(N, C, k·h, k·w)`` tensors.

    Strided multiply-adds, so no full-size temporary is allocated: on a CPU each fresh
    full-size tensor costs page faults comparable to the arithmetic (``avg_pool2d`` on NCHW
    is also 3-5× slower for ``k = 2`` here).
    """
    rows = a[..., 0::k] * b[..., 0::k]
    for i in range(1, k):
        rows.addcmul_(a[..., i::k], b[..., i::k])
    n, c, height, width = rows.shape
    rows = rows.view(n, c, height // k, k, width)
    out = rows[:, :, :, 0] + rows[:, :, :, 1] if k > 1 else rows[:, :, :, 0].clone()
    for i in range(2, k):
        out += rows[:, :, :, i]
    return out


def _times_upsampled(x: Tensor, r: Tensor, k: int) -> Tensor:
    """``x · U(r)``, ``U`` repeating each value of ``r (N, C, h, w)`` over its ``k×k`` window of ``x``."""
    n, c, h, w = r.shape
    # Upsample along the width (a copy of 1/k of x's size), then broadcast over the k rows of
    # each window with the contiguous width innermost (vectorizes).
    wide = r.unsqueeze(-1).expand(n, c, h, w, k).reshape(n, c, h, 1, w * k)
    return (x.view(n, c, h, k, w * k) * wide).view(x.shape)


class _L2NormPool(torch.autograd.Function):
    """``y = sqrt(Σ_window x²)``; its gradient is :class:`_L2NormPoolGrad` (differentiable once more)."""

    @staticmethod
    def forward(ctx, x: Tensor, k: int) -> Tensor:  # type: ignore[override]
        y = _window_dot(x, x, k).sqrt_()
        ctx.save_for_backward(x, y)
        ctx.k = k
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        return _L2NormPoolGrad.apply(x, y, grad, ctx.k), None


class _L2NormPoolGrad(torch.autograd.Function):
    """``∂y/∂x`` applied to ``g``: ``x · U(g/y)`` (0 on windows where ``y = 0``), with its own backward.

    Why a Function of its own: the harmonization loss differentiates the input gradient, so
    this runs in every harmonized step's double backward. Through autograd, its broadcasts
    and their reductions allocated four full-size tensors per pooling; here the backward
    allocates one (the gradient w.r.t. ``x``) and reduces ``gg·x`` by strided multiply-adds.
    Third derivatives are not needed (the loss is first order in the input gradient):
    ``once_differentiable``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, grad: Tensor, k: int) -> Tensor:  # type: ignore[override]
        # Constant 0/1 masks by arithmetic (bool `where` is slow on CPU); an empty window
        # divides by 1 and is then zeroed, so no inf enters any derivative.
        inverse = torch.gt(y, 0, out=torch.empty_like(y))  # 1 where y > 0
        inverse.div_(torch.sub(y, inverse).add_(1))  # 1/y where y > 0, else 0
        ratio = grad * inverse
        ctx.save_for_backward(x, ratio, inverse)
        ctx.k = k
        return _times_upsampled(x, ratio, k)

    @staticmethod
    @once_differentiable
    def backward(ctx, gg: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, ratio, inverse = ctx.saved_tensors
        k = ctx.k
        gg = gg.contiguous()
        grad_x = _times_upsampled(gg, ratio, k) if ctx.needs_input_grad[0] else None
        grad_y = grad_g = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_g = _window_dot(gg, x, k).mul_(inverse)  # ∂/∂g = Σ gg·x / y
            grad_y = -grad_g * ratio  # ∂/∂y = −Σ gg·x · g / y²
        return grad_x, grad_y, grad_g, None


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
