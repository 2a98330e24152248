"""A network as a small graph of boundable operations, read from a PyTorch model.

Bound propagation needs, for each layer, three things a module does not offer: its value on a
box (interval arithmetic), its transpose (to push linear coefficients backwards), and, for a
nonlinear layer, linear functions that bound it from above and below on a box. This module turns
a model into a list of :class:`Node` s in topological order whose operations provide them.

What is understood (anything else is refused with its module path and type):

- affine: ``nn.Linear``, ``nn.Conv2d`` (any stride, dilation, groups and padding mode; padding
  modes other than zeros are copies of pixels, hence exact as an explicit padding step),
  ``nn.BatchNorm2d``/``1d`` in eval mode (folded into the convolution/linear layer before it
  when possible), ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d`` (and deel-torchlip's scaled
  variants), ``nn.Flatten``, ``nn.PixelUnshuffle`` (deel-torchlip's ``InvertibleDownSampling``),
  ``nn.Identity``, ``nn.Dropout`` in eval mode, the input normalization of Harmonia's ``Backbone``;
- nonlinear: ``nn.ReLU``, GroupSort with groups of 2 (Harmonia's and deel-torchlip's, written as a
  ReLU of the pair's difference: ``(a, b) ↦ (a − relu(a − b), b + relu(a − b))``), deel-torchlip's
  ``MaxMin`` (``(relu(x), relu(−x))``), ``nn.MaxPool2d``, L2-norm pooling (Harmonia's
  ``L2NormPool2d``, ``nn.LPPool2d`` with norm 2 and deel-torchlip's ``ScaledL2NormPool2d``);
- structure: ``nn.Sequential`` (deel-torchlip's included), torchvision ``ResNet`` with its
  ``BasicBlock``/``Bottleneck`` residual additions, Harmonia's ``Backbone`` wrapper.

Weights are read once, as the model computes them in its current mode (a parametrized layer,
e.g. a Björck-orthonormalized one, gives its effective weight through ``module.weight``), and
detached: bounding never builds a graph through the model's parameters.

Each node also carries an L2 Lipschitz constant from the input to its output, computed from
the weights (exact SVD of dense layers; for a convolution, the norm of its reshaped kernel times
the square root of how many output positions each input pixel reaches, an upper bound). It caps
interval bounds of 1-Lipschitz networks: ``|z(x + δ) − z(x)| ≤ L‖δ‖₂``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from harmonia.explain.base import gradients_on


class UnsupportedLayerError(TypeError):
    """A layer the verifier has no sound bound for; the message names it and its type."""


def _refuse(name: str, module: nn.Module, why: str = "") -> UnsupportedLayerError:
    reason = f": {why}" if why else ""
    return UnsupportedLayerError(
        f"cannot bound layer {name or '<model>'} ({type(module).__module__}.{type(module).__name__}){reason}. "
        "Supported: Linear, Conv2d, BatchNorm (eval), ReLU, GroupSort2, MaxMin, MaxPool2d, L2-norm pooling, "
        "AvgPool2d, AdaptiveAvgPool2d, Flatten, PixelUnshuffle, Identity, Dropout (eval), Sequential, "
        "torchvision ResNet blocks"
    )


# --------------------------------------------------------------------------------------------
# Operations. ``lam`` tensors are coefficients of shape (B·M, *output_shape): B bounded sets
# times M linear functions being bounded; transposes return (B·M, *input_shape).


class Op:
    """Base of all operations: ``forward`` on a point, ``interval`` on a box."""

    nonlinear = False
    lipschitz = math.inf  # L2 → L2 constant of the operation (inf: unknown)

    def __init__(self, name: str) -> None:
        self.name = name

    def forward(self, *inputs: Tensor) -> Tensor:
        """The operation's value at a point (for the Lipschitz caps and the tests)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class Affine(Op):
    """``y = A x + b`` with ``A`` given as functions: ``apply`` (A x), ``apply_abs`` (|A| x), ``transpose`` (λ A)."""

    def apply(self, x: Tensor) -> Tensor:
        """``A x`` (no bias)."""
        raise NotImplementedError

    def apply_abs(self, r: Tensor) -> Tensor:
        """``|A| r`` for a non-negative radius ``r``."""
        raise NotImplementedError

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        """``λ A``: coefficients ``(R, *output_shape)`` on the output to ``(R, *input_shape)`` on the input."""
        raise NotImplementedError

    def bias_term(self, lam: Tensor) -> Tensor | None:
        """``λ · b`` per row, shape ``(B·M,)``; ``None`` without bias."""
        terms = self.bias_map(lam)
        return None if terms is None else terms.flatten(1).sum(1)

    def bias_map(self, lam: Tensor) -> Tensor | None:
        """``λ ∘ b`` per output coordinate, shape of ``lam``; ``None`` without bias."""
        bias = self.bias_broadcast(lam)
        return None if bias is None else lam * bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.apply(x)
        bias = self.bias_broadcast(y)
        return y if bias is None else y + bias

    def bias_broadcast(self, y: Tensor) -> Tensor | None:
        """The bias shaped to broadcast against an output ``y``; ``None`` without bias."""
        return None

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Exact per-coordinate interval of an affine map on a box (midpoint-radius form)."""
        center, radius = (upper + lower) / 2, (upper - lower) / 2
        mid, rad = self.forward(center), self.apply_abs(radius)
        return mid - rad, mid + rad


class LinearOp(Affine):
    """``x Wᵀ + b`` on ``(B, in)``."""

    def __init__(self, name: str, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__(name)
        self.weight, self.bias = weight, bias

    @functools.cached_property
    def lipschitz(self) -> float:  # type: ignore[override]
        """Largest singular value of the weight (exact SVD; computed on first use)."""
        return float(torch.linalg.matrix_norm(self.weight.double(), ord=2))

    def apply(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def apply_abs(self, r: Tensor) -> Tensor:
        return F.linear(r, self.weight.abs())

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        return lam @ self.weight

    def bias_term(self, lam: Tensor) -> Tensor | None:
        return None if self.bias is None else lam @ self.bias

    def bias_broadcast(self, y: Tensor) -> Tensor | None:
        return self.bias

    def pair_differences(self) -> LinearOp:
        """The affine map to ``z[2j] − z[2j+1]`` (GroupSort2's pair differences after this layer)."""
        w = self.weight[0::2] - self.weight[1::2]
        b = None if self.bias is None else self.bias[0::2] - self.bias[1::2]
        return LinearOp(self.name, w, b)


class ConvOp(Affine):
    """``conv2d`` with zero padding (other padding modes come as a :class:`PadOp` before it)."""

    def __init__(self, name: str, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> None:
        super().__init__(name)
        self.weight, self.bias = weight, bias
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups

    @functools.cached_property
    def lipschitz(self) -> float:  # type: ignore[override]
        """An upper bound of the convolution's L2 operator norm (computed on first use)."""
        weight, groups = self.weight, self.groups
        (kh, kw), (sh, sw), (dh, dw) = weight.shape[-2:], self.stride, self.dilation
        # Each input pixel meets each kernel tap at most once per output position it reaches;
        # it reaches at most ⌈span_h/sh⌉·⌈span_w/sw⌉ of them (dilation spreads the taps).
        reach = math.ceil(((kh - 1) * dh + 1) / sh) * math.ceil(((kw - 1) * dw + 1) / sw)
        blocks = weight.chunk(groups) if groups > 1 else (weight,)
        kernel = max(float(torch.linalg.matrix_norm(w.flatten(1).double(), ord=2)) for w in blocks)
        return kernel * math.sqrt(min(reach, kh * kw))

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def apply(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight)

    def apply_abs(self, r: Tensor) -> Tensor:
        return self._conv(r, self.weight.abs())

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        return torch.nn.grad.conv2d_input(
            (lam.shape[0], *input_shape), self.weight, lam, self.stride, self.padding, self.dilation, self.groups
        )

    def bias_term(self, lam: Tensor) -> Tensor | None:
        return None if self.bias is None else lam.sum(dim=(-2, -1)) @ self.bias

    def bias_broadcast(self, y: Tensor) -> Tensor | None:
        return None if self.bias is None else self.bias.view(-1, 1, 1)

    def pair_differences(self) -> ConvOp:
        """The convolution giving ``z[2j] − z[2j+1]`` per channel pair."""
        if self.groups != 1:
            raise ValueError("pair differences of a grouped convolution")
        w = self.weight[0::2] - self.weight[1::2]
        b = None if self.bias is None else self.bias[0::2] - self.bias[1::2]
        return ConvOp(self.name, w, b, self.stride, self.padding, self.dilation, 1)


class ChannelAffineOp(Affine):
    """``x · scale[c] + shift[c]`` along the channel axis (BatchNorm in eval mode, input normalization)."""

    def __init__(self, name: str, scale: Tensor, shift: Tensor) -> None:
        super().__init__(name)
        self.scale, self.shift = scale, shift
        self.lipschitz = float(scale.abs().max()) if scale.numel() else 0.0

    def _view(self, t: Tensor, like: Tensor) -> Tensor:
        return t.view(-1, *([1] * (like.dim() - 2)))

    def apply(self, x: Tensor) -> Tensor:
        return x * self._view(self.scale, x)

    def apply_abs(self, r: Tensor) -> Tensor:
        return r * self._view(self.scale.abs(), r)

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        return lam * self._view(self.scale, lam)

    def bias_term(self, lam: Tensor) -> Tensor | None:
        return (lam * self._view(self.shift, lam)).flatten(1).sum(1)

    def bias_broadcast(self, y: Tensor) -> Tensor | None:
        return self._view(self.shift, y)


class FunctionOp(Affine):
    """A linear map without bias given by a function (pooling, reshapes, padding); transpose by autograd.

    ``nonnegative``: every coefficient of the map is ≥ 0 (averaging, copies), so ``|A| r = A r``.
    """

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor], nonnegative: bool, lipschitz: float = math.inf) -> None:
        super().__init__(name)
        if not nonnegative:
            raise ValueError("FunctionOp needs a map with non-negative coefficients")
        self.fn = fn
        self.lipschitz = lipschitz

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def apply_abs(self, r: Tensor) -> Tensor:
        return self.fn(r)

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        with gradients_on():
            probe = torch.zeros((lam.shape[0], *input_shape), dtype=lam.dtype, device=lam.device, requires_grad=True)
            # α-CROWN differentiates through the coefficients: keep the transpose differentiable then.
            (grad,) = torch.autograd.grad(self.fn(probe), probe, lam, create_graph=lam.requires_grad)
        return grad


class ReshapeOp(Affine):
    """A reshape (``Flatten``): its transpose is the inverse reshape."""

    lipschitz = 1.0

    def __init__(self, name: str, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__(name)
        self.fn = fn

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def apply_abs(self, r: Tensor) -> Tensor:
        return self.fn(r)

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        return lam.reshape(lam.shape[0], *input_shape)


class NegateConcatOp(Affine):
    """``x ↦ (x, −x)`` along ``dim`` (the linear half of deel-torchlip's ``MaxMin``)."""

    lipschitz = math.sqrt(2.0)

    def __init__(self, name: str, dim: int) -> None:
        super().__init__(name)
        self.dim = dim

    def apply(self, x: Tensor) -> Tensor:
        return torch.cat((x, -x), dim=self.dim)

    def apply_abs(self, r: Tensor) -> Tensor:
        return torch.cat((r, r), dim=self.dim)

    def transpose(self, lam: Tensor, input_shape: tuple[int, ...]) -> Tensor:
        a, b = lam.chunk(2, dim=self.dim)
        return a - b


class AddOp(Op):
    """The sum of two nodes (a residual connection)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


# --------------------------------------------------------------------------------------------
# Nonlinear operations: ``relax`` gives, for the coefficients ``lam`` on the output, the
# coefficients on the input and the constant of a linear *upper* bound of ``lam · op(x)`` valid
# on the box where the op's relevant quantity lies in ``pre = (lower, upper)``.


def relu_upper_line(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Slope and intercept of the chord upper bound of ``relu`` on ``[lower, upper]`` (exact where stable)."""
    active, inactive = lower >= 0, upper <= 0
    width = (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny)
    slope = torch.where(active, torch.ones_like(lower), torch.where(inactive, torch.zeros_like(lower), upper / width))
    slope = slope.clamp(0, 1)
    intercept = torch.where(active | inactive, torch.zeros_like(lower), -lower * slope)
    return slope, intercept


def relu_lower_slope(lower: Tensor, upper: Tensor) -> Tensor:
    """Slope ``s`` of a lower bound ``relu(x) ≥ s x``: for an unstable neuron 1 or 0, whichever leaves less area (CROWN's choice)."""
    active = lower >= 0
    unstable_up = (lower < 0) & (upper > 0) & (upper >= -lower)
    return (active | unstable_up).to(lower.dtype)


def relu_relax(lam: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Upper bound of ``lam · relu(x)`` for ``x ∈ [lower, upper]`` as ``coef · x + Σ const``.

    ``lam``: ``(B, M, *shape)``; ``lower``/``upper``: ``(B, *shape)``. Returns ``coef`` and the
    constant's terms per coordinate, both like ``lam``. ``alpha`` (like ``lam``, in [0, 1]): the
    lower-bound slopes of the unstable neurons (α-CROWN); default CROWN's 0-or-1 choice.
    """
    lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
    up_slope, up_icpt = relu_upper_line(lower, upper)
    low_slope = relu_lower_slope(lower, upper)
    if alpha is not None:
        unstable = (lower < 0) & (upper > 0)
        low_slope = torch.where(unstable, alpha, low_slope)
    coef = lam * torch.where(lam >= 0, up_slope, low_slope)
    return coef, lam.clamp_min(0) * up_icpt


def _identity_rows(shape: tuple[int, ...], start: int, stop: int, like: Tensor) -> Tensor:
    """Rows ``start:stop`` of the identity on a tensor of ``shape``: ``(stop − start, *shape)``."""
    rows = torch.zeros((stop - start, math.prod(shape)), dtype=like.dtype, device=like.device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return rows.view(stop - start, *shape)


class Nonlinear(Op):
    """A nonlinear operation of one input, relaxed on the bounds of a *quantity* of its input.

    The quantity is the input itself except for GroupSort2 (the pair differences).
    """

    nonlinear = True

    def quantity_size(self, shape: tuple[int, ...]) -> int:
        """How many scalar quantities the relaxation needs, for an input of ``shape``."""
        return math.prod(shape)

    def quantity_rows(self, shape: tuple[int, ...], start: int, stop: int, like: Tensor) -> Tensor:
        """Quantities ``start:stop`` as linear functions of the input, ``(stop − start, *shape)``."""
        return _identity_rows(shape, start, stop, like)

    def quantity_interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """Interval of the quantity from the input's interval (interval arithmetic)."""
        return lower, upper

    def quantity_value(self, x: Tensor) -> Tensor:
        """The quantity at a point ``x``."""
        return x

    def interval_from_pre(self, lower: Tensor, upper: Tensor, pre: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Output interval from the input's interval and the quantity's bounds ``pre``."""
        raise NotImplementedError

    def relax(self, lam: Tensor, pre: tuple[Tensor, Tensor], alpha: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Upper bound of ``lam · op(x)`` on the box: ``coef (B, M, *in_shape)`` on ``x`` and the constant
        as a map ``(B, M, c, h, w)`` (or ``(B, M, n)``) over the op's output positions, summed by the caller.

        ``alpha``: free parameters of the relaxation (from :meth:`init_alpha`, optimized by
        α-CROWN); every value of them gives a sound bound once :meth:`project_alpha` has run.
        """
        raise NotImplementedError

    def init_alpha(self, pre: tuple[Tensor, Tensor], rows: int) -> list[Tensor] | None:
        """Parameters of the relaxation for ``rows`` bounded functions per box, ``(B, rows, ...)`` each,
        starting at CROWN's fixed choice; ``None``: nothing to optimize."""
        return None

    def project_alpha(self, alpha: list[Tensor]) -> None:
        """Put ``alpha`` back (in place) where every value is a sound relaxation."""


class ReLUOp(Nonlinear):
    """``relu``."""

    lipschitz = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)

    def interval_from_pre(self, lower: Tensor, upper: Tensor, pre: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return F.relu(pre[0]), F.relu(pre[1])

    def relax(self, lam: Tensor, pre: tuple[Tensor, Tensor], alpha: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return relu_relax(lam, *pre, alpha=None if alpha is None else alpha[0])

    def init_alpha(self, pre: tuple[Tensor, Tensor], rows: int) -> list[Tensor] | None:
        slope = relu_lower_slope(*pre).unsqueeze(1)
        return [slope.expand(-1, rows, *slope.shape[2:]).clone()]

    def project_alpha(self, alpha: list[Tensor]) -> None:
        alpha[0].clamp_(0, 1)


class GroupSort2Op(Nonlinear):
    """Sort each pair of channels ``(2j, 2j+1)`` ascending; quantity: ``d = a − b`` per pair.

    As ReLUs: ``min = a − relu(d)``, ``max = b + relu(d)``, so ``λ_min·min + λ_max·max =
    λ_min a + λ_max b + (λ_max − λ_min) relu(d)``, and the last term is relaxed as a ReLU.
    """

    lipschitz = 1.0

    @staticmethod
    def _pairs(x: Tensor, dim: int = 1) -> Tensor:
        return x.reshape(*x.shape[:dim], x.shape[dim] // 2, 2, *x.shape[dim + 1 :])

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"GroupSort2 ({self.name}) needs an even number of channels; got {x.shape[1]}")
        p = self._pairs(x)
        return torch.stack((p.amin(2), p.amax(2)), dim=2).reshape(x.shape)

    def quantity_value(self, x: Tensor) -> Tensor:
        p = self._pairs(x)
        return p[:, :, 0] - p[:, :, 1]

    def quantity_interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        lo, up = self._pairs(lower), self._pairs(upper)
        return lo[:, :, 0] - up[:, :, 1], up[:, :, 0] - lo[:, :, 1]

    def quantity_size(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) // 2

    def quantity_rows(self, shape: tuple[int, ...], start: int, stop: int, like: Tensor) -> Tensor:
        spatial = math.prod(shape[1:])
        rows = torch.zeros((stop - start, shape[0] // 2, 2, spatial), dtype=like.dtype, device=like.device)
        index = torch.arange(start, stop, device=like.device)
        channel, position, m = index // spatial, index % spatial, torch.arange(stop - start, device=like.device)
        rows[m, channel, 0, position] = 1
        rows[m, channel, 1, position] = -1
        return rows.view(stop - start, *shape)

    def interval_from_pre(self, lower: Tensor, upper: Tensor, pre: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = self._pairs(lower), self._pairs(upper)
        a_lo, b_lo, a_up, b_up = lo[:, :, 0], lo[:, :, 1], up[:, :, 0], up[:, :, 1]
        d_lo, d_up = pre
        # min = a − relu(d), max = b + relu(d): tighter than min/max of the bounds when d is known better.
        min_lo = torch.maximum(torch.minimum(a_lo, b_lo), a_lo - F.relu(d_up))
        min_up = torch.minimum(torch.minimum(a_up, b_up), a_up - F.relu(d_lo))
        max_lo = torch.maximum(torch.maximum(a_lo, b_lo), b_lo + F.relu(d_lo))
        max_up = torch.minimum(torch.maximum(a_up, b_up), b_up + F.relu(d_up))
        out_lo = torch.stack((min_lo, max_lo), dim=2).reshape(lower.shape)
        out_up = torch.stack((torch.maximum(min_up, min_lo), torch.maximum(max_up, max_lo)), dim=2).reshape(upper.shape)
        return out_lo, out_up

    def relax(self, lam: Tensor, pre: tuple[Tensor, Tensor], alpha: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        p = self._pairs(lam, dim=2)
        lam_min, lam_max = p[:, :, :, 0], p[:, :, :, 1]
        # Upper bound of gain · relu(d); α: the slope of relu(d) ≥ α·d where the gain is negative.
        coef_d, const = relu_relax(lam_max - lam_min, *pre, alpha=None if alpha is None else alpha[0])
        return torch.stack((lam_min + coef_d, lam_max - coef_d), dim=3).reshape(lam.shape), const

    def init_alpha(self, pre: tuple[Tensor, Tensor], rows: int) -> list[Tensor] | None:
        slope = relu_lower_slope(*pre).unsqueeze(1)
        return [slope.expand(-1, rows, *slope.shape[2:]).clone()]

    def project_alpha(self, alpha: list[Tensor]) -> None:
        alpha[0].clamp_(0, 1)


class MaxPoolOp(Nonlinear):
    """``max_pool2d``. Above: the window's largest upper bound; below: the input with the largest
    lower bound; both exactly that input where it wins on the whole box."""

    def __init__(self, name: str, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> None:
        super().__init__(name)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.lipschitz = math.sqrt(math.ceil(kernel[0] / stride[0]) * math.ceil(kernel[1] / stride[1]))

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding)

    def interval_from_pre(self, lower: Tensor, upper: Tensor, pre: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return self.forward(pre[0]), self.forward(pre[1])

    def _windows(self, t: Tensor, fill: float) -> Tensor:
        """``(B, C, k·k, L)`` windows, padding filled with ``fill``."""
        ph, pw = self.padding
        padded = F.pad(t, (pw, pw, ph, ph), value=fill) if ph or pw else t
        b, c = t.shape[:2]
        cols = F.unfold(padded.reshape(b * c, 1, *padded.shape[-2:]), self.kernel, stride=self.stride)
        return cols.view(b, c, cols.shape[1], cols.shape[2])

    def relax(self, lam: Tensor, pre: tuple[Tensor, Tensor], alpha: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        lo, up = pre
        big = torch.finfo(lo.dtype).max / 4  # padding never wins: every window holds a real input
        win_lo, win_up = self._windows(lo, -big), self._windows(up, -big)  # (B, C, K, L)
        best_lo, winner = win_lo.max(dim=2)
        top_up = win_up.max(dim=2).values
        others_up = win_up.scatter(2, winner.unsqueeze(2), -big).max(dim=2).values
        sure = best_lo >= others_up
        b, m, c, oh, ow = lam.shape
        lam_f = lam.reshape(b, m, c, oh * ow)
        use_winner = (lam_f < 0) | sure.unsqueeze(1)
        coef_win = torch.where(use_winner, lam_f, torch.zeros_like(lam_f))
        const = torch.where(use_winner, torch.zeros_like(lam_f), lam_f * top_up.unsqueeze(1)).view(b, m, c, oh, ow)
        k = self.kernel[0] * self.kernel[1]
        cols = torch.zeros((b, m, c, k, oh * ow), dtype=lam.dtype, device=lam.device)
        cols.scatter_(3, winner.unsqueeze(1).unsqueeze(3).expand(b, m, c, 1, oh * ow), coef_win.unsqueeze(3))
        ph, pw = self.padding
        h, w = lo.shape[-2:]
        grid = F.fold(cols.reshape(b * m * c, k, oh * ow), (h + 2 * ph, w + 2 * pw), self.kernel, stride=self.stride)
        return grid[..., ph : ph + h, pw : pw + w].reshape(b, m, c, h, w), const


class L2PoolOp(Nonlinear):
    """``scale · sqrt(Σ_window x²)`` over non-overlapping ``k×k`` windows (incomplete borders dropped).

    Linear bounds on a box ``[l, u]``, per window: below, the tangent plane at the box's
    midpoint ``c`` (``‖v‖ ≥ cᵀv/‖c‖``, Cauchy–Schwarz); above, each ``v_i²`` by its chord
    ``(l_i + u_i) v_i − l_i u_i`` and the concave square root by its tangent at the chord sum's
    value at ``c``.
    """

    def __init__(self, name: str, kernel: int, scale: float = 1.0) -> None:
        super().__init__(name)
        self.kernel, self.scale = kernel, scale
        self.lipschitz = abs(scale)

    def _sum(self, t: Tensor) -> Tensor:
        k = self.kernel
        return F.avg_pool2d(t.flatten(0, -4), k, k).view(*t.shape[:-2], t.shape[-2] // k, t.shape[-1] // k) * (k * k)

    def _crop(self, t: Tensor) -> Tensor:
        k = self.kernel
        return t[..., : t.shape[-2] // k * k, : t.shape[-1] // k * k]

    def _spread(self, t: Tensor) -> Tensor:
        """Window values onto the window's pixels."""
        k = self.kernel
        return t.repeat_interleave(k, -2).repeat_interleave(k, -1)

    def forward(self, x: Tensor) -> Tensor:
        return self._sum(self._crop(x) ** 2).sqrt() * self.scale

    def interval_from_pre(self, lower: Tensor, upper: Tensor, pre: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lo, up = self._crop(pre[0]), self._crop(pre[1])
        nearest = torch.maximum(torch.maximum(lo, -up), torch.zeros_like(lo))
        farthest = torch.maximum(lo.abs(), up.abs())
        a, b = self._sum(nearest**2).sqrt(), self._sum(farthest**2).sqrt()
        s = self.scale
        return (a * s, b * s) if s >= 0 else (b * s, a * s)

    def relax(self, lam: Tensor, pre: tuple[Tensor, Tensor], alpha: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        lo, up = (self._crop(t).unsqueeze(1) for t in pre)  # (B, 1, C, h, w)
        lam = lam * self.scale
        tiny = torch.finfo(lo.dtype).tiny ** 0.5
        # Below: the tangent plane at p (any p; CROWN's p is the midpoint). Above: the chords of the
        # squares, then the tangent of √ at t > 0 (CROWN's t is the chord sum at the midpoint, S0).
        mid, rad = (lo + up) / 2, (up - lo) / 2
        s0 = self._sum((lo**2 + up**2) / 2).clamp_min(tiny**2)
        point = mid
        if alpha is not None:  # α-CROWN: p = mid + θ·radius, t = S0·exp(τ), any θ and τ
            point = mid + alpha[0] * rad
            s0 = s0 * alpha[1].exp()
        square = self._spread(self._sum(point**2))
        low_coef = torch.where(square > 0, point / square.clamp_min(tiny**2).sqrt(), torch.zeros_like(point))
        root = s0.sqrt()
        up_coef = (lo + up) / (2 * self._spread(root))
        up_const = root / 2 - self._sum(lo * up) / (2 * root)  # √t − t/(2√t) − Σ l u/(2√t)
        lam_pix = self._spread(lam)
        coef = lam_pix * torch.where(lam_pix >= 0, up_coef, low_coef)
        const = lam.clamp_min(0) * up_const
        h, w = pre[0].shape[-2:]
        return F.pad(coef, (0, w - coef.shape[-1], 0, h - coef.shape[-2])), const

    def init_alpha(self, pre: tuple[Tensor, Tensor], rows: int) -> list[Tensor] | None:
        lo = self._crop(pre[0]).unsqueeze(1)
        point = lo.new_zeros((lo.shape[0], rows, *lo.shape[2:]))  # θ: offset of p from the midpoint, in radii
        level = self._sum(point)  # τ: log of t / S0
        return [point, level]


# --------------------------------------------------------------------------------------------


@dataclass
class Node:
    """One operation applied to earlier nodes (node 0 is the input)."""

    op: Op | None
    inputs: list[int]
    shape: tuple[int, ...] = ()  # per-sample output shape
    consumers: int = 0


@dataclass
class Graph:
    """A model as a list of nodes in topological order; the last node is the output."""

    nodes: list[Node] = field(default_factory=list)

    _lipschitz: dict[int, float] = field(default_factory=dict)

    @property
    def output(self) -> int:
        """Index of the output node."""
        return len(self.nodes) - 1

    def lipschitz(self, index: int) -> float:
        """An L2 Lipschitz constant from the input to node ``index`` (product along the path; sum at additions)."""
        if index not in self._lipschitz:
            node = self.nodes[index]
            if node.op is None:
                value = 1.0
            elif isinstance(node.op, AddOp):
                value = sum(self.lipschitz(i) for i in node.inputs)
            else:
                value = self.lipschitz(node.inputs[0]) * node.op.lipschitz
            self._lipschitz[index] = value
        return self._lipschitz[index]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every node's value at ``x`` (the tests compare the last with the model's output)."""
        values = [x]
        for node in self.nodes[1:]:
            values.append(node.op.forward(*(values[i] for i in node.inputs)))
        return values


class _Builder:
    """Walks a model and appends nodes, folding BatchNorm into the layer before it when safe."""

    def __init__(self, input_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.graph = Graph([Node(None, [], tuple(input_shape))])
        self.dtype, self.device = dtype, device
        self.pinned: set[int] = {0}

    def _tensor(self, t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(self.device, self.dtype)

    def add(self, op: Op, inputs: list[int]) -> int:
        nodes = self.graph.nodes
        with torch.no_grad():
            probe = [torch.zeros((1, *nodes[i].shape), dtype=self.dtype, device=self.device) for i in inputs]
            shape = tuple(op.forward(*probe).shape[1:])
        for i in inputs:
            nodes[i].consumers += 1
        nodes.append(Node(op, inputs, shape))
        return len(nodes) - 1

    def module(self, module: nn.Module, name: str, at: int) -> int:
        """Append ``module`` applied to node ``at``; return the output node."""
        import torchvision.models.resnet as tv_resnet
        from deel.torchlip.modules.activation import GroupSort, MaxMin
        from deel.torchlip.modules.pooling import ScaledAdaptiveAvgPool2d, ScaledAvgPool2d, ScaledL2NormPool2d

        from harmonia.models.backbones import Backbone
        from harmonia.models.layers import GroupSort2, L2NormPool2d

        kind = type(module)
        if isinstance(module, Backbone):
            std = module.std.detach().flatten().to(self.device, self.dtype)
            mean = module.mean.detach().flatten().to(self.device, self.dtype)
            at = self.add(ChannelAffineOp(f"{name}.normalize" if name else "normalize", 1 / std, -mean / std), [at])
            return self.module(module.net, f"{name}.net" if name else "net", at)
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                at = self.module(child, f"{name}.{child_name}" if name else child_name, at)
            return at
        if isinstance(module, tv_resnet.ResNet):
            for part in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
                at = self.module(getattr(module, part), f"{name}.{part}" if name else part, at)
            at = self.add(ReshapeOp(f"{name}.flatten", lambda t: t.flatten(1)), [at])
            return self.module(module.fc, f"{name}.fc" if name else "fc", at)
        if isinstance(module, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
            return self._block(module, name, at)
        if isinstance(module, nn.Linear):
            return self._fold_ready(LinearOp(name, self._tensor(module.weight), self._tensor(module.bias)), at)
        if isinstance(module, nn.Conv2d):
            return self._conv(module, name, at)
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self._batchnorm(module, name, at)
        if isinstance(module, nn.ReLU):
            return self.add(ReLUOp(name), [at])
        if isinstance(module, GroupSort2) or (isinstance(module, GroupSort) and module.group_size == 2):
            coef = float(getattr(module, "_coefficient_lip", 1.0))
            out = self.add(GroupSort2Op(name), [at])
            return out if coef == 1.0 else self.add(ChannelAffineOp(name, *self._constant_scale(out, coef)), [out])
        if isinstance(module, MaxMin):
            if module._dim not in (None, 1):
                raise _refuse(name, module, f"MaxMin over dim {module._dim} (only the channel axis)")
            coef = float(module._coefficient_lip)
            at = self.add(NegateConcatOp(name, 1), [at])
            out = self.add(ReLUOp(name), [at])
            return out if coef == 1.0 else self.add(ChannelAffineOp(name, *self._constant_scale(out, coef)), [out])
        if isinstance(module, nn.MaxPool2d):
            if module.dilation not in (1, (1, 1)) or module.ceil_mode or module.return_indices:
                raise _refuse(name, module, "dilation, ceil_mode and return_indices are not supported")
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            return self.add(MaxPoolOp(name, pair(module.kernel_size), pair(module.stride), pair(module.padding)), [at])
        if isinstance(module, L2NormPool2d):
            return self.add(L2PoolOp(name, module.kernel_size), [at])
        if isinstance(module, nn.LPPool2d):  # deel-torchlip's ScaledL2NormPool2d included
            k, s = module.kernel_size, module.stride if module.stride is not None else module.kernel_size
            if float(module.norm_type) != 2.0 or module.ceil_mode or k != s or not isinstance(k, int) and k[0] != k[1]:
                raise _refuse(name, module, "only norm 2, square kernel = stride, no ceil_mode")
            k = k if isinstance(k, int) else k[0]
            scale = float(getattr(module, "_coefficient_lip", 1.0)) if isinstance(module, ScaledL2NormPool2d) else 1.0
            return self.add(L2PoolOp(name, k, scale), [at])
        if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, ScaledAvgPool2d, ScaledAdaptiveAvgPool2d)):
            return self.add(FunctionOp(name, module, nonnegative=True, lipschitz=self._avg_lipschitz(module, at)), [at])
        if isinstance(module, nn.Flatten):
            start, end = module.start_dim, module.end_dim
            if start != 1:
                raise _refuse(name, module, "Flatten must keep the batch axis (start_dim=1)")
            return self.add(ReshapeOp(name, lambda t, e=end: t.flatten(1, e)), [at])
        if isinstance(module, nn.PixelUnshuffle):  # InvertibleDownSampling included (a permutation)
            coef = float(getattr(module, "_coefficient_lip", 1.0))
            if coef != 1.0:
                raise _refuse(name, module, "a scaled InvertibleDownSampling")
            return self.add(FunctionOp(name, module, nonnegative=True, lipschitz=1.0), [at])
        if kind is nn.Identity:
            return at
        if isinstance(module, nn.Dropout):
            if module.training and module.p > 0:
                raise _refuse(name, module, "dropout in training mode is random; put the model in eval mode")
            return at
        raise _refuse(name, module)

    @staticmethod
    def _avg_lipschitz(module: nn.Module, at: int) -> float:
        if isinstance(module, nn.AvgPool2d) and not module.ceil_mode:
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            (kh, kw), (sh, sw) = pair(module.kernel_size), pair(module.stride or module.kernel_size)
            reach = math.ceil(kh / sh) * math.ceil(kw / sw)
            return math.sqrt(reach / (kh * kw)) * float(getattr(module, "_coefficient_lip", 1.0))
        return math.inf

    def _constant_scale(self, node: int, coef: float) -> tuple[Tensor, Tensor]:
        channels = self.graph.nodes[node].shape[0]
        scale = torch.full((channels,), coef, dtype=self.dtype, device=self.device)
        return scale, torch.zeros_like(scale)

    def _conv(self, module: nn.Conv2d, name: str, at: int) -> int:
        if getattr(module, "pad", None) is not None and not (callable(module.pad) and module.pad.__name__ == "<lambda>"):
            raise _refuse(name, module, "deel-torchlip symmetric padding")
        weight, bias = self._tensor(module.weight), self._tensor(module.bias)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            # Explicit padding step: any mode copies existing pixels (or zeros), a non-negative linear map.
            pads = tuple(module._reversed_padding_repeated_twice)
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            if any(pads):
                at = self.add(FunctionOp(f"{name}.pad", lambda t, p=pads, m=mode: F.pad(t, p, mode=m), nonnegative=True,
                                         lipschitz=math.inf if mode != "constant" else 1.0), [at])
            padding = (0, 0)
        op = ConvOp(name, weight, bias, module.stride, padding, module.dilation, module.groups)
        return self._fold_ready(op, at)

    def _fold_ready(self, op: Affine, at: int) -> int:
        return self.add(op, [at])

    def _batchnorm(self, module: nn.modules.batchnorm._BatchNorm, name: str, at: int) -> int:
        if module.training or module.running_mean is None:
            raise _refuse(name, module, "BatchNorm uses batch statistics (training mode or no running stats); bound the model in eval mode")
        scale = self._tensor(module.running_var).add(module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * self._tensor(module.weight)
        shift = -self._tensor(module.running_mean) * scale
        if module.bias is not None:
            shift = shift + self._tensor(module.bias)
        node = self.graph.nodes[at]
        if isinstance(node.op, (ConvOp, LinearOp)) and node.consumers == 0 and at not in self.pinned:
            # Fold into the layer before (exact; keeps the bounds as tight as without BatchNorm).
            prev = node.op
            shape = (-1,) + (1,) * (prev.weight.dim() - 1)
            weight = prev.weight * scale.view(shape)  # scales each output channel (any groups)
            bias = shift if prev.bias is None else prev.bias * scale + shift
            if isinstance(prev, ConvOp):
                folded: Affine = ConvOp(f"{prev.name}+{name}", weight, bias, prev.stride, prev.padding, prev.dilation, prev.groups)
            else:
                folded = LinearOp(f"{prev.name}+{name}", weight, bias)
            node.op = folded
            return at
        return self.add(ChannelAffineOp(name, scale, shift), [at])

    def _block(self, block: nn.Module, name: str, at: int) -> int:
        import torchvision.models.resnet as tv_resnet

        self.pinned.add(at)
        prefix = f"{name}." if name else ""
        parts = ["conv1", "bn1", "relu", "conv2", "bn2"]
        if isinstance(block, tv_resnet.Bottleneck):
            parts += ["relu", "conv3", "bn3"]
        main = at
        for part in parts:
            main = self.module(getattr(block, part), prefix + part, main)
        shortcut = at if block.downsample is None else self.module(block.downsample, prefix + "downsample", at)
        out = self.add(AddOp(prefix + "add"), [main, shortcut])
        return self.module(block.relu, prefix + "relu", out)


def build_graph(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> Graph:
    """The bound-propagation graph of ``model`` for per-sample inputs of ``input_shape``.

    Raises :class:`UnsupportedLayerError` naming the first layer it cannot bound.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    builder = _Builder(tuple(input_shape), dtype, torch.device(device))
    with torch.no_grad(), parametrize.cached():
        builder.module(model, "", 0)
    return builder.graph
