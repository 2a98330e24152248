"""CRAFT pieces: PyTorch NMF vs scikit-learn, crops, model splits, concept importance, drift, pictures."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import NMF
from torch import nn

from harmonia.concepts import (
    ConceptBank,
    Craft,
    LayerSplit,
    attribution_overlay,
    concept_mosaic,
    match_concepts,
    nmf,
    nmf_transform,
)


def _low_rank(n: int = 60, m: int = 30, k: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, k)) @ rng.random((k, m)) + 0.1 * rng.random((n, m))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_nmf_reconstruction_within_five_percent_of_sklearn() -> None:
    a = _low_rank()
    reference = NMF(n_components=5, alpha_W=1e-2)  # CRAFT's reference call
    u_ref = reference.fit_transform(a)
    error_ref = np.linalg.norm(a - u_ref @ reference.components_)
    for dtype in (torch.float64, torch.float32):
        result = nmf(torch.from_numpy(a).to(dtype), 5, alpha_W=1e-2)
        assert result.coefficients.min() >= 0 and result.components.min() >= 0
        assert abs(result.error - error_ref) <= 0.05 * error_ref, (dtype, result.error, error_ref)
    # transform (coefficients of new rows on a fixed bank) solves the same problem as sklearn's
    rows = _low_rank(8, 30, 5, seed=1)
    ours = nmf_transform(torch.from_numpy(rows), torch.from_numpy(reference.components_))
    assert np.allclose(ours.numpy(), reference.transform(rows), atol=1e-6)


def test_nmf_is_deterministic_and_checks_its_input() -> None:
    a = torch.from_numpy(_low_rank()).float()
    first, second = nmf(a, 4), nmf(a, 4)
    assert torch.equal(first.components, second.components)
    r1, r2, r3 = nmf(a, 4, init="random", seed=1), nmf(a, 4, init="random", seed=1), nmf(a, 4, init="random", seed=2)
    assert torch.equal(r1.components, r2.components) and not torch.equal(r1.components, r3.components)
    with pytest.raises(ValueError, match="negative"):
        nmf(a - 1, 4)
    with pytest.raises(ValueError, match="NaN"):
        nmf(torch.full((4, 4), float("nan")), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nmf_runs_on_the_gpu() -> None:
    a = torch.from_numpy(_low_rank()).float()
    cpu, gpu = nmf(a, 5), nmf(a.cuda(), 5)
    assert gpu.components.is_cuda
    assert abs(gpu.error - cpu.error) <= 1e-3 * cpu.error


def test_crops_overlap_with_stride_four_fifths_of_the_patch() -> None:
    craft = Craft(nn.Sequential(nn.ReLU()), 0, n_concepts=2, patch_size=16)
    images = torch.rand(3, 1, 32, 32)
    crops, source = craft.crops(images)
    assert crops.shape == (3 * 4, 1, 16, 16)  # stride 12: offsets 0 and 12 on each axis
    assert source.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(crops[5], images[1, :, 0:16, 12:28])
    with pytest.raises(ValueError, match="larger than the images"):
        Craft(nn.Sequential(nn.ReLU()), 0, patch_size=40).crops(images)


class _Wrapped(nn.Module):
    """A non-Sequential model: splits must go through forward hooks."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 1.0


def test_hook_split_equals_sequential_split() -> None:
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.rand(5, 1, 16, 16)
    by_index, by_name = LayerSplit(body, 2), LayerSplit(_Wrapped(body), "body.2")
    assert not by_index.needs_input and by_name.needs_input
    a = by_index.activations(x)
    torch.testing.assert_close(by_name.activations(x), a)
    torch.testing.assert_close(by_index.logits(a), body(x))
    torch.testing.assert_close(by_name.logits(2 * a, x), by_index.logits(2 * a))
    with pytest.raises(ValueError, match="nn.Sequential"):
        LayerSplit(_Wrapped(body), 2)
    with pytest.raises(ValueError, match="no module named"):
        LayerSplit(body, "head")


def test_negative_activations_are_refused_with_the_layer_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-10.0)
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) are negative"):
        Craft(model, 0, n_concepts=2, patch_size=8).fit(torch.rand(2, 1, 16, 16), 0)


class _ColourHead(nn.Module):
    """Class 0 reads only the red channel's mean; class 1 only green's."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        means = a.mean(dim=(2, 3))
        return torch.stack([5 * means[:, 0], means[:, 1]], dim=1)


def _colour_blocks(n: int, seed: int = 0) -> torch.Tensor:
    """Images tiled with 8×8 blocks of pure red, green or blue of random intensity."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, 3, (n, 4, 4), generator=g)
    intensity = 0.3 + 0.7 * torch.rand(n, 4, 4, generator=g)
    blocks = torch.nn.functional.one_hot(colour, 3).permute(0, 3, 1, 2).float() * intensity[:, None]
    return blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def test_importance_ranks_first_the_concept_the_model_reads() -> None:
    model = nn.Sequential(nn.AvgPool2d(4), _ColourHead()).eval()  # split after the pooling
    images = _colour_blocks(12)
    craft = Craft(model, 0, n_concepts=3, patch_size=8, nb_design=32)
    bank = craft.fit(images, class_id=0)
    assert bank.importance.shape == (3,) and bank.reconstruction_error < 0.1
    colour_of = bank.components.argmax(dim=1)  # each concept is one pure colour
    assert sorted(colour_of.tolist()) == [0, 1, 2]
    top = int(bank.importance.argmax())
    assert colour_of[top] == 0  # red: the only input of the class-0 logit
    assert bank.importance[top] > 0.8 and bank.importance.sort().values[1] < 0.05
    # class 1 reads green instead
    bank1 = craft.fit(images, class_id=1)
    assert bank1.components[bank1.importance.argmax()].argmax() == 1
    # attribution maps put the red concept on the red blocks
    maps = craft.attribution_maps(bank, images[:2])
    assert maps.shape == (2, 3, 32, 32) and maps.min() >= 0
    red = images[:2, 0] > 0
    assert maps[:, top][red].mean() > 5 * maps[:, top][~red].mean()
    top_crops = bank.top_crops(4)
    assert top_crops.shape == (3, 4, 3, 8, 8)
    assert (top_crops[top][:, 0] > 0).float().mean() > 0.5  # its top crops are mostly red


def test_drift_is_one_for_identical_banks_and_lower_after_permuting_and_perturbing() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.rand(6, 16, generator=g)
    same = match_concepts(bank, bank)
    assert same.score == pytest.approx(1.0) and same.order.tolist() == list(range(6))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = match_concepts(bank, bank[perm])
    assert shuffled.score == pytest.approx(1.0)
    assert torch.equal(bank[perm][shuffled.order], bank)  # the matching undoes the permutation
    moved = match_concepts(bank, (bank[perm] + 0.3 * torch.rand(6, 16, generator=g)).clamp_min(0))
    assert 0.5 < moved.score < 0.999
    assert torch.equal(moved.order, shuffled.order)  # small moves keep the same pairs
    with pytest.raises(ValueError, match="same"):
        match_concepts(bank, bank[:5])


def test_bank_reorder_and_pictures() -> None:
    crops = torch.rand(10, 1, 8, 8)
    bank = ConceptBank(0, torch.rand(3, 4), torch.rand(10, 3), crops, torch.arange(10), 0.1, torch.tensor([0.1, 0.7, 0.2]))
    again = bank.reorder([1, 2, 0])
    assert torch.equal(again.components[0], bank.components[1]) and again.importance.tolist() == pytest.approx([0.7, 0.2, 0.1])
    assert torch.equal(again.top_crops(2)[0], bank.top_crops(2)[1])
    mosaic = concept_mosaic(bank.top_crops(3), ["a", "b", "c"])
    assert mosaic.shape[0] == 3 and mosaic.shape[1] >= 3 * 48 and 0 <= mosaic.min() and mosaic.max() <= 1
    overlay = attribution_overlay(torch.rand(2, 1, 16, 16), torch.rand(2, 2, 16, 16))
    assert overlay.shape[0] == 3 and overlay.shape[1] >= 2 * 64 and overlay.shape[2] >= 3 * 64


def test_normalized_nmf_finds_the_same_concepts_at_any_activation_scale() -> None:
    """Craft divides activations by their mean before NMF, so alpha_W means the same at any layer."""
    images = _colour_blocks(12)
    banks = {}
    for scale in (1.0, 100.0):
        model = nn.Sequential(nn.AvgPool2d(4), _Scale(scale), _ColourHead()).eval()
        banks[scale] = Craft(model, 1, n_concepts=3, patch_size=8, nb_design=16).fit(images, 0)
    torch.testing.assert_close(banks[100.0].components / 100, banks[1.0].components, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(banks[100.0].coefficients, banks[1.0].coefficients, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(banks[100.0].importance, banks[1.0].importance, rtol=1e-3, atol=1e-4)
    # without normalization the same alpha_W is a much stronger penalty on the small activations
    small = Craft(nn.Sequential(nn.AvgPool2d(4), _Scale(0.01), _ColourHead()), 1, n_concepts=3, patch_size=8, normalize=False)
    assert small.fit(images, 0, importance=False).reconstruction_error > 2 * banks[1.0].reconstruction_error


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class _BiasChannel(nn.Module):
    """Adds a channel that is 0.5 whatever the input: a network's response to an empty image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.full_like(x[:, :1], 0.5)], dim=1)


class _RedAndBiasHead(nn.Module):
    """Class 0 reads the red channel and the constant channel; class 1 green."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        means = a.mean(dim=(2, 3))
        return torch.stack([5 * means[:, 0] + 2 * means[:, 3], means[:, 1]], dim=1)


def _sparse_colour_blocks(n: int, seed: int = 0) -> torch.Tensor:
    """:func:`_colour_blocks` with about half of the blocks black (an empty background)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, 1, 4, 4, generator=g) < 0.5
    return _colour_blocks(n, seed) * keep.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def test_baseline_removes_the_empty_crop_concept() -> None:
    """A constant response to empty input is no concept once the empty image's activations are the zero."""
    images = _sparse_colour_blocks(12)
    model = nn.Sequential(nn.AvgPool2d(4), _BiasChannel(), _RedAndBiasHead()).eval()
    # The artefact, reference semantics: every crop carries the constant channel, so NMF gives it
    # a concept whose top crops are the black ones; masking it takes the logit to a state no
    # input produces (the constant channel at 0), so it looks like the most important concept.
    plain = Craft(model, 1, n_concepts=4, patch_size=8, nb_design=32).fit(images, 0)
    black = plain.crops.flatten(1).amax(1) == 0
    assert 0.1 < black.float().mean() < 0.5
    constant = int(plain.components[:, :3].amax(1).argmin())  # the concept of the constant channel alone
    assert plain.components[constant, 3] > 0 and plain.components[constant, :3].max() < 0.05
    assert int(plain.importance.argmax()) == constant
    assert black[plain.coefficients[:, constant].topk(4).indices].all()
    # With the baseline the concepts are the three colours, red (what class 0 reads) first,
    # and empty crops load on no concept.
    craft = Craft(model, 1, n_concepts=4, patch_size=8, nb_design=32, baseline=0.0)
    bank = craft.fit(images, 0)
    assert bank.components[:, 3].abs().max() < 1e-6
    top = int(bank.importance.argmax())
    assert int(bank.components[top].argmax()) == 0 and bank.importance[top] > 0.7
    assert bank.coefficients[black].abs().max() < 1e-6
    assert craft.transform(bank, torch.zeros(1, 3, 32, 32)).abs().max() < 1e-6
    # Masking every concept gives the empty image's logit (not the logit of zero activations).
    blank = craft.blank_activations((3, 32, 32))
    torch.testing.assert_close(craft.split.logits(blank, None), model(torch.zeros(1, 3, 32, 32)))
