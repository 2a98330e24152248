"""Decoy digits: determinism, splits, decoy rules, human maps."""

import numpy as np
import pytest
import torch

from harmonia.data import DecoyDigits, DecoyDigitsDataModule, Sample
from harmonia.data.digits import CANVAS, DECOY, label_shade


def _decoy_shades(ds: DecoyDigits) -> torch.Tensor:
    """Read the decoy square's shade back from each image, using the recorded corner."""
    shades = []
    for img, corner in zip(ds.images[:, 0], ds.corners):
        top = 0 if corner in (0, 1) else CANVAS - DECOY
        left = 0 if corner in (0, 2) else CANVAS - DECOY
        patch = img[top : top + DECOY, left : left + DECOY]
        assert torch.all(patch == patch[0, 0])  # a uniform square
        shades.append(patch[0, 0])
    return torch.stack(shades)


def test_deterministic_given_seed() -> None:
    a, b = DecoyDigits("train", seed=3), DecoyDigits("train", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.maps, b.maps) and torch.equal(a.labels, b.labels)
    c = DecoyDigits("train", seed=4)
    assert not torch.equal(a.images, c.images)


def test_stratified_disjoint_splits() -> None:
    splits = {s: DecoyDigits(s, seed=0) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == pytest.approx(0.70 * 1797, abs=2)
    ids = [set(d.source_index.tolist()) for d in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    for d in splits.values():  # every class present in proportion (stratified)
        counts = torch.bincount(d.labels, minlength=10).float()
        assert counts.min() / counts.max() > 0.85


def test_train_decoy_encodes_the_label() -> None:
    ds = DecoyDigits("train", seed=0)
    torch.testing.assert_close(_decoy_shades(ds), 1.0 - 0.09 * ds.labels.float())


def test_test_decoy_is_independent_of_label() -> None:
    ds = DecoyDigits("test", seed=0)
    shades = _decoy_shades(ds).numpy()
    labels = ds.labels.numpy()
    assert shades.min() >= 0.1 and shades.max() <= 1.0
    # the shade carries no label information: correlation ~0 and per-class means all alike
    assert abs(np.corrcoef(shades, labels)[0, 1]) < 0.15
    means = [shades[labels == k].mean() for k in range(10)]
    assert max(means) - min(means) < 0.25
    # and a nearest-shade classifier fit on train does no better than chance on test
    train_shade_of_label = 1.0 - 0.09 * np.arange(10)
    guess = np.abs(shades[:, None] - train_shade_of_label[None]).argmin(1)
    assert (guess == labels).mean() < 0.2


def test_corners_are_uniform_and_independent_of_label() -> None:
    ds = DecoyDigits("train", seed=0)
    counts = torch.bincount(ds.corners, minlength=4).float()
    assert counts.min() / counts.max() > 0.8


def test_human_map_is_the_blurred_digit_and_zero_on_the_decoy() -> None:
    ds = DecoyDigits("val", seed=0)
    for i in range(20):
        img, hmap, has_map, _ = ds[i]
        assert has_map and hmap.min() >= 0 and hmap.max() <= 1.0 + 1e-6
        corner = int(ds.corners[i])
        top = 0 if corner in (0, 1) else CANVAS - DECOY
        left = 0 if corner in (0, 2) else CANVAS - DECOY
        assert hmap[0, top : top + DECOY, left : left + DECOY].abs().max() == 0
        digit = img[0] > 0.1
        digit[top : top + DECOY, left : left + DECOY] = False
        # the map is high on the digit and low far from it
        assert hmap[0][digit].mean() > 0.5
        assert hmap[0][~digit].mean() < 0.15


def test_options() -> None:
    rgb = DecoyDigits("val", channels=3)
    assert rgb[0].image.shape == (3, 32, 32)
    oracle = DecoyDigits("train", decoy="random")
    assert abs(np.corrcoef(_decoy_shades(oracle).numpy(), oracle.labels.numpy())[0, 1]) < 0.15
    none = DecoyDigits("train", decoy="none")
    assert (none.corners == -1).all()
    part = DecoyDigits("train", map_fraction=0.25)
    assert part.has_map.float().mean() == pytest.approx(0.25, abs=0.01)
    assert part.maps[~part.has_map].abs().sum() == 0
    for bad in ({"split": "dev"}, {"channels": 2}, {"map_fraction": 1.5}, {"decoy": "corner"}):
        with pytest.raises(ValueError):
            DecoyDigits(**bad)


def test_datamodule_yields_the_batch_contract() -> None:
    dm = DecoyDigitsDataModule(batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Sample)
    assert batch.image.shape == (16, 1, 32, 32) and batch.image.dtype == torch.float32
    assert batch.human_map.shape == (16, 1, 32, 32)
    assert batch.has_map.dtype == torch.bool and batch.label.dtype == torch.int64
    assert 0 <= batch.image.min() and batch.image.max() <= 1


def test_decoys_can_be_repainted_for_counterfactual_probes() -> None:
    train = DecoyDigits("train", seed=0)
    torch.testing.assert_close(train.with_decoy_shades(label_shade(train.labels.float())), train.images)
    test = DecoyDigits("test", seed=0)
    painted = test.with_decoy_shades(torch.full((len(test),), 0.5))
    changed = (painted != test.images).flatten(1).sum(1)
    assert changed.max() <= DECOY * DECOY and changed.sum() > 0  # only the decoy squares move
    assert torch.all(_decoy_shades(type("D", (), {"images": painted, "corners": test.corners})()) == 0.5)
    with pytest.raises(ValueError, match="one shade per sample"):
        test.with_decoy_shades(torch.zeros(3))
    with pytest.raises(ValueError, match="decoy='none'"):
        DecoyDigits("val", decoy="none").with_decoy_shades(torch.zeros(len(DecoyDigits("val"))))
