"""Image folders (CSV index, PNG/.npy maps, bad input) and joint transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import folder, rewrite_index

from harmonia.data import BadSampleError, FolderDataset, JointTransform


def test_folder_with_map_column(tmp_path: Path) -> None:
    root = folder(tmp_path, count=6, mapped=(0, 1, 2, 4))
    ds = FolderDataset(str(root), num_classes=3, size=48)
    assert len(ds) == 6 and ds.mapped_count == 4
    flags = [bool(ds[i].has_map) for i in range(6)]
    assert flags == [True, True, True, False, True, False]
    assert torch.count_nonzero(ds[3].human_map) == 0  # the contract: unmapped → zero map
    png, npy = ds[0].human_map, ds[1].human_map  # PNG scaled to [0,1]; .npy as stored
    assert 0.5 < png.max() <= 1 and 0.5 < npy.max() <= 1
    assert ds[0].image.shape == (3, 48, 48) and ds[0].label.item() == 0


def test_folder_without_map_column_finds_maps_by_name(tmp_path: Path) -> None:
    root = folder(tmp_path, count=5, mapped=(1, 2), map_column=False)
    ds = FolderDataset(str(root), size=32)
    assert ds.mapped_count == 2 and [bool(ds[i].has_map) for i in range(5)] == [False, True, True, False, False]


def _break(root: Path, case: str) -> None:
    if case == "missing_map":
        (root / "maps" / "a" / "002.png").unlink()
    elif case == "map_size":
        np.save(root / "maps" / "a" / "001.npy", np.ones((10, 10), np.float32))
    elif case == "nan_map":
        np.save(root / "maps" / "a" / "001.npy", np.full((48, 48), np.nan, np.float32))
    elif case == "negative_map":
        np.save(root / "maps" / "a" / "001.npy", -np.ones((48, 48), np.float32))
    elif case == "bad_image":
        (root / "images" / "a" / "002.png").write_bytes(b"\x89PNG not really")
    elif case == "label":
        rewrite_index(root, lambda rows: [r if i != 2 else [r[0], "7", r[2]] for i, r in enumerate(rows)])


@pytest.mark.parametrize("case, line, message", [
    ("missing_map", 4, r"map file .*002\.png does not exist"),
    ("map_size", 3, r"human map is \(10, 10\) but the image is \(48, 48\)"),
    ("nan_map", 3, "NaN/inf"),
    ("negative_map", 3, "negative values"),
    ("bad_image", 4, r"cannot decode image .*002\.png"),
    ("label", 4, r"label 7 out of range \[0, 3\)"),
])
def test_bad_folder_samples_are_named_or_skipped(tmp_path: Path, case: str, line: int, message: str) -> None:
    root = folder(tmp_path, count=4, mapped=(0, 1, 2))
    _break(root, case)
    ds = FolderDataset(str(root), num_classes=3, size=48)
    with pytest.raises(BadSampleError, match=rf"index\.csv, line {line} .*: .*{message}"):
        ds[line - 2]
    skipping = FolderDataset(str(root), num_classes=3, size=48, skip_bad_samples=True)
    assert [skipping[i] is None for i in range(4)] == [i == line - 2 for i in range(4)]
    assert skipping.skips.skipped == 1


def test_bad_index_header(tmp_path: Path) -> None:
    root = folder(tmp_path, count=2)
    (root / "index.csv").write_text("file,class\na/000.png,0\n")
    with pytest.raises(BadSampleError, match="line 1: header must be"):
        FolderDataset(str(root))


def test_one_pixel_map_follows_the_image_content() -> None:
    """A map marking one pixel still marks the same image content after crop/flip/resize."""
    for seed in range(12):
        torch.manual_seed(seed)
        gen = np.random.default_rng(seed)
        y, x = (int(v) for v in gen.integers(40, 88, 2))
        image = torch.zeros(3, 128, 128, dtype=torch.uint8)
        image[:, y - 1 : y + 2, x - 1 : x + 2] = 255  # a small bright square: the content
        human_map = torch.zeros(1, 128, 128)
        human_map[0, y, x] = 1.0  # a map marking the centre pixel
        transform = JointTransform(64, train=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=(0.3, 0.3, 0.3, 0.05))
        out_image, out_map = transform(image, human_map)
        assert out_image.dtype == torch.float32 and 0 <= out_image.min() and out_image.max() <= 1
        assert out_map.min() >= 0 and out_map.shape == (1, 64, 64)
        if out_map.max() == 0:
            continue  # the crop left the pixel out: both must then miss it
        peak_map = divmod(int(out_map.flatten().argmax()), 64)
        peak_image = divmod(int(out_image.sum(0).flatten().argmax()), 64)
        assert abs(peak_map[0] - peak_image[0]) <= 1 and abs(peak_map[1] - peak_image[1]) <= 1, seed
    # jitter is applied to the image only: with and without it the map is the same
    torch.manual_seed(3)
    _, plain = JointTransform(64, train=True)(image, human_map)
    torch.manual_seed(3)
    _, jittered = JointTransform(64, train=True, color_jitter=(0.5, 0.5, 0.5, 0.1))(image, human_map)
    assert torch.equal(plain, jittered)


def test_normalization_is_opt_in() -> None:
    image = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    plain, _ = JointTransform(8)(image, torch.zeros(1, 8, 8))
    assert torch.allclose(plain, torch.full_like(plain, 128 / 255))
    normalized, _ = JointTransform(8, normalize=True)(image, torch.zeros(1, 8, 8))
    torch.testing.assert_close(normalized[0], torch.full((8, 8), (128 / 255 - 0.485) / 0.229))


def test_batched_geometry_matches_the_per_sample_path() -> None:
    """JointTransform.apply_batch: the same box and flip give the per-sample path's map and image."""
    from torchvision.transforms.v2 import functional as TF

    from harmonia.data.heatmap import blur_heatmap
    from harmonia.data.transforms import crop_resize_flip

    gen = torch.Generator().manual_seed(0)
    image = (torch.rand(3, 128, 128, generator=gen) * 255).to(torch.uint8)
    heat = torch.rand(1, 128, 128, generator=gen)
    top, left, height, width = 20, 30, 70, 90
    box = torch.tensor([[left, top, left + width, top + height]], dtype=torch.float32)
    blurred = blur_heatmap(heat, (128, 128))
    out = crop_resize_flip(torch.cat([image.float() / 255, blurred])[None], box, torch.tensor([False]), 64)
    worker_map = torch.nn.functional.interpolate(blurred[None, :, top:top + height, left:left + width],
                                                 size=(64, 64), mode="bilinear", align_corners=False)[0]
    # equal inside; the last row/column differ only in how the crop border is sampled
    torch.testing.assert_close(out[0, 3:, :-1, :-1], worker_map[:, :-1, :-1], rtol=1e-4, atol=1e-6)
    worker_image = TF.resized_crop(image.float() / 255, top, left, height, width, [64, 64], antialias=False)
    torch.testing.assert_close(out[0, :3, :-1, :-1], worker_image[:, :-1, :-1], rtol=0, atol=1e-5)
    # apply_batch: one draw per sample, the same for image and map; evaluation is a plain resize
    images, maps = torch.rand(6, 3, 48, 40, generator=gen), torch.rand(6, 1, 48, 40, generator=gen)
    stacked = torch.cat([images, images[:, :1]], dim=1)  # the map is the image's first channel
    train = JointTransform(24, train=True, scale=(0.3, 1.0))
    out_image, out_map = train.apply_batch(stacked[:, :3].clone(), stacked[:, 3:].clone())
    assert out_image.shape == (6, 3, 24, 24) and torch.allclose(out_map, out_image[:, :1], atol=1e-6)
    evaluation = JointTransform(24).apply_batch(images, maps)
    torch.testing.assert_close(evaluation[1], torch.nn.functional.interpolate(maps, size=(24, 24), mode="bilinear"))
    # the one-pixel check on the batched crop + flip
    for seed in range(6):
        gen = np.random.default_rng(seed)
        y, x = (int(v) for v in gen.integers(40, 88, 2))
        stack = torch.zeros(1, 4, 128, 128)
        stack[0, :3, y - 1 : y + 2, x - 1 : x + 2] = 1.0
        stack[0, 3, y, x] = 1.0
        box = torch.tensor([[x - 30.0, y - 40.0, x + 50.0, y + 30.0]])
        out = crop_resize_flip(stack, box, torch.tensor([seed % 2 == 1]), 64)
        peak_map = divmod(int(out[0, 3].flatten().argmax()), 64)
        peak_image = divmod(int(out[0, :3].sum(0).flatten().argmax()), 64)
        assert abs(peak_map[0] - peak_image[0]) <= 1 and abs(peak_map[1] - peak_image[1]) <= 1
        assert (peak_map[1] > 32) == (seed % 2 == 1)  # x - 30 → 30/80 of the width; flipped: right half


def test_batched_crop_boxes_follow_random_resized_crop() -> None:
    """draw_boxes (the batched crop) draws the boxes of v2.RandomResizedCrop.make_params."""
    from torchvision.transforms import v2

    from harmonia.data.transforms import draw_boxes

    crop = v2.RandomResizedCrop(224, scale=(0.08, 1.0))
    torch.manual_seed(0)
    n, height, width = 3000, 256, 192
    params = [crop.make_params([torch.empty(3, height, width)]) for _ in range(n)]
    reference = torch.tensor([[p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]] for p in params],
                             dtype=torch.float32)
    ours = draw_boxes(n, height, width, crop.scale, crop.ratio, np.random.default_rng(0))
    assert ours.shape == (n, 4) and torch.equal(ours, ours.round())
    assert (ours[:, :2] >= 0).all() and (ours[:, 2] <= width).all() and (ours[:, 3] <= height).all()
    assert ((ours[:, 2:] - ours[:, :2]) > 0).all()

    def features(boxes: torch.Tensor) -> torch.Tensor:  # width, height, centre x, centre y
        return torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                            (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)

    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    # quantiles of 3000 draws agree within a few pixels (≈ 3 standard errors)
    torch.testing.assert_close(features(ours).quantile(q, dim=0), features(reference).quantile(q, dim=0),
                               rtol=0, atol=6.0)
    # no try fits a 10×200 image at scale ≥ 0.9: torchvision's central fallback, the same box
    wide = v2.RandomResizedCrop(8, scale=(0.9, 1.0))
    p = wide.make_params([torch.empty(3, 10, 200)])
    expected = torch.tensor([[p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]]], dtype=torch.float32)
    torch.testing.assert_close(draw_boxes(1, 10, 200, wide.scale, wide.ratio, np.random.default_rng(1)), expected)
