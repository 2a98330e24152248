"""Certified robust accuracy: analytic values on hand-built 1-Lipschitz linear models."""

import math

import pytest
import torch
from torch import nn

from harmonia.metrics import CertifiedAccuracy, certified_radius
from harmonia.models import build_model


class _Linear(nn.Module):
    """A fixed linear classifier with a declared certificate."""

    def __init__(self, weight: torch.Tensor, certificate: str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.certificate = certificate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


# Signed distances t of 2-D points to the decision boundary, and their labels: a point is
# predicted class 0 when t > 0; the last two are misclassified.
DISTANCES = torch.tensor([0.05, 0.15, 0.3, 0.6, 1.2, -0.2, -0.4, 0.5])
LABELS = torch.tensor([0, 0, 0, 1, 0, 1, 1, 1])
EPSILONS = [0.0, 0.1, 0.25, 0.5, 1.0]
# Correct points: t = 0.05, 0.15, 0.3, 1.2 (class 0) and -0.2, -0.4 (class 1); |t| ≥ ε:
EXPECTED = torch.tensor([6, 5, 3, 1, 1]) / 8


def test_vector_certificate_on_an_isometry_is_exact() -> None:
    """f(x) = x (identity, a 1-Lipschitz vector map): boundary x₁ = x₂, distance |x₁ − x₂|/√2."""
    normal, along = torch.tensor([1.0, -1.0]) / math.sqrt(2), torch.tensor([1.0, 1.0]) / math.sqrt(2)
    x = DISTANCES[:, None] * normal + torch.randn(len(DISTANCES), 1) * along
    model = _Linear(torch.eye(2), "vector")
    logits = model(x)
    torch.testing.assert_close(certified_radius(logits, "vector"), DISTANCES.abs())
    metric = CertifiedAccuracy.for_model(model, EPSILONS)
    metric.update(logits[:3], LABELS[:3])  # accumulates over batches
    metric.update(logits[3:], LABELS[3:])
    torch.testing.assert_close(metric.compute(), EXPECTED)


def test_per_logit_certificate_on_unit_rows_is_exact() -> None:
    """f(x) = (x₁, −x₁): each logit 1-Lipschitz (rows of norm 1); boundary x₁ = 0, distance |x₁|."""
    x = torch.stack([DISTANCES, torch.randn(len(DISTANCES))], dim=1)
    model = _Linear(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), "per_logit")
    logits = model(x)
    torch.testing.assert_close(certified_radius(logits, "per_logit"), DISTANCES.abs())
    metric = CertifiedAccuracy.for_model(model, EPSILONS)
    metric.update(logits, LABELS)
    torch.testing.assert_close(metric.compute(), EXPECTED)
    # the vector formula would overstate the radius of this model (it is √2-Lipschitz as a vector map)
    assert (certified_radius(logits, "vector") > DISTANCES.abs() + 1e-6).all()
    # a measured constant L above 1 shrinks every radius by L
    torch.testing.assert_close(certified_radius(logits, "per_logit", lipschitz_constant=2.0), DISTANCES.abs() / 2)


def test_models_without_a_certificate_are_refused() -> None:
    with pytest.raises(ValueError, match="carries no Lipschitz certificate"):
        CertifiedAccuracy.for_model(build_model("cnn", widths=[4, 4], hidden=8), [0.1])
    with pytest.raises(ValueError, match="unknown certificate"):
        CertifiedAccuracy.for_model(_Linear(torch.eye(2), "l_inf"), [0.1])
    with pytest.raises(ValueError, match="epsilons"):
        CertifiedAccuracy([-0.1], "vector")


def test_certified_radius_holds_on_the_lipschitz_cnn() -> None:
    """Moving each input 0.99 × its radius along the margin's steepest descent never flips it."""
    model = build_model("lipschitz_cnn", widths=[4, 8], hidden=16).eval()
    model.train()(torch.rand(2, 1, 32, 32))  # Björck weights are cached by a training forward
    model.eval()
    x = torch.rand(16, 1, 32, 32, requires_grad=True)
    logits = model(x)
    top = logits.topk(2, dim=1).indices
    margin = logits.gather(1, top[:, :1]) - logits.gather(1, top[:, 1:])
    (grad,) = torch.autograd.grad(margin.sum(), x)
    radius = certified_radius(logits.detach(), model.certificate)
    step = -grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * (0.99 * radius).view(-1, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(model(x + step).argmax(1), logits.argmax(1))
