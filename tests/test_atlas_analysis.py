"""The atlas's per-class analysis (harmonia.atlas.analysis): off-map shares, flags, matching, the map, the CLASS document."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from harmonia.concepts import Craft

from harmonia.atlas.analysis import (
    AtlasSettings,
    ClassAnalysis,
    analyze_class,
    background_concepts,
    background_swap,
    class_document,
    compare_section,
    embed,
    flag_concepts,
    off_map_share,
    on_map,
    timeline_section,
)
from harmonia.atlas.schema import validate

NAMES = [f"c{i}" for i in range(3)]


def toy_model() -> nn.Sequential:
    """Conv → ReLU → max pool (layer 2, non-negative, 8×8×8) → linear head over 3 classes."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 3)).eval()


def toy_settings(**kw) -> AtlasSettings:
    base = dict(layer=2, n_concepts=3, patch_size=6, nb_design=4, top_crops=2, tint_images=2, saliency_images=2,
                maco=False, maco_steps=2, tsne_min_images=20)
    return AtlasSettings(**{**base, **kw})


def toy_data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 16, 16, generator=g)
    maps = torch.zeros(n, 1, 16, 16)
    maps[:, :, 4:12, 4:12] = 1.0  # the "object" is the centre
    return images, torch.full((n,), 1, dtype=torch.long), maps


@pytest.fixture(scope="module")
def toy_analysis() -> ClassAnalysis:
    images, labels, maps = toy_data()
    return analyze_class(toy_model(), images, labels, maps, 1, "c1", toy_settings(), NAMES)


# ----- off-map share and flags ------------------------------------------------------------------


def test_off_map_share_exact_on_hand_made_maps():
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, :2, :2] = 1.0  # image 0: the top-left quarter is on the map
    maps[1, 0, 2:, 2:] = 2.0  # image 1: bottom-right, another scale (threshold is relative to its max)
    maps[1, 0, 0, 0] = 0.1  # below 0.5 × 2: off the map
    attr = torch.zeros(2, 2, 4, 4)
    attr[0, 0, 0, 0] = 3.0  # concept 0: 3 on the map
    attr[1, 0, 0, 0] = 1.0  # ... and 1 off (the faint map pixel) → 1/4
    attr[0, 1, 3, 3] = 2.0  # concept 1: all 2 off → 1
    share = off_map_share(attr, maps, threshold=0.5)
    assert share.tolist() == pytest.approx([0.25, 1.0])
    # A concept with no mass has share 0; an image without map is left out.
    attr[:, 1] = 0
    has_map = torch.tensor([True, False])
    assert off_map_share(attr, maps, 0.5, has_map).tolist() == pytest.approx([0.0, 0.0])
    assert off_map_share(attr, torch.zeros_like(maps), 0.5) is None
    with pytest.raises(ValueError, match="must be"):
        off_map_share(attr, maps[:1], 0.5)


def test_flags_need_both_importance_and_off_map():
    importance = torch.tensor([0.5, 0.3, 0.15, 0.05])
    off = torch.tensor([0.9, 0.2, 0.95, 0.99])
    assert flag_concepts(importance, off, 0.2, 0.5).tolist() == [True, False, False, False]
    assert flag_concepts(importance, off, 0.1, 0.5).tolist() == [True, False, True, False]
    assert flag_concepts(importance, None, 0.0, 0.0).tolist() == [False] * 4


# ----- the 2-D map -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, method", [(1, "pca"), (3, "pca"), (10, "pca"), (25, "tsne")])
def test_map_method_and_shape(n: int, method: str):
    vectors = torch.rand(n, 4, generator=torch.Generator().manual_seed(n))
    points, used = embed(vectors, seed=0, tsne_min_images=20)
    assert used == method and points.shape == (n, 2)
    assert torch.isfinite(points).all() and points.min() >= 0 and points.max() <= 1 + 1e-6


def test_map_of_one_dimensional_vectors():
    points, used = embed(torch.arange(5.0)[:, None], tsne_min_images=20)
    assert used == "pca" and points.shape == (5, 2)
    assert torch.allclose(points[:, 0], torch.linspace(0, 1, 5), atol=1e-6) or torch.allclose(points[:, 0], torch.linspace(1, 0, 5), atol=1e-6)


# ----- matching -----------------------------------------------------------------------------------


def _permuted(a: ClassAnalysis, order: list[int]) -> ClassAnalysis:
    """``a`` with its concepts renumbered: concept ``j`` of the result is ``order[j]`` of ``a``."""
    b = copy.deepcopy(a)
    idx = torch.tensor(order)
    b.profile, b.components = a.profile[idx], a.components[idx]
    b.importance, b.sobol = a.importance[idx], a.sobol[idx]
    b.off_map = None if a.off_map is None else a.off_map[idx]
    return b


def test_compare_matches_permuted_concepts(toy_analysis: ClassAnalysis, tmp_path: Path):
    b = _permuted(toy_analysis, [2, 0, 1])
    section = compare_section(toy_analysis, b, "other", tmp_path, "img/compare/class/1")
    pairs = {p["a"]: p for p in section["pairs"]}
    # concept i of a is concept j of b where order[j] = i
    assert {i: p["b"] for i, p in pairs.items()} == {0: 1, 1: 2, 2: 0}
    for p in pairs.values():
        assert p["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert p["importance_delta"] == pytest.approx(0.0, abs=1e-6)
        assert p["off_map_delta"] == pytest.approx(0.0, abs=1e-6)
    assert len(section["concepts"]) == 3
    for concept in section["concepts"]:
        assert all(path.startswith("img/compare/class/1/") and (tmp_path / path).is_file() for path in concept["crops"])
    # Other images: matching by crops would mean nothing.
    other = copy.deepcopy(b)
    other.images = other.images + 0.5
    with pytest.raises(ValueError, match="same images"):
        compare_section(toy_analysis, other, "other", tmp_path, "img/compare/class/1")


def test_timeline_follows_concepts_back(toy_analysis: ClassAnalysis):
    first = toy_analysis
    second = _permuted(first, [1, 2, 0])
    third = _permuted(second, [2, 0, 1])
    checkpoints = [{"label": f"epoch={e}", "epoch": e, "step": 10 * e} for e in range(3)]
    section = timeline_section([first, second, third], checkpoints)
    assert section["drift"] == pytest.approx([1.0, 1.0], abs=1e-5)
    for track in section["tracks"]:
        j = track["concept"]
        # third[j] = second[[2,0,1][j]] = first[[1,2,0][[2,0,1][j]]]
        mid = [2, 0, 1][j]
        assert track["ids"] == [[1, 2, 0][mid], mid, j]
        assert track["cosine"][0] is None and track["cosine"][1:] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert track["importance"] == pytest.approx([float(first.importance[track["ids"][0]])] * 3)
    assert section["background"] == [None, None, None]  # the fixture analysis had no donors
    swapped = copy.deepcopy(third)
    swapped.background = {"drop": 0.25}
    assert timeline_section([first, swapped], checkpoints[:2])["background"] == [None, 0.25]
    with pytest.raises(ValueError, match="checkpoints"):
        timeline_section([first], checkpoints)


# ----- end to end ---------------------------------------------------------------------------------


def _paths(document) -> list[str]:
    """Every string in the document that looks like an image path."""
    found = []
    if isinstance(document, dict):
        for value in document.values():
            found += _paths(value)
    elif isinstance(document, list):
        for value in document:
            found += _paths(value)
    elif isinstance(document, str) and document.endswith(".png"):
        found.append(document)
    return found


class _Reads(nn.Module):
    """Class 1 when the mean of ``pixels`` is above 0.5, else class 0 (a model that reads one place)."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, self.rows, self.cols].mean(dim=(1, 2, 3)) * self.scale - 0.5
        return torch.stack([-v, v], 1)


def _swap_data() -> tuple[torch.Tensor, ...]:
    """Class 1: a bright object in the centre *and* a bright corner; donors: dark centre, dark corner."""
    images = torch.zeros(6, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0
    images[:, :, :2, :2] = 1.0  # the corner shortcut, off the map
    maps = torch.zeros(6, 1, 8, 8)
    maps[:, :, 2:6, 2:6] = 1.0
    donors = torch.zeros(5, 1, 8, 8)
    donors[:, :, 3:5, 3:5] = 0.3  # the donor's own object, on its map: must never be pasted in
    donor_maps = torch.zeros(5, 1, 8, 8)
    donor_maps[:, :, 3:5, 3:5] = 1.0
    return images, maps, donors, donor_maps


def test_background_swap_flags_a_model_that_reads_the_background_only():
    images, maps, donors, donor_maps = _swap_data()
    corner = background_swap(_Reads(slice(0, 2), slice(0, 2)), images, maps, 1, donors, donor_maps, 0.5, 3, 0.1)
    assert corner["accuracy"] == 1.0 and corner["swapped_accuracy"] == 0.0 and corner["drop"] == 1.0 and corner["flagged"]
    assert corner["drop_interval"] == [1.0, 1.0]  # every image flips: no spread
    known = background_swap(_Reads(slice(0, 2), slice(0, 2)), images, maps, 1, donors, donor_maps, 0.5, 3, 0.1,
                            predicted=torch.tensor([1, 1, 1, 0, 0, 0]))  # predictions already made are not made again
    assert known["accuracy"] == 0.5 and known["example_original"] == [1, 1, 1, 0]
    half_read = images.clone()
    half_read[3:, :, :2, :2] = 0.0  # these three were never predicted 1: nothing to lose
    mixed = background_swap(_Reads(slice(0, 2), slice(0, 2)), half_read, maps, 1, donors, donor_maps, 0.5, 3, 0.1)
    half = 1.96 * torch.tensor([1.0, 1, 1, 0, 0, 0]).std().item() / 6 ** 0.5
    assert mixed["drop"] == 0.5 and mixed["drop_interval"] == pytest.approx([0.5 - half, 0.5 + half])
    centre = background_swap(_Reads(slice(2, 6), slice(2, 6)), images, maps, 1, donors, donor_maps, 0.5, 3, 0.1)
    assert centre["drop"] == 0.0 and not centre["flagged"]  # the object is kept: the prediction stays
    assert corner["images"] == 6 and corner["donors"] == 3 and len(corner["examples"]) == 4
    # what is pasted: only pixels off both maps; the object of the image stays, the donor's never comes
    example = corner["examples"][0]
    assert torch.equal(example[:, 2:6, 2:6], images[0, :, 2:6, 2:6]) and float(example[:, :2, :2].max()) == 0.0
    assert corner["example_original"][0] == 1 and corner["example_predicted"][0] == 0


def test_background_swap_needs_maps_on_both_sides_and_checks_shapes():
    images, maps, donors, donor_maps = _swap_data()
    model = _Reads(slice(0, 2), slice(0, 2))
    assert background_swap(model, images, torch.zeros_like(maps), 1, donors, donor_maps, 0.5, 2, 0.1) is None
    assert background_swap(model, images, maps, 1, donors, torch.zeros_like(donor_maps), 0.5, 2, 0.1) is None
    with pytest.raises(ValueError, match="donors"):
        background_swap(model, images, maps, 1, donors[:, :, :4], donor_maps, 0.5, 2, 0.1)
    assert on_map(maps, 0.5).sum() == 6 * 16 and not on_map(torch.zeros_like(maps), 0.5).any()


def test_background_concepts_split_the_drop_exactly_under_a_linear_head():
    """The toy model's head after its concept layer is linear: restoring each concept gives back
    exactly its part of the drop, so the shares add up to 1; no drop, no shares."""
    images, labels, _ = toy_data(n=6)
    craft = Craft(toy_model(), 2, n_concepts=3, patch_size=6, nb_design=4, seed=0, baseline=0.0)
    bank = craft.fit(images, 1, importance=False)
    composites = torch.cat([images * 1.5, images * 2.0])  # two "swaps" per image, draw-major
    shape = tuple(images.shape[1:])
    logits = craft.coefficient_logits(bank, craft.transform(bank, composites), shape)[:, 1]
    originals = craft.coefficient_logits(bank, craft.transform(bank, images), shape)[:, 1].repeat(2)
    assert float((originals - logits).sum()) > 0  # a drop to share out
    shares = background_concepts(craft, bank, 1, images, composites)
    assert float(shares.sum()) == pytest.approx(1.0, abs=1e-4) and shares.abs().max() > 0.1
    assert background_concepts(craft, bank, 1, images, images.repeat(2, 1, 1, 1)).abs().max() == 0  # nothing changed
    flat = Craft(toy_model(), 3, n_concepts=3, patch_size=6, nb_design=4, seed=0, baseline=0.0)  # no spatial dims
    flat_bank = flat.fit(images, 1, importance=False)
    assert float(background_concepts(flat, flat_bank, 1, images, composites).sum()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="multiple"):
        background_concepts(craft, bank, 1, images, composites[:7])


def test_analysis_runs_the_swap_only_with_donors(tmp_path: Path):
    images, labels, maps = toy_data(n=6)
    donors, _, donor_maps = toy_data(n=5, seed=1)
    settings = toy_settings(background_donors=2)
    with_donors = analyze_class(toy_model(), images, labels, maps, 1, "c1", settings, NAMES, donors=(donors, donor_maps))
    b = with_donors.background
    assert b is not None and b["images"] == 6 and b["donors"] == 2 and b["drop"] == b["accuracy"] - b["swapped_accuracy"]
    assert b["drop_interval"][0] <= b["drop"] <= b["drop_interval"][1]
    assert len(b["concept_share"]) == settings.n_concepts
    document = class_document(with_donors, tmp_path, "img/class/1")
    assert document["background"]["threshold"] == settings.flag_background
    assert all((tmp_path / e["swapped"]).is_file() for e in document["background"]["examples"])
    assert analyze_class(toy_model(), images, labels, maps, 1, "c1", settings, NAMES).background is None
    off = analyze_class(toy_model(), images, labels, maps, 1, "c1", toy_settings(background_donors=0), NAMES,
                        donors=(donors, donor_maps))
    assert off.background is None and class_document(off, tmp_path, "img/class/1b")["background"] is None


def test_toy_model_end_to_end_with_maco(tmp_path: Path):
    images, labels, maps = toy_data(n=6)
    settings = toy_settings(maco=True, maco_steps=3)
    a = analyze_class(toy_model(), images, labels, maps, 1, "c1", settings, NAMES)
    k = settings.n_concepts
    assert a.importance.sum() == pytest.approx(1.0, abs=1e-5) and (a.importance[:-1] >= a.importance[1:]).all()
    assert a.per_image.shape == (6, k) and a.top_concept.shape == (6,) and int(a.n_top_images.sum()) == 6
    assert a.profile.shape == (k, 6 * 9)  # 16-px images, patch 6, stride 4: 3×3 crops each
    assert a.pictures is not None and a.pictures.shape[0] == k
    assert a.class_effect.shape == (k, 3) and a.proximity.shape == (k, k)
    assert a.off_map is not None and ((a.off_map >= 0) & (a.off_map <= 1)).all()
    assert a.embedding_method == "pca" and a.embedding.shape == (6, 2)
    assert a.certified is None  # a plain conv net carries no certificate
    torch.save(a, tmp_path / "a.pt")  # the cache holds it as is, and reads it back with the safe loader
    back = torch.load(tmp_path / "a.pt")
    assert isinstance(back, ClassAnalysis) and torch.equal(back.profile, a.profile) and back.settings == a.settings

    document = class_document(a, tmp_path, "img/class/1")
    validate(json.loads(json.dumps(document)), "round trip")
    paths = _paths(document)
    assert paths and all(not p.startswith("/") and (tmp_path / p).is_file() for p in paths)
    assert all(c["picture"] is not None for c in document["concepts"])
    assert len(document["map"]["points"]) == 6 and len(document["saliency"]) == 2
    assert document["alignment"] is not None and all(s["human"] for s in document["saliency"])


def test_class_effects_of_a_linear_head_are_presence_times_head_alignment():
    """Layer feeding a linear head through a spatial mean: removing concept j lowers logit m by mean(u_j)·⟨W_j, w_m⟩."""
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    images = torch.rand(6, 1, 8, 8)
    craft = Craft(model, layer=1, n_concepts=2, patch_size=4)
    bank = craft.fit(images, 0, importance=False)
    effects = craft.class_effects(bank, images)  # (N, k, classes)
    u = craft.transform(bank, images)  # (N, h, w, k)
    expected = u.mean((1, 2))[:, :, None] * (bank.components @ head.weight.detach().T)[None]
    assert effects.shape == (6, 2, 3)
    assert torch.allclose(effects, expected, atol=1e-5)


def test_no_maps_gives_nulls_and_certified_model_gives_radii(tmp_path: Path):
    images, labels, _ = toy_data(n=5)
    model = toy_model()
    model.certificate = "vector"  # pretend: the radii come from the margins
    a = analyze_class(model, images, labels, None, 1, "c1", toy_settings(), NAMES)
    assert a.off_map is None and a.alignment is None and not a.flagged.any()
    assert a.certified is not None and a.certified["radii"].shape == (5,)
    document = class_document(a, tmp_path, "img/class/1")
    assert document["alignment"] is None and document["flags"] == []
    assert all(c["off_map_share"] is None for c in document["concepts"])
    assert all(s["human"] is None and s["alignment"] is None for s in document["saliency"])
    assert document["certified"]["histogram"]["counts"] and sum(document["certified"]["histogram"]["counts"]) == 5
    radii, correct = a.certified["radii"], a.predicted == a.labels
    expected = [float((correct & (radii >= e)).float().mean()) for e in toy_settings().epsilons]
    assert a.certified["epsilons"] == list(toy_settings().epsilons) and a.certified["accuracy"] == pytest.approx(expected)


def test_settings_are_json_and_checked():
    settings = AtlasSettings()
    assert json.loads(json.dumps(settings.as_dict()))["epsilons"] == list(settings.epsilons)
    with pytest.raises(ValueError, match="flag_off_map"):
        replace(settings, flag_off_map=1.5)


def test_bad_input_names_the_class():
    images, labels, maps = toy_data(n=4)
    with pytest.raises(ValueError, match=r"class 1 \(c1\).*human maps"):
        analyze_class(toy_model(), images, labels, maps[:2], 1, "c1", toy_settings(), NAMES)
    with pytest.raises(ValueError, match=r"class 1 \(c1\)"):
        analyze_class(toy_model(), images, labels, maps, 1, "c1", toy_settings(n_concepts=50), NAMES)


def test_contribution_maps_are_coefficients_times_the_logit_slope_along_the_concept():
    """Spatial-mean linear head: ∂logit/∂a(pos) = w_c / (h·w) everywhere, so concept j's map is u_j · ⟨W_j, w_c⟩ / (h·w)."""
    import torch.nn.functional as F

    from harmonia.atlas.analysis import contribution_maps
    from harmonia.concepts import Craft

    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()
    images = torch.rand(4, 1, 16, 16)
    craft = Craft(model, 2, n_concepts=3, patch_size=6, nb_design=4)
    bank = craft.fit(images, 1, importance=False)
    maps = contribution_maps(craft, bank, images)
    u = craft.transform(bank, images)  # (N, 8, 8, k)
    slope = bank.components @ head.weight[1].detach() / 64
    expected = F.interpolate((u * slope).clamp_min(0).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic", align_corners=False).clamp_min(0)
    assert maps.shape == (4, 3, 16, 16) and torch.allclose(maps, expected, atol=1e-6)
    with pytest.raises(ValueError, match="off_map_maps"):
        AtlasSettings(off_map_maps="somewhere")


def test_banks_of_different_sizes_leave_extra_concepts_unmatched(toy_analysis: ClassAnalysis):
    from harmonia.atlas.analysis import match_pairs

    b = _permuted(toy_analysis, [1, 0])  # two of the three concepts, swapped
    b.n_top_images = b.n_top_images[:2]
    pairs = match_pairs(toy_analysis, b)
    assert sorted((p["a"], p["b"]) for p in pairs) == [(0, 1), (1, 0)]
    assert all(p["cosine"] == pytest.approx(1.0, abs=1e-5) for p in pairs)
