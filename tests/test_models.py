"""Model registry, Lipschitz layers, export and the Lipschitz bound."""

import math

import pytest
import torch
from deel.torchlip import ScaledL2NormPool2d

from harmonia.models import L2NormPool2d, build_model, conv_norm_bound, export, lipschitz_bound, list_models, operator_norm


def _train_a_little(model: torch.nn.Module, steps: int = 10) -> None:
    """Optimizer steps at the default config's learning rate, so weights move away from init.

    (Adam at 1e-2 already makes deel-torchlip 1.0.5 diverge on the 4096→128 SpectralLinear:
    its single power iteration per forward underestimates σ after a step that moves every
    entry, and Björck then blows up. See README "Known limits".)
    """
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        x = torch.rand(8, *model.input_shape)
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # refresh deel-torchlip's eval-mode cache from the last weights
        model(torch.rand(2, *model.input_shape))


def test_registry_lists_and_builds() -> None:
    names = list_models()
    assert {"lipschitz_cnn", "cnn"} <= set(names)
    assert all(names.values())  # every entry has a description
    model = build_model("cnn", in_channels=3, num_classes=7, input_size=16, widths=(4,))
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        build_model("resnet9")


def test_twins_share_topology() -> None:
    lip, plain = build_model("lipschitz_cnn"), build_model("cnn")
    assert len(lip) == len(plain)
    x = torch.rand(2, 1, 32, 32)
    assert lip(x).shape == plain(x).shape == (2, 10)
    inv = build_model("lipschitz_cnn", pool="invertible", widths=(4, 8), hidden=16)
    assert inv(x).shape == (2, 10)


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_unsafe_padding_is_refused(mode: str) -> None:
    with pytest.raises(ValueError, match="breaks|refused"):
        build_model("lipschitz_cnn", padding_mode=mode)


def test_l2_norm_pool_matches_deel_torchlip() -> None:
    x = torch.randn(4, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    ours, theirs = L2NormPool2d(2)(x), ScaledL2NormPool2d(2)(x)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, x, g)
    (g_theirs,) = torch.autograd.grad(theirs, x, g)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-6)


def test_l2_norm_pool_double_backward_is_finite_on_zero_windows() -> None:
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :4, :4] = torch.randn(2, 3, 4, 4)
    weight = torch.randn(3, 3, 3, 3, requires_grad=True)
    x.requires_grad_(True)
    out = L2NormPool2d(2)(torch.nn.functional.conv2d(x, weight, padding=1)).sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    gx.pow(2).sum().backward()
    assert torch.isfinite(weight.grad).all()


def _dense_norm(layer: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Largest singular value of the layer's linear part, from its dense matrix (float64 SVD)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        dense = (layer(basis) - layer(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1).T
    return torch.linalg.matrix_norm(dense, ord=2).item()


def test_operator_norm_estimate_equals_dense_svd() -> None:
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    shape = (2, 6, 6)
    assert operator_norm(conv, shape) == pytest.approx(_dense_norm(conv, shape), rel=1e-6)


# Every padding mode × stride, with kernels, paddings, dilations, groups and input sizes that
# exercise the bound's cases (odd sizes, strides that do not divide the size, "same", valid).
CONV_CASES = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 2, "padding": 1},
    {"kernel_size": 3, "padding": 0},
    {"kernel_size": 3, "padding": 2, "dilation": 2},
    {"kernel_size": 3, "padding": 1, "groups": 2},
    {"kernel_size": 5, "padding": 2},
]


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(6, 6), (7, 5)])
def test_conv_norm_bound_is_above_the_exact_norm(padding_mode: str, stride: int, size: tuple[int, int]) -> None:
    torch.manual_seed(stride * 10 + size[1])
    for case in CONV_CASES:
        conv = torch.nn.Conv2d(4, 6, stride=stride, padding_mode=padding_mode, **case).double()
        shape = (4, *size)
        exact = _dense_norm(conv, shape)
        bound, how = conv_norm_bound(conv, shape)
        assert bound >= exact * (1 - 1e-12), (case, bound, exact, how)
        # never absurdly loose: the padding map of circular/reflect/replicate costs at most 2
        assert bound <= exact * (2.2 if padding_mode == "zeros" else 4.5), (case, bound, exact, how)


def test_conv_norm_bound_is_tight_where_it_is_exact() -> None:
    torch.manual_seed(0)
    # A size-keeping circular convolution *is* a circular convolution: the FFT gives its norm.
    for stride in (1, 2):
        conv = torch.nn.Conv2d(3, 5, 3, padding=1, stride=stride, padding_mode="circular").double()
        exact = _dense_norm(conv, (3, 8, 8))
        assert conv_norm_bound(conv, (3, 8, 8))[0] == pytest.approx(exact, rel=1e-10)
    # Zero padding: the torus is the padded image; on a real image size the bound is close.
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, padding_mode="zeros", groups=1, bias=True).double()
    exact = _dense_norm(conv, (3, 14, 14))
    bound, how = conv_norm_bound(conv, (3, 14, 14))
    assert exact <= bound <= 1.03 * exact and "16×16 torus" in how
    # Channel counts of the input shape must fit.
    with pytest.raises(ValueError, match="does not fit"):
        conv_norm_bound(conv, (4, 14, 14))


def test_lipschitz_bound_certifies_where_the_power_iteration_falls_short() -> None:
    """A convolution whose top singular values cluster: a short power iteration stops low."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 3))
    result = lipschitz_bound(model, (2, 8, 8))
    conv_exact = _dense_norm(model[0].double(), (2, 8, 8))
    model.float()
    linear_exact = torch.linalg.matrix_norm(model[3].weight.double(), ord=2).item()
    conv, _, _, linear = result.layers
    assert conv.bound >= conv_exact * (1 - 1e-7) and conv.estimate <= conv_exact * (1 + 1e-5)
    assert conv.constant == conv.bound  # the name the callers read is the certified one
    assert linear.estimate == linear.bound == pytest.approx(linear_exact, rel=1e-12)  # dense layers: exact
    bound, layers = result  # unpacks as before: the certified product first
    assert bound == pytest.approx(conv.bound * linear.bound) and result.estimate <= bound
    assert operator_norm(model[0], (2, 8, 8), iterations=2) < conv_exact * (1 - 1e-4)  # what a short iteration would certify
    cheap = lipschitz_bound(model, (2, 8, 8), estimate=False)  # the bound alone, no power iteration
    assert cheap.bound == pytest.approx(bound, rel=1e-12) and math.isnan(cheap.estimate)


@pytest.mark.parametrize("kwargs", [{}, {"pool": "invertible", "widths": (8, 16)}, {"head": "spectral"}, {"depth": 2, "widths": (16, 16)}])
def test_export_matches_and_bound_holds_after_training(kwargs: dict) -> None:
    model = build_model("lipschitz_cnn", **kwargs)
    _train_a_little(model)
    plain = export(model)
    assert not any("parametrizations" in n for n, _ in plain.named_parameters())
    x = torch.rand(16, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=0)
    bound, layers = lipschitz_bound(model)
    assert bound <= 1 + 1e-3, layers
    assert any(l.how.startswith("FFT") for l in layers)
    assert all(l.estimate <= l.bound * (1 + 1e-5) for l in layers)


def test_export_does_not_share_memory_with_source() -> None:
    model = build_model("lipschitz_cnn", widths=(4, 8), hidden=16)
    model(torch.rand(2, 1, 32, 32))
    plain = export(model)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        before = plain(x).clone()
    _train_a_little(model, steps=2)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before)


def test_bound_detects_an_unconstrained_network() -> None:
    model = build_model("cnn")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    bound, _ = lipschitz_bound(model, (1, 32, 32))
    assert bound > 1.5


def test_bound_refuses_unknown_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softplus())
    with pytest.raises(TypeError, match="no known Lipschitz constant"):
        lipschitz_bound(model, (4,))


@pytest.mark.parametrize("lr", [2e-3, 1e-2])
def test_lipschitz_training_stays_finite(lr: float) -> None:
    """Regression: with one power iteration per forward, Adam diverged to NaN within 3 steps."""
    model = build_model("lipschitz_cnn")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(torch.rand(8, 1, 32, 32)), torch.randint(0, 10, (8,)))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
