"""``FeatureVizMonitor``: MACO pictures of classes during training, to watch what a class looks like to the model.

At the end of a validation epoch (every ``every_n_epochs`` epochs and at the last one during
``fit``, never in the sanity check; always in a stand-alone ``validate``), for each configured
class it draws the class logit's MACO image (:mod:`harmonia.visualize`) with its transparency
as alpha and logs one grid, ``feature_viz/classes`` (classes in the order given, left to
right), through :func:`harmonia.callbacks.logging.log_image`; the images, transparencies and
final scores stay in ``results`` for notebooks and tests.

The magnitude spectrum is measured once on ``spectrum_images`` images of the ``stage``
dataset (a seeded draw) and saved as ``maco_spectrum.pt`` in the run's log folder (or
``spectrum``, a path: loaded when the file exists, written there otherwise), so a later run
or a notebook draws with the same one.

Cost: ``classes × steps × crops`` forward passes of the model and as many backward passes
to the input, at the monitor's own cadence (default every 10 epochs) and outside the training
step. The defaults (the small-input preset cut to 64 steps of 8 crops) make 5,120 of each for
the ten digit classes: about four plain passes over the decoy digits' training split. Pick
fewer ``classes`` or a longer cadence to spend less; ``maco_args={"steps": 128, "crops": 16}``
gives the preset's full quality. Under DDP the classes are split across ranks (class
``i`` on rank ``i mod world``), each drawn with the seed it would have in one process, and
gathered, so every rank holds the same pictures as a 1-process run; rank zero logs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from harmonia.callbacks.logging import log_image
from harmonia.callbacks.probe import as_sample, probe_loader
from harmonia.visualize import PRESETS, ClassLogit, Spectrum, figure_grid, maco_figure, objective_seed, run_maco

SPECTRUM_FILE = "maco_spectrum.pt"
MONITOR_DEFAULTS = {"steps": 64, "crops": 8}  # cheaper than the presets: the monitor runs repeatedly


def _is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """Whether the monitor runs at this validation epoch end (see the module docstring)."""
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != TrainerFn.FITTING:
        return True
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
    return epoch % every_n_epochs == 0 or last


class FeatureVizMonitor(pl.Callback):
    """MACO class visualizations over epochs.

    Args:
        classes: class indices to draw (default: every class of the model's logits).
        every_n_epochs: cadence during ``fit`` (the last epoch always runs).
        preset: ``"small"`` (canvas of the input's size, crops 100% → 80%; 32×32 digits) or
            ``"xplique"`` (the reference's zooming crops, for ImageNet-size inputs on a larger canvas).
        maco_args: overrides of the preset (``steps``, ``crops``, ``box``, ``noise``, ``center_std``, ...);
            the monitor's own defaults are ``steps=64, crops=8`` (see the module docstring).
        spectrum: path of the spectrum file (loaded if it exists, written otherwise); default
            ``<log_dir>/maco_spectrum.pt``.
        spectrum_images: images of the ``stage`` dataset the spectrum is measured on.
        canvas: canvas side for a new spectrum (default: the images' own size).
        stage: the dataset the spectrum's images come from, ``"train"`` or ``"val"``.
        seed: MACO seed (class ``i`` of ``classes`` uses ``objective_seed(seed, i)``) and the image draw's seed.
        cell: pictures are upscaled (nearest, integer factor) to at least this size in the grid.
        background: grey level behind transparent pixels (1.0 white, as the references' plots; 0.0 for
            images on black such as the digits).
        model_attr: attribute of the LightningModule holding the classifier (``None``: the module).
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        every_n_epochs: int = 10,
        preset: Literal["small", "xplique"] = "small",
        maco_args: dict[str, Any] | None = None,
        spectrum: str | None = None,
        spectrum_images: int = 256,
        canvas: int | None = None,
        stage: Literal["train", "val"] = "train",
        seed: int = 0,
        cell: int = 96,
        background: float = 1.0,
        model_attr: str | None = "model",
    ) -> None:
        if every_n_epochs < 1 or spectrum_images < 1:
            raise ValueError("every_n_epochs and spectrum_images must be >= 1")
        if preset not in PRESETS:
            raise ValueError(f"FeatureVizMonitor: preset must be one of {sorted(PRESETS)}; got {preset!r}")
        unknown = set(maco_args or {}) - {"steps", "crops", "box", "box_jitter", "center_std", "noise", "lr", "input_size", "phase_std"}
        if unknown:
            raise ValueError(f"FeatureVizMonitor: unknown maco_args {sorted(unknown)}")
        self.classes = None if classes is None else [int(c) for c in classes]
        self.every_n_epochs = every_n_epochs
        self.maco_args = {**PRESETS[preset], **MONITOR_DEFAULTS, **(maco_args or {})}
        self.spectrum_path = spectrum
        self.spectrum_images = spectrum_images
        self.canvas = canvas
        self.stage = stage
        self.seed = seed
        self.cell = cell
        self.background = background
        self.model_attr = model_attr
        self.spectrum: Spectrum | None = None
        self.results: dict[str, Any] = {}

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        if not self.model_attr:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{type(pl_module).__name__} has no submodule {self.model_attr!r}; set model_attr (None: the module itself)")
        return model

    def _spectrum_file(self, trainer: pl.Trainer) -> Path:
        if self.spectrum_path:
            return Path(self.spectrum_path)
        return Path(trainer.log_dir or trainer.default_root_dir) / SPECTRUM_FILE

    def _load_spectrum(self, trainer: pl.Trainer) -> Spectrum:
        """Load the spectrum file, or measure it on rank zero, save it and share it with every rank."""
        path = self._spectrum_file(trainer)
        spectrum = None
        if trainer.is_global_zero:
            if path.is_file():
                spectrum = Spectrum.load(path)
            else:
                dataset = probe_loader(trainer, self.stage).dataset
                count = min(self.spectrum_images, len(dataset))
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:count].tolist()
                with torch.inference_mode(False):
                    images = torch.stack([torch.as_tensor(as_sample(dataset[i], f"sample {i}").image).float() for i in order])
                spectrum = Spectrum.from_images(images, size=self.canvas)
                spectrum.save(path)
        shared = None if spectrum is None else (spectrum.magnitude, spectrum.size, spectrum.color_matrix, spectrum.value_range)
        magnitude, size, matrix, value_range = trainer.strategy.broadcast(shared, src=0)
        with torch.inference_mode(False):
            return Spectrum(magnitude.cpu(), tuple(size), matrix.cpu(), tuple(value_range))

    def _classes(self, model: nn.Module, spectrum: Spectrum) -> list[int]:
        if self.classes is not None:
            return self.classes
        shape = getattr(model, "input_shape", None) or (spectrum.channels, *spectrum.size)
        param = next(model.parameters(), None)
        probe = torch.zeros(1, *shape, device=param.device if param is not None else "cpu")
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                return list(range(model(probe).shape[-1]))
        finally:
            model.train(was_training)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw, gather and log the class pictures when due."""
        if not _is_due(trainer, self.every_n_epochs):
            return
        if self.spectrum is None:
            self.spectrum = self._load_spectrum(trainer)
        model = self._model(pl_module)
        classes = self._classes(model, self.spectrum)
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, len(classes), world))
        # run_maco handles the evaluation context itself: eval mode (restored after), out of
        # inference_mode, gradients on, weights orthonormalized once.
        if mine:
            result = run_maco(model, [ClassLogit(classes[i]) for i in mine], self.spectrum,
                              seed=[objective_seed(self.seed, i) for i in mine], **self.maco_args)
            local = torch.cat([result.image, result.alpha, result.scores[:, -1:, None, None].expand(-1, 1, *result.image.shape[-2:])], 1)
        else:  # more ranks than classes: this rank still takes part in the gather
            channels, (height, width) = self.spectrum.channels, self.spectrum.size
            local = torch.zeros(0, 2 * channels + 1, height, width, device=pl_module.device)
        full = self._gather(trainer, local.to(pl_module.device), len(classes))
        c = self.spectrum.channels
        images, alpha, scores = full[:, :c], full[:, c : 2 * c], full[:, 2 * c, 0, 0]
        self.results = {"classes": classes, "image": images.cpu(), "alpha": alpha.cpu(), "score": scores.cpu(),
                        "epoch": trainer.current_epoch}
        if trainer.is_global_zero:
            pictures = maco_figure(images, alpha, background=self.background)
            grid = figure_grid(pictures, cell=self.cell, fill=self.background)
            caption = f"epoch {trainer.current_epoch}; classes {classes}"
            self.results["logged"] = log_image(trainer, "feature_viz/classes", grid, caption=caption)

    @staticmethod
    def _gather(trainer: pl.Trainer, local: Tensor, total: int) -> Tensor:
        """Every rank's strided share (rows ``rank::world``) reassembled in order, the same on every rank."""
        world = trainer.world_size
        if world == 1:
            return local
        longest = -(-total // world)
        padded = local.new_zeros(longest, *local.shape[1:])
        padded[: len(local)] = local
        gathered = trainer.strategy.all_gather(padded)  # (world, longest, ...)
        full = local.new_empty(total, *local.shape[1:])
        for r in range(world):
            count = len(range(r, total, world))
            full[r::world] = gathered[r, :count].to(local.device)
        return full
