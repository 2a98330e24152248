"""``ProbeMonitor``: what every periodic diagnostic shares, so a monitor implements only what it measures.

Follow one monitor through a fit:

1. **Checks before the first step.** At ``on_fit_start`` (and at the start of a stand-alone
   ``validate``) the monitor chooses its probe and calls :meth:`ProbeMonitor.check` with it,
   in the eval context below: a subclass verifies there, on one dry forward, what would
   otherwise fail hours later (a model without a certificate, a layer with negative
   activations) and names the option to change; one probe image goes through the model first, so
   images of the wrong size fail here too. When no loader can be found yet (loaders
   handed to ``trainer.fit`` directly are built later) the check runs at the first run.
2. **The probe** (``harmonia.callbacks.probe``): chosen once, ``per_class`` images of each of
   ``classes``, drawn with ``seed`` from the ``stage`` (``val``/``train``) data or read from the
   start of a stream, sharded over DDP ranks, kept on the CPU. The same images at every run,
   so curves compare.
3. **The cadence.** During ``fit``: at the end of the validation of every
   ``every_n_epochs``-th epoch and of the last epoch; after every ``every_n_steps``-th optimizer
   step; and when training ends (``at_fit_end``: ``max_steps``, early stopping, a last epoch
   without validation), unless a run already happened at that global step. Never in the
   sanity check; always in a stand-alone ``validate``. At most one run per global step.
4. **The eval context.** Every submodule in eval mode (restored afterwards), out of
   ``torch.inference_mode`` (a stand-alone ``validate`` runs inside it), grad mode as the
   subclass asks (``needs_grad``), each 1-Lipschitz layer orthonormalized once
   (``harmonia.models.cached_weights``).
5. **Logging.** :meth:`ProbeMonitor.measure` returns scalars already reduced over ranks (the
   same on every rank). At a validation end they go through ``pl_module.log(...,
   sync_dist=True)`` (in the results of ``trainer.validate`` and visible to checkpoint
   callbacks); elsewhere (after a training step, at the end of training, where Lightning
   forbids ``self.log`` or logs steps only every ``log_every_n_steps``) straight to every logger
   at the global step, and into ``trainer.callback_metrics``. Pictures go through
   ``harmonia.callbacks.logging.log_image`` from rank zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from harmonia.callbacks.probe import Probe, as_sample, choose_probe, is_stream, probe_loader, rank_shard
from harmonia.models import cached_weights

RunReason = Literal["epoch", "last", "step", "end", "validate"]


def _evaluation_finish(trainer: pl.Trainer) -> Callable[[Any], Any] | None:
    """The datamodule's ``finish_batch`` in evaluation form, if it has one (see ``choose_probe``)."""
    finish = getattr(trainer.datamodule, "finish_batch", None)
    return None if finish is None else (lambda batch: finish(batch, train=False))


def monitored_model(pl_module: pl.LightningModule, attr: str | None) -> nn.Module:
    """``pl_module.<attr>`` (the wrapped classifier: ``AlignedClassifier.model``) or the module itself."""
    if not attr:
        return pl_module
    model = getattr(pl_module, attr, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{type(pl_module).__name__} has no submodule {attr!r} to monitor; set model_attr (None: the module itself)")
    return model


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag.

    Diagnostics describe the inference model (no dropout, BatchNorm running statistics), and
    a 1-Lipschitz layer in training mode would update its power-iteration state at every
    forward: a diagnostic must not change how the model trains.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


@contextmanager
def evaluation(model: nn.Module, grad: bool) -> Iterator[None]:
    """Eval mode, weights orthonormalized once (``cached_weights``), and grad mode ``grad`` even inside ``inference_mode``.

    A stand-alone ``validate``/``test`` runs under ``torch.inference_mode``, which
    ``enable_grad`` alone cannot leave; the model's mode is restored afterwards.
    """
    with eval_mode(model), torch.inference_mode(False), torch.set_grad_enabled(grad), cached_weights():
        yield


def gather_shards(pl_module: pl.LightningModule, local: Tensor, total: int) -> Tensor:
    """Every rank's strided shard (``rank_shard``) of ``total`` rows, reassembled in the original order.

    Shards differ in length by at most one, so each is padded to the longest before
    ``all_gather``; the result is the same tensor on every rank. Every rank must call it.
    """
    world = pl_module.trainer.world_size if pl_module._trainer is not None else 1
    if world == 1:
        return local
    longest = -(-total // world)
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[: len(local)] = local
    gathered = pl_module.all_gather(padded)  # (world, longest, ...)
    full = local.new_empty(total, *local.shape[1:])
    for rank in range(world):
        count = len(range(rank, total, world))
        full[rank::world] = gathered[rank, :count].to(local.device)
    return full


class ProbeMonitor(pl.Callback):
    """Base of the monitors: owns the probe, the cadence, the eval context and the logging.

    A subclass implements :meth:`measure` (and may implement :meth:`check`); it sets
    ``needs_grad`` if it differentiates, ``shard_probe = False`` if it needs the whole probe
    on every rank (it then splits its own work), and ``head_rows`` for the probe rows it draws.

    Args:
        every_n_epochs: run after the validation of every n-th epoch of ``fit`` (0: only the
            last epoch); an epoch without validation has no epoch run.
        every_n_steps: also run after every n-th optimizer step (0: never).
        at_fit_end: run when training ends if no run happened at that global step (training
            stopped by ``max_steps`` or early stopping, or a last epoch without validation).
        per_class: probe images per class.
        classes: classes in the probe (default: every class: ``num_classes``, else the
            dataset's or the module's ``num_classes``, else the model's output width).
        num_classes: number of classes when ``classes`` is not given.
        seed: seed of the probe choice (map-style data).
        stage: take the probe from the ``"val"`` or the ``"train"`` data.
        model_attr: attribute of the LightningModule holding the classifier (``None``: the module).
    """

    needs_grad: ClassVar[bool] = False
    shard_probe: ClassVar[bool] = True

    def __init__(
        self,
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
        name = type(self).__name__
        if every_n_epochs < 0 or every_n_steps < 0:
            raise ValueError(f"{name}: every_n_epochs and every_n_steps must be >= 0; got {every_n_epochs}, {every_n_steps}")
        if per_class < 1:
            raise ValueError(f"{name}: per_class must be >= 1; got {per_class}")
        if stage not in ("val", "train"):
            raise ValueError(f"{name}: stage must be 'val' or 'train'; got {stage!r}")
        if classes is not None and (not len(classes) or min(int(c) for c in classes) < 0):
            raise ValueError(f"{name}: classes must be a non-empty list of class indices; got {classes!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"{name}: num_classes must be >= 1; got {num_classes}")
        self.every_n_epochs, self.every_n_steps, self.at_fit_end = int(every_n_epochs), int(every_n_steps), bool(at_fit_end)
        self.per_class, self.seed, self.stage, self.model_attr = int(per_class), int(seed), stage, model_attr
        self.classes = None if classes is None else [int(c) for c in classes]
        self.num_classes = num_classes
        self.head_rows = 0
        self.results: dict[str, float] = {}  # the last run's scalars
        self.reason: RunReason | None = None  # why the current (or last) run happened
        self._probe: Probe | None = None
        self._checked = False
        self._last_step: int | None = None
        self._last_epoch: int | None = None

    # ----- what a subclass implements ----------------------------------------------------
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> dict[str, float]:
        """Measure on this rank's ``probe`` share; return scalars reduced over ranks (equal on every rank).

        Called on every rank, inside the eval context; may log pictures (rank zero).
        """
        raise NotImplementedError

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Probe) -> None:
        """Refuse a misconfiguration before the first training step (raise, naming the option). Default: nothing."""

    # ----- helpers for subclasses --------------------------------------------------------
    def model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The monitored classifier (``model_attr``)."""
        return monitored_model(pl_module, self.model_attr)

    @staticmethod
    def inputs(model: nn.Module, images: Tensor) -> Tensor:
        """A copy of ``images`` on the model's device, in its parameters' dtype (a ``16-true`` model holds fp16 weights).

        Always a new, normal tensor (made outside inference mode), never the kept probe itself:
        a caller may set ``requires_grad`` on it or write into it.
        """
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        device, dtype = (param.device, param.dtype) if param is not None else (images.device, images.dtype)
        with torch.inference_mode(False):
            return images.to(device=device, dtype=dtype if images.is_floating_point() else images.dtype, copy=True)

    def gather_rows(self, pl_module: pl.LightningModule, local: Tensor, probe: Probe, rows: int) -> Tensor:
        """The first ``rows`` probe rows of a per-row result (``local``: one row per row of this rank's share), on every rank.

        With a sharded probe each rank holds some of those rows; every rank must call this.
        """
        rows = min(rows, probe.size)
        if not self.shard_probe or pl_module._trainer is None or pl_module.trainer.world_size == 1:
            return local[:rows]
        trainer = pl_module.trainer
        mine = len(rank_shard(range(rows), trainer.global_rank, trainer.world_size))
        return gather_shards(pl_module, local[:mine].contiguous(), rows)

    # ----- probe -------------------------------------------------------------------------
    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Probe:
        """This rank's share of the probe, chosen on first use and then kept."""
        if self._probe is None:
            loader = probe_loader(trainer, self.stage)
            if loader is None or getattr(loader, "dataset", None) is None:
                raise ValueError(f"{type(self).__name__}: no {self.stage} dataloader to take a probe from (set stage)")
            classes = self._classes(pl_module, loader)
            self._probe = choose_probe(
                loader, classes, self.per_class, self.seed, trainer.global_rank, trainer.world_size,
                shard=self.shard_probe, head_rows=self.head_rows, broadcast=trainer.strategy.broadcast,
                finish=_evaluation_finish(trainer),
            )
            if self._probe.size == 0:
                raise ValueError(f"{type(self).__name__}: the {self.stage} data has no image of classes {classes}")
        return self._probe

    def _classes(self, pl_module: pl.LightningModule, loader: object) -> list[int]:
        if self.classes is not None:
            return self.classes
        dataset = loader.dataset
        hparams = getattr(pl_module, "hparams", {})
        count = self.num_classes or getattr(dataset, "num_classes", None) or (hparams.get("num_classes") if hasattr(hparams, "get") else None)
        if not count:  # the model's output width, on one sample
            first = next(iter(loader)) if is_stream(dataset) else dataset[0]
            image = torch.as_tensor(as_sample(first, "the probe's first sample").image)
            image = image if is_stream(dataset) else image[None]
            with evaluation(pl_module, grad=False):
                count = self._forward_one(pl_module, image[:1].clone()).shape[-1]
        return list(range(int(count)))

    def _forward_one(self, pl_module: pl.LightningModule, images: Tensor) -> Tensor:
        """The model's output for ``images[:1]``; a clear error when it cannot take such images."""
        model = self.model(pl_module)
        try:
            with torch.no_grad():
                return model(self.inputs(model, images[:1]))
        except RuntimeError as error:
            raise ValueError(
                f"{type(self).__name__}: {type(model).__name__} cannot take the {self.stage} data's images of shape "
                f"{tuple(images.shape[1:])} ({error}); make the data's image size match the model's input size"
            ) from error

    # ----- cadence -----------------------------------------------------------------------
    def _fitting(self, trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose the probe and run :meth:`check` once, where the data can already be reached."""
        if self._checked or probe_loader(trainer, self.stage) is None:
            return
        probe = self.probe(trainer, pl_module)
        with evaluation(pl_module, grad=self.needs_grad):
            self._dry_forward(pl_module, probe)
            self.check(trainer, pl_module, probe)
        self._checked = True

    def _dry_forward(self, pl_module: pl.LightningModule, probe: Probe) -> None:
        """One probe image through the model: images the model cannot take fail here, not mid-run."""
        images = probe.images if len(probe) else (probe.head.images if probe.head is not None else probe.images)
        if len(images):
            self._forward_one(pl_module, images)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the configuration before the first step; start the cadence afresh."""
        self._last_step = self._last_epoch = None
        self._prepare(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A stand-alone ``validate``: check the configuration before the first batch."""
        if not self._fitting(trainer):
            self._prepare(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
        """Run after every ``every_n_steps``-th optimizer step (not after an accumulation micro-batch)."""
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module, "step")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run at the chosen and the last epochs of ``fit``, and at every stand-alone ``validate``."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._run(trainer, pl_module, "validate")
            return
        if not self._fitting(trainer):
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        periodic = self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0
        # One run per epoch (val_check_interval < 1 validates several times) and per global step.
        if (periodic or last) and epoch != self._last_epoch and trainer.global_step != self._last_step:
            self._run(trainer, pl_module, "last" if last else "epoch")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The end-of-training run, unless one already happened at this step (before teardown moves the model)."""
        if self.at_fit_end and trainer.global_step != self._last_step:
            self._run(trainer, pl_module, "end")

    # ----- one run -----------------------------------------------------------------------
    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: RunReason) -> dict[str, float]:
        self.reason = reason
        if self._fitting(trainer):
            self._last_step = trainer.global_step
            if reason in ("epoch", "last"):
                self._last_epoch = trainer.current_epoch
        if not self._checked:
            self._prepare(trainer, pl_module)
        probe = self.probe(trainer, pl_module)
        with evaluation(pl_module, grad=self.needs_grad):
            values = self.measure(trainer, pl_module, probe)
        self.results = dict(values)
        self._log(trainer, pl_module, values, at_validation_end=reason in ("epoch", "last", "validate"))
        return values

    @staticmethod
    def _log(trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float], at_validation_end: bool) -> None:
        if at_validation_end:
            for key, value in values.items():
                # Values are equal on every rank already: sync_dist's mean changes nothing and
                # keeps Lightning's check on unsynchronized epoch-level logs under DDP quiet.
                pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
            return
        trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in values.items()})
        if values:
            for logger in trainer.loggers:  # loggers write from rank zero only
                logger.log_metrics({**values, "epoch": trainer.current_epoch}, step=trainer.global_step)
