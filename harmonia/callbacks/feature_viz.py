"""``FeatureVizMonitor``: MACO pictures of classes during training, to watch what a class looks like to the model.

At each run (cadence, probe, eval context and logging: ``harmonia.callbacks.monitor.ProbeMonitor``;
by default every ``every_n_epochs=10`` epochs and at the last one, always in a stand-alone
``validate``), for each configured class it draws the class logit's MACO image
(:mod:`harmonia.visualize`) with its transparency as alpha, logs one grid,
``feature_viz/classes`` (classes in the order given, left to right), through
:func:`harmonia.callbacks.logging.log_image` from rank zero, and logs each picture's final
objective value as ``feature_viz/class_<c>/score`` (the class logit on the last step's crops:
how strongly the model can be made to see the class). The images, transparencies and scores
stay in :attr:`FeatureVizMonitor.pictures` for notebooks and tests.

**The spectrum.** MACO needs the mean Fourier magnitude of the data. It is measured once, on
the monitor's probe (``per_class`` images of each drawn class, by default about
``spectrum_images`` in all; every rank holds the whole probe), and saved as
``maco_spectrum.pt`` in the run's log folder (``trainer.log_dir``, else the run directory), or
at ``spectrum`` (a path: loaded when the file exists, written there otherwise), so a later run,
a resumed one, or a notebook draws with the same one.

**Cost.** ``classes × steps × crops`` forward passes of the model and as many backward passes
to the input per run, outside the training step. The monitor's MACO defaults (the small-input
preset cut to 64 steps of 8 crops) make 5,120 of each for the ten digit classes: about four
plain passes over the decoy digits' training split. Pick fewer ``classes`` or a longer cadence
to spend less; ``maco={"steps": 128, "crops": 16}`` gives the preset's full quality. Under DDP
the classes are split over ranks (class ``i`` on rank ``i mod world``), each drawn with the
seed it has in one process, and gathered, so every rank holds the same pictures as a 1-process
run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor

from harmonia.callbacks.logging import log_image
from harmonia.callbacks.monitor import ProbeMonitor, gather_shards
from harmonia.callbacks.probe import Probe, probe_loader, rank_shard
from harmonia.visualize import PRESETS, ClassLogit, Spectrum, figure_grid, maco_figure, objective_seed, run_maco

SPECTRUM_FILE = "maco_spectrum.pt"
MONITOR_MACO_DEFAULTS: dict[str, Any] = {"steps": 64, "crops": 8}
"""Cheaper than the presets: a monitor draws again at every run."""
MACO_KEYS = ("steps", "crops", "box", "box_jitter", "center_std", "noise", "lr", "input_size", "phase_std")


def maco_settings(owner: str, maco: Mapping[str, Any] | None, extra: Iterable[str] = ()) -> dict[str, Any]:
    """A monitor's MACO keyword settings: ``preset`` (default ``"small"``) overridden by the rest.

    ``maco`` holds :func:`harmonia.visualize.run_maco`'s settings (``steps``, ``crops``, ``box``,
    ...) and ``preset``; ``extra`` names more keys the caller accepts. The seed is the monitor's
    own. Unknown keys and presets fail here, naming ``owner``, not at the first run.
    """
    settings = dict(maco or {})
    preset = settings.pop("preset", "small")
    if preset not in PRESETS:
        raise ValueError(f"{owner}: maco preset must be one of {sorted(PRESETS)}; got {preset!r}")
    unknown = set(settings) - set(MACO_KEYS) - set(extra)
    if unknown:
        raise ValueError(f"{owner}: unknown maco settings {sorted(unknown)}; known: preset, {', '.join(MACO_KEYS + tuple(extra))}")
    return {**PRESETS[preset], **MONITOR_MACO_DEFAULTS, **settings}


@dataclass
class ClassPictures:
    """What one run of :class:`FeatureVizMonitor` drew (the same on every rank; ``logged`` on rank zero)."""

    classes: list[int]
    image: Tensor  # (classes, C, H, W) in the model's input range
    alpha: Tensor  # (classes, C, H, W) accumulated |d objective / d image|
    score: Tensor  # (classes,) the objective on the last step's crops
    epoch: int
    logged: list[str] = field(default_factory=list)


class FeatureVizMonitor(ProbeMonitor):
    """MACO class visualizations over training (see the module docstring).

    Args:
        classes: class indices to draw, in this order (default: every class: ``num_classes``,
            else the dataset's or the module's ``num_classes``, else the model's output width).
        maco: MACO settings: ``preset`` (``"small"``: a canvas of the input's size, crops
            110% → 90%, for 32×32 digits; ``"xplique"``: the reference's zooming crops, for
            ImageNet-size inputs on a larger canvas) and overrides of it (``steps``, ``crops``,
            ``box``, ``noise``, ``center_std``, ...). The monitor's own defaults are ``steps=64,
            crops=8``.
        spectrum: path of the spectrum file (loaded if it exists, written otherwise); default
            ``<log_dir>/maco_spectrum.pt``.
        spectrum_images: about how many probe images the spectrum is measured on when
            ``per_class`` is not given (``per_class = ceil(spectrum_images / len(classes))``).
        per_class: probe images per drawn class (the spectrum's images).
        canvas: canvas side for a new spectrum (default: the images' own size).
        cell: pictures are upscaled (nearest, integer factor) to at least this size in the grid.
        background: grey level behind transparent pixels (1.0 white, as the references' plots;
            0.0 for images on black such as the digits).
        seed: the probe draw's seed and MACO's (class ``i`` of ``classes`` draws with
            ``objective_seed(seed, i)``).
        every_n_epochs, every_n_steps, at_fit_end, num_classes, stage, model_attr: the probe and
            the cadence (:class:`ProbeMonitor`).
    """

    needs_grad = True
    shard_probe = False  # the spectrum is measured on the whole probe; the classes are split instead

    def __init__(
        self,
        classes: Sequence[int] | None = None,
        maco: dict[str, Any] | None = None,
        spectrum: str | None = None,
        spectrum_images: int = 256,
        per_class: int | None = None,
        canvas: int | None = None,
        cell: int = 96,
        background: float = 1.0,
        every_n_epochs: int = 10,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        num_classes: int | None = None,
        seed: int = 0,
        stage: Literal["val", "train"] = "val",
        model_attr: str | None = "model",
    ) -> None:
        if spectrum_images < 1:
            raise ValueError(f"FeatureVizMonitor: spectrum_images must be >= 1; got {spectrum_images}")
        if canvas is not None and canvas < 2:
            raise ValueError(f"FeatureVizMonitor: canvas must be >= 2 pixels; got {canvas}")
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, at_fit_end=at_fit_end,
                         per_class=1 if per_class is None else per_class, classes=classes, num_classes=num_classes,
                         seed=seed, stage=stage, model_attr=model_attr)
        self.maco = maco_settings("FeatureVizMonitor", maco)
        self.spectrum_path = spectrum
        self.spectrum_images = int(spectrum_images)
        self._auto_per_class = per_class is None
        self.canvas = canvas
        self.cell = cell
        self.background = background
        self.spectrum: Spectrum | None = None
        self.pictures: ClassPictures | None = None  # the last run's pictures
        self._drawn: list[int] | None = None

    # ----- probe and classes -------------------------------------------------------------
    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Probe:
        """The probe (whole, on every rank); resolves the drawn classes and the spectrum budget first."""
        if self._probe is None:
            loader = probe_loader(trainer, self.stage)
            if loader is not None and getattr(loader, "dataset", None) is not None:
                self._drawn = self._classes(pl_module, loader)
                if self._auto_per_class:
                    self.per_class = max(1, math.ceil(self.spectrum_images / len(self._drawn)))
        return super().probe(trainer, pl_module)

    def drawn_classes(self) -> list[int]:
        """The classes drawn, in order (known once the probe is chosen)."""
        if self._drawn is None:
            raise RuntimeError("FeatureVizMonitor: the classes are known once the probe is chosen")
        return self._drawn

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        """Every drawn class is a logit of the model; a given spectrum file matches the images' channels."""
        model = self.model(pl_module)
        with torch.no_grad():
            width = model(self.inputs(model, probe.images[:1])).shape[-1]
        outside = [c for c in self.drawn_classes() if c >= width]
        if outside:
            raise ValueError(f"FeatureVizMonitor: classes {outside} are not logits of a model with {width} outputs; change `classes`")
        self._spectrum(trainer, probe)

    # ----- the spectrum ------------------------------------------------------------------
    def spectrum_file(self, trainer: pl.Trainer) -> Path:
        """Where the spectrum is read from / written to (every rank must call it: ``log_dir`` broadcasts)."""
        if self.spectrum_path:
            return Path(self.spectrum_path)
        return Path(trainer.log_dir or trainer.default_root_dir) / SPECTRUM_FILE

    def _spectrum(self, trainer: pl.Trainer, probe: Probe) -> Spectrum:
        """Load the spectrum file, or measure it on the probe on rank zero and save it; the same on every rank."""
        if self.spectrum is not None:
            return self.spectrum
        path = self.spectrum_file(trainer)
        shared: tuple | str | None = None
        if trainer.is_global_zero:
            try:
                spectrum = self._read_or_measure(path, probe)
                shared = (spectrum.magnitude, spectrum.size, spectrum.color_matrix, spectrum.value_range)
            except (ValueError, OSError) as error:  # every rank raises it, none waits in the broadcast
                shared = f"FeatureVizMonitor: {error}"
        shared = trainer.strategy.broadcast(shared, src=0)
        if isinstance(shared, str):
            raise ValueError(shared)
        magnitude, size, matrix, value_range = shared
        with torch.inference_mode(False):
            self.spectrum = Spectrum(magnitude.cpu().clone(), tuple(size), matrix.cpu().clone(), tuple(value_range))
        return self.spectrum

    def _read_or_measure(self, path: Path, probe: Probe) -> Spectrum:
        """The spectrum file at ``path`` if there is one, else the probe's spectrum, saved there."""
        channels = probe.images.shape[1]
        if path.is_file():
            spectrum = Spectrum.load(path)
            if spectrum.channels != channels:
                raise ValueError(f"the spectrum file {path} has {spectrum.channels} channels, the {self.stage} images "
                                 f"{channels}; delete it or set `spectrum` to another path")
            return spectrum
        with torch.inference_mode(False):
            spectrum = Spectrum.from_images(probe.images.float(), size=self.canvas)
        spectrum.save(path)
        return spectrum

    # ----- one run -----------------------------------------------------------------------
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> dict[str, float]:
        """Draw this rank's classes, gather every rank's, log the grid (rank zero); return the final scores."""
        spectrum = self._spectrum(trainer, probe)
        model = self.model(pl_module)
        classes = self.drawn_classes()
        mine = rank_shard(range(len(classes)), trainer.global_rank, trainer.world_size)
        channels, (height, width) = spectrum.channels, spectrum.size
        if mine:
            result = run_maco(model, [ClassLogit(classes[i]) for i in mine], spectrum,
                              seed=[objective_seed(self.seed, i) for i in mine], **self.maco)
            score = result.scores[:, -1:, None, None].expand(-1, 1, height, width)
            local = torch.cat([result.image, result.alpha, score], 1)
        else:  # more ranks than classes: this rank still takes part in the gather
            local = torch.zeros(0, 2 * channels + 1, height, width)
        full = gather_shards(pl_module, local.to(pl_module.device), len(classes)).cpu()
        images, alpha, scores = full[:, :channels], full[:, channels : 2 * channels], full[:, 2 * channels, 0, 0]
        self.pictures = ClassPictures(classes, images, alpha, scores, trainer.current_epoch)
        if trainer.is_global_zero:
            grid = figure_grid(maco_figure(images, alpha, background=self.background), cell=self.cell, fill=self.background)
            caption = f"epoch {trainer.current_epoch}; classes {classes}"
            self.pictures.logged = log_image(trainer, "feature_viz/classes", grid, caption=caption)
        return {f"feature_viz/class_{c}/score": float(s) for c, s in zip(classes, scores.tolist())}
