"""``SaliencyMonitor``: where does the model look, scored against human maps, while it trains.

Follow one run: at the first validation it picks a fixed, class-balanced probe set from the
validation data (``harmonia.callbacks.probe``; the same images every time, so curves compare)
and keeps this rank's share. Every ``every_n_epochs`` (at the end of that epoch's validation),
at the end of fit, and at every stand-alone ``validate``, it switches the model to eval mode,
explains the probe images with each configured method (``harmonia.explain``), scores each
method's maps with each configured metric (``harmonia.metrics``; sums reduced across DDP ranks),
logs the scalars as ``<prefix>/<method>/<metric>``, and logs one image grid
(image | human map | each method's overlay) through ``harmonia.callbacks.logging.log_image``
from rank zero, after gathering the maps of the grid's rows from every rank.

YAML (``trainer.callbacks``):

    - class_path: harmonia.callbacks.SaliencyMonitor
      init_args:
        every_n_epochs: 4
        methods:                      # label: {method: registry name (default: the label), **kwargs}
          saliency: {}
          loss_map: {method: saliency, reduction: mean_abs}
          sobol: {nb_design: 16}
        metrics:                      # label: {metric: registry name, methods: [labels], **kwargs}
          alignment: {}
          deletion: {}
          stability: {nb_samples: 5, methods: [saliency]}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics.aggregation import MeanMetric

from harmonia.callbacks.logging import log_image
from harmonia.callbacks.monitor import eval_mode
from harmonia.callbacks.probe import balanced_indices, rank_shard
from harmonia.data.sample import Sample
from harmonia.explain import Explainer, IntegratedGradients, build_explainer
from harmonia.explain.plot import saliency_grid
from harmonia.metrics import ExplanationMetric, build_metric

Spec = Mapping[str, Mapping[str, Any]] | Sequence[str]



def _specs(spec: Spec | None, kind: str) -> dict[str, dict[str, Any]]:
    """``{label: kwargs}`` from a list of names or a mapping of label → kwargs."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Mapping):
        spec = {name: {} for name in spec}
    out = {}
    for label, kwargs in spec.items():
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ValueError(f"{kind} {label!r}: expected a mapping of arguments, got {kwargs!r}")
        out[str(label)] = dict(kwargs or {})
    return out


def _as_sample(item: Any, where: str) -> Sample:
    if isinstance(item, Sample):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 4:
        return Sample(*item)
    raise TypeError(f"{where} yields {type(item).__name__}; SaliencyMonitor needs Sample(image, human_map, has_map, label)")


class SaliencyMonitor(pl.Callback):
    """Saliency maps and explanation metrics on a fixed probe set, logged with a picture.

    Args:
        methods: attribution methods, as registry names (``saliency``, ``smoothgrad``,
            ``integrated_gradients``, ``sobol``) or a mapping ``label → {method: name, **kwargs}``
            (``method`` defaults to the label). Integrated Gradients also logs
            ``<label>/completeness_error``, the mean ``|Σ IG − (f(x) − f(baseline))|``.
        metrics: explanation metrics, as registry names (``alignment``, ``deletion``,
            ``insertion``, ``mufidelity``, ``stability``) or a mapping
            ``label → {metric: name, methods: [method labels], **kwargs}``; by default each
            metric scores every method (``stability`` re-explains ``nb_samples`` neighbours per
            image: restrict it to cheap methods).
        every_n_epochs: run after the validation of every n-th epoch (0: only at the end of
            fit); an epoch without validation (``check_val_every_n_epoch``) has no run.
        at_fit_end: also run when fit ends (skipped if the last epoch already ran).
        per_class: probe images per class.
        num_classes: classes to balance over; default: the dataset's or the module's
            ``num_classes``.
        seed: seed of the probe choice.
        target: explain the ``label`` (default, as the harmonization paper) or the ``prediction``.
        grid_rows: probe images drawn in the grid (0: no grid).
        prefix: first part of every logged key (and of the grid's key, ``<prefix>/grid``).
    """

    def __init__(
        self,
        methods: Spec = ("saliency",),
        metrics: Spec | None = ("alignment", "deletion", "insertion"),
        every_n_epochs: int = 1,
        at_fit_end: bool = True,
        per_class: int = 1,
        num_classes: int | None = None,
        seed: int = 0,
        target: Literal["label", "prediction"] = "label",
        grid_rows: int = 10,
        prefix: str = "saliency",
    ) -> None:
        super().__init__()
        if every_n_epochs < 0 or per_class < 1 or grid_rows < 0:
            raise ValueError(f"need every_n_epochs >= 0, per_class >= 1, grid_rows >= 0; got {every_n_epochs}, {per_class}, {grid_rows}")
        if target not in ("label", "prediction"):
            raise ValueError(f"target must be 'label' or 'prediction'; got {target!r}")
        self.every_n_epochs, self.at_fit_end, self.per_class = int(every_n_epochs), bool(at_fit_end), int(per_class)
        self.num_classes, self.seed, self.target = num_classes, int(seed), target
        self.grid_rows, self.prefix = int(grid_rows), prefix.rstrip("/")
        self.explainers: dict[str, Explainer] = {}
        for label, kwargs in _specs(methods, "method").items():
            self.explainers[label] = build_explainer(kwargs.pop("method", label), **kwargs)
        if not self.explainers:
            raise ValueError("SaliencyMonitor needs at least one method")
        # One metric object per (method, metric): each keeps its own sums.
        self.metrics: dict[tuple[str, str], ExplanationMetric] = {}
        for label, kwargs in _specs(metrics, "metric").items():
            scored = kwargs.pop("methods", None) or list(self.explainers)
            unknown = set(scored) - set(self.explainers)
            if unknown:
                raise ValueError(f"metric {label!r} names unknown methods {sorted(unknown)}; methods are {list(self.explainers)}")
            name = kwargs.pop("metric", label)
            for method in scored:
                self.metrics[(method, label)] = build_metric(name, **kwargs)
        self.completeness = {m: MeanMetric() for m, e in self.explainers.items() if isinstance(e, IntegratedGradients)}
        self._probe: Sample | None = None  # this rank's share, on the CPU
        self._grid_probe: Sample | None = None  # the grid's rows (rank zero draws them)
        self._grid_owner: list[tuple[int, int]] = []  # grid row → (rank, position in its share)
        self._done_epochs: set[int] = set()
        self._last_step: int | None = None
        self._warned: set[str] = set()

    # ----- hooks -------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run at the chosen epochs of fit, and at every stand-alone ``validate``."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            epoch = trainer.current_epoch
            if self.every_n_epochs == 0 or (epoch + 1) % self.every_n_epochs or epoch in self._done_epochs:
                return
            self._done_epochs.add(epoch)
        values = self.run(trainer, pl_module)
        for key, value in values.items():
            # Values are already reduced across ranks (identical everywhere): the mean over
            # ranks of sync_dist changes nothing and keeps Lightning's DDP checks quiet.
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end-of-fit run (before Lightning's teardown moves the model off its device)."""
        if not self.at_fit_end or self._last_step == trainer.global_step:
            return
        values = self.run(trainer, pl_module)
        # ``self.log`` is not allowed in on_train_end: write to the loggers directly.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    # ----- the work ----------------------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Explain and score the probe set once; log the grid; return the reduced scalars."""
        self._last_step = trainer.global_step
        with torch.inference_mode(False), eval_mode(pl_module):
            probe = self._probe_share(trainer, pl_module)
            device = pl_module.device
            # Images in the parameters' dtype: a "bf16-true"/"16-true" model holds bf16 weights.
            dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
            x, human, has_map, labels = (t.to(device) for t in probe)
            x = x.to(dtype)
            with torch.no_grad():
                predictions = pl_module(x).argmax(dim=-1) if len(x) else labels
            targets = labels if self.target == "label" else predictions
            maps: dict[str, Tensor] = {}
            for name, explainer in self.explainers.items():
                if name in self.completeness:
                    maps[name], error = explainer.attribute_with_error(pl_module, x, targets)
                    self.completeness[name].to(device).update(error.abs(), weight=1.0)
                else:
                    maps[name] = explainer.attribute(pl_module, x, targets)
            inputs = {"model": pl_module, "inputs": x, "targets": targets, "human_maps": human, "has_map": has_map}
            for (method, _), metric in self.metrics.items():
                feed = {**inputs, "explanations": maps[method], "explainer": self.explainers[method]}
                metric.to(device).update(**{k: feed[k] for k in metric.needs})
            values = self._reduce()
            if self.grid_rows and trainer.loggers:
                self._log_grid(trainer, maps, predictions)
        return values

    def _reduce(self) -> dict[str, float]:
        """Compute (synchronizing across ranks) and reset every metric; flatten to scalars."""
        values: dict[str, float] = {}
        for (method, label), metric in self.metrics.items():
            result = metric.compute()
            metric.reset()
            items = result.items() if isinstance(result, Mapping) else [(None, result)]
            for part, value in items:
                key = f"{self.prefix}/{method}/{label}" + (f"_{part}" if part else "")
                if math.isnan(float(value)):
                    self._warn_once(key, f"{key} is undefined on this probe set (e.g. no image carries a human map); not logged")
                    continue
                values[key] = float(value)
        for method, mean in self.completeness.items():
            values[f"{self.prefix}/{method}/completeness_error"] = float(mean.compute())
            mean.reset()
        return values

    # ----- probe set ---------------------------------------------------------------------
    def _probe_share(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Sample:
        """This rank's probe images, chosen on first use and kept (on the CPU)."""
        if self._probe is None:
            self._choose_probe(trainer, pl_module)
        assert self._probe is not None
        return self._probe

    def _choose_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.val_dataloaders
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if not isinstance(loader, DataLoader):
            raise RuntimeError("SaliencyMonitor picks its probe images from the validation data, but there is no validation DataLoader")
        dataset = loader.dataset
        num_classes = self.num_classes or getattr(dataset, "num_classes", None) or getattr(pl_module.hparams, "num_classes", None)
        if not num_classes:
            raise ValueError("SaliencyMonitor: set num_classes (neither the dataset nor the module defines it)")
        rank, world = trainer.global_rank, trainer.world_size
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            # A stream has no random access, and under DDP each rank may read its own part:
            # each rank takes the first images of each class it sees (its own probe set).
            samples = self._scan_stream(loader, int(num_classes))
            self._probe = samples
            self._grid_probe = Sample(*(t[: self.grid_rows] for t in samples)) if rank == 0 else None
            self._grid_owner = [(0, j) for j in range(min(self.grid_rows, len(samples.label)))]
            return

        def label_of(i: int) -> int:
            return int(_as_sample(dataset[i], "the validation dataset").label)

        chosen = balanced_indices(len(dataset), label_of, self.per_class, int(num_classes), self.seed)
        if not chosen:
            raise RuntimeError("SaliencyMonitor found no probe image in the validation dataset")
        everything = self._stack(dataset, chosen)
        if not bool(everything.has_map.any()):
            self._warn_once("no-maps", "no probe image carries a human map: alignment cannot be measured")
        shares = [rank_shard(range(len(chosen)), r, world) for r in range(world)]
        self._probe = Sample(*(t[shares[rank]] for t in everything))
        owner = {j: (r, p) for r, share in enumerate(shares) for p, j in enumerate(share)}
        rows = min(self.grid_rows, len(chosen))
        self._grid_owner = [owner[j] for j in range(rows)]
        self._grid_probe = Sample(*(t[:rows] for t in everything)) if rank == 0 else None

    @staticmethod
    def _stack(dataset: Any, indices: Sequence[int]) -> Sample:
        items = [_as_sample(dataset[i], f"validation sample {i}") for i in indices]
        return Sample(*(torch.stack([torch.as_tensor(v) for v in column]) for column in zip(*items)))

    def _scan_stream(self, loader: DataLoader, num_classes: int, max_batches: int = 200) -> Sample:
        picked: dict[int, list[Sample]] = {c: [] for c in range(num_classes)}
        for b, batch in enumerate(loader):
            batch = _as_sample(batch, "the validation DataLoader")
            for i, label in enumerate(batch.label.tolist()):
                if label in picked and len(picked[label]) < self.per_class:
                    picked[label].append(Sample(*(t[i] for t in batch)))
            if b + 1 >= max_batches or all(len(v) == self.per_class for v in picked.values()):
                break
        items = [s for c in range(num_classes) for s in picked[c]]
        if not items:
            raise RuntimeError("SaliencyMonitor found no probe image in the validation stream")
        return Sample(*(torch.stack(column) for column in zip(*items)))

    # ----- picture -----------------------------------------------------------------------
    def _log_grid(self, trainer: pl.Trainer, maps: dict[str, Tensor], predictions: Tensor) -> None:
        """Gather the grid rows' maps on every rank; rank zero draws and logs the picture."""
        world = trainer.world_size
        # Every rank sends the same shape (its first grid_rows maps, zero-padded): all_gather
        # needs equal shapes, and ranks must not disagree on whether to take part.
        per_rank = self.grid_rows
        local = [m[:per_rank] for m in maps.values()] + [predictions[:per_rank, None, None, None].float()]
        stacked = []
        for t in local:  # pad this rank's share to the same length on every rank
            pad = t.new_zeros(per_rank - len(t), *t.shape[1:]) if len(t) < per_rank else t[:0]
            stacked.append(torch.cat([t, pad]).contiguous())
        gathered = [trainer.strategy.all_gather(t) if world > 1 else t[None] for t in stacked]
        if not trainer.is_global_zero or self._grid_probe is None or not self._grid_owner:
            return
        columns = [torch.stack([g[r, p] for r, p in self._grid_owner]).cpu() for g in gathered]
        probe = self._grid_probe
        pictures = {"human": probe.human_map.float(), **dict(zip(maps, columns[:-1]))}
        labels = [f"y {int(y)} / p {int(p)}" for y, p in zip(probe.label, columns[-1].flatten())]
        caption = " | ".join(["image", *pictures]) + f" (epoch {trainer.current_epoch}, step {trainer.global_step})"
        log_image(trainer, f"{self.prefix}/grid", saliency_grid(probe.image.float(), pictures, labels), caption)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"SaliencyMonitor: {message}", stacklevel=2)
