"""harmonia.verify: sound bounds (never below an attack), exact on linear nets, EVA and its contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from deel.torchlip import InvertibleDownSampling, MaxMin, ScaledL2NormPool2d, SpectralConv2d
from torch import nn

from harmonia.explain import build_explainer
from harmonia.models import build_model
from harmonia.models.layers import GroupSort2, L2NormPool2d
from harmonia.models.lipschitz import export
from harmonia.verify import (
    EVA,
    BoundedNetwork,
    CertifiedRegions,
    UnsupportedLayerError,
    cell_masks,
    margin_bounds,
    overlap,
    pgd_margins,
)

D = torch.float64


def _bn(channels: int, dims: int = 2) -> nn.Module:
    """A BatchNorm in eval mode with random statistics (so folding is really tested)."""
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(channels)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1, 0.3)
        bn.bias.normal_(0, 0.3)
    return bn


def _family(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A small random network exercising some supported layers, and its input shape."""
    if name == "mlp_relu":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)), (3, 2, 2)
    if name == "mlp_groupsort":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), GroupSort2(), nn.Linear(10, 8), _bn(8, 1), GroupSort2(), nn.Linear(8, 4)), (3, 2, 2)
    if name == "mlp_maxmin":
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), MaxMin(), nn.Linear(12, 4)), (3, 2, 2)
    if name == "conv_relu_maxpool":
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), _bn(4), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
            nn.Conv2d(4, 4, 2, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
        ), (2, 8, 8)
    if name == "conv_padding_modes":
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(4, 2, 3, padding="same", padding_mode="replicate"), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
        ), (2, 8, 8)
    if name == "lipschitz_layers":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), GroupSort2(), L2NormPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), GroupSort2(), ScaledL2NormPool2d(2),
            InvertibleDownSampling(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
        ), (1, 8, 8)
    if name == "deel_layers":
        torch.manual_seed(torch.initial_seed() % 1000)
        return nn.Sequential(
            SpectralConv2d(1, 4, 3, padding=1), MaxMin(), nn.Conv2d(8, 4, 3, stride=2, padding=1), GroupSort2(),
            nn.Flatten(), nn.Linear(64, 4),
        ), (1, 8, 8)
    if name == "resnet_blocks":
        basic = torchvision.models.resnet.BasicBlock(4, 4)
        down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), _bn(8))
        bottleneck = torchvision.models.resnet.Bottleneck(4, 2, stride=2, downsample=down)
        for block in (basic, bottleneck):
            for m in block.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.load_state_dict(_bn(m.num_features).state_dict())
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), basic, bottleneck, nn.Flatten(), nn.Linear(128, 4)), (1, 8, 8)
    raise KeyError(name)


FAMILIES = ["mlp_relu", "mlp_groupsort", "mlp_maxmin", "conv_relu_maxpool", "conv_padding_modes", "lipschitz_layers",
            "deel_layers", "resnet_blocks"]
SETTINGS = [("ibp", "ibp"), ("crown", "ibp"), ("crown", "crown")]
SOUNDNESS_SETTINGS = SETTINGS + [("alpha-crown", "crown")]
DECOY_EPOCHS = 20  # the harmonized model needs them to drop the decoy; the baseline gets the same


def _net(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    model, shape = _family(name)
    return model.to(D).eval(), shape


def _soundness_cases(name: str, seeds: range, epsilons: tuple[float, ...], settings: list[tuple[str, str]] = SETTINGS) -> int:
    """Bound ≥ attack for every (image, class, ε, setting); returns how many comparisons were made."""
    compared = 0
    for seed in seeds:
        model, shape = _net(name, seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(3, *shape, generator=g, dtype=D)
        target = model(x).argmax(1)
        net = BoundedNetwork(model, shape, dtype=D)
        for eps in epsilons:
            attack = pgd_margins(model, x, target, eps, steps=15, restarts=2, seed=seed)
            # Random corners of the box too: an attack can miss them, a sound bound cannot.
            corners = x.unsqueeze(1) + eps * (torch.randint(0, 2, (3, 16, *shape), generator=g).to(D) * 2 - 1)
            logits = model(corners.flatten(0, 1)).view(3, 16, -1)
            sampled = (logits - logits.gather(2, target.view(3, 1, 1).expand(3, 16, 1))).amax(1)
            reached = torch.maximum(attack, sampled)
            for method, intermediate in settings:
                bound = margin_bounds(net, x, target, eps, method=method, intermediate=intermediate, crown_max_neurons=None,
                                      alpha_steps=5)
                assert bool((bound >= reached - 1e-9).all()), (name, seed, eps, method, intermediate, (reached - bound).max())
                compared += reached[:, :].numel()
    return compared


@pytest.mark.parametrize("name", FAMILIES)
def test_bounds_never_below_what_an_attack_reaches(name: str) -> None:
    # 8 families × 2 nets × 3 images × K classes × 3 ε × 3 settings: several hundred comparisons
    # (α-CROWN: test_alpha_crown_is_sound_for_any_parameters_and_never_looser, and the slow sweep).
    assert _soundness_cases(name, range(2), (0.01, 0.05, 0.3)) > 100


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_bounds_never_below_an_attack_many_nets(name: str) -> None:
    assert _soundness_cases(name, range(2, 22), (0.003, 0.02, 0.1, 0.5), SOUNDNESS_SETTINGS) > 2000


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_computes_what_the_model_computes(name: str) -> None:
    model, shape = _net(name, 0)
    x = torch.rand(2, *shape, dtype=D)
    net = BoundedNetwork(model, shape, dtype=D)
    torch.testing.assert_close(net.graph.forward(x)[-1], model(x))


def test_registry_models_and_exports_are_read_exactly() -> None:
    torch.manual_seed(0)
    for arch in ("lipschitz_cnn", "cnn"):
        model = build_model(arch, in_channels=1, input_size=16, widths=[4, 8], depth=1, hidden=8).eval()
        x = torch.rand(2, 1, 16, 16)
        for variant in (model, export(model)):
            net = BoundedNetwork(variant, (1, 16, 16))
            torch.testing.assert_close(net.graph.forward(x)[-1], model(x), atol=1e-5, rtol=1e-5)
    deel = build_model("lipschitz_cnn", in_channels=1, input_size=16, widths=[4], depth=1, hidden=8, backend="deel")
    deel.train()(torch.rand(4, 1, 16, 16))  # deel-torchlip layers use the weight of their last training forward
    deel.eval()
    torch.testing.assert_close(BoundedNetwork(deel).graph.forward(x)[-1], deel(x), atol=1e-5, rtol=1e-5)
    resnet = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(BoundedNetwork(resnet, (3, 32, 32)).graph.forward(x)[-1], resnet(x), atol=1e-4, rtol=1e-4)


def test_exact_on_linear_networks() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), _bn(3), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(12, 6), nn.Linear(6, 4)).to(D).eval()
    x = torch.rand(3, 2, 8, 8, dtype=D)
    target = torch.tensor([0, 2, 3])
    mask = torch.zeros(3, 1, 8, 8, dtype=D)
    mask[:, :, :4] = 1
    jac = torch.autograd.functional.jacobian(lambda t: model(t).sum(0), x)  # (K, N, C, H, W)
    jac = jac.permute(1, 0, 2, 3, 4)
    diff = jac - jac[torch.arange(3), target].unsqueeze(1)
    for eps in (0.01, 0.2):
        clean = model(x) - model(x).gather(1, target[:, None])
        exact = clean + eps * (diff.abs() * mask.unsqueeze(1)).flatten(2).sum(2)
        got = margin_bounds(model, x, target, eps, mask=mask, method="crown")
        torch.testing.assert_close(got, exact, atol=1e-10, rtol=1e-10)
        ibp = margin_bounds(model, x, target, eps, mask=mask, method="ibp", intermediate="ibp")
        assert bool((ibp >= exact - 1e-10).all())
        # The attack reaches the vertex exactly on a linear function.
        reached = pgd_margins(model, x, target, eps, mask=mask, steps=3, restarts=1)
        torch.testing.assert_close(reached, exact, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["mlp_groupsort", "conv_relu_maxpool", "lipschitz_layers", "resnet_blocks"])
def test_bounds_grow_with_epsilon(name: str) -> None:
    model, shape = _net(name, 3)
    x = torch.rand(4, *shape, dtype=D)
    target = model(x).argmax(1)
    net = BoundedNetwork(model, shape, dtype=D)
    for method, intermediate in SETTINGS:
        previous = None
        for eps in (0.0, 0.01, 0.03, 0.1, 0.3):
            bound = overlap(margin_bounds(net, x, target, eps, method=method, intermediate=intermediate, crown_max_neurons=None), target)
            if previous is None:
                clean = model(x) - model(x).gather(1, target[:, None])
                torch.testing.assert_close(bound, overlap(clean, target))  # ε = 0: the value itself
            else:
                assert bool((bound >= previous - 1e-12).all()), (method, intermediate, eps)
            previous = bound


@pytest.mark.parametrize("name", ["mlp_relu", "mlp_groupsort", "conv_relu_maxpool", "lipschitz_layers", "deel_layers"])
def test_alpha_crown_is_sound_for_any_parameters_and_never_looser(name: str) -> None:
    model, shape = _net(name, 7)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, *shape, generator=g, dtype=D)
    target = model(x).argmax(1)
    net = BoundedNetwork(model, shape, dtype=D)
    eps = 0.1
    radius = torch.full_like(x, eps)
    state = net.bound(x - radius, x + radius, "crown", None)
    crown = net.margins(state, target, "crown").upper(radius)
    alpha = net.margins(state, target, "alpha-crown", alpha_steps=10).upper(radius)
    assert bool((alpha <= crown + 1e-12).all())  # CROWN is the first iterate; each row keeps its best
    reached = pgd_margins(model, x, target, eps, steps=20, restarts=3, seed=7)
    assert bool((alpha >= reached - 1e-9).all()), (reached - alpha).max()
    # Every value of the free parameters (projected) is a sound relaxation, not only the optimized ones.
    classes = crown.shape[1]
    eye = torch.eye(classes, dtype=D)
    spec = eye.unsqueeze(0) - eye[target].unsqueeze(1)
    for trial in range(3):
        alphas = {}
        for j, pre in state.pre.items():
            init = net.graph.nodes[j].op.init_alpha(pre, classes)
            if init is not None:
                alphas[j] = [torch.rand(t.shape, generator=g, dtype=D) * 4 - 2 for t in init]
                net.graph.nodes[j].op.project_alpha(alphas[j])
        coef, const = net.backward(state, net.graph.output, spec, alphas=alphas)
        bound = ((coef.flatten(2) @ x.flatten(1).unsqueeze(2)).squeeze(2) + const
                 + (coef.abs().flatten(2) @ radius.flatten(1).unsqueeze(2)).squeeze(2))
        assert bool((bound >= reached - 1e-9).all()), (trial, (reached - bound).max())


def test_alpha_crown_tightens_groupsort_and_l2_pooling() -> None:
    tighter = 0.0
    for name in ("mlp_groupsort", "lipschitz_layers"):
        model, shape = _net(name, 1)
        x = torch.rand(4, *shape, dtype=D)
        target = model(x).argmax(1)
        crown = margin_bounds(model, x, target, 0.1, crown_max_neurons=None)
        alpha = margin_bounds(model, x, target, 0.1, method="alpha-crown", crown_max_neurons=None)
        tighter = max(tighter, float((crown - alpha).max()))
    assert tighter > 1e-3


def _left_half_model() -> nn.Module:
    """A conv net whose logits read only columns 0..4 of an 8×8 image (3×3 conv on feature columns ≤ 3)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 64, 3)).to(D).eval()
    with torch.no_grad():
        weight = model[3].weight.view(3, 2, 8, 8)
        weight[..., 4:] = 0
    return model


def test_region_outside_the_receptive_field_has_zero_importance() -> None:
    model = _left_half_model()
    x = torch.rand(2, 1, 8, 8, dtype=D)
    target = model(x).argmax(1)
    for shared in (True, False):
        eva = EVA(epsilon=0.1, grid_size=4, shared_relaxation=shared, dtype="float64", intermediate="crown", crown_max_neurons=None)
        cells = eva.region_importance(model, x, target)  # (N, 4, 4), each cell 2 px wide
        assert bool((cells[:, :, 3] == 0).all()), cells[:, :, 3]  # columns 6-7: outside every logit's reach
        assert bool((cells[:, :, :2] > 0).any())  # and the regions it reads do matter
        assert bool((cells >= 0).all())


def test_eva_importance_is_the_drop_of_the_verified_overlap() -> None:
    model, shape = _net("conv_relu_maxpool", 4)
    x = torch.rand(2, *shape, dtype=D)
    target = model(x).argmax(1)
    eva = EVA(epsilon=0.05, grid_size=4, shared_relaxation=False, importance="tightest", dtype="float64", crown_max_neurons=None)
    full, regions = eva.overlaps(model, x, target)
    # α-CROWN's relaxations, optimized on B and shared by every B∖u: sound on each of them too.
    _, alpha_regions = EVA(epsilon=0.05, grid_size=4, method="alpha-crown", dtype="float64", crown_max_neurons=None,
                           alpha_steps=5).overlaps(model, x, target)
    masks = cell_masks(4, 8, 8).to(D)
    for u in (0, 5, 15):
        direct = overlap(margin_bounds(model, x, target, 0.05, mask=1 - masks[u], crown_max_neurons=None), target)
        assert bool((regions[:, u] <= direct + 1e-12).all())  # never looser than bounding B∖u directly
        reached = overlap(pgd_margins(model, x, target, 0.05, mask=(1 - masks[u]).expand(2, -1, -1, -1)), target)
        assert bool((regions[:, u] >= reached - 1e-9).all())  # and still sound
        assert bool((alpha_regions[:, u] >= reached - 1e-9).all())
    torch.testing.assert_close(eva.region_importance(model, x, target).flatten(1), (full[:, None] - regions).clamp_min(0))


def test_eva_ranks_regions_of_a_lipschitz_network_where_the_caps_cannot() -> None:
    torch.manual_seed(0)
    model = build_model("lipschitz_cnn", in_channels=1, input_size=8, widths=[4], depth=1, hidden=8).to(D).eval()
    x = torch.rand(2, 1, 8, 8, dtype=D)
    target = model(x).argmax(1)
    # Large ε: the certificate is the tightest bound, the same for every equal-size cell.
    flat = EVA(epsilon=1.0, grid_size=4, importance="tightest", dtype="float64").region_importance(model, x, target)
    ranked = EVA(epsilon=1.0, grid_size=4, dtype="float64").region_importance(model, x, target)
    assert bool((flat.flatten(1).std(1) < 1e-9).all())
    assert bool((ranked.flatten(1).std(1) > 1e-6).all())


def test_certificate_cap_never_loosens_a_bound_and_can_tighten_it() -> None:
    torch.manual_seed(0)
    model = build_model("lipschitz_cnn", in_channels=1, input_size=8, widths=[4], depth=1, hidden=8).to(D).eval()
    x = torch.rand(4, 1, 8, 8, dtype=D)
    target = model(x).argmax(1)
    capped, plain = BoundedNetwork(model, dtype=D), BoundedNetwork(model, dtype=D, use_certificate=False)
    assert capped.certificate == "per_logit" and plain.certificate is None
    tightened = False
    for eps in (0.01, 0.1, 1.0):
        for intermediate in ("ibp", "crown"):
            with_cap = margin_bounds(capped, x, target, eps, intermediate=intermediate)
            without = margin_bounds(plain, x, target, eps, intermediate=intermediate)
            assert bool((with_cap <= without + 1e-12).all())
            tightened |= bool((with_cap < without - 1e-9).any())
            # The cap itself: f_k − f_c moves at most 2‖δ‖₂ for a per-logit certificate.
            clean = model(x) - model(x).gather(1, target[:, None])
            assert bool((with_cap <= clean + 2 * eps * 8 + 1e-9).all())
    assert tightened


def test_unsupported_layers_are_refused_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(torch.nn.modules.activation.Tanh\)"):
        BoundedNetwork(model, (1, 8, 8))
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 2)).train()
    with pytest.raises(UnsupportedLayerError, match="layer 1 .*BatchNorm2d.*eval mode"):
        BoundedNetwork(bn, (1, 8, 8))
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d"):
        BoundedNetwork(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True)), (1, 5, 5))
    with pytest.raises(TypeError, match="Tanh"):  # also through the explainer
        build_explainer("eva", epsilon=0.1, grid_size=2).attribute(model.eval(), torch.rand(1, 1, 8, 8), torch.tensor([0]))


def test_eva_follows_the_explainer_contract() -> None:
    model = build_model("lipschitz_cnn", in_channels=1, input_size=8, widths=[4], depth=1, hidden=8).eval()
    x, target = torch.rand(3, 1, 8, 8), torch.tensor([0, 3, 7])
    eva = build_explainer("eva", epsilon=0.05, grid_size=4)
    assert isinstance(eva, EVA)
    maps = eva.attribute(model, x, target)
    assert maps.shape == (3, 1, 8, 8) and maps.dtype == x.dtype and bool((maps >= 0).all())
    # Nearest upsampling of the 4×4 cells: constant on every 2×2 block.
    torch.testing.assert_close(maps, maps[..., ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1))
    with torch.inference_mode():
        torch.testing.assert_close(eva.attribute(model, x, target), maps)
    with torch.no_grad():
        torch.testing.assert_close(build_explainer("eva", epsilon=0.05, grid_size=4, batch_size=1).attribute(model, x, target), maps)
    model.train()
    EVA(epsilon=0.05, grid_size=4).attribute(copy.deepcopy(model).eval(), x, target)
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="epsilon"):
        EVA(epsilon=0)
    with pytest.raises(ValueError, match="importance='crown' needs method='crown'"):
        EVA(method="ibp", importance="crown")
    with pytest.raises(ValueError, match="method must be one of"):
        EVA(method="beta-crown")
    # α-CROWN through the explainer: same contract, maps from its (tighter, still sound) bounds.
    alpha_maps = build_explainer("eva", epsilon=0.05, grid_size=4, method="alpha-crown", alpha_steps=3).attribute(model, x, target)
    assert alpha_maps.shape == maps.shape and bool((alpha_maps >= 0).all())
    with torch.inference_mode():
        torch.testing.assert_close(EVA(epsilon=0.05, grid_size=4, method="alpha-crown", alpha_steps=3).attribute(model, x, target),
                                   alpha_maps)
    with pytest.raises(ValueError, match="grid_size 9"):
        EVA(grid_size=9).attribute(model.eval(), x, target)


def test_eva_maps_are_scored_by_the_metrics() -> None:
    from harmonia.metrics import build_metric

    model = _left_half_model().float()
    x = torch.rand(4, 1, 8, 8)
    target = model(x).argmax(1)
    maps = EVA(epsilon=0.1, grid_size=4).attribute(model, x, target)
    for name in ("deletion", "insertion", "mufidelity"):
        metric = build_metric(name, **({"nb_samples": 8, "grid_size": 4} if name == "mufidelity" else {}))
        metric.update(model, x, target, maps)
        assert math.isfinite(float(metric.compute()))


def test_pgd_stays_in_its_set() -> None:
    model, shape = _net("conv_relu_maxpool", 5)
    x = torch.rand(2, *shape, dtype=D)
    target = model(x).argmax(1)
    clean = model(x) - model(x).gather(1, target[:, None])
    frozen = pgd_margins(model, x, target, 0.3, mask=torch.zeros(2, 1, 8, 8, dtype=D))
    torch.testing.assert_close(frozen, clean)  # nothing may move: the clean value
    moved = pgd_margins(model, x, target, 0.3)
    assert bool((moved >= clean - 1e-12).all()) and bool((moved > clean + 1e-6).any())
    assert bool((moved <= margin_bounds(model, x, target, 0.3, crown_max_neurons=None) + 1e-9).all())


def test_certified_regions_match_the_linear_closed_form() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(D).eval()
    x = torch.rand(2, 1, 4, 4, dtype=D)
    target = model(x).argmax(1)
    radii = CertifiedRegions(grid_size=2, max_epsilon=4.0, steps=20, dtype="float64").region_radii(model, x, target)
    w = model[1].weight.view(3, 4, 4)
    masks = cell_masks(2, 4, 4).to(D)[:, 0]
    clean = model(x) - model(x).gather(1, target[:, None])
    for i in range(2):
        diff = (w - w[target[i]]).abs()
        for u in range(4):
            reach = (diff * masks[u]).flatten(1).sum(1)  # (K,) per unit of ε
            exact = min(float(-clean[i, k].detach() / reach[k].detach()) for k in range(3) if k != int(target[i]))
            got = float(radii[i].flatten()[u])
            assert got <= exact + 1e-12 and (exact - got <= 4.0 / 2**19 or got == 4.0), (got, exact)
    # The explainer form: the radii upsampled, 0 where the target is not the prediction.
    other = (target + 1) % 3
    maps = CertifiedRegions(grid_size=2, max_epsilon=4.0, steps=4).attribute(model.float(), x.float(), other)
    assert maps.shape == (2, 1, 4, 4) and bool((maps == 0).all())


def _decoy_cnn(harmonized: bool, epochs: int = DECOY_EPOCHS) -> nn.Module:
    """The small CNN trained on decoyed digits (the decoy's shade tells the label in training).

    One loop for both models: cross-entropy, plus, for the harmonized one, the penalties of
    configs/digits_cnn_harmonized_rrr.yaml (harmonization on pyramid levels 2-4 of
    |∇ log p| and right-for-the-right-reasons), their input gradients from
    ``AlignedClassifier.forward_with_gradients`` as in training.
    """
    from harmonia.data.digits import DecoyDigits
    from harmonia.explain import Saliency
    from harmonia.losses import Harmonization, RightReasons
    from harmonia.module import AlignedClassifier

    torch.manual_seed(0)
    train = DecoyDigits("train", seed=0)
    penalties = [Harmonization(1.0, Saliency(score="log_prob", reduction="mean_abs"), first_level=2),
                 RightReasons(0.01)] if harmonized else []
    module = AlignedClassifier(arch="cnn", arch_args=dict(in_channels=1, input_size=32, widths=[8, 16], depth=1, hidden=32),
                               penalties=penalties)
    model = module.model
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(train.labels)).split(64):
            images, labels = train.images[batch], train.labels[batch]
            logits, gradients, mapped = module.forward_with_gradients(images, labels, train.has_map[batch], penalties, True)
            loss = nn.functional.cross_entropy(logits, labels)
            for penalty in penalties:
                loss = loss + penalty.weight * penalty(gradients[penalty.gradient_key], train.maps[batch][mapped], len(labels))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _decoy_rank(model: nn.Module, images: int = 32) -> tuple[torch.Tensor, float]:
    """Rank of the decoy square's cell in EVA's 8×8 map per test digit (0 = top), and the decoy-free test accuracy."""
    from harmonia.data.digits import DecoyDigits

    test = DecoyDigits("test", seed=0)
    with torch.no_grad():
        clean = DecoyDigits("test", seed=0, decoy="none")
        accuracy = float((model(clean.images).argmax(1) == clean.labels).float().mean())
    x, corners = test.images[:images], test.corners[:images]
    target = model(x).argmax(1)
    cells = EVA(epsilon=0.01, grid_size=8, crown_max_neurons=None).region_importance(model, x, target).flatten(1)
    corner_cell = torch.tensor([0, 7, 56, 63])[corners]  # the 4×4-pixel decoy fills one corner cell
    return (cells > cells.gather(1, corner_cell[:, None])).sum(1), accuracy


@pytest.mark.slow
def test_eva_finds_the_decoy_of_a_shortcut_model() -> None:
    """A CNN trained on decoyed digits reads the decoy; EVA ranks its square among the top regions."""
    rank, _ = _decoy_rank(_decoy_cnn(harmonized=False))
    assert float((rank < 5).float().mean()) >= 0.5, rank.tolist()


@pytest.mark.slow
def test_eva_does_not_find_the_decoy_of_a_harmonized_model() -> None:
    """Trained the same way with the harmonization penalties, the CNN reads the digit: the decoy
    square is rarely among EVA's top regions (5 of 64 cells: 8% by chance)."""
    rank, accuracy = _decoy_rank(_decoy_cnn(harmonized=True))
    assert accuracy >= 0.7, accuracy  # a model that learned the digits, not one that reads nothing
    assert float((rank < 5).float().mean()) <= 0.15, rank.tolist()
