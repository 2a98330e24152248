"""Export of 1-Lipschitz models to plain torch, and a check of their Lipschitz bound.

Notes that shape this file (SPEC §4):
- a deel-torchlip 1.0.5 Björck layer in eval mode uses the weight cached by its last
  *training* forward (Harmonia's ``BjorckConv2d``/``BjorckLinear`` recompute it from the
  current weights), so the exported network is the eval-mode network;
- ``vanilla_export`` hands out tensors that share memory with the source: we clone them, so
  training the source later cannot change an exported model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
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
    """The Lipschitz constant measured for one layer."""

    index: int
    name: str
    constant: float
    how: str


def operator_norm(layer: nn.Module, input_shape: tuple[int, ...], iterations: int = 1000, seed: int = 0, tolerance: float = 1e-7
) -> float:
    """Largest singular value of an affine layer's linear part, on a real input shape.

    Power iteration on ``JᵀJ`` where ``J x = layer(x) - layer(0)`` and ``Jᵀ`` comes from a
    vector-Jacobian product, so convolutions are measured with their padding and stride.
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


def lipschitz_bound(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> tuple[float, list[LayerBound]]:
    """Upper bound of a sequential network's Lipschitz constant: the product of its layers'.

    Affine layers are measured exactly (SVD for dense layers, power iteration for convolutions
    on the real input size); activations and pooling count their constant by construction.
    For a ``per_logit`` certificate (disjoint Frobenius head) the head counts its largest row
    norm: the bound is then the Lipschitz constant of *each logit*.
    Raises ``TypeError`` on a layer whose constant is unknown.
    """
    input_shape = tuple(input_shape or getattr(model, "input_shape"))
    certificate = getattr(model, "certificate", None)
    layers = list(model.children())
    model = export(model)  # measure exactly what the model computes in eval mode
    bounds: list[LayerBound] = []
    shape: tuple[int, ...] = input_shape
    product = 1.0
    param = next(model.parameters())
    for index, (name, layer) in enumerate(model.named_children()):
        last = index == len(layers) - 1
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach().double()
            if last and certificate == "per_logit":
                constant, how = float(weight.norm(dim=1).max()), "max row norm (each logit)"
            else:
                constant, how = float(torch.linalg.matrix_norm(weight, ord=2)), "exact SVD"
        elif isinstance(layer, nn.Conv2d):
            constant, how = operator_norm(layer, shape), "power iteration on the conv operator"
        elif isinstance(layer, nn.MaxPool2d) and layer.kernel_size == layer.stride:
            constant, how = 1.0, "by construction"
        elif isinstance(layer, _ONE_LIPSCHITZ):
            constant, how = 1.0, "by construction"
        else:
            raise TypeError(f"no known Lipschitz constant for layer {index} ({name}): {layer}")
        bounds.append(LayerBound(index, name, constant, how))
        product *= constant
        with torch.no_grad():
            shape = tuple(layer(torch.zeros((1, *shape), dtype=param.dtype, device=param.device)).shape[1:])
    return product, bounds
