"""Harmonia's fast 1-Lipschitz layers (issue #7) against deel-torchlip and the exact bound."""

import copy

import pytest
import torch
import torch.nn.functional as F
from deel.torchlip import GroupSort2 as DeelGroupSort2
from deel.torchlip import ScaledL2NormPool2d, SpectralConv2d, SpectralLinear
from deel.torchlip.normalizers import bjorck_normalization
from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm

from harmonia.models import (
    BjorckConv2d,
    BjorckLinear,
    GroupSort2,
    L2NormPool2d,
    build_model,
    cached_weights,
    export,
    lipschitz_bound,
)
from harmonia.models.orthogonal import BjorckOrthonormal, bjorck_factor

SMALL = {"input_size": 16, "widths": (4, 8), "hidden": 16}
# Every registry Lipschitz model (the options of ``lipschitz_cnn``), small.
REGISTRY_VARIANTS = [
    {},
    {"head": "spectral"},
    {"pool": "invertible"},
    {"depth": 2},
    {"padding_mode": "circular"},
    {"backend": "deel"},
]


def _no_ties(*shape: int) -> torch.Tensor:
    """Random float64 values whose channel pairs never tie."""
    return torch.randn(*shape, dtype=torch.float64)


def test_group_sort2_matches_deel_values_gradients_and_double_backward() -> None:
    x = _no_ties(3, 6, 5, 5).requires_grad_(True)
    weight = torch.randn(6, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for act in (GroupSort2(), DeelGroupSort2()):
        out = act(F.conv2d(x, weight, padding=1))
        g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view(out.shape)
        (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), weight)  # the harmonization loss's path
        results.append((out, gx, gw))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    flat = _no_ties(4, 10)  # dense layers' (N, C) input
    torch.testing.assert_close(GroupSort2()(flat), DeelGroupSort2()(flat), atol=0, rtol=0)
    with pytest.raises(ValueError, match="even C"):
        GroupSort2()(torch.zeros(2, 3))


def test_group_sort2_gradient_is_a_permutation_on_ties() -> None:
    """A tied pair keeps its gradient in place (deel-torchlip's doubles one entry there)."""
    x = torch.zeros(1, 2, 1, 1, requires_grad=True)
    (g,) = torch.autograd.grad(GroupSort2()(x), x, torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
    assert g.flatten().tolist() == [1.0, 2.0]


def test_l2_norm_pool_matches_deel_double_backward() -> None:
    x = _no_ties(2, 3, 9, 9).requires_grad_(True)  # odd size: incomplete windows dropped
    weight = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for pool in (L2NormPool2d(2), ScaledL2NormPool2d(2)):
        out = pool(F.conv2d(x, weight, padding=1))
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), weight)
        results.append((out, gx, gw))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_gram_bjorck_equals_deel_bjorck(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, dtype=torch.float64)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    wide = w if shape[0] <= shape[1] else w.T
    ours = bjorck_factor(wide @ wide.T, 15) @ wide
    # eps=0: deel-torchlip's stopping test never fires, so exactly maxiter steps.
    theirs = bjorck_normalization(w, eps=0.0, maxiter=15)
    torch.testing.assert_close(ours if shape[0] <= shape[1] else ours.T, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "shape, power_iterations, floor",
    [((12, 40), 3, False), ((40, 12), 3, False), ((64, 576), 0, False), ((16, 48), 0, True)],
)
def test_cpu_eigh_factor_equals_the_product_path(shape: tuple[int, int], power_iterations: int, floor: bool) -> None:
    """The CPU's one-eigh factor is the op-by-op Björck factor: values, gradients, power vector."""
    w = torch.randn(*shape, dtype=torch.float64)
    fast = BjorckOrthonormal(w, iterations=12, power_iterations=power_iterations).double()
    if floor:  # σ over 5 decades and u on the smallest direction: the floor sets σ̂
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        w = u @ torch.diag(torch.logspace(3, -2, min(shape), dtype=torch.float64)) @ vh
        fast._u.copy_(u[:, -1])
    slow = copy.deepcopy(fast)
    slow.products = True
    w = (1.3 * w).requires_grad_(True)
    g = torch.randn(min(shape), min(shape), dtype=torch.float64)
    results = []
    for layer in (fast, slow):
        factor = layer.factor(w)
        (grad,) = torch.autograd.grad((factor * g).sum(), w)
        results.append((factor, grad, layer._u.clone()))
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="differentiable once"):  # never a silently wrong Hessian
        torch.autograd.grad((fast.factor(w) * g).sum(), w, create_graph=True)


@pytest.mark.parametrize(
    "ours, theirs, x",
    [
        (lambda: BjorckLinear(40, 12, iterations=15), lambda: SpectralLinear(40, 12, eps_bjorck=1e-30), (5, 40)),
        (lambda: BjorckLinear(12, 40, iterations=15), lambda: SpectralLinear(12, 40, eps_bjorck=1e-30), (70, 12)),
        (
            lambda: BjorckConv2d(3, 8, 3, padding=1, iterations=15),
            lambda: SpectralConv2d(3, 8, 3, padding=1, eps_bjorck=1e-30),
            (5, 3, 8, 8),
        ),
    ],
)
def test_layers_equal_deel_torchlip_layers(ours, theirs, x) -> None:
    """Same raw weight, converged spectral norm, 15 Björck steps each: same output."""
    ours, theirs, x = ours().double(), theirs().double(), torch.randn(*x, dtype=torch.float64)
    raw = 0.3 * torch.randn_like(ours.parametrizations.weight.original)
    with torch.no_grad():
        ours.parametrizations.weight.original.copy_(raw)
        theirs.parametrizations.weight.original.copy_(raw)
    for module in theirs.modules():
        if isinstance(module, _SpectralNorm):
            module.n_power_iterations = 500
    ours.parametrizations.weight[0].power_iterations = 500
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("iterations", [1, 3, 12])
def test_guarantee_holds_with_a_wrong_spectral_estimate(iterations: int) -> None:
    """The floor keeps every singular value ≤ 1 when the power vector misses σ_max entirely."""
    torch.manual_seed(0)
    layer = BjorckLinear(64, 32, iterations=iterations, power_iterations=0)
    raw = layer.parametrizations.weight.original
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(torch.randn(32, 64), full_matrices=False)
        raw.copy_(u @ torch.diag(torch.logspace(3, -2, 32)) @ vh)  # σ spread over 5 decades
        layer.parametrizations.weight[0]._u.copy_(u[:, -1])  # the *smallest* direction
    for mode in (True, False):
        layer.train(mode)
        sigma = torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2).item()
        # The float32 product of the factor with a weight whose σ spans five decades rounds up to
        # ~3e-5 above 1 (over 40 random weights; it depends on the CPU's kernels); without the
        # floor the power vector's miss would give σ of order 1.5^iterations.
        assert sigma <= 1 + 1e-4


def test_factor_path_equals_formed_weight() -> None:
    """``BjorckLinear`` applies its factor to small batches; same result as the formed weight."""
    for layer in (BjorckLinear(300, 20), BjorckLinear(20, 300)):
        layer.eval()
        x = torch.randn(7, layer.in_features)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def _harmonized_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: int = 8) -> None:
    """Cross-entropy + an input-gradient penalty (double backward), as the module's step."""
    x = torch.rand(batch, *model.input_shape, requires_grad=True)
    y = torch.randint(0, 10, (batch,))
    with cached_weights():
        logits = model(x)
        (gx,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
        loss = F.cross_entropy(logits, y) + gx.abs().mean(1).pow(2).mean() + model(x.flip(0)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _bound_of_train_mode_weights(model: nn.Module) -> float:
    """``lipschitz_bound`` of the weights as a *training* forward computes them."""
    plain = export(model)
    model.train()
    with torch.no_grad():
        for (name, source), (_, target) in zip(model.named_children(), plain.named_children()):
            if hasattr(source, "parametrizations"):
                target.weight.copy_(source.weight)
    return lipschitz_bound(plain)[0]


@pytest.mark.parametrize("variant", REGISTRY_VARIANTS, ids=lambda v: ",".join(f"{k}={v}" for k, v in v.items()) or "default")
def test_registry_models_keep_the_bound_through_harmonized_training(variant: dict) -> None:
    model = build_model("lipschitz_cnn", **SMALL, **variant)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # large steps move σ far
    for _ in range(4):
        _harmonized_step(model, optimizer)
    bound, layers = lipschitz_bound(model)
    assert bound <= 1 + 1e-3, layers
    assert any(l.how.startswith("FFT") for l in layers)
    assert _bound_of_train_mode_weights(model) <= 1 + 1e-3
    x = torch.rand(5, *model.input_shape)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(export(model)(x), model(x), atol=1e-5, rtol=0)


def test_cached_weights_orthonormalize_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("lipschitz_cnn", **SMALL, head="spectral")  # (registration runs each once)
    calls = []
    original = BjorckOrthonormal.factor
    monkeypatch.setattr(BjorckOrthonormal, "factor", lambda self, w: calls.append(id(self)) or original(self, w))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    _harmonized_step(model, optimizer)  # two forwards and a double backward
    parametrized = [m for m in model.modules() if isinstance(m, BjorckOrthonormal)]
    assert sorted(calls) == sorted(id(m) for m in parametrized)
    calls.clear()
    model(torch.rand(2, *model.input_shape))  # outside the block: once per forward
    assert len(calls) == len(parametrized)


def test_bf16_autocast_keeps_the_bound_and_bf16_weights_are_refused() -> None:
    model = build_model("lipschitz_cnn", **SMALL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(torch.rand(8, *model.input_shape))
        assert logits.dtype == torch.bfloat16
        # The orthonormalized weight itself stays fp32 under autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model[0].weight.dtype == torch.float32
        loss = F.cross_entropy(logits.float(), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert lipschitz_bound(model)[0] <= 1 + 1e-3
    with pytest.raises(TypeError, match="float32/float64 weights.*bf16"):
        copy.deepcopy(model).to(torch.bfloat16)(torch.rand(2, *model.input_shape, dtype=torch.bfloat16))


def test_conv_refuses_settings_that_void_the_bound() -> None:
    with pytest.raises(ValueError, match="refused"):
        BjorckConv2d(2, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="backend"):
        build_model("lipschitz_cnn", backend="torch")
