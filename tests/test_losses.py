"""Harmonization loss against an independent NumPy transcription of the reference."""

import numpy as np
import pytest
import torch

from harmonia.explain import Saliency
from harmonia.losses import HKR, CrossEntropy, Harmonization, TauCrossEntropy, gaussian_pyramid, standardize_cut
from harmonia.optim import decayed_parameters
from harmonia.models import build_model


def np_standardize_cut(m: np.ndarray) -> np.ndarray:
    out = (m - m.mean()) / (m.std() + 1e-5)  # np.std is the population std, like TF
    return np.maximum(out, 0.0)


def np_same_downsample(m: np.ndarray) -> np.ndarray:
    """TF conv2d(stride 2, padding SAME) with the 5x5 binomial kernel, written with loops."""
    k1 = np.array([1, 4, 6, 4, 1], dtype=np.float64)
    kernel = np.outer(k1, k1) / 256.0
    h, w = m.shape
    oh, ow = -(-h // 2), -(-w // 2)
    pad_h, pad_w = max((oh - 1) * 2 + 5 - h, 0), max((ow - 1) * 2 + 5 - w, 0)
    top, left = pad_h // 2, pad_w // 2
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            acc = 0.0
            for a in range(5):
                for b in range(5):
                    y, x = i * 2 + a - top, j * 2 + b - left
                    if 0 <= y < h and 0 <= x < w:
                        acc += kernel[a, b] * m[y, x]
            out[i, j] = acc
    return out


def np_harmonization(sal: np.ndarray, human: np.ndarray, tokens: np.ndarray, levels: int = 5, first: int = 0) -> float:
    """The reference's per-batch number: mean over levels of mean_{N,H,W}(diff² · token)
    (levels ``first..levels-1``; the reference compares all, ``first = 0``)."""
    s = np.stack([np_standardize_cut(m) for m in sal])
    h = np.stack([np_standardize_cut(m) for m in human])
    h = h / (h.max(axis=(1, 2), keepdims=True) + 1e-6) * (s.max(axis=(1, 2), keepdims=True) + 1e-6)
    total = 0.0
    for level in range(levels):
        if level >= first:
            total += np.mean((s - h) ** 2 * tokens[:, None, None])
        s = np.stack([np_same_downsample(m) for m in s])
        h = np.stack([np_same_downsample(m) for m in h])
    return total / (levels - first)


def test_standardize_cut_hand_case() -> None:
    m = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # mean 1.5, population std sqrt(1.25)
    expected = torch.relu((m - 1.5) / (1.25 ** 0.5 + 1e-5))
    torch.testing.assert_close(standardize_cut(m), expected)


@pytest.mark.parametrize("size", [16, 17, 32])
def test_pyramid_matches_tf_same_padding(size: int) -> None:
    m = torch.rand(1, 1, size, size, dtype=torch.float64)
    levels = gaussian_pyramid(m, 3)
    ref = m[0, 0].numpy()
    for level in levels[1:]:
        ref = np_same_downsample(ref)
        np.testing.assert_allclose(level[0, 0].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("size", [16, 32])
def test_loss_equals_reference_transcription(size: int) -> None:
    g = torch.Generator().manual_seed(1)
    sal = torch.randn(4, 1, size, size, generator=g, dtype=torch.float64)
    human = torch.rand(4, 1, size, size, generator=g, dtype=torch.float64)
    tokens = np.array([1.0, 0.0, 1.0, 1.0])
    expected = np_harmonization(sal[:, 0].numpy(), human[:, 0].numpy(), tokens)
    mapped = torch.tensor([0, 2, 3])
    got = Harmonization(token_normalization="batch")(sal[mapped], human[mapped], batch_size=4)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    mapped_only = Harmonization(token_normalization="mapped")(sal[mapped], human[mapped])
    assert mapped_only.item() == pytest.approx(expected * 4 / 3, rel=1e-10)


def test_first_level_compares_only_the_coarser_levels() -> None:
    g = torch.Generator().manual_seed(2)
    sal = torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    human = torch.rand(3, 1, 32, 32, generator=g, dtype=torch.float64)
    expected = np_harmonization(sal[:, 0].numpy(), human[:, 0].numpy(), np.ones(3), first=2)
    assert Harmonization(first_level=2)(sal, human).item() == pytest.approx(expected, rel=1e-10)
    assert expected != pytest.approx(np_harmonization(sal[:, 0].numpy(), human[:, 0].numpy(), np.ones(3)))
    with pytest.raises(ValueError, match="first_level"):
        Harmonization(levels=5, first_level=5)


def test_identical_maps_give_zero_loss() -> None:
    m = torch.rand(3, 1, 16, 16)
    assert Harmonization()(m, m).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("kind", ["zeros", "constant"])
def test_degenerate_maps_are_finite(kind: str) -> None:
    human = torch.zeros(2, 1, 16, 16) if kind == "zeros" else torch.full((2, 1, 16, 16), 0.7)
    sal = torch.randn(2, 1, 16, 16, requires_grad=True)
    loss = Harmonization()(sal, human)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sal.grad).all()
    # a constant saliency is as degenerate and must stay finite too
    flat = torch.zeros(2, 1, 16, 16, requires_grad=True)
    loss = Harmonization()(flat, torch.rand(2, 1, 16, 16))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(flat.grad).all()


def test_bad_maps_raise_clear_errors() -> None:
    loss = Harmonization()
    sal = torch.rand(2, 1, 8, 8)
    nan = torch.rand(2, 1, 8, 8)
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*samples \[1\]"):
        loss(sal, nan)
    neg = torch.rand(2, 1, 8, 8)
    neg[0, 0, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"negative.*samples \[0\]"):
        loss(sal, neg)
    with pytest.raises(ValueError, match="does not match"):
        loss(sal, torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(N,1,H,W\)"):
        loss(sal, torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="token_normalization"):
        Harmonization(token_normalization="tokens")


@pytest.mark.parametrize("arch", ["lipschitz_cnn", "cnn"])
def test_harmonization_gradient_reaches_parameters(arch: str) -> None:
    model = build_model(arch, widths=(8, 8), hidden=16)
    x = torch.rand(4, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    sal = Saliency(score="logit", reduction="mean", create_graph=True).attribute(model, x, y)
    loss = Harmonization()(sal, torch.rand(4, 1, 32, 32))
    loss.backward()
    # biases of piecewise-linear layers may get no or zero gradient (the saliency of a ReLU
    # net does not depend on the last bias); whatever arrives must be finite
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # every weight tensor (conv and dense) receives signal from the saliency term alone
    weights = [p for n, p in model.named_parameters() if "weight" in n or "original" in n]
    assert all(p.grad.abs().sum() > 0 for p in weights)


def test_objectives() -> None:
    logits = torch.randn(6, 10)
    labels = torch.randint(0, 10, (6,))
    ce = CrossEntropy(label_smoothing=0.1)(logits, labels)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    tau = TauCrossEntropy(tau=5.0)(logits, labels)
    torch.testing.assert_close(tau, torch.nn.functional.cross_entropy(5 * logits, labels) / 5)
    assert torch.isfinite(HKR(alpha=0.9, min_margin=0.5)(logits, labels))
    with pytest.raises(ValueError, match="alpha"):
        HKR(alpha=10.0)


def test_weight_decay_groups_skip_normalization() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = decayed_parameters(model)
    assert {id(p) for p in no_decay} == {id(model[1].weight), id(model[1].bias)}
    assert len(decay) == 4
