"""RRR penalty (Ross et al. 2017) and the saliency options of AlignedClassifier."""

import pytest
import torch

from harmonia.data import Sample
from harmonia.explain import Saliency, class_score
from harmonia.losses import Harmonization, RightReasons, irrelevance_mask
from harmonia.module import AlignedClassifier

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def test_rrr_hand_case() -> None:
    # one 1×2×2 map: relevant at the top-left pixel only
    human = torch.tensor([[[[2.0, 0.0], [1.0, 0.0]]]])
    mask = irrelevance_mask(human)
    torch.testing.assert_close(mask, torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]]), atol=1e-6, rtol=0)
    grad = torch.tensor([[[[5.0, 1.0], [2.0, -3.0]]]])
    # (0·5)² + (1·1)² + (0.5·2)² + (1·-3)² = 0 + 1 + 1 + 9
    assert RightReasons()(grad, human).item() == pytest.approx(11.0, rel=1e-5)
    # batch normalization divides the summed penalties by the batch size, mapped by M
    two = torch.cat([grad, 2 * grad])
    maps = human.expand(2, -1, -1, -1)
    assert RightReasons(token_normalization="batch")(two, maps, batch_size=5).item() == pytest.approx((11 + 44) / 5, rel=1e-5)
    assert RightReasons(token_normalization="mapped")(two, maps, batch_size=5).item() == pytest.approx((11 + 44) / 2, rel=1e-5)


def test_rrr_zero_map_penalizes_everything_and_bad_maps_raise() -> None:
    grad = torch.randn(2, 3, 4, 4)
    assert RightReasons()(grad, torch.zeros(2, 1, 4, 4)).item() == pytest.approx(grad.pow(2).sum().item() / 2, rel=1e-5)
    bad = torch.rand(2, 1, 4, 4)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*samples \[1\]"):
        RightReasons()(grad, bad)
    with pytest.raises(ValueError, match="does not match"):
        RightReasons()(grad, torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        RightReasons()(grad, torch.rand(2, 1, 4, 4), batch_size=1)


def test_log_prob_score_sees_the_other_logits() -> None:
    """A shortcut routed through a wrong class's logit: invisible to the logit saliency only."""
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    torch.testing.assert_close(class_score(logits, torch.tensor([0]), "log_prob"), logits.log_softmax(-1)[:, 0])
    w = torch.zeros(3, 4)
    w[1, 3] = 1.0  # pixel 3 drives only class 1's logit
    x = torch.rand(1, 4, requires_grad=True)
    for score, expect_zero in (("logit", True), ("log_prob", False)):
        (g,) = torch.autograd.grad(class_score(x @ w.T, torch.tensor([0]), score).sum(), x)
        assert (g[0, 3].abs() < 1e-12) == expect_zero, score
    with pytest.raises(ValueError, match="score"):
        class_score(logits, torch.tensor([0]), "prob")


def _batch(n: int = 6) -> Sample:
    g = torch.Generator().manual_seed(0)
    has_map = torch.ones(n, dtype=torch.bool)
    has_map[1] = False
    return Sample(torch.rand(n, 1, 32, 32, generator=g), torch.rand(n, 1, 32, 32, generator=g), has_map, torch.randint(0, 10, (n,), generator=g))


def test_module_rrr_term_matches_the_loss_and_trains_every_weight() -> None:
    module = AlignedClassifier(arch="cnn", arch_args={"widths": [8, 8], "hidden": 16}, penalties=[RightReasons(0.5)])
    batch = _batch()
    loss = module._step(batch, "train")
    mapped = batch.has_map.nonzero().flatten()
    x = batch.image[mapped].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(module.model(x).log_softmax(-1).sum(), x, create_graph=True)
    expected = module.objective(module.model(batch.image), batch.label) + 0.5 * RightReasons()(g, batch.human_map[mapped], len(batch.label))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.model.parameters() if p.ndim > 1)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        RightReasons(-1.0)
    with pytest.raises(ValueError, match="score"):
        Saliency(score="prob")
    with pytest.raises(TypeError, match="Saliency"):
        Harmonization(saliency="abs")


def test_module_log_prob_saliency_and_step_scheduler() -> None:
    module = AlignedClassifier(
        arch="cnn", arch_args={"widths": [8, 8], "hidden": 16},
        penalties=[Harmonization(saliency=Saliency(score="log_prob", reduction="mean_abs"))],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100), lr_scheduler_interval="step",
    )
    image, _, has_map, label = _batch()
    penalty = module.penalties[0]
    _, gradients, mapped = module.forward_with_gradients(image, label, has_map, [penalty], create_graph=False)
    saliency = penalty.saliency.reduce(gradients[penalty.gradient_key])
    x = image[mapped].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(module.model(x).log_softmax(-1).gather(1, label[mapped, None]).sum(), x)
    torch.testing.assert_close(saliency, g.abs().mean(1, keepdim=True))
    assert module.configure_optimizers()["lr_scheduler"]["interval"] == "step"
