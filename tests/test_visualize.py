"""MACO feature visualization: exact magnitude, determinism, toy models with known answers,
concept objectives, side effects, sharding, the spectrum file, the figure and the callback."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from harmonia.concepts import Craft
from harmonia.concepts.nmf import nmf_transform
from harmonia.visualize import (
    SMALL_INPUT_SETTINGS,
    Channel,
    ClassLogit,
    Concept,
    Direction,
    ModelOutputs,
    Spectrum,
    concept_pictures,
    figure_grid,
    fourier_image,
    maco,
    maco_figure,
    objective_seed,
    run_maco,
    save_figure,
    to_image,
    with_pictures,
)
from harmonia.visualize.maco import crop_and_resize, resample_matrix

ROOT = Path(__file__).resolve().parents[1]
FAST = {**SMALL_INPUT_SETTINGS, "steps": 6, "crops": 3}


def tiny_cnn(channels: int = 1, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    )


def smooth_images(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# --- the parametrization -------------------------------------------------------------------

@pytest.mark.parametrize("size", [(16, 16), (15, 16), (16, 13)])
def test_magnitude_preserved_exactly(size: tuple[int, int]) -> None:
    """The optimized image's spectrum, before the pointwise steps, has exactly the fixed magnitude."""
    spectrum = Spectrum.from_images(smooth_images(8, 3, size=32), size=size)
    model = tiny_cnn(3)
    result = run_maco(model, [ClassLogit(0), ClassLogit(2)], spectrum, input_size=16, **FAST)
    spatial = fourier_image(spectrum.magnitude, result.phase, size)
    assert spatial.shape == (2, 3, *size)
    measured = torch.fft.rfft2(spatial).abs()
    scale = spectrum.magnitude.max()
    torch.testing.assert_close(measured / scale, spectrum.magnitude.expand_as(measured) / scale, atol=2e-6, rtol=0)
    assert not torch.equal(result.phase[0], result.phase[1])  # the phase did move, differently per objective


def test_resampling_is_exact_for_the_identity_crop_and_keeps_constants() -> None:
    rows = resample_matrix(torch.tensor([0.0]), torch.tensor([1.0]), 12, 12)
    torch.testing.assert_close(rows[0], torch.eye(12))
    shrink = resample_matrix(torch.tensor([0.25]), torch.tensor([0.5]), 5, 40)  # 20 px → 5 px: antialiased
    torch.testing.assert_close(shrink.sum(-1), torch.ones(1, 5))
    assert (shrink[0] > 0).sum(1).min() > 2  # wider than bilinear's two taps
    image = torch.arange(64.0).view(1, 1, 8, 8)
    r = resample_matrix(torch.tensor([0.5]), torch.tensor([0.5]), 4, 8)  # the bottom-right 4×4 block
    crop = crop_and_resize(image, r.view(1, 1, 4, 8), r.view(1, 1, 4, 8))
    torch.testing.assert_close(crop[0, 0, 0], image[0, 0, 4:, 4:])


def test_deterministic_under_a_seed() -> None:
    spectrum = Spectrum.from_images(smooth_images(8))
    model = tiny_cnn()
    a = run_maco(model, [ClassLogit(0), ClassLogit(1)], spectrum, seed=3, **FAST)
    b = run_maco(model, [ClassLogit(0), ClassLogit(1)], spectrum, seed=3, **FAST)
    c = run_maco(model, [ClassLogit(0), ClassLogit(1)], spectrum, seed=4, **FAST)
    assert torch.equal(a.image, b.image) and torch.equal(a.alpha, b.alpha)
    assert not torch.allclose(a.image, c.image)


def test_an_objective_does_not_depend_on_its_batch() -> None:
    """Objectives sharded with their own seeds reproduce the batched run (what DDP relies on)."""
    spectrum = Spectrum.from_images(smooth_images(8))
    model = tiny_cnn()
    objectives = [ClassLogit(c) for c in (0, 1, 2, 0)]
    full = run_maco(model, objectives, spectrum, seed=7, **FAST)
    for shard in ([0, 2], [1, 3]):
        part = run_maco(model, [objectives[i] for i in shard], spectrum, seed=[objective_seed(7, i) for i in shard], **FAST)
        torch.testing.assert_close(part.image, full.image[shard], atol=1e-5, rtol=0)
        torch.testing.assert_close(part.alpha, full.alpha[shard], atol=1e-5, rtol=1e-4)
    # objectives 0 and 3 are the same class with different seeds: different pictures
    assert not torch.allclose(full.image[0], full.image[3])


def test_spectrum_inverts_the_parametrization() -> None:
    """An image MACO draws, measured back, has the magnitude it was drawn with (colour matrix included)."""
    spectrum = Spectrum.from_images(smooth_images(6, 3, size=16))
    phase = torch.randn(1, 3, 16, 9)
    image = to_image(spectrum.magnitude, phase, spectrum)
    measured = Spectrum.from_images(image).magnitude
    ratio = measured[:, 1:, 1:] / spectrum.magnitude[:, 1:, 1:]  # DC aside (the standardization moves it)
    assert ratio.std() / ratio.mean() < 0.05


def test_spectrum_file_and_loader(tmp_path: Path) -> None:
    images = smooth_images(10, 3, size=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(10)), batch_size=4)
    from_loader = Spectrum.from_images(loader)
    from_tensor = Spectrum.from_images(images)
    torch.testing.assert_close(from_loader.magnitude, from_tensor.magnitude)
    path = from_tensor.save(tmp_path / "run" / "maco_spectrum.pt")
    loaded = Spectrum.load(path)
    assert loaded.size == (16, 16) and loaded.value_range == (0.0, 1.0)
    torch.testing.assert_close(loaded.magnitude, from_tensor.magnitude)
    torch.testing.assert_close(loaded.color_matrix, from_tensor.color_matrix)
    assert path.stat().st_size < 20_000
    assert Spectrum.from_images(images, size=24).size == (24, 24)
    assert from_tensor.resized(32).magnitude.shape == (3, 32, 17)
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a MACO spectrum"):
        Spectrum.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no images"):
        Spectrum.from_images(images[:0])


# --- toy models with a known answer --------------------------------------------------------

class Grating(nn.Module):
    """The logit is the image's projection on one cosine grating: it sees only that frequency."""

    input_shape = (1, 16, 16)

    def __init__(self, ky: int, kx: int, shift: float) -> None:
        super().__init__()
        y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        self.register_buffer("template", torch.cos(2 * math.pi * (ky * y + kx * x) / 16 + shift))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * (x[:, 0] * self.template).sum((1, 2)))[:, None]


def test_maco_recovers_the_frequency_a_model_responds_to() -> None:
    """The magnitude is fixed, so the frequency shows up in the phase: at (2, 3) every seed's
    picture takes the grating's phase; no other frequency's phase agrees across seeds."""
    ky, kx, shift = 2, 3, 0.7
    model = Grating(ky, kx, shift)
    settings = {"steps": 40, "crops": 2, "box": (1.0, 1.0), "box_jitter": 0.0, "center_std": 0.0, "noise": 0.02}
    result = run_maco(model, [ClassLogit(0)] * 4, Spectrum.flat(1, 16), **settings)
    phases = torch.angle(torch.fft.rfft2(result.image[:, 0]))  # (4 seeds, 16, 9)
    coherence = torch.exp(1j * phases).mean(0).abs()
    for y in (0, 8):  # entries paired with themselves are real: their phase is 0 or π for any image
        coherence[y, 0] = coherence[y, 8] = 0
    assert divmod(int(coherence.argmax()), coherence.shape[1]) == (ky, kx)
    assert torch.cos(phases[:, ky, kx] - shift).min() > 0.95
    assert (result.scores[:, -1] > result.scores[:, 0]).all()


class Quadrant(nn.Module):
    """A small CNN that reads only the top-left quadrant of its 16×16 input."""

    input_shape = (1, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn(classes=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, :8, :8])


def test_transparency_lands_where_the_model_looks() -> None:
    spectrum = Spectrum.from_images(smooth_images(8))
    image, alpha = maco(Quadrant(), ClassLogit(1), spectrum, **{**SMALL_INPUT_SETTINGS, "steps": 16, "crops": 8})
    assert image.shape == alpha.shape == (1, 16, 16)
    share = alpha[:, :8, :8].sum() / alpha.sum()
    assert share > 0.85, share


def test_concept_objective_raises_its_own_coefficient_most() -> None:
    torch.manual_seed(0)
    model = tiny_cnn().eval()
    craft = Craft(model, 3, n_concepts=3, patch_size=8, seed=0)
    bank = craft.fit(smooth_images(12, seed=1), class_id=0, importance=False)
    spectrum = Spectrum.from_images(smooth_images(16, seed=2))
    objectives = [Concept.of(craft, bank, j) for j in range(3)]
    settings = {**SMALL_INPUT_SETTINGS, "steps": 30, "crops": 4}
    start = run_maco(model, objectives, spectrum, **{**settings, "steps": 1, "lr": 0.0}).image
    end = run_maco(model, objectives, spectrum, **settings).image

    def coefficients(images: torch.Tensor) -> torch.Tensor:
        acts = craft.crop_activations(images, (16, 16))
        return nmf_transform(acts / bank.scale, bank.components / bank.scale)

    gain = coefficients(end) - coefficients(start)  # (objective j, concept)
    for j in range(3):
        others = torch.cat([gain[j, :j], gain[j, j + 1 :]])
        assert gain[j, j] > others.max(), (j, gain)


def test_runs_under_inference_mode_without_side_effects() -> None:
    model = nn.Sequential(tiny_cnn(), nn.Dropout(0.5))
    model.train()
    model[0][1].eval()  # a submodule with its own mode, restored as it was
    model[0][0].weight.grad = torch.full_like(model[0][0].weight, 3.0)
    before = [(m, m.training) for m in model.modules()]
    spectrum = Spectrum.from_images(smooth_images(4))
    with torch.inference_mode():
        image, alpha = maco(model, ClassLogit(1), spectrum, **FAST)
    assert [(m, m.training) for m in model.modules()] == before
    assert torch.equal(model[0][0].weight.grad, torch.full_like(model[0][0].weight, 3.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "0.0.weight")
    assert all(p.requires_grad for p in model.parameters())
    again, _ = maco(model, ClassLogit(1), spectrum, **FAST)  # eval mode inside: dropout off, same picture
    assert torch.equal(image, again)
    assert alpha.sum() > 0


def test_objectives_compose() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    acts = torch.rand(2, 4, 3, 3)
    outputs = ModelOutputs(logits, {"feat": acts})
    combo = ClassLogit(2) - 0.5 * ClassLogit(1) + Channel("feat", 1) / 2
    expected = logits[:, 2] - 0.5 * logits[:, 1] + acts[:, 1].mean((1, 2)) / 2
    torch.testing.assert_close(combo.score(outputs), expected)
    assert combo.needs_logits and combo.layers == ("feat",) and len(combo.terms) == 3
    direction = torch.tensor([1.0, 0.0, 0.0, 0.0])
    pooled = acts.mean((2, 3))
    cos = torch.nn.functional.cosine_similarity(pooled, direction[None], dim=1)
    torch.testing.assert_close(Direction("feat", direction).score(outputs), pooled[:, 0] * cos**2)
    assert Direction("feat", direction, pool=False).score(outputs).shape == (2,)
    with pytest.raises(ValueError, match="not a column"):
        ClassLogit(7).score(outputs)
    with pytest.raises(TypeError):
        ClassLogit(0) + 1.0  # noqa: B018
    with pytest.raises(ValueError, match="channels"):
        Direction("feat", torch.ones(5)).score(outputs)


def test_layer_objectives_stop_the_forward_early() -> None:
    model = tiny_cnn()
    calls = []
    model[6].register_forward_hook(lambda *a: calls.append(1))  # the head: never needed by a layer objective
    spectrum = Spectrum.from_images(smooth_images(4))
    result = run_maco(model, [Channel(3, 2), Direction("3", torch.rand(8))], spectrum, **FAST)
    assert not calls and result.scores[:, -1].isfinite().all()


# --- pictures ------------------------------------------------------------------------------

def test_figure_alpha_clips_at_the_80th_percentile(tmp_path: Path) -> None:
    image = torch.rand(3, 20, 20)
    alpha = torch.rand(3, 20, 20)
    rgba = maco_figure(image, alpha, rgba=True)
    assert rgba.shape == (4, 20, 20) and rgba.min() >= 0 and rgba.max() <= 1
    opaque = (rgba[3] >= 1 - 1e-6).float().mean()
    assert 0.15 < opaque < 0.25
    rgb = maco_figure(image[None], alpha[None], background=0.0)
    assert rgb.shape == (1, 3, 20, 20)
    grid = figure_grid(torch.cat([rgb, rgb]), cell=40)
    assert grid.shape == (3, 40 + 4, 80 + 6)
    from PIL import Image

    for picture, mode in ((rgba, "RGBA"), (grid, "RGB")):
        path = save_figure(picture, tmp_path / f"{mode}.png")
        assert Image.open(path).mode == mode


def test_concept_pictures_fit_the_mosaic() -> None:
    model = tiny_cnn().eval()
    craft = Craft(model, 3, n_concepts=2, patch_size=8, seed=0)
    bank = craft.fit(smooth_images(6, seed=1), class_id=0, importance=False)
    pictures = concept_pictures(model, 3, bank, Spectrum.from_images(smooth_images(6)), size=8, steps=3, crops=2)
    assert pictures.shape == (2, 1, 8, 8) and 0 <= pictures.min() and pictures.max() <= 1
    rows = with_pictures(bank.top_crops(3), pictures)
    assert rows.shape == (2, 4, 1, 8, 8)


# --- the callback ------------------------------------------------------------------------

def _digits_validate(monitor: object, tmp_path: Path, logger: object = None) -> tuple[pl.Trainer, object, dict]:
    """A small seeded CNN on the decoy digits, validated stand-alone (inference mode) with ``monitor``."""
    from harmonia.data import DecoyDigitsDataModule
    from harmonia.module import AlignedClassifier

    torch.manual_seed(0)
    module = AlignedClassifier(arch="cnn", arch_args={"widths": [4, 8], "hidden": 16})
    module.train()
    trainer = pl.Trainer(accelerator="cpu", logger=logger if logger is not None else CSVLogger(tmp_path), callbacks=[monitor],
                         inference_mode=True, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    metrics = trainer.validate(module, datamodule=DecoyDigitsDataModule(batch_size=16), verbose=False)[0]
    return trainer, module, metrics


def test_feature_viz_monitor_in_a_standalone_validate(tmp_path: Path) -> None:
    """Stand-alone validate runs under inference mode; the grid reaches the logger, the spectrum file is written."""
    from harmonia.callbacks import FeatureVizMonitor

    monitor = FeatureVizMonitor(classes=[0, 3, 7], maco={"steps": 3, "crops": 2}, spectrum_images=32)
    trainer, module, metrics = _digits_validate(monitor, tmp_path)
    assert module.training and module.model.training
    pictures = monitor.pictures
    assert pictures.image.shape == pictures.alpha.shape == (3, 1, 32, 32)
    assert pictures.classes == [0, 3, 7]
    (png,) = pictures.logged
    assert Path(png).is_file() and "feature_viz_classes" in png
    for c, score in zip((0, 3, 7), pictures.score.tolist()):
        assert metrics[f"feature_viz/class_{c}/score"] == pytest.approx(score)
    # the spectrum is the probe's: ceil(32 / 3) = 11 validation images of each drawn class
    probe = monitor.probe(trainer, module)
    assert len(probe) == 33 and probe.labels.tolist() == [0] * 11 + [3] * 11 + [7] * 11
    spectrum_file = Path(trainer.log_dir) / "maco_spectrum.pt"
    spectrum = Spectrum.load(spectrum_file)
    assert spectrum.size == (32, 32)
    torch.testing.assert_close(spectrum.magnitude, Spectrum.from_images(probe.images).magnitude)
    # the same classes drawn directly give the same pictures
    direct = run_maco(module.model, [ClassLogit(c) for c in (0, 3, 7)], spectrum, **{**SMALL_INPUT_SETTINGS, "steps": 3, "crops": 2})
    torch.testing.assert_close(pictures.image, direct.image)
    torch.testing.assert_close(pictures.score, direct.scores[:, -1])


def test_feature_viz_monitor_loads_a_spectrum_file_and_draws_every_class(tmp_path: Path) -> None:
    """A spectrum file that exists is used as it is; without ``classes`` every logit is drawn."""
    from harmonia.callbacks import FeatureVizMonitor

    path = tmp_path / "given" / "spectrum.pt"
    Spectrum.flat(1, 24).save(path)
    monitor = FeatureVizMonitor(maco={"steps": 1, "crops": 1}, spectrum=str(path), per_class=1)
    trainer, _, metrics = _digits_validate(monitor, tmp_path, logger=False)
    assert monitor.spectrum.size == (24, 24) and torch.equal(monitor.spectrum.magnitude, Spectrum.load(path).magnitude)
    assert monitor.pictures.classes == list(range(10)) and monitor.pictures.image.shape == (10, 1, 24, 24)
    assert {f"feature_viz/class_{c}/score" for c in range(10)} <= metrics.keys()
    assert not monitor.pictures.logged  # no logger: nothing written, no error


def test_feature_viz_monitor_refuses_bad_options_before_the_first_step(tmp_path: Path) -> None:
    from harmonia.callbacks import FeatureVizMonitor

    with pytest.raises(ValueError, match="unknown maco settings"):
        FeatureVizMonitor(maco={"stepz": 3})
    with pytest.raises(ValueError, match="preset"):
        FeatureVizMonitor(maco={"preset": "huge"})
    with pytest.raises(ValueError, match="spectrum_images"):
        FeatureVizMonitor(spectrum_images=0)
    with pytest.raises(ValueError, match=r"classes \[12\] are not logits.*change `classes`"):
        _digits_validate(FeatureVizMonitor(classes=[1, 12], maco={"steps": 1, "crops": 1}), tmp_path, logger=False)
    rgb = tmp_path / "rgb.pt"
    Spectrum.flat(3, 32).save(rgb)
    with pytest.raises(ValueError, match="rgb.pt has 3 channels"):
        _digits_validate(FeatureVizMonitor(classes=[1], spectrum=str(rgb)), tmp_path, logger=False)


@pytest.mark.slow
def test_ddp_two_ranks_draw_the_same_pictures_as_one(tmp_path: Path) -> None:
    """strategy="ddp" on 2 gloo ranks (a subprocess: DDP re-launches the script) vs 1 process."""
    script = ROOT / "tests" / "feature_viz_run.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"out{devices}"), str(devices)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (torch.load(tmp_path / f"out{d}" / "results.pt") for d in (1, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["classes"] == two["classes"] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(two["image"], one["image"], atol=1e-5, rtol=0)
    torch.testing.assert_close(two["alpha"], one["alpha"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(two["score"], one["score"], atol=1e-5, rtol=1e-4)


def test_bfloat16_crops_draw_the_same_kind_of_picture() -> None:
    """The CUDA default (bfloat16 crop matmuls), forced on CPU: same shapes, close first-step crops."""
    spectrum = Spectrum.from_images(smooth_images(4))
    model = tiny_cnn()
    full = run_maco(model, ClassLogit(0), spectrum, **{**FAST, "steps": 1, "noise": 0.0})
    half = run_maco(model, ClassLogit(0), spectrum, crop_dtype=torch.bfloat16, **{**FAST, "steps": 1, "noise": 0.0})
    assert half.image.shape == full.image.shape and half.alpha.isfinite().all()
    torch.testing.assert_close(half.scores, full.scores, atol=1e-2, rtol=1e-2)
