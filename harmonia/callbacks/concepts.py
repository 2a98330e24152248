"""``ConceptMonitor``: CRAFT concepts of chosen classes during training, and how they drift.

At each run (cadence, probe, eval context and logging: ``harmonia.callbacks.monitor.ProbeMonitor``;
by default every ``every_n_epochs`` epochs and at the last one, always in a stand-alone
``validate``), for each configured class, on a fixed probe of that class's images:
1. concept bank and importance with :class:`harmonia.concepts.Craft`;
2. drift: the new bank is matched one-to-one to the previous run's by cosine similarity
   (Hungarian assignment) and *renumbered* so concept ``j`` keeps its identity from run to
   run; the mean matched similarity is the drift score (1.0 = unchanged). On the first run
   concepts are numbered by decreasing importance;
3. logs scalars ``concepts/class_<c>/importance/concept_<j>``, ``…/drift`` (from the second
   run on) and ``…/reconstruction_error`` (``‖A − UW‖/‖A‖`` of the crops' activations), and
   two pictures through ``log_image``: ``…/mosaic`` (a row per concept, most important first:
   its number, importance and top crops) and ``…/attribution`` (probe images tinted by the
   most important concepts' attribution maps, in the mosaic's colours);
4. optionally (``maco``, off by default) a MACO picture of each concept
   (:func:`harmonia.visualize.concept_pictures`: the image that most excites the concept's
   direction at ``layer``, its transparency as alpha), drawn on a spectrum measured on the
   class's probe images and shown as the first tile of the concept's mosaic row. It costs
   ``n_concepts × steps × crops`` forward passes (up to ``layer``) and backward passes per
   class, so it has its own cadence, ``maco_every_n_epochs``.

Every rank holds the whole probe (the work is split by crops, not by images): under DDP the
crops' activations and the per-image Sobol indices are computed on disjoint shards and
gathered in probe order; rank zero factorizes and broadcasts the bank, so every
rank holds the same numbers (equal to a 1-process run) and rank zero draws the pictures. The
MACO pictures are split by concept (concept ``j`` on rank ``j mod world``, drawn with the seed
it has in one process) and gathered.
Previous banks are saved in checkpoints, so drift continues after a resume.

Before the first training step the monitor checks that ``layer`` exists and that its
activations on a few probe crops are non-negative, so a wrong layer fails at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from harmonia.callbacks.feature_viz import maco_settings
from harmonia.callbacks.logging import log_image
from harmonia.callbacks.monitor import ProbeMonitor, gather_shards
from harmonia.callbacks.probe import Probe, rank_shard
from harmonia.concepts import ConceptBank, Craft, attribution_overlay, concept_mosaic, match_concepts
from harmonia.visualize import Spectrum, concept_pictures, objective_seed, with_pictures


@dataclass
class ConceptRun:
    """What one run of the monitor found for one class (kept in ``ConceptMonitor.concepts``)."""

    bank: ConceptBank
    importance: Tensor
    drift: float | None
    logged: list[str] = field(default_factory=list)
    maco: Tensor | None = None  # (k, C, p, p) MACO picture of each concept, in concept order; None when not drawn


def _on_shard(fn: Callable[[Tensor], Tensor], items: Tensor, rank: int, world: int) -> Tensor:
    """``fn`` of this rank's strided share of ``items``; an empty share still yields the right width."""
    mine = rank_shard(range(len(items)), rank, world)
    # More ranks than items: run one item to learn the output's shape, so all_gather matches.
    return fn(items[mine]) if mine else fn(items[:1])[:0]


class ConceptMonitor(ProbeMonitor):
    """CRAFT concept bank, importance ranking, mosaic and drift for ``classes`` during training.

    Args:
        layer: split layer of the monitored model (index into an ``nn.Sequential`` or module
            name); its output must be non-negative. ``lipschitz_cnn`` with two stages of depth
            2: ``9`` (the second L2-norm pooling); ``cnn``: ``5`` (its second max pooling).
        classes: class indices to explain.
        n_concepts: concepts per class.
        patch_size: crop side in pixels (stride ``int(0.8·patch_size)``).
        per_class: probe images per class (fewer if the class has fewer).
        nb_design: Halton design size of the importance estimate.
        top_crops: crops shown per concept in the mosaic.
        attribution_images: probe images shown in the attribution picture (0: no picture).
        attribution_concepts: most important concepts shown there.
        batch_size: rows per forward.
        baseline: pixel value of an empty image (``0.0`` for black backgrounds), whose
            activations become the zero of the concept space (:class:`harmonia.concepts.Craft`);
            ``None``: the reference CRAFT, where a network's constant response to empty input
            becomes a concept of black crops with an inflated importance.
        maco: MACO pictures in the mosaic (``None``: off). A dict of MACO settings: ``preset``
            (default ``"small"``), overrides of it (``steps``, ``crops``, ``box``, ...; the
            monitors' defaults are ``steps=64, crops=8``) and ``background`` (grey level behind
            transparent pixels, default 1.0); ``{}`` for the defaults.
        maco_every_n_epochs: the MACO pictures are drawn at the runs of every n-th epoch
            (``None``: at every run but the ``every_n_steps`` ones). They are always drawn at the
            last epoch, at the end of training and in a stand-alone ``validate``; never after a
            step run.
        every_n_epochs, every_n_steps, at_fit_end, seed, stage, model_attr: the probe and the
            cadence (:class:`ProbeMonitor`).
    """

    shard_probe = False  # rank zero needs every crop for the factorization and the mosaic

    def __init__(
        self,
        layer: int | str,
        classes: Sequence[int],
        n_concepts: int = 10,
        patch_size: int = 64,
        per_class: int = 20,
        nb_design: int = 32,
        top_crops: int = 8,
        attribution_images: int = 4,
        attribution_concepts: int = 3,
        batch_size: int = 256,
        baseline: float | None = None,
        maco: dict[str, Any] | None = None,
        maco_every_n_epochs: int | None = None,
        every_n_epochs: int = 5,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        seed: int = 0,
        stage: Literal["val", "train"] = "val",
        model_attr: str | None = "model",
    ) -> None:
        if not classes:
            raise ValueError("ConceptMonitor needs at least one class in `classes`")
        if top_crops < 1:
            raise ValueError(f"ConceptMonitor: top_crops must be >= 1; got {top_crops}")
        if maco_every_n_epochs is not None and maco_every_n_epochs < 1:
            raise ValueError(f"ConceptMonitor: maco_every_n_epochs must be >= 1 or None; got {maco_every_n_epochs}")
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, at_fit_end=at_fit_end,
                         per_class=per_class, classes=classes, seed=seed, stage=stage, model_attr=model_attr)
        self.layer = layer
        self.craft_args = {"n_concepts": n_concepts, "patch_size": patch_size, "nb_design": nb_design,
                           "batch_size": batch_size, "baseline": baseline}
        self.top_crops = top_crops
        self.attribution_images = attribution_images
        self.attribution_concepts = attribution_concepts
        self.maco = None if maco is None else maco_settings("ConceptMonitor", maco, extra=("background",))
        self.maco_every_n_epochs = maco_every_n_epochs
        self.previous: dict[int, Tensor] = {}  # class -> last bank (k, channels), in concept order
        self.concepts: dict[int, ConceptRun] = {}  # class -> what the last run found

    @property
    def state_key(self) -> str:
        """Distinct per layer and classes, so two monitors can share a checkpoint."""
        return self._generate_state_key(layer=self.layer, classes=self.classes)

    def state_dict(self) -> dict[str, Any]:
        """The previous banks, for drift after a resume."""
        return {"previous": {str(c): w.cpu() for c, w in self.previous.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the previous banks."""
        self.previous = {int(c): w for c, w in state_dict.get("previous", {}).items()}

    def _craft(self, pl_module: pl.LightningModule) -> Craft:
        try:
            return Craft(self.model(pl_module), self.layer, seed=self.seed, **self.craft_args)
        except ValueError as error:
            raise ValueError(f"ConceptMonitor(layer={self.layer!r}): {error}; change `layer`") from None

    def _by_class(self, probe: Probe) -> dict[int, Tensor]:
        return {c: probe.images[probe.labels == c] for c in self.classes}

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        """``layer`` exists, every class has probe images, and one batch of crops has non-negative activations there."""
        craft = self._craft(pl_module)
        for c, images in self._by_class(probe).items():
            if len(images) == 0:
                raise ValueError(f"ConceptMonitor: the {self.stage} data has no image of class {c}; change `classes`")
            if len(images) < self.per_class:
                rank_zero_warn(f"ConceptMonitor: class {c} has only {len(images)} {self.stage} images (asked per_class={self.per_class})")
        images = probe.images[:1]
        try:
            crops, _ = craft.crops(images)
        except ValueError as error:
            raise ValueError(f"ConceptMonitor(patch_size={self.craft_args['patch_size']}): {error}; change `patch_size`") from None
        try:
            craft.crop_activations(crops[: self.craft_args["batch_size"]], tuple(images.shape[-2:]))
        except ValueError as error:
            raise ValueError(f"ConceptMonitor(layer={self.layer!r}): {error}; change `layer`") from None

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> dict[str, float]:
        """Run CRAFT for every configured class; return importance, reconstruction error and drift."""
        craft = self._craft(pl_module)
        values: dict[str, float] = {}
        for c, images in self._by_class(probe).items():
            run = self._run_class(trainer, pl_module, craft, c, images)
            self.concepts[c] = run
            prefix = f"concepts/class_{c}"
            values.update({f"{prefix}/importance/concept_{j}": v for j, v in enumerate(run.importance.tolist())})
            values[f"{prefix}/reconstruction_error"] = float(run.bank.reconstruction_error)
            if run.drift is not None:
                values[f"{prefix}/drift"] = float(run.drift)
        return values

    def _run_class(self, trainer: pl.Trainer, pl_module: pl.LightningModule, craft: Craft, c: int, images: Tensor) -> ConceptRun:
        rank, world = trainer.global_rank, trainer.world_size
        crops, source = craft.crops(images)
        size = tuple(images.shape[-2:])
        acts = gather_shards(pl_module, _on_shard(lambda x: craft.crop_activations(x, size), crops, rank, world), len(crops))
        # NMF once, on rank zero; the other ranks only need the bank for the importance.
        bank = craft.factorize(acts, crops, source, c) if rank == 0 else None
        shared = (bank.components.cpu(), bank.reconstruction_error, bank.scale) if bank is not None else None
        components, error, scale = trainer.strategy.broadcast(shared, src=0)
        if bank is None:
            empty = acts.new_zeros(0, len(components))
            bank = ConceptBank(c, components.to(acts.device), empty, crops[:0], source[:0], error, scale=scale)
        per_image = gather_shards(pl_module, _on_shard(lambda x: craft.importance(bank, x), images, rank, world), len(images))
        bank.importance = per_image.mean(0)

        previous = self.previous.get(c)
        if previous is not None and previous.shape != bank.components.shape:
            rank_zero_warn(
                f"ConceptMonitor: class {c}'s previous bank has shape {tuple(previous.shape)}, the new one "
                f"{tuple(bank.components.shape)} (n_concepts or layer changed since the checkpoint): drift restarts"
            )
            previous = None
        if previous is None:
            order, drift = bank.importance.argsort(descending=True).cpu(), None
        else:
            matching = match_concepts(previous.to(bank.components.device), bank.components)
            order, drift = matching.order, matching.score
        bank = bank.reorder(order)
        self.previous[c] = bank.components.detach().cpu().clone()

        # After the renumbering, so picture j is concept j's from run to run; every rank draws its share.
        pictures = self._maco_pictures(trainer, pl_module, bank, images) if self._maco_due(trainer) else None
        prefix = f"concepts/class_{c}"
        logged = self._pictures(trainer, craft, bank, images, prefix, pictures) if rank == 0 else []
        return ConceptRun(bank, bank.importance.cpu(), drift, logged, pictures)

    def _maco_due(self, trainer: pl.Trainer) -> bool:
        """Whether this run draws the MACO pictures (the same answer on every rank)."""
        if self.maco is None or self.reason == "step":
            return False
        if self.reason != "epoch" or self.maco_every_n_epochs is None:
            return True
        return (trainer.current_epoch + 1) % self.maco_every_n_epochs == 0

    def _maco_pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, bank: ConceptBank, images: Tensor) -> Tensor:
        """``(k, C, p, p)``: each concept's MACO picture at the crops' size, this rank's concepts drawn, all gathered."""
        rank, world = trainer.global_rank, trainer.world_size
        k, size = bank.n_concepts, self.craft_args["patch_size"]
        spectrum = Spectrum.from_images(images.float())  # the class's own probe images: no file, no download
        mine = rank_shard(range(k), rank, world)
        if mine:
            local = concept_pictures(self.model(pl_module), self.layer, bank, spectrum, size=size, concepts=mine,
                                     seed=[objective_seed(self.seed, j) for j in mine], **self.maco)
        else:  # more ranks than concepts: this rank still takes part in the gather
            local = torch.zeros(0, spectrum.channels, size, size)
        return gather_shards(pl_module, local.to(pl_module.device), k).cpu()

    def _pictures(
        self, trainer: pl.Trainer, craft: Craft, bank: ConceptBank, images: Tensor, prefix: str, pictures: Tensor | None = None
    ) -> list[str]:
        """The mosaic (with the MACO ``pictures`` first, if drawn) and attribution pictures (rank zero); returns where they went."""
        ranked = bank.importance.argsort(descending=True).tolist()
        crops = bank.top_crops(self.top_crops)
        if pictures is not None:
            crops = with_pictures(crops, pictures)
        crops = crops[ranked]
        labels = [f"concept {j}\nimp {float(bank.importance[j]):.3f}" for j in ranked]
        epoch = f"epoch {trainer.current_epoch}"
        caption = epoch if pictures is None else f"{epoch}; first tile of each row: the concept's MACO picture"
        logged = log_image(trainer, f"{prefix}/mosaic", concept_mosaic(crops, labels, colors=ranked), caption=caption)
        shown = ranked[: self.attribution_concepts]
        if self.attribution_images > 0 and shown:
            sample = images[: self.attribution_images]
            maps = craft.attribution_maps(bank, sample)[:, shown]
            picture = attribution_overlay(sample, maps, colors=shown)
            logged += log_image(trainer, f"{prefix}/attribution", picture, caption=f"{epoch}; concepts {shown}")
        return logged
