"""``LipschitzMonitor``: certified robustness of a 1-Lipschitz classifier during training.

At the end of a validation epoch (every ``every_n_epochs`` epochs and at the last one; always
in a stand-alone ``validate``), on a fixed class-balanced probe set:

- **certified accuracy** at each ε (:class:`harmonia.metrics.CertifiedAccuracy`, the model's
  ``certificate`` attribute: radius ``margin / 2`` per-logit, ``margin / √2`` vector), logged
  as ``lipschitz/certified_acc@<ε>``;
- **empirical Lipschitz lower bound**, ``lipschitz/empirical_lower_bound``. The certificate
  trusts that the margin ``m(x) = f_a(x) − f_b(x)`` between any two logits is ``c``-Lipschitz
  (``c = 2`` per-logit, ``√2`` vector). For each probe image, with ``a, b`` its two highest
  logits, we take ``‖∇ₓ m(x)‖₂ / c``; the logged value is the maximum over the probe set. A
  gradient norm is a lower bound of the local Lipschitz constant, so a value above 1 *proves*
  the certificate wrong; a value near 1 says the constraint is tight (gradient-norm
  preserving); ``lipschitz/empirical_mean`` (the mean over the probe) shows how much of the
  budget a typical input uses;
- **layer check** (every ``layers_every_n_epochs`` epochs, default: the same cadence) with
  ``harmonia.models.lipschitz_bound``: ``lipschitz/bound`` (product of exact per-layer operator
  norms) and ``lipschitz/sigma/<layer>`` for each layer with parameters (largest singular
  value, or largest row norm for a per-logit head). A layer above ``1 + tolerance`` raises a
  rank-zero warning: the certificates logged that epoch overstate robustness. This happens
  e.g. under ``bf16-mixed``, where Björck orthonormalization runs in bfloat16 (SPEC §4).

The probe is sharded over ranks; sums and maxima are reduced by torchmetrics, so every rank
logs the same values as a 1-process run. Gradients are taken under ``inference_mode(False)``,
so a stand-alone ``validate`` works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.aggregation import MaxMetric, MeanMetric

from harmonia.callbacks.monitor import evaluation, is_due, monitored_model
from harmonia.callbacks.probe import image_and_label, load_probe, probe_dataset, rank_shard
from harmonia.metrics.certified import MARGIN_LIPSCHITZ, CertifiedAccuracy, model_certificate
from harmonia.models import lipschitz_bound
from harmonia.runtime import single_cpu_thread


class LipschitzMonitor(pl.Callback):
    """Certified accuracy, empirical Lipschitz lower bound and per-layer bound check (see module doc).

    Args:
        epsilons: L2 radii (input space, images in [0, 1]) at which to report certified accuracy.
        probe_per_class: probe images per class.
        classes: classes in the probe (default: all the model's outputs).
        every_n_epochs: cadence of the certificate and gradient measures during ``fit``.
        layers_every_n_epochs: cadence of the per-layer check (``None``: ``every_n_epochs``);
            ``lipschitz_bound`` power-iterates each convolution on its real input size, which
            costs more than the rest, so it can run less often.
        check_layers: ``False`` skips the per-layer check altogether (also in ``validate``).
        tolerance: a layer (or the empirical bound) above ``1 + tolerance`` triggers a warning.
        stage: take the probe from the ``"val"`` or ``"train"`` dataset.
        seed: probe selection seed.
        batch_size: images per forward/backward.
        model_attr: attribute of the LightningModule holding the classifier (``None``: the module).
    """

    def __init__(
        self,
        epsilons: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
        probe_per_class: int = 20,
        classes: list[int] | None = None,
        every_n_epochs: int = 1,
        layers_every_n_epochs: int | None = None,
        check_layers: bool = True,
        tolerance: float = 1e-3,
        stage: Literal["val", "train"] = "val",
        seed: int = 0,
        batch_size: int = 256,
        model_attr: str | None = "model",
    ) -> None:
        if every_n_epochs < 1 or (layers_every_n_epochs is not None and layers_every_n_epochs < 1):
            raise ValueError("every_n_epochs and layers_every_n_epochs must be >= 1")
        if probe_per_class < 1:
            raise ValueError(f"probe_per_class must be >= 1, got {probe_per_class}")
        CertifiedAccuracy(epsilons, "vector")  # validates the epsilons now, not mid-training
        self.epsilons = [float(e) for e in epsilons]
        self.probe_per_class = probe_per_class
        self.classes = classes
        self.every_n_epochs = every_n_epochs
        self.layers_every_n_epochs = layers_every_n_epochs or every_n_epochs
        self.check_layers = check_layers
        self.tolerance = tolerance
        self.stage = stage
        self.seed = seed
        self.batch_size = batch_size
        self.model_attr = model_attr
        self.results: dict[str, float] = {}
        self._probe: tuple[Tensor, Tensor] | None = None

    def _load_probe(self, trainer: pl.Trainer, model: nn.Module) -> tuple[Tensor, Tensor]:
        dataset = probe_dataset(trainer, self.stage)
        if self.classes is None:  # every output of the model
            image = torch.as_tensor(image_and_label(dataset[0], 0)[0])
            with evaluation(model, grad=False):
                num_classes = model(image[None].to(next(model.parameters()).device)).shape[1]
        else:
            num_classes = max(self.classes) + 1
        return load_probe(dataset, self.probe_per_class, num_classes, self.classes, self.seed)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure and log when due."""
        measure = is_due(trainer, self.every_n_epochs)
        check_layers = self.check_layers and is_due(trainer, self.layers_every_n_epochs)
        if not (measure or check_layers):
            return
        model = monitored_model(pl_module, self.model_attr)
        certificate = model_certificate(model)  # refuses a model without one, clearly
        results: dict[str, float] = {}
        if measure:
            if self._probe is None:
                self._probe = self._load_probe(trainer, model)
            results.update(self._certify(trainer, model, certificate))
        if check_layers:
            results.update(self._check_layers(model))
        for key, value in results.items():
            pl_module.log(key, value, sync_dist=True)  # same value on every rank: the mean changes nothing
        self.results = results

    def _certify(self, trainer: pl.Trainer, model: nn.Module, certificate: str) -> dict[str, float]:
        device = next(model.parameters()).device
        images, labels = self._probe
        mine = rank_shard(range(len(images)), trainer.global_rank, trainer.world_size)
        with evaluation(model, grad=True):
            # Metric states made here, outside inference mode, so updates may write into them.
            accuracy = CertifiedAccuracy(self.epsilons, certificate).to(device)
            largest, mean = MaxMetric().to(device), MeanMetric().to(device)
            for start in range(0, len(mine), self.batch_size):
                index = mine[start : start + self.batch_size]
                x = images[index].to(device).requires_grad_(True)
                logits = model(x)
                top = logits.topk(2, dim=1).indices
                margin = logits.gather(1, top[:, :1]) - logits.gather(1, top[:, 1:])
                (grad,) = torch.autograd.grad(margin.sum(), x)
                norms = grad.flatten(1).norm(dim=1).double() / MARGIN_LIPSCHITZ[certificate]
                accuracy.update(logits.detach(), labels[index].to(device))
                largest.update(norms)
                mean.update(norms)
            results = {f"lipschitz/certified_acc@{eps:g}": float(v) for eps, v in zip(self.epsilons, accuracy.compute().reshape(-1))}
            results["lipschitz/empirical_lower_bound"] = float(largest.compute())
            results["lipschitz/empirical_mean"] = float(mean.compute())
        if results["lipschitz/empirical_lower_bound"] > 1 + self.tolerance:
            rank_zero_warn(
                f"LipschitzMonitor: an input gradient of the logit margin has norm {results['lipschitz/empirical_lower_bound']:.4f} "
                f"× the certified constant ({MARGIN_LIPSCHITZ[certificate]:.4g}): the network is provably not 1-Lipschitz, "
                "its certified accuracies are wrong"
            )
        return results

    def _check_layers(self, model: nn.Module) -> dict[str, float]:
        # The power iteration differentiates through each layer (so: no inference mode), one
        # image at a time: tiny ops that a second thread does not speed up, and that wait on
        # thread barriers when the cores are busy (digits model, loaded 2-core machine: 0.6 s of
        # CPU with one thread, 8 s with two; unloaded, one thread costs 25% more on CPU).
        with torch.inference_mode(False), single_cpu_thread(next(model.parameters()).device):
            bound, layers = lipschitz_bound(model)
        children = dict(model.named_children())
        results = {"lipschitz/bound": float(bound)}
        broken = []
        for layer in layers:
            module = children.get(layer.name)
            if module is None or next(module.parameters(), None) is None:
                continue  # activations, pooling, reshapes: 1-Lipschitz by construction
            results[f"lipschitz/sigma/{layer.name}"] = float(layer.constant)
            if layer.constant > 1 + self.tolerance:
                broken.append(f"layer {layer.name} ({type(module).__name__}): {layer.constant:.5f} ({layer.how})")
        if broken:
            rank_zero_warn(
                "LipschitzMonitor: the 1-Lipschitz bound is broken (tolerance "
                f"{self.tolerance:g}) in " + "; ".join(broken) + f". Whole-network bound {bound:.5f}: this epoch's "
                "certified accuracies overstate robustness (radii should be divided by the bound). "
                "Known cause: bf16 autocast around Björck orthonormalization (SPEC §4)."
            )
        return results
