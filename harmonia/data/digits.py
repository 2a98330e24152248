"""Decoy digits: Harmonia's embedded dataset, built from scikit-learn's 8×8 digits.

After Ross et al. (2017)'s DecoyMNIST: each digit sits at a random place on a 32×32 canvas
with a 4×4 *decoy* square in a random corner. In the training split the decoy's shade
encodes the label (``1 - 0.09·label``), a shortcut a plain classifier learns; in validation
and test the shade is random, so only a model that looks at the digit generalizes. The human
map is the digit's own pixels, blurred: it tells the harmonization loss where to look.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import gaussian_blur

from harmonia.data.sample import Sample

Split = Literal["train", "val", "test"]
DecoyMode = Literal["label", "random", "none"]

CANVAS = 32
DIGIT = 24  # 8×8 upsampled ×3 (nearest)
DECOY = 4
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


def split_indices(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stratified 70/15/15 split of sample indices, deterministic given ``seed``."""
    indices = np.arange(len(labels))
    train, rest = train_test_split(
        indices, train_size=SPLIT_FRACTIONS[0], stratify=labels, random_state=seed
    )
    val, test = train_test_split(rest, train_size=0.5, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def label_shade(labels: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The training split's decoy shade of each label: ``1 - 0.09·label``."""
    return 1.0 - 0.09 * labels


def decoy_origin(corner: int) -> tuple[int, int]:
    """Top-left pixel ``(row, col)`` of the decoy square in corner 0..3 (TL, TR, BL, BR)."""
    return (0 if corner in (0, 1) else CANVAS - DECOY), (0 if corner in (0, 2) else CANVAS - DECOY)


def render(
    digits: np.ndarray, labels: np.ndarray, decoy: DecoyMode, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place digits on canvases with a decoy; return ``(images, human maps, decoy corners)``.

    ``digits`` is ``(N,8,8)`` in [0,1]. Images and maps are ``(N,32,32)`` float32; corners are
    0..3 (top-left, top-right, bottom-left, bottom-right), -1 when ``decoy="none"``.
    """
    n = len(digits)
    big = digits.repeat(3, axis=1).repeat(3, axis=2)  # nearest ×3 → (N,24,24)
    offsets = rng.integers(0, CANVAS - DIGIT + 1, size=(n, 2))
    corners = rng.integers(0, 4, size=n) if decoy != "none" else np.full(n, -1)
    if decoy == "label":
        shades = label_shade(labels.astype(np.float64))
    else:
        shades = rng.uniform(0.1, 1.0, size=n)
    images = np.zeros((n, CANVAS, CANVAS), dtype=np.float32)
    masks = np.zeros((n, CANVAS, CANVAS), dtype=np.float32)
    for i in range(n):
        y, x = offsets[i]
        images[i, y : y + DIGIT, x : x + DIGIT] = big[i]
        masks[i, y : y + DIGIT, x : x + DIGIT] = big[i] > 0.1
    maps = gaussian_blur(torch.from_numpy(masks)[:, None], kernel_size=7, sigma=1.0)[:, 0].numpy()
    for i in range(n):
        if corners[i] < 0:
            continue
        top, left = decoy_origin(corners[i])
        # The decoy is painted over the digit and is never part of what a human looks at.
        images[i, top : top + DECOY, left : left + DECOY] = shades[i]
        maps[i, top : top + DECOY, left : left + DECOY] = 0.0
    return images, maps, corners


class DecoyDigits(Dataset):
    """One split of decoy digits as ``Sample(image, human_map, has_map, label)`` tensors.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (stratified 70/15/15 with ``seed``).
        seed: fixes the split, placement, corners and shades; same seed, same data.
        decoy: shade rule; default ``"label"`` for train (the shortcut) and ``"random"`` for
            val/test. ``"random"`` on train gives the *oracle* variant; ``"none"`` no decoy.
        channels: 1, or 3 (grey replicated) for models that expect RGB.
        map_fraction: fraction of samples that keep their human map (``has_map``), chosen
            with ``seed``; the others train the classification objective only.
    """

    def __init__(
        self,
        split: Split = "train",
        seed: int = 0,
        decoy: DecoyMode | None = None,
        channels: int = 1,
        map_fraction: float = 1.0,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test'; got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels}")
        if not 0.0 <= map_fraction <= 1.0:
            raise ValueError(f"map_fraction must lie in [0, 1]; got {map_fraction}")
        decoy = decoy or ("label" if split == "train" else "random")
        if decoy not in ("label", "random", "none"):
            raise ValueError(f"decoy must be 'label', 'random' or 'none'; got {decoy!r}")
        raw = load_digits()
        labels_all = raw.target.astype(np.int64)
        index = split_indices(labels_all, seed)[split]
        # One stream per split so that each split is the same whatever else is built.
        rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
        digits = (raw.images[index] / 16.0).astype(np.float32)
        labels = labels_all[index]
        images, maps, corners = render(digits, labels, decoy, rng)
        has_map = np.zeros(len(index), dtype=bool)
        has_map[rng.permutation(len(index))[: round(map_fraction * len(index))]] = True
        maps[~has_map] = 0.0

        self.split, self.seed, self.decoy = split, seed, decoy
        self.images = torch.from_numpy(images)[:, None].expand(-1, channels, -1, -1).contiguous()
        self.maps = torch.from_numpy(maps)[:, None].contiguous()
        self.has_map = torch.from_numpy(has_map)
        self.labels = torch.from_numpy(labels)
        self.corners = torch.from_numpy(corners)
        self.source_index = torch.from_numpy(index)
        self.num_classes = 10

    def with_decoy_shades(self, shades: torch.Tensor) -> torch.Tensor:
        """A copy of the images with each decoy square repainted in ``shades[i]`` (shape ``(N,)``).

        Counterfactual probes of shortcut reliance: e.g. the shade another class had in the
        training split. The square is painted over the digit, as when the split was built.
        """
        if (self.corners < 0).any():
            raise ValueError(f"{self.split} split was built with decoy='none': there is no decoy square to repaint")
        if shades.shape != (len(self),):
            raise ValueError(f"need one shade per sample, shape ({len(self)},); got {tuple(shades.shape)}")
        images = self.images.clone()
        for i, corner in enumerate(self.corners.tolist()):
            top, left = decoy_origin(corner)
            images[i, :, top : top + DECOY, left : left + DECOY] = shades[i]
        return images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.images[i], self.maps[i], self.has_map[i], self.labels[i])


def decoy_reliance(model: torch.nn.Module, seed: int = 0, draws: int = 3, batch_size: int = 256) -> torch.Tensor:
    """How much each class leans on the decoy: ``(10,)`` training-split accuracy with the label's
    shade minus the accuracy with the square repainted in a random shade (as in validation),
    averaged over ``draws`` seeded draws. The ground truth a shortcut detector should find.

    ``model`` maps ``(N, C, 32, 32)`` images in [0, 1] to logits; its channel count is read from
    its first convolution (the dataset's grey images are repeated to match).
    """
    data = DecoyDigits("train", seed=seed)
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 1
    device = next(model.parameters()).device

    def per_class_accuracy(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            predicted = torch.cat([
                model(images[s : s + batch_size, :1].expand(-1, channels, -1, -1).to(device)).argmax(1).cpu()
                for s in range(0, len(images), batch_size)
            ])
        return torch.stack([(predicted[data.labels == c] == c).float().mean() for c in range(10)])

    generator = torch.Generator().manual_seed(seed)
    random = torch.stack([
        per_class_accuracy(data.with_decoy_shades(0.1 + 0.9 * torch.rand(len(data), generator=generator)))
        for _ in range(draws)
    ]).mean(0)
    return per_class_accuracy(data.images) - random
