"""Attribution methods: equal to plain-autograd references, batch-size free, deterministic, harmless."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harmonia.explain import (
    IntegratedGradients,
    Saliency,
    SmoothGrad,
    SobolAttribution,
    build_explainer,
    list_explainers,
)
from harmonia.explain.plot import saliency_grid
from harmonia.explain.sobol import box_blur


def _model(smooth: bool = False) -> nn.Module:
    """A small 3-channel CNN with 5 classes (Softplus when the test needs a smooth function)."""
    torch.manual_seed(0)
    act, pool = (nn.Softplus(), nn.AvgPool2d(2)) if smooth else (nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act, pool, nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()


def _batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 8, 8, generator=g), torch.tensor([0, 3, 4, 1, 2][:n])


def _grad(model: nn.Module, image: torch.Tensor, target: int) -> torch.Tensor:
    """Reference: ∂ logit_target / ∂ image for one image, by plain autograd."""
    x = image.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x[None])[0, target], x)
    return g


def test_saliency_equals_reference() -> None:
    model, (x, y) = _model(), _batch()
    expected = torch.stack([_grad(model, x[i], int(y[i])).abs().amax(0, keepdim=True) for i in range(3)])
    torch.testing.assert_close(Saliency().attribute(model, x, y), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Saliency().attribute(model, x, y), expected, atol=1e-5, rtol=1e-5)
    signed = torch.stack([_grad(model, x[i], int(y[i])).mean(0, keepdim=True) for i in range(3)])
    torch.testing.assert_close(Saliency("mean").attribute(model, x, y), signed, atol=1e-5, rtol=1e-5)


def test_smoothgrad_equals_reference_with_fixed_noise() -> None:
    model, (x, y) = _model(), _batch()
    nb, sigma, seed = 6, 0.3, 7
    noise = torch.randn(nb, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * sigma  # the documented draw
    expected = torch.stack(
        [torch.stack([_grad(model, x[i] + noise[s], int(y[i])) for s in range(nb)]).mean(0).mean(0, keepdim=True) for i in range(3)]
    )
    got = SmoothGrad(nb_samples=nb, noise=sigma, seed=seed, batch_size=4).attribute(model, x, y)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, SmoothGrad(nb_samples=nb, noise=sigma, seed=seed + 1).attribute(model, x, y))


@pytest.mark.parametrize("rule", ["trapezoid", "middle"])
def test_integrated_gradients_equals_reference_and_reports_completeness(rule: str) -> None:
    model, (x, y) = _model(smooth=True), _batch()
    steps, baseline = 16, 0.1
    if rule == "trapezoid":
        alphas, weights = torch.linspace(0, 1, steps), torch.full((steps,), 1 / (steps - 1))
        weights[[0, -1]] /= 2
    else:
        alphas, weights = (torch.arange(steps) + 0.5) / steps, torch.full((steps,), 1 / steps)
    expected, gaps = [], []
    for i in range(3):
        b = torch.full_like(x[i], baseline)
        avg = sum(w * _grad(model, b + a * (x[i] - b), int(y[i])) for a, w in zip(alphas, weights))
        expected.append(((x[i] - b) * avg).sum(0, keepdim=True))
        with torch.no_grad():
            gaps.append(model(x[i : i + 1])[0, y[i]] - model(b[None])[0, y[i]])
    expected = torch.stack(expected)
    ig = IntegratedGradients(steps=steps, baseline=baseline, rule=rule, batch_size=5)
    maps, error = ig.attribute_with_error(model, x, y)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ig.attribute(model, x, y), maps)
    torch.testing.assert_close(error, expected.sum(dim=(1, 2, 3)) - torch.stack(gaps), atol=1e-5, rtol=1e-4)
    # on a smooth model the quadrature converges: completeness error shrinks with more steps
    fine = IntegratedGradients(steps=128, baseline=baseline, rule=rule).attribute_with_error(model, x, y)[1]
    assert fine.abs().max() < error.abs().max() and fine.abs().max() < 1e-3 * torch.stack(gaps).abs().max()


def _quadrant_model() -> nn.Module:
    """Class 1's logit depends only on the top-left quadrant (nonlinearly); class 0 on nothing."""

    class Quadrant(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            tl = x[:, :, : h // 2, : w // 2].flatten(1)
            score = torch.tanh(tl @ torch.linspace(-1, 2, tl.shape[1]) * (4 / tl.shape[1]))
            return torch.stack([torch.zeros_like(score), score], dim=1)

    return Quadrant().eval()


@pytest.mark.parametrize("perturbation", ["inpainting", "blurring", "amplitude"])
def test_sobol_recovers_the_important_quadrant(perturbation: str) -> None:
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.5
    maps = SobolAttribution(grid_size=8, nb_design=16, perturbation=perturbation).attribute(_quadrant_model(), x, torch.tensor([1, 1]))
    assert maps.shape == (2, 1, 32, 32)
    for m in maps[:, 0].abs():
        # Cell indices outside the quadrant are exactly 0; bicubic resizing spreads a cell's
        # value over about one neighbouring cell (4 px), and no further.
        assert m[:16, :16].sum() / m.sum() > 0.75, perturbation
        assert m[:20, :20].sum() / m.sum() > 0.98, perturbation
        assert m[22:].max() < 1e-6 and m[:, 22:].max() < 1e-6
        assert m[:16, :16].min() > 0


def test_sobol_counts_forwards_and_ignores_batch_size() -> None:
    model, (x, y) = _model(), _batch()
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    sobol = SobolAttribution(grid_size=4, nb_design=8, batch_size=50)
    a = sobol.attribute(model, x, y)
    assert sum(calls) == 3 * sobol.forwards_per_image == 3 * 8 * (16 + 2) and max(calls) == 50
    for batch_size in (1, 7, 1000):
        torch.testing.assert_close(SobolAttribution(grid_size=4, nb_design=8, batch_size=batch_size).attribute(model, x, y), a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(SobolAttribution(grid_size=4, nb_design=8).attribute(model, x[1:2], y[1:2]), a[1:2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["saliency", "smoothgrad", "integrated_gradients"])
def test_gradient_methods_ignore_batch_size_and_order(name: str) -> None:
    model, (x, y) = _model(), _batch(5)
    kwargs = {"smoothgrad": {"nb_samples": 5}, "integrated_gradients": {"steps": 6}}.get(name, {})
    full = build_explainer(name, batch_size=64, **kwargs).attribute(model, x, y)
    for batch_size in (1, 4):
        torch.testing.assert_close(build_explainer(name, batch_size=batch_size, **kwargs).attribute(model, x, y), full, atol=1e-6, rtol=1e-5)
    order = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(build_explainer(name, **kwargs).attribute(model, x[order], y[order]), full[order], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["saliency", "smoothgrad", "integrated_gradients", "sobol"])
@pytest.mark.parametrize("training", [False, True])
def test_methods_keep_mode_leave_no_grads_and_escape_inference_mode(name: str, training: bool) -> None:
    model, (x, y) = _model(), _batch()
    model.train(training)
    model[0].eval()  # a mixed state must survive as it is
    kwargs = {"smoothgrad": {"nb_samples": 3}, "integrated_gradients": {"steps": 3}, "sobol": {"grid_size": 2, "nb_design": 4}}.get(name, {})
    reference = build_explainer(name, **kwargs).attribute(model, x, y)
    with torch.inference_mode():
        inside = build_explainer(name, **kwargs).attribute(model, x.clone(), y.clone())
    assert not inside.is_inference()
    torch.testing.assert_close(inside, reference)
    assert [m.training for m in model.modules()] == [training, False] + [training] * 4
    assert all(p.grad is None for p in model.parameters())


def test_box_blur_matches_opencv_semantics() -> None:
    """cv2.blur(x, (k, k)): window [-k//2, k - k//2 - 1], BORDER_REFLECT_101 (written out here)."""
    x = torch.rand(1, 2, 12, 9, generator=torch.Generator().manual_seed(3))
    k = 4
    a = x[0].numpy()
    reflect = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)  # noqa: E731
    expected = np.zeros_like(a)
    for r in range(12):
        for c in range(9):
            rows = [reflect(r + d, 12) for d in range(-(k // 2), k - k // 2)]
            cols = [reflect(c + d, 9) for d in range(-(k // 2), k - k // 2)]
            expected[:, r, c] = a[:, rows][:, :, cols].mean(axis=(1, 2))
    torch.testing.assert_close(box_blur(x, k)[0], torch.from_numpy(expected), atol=1e-6, rtol=1e-6)


def test_registry_and_bad_input_errors() -> None:
    assert set(list_explainers()) == {"saliency", "smoothgrad", "integrated_gradients", "sobol", "eva", "certified_regions"}
    assert isinstance(build_explainer("sobol", nb_design=8), SobolAttribution)
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'"):
        build_explainer("gradcam")
    with pytest.raises(TypeError, match="'sobol'"):
        build_explainer("sobol", grid=3)
    with pytest.raises(ValueError, match="power-of-two"):
        SobolAttribution(nb_design=12)
    with pytest.raises(ValueError, match="reduction"):
        Saliency("median")
    model, (x, y) = _model(), _batch()
    with pytest.raises(ValueError, match="target must have shape"):
        Saliency().attribute(model, x, y[:2])
    with pytest.raises(ValueError, match="N,C,H,W"):
        Saliency().attribute(model, x[0], y)
    assert Saliency().attribute(model, x[:0], y[:0]).shape == (0, 1, 8, 8)


def test_saliency_grid_layout() -> None:
    x, _ = _batch(2)
    maps = {"human": torch.rand(2, 1, 8, 8), "saliency": torch.zeros(2, 1, 8, 8)}
    grid = saliency_grid(x, maps, ["y 0 / p 0", "y 3 / p 1"], min_tile=32)
    from harmonia.explain.plot import LINE, wrap_title

    header = 2 + LINE * max(len(wrap_title(t, 28)) for t in ("image", *maps))  # titles wrap at a 32-px tile
    assert grid.shape == (3, header + 2 * 34, 56 + 3 * 34) and 0 <= grid.min() and grid.max() <= 1
    # an all-zero map leaves the (dimmed) image untouched: no colour where nothing matters
    tile = grid[:, header : header + 32, 56 + 2 * 34 : 56 + 2 * 34 + 32]
    torch.testing.assert_close(tile[:, 8:24, 8:24], torch.nn.functional.interpolate(x[:1], scale_factor=4)[0][:, 8:24, 8:24] * 0.6, atol=2 / 255, rtol=0)
    with pytest.raises(ValueError, match="map 'human'"):
        saliency_grid(x, {"human": torch.rand(3, 1, 8, 8)})


# --- Reference fidelity of Sobol attribution (Xplique 2.0.2: tf.math.sobol_sample + tf.image.resize bicubic)

# tf.math.sobol_sample(8, 4): the unscrambled Sobol sequence (Joe-Kuo directions) from its
# *second* point on, written out.
TF_SOBOL_8x4 = [
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    [0.75, 0.25, 0.25, 0.25, 0.75, 0.75, 0.25, 0.75],
    [0.25, 0.75, 0.75, 0.75, 0.25, 0.25, 0.75, 0.25],
    [0.375, 0.375, 0.625, 0.875, 0.375, 0.125, 0.375, 0.875],
]


def _keys(t: float, a: float = -0.5) -> float:
    """Keys' cubic kernel, written out from its definition."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _tf_bicubic_by_hand(in_size: int, out_size: int) -> np.ndarray:
    """Half-pixel centres, 4 taps, out-of-image taps dropped, weights renormalized (one axis)."""
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * in_size / out_size - 0.5
        base = int(np.floor(centre))
        taps = {j: _keys(centre - j) for j in range(base - 1, base + 3) if 0 <= j < in_size}
        total = sum(taps.values())
        for j, w in taps.items():
            m[i, j] = w / total
    return m


def test_qmc_design_skips_the_origin_like_tf_sobol_sample_and_keeps_it_for_halton() -> None:
    from scipy.stats import qmc

    from harmonia.explain.sensitivity import qmc_design

    # tf.math.sobol_sample(2, 2) = [[0.5, 0.5], [0.75, 0.25]]: A = first column, B = second.
    design = qmc_design(2, 1).double()
    torch.testing.assert_close(design[:4, 0], torch.tensor([0.5, 0.75, 0.5, 0.25], dtype=torch.float64))
    design = qmc_design(4, 4).double()
    points = torch.tensor(TF_SOBOL_8x4, dtype=torch.float64)
    a, b = points[:, :4], points[:, 4:]
    torch.testing.assert_close(design[:4], a)
    torch.testing.assert_close(design[4:8], b)
    for i in range(4):  # C_i: A with column i from B
        c = a.clone()
        c[:, i] = b[:, i]
        torch.testing.assert_close(design[8 + 4 * i : 12 + 4 * i], c)
    # The origin comes back on request; Halton (CRAFT's reference, SciPy) keeps it by default.
    assert qmc_design(4, 4, skip_first=False)[0].abs().max() == 0
    halton = torch.from_numpy(qmc.Halton(8, scramble=False).random(4))
    torch.testing.assert_close(qmc_design(4, 4, "halton")[:4].double(), halton[:, :4], atol=1e-7, rtol=0)


@pytest.mark.parametrize(("in_size", "out_size"), [(2, 4), (8, 32), (3, 7), (5, 3), (4, 4)])
def test_tf_bicubic_weights_equal_the_formula(in_size: int, out_size: int) -> None:
    from harmonia.explain.sobol import tf_bicubic_weights

    got = tf_bicubic_weights(in_size, out_size).numpy()
    # TF rounds the sub-pixel offset to 1/1024: exact for these power-of-two ratios, ≤ 2e-3 off otherwise.
    exact = (in_size / out_size) in (0.5, 0.25, 1.0)
    np.testing.assert_allclose(got, _tf_bicubic_by_hand(in_size, out_size), atol=1e-12 if exact else 2e-3, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def test_tf_bicubic_equals_pillow_and_differs_from_torch_bicubic() -> None:
    """Pillow's bicubic (Keys a = −0.5, edge taps dropped and renormalized) is an independent implementation."""
    from PIL import Image

    from harmonia.explain.sobol import resize_map

    grid = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = resize_map(grid, (32, 32))[0, 0].numpy()
    pil = np.asarray(Image.fromarray(grid[0, 0].numpy().astype(np.float32), mode="F").resize((32, 32), Image.BICUBIC))
    np.testing.assert_allclose(ours, pil, atol=1e-5, rtol=0)
    torch_bicubic = resize_map(grid, (32, 32), "torch_bicubic")[0, 0].numpy()
    assert np.abs(torch_bicubic - ours).max() > 0.02 * np.abs(ours).max()


def test_sobol_map_on_a_2x2_grid_equals_a_hand_computation() -> None:
    """Xplique's defaults (design without the origin, inpainting, Jansen, TF bicubic) by hand."""
    coef = torch.tensor([1.5, -0.7, 0.4, 1.1])

    class CellModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cells = F.avg_pool2d(x, 2).flatten(1)  # (N, 4): the 2×2 cells of a 4×4 image
            score = torch.tanh(cells @ coef) + cells[:, 0] * cells[:, 3]
            return torch.stack([torch.zeros_like(score), score], dim=1)

    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)) + 0.5
    got = SobolAttribution(grid_size=2, nb_design=4).attribute(CellModel().eval(), x, torch.tensor([1]))[0, 0].double().numpy()

    xbar = F.avg_pool2d(x.double(), 2).flatten().numpy()  # inpainting x·m scales cell i by m_i
    c = coef.double().numpy()

    def f(m: np.ndarray) -> np.ndarray:
        cells = m * xbar
        return np.tanh(cells @ c) + cells[:, 0] * cells[:, 3]

    points = np.array(TF_SOBOL_8x4)
    a, b = points[:, :4], points[:, 4:]
    f_a, var = f(a), f(a).var(ddof=1)
    st = np.empty(4)
    for i in range(4):
        c_i = a.copy()
        c_i[:, i] = b[:, i]
        st[i] = ((f_a - f(c_i)) ** 2).sum() / (2 * 4 * var)
    r = _tf_bicubic_by_hand(2, 4)
    expected = r @ st.reshape(2, 2) @ r.T
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # The design's origin and PyTorch's bicubic are what the reference does not do: both move the map.
    origin = SobolAttribution(grid_size=2, nb_design=4, skip_first_point=False).attribute(CellModel().eval(), x, torch.tensor([1]))
    torch_cubic = SobolAttribution(grid_size=2, nb_design=4, resize="torch_bicubic").attribute(CellModel().eval(), x, torch.tensor([1]))
    assert np.abs(origin[0, 0].numpy() - expected).max() > 1e-3
    assert np.abs(torch_cubic[0, 0].numpy() - expected).max() > 1e-3
    with pytest.raises(ValueError, match="unknown resize 'bilinear'"):
        SobolAttribution(resize="bilinear")


def test_grid_column_titles_are_wrapped_never_cut() -> None:
    from PIL import ImageFont

    from harmonia.explain.plot import wrap_title

    font = ImageFont.load_default()
    for title in ("image", "integrated_gradients", "certified_regions", "x" * 40):
        lines = wrap_title(title, 60)
        assert "".join(lines) == title and all(font.getlength(line) <= 60 for line in lines)
    images = torch.rand(2, 1, 32, 32)
    short = saliency_grid(images, {"ig": torch.rand(2, 1, 32, 32)})
    long = saliency_grid(images, {"integrated_gradients": torch.rand(2, 1, 32, 32)})
    assert long.shape[1] > short.shape[1]  # a second title line makes the header taller
