"""Explanation metrics on hand-made cases whose values are known, plus shard additivity."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from harmonia.explain import Saliency
from harmonia.metrics import (
    HUMAN_CEILING,
    AverageStability,
    Deletion,
    HumanAlignment,
    Insertion,
    MuFidelity,
    build_metric,
    spearman_rows,
)


class Linear(nn.Module):
    """One logit, ``Σ w · x`` (or ``Σ w · x²`` when ``square``): attributions known in closed form."""

    def __init__(self, weight: torch.Tensor, square: bool = False) -> None:
        super().__init__()
        self.weight, self.square = weight, square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x * x if self.square else x
        return (value * self.weight).flatten(1).sum(1, keepdim=True)


def test_spearman_rows_matches_scipy_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 30), generator=g).float()  # many ties
    b = torch.rand(4, 30, generator=g)
    expected = torch.tensor([spearmanr(a[i], b[i])[0] for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(spearman_rows(a, b), expected)
    assert spearman_rows(torch.ones(1, 5), torch.rand(1, 5)).item() == 0.0  # undefined → 0


def test_alignment_identical_is_one_reversed_is_minus_one() -> None:
    human = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    metric = HumanAlignment()
    metric.update(human * 3 + 1, human)  # same ranking, other scale
    out = metric.compute()
    torch.testing.assert_close(out["spearman"], torch.tensor(1.0))
    torch.testing.assert_close(out["score"], torch.tensor(1 / HUMAN_CEILING))
    metric.reset()
    metric.update(-human, human)
    torch.testing.assert_close(metric.compute()["spearman"], torch.tensor(-1.0))
    metric.reset()
    # has_map: samples without a map are skipped, not scored as zeros
    metric.update(torch.cat([human[:1], -human[1:]]), human, has_map=torch.tensor([True, False, False]))
    torch.testing.assert_close(metric.compute()["spearman"], torch.tensor(1.0))
    metric.reset()
    metric.update(human, human, has_map=torch.zeros(3, dtype=torch.bool))
    assert torch.isnan(metric.compute()["spearman"])
    with pytest.raises(ValueError, match=">= 0"):
        HumanAlignment().update(human, -human)


def test_alignment_is_additive_over_shards_and_works_in_inference_mode() -> None:
    g = torch.Generator().manual_seed(2)
    sal, human = torch.rand(5, 1, 4, 4, generator=g), torch.rand(5, 1, 4, 4, generator=g)
    whole, parts = HumanAlignment(), HumanAlignment()
    whole.update(sal, human)
    with torch.inference_mode():
        parts.update(sal[:2], human[:2])
    parts.update(sal[2:], human[2:])
    torch.testing.assert_close(parts.compute(), whole.compute())


def _ramp() -> tuple[torch.Tensor, nn.Module]:
    """A 2×2 image with pixel values 4, 3, 2, 1 and the model ``Σ pixels``."""
    return torch.tensor([[[[4.0, 3.0], [2.0, 1.0]]]]), Linear(torch.ones(1, 1, 2, 2))


def test_deletion_and_insertion_values_by_hand() -> None:
    x, model = _ramp()
    target = torch.tensor([0])
    deletion, insertion = Deletion(steps=4), Insertion(steps=4)
    deletion.update(model, x, target, x)
    insertion.update(model, x, target, x)
    # deletion curve 10, 6, 3, 1, 0 → trapezoids 8, 4.5, 2, 0.5; insertion 0, 4, 7, 9, 10 → 2, 5.5, 8, 9.5
    torch.testing.assert_close(deletion.curve(), torch.tensor([10.0, 6, 3, 1, 0], dtype=torch.float64))
    torch.testing.assert_close(deletion.compute(), torch.tensor(3.75))
    torch.testing.assert_close(insertion.compute(), torch.tensor(6.25))
    worse = Deletion(steps=4)
    worse.update(model, x, target, -x)  # the reversed ranking deletes the least useful first
    assert worse.compute() > deletion.compute()
    half = Deletion(steps=2, max_percentage_perturbed=0.5, baseline=1.0)
    half.update(model, x, target, x)  # flips 0, 1, 2 pixels to 1: curve 10, 7, 5
    torch.testing.assert_close(half.compute(), torch.tensor((8.5 + 6.0) / 2))


def test_deletion_ties_follow_the_chosen_order_and_random_favours_no_corner() -> None:
    """An all-tied map flips pixels in tie order only; the default spreads every corner over the curve."""
    h = w = 32
    x = torch.ones(1, 1, h, w)
    corner = torch.zeros(1, 1, h, w)
    corner[..., :8, :8] = 1 / 64  # the model reads the mean of the top-left 8×8 corner only
    top_left, bottom_right = Linear(corner), Linear(corner.flip(-1, -2))
    flat = torch.zeros(1, 1, h, w)  # every pixel tied
    target = torch.tensor([0])

    def auc(model: nn.Module, **kwargs) -> float:
        metric = Deletion(steps=8, **kwargs)
        metric.update(model, x, target, flat)
        return float(metric.compute())

    # "first": row-major order deletes the top-left corner with the first 8 rows (steps 1-2 of 8):
    # curve 1, ½, 0, … → 1/8; the bottom-right corner goes last: 1 ×6, ½, 0 → 7/8. "last": mirrored.
    assert auc(top_left, ties="first") == pytest.approx(1 / 8) and auc(bottom_right, ties="last") == pytest.approx(1 / 8)
    assert auc(bottom_right, ties="first") == pytest.approx(7 / 8) and auc(top_left, ties="last") == pytest.approx(7 / 8)
    # "random": the seeded permutation, written out; both corners leave at about the same pace.
    order = torch.randperm(h * w, generator=torch.Generator().manual_seed(5))
    counts = torch.linspace(0, h * w, 9, dtype=torch.float64).long()
    curve = [1 - float(corner.flatten()[order[:c]].sum()) for c in counts]
    expected = sum((a + b) / 2 for a, b in zip(curve[:-1], curve[1:])) / 8
    assert auc(top_left, seed=5) == pytest.approx(expected, rel=1e-5)
    tl, br = auc(top_left), auc(bottom_right)
    assert abs(tl - br) < 0.1 and abs(tl - 0.5) < 0.1 and abs(br - 0.5) < 0.1  # a tied corner lasts half the budget
    # Without ties the order is the explanation's alone.
    ramp = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    values = []
    for ties in ("random", "first", "last"):
        metric = Deletion(steps=8, ties=ties)
        metric.update(top_left, x, target, ramp)
        values.append(float(metric.compute()))
    assert values[0] == values[1] == values[2]
    with pytest.raises(ValueError, match="ties must be one of"):
        Insertion(ties="middle")


def test_mufidelity_of_exact_and_reversed_attributions() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 1, 6, 6, generator=g)
    x = torch.rand(2, 1, 6, 6, generator=g)
    model = Linear(w)
    exact = MuFidelity(grid_size=3, nb_samples=30)
    exact.update(model, x, torch.tensor([0, 0]), w * x)  # the drop of a subset is exactly Σ_S w·x
    torch.testing.assert_close(exact.compute(), torch.tensor(1.0))
    reversed_ = MuFidelity(grid_size=3, nb_samples=30)
    reversed_.update(model, x, torch.tensor([0, 0]), -w * x)
    torch.testing.assert_close(reversed_.compute(), torch.tensor(-1.0))
    # the subsets remove about subset_percent of the cells
    assert 0.1 < exact._removed.mean() < 0.3


def test_stability_values_by_hand() -> None:
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 0])
    linear = Linear(torch.randn(1, 1, 4, 4))
    flat = AverageStability(nb_samples=5)
    flat.update(linear, Saliency("mean"), x, target)  # constant gradient: perfectly stable
    torch.testing.assert_close(flat.compute(), torch.tensor(0.0))
    # Σ x²: the gradient is 2x, so neighbour x + u moves the map by exactly 2u
    square = Linear(torch.ones(1, 1, 4, 4), square=True)
    for distance, fn in {"l2": lambda d: d.norm(), "l1": lambda d: d.abs().sum(), "squared_l2": lambda d: (d * d).sum()}.items():
        metric = AverageStability(radius=0.2, nb_samples=5, distance=distance, seed=9)
        metric.update(square, Saliency("mean"), x, target)
        u = metric.noise((1, 4, 4), x.device, x.dtype)
        assert 0 <= u.min() and u.max() < 0.2
        expected = torch.stack([fn(2 * u[s]) for s in range(5)]).mean()
        torch.testing.assert_close(metric.compute(), expected.float(), rtol=1e-5, atol=1e-6)


def test_build_metric_and_errors() -> None:
    assert isinstance(build_metric("deletion"), Deletion)
    with pytest.raises(ValueError, match="unknown explanation metric 'iou'"):
        build_metric("iou")
    with pytest.raises(ValueError, match="'mufidelity'.*grid"):
        build_metric("mufidelity", grid=3)
    x, model = _ramp()
    with pytest.raises(ValueError, match="explanations are"):
        Deletion().update(model, x, torch.tensor([0]), torch.rand(1, 1, 3, 3))
    with pytest.raises(ValueError, match="NaN"):
        Insertion().update(model, x, torch.tensor([0]), torch.full_like(x, float("nan")))
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(Deletion().compute())
