"""A 1-Lipschitz CNN family (deel-torchlip layers) and its unconstrained twin.

Both are built by one function from the same arguments, so a comparison changes one thing:
the constraint. Layout: ``len(widths)`` stages of ``depth`` × (3×3 conv + activation) then a
/2 pooling, a hidden dense layer, and a linear head.

| part       | Lipschitz (``lipschitz_cnn``)                       | twin (``cnn``)        |
|------------|-----------------------------------------------------|-----------------------|
| conv       | ``SpectralConv2d`` (spectral norm + Björck + 1/k)   | ``Conv2d``            |
| activation | ``GroupSort2``                                      | ``ReLU``              |
| pool "l2"  | ``L2NormPool2d`` (norm-preserving)                  | ``MaxPool2d``         |
| pool "invertible" | ``InvertibleDownSampling`` (channels ×4)     | ``PixelUnshuffle``    |
| hidden     | ``SpectralLinear``                                  | ``Linear``            |
| head "frobenius" | ``FrobeniusLinear(disjoint_neurons=True)``: each logit 1-Lipschitz | ``Linear`` |
| head "spectral"  | ``SpectralLinear``: the logit vector 1-Lipschitz   | ``Linear``            |
"""

from __future__ import annotations

from typing import Literal, Sequence

from deel.torchlip import (
    FrobeniusLinear,
    GroupSort2,
    InvertibleDownSampling,
    SpectralConv2d,
    SpectralLinear,
)
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm

from harmonia.models.layers import L2NormPool2d
from harmonia.models.registry import register_model

Certificate = Literal["per_logit", "vector"]

# Padding modes for which the 1/k rescaling of a Björck-orthonormal kernel bounds the conv
# operator by 1. Reflect padding repeats interior pixels and breaks the bound (measured up to
# 1.24 on deel-torchlip 1.0.5); replicate does the same at the borders.
SAFE_PADDING = ("zeros", "circular")


class ConvNet(nn.Sequential):
    """A sequential CNN that records its input shape and, if 1-Lipschitz, its certificate.

    ``certificate`` is ``"per_logit"`` (each logit is 1-Lipschitz: radius ``margin / 2``),
    ``"vector"`` (the logit vector is 1-Lipschitz: radius ``margin / √2``) or ``None``.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        input_shape: tuple[int, int, int],
        certificate: Certificate | None,
    ) -> None:
        super().__init__(*layers)
        self.input_shape = tuple(input_shape)
        self.certificate = certificate


def conv_net(
    lipschitz: bool,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 32,
    widths: Sequence[int] = (32, 64),
    depth: int = 1,
    hidden: int = 128,
    pool: Literal["l2", "invertible"] = "l2",
    head: Literal["frobenius", "spectral"] = "frobenius",
    padding_mode: str = "zeros",
    power_iterations: int = 3,
) -> ConvNet:
    """Build the Lipschitz CNN (``lipschitz=True``) or its unconstrained twin.

    ``power_iterations``: power-method steps per training forward of each spectral-norm
    parametrization (deel-torchlip leaves torch's default, 1). With 1, an Adam step at
    lr 2e-3 on the 4096→128 layer moves σ faster than one step tracks it; the weight handed
    to Björck then has σ > √3 and Björck diverges to NaN within a few steps (measured
    here). Three steps cost two extra matrix-vector products and remove the divergence.
    """
    if pool not in ("l2", "invertible"):
        raise ValueError(f"pool must be 'l2' or 'invertible'; got {pool!r}")
    if head not in ("frobenius", "spectral"):
        raise ValueError(f"head must be 'frobenius' or 'spectral'; got {head!r}")
    if padding_mode not in SAFE_PADDING:
        raise ValueError(
            f"padding_mode={padding_mode!r} is refused: only {SAFE_PADDING} keep the convolution "
            "1-Lipschitz (reflect padding measured up to 1.24 with deel-torchlip 1.0.5)"
        )
    if input_size % (2 ** len(widths)):
        raise ValueError(f"input_size {input_size} must be divisible by 2**len(widths) = {2 ** len(widths)}")
    if depth < 1 or not widths:
        raise ValueError("need depth >= 1 and at least one stage width")

    layers: list[nn.Module] = []
    channels, size = in_channels, input_size
    for width in widths:
        for _ in range(depth):
            if lipschitz:
                layers += [SpectralConv2d(channels, width, 3, padding=1, padding_mode=padding_mode), GroupSort2()]
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1, padding_mode=padding_mode), nn.ReLU()]
            channels = width
        if pool == "l2":
            layers.append(L2NormPool2d(2) if lipschitz else nn.MaxPool2d(2))
        else:
            layers.append(InvertibleDownSampling(2) if lipschitz else nn.PixelUnshuffle(2))
            channels *= 4
        size //= 2
    flat = channels * size * size
    layers.append(nn.Flatten())
    if lipschitz:
        layers += [SpectralLinear(flat, hidden), GroupSort2()]
        if head == "frobenius":
            layers.append(FrobeniusLinear(hidden, num_classes, disjoint_neurons=True))
        else:
            layers.append(SpectralLinear(hidden, num_classes))
        certificate: Certificate | None = "per_logit" if head == "frobenius" else "vector"
        for layer in layers:
            for module in layer.modules():
                if isinstance(module, _SpectralNorm):
                    module.n_power_iterations = power_iterations
    else:
        layers += [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        certificate = None
    return ConvNet(layers, (in_channels, input_size, input_size), certificate)


@register_model("lipschitz_cnn")
def lipschitz_cnn(**kwargs) -> ConvNet:
    """1-Lipschitz CNN (deel-torchlip SpectralConv2d/GroupSort2/L2-norm pooling, Frobenius head)."""
    return conv_net(lipschitz=True, **kwargs)


@register_model("cnn")
def cnn(**kwargs) -> ConvNet:
    """Unconstrained twin of lipschitz_cnn (Conv2d/ReLU/MaxPool2d, Linear head), same topology."""
    return conv_net(lipschitz=False, **kwargs)
