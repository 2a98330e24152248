"""``LipschitzMonitor``: certified robustness of a 1-Lipschitz classifier during training.

At each run (cadence, probe, eval context and logging: ``harmonia.callbacks.monitor.ProbeMonitor``;
by default after every epoch's validation, always in a stand-alone ``validate``), on a fixed
class-balanced probe set:

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
- **layer check** (at runs of every ``layers_every_n_epochs``-th epoch, default: every run,
  and always at the last epoch, the end of training and in a stand-alone ``validate``) with
  ``harmonia.models.lipschitz_bound``: ``lipschitz/bound`` (product of exact per-layer operator
  norms) and ``lipschitz/sigma/<layer>`` for each layer with parameters (largest singular
  value, or largest row norm for a per-logit head). A layer above ``1 + tolerance`` raises a
  rank-zero warning: the certificates logged that epoch overstate robustness. This happens
  e.g. under ``bf16-mixed`` with deel-torchlip's layers, whose Björck orthonormalization then
  runs in bfloat16.

The probe is sharded over ranks; sums and maxima are reduced by torchmetrics, so every rank
logs the same values as a 1-process run. A model without a certificate is refused before the
first training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics.aggregation import MaxMetric, MeanMetric

from harmonia.callbacks.monitor import ProbeMonitor
from harmonia.callbacks.probe import Probe
from harmonia.metrics.certified import MARGIN_LIPSCHITZ, CertifiedAccuracy, model_certificate
from harmonia.models import lipschitz_bound
from harmonia.runtime import single_cpu_thread


class LipschitzMonitor(ProbeMonitor):
    """Certified accuracy, empirical Lipschitz lower bound and per-layer bound check (see module doc).

    Args:
        epsilons: L2 radii (input space, images in [0, 1]) at which to report certified accuracy.
        layers_every_n_epochs: the per-layer check runs at the runs of every n-th epoch
            (``None``: at every run); ``lipschitz_bound`` power-iterates each convolution on
            its real input size, which costs more than the rest, so it can run less often. It
            always runs at the last epoch, at the end of training and in a stand-alone
            ``validate``; after a step run (``every_n_steps``) it does not.
        check_layers: ``False`` skips the per-layer check altogether (also in ``validate``).
        tolerance: a layer (or the empirical bound) above ``1 + tolerance`` triggers a warning.
        batch_size: images per forward/backward.
        every_n_epochs, every_n_steps, at_fit_end, per_class, classes, num_classes, seed,
            stage, model_attr: the probe and the cadence (:class:`ProbeMonitor`).
    """

    needs_grad = True

    def __init__(
        self,
        epsilons: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
        layers_every_n_epochs: int | None = None,
        check_layers: bool = True,
        tolerance: float = 1e-3,
        batch_size: int = 256,
        every_n_epochs: int = 1,
        every_n_steps: int = 0,
        at_fit_end: bool = True,
        per_class: int = 20,
        classes: Sequence[int] | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        stage: Literal["val", "train"] = "val",
        model_attr: str | None = "model",
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, at_fit_end=at_fit_end,
                         per_class=per_class, classes=classes, num_classes=num_classes, seed=seed, stage=stage,
                         model_attr=model_attr)
        if layers_every_n_epochs is not None and layers_every_n_epochs < 1:
            raise ValueError(f"LipschitzMonitor: layers_every_n_epochs must be >= 1 or None; got {layers_every_n_epochs}")
        CertifiedAccuracy(epsilons, "vector")  # validates the epsilons now, not mid-training
        self.epsilons = [float(e) for e in epsilons]
        self.layers_every_n_epochs = layers_every_n_epochs
        self.check_layers = check_layers
        self.tolerance = tolerance
        self.batch_size = batch_size

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        """The monitored model carries a certificate."""
        try:
            model_certificate(self.model(pl_module))
        except ValueError as error:
            raise ValueError(f"LipschitzMonitor: {error}; remove the monitor or change the model") from None

    def _layers_due(self, trainer: pl.Trainer) -> bool:
        if not self.check_layers or self.reason == "step":
            return False
        if self.reason != "epoch" or self.layers_every_n_epochs is None:
            return True
        return (trainer.current_epoch + 1) % self.layers_every_n_epochs == 0

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> dict[str, float]:
        """Certified accuracies and the empirical bound on the probe; the per-layer check when due."""
        model = self.model(pl_module)
        certificate = model_certificate(model)
        results = self._certify(model, certificate, probe)
        if self._layers_due(trainer):
            results.update(self._check_layers(model))
        return results

    def _certify(self, model: nn.Module, certificate: str, probe: Probe) -> dict[str, float]:
        device = next(model.parameters()).device
        # Metric states made here, outside inference mode, so updates may write into them.
        accuracy = CertifiedAccuracy(self.epsilons, certificate).to(device)
        largest, mean = MaxMetric().to(device), MeanMetric().to(device)
        for start in range(0, len(probe), self.batch_size):
            x = self.inputs(model, probe.images[start : start + self.batch_size]).requires_grad_(True)
            labels = probe.labels[start : start + self.batch_size].to(device)
            logits = model(x)
            top = logits.topk(2, dim=1).indices
            margin = logits.gather(1, top[:, :1]) - logits.gather(1, top[:, 1:])
            (grad,) = torch.autograd.grad(margin.sum(), x)
            norms = grad.flatten(1).norm(dim=1).double() / MARGIN_LIPSCHITZ[certificate]
            accuracy.update(logits.detach(), labels)
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
        # image at a time: tiny ops that a second thread does not speed up and that stall on
        # thread barriers when the cores are busy, hence one CPU thread.
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
                "Known cause: bf16 autocast around deel-torchlip's Björck orthonormalization."
            )
        return results
