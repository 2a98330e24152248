"""Export of 1-Lipschitz models to plain torch, and a certified bound of their Lipschitz constant.

Notes that shape this file:
- a deel-torchlip 1.0.5 Björck layer in eval mode uses the weight cached by its last
  *training* forward (Harmonia's ``BjorckConv2d``/``BjorckLinear`` recompute it from the
  current weights), so the exported network is the eval-mode network;
- ``vanilla_export`` hands out tensors that share memory with the source: we clone them, so
  training the source later cannot change an exported model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from deel.torchlip import InvertibleDownSampling, vanilla_model
from deel.torchlip.modules.activation import GroupSort
from torch import Tensor, nn

from harmonia.models.layers import GroupSort2, L2NormPool2d


def export(model: nn.Module) -> nn.Module:
    """A plain-torch copy of ``model`` (eval mode) whose outputs equal ``model.eval()``'s.

    Every parametrized layer (Harmonia's Björck layers, deel-torchlip's) becomes an
    ``nn.Conv2d``/``nn.Linear`` holding its current normalized weight (cloned). The source
    model is left untouched (and in its mode).
    """
    was_training = model.training
    model.eval()
    try:
        plain = vanilla_model(copy.deepcopy(model), in_place=True)
    finally:
        model.train(was_training)
    for param in plain.parameters():
        param.data = param.data.detach().clone()
        param.requires_grad_(True)
    return plain.eval()


# Nonlinear or shape-only layers and the Lipschitz constant (L2 → L2) they have by construction.
_ONE_LIPSCHITZ = (
    nn.ReLU,
    nn.Flatten,
    nn.Identity,
    nn.PixelUnshuffle,
    InvertibleDownSampling,
    GroupSort,  # deel-torchlip's, GroupSort2 included
    GroupSort2,
    L2NormPool2d,
)


@dataclass
class LayerBound:
    """One layer's Lipschitz constant: a certified upper ``bound`` and a power-iteration ``estimate``.

    ``estimate ≤ true constant ≤ bound`` (up to float rounding of the estimate); for dense layers
    and layers 1-Lipschitz by construction the two are equal. ``how`` says how the bound was had.
    """

    index: int
    name: str
    estimate: float
    bound: float
    how: str

    @property
    def constant(self) -> float:
        """The certified bound (the name earlier callers read)."""
        return self.bound


class NetworkBound(NamedTuple):
    """``lipschitz_bound``'s result: unpacks as ``bound, layers`` (the certified product first)."""

    bound: float
    layers: list[LayerBound]

    @property
    def estimate(self) -> float:
        """Product of the per-layer estimates: a lower figure than ``bound``, never a certificate."""
        return math.prod(layer.estimate for layer in self.layers)


def operator_norm(layer: nn.Module, input_shape: tuple[int, ...], iterations: int = 1000, seed: int = 0, tolerance: float = 1e-7
) -> float:
    """Power-iteration *estimate* of an affine layer's largest singular value, on a real input shape.

    Power iteration on ``JᵀJ`` where ``J x = layer(x) - layer(0)`` and ``Jᵀ`` comes from a
    vector-Jacobian product, so convolutions are measured with their padding and stride. The
    iteration approaches σ_max from below and stops when it no longer moves, so it can fall
    short of it (slow convergence when the top singular values cluster): it is an estimate,
    never a bound. :func:`conv_norm_bound` gives the certified upper bound.
    """
    generator = torch.Generator().manual_seed(seed)
    param = next(layer.parameters())
    x = torch.randn((1, *input_shape), generator=generator, dtype=param.dtype).to(param.device)
    zero = torch.zeros_like(x)
    with torch.no_grad():
        offset = layer(zero)

    def linear(v: Tensor) -> Tensor:
        return layer(v) - offset

    x = x / x.norm()
    sigma = 0.0
    for _ in range(iterations):
        with torch.enable_grad():
            y, vjp = torch.func.vjp(linear, x)
            (x_new,) = vjp(y)
        norm = x_new.norm()
        if norm == 0:
            return 0.0
        x = (x_new / norm).detach()
        previous, sigma = sigma, float(linear(x).detach().norm())
        # The estimate rises monotonically to σ_max; stop once it no longer moves.
        if abs(sigma - previous) <= tolerance * sigma:
            break
    return sigma


# Relative slack (to Σ|weight|) added to an FFT bound for the float64 rounding of its sums and SVDs.
_ROUNDING_SLACK = 1e-12
# Complex entries of the per-frequency symbol built at once (bounds memory on wide layers).
_SYMBOL_CHUNK = 1 << 22


def _side_padding(conv: nn.Conv2d) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dimension, as PyTorch applies it (``"same"`` included)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return [(0, 0), (0, 0)]
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return [(t // 2, t - t // 2) for t in total]  # PyTorch puts the odd pixel after
    return [(int(p), int(p)) for p in conv.padding]


def _padding_norm(mode: str, size: int, before: int, after: int) -> float:
    """Operator norm of one axis of the padding map ``x ↦ padded x``: √(most copies of one input)."""
    if mode == "zeros" or before == after == 0:
        return 1.0
    index = torch.arange(-before, size + after)
    if mode == "circular":
        source = index % size
    elif mode == "reflect":
        source = torch.where(index < 0, -index, torch.where(index >= size, 2 * (size - 1) - index, index))
    elif mode == "replicate":
        source = index.clamp(0, size - 1)
    else:
        raise TypeError(f"no known Lipschitz bound for padding_mode={mode!r}")
    return float(torch.bincount(source, minlength=size).max()) ** 0.5


def _symbol_norm(weight: Tensor, groups: int, axes: list[tuple[int, int, Tensor, Tensor]]) -> float:
    """``max_ω σ_max(K̂(ω))`` of a stride-1 circular convolution with polyphase input channels.

    ``axes`` holds, per spatial axis, ``(torus size N, phases s, phase r(a), position q(a))`` of
    each kernel tap ``a``: tap ``a`` reads input phase ``r(a)`` at offset ``q(a)`` on a torus of
    ``N`` cells. ``K̂(ω)`` is the ``(C_out/g) × (C_in/g · s_h · s_w)`` matrix of the convolution at
    frequency ``ω``; a circular convolution's singular values are those of its ``K̂(ω)`` over
    the ``N_h × N_w`` frequencies. The kernel is real, so ``K̂(−ω) = conj K̂(ω)``: half the
    frequencies of the last axis suffice.
    """
    (nh, sh, rh, qh), (nw, sw, rw, qw) = axes
    w = weight.detach().to("cpu", torch.float64)
    c_out, c_in, kh, kw = w.shape
    fh = torch.exp(-2j * math.pi * torch.outer(torch.arange(nh, dtype=torch.float64), qh.double()) / nh)  # (N_h, k_h)
    fw = torch.exp(-2j * math.pi * torch.outer(torch.arange(nw // 2 + 1, dtype=torch.float64), qw.double()) / nw)
    fh = fh[:, None, :] * F.one_hot(rh, sh).T.to(fh)  # (N_h, s_h, k_h): tap a feeds phase r(a)
    fw = fw[:, None, :] * F.one_hot(rw, sw).T.to(fw)
    partial = torch.einsum("ocab,yqb->ocayq", w.to(torch.complex128), fw)  # (C_out, C_in/g, k_h, N_w', s_w)
    per_row = (nw // 2 + 1) * c_out * c_in * sh * sw
    rows = max(1, _SYMBOL_CHUNK // max(per_row, 1))
    largest = 0.0
    for start in range(0, nh, rows):
        symbol = torch.einsum("ocayq,xpa->xyocpq", partial, fh[start : start + rows])
        symbol = symbol.reshape(*symbol.shape[:2], groups, c_out // groups, c_in * sh * sw)
        largest = max(largest, float(torch.linalg.matrix_norm(symbol, ord=2).max()))
    return largest + _ROUNDING_SLACK * float(w.abs().sum())


def conv_norm_bound(conv: nn.Conv2d, input_shape: tuple[int, int, int]) -> tuple[float, str]:
    """A certified upper bound of a ``Conv2d``'s operator norm (linear part) on ``input_shape``.

    Any stride, dilation, groups and padding mode. The padded input is laid out, without loss,
    as ``s_h·s_w`` polyphase components (``x_r[j] = x[s·j + r]``), on which the strided
    convolution is a stride-1 convolution; that is a restriction of a *circular* convolution
    on a torus large enough that nothing wraps, whose norm is exactly ``max_ω σ_max(K̂(ω))``
    over its frequencies. So: zero padding costs nothing (an isometric embedding), circular,
    reflect and replicate padding cost the padding map's norm (√ of the most copies of one
    pixel, per axis). A circular convolution whose stride divides the input size is also
    measured on its own torus (phases of the input itself), which is its exact norm when it
    keeps the size (``padding = k // 2``, stride 1); the smaller of the two bounds is returned.
    Returns ``(bound, how)``; computed on CPU in float64.
    """
    c_in, *size = (int(v) for v in input_shape)
    if c_in != conv.in_channels or len(size) != 2:
        raise ValueError(f"input shape {tuple(input_shape)} does not fit {conv} (needs ({conv.in_channels}, H, W))")
    pads = _side_padding(conv)
    mode = conv.padding_mode
    canvas, pad_norm = [], 1.0
    for n, (before, after), k, s, d in zip(size, pads, conv.kernel_size, conv.stride, conv.dilation):
        pad_norm *= _padding_norm(mode, n, before, after)
        m = n + before + after
        if m < d * (k - 1) + 1:
            raise ValueError(f"{conv} gives an empty output on input {tuple(input_shape)}")
        position = torch.arange(k) * d
        q, r = position // s, position % s
        canvas.append((max(-(-m // s), int(q.max()) + 1), s, r, q))
    bound = pad_norm * _symbol_norm(conv.weight, conv.groups, canvas)
    tori = "×".join(str(a[0]) for a in canvas)
    how = f"FFT bound on a {tori} torus" + (f" × padding norm {pad_norm:.4g} ({mode})" if pad_norm != 1 else "")
    if mode == "circular" and all(n % s == 0 for n, s in zip(size, conv.stride)):
        own, repeats = [], 1
        for n, (before, after), k, s, d in zip(size, pads, conv.kernel_size, conv.stride, conv.dilation):
            position = torch.arange(k) * d - before
            q, r = torch.div(position, s, rounding_mode="floor"), position % s
            own.append((n // s, s, r, q))
            out = (n + before + after - d * (k - 1) - 1) // s + 1
            repeats *= -(-out // (n // s))  # outputs that read the same torus cell
        circular = repeats**0.5 * _symbol_norm(conv.weight, conv.groups, own)
        if circular < bound:
            bound = circular
            how = f"FFT on the input's own {size[0]}×{size[1]} torus (circular padding)" + (
                f" × {repeats**0.5:.4g} (repeated outputs)" if repeats > 1 else "")
    if conv.stride != (1, 1):
        how += f", stride {conv.stride[0]}×{conv.stride[1]} as polyphase channels"
    return bound, how


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, int, int] | None = None, estimate: bool = True) -> NetworkBound:
    """Certified upper bound of a sequential network's Lipschitz constant, and an estimate.

    The bound is the product of per-layer upper bounds: the exact largest singular value for
    dense layers (float64 SVD), :func:`conv_norm_bound` for convolutions (FFT of the kernel,
    on the real input size), 1 for activations and pooling that are 1-Lipschitz by
    construction. Each layer also gets an estimate (power iteration on the convolution as a
    linear operator, :func:`operator_norm`); ``result.estimate`` is their product, ``≤`` the
    true constant ``≤`` ``result.bound``. A certificate may rely on the bound only.
    For a ``per_logit`` certificate (disjoint Frobenius head) the head counts its largest row
    norm: the bound is then the Lipschitz constant of *each logit*.

    The power iteration is most of the cost (the FFT bound takes milliseconds); ``estimate=False``
    skips it and leaves each convolution's estimate NaN.

    Returns a :class:`NetworkBound`, which unpacks as ``bound, layers``.
    Raises ``TypeError`` on a layer whose constant is unknown.
    """
    input_shape = tuple(input_shape or getattr(model, "input_shape"))
    certificate = getattr(model, "certificate", None)
    layers = list(model.children())
    model = export(model)  # measure exactly what the model computes in eval mode
    bounds: list[LayerBound] = []
    shape: tuple[int, ...] = input_shape
    param = next(model.parameters())
    for index, (name, layer) in enumerate(model.named_children()):
        last = index == len(layers) - 1
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach().double()
            if last and certificate == "per_logit":
                constant, how = float(weight.norm(dim=1).max()), "max row norm (each logit)"
            else:
                constant, how = float(torch.linalg.matrix_norm(weight, ord=2)), "exact SVD"
            guess = bound = constant
        elif isinstance(layer, nn.Conv2d):
            bound, how = conv_norm_bound(layer, shape)
            guess = operator_norm(layer, shape) if estimate else float("nan")
            how += "; estimate: power iteration" if estimate else ""
        elif isinstance(layer, nn.MaxPool2d) and layer.kernel_size == layer.stride and layer.dilation in (1, (1, 1)):
            guess, bound, how = 1.0, 1.0, "by construction (disjoint windows)"
        elif isinstance(layer, _ONE_LIPSCHITZ):
            guess, bound, how = 1.0, 1.0, "by construction"
        else:
            raise TypeError(f"no known Lipschitz constant for layer {index} ({name}): {layer}")
        bounds.append(LayerBound(index, name, guess, bound, how))
        with torch.no_grad():
            shape = tuple(layer(torch.zeros((1, *shape), dtype=param.dtype, device=param.device)).shape[1:])
    return NetworkBound(math.prod(b.bound for b in bounds), bounds)
