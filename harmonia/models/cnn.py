"""A 1-Lipschitz CNN family (deel-torchlip layers) and its unconstrained twin.

Both are built by one function from the same arguments, so a comparison changes one thing:
the constraint. Layout: ``len(widths)`` stages of ``depth`` × (3×3 conv + activation) then a
/2 pooling, a hidden dense layer, and a linear head.

| part       | Lipschitz (``lipschitz_cnn``)                       | twin (``cnn``)        |
|------------|-----------------------------------------------------|-----------------------|
| conv       | ``BjorckConv2d`` (spectral scale + Björck + 1/k)    | ``Conv2d``            |
| activation | ``GroupSort2``                                      | ``ReLU``              |
| pool "l2"  | ``L2NormPool2d`` (norm-preserving)                  | ``MaxPool2d``         |
| pool "invertible" | ``InvertibleDownSampling`` (channels ×4)     | ``PixelUnshuffle``    |
| hidden     | ``BjorckLinear``                                    | ``Linear``            |
| head "frobenius" | ``FrobeniusLinear(disjoint_neurons=True)``: each logit 1-Lipschitz | ``Linear`` |
| head "spectral"  | ``BjorckLinear``: the logit vector 1-Lipschitz     | ``Linear``            |

``BjorckConv2d``, ``BjorckLinear``, ``GroupSort2`` and ``L2NormPool2d`` are Harmonia's
(``orthogonal.py``, ``layers.py``): the same functions and guarantee as deel-torchlip's
``SpectralConv2d``, ``SpectralLinear``, ``GroupSort2`` and ``ScaledL2NormPool2d``; a training
step costs 1.06–1.43× the twin's with them, 1.7–3.8× with deel-torchlip's (benchmarks/README.md, idle machine).
``backend="deel"`` builds the deel-torchlip 1.0.5 layers instead (with Harmonia's
``L2NormPool2d``, whose gradient is finite on empty windows), e.g. to load a checkpoint
trained before the switch or to compare.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal, Sequence

import deel.torchlip as torchlip
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm

from harmonia.models.layers import GroupSort2, L2NormPool2d
from harmonia.models.orthogonal import (
    DEFAULT_ITERATIONS,
    DEFAULT_POWER_ITERATIONS,
    SAFE_PADDING,
    BjorckConv2d,
    BjorckLinear,
)
from harmonia.models.registry import register_model

Certificate = Literal["per_logit", "vector"]
Backend = Literal["harmonia", "deel"]


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


def _lipschitz_layers(
    backend: Backend, bjorck_iterations: int, power_iterations: int
) -> tuple[Callable[..., nn.Module], Callable[[int, int], nn.Module], type[nn.Module]]:
    """(conv factory, dense factory, GroupSort2 class) of a backend."""
    if backend == "harmonia":
        conv = partial(BjorckConv2d, iterations=bjorck_iterations, power_iterations=power_iterations)
        dense = partial(BjorckLinear, iterations=bjorck_iterations, power_iterations=power_iterations)
        return conv, dense, GroupSort2

    def with_power_iterations(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(*args, **kwargs) -> nn.Module:
            layer = factory(*args, **kwargs)
            for module in layer.modules():
                if isinstance(module, _SpectralNorm):
                    module.n_power_iterations = power_iterations
            return layer

        return build

    return with_power_iterations(torchlip.SpectralConv2d), with_power_iterations(torchlip.SpectralLinear), torchlip.GroupSort2


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
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    bjorck_iterations: int = DEFAULT_ITERATIONS,
    backend: Backend = "harmonia",
) -> ConvNet:
    """Build the Lipschitz CNN (``lipschitz=True``) or its unconstrained twin.

    ``bjorck_iterations``: Björck steps of every orthonormalized layer (``backend="harmonia"``:
    a fixed count; deel-torchlip stops by itself and ignores it).
    ``power_iterations``: power-method steps per training forward that estimate each
    layer's spectral norm. With deel-torchlip's default of 1, an Adam step at lr 2e-3 on the
    4096→128 layer moved σ faster than one step tracks it; the weight handed to Björck then
    had σ > √3 and Björck diverged to NaN within a few steps. Three steps remove that with
    ``backend="deel"``; with ``"harmonia"`` the layers carry an unconditional floor
    (see ``orthogonal.py``) and the steps only sharpen the estimate.
    ``backend``: ``"harmonia"`` (default, fast) or ``"deel"`` (deel-torchlip 1.0.5's layers).
    """
    if pool not in ("l2", "invertible"):
        raise ValueError(f"pool must be 'l2' or 'invertible'; got {pool!r}")
    if head not in ("frobenius", "spectral"):
        raise ValueError(f"head must be 'frobenius' or 'spectral'; got {head!r}")
    if backend not in ("harmonia", "deel"):
        raise ValueError(f"backend must be 'harmonia' or 'deel'; got {backend!r}")
    if padding_mode not in SAFE_PADDING:
        raise ValueError(
            f"padding_mode={padding_mode!r} is refused: only {SAFE_PADDING} keep the convolution "
            "1-Lipschitz (reflect padding measured up to 1.24 with deel-torchlip 1.0.5)"
        )
    if input_size % (2 ** len(widths)):
        raise ValueError(f"input_size {input_size} must be divisible by 2**len(widths) = {2 ** len(widths)}")
    if depth < 1 or not widths:
        raise ValueError("need depth >= 1 and at least one stage width")
    conv, dense, sort = _lipschitz_layers(backend, bjorck_iterations, power_iterations)

    layers: list[nn.Module] = []
    channels, size = in_channels, input_size
    for width in widths:
        for _ in range(depth):
            if lipschitz:
                layers += [conv(channels, width, 3, padding=1, padding_mode=padding_mode), sort()]
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1, padding_mode=padding_mode), nn.ReLU()]
            channels = width
        if pool == "l2":
            layers.append(L2NormPool2d(2) if lipschitz else nn.MaxPool2d(2))
        else:
            layers.append(torchlip.InvertibleDownSampling(2) if lipschitz else nn.PixelUnshuffle(2))
            channels *= 4
        size //= 2
    flat = channels * size * size
    layers.append(nn.Flatten())
    if lipschitz:
        layers += [dense(flat, hidden), sort()]
        if head == "frobenius":
            layers.append(torchlip.FrobeniusLinear(hidden, num_classes, disjoint_neurons=True))
        else:
            layers.append(dense(hidden, num_classes))
        certificate: Certificate | None = "per_logit" if head == "frobenius" else "vector"
    else:
        layers += [nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        certificate = None
    return ConvNet(layers, (in_channels, input_size, input_size), certificate)


@register_model("lipschitz_cnn")
def lipschitz_cnn(**kwargs) -> ConvNet:
    """1-Lipschitz CNN (Björck-orthonormal convs, GroupSort2, L2-norm pooling, Frobenius head)."""
    return conv_net(lipschitz=True, **kwargs)


@register_model("cnn")
def cnn(**kwargs) -> ConvNet:
    """Unconstrained twin of lipschitz_cnn (Conv2d/ReLU/MaxPool2d, Linear head), same topology."""
    return conv_net(lipschitz=False, **kwargs)
