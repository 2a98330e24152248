"""``SaliencyMonitor``: where does the model look, scored against human maps, while it trains.

Follow one run (the probe, the cadence, the eval context and the logging are
``harmonia.callbacks.monitor.ProbeMonitor``'s): on a fixed, class-balanced probe set (the same
images every time, so curves compare; this rank's share of it under DDP), the monitor explains
each probe image with each configured method (``harmonia.explain``), scores each method's maps
with each configured metric (``harmonia.metrics``; sums reduced across DDP ranks), logs the
scalars as ``<prefix>/<method>/<metric>``, and logs one image grid (image | human map | each
method's overlay) as ``<prefix>/grid`` from rank zero, after gathering the grid rows' maps from
every rank.

The method ``training`` is the saliency the loss trains: at run time it resolves to the
``saliency`` explainer of the module's first penalty that has one (``penalty: i`` picks
``pl_module.penalties[i]``), so the monitored map is that very object's map (same score, same
reduction).

YAML (``trainer.callbacks``):

    - class_path: harmonia.callbacks.SaliencyMonitor
      init_args:
        every_n_epochs: 4
        methods:                      # label: {method: registry name (default: the label), **kwargs}
          saliency: {}
          loss_map: {method: training}
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
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from harmonia.callbacks.logging import log_image
from harmonia.callbacks.monitor import ProbeMonitor
from harmonia.callbacks.probe import Probe
from harmonia.explain import EXPLAINERS, Explainer, IntegratedGradients, build_explainer
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


class TrainingSaliency:
    """The method ``training``: the saliency explainer of one of the module's penalties, found at run time.

    Args:
        penalty: index into ``pl_module.penalties``; ``None``: the first penalty with a
            ``saliency`` attribute.
    """

    def __init__(self, penalty: int | None = None) -> None:
        if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, int) or penalty < 0):
            raise ValueError(f"method 'training': penalty must be a penalty index >= 0; got {penalty!r}")
        self.penalty = penalty

    def resolve(self, pl_module: pl.LightningModule) -> Explainer:
        """The penalty's own ``saliency`` object (an explainer with ``attribute(model, x, target)``)."""
        penalties = getattr(pl_module, "penalties", None)
        if penalties is None:
            raise ValueError(
                f"SaliencyMonitor method 'training' explains with the saliency of the module's penalties, but "
                f"{type(pl_module).__name__} has no `penalties`; name an attribution method instead (e.g. method: saliency)"
            )
        penalties = list(penalties)
        if self.penalty is None:
            found = next((p.saliency for p in penalties if getattr(p, "saliency", None) is not None), None)
            if found is None:
                names = [type(p).__name__ for p in penalties] or "none"
                raise ValueError(
                    f"SaliencyMonitor method 'training': no penalty of {type(pl_module).__name__} has a `saliency` "
                    f"(penalties: {names}); name an attribution method instead (e.g. method: saliency)"
                )
            return found
        if self.penalty >= len(penalties):
            raise ValueError(f"SaliencyMonitor method 'training': penalty {self.penalty} does not exist; the module has {len(penalties)}")
        found = getattr(penalties[self.penalty], "saliency", None)
        if found is None:
            raise ValueError(
                f"SaliencyMonitor method 'training': penalty {self.penalty} ({type(penalties[self.penalty]).__name__}) "
                "has no `saliency`; set `penalty` to one that has"
            )
        return found

    def __repr__(self) -> str:
        return f"TrainingSaliency(penalty={self.penalty!r})"


def _build_method(label: str, kwargs: dict[str, Any]) -> Explainer | TrainingSaliency:
    name = kwargs.pop("method", label)
    if name == "training":
        unknown = set(kwargs) - {"penalty"}
        if unknown:
            raise ValueError(
                f"method {label!r} ('training') takes only `penalty`; got {sorted(unknown)} "
                "(the score and reduction are the penalty's own)"
            )
        return TrainingSaliency(kwargs.get("penalty"))
    if name not in EXPLAINERS:  # say that `training` exists too, which the registry does not know
        raise ValueError(f"unknown attribution method {name!r}; registered: {', '.join(EXPLAINERS)}, "
                         "and `training` (the saliency of the module's penalty)")
    return build_explainer(name, **kwargs)


class SaliencyMonitor(ProbeMonitor):
    """Saliency maps and explanation metrics on a fixed probe set, logged with a picture.

    Args:
        methods: attribution methods, as registry names (``saliency``, ``smoothgrad``,
            ``integrated_gradients``, ``sobol``, or ``training``: the map the loss trains, see the
            module doc) or a mapping ``label → {method: name, **kwargs}`` (``method`` defaults to
            the label; ``training`` takes only ``penalty``). Integrated Gradients also logs
            ``<label>/completeness_error``, the mean ``|Σ IG − (f(x) − f(baseline))|``.
        metrics: explanation metrics, as registry names (``alignment``, ``deletion``,
            ``insertion``, ``mufidelity``, ``stability``) or a mapping
            ``label → {metric: name, methods: [method labels], **kwargs}``; by default each
            metric scores every method (``stability`` re-explains ``nb_samples`` neighbours per
            image: restrict it to cheap methods).
        target: explain the ``label`` (default, as the harmonization paper) or the ``prediction``.
        grid_rows: probe images drawn in the grid (0: no grid).
        prefix: first part of every logged key (and of the grid's key, ``<prefix>/grid``).
        every_n_epochs, every_n_steps, at_fit_end, per_class, classes, num_classes, seed,
            stage, model_attr: the probe and the cadence (:class:`ProbeMonitor`).
    """

    needs_grad = True

    def __init__(
        self,
        methods: Spec = ("saliency",),
        metrics: Spec | None = ("alignment", "deletion", "insertion"),
        target: Literal["label", "prediction"] = "label",
        grid_rows: int = 10,
        prefix: str = "saliency",
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        per_class: int = 1,
        classes: Sequence[int] | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        stage: Literal["val", "train"] = "val",
        model_attr: str | None = "model",
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, at_fit_end=at_fit_end,
                         per_class=per_class, classes=classes, num_classes=num_classes, seed=seed, stage=stage,
                         model_attr=model_attr)
        if grid_rows < 0:
            raise ValueError(f"SaliencyMonitor: grid_rows must be >= 0; got {grid_rows}")
        if target not in ("label", "prediction"):
            raise ValueError(f"SaliencyMonitor: target must be 'label' or 'prediction'; got {target!r}")
        self.target, self.grid_rows, self.prefix = target, int(grid_rows), prefix.rstrip("/")
        self.head_rows = self.grid_rows
        self.explainers: dict[str, Explainer | TrainingSaliency] = {
            label: _build_method(label, kwargs) for label, kwargs in _specs(methods, "method").items()
        }
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
        self._warned: set[str] = set()

    # ----- public ------------------------------------------------------------------------
    def resolved(self, pl_module: pl.LightningModule) -> dict[str, Explainer]:
        """Each method label's explainer for this module (``training`` resolved to the penalty's saliency)."""
        return {k: e.resolve(pl_module) if isinstance(e, TrainingSaliency) else e for k, e in self.explainers.items()}

    def explain(self, pl_module: pl.LightningModule, x: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Each method's maps ``(N,1,H,W)`` of the monitored model for images ``x`` and classes ``targets``."""
        return self._explain(self.model(pl_module), self.resolved(pl_module), x, targets)

    # ----- ProbeMonitor ------------------------------------------------------------------
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        """The probe carries human maps, and every ``training`` method finds its penalty."""
        if probe.human_maps is None:
            raise ValueError(
                f"SaliencyMonitor: the {self.stage} data yields (image, label) pairs; it needs "
                "Sample(image, human_map, has_map, label) to score maps against human maps"
            )
        self.resolved(pl_module)
        local = bool(probe.has_map.any()) if len(probe) else False
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            self._warn_once("no-maps", "no probe image carries a human map: alignment cannot be measured")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> dict[str, float]:
        """Explain and score this rank's probe share; log the grid; return the reduced scalars."""
        if probe.human_maps is None:
            self.check(trainer, pl_module, probe)  # raises the clear error
        model = self.model(pl_module)
        explainers = self.resolved(pl_module)
        x = self.inputs(model, probe.images)
        device = x.device
        human, has_map, labels = (t.to(device) for t in (probe.human_maps, probe.has_map, probe.labels))
        with torch.no_grad():
            predictions = model(x).argmax(dim=-1) if len(x) else labels
        targets = labels if self.target == "label" else predictions
        maps = self._explain(model, explainers, x, targets, completeness=True)
        inputs = {"model": model, "inputs": x, "targets": targets, "human_maps": human, "has_map": has_map}
        for (method, _), metric in self.metrics.items():
            feed = {**inputs, "explanations": maps[method], "explainer": explainers[method]}
            metric.to(device).update(**{k: feed[k] for k in metric.needs})
        values = self._reduce()
        if self.grid_rows and trainer.loggers:
            self._log_grid(trainer, pl_module, probe, maps, predictions)
        return values

    # ----- the work ----------------------------------------------------------------------
    def _explain(self, model: nn.Module, explainers: dict[str, Explainer], x: Tensor, targets: Tensor,
                 completeness: bool = False) -> dict[str, Tensor]:
        maps: dict[str, Tensor] = {}
        for name, explainer in explainers.items():
            if completeness and name in self.completeness:
                maps[name], error = explainer.attribute_with_error(model, x, targets)
                self.completeness[name].to(x.device).update(error.abs(), weight=1.0)
            else:
                maps[name] = explainer.attribute(model, x, targets)
        return maps

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

    # ----- picture -----------------------------------------------------------------------
    def _log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe, maps: dict[str, Tensor],
                  predictions: Tensor) -> None:
        """Gather the grid rows' maps on every rank; rank zero draws and logs the picture."""
        columns = [self.gather_rows(pl_module, m, probe, self.grid_rows) for m in maps.values()]
        predicted = self.gather_rows(pl_module, predictions[:, None].float(), probe, self.grid_rows)
        head = probe.head
        if not trainer.is_global_zero or head is None or not len(head):
            return
        pictures = {"human": head.human_maps.float(), **{k: c.cpu() for k, c in zip(maps, columns)}}
        labels = [f"y {int(y)} / p {int(p)}" for y, p in zip(head.labels, predicted.flatten().cpu())]
        caption = " | ".join(["image", *pictures]) + f" (epoch {trainer.current_epoch}, step {trainer.global_step})"
        log_image(trainer, f"{self.prefix}/grid", saliency_grid(head.images.float(), pictures, labels), caption)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"SaliencyMonitor: {message}", stacklevel=2)
