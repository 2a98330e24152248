"""``AlignedClassifier``: a classifier trained with ``objective + Σ λ_i · penalty_i``.

Follow one batch through ``training_step``:

1. ``Sample(image, human_map, has_map, label)`` arrives from the DataModule;
2. one forward of every sample; the samples that carry a human map are forwarded with
   ``requires_grad`` on their inputs;
3. each penalty declares the input gradient it needs (``gradient_key``, ``score``); the module
   asks autograd once per distinct gradient (``create_graph=True`` in training, so the
   penalties are differentiable w.r.t. the weights);
4. ``loss = objective(logits, label) + Σ weight_i(progress) · penalty_i(gradient, human_map)``;
5. one ordinary backward, done by Lightning.

Validation and test measure every penalty, weight 0 included, without the double backward.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import IterableDataset
from torchmetrics.classification import MulticlassAccuracy

from harmonia.data.sample import Sample
from harmonia.losses import Constant, CrossEntropy, Harmonization, Penalty
from harmonia.models import build_model, cached_weights
from harmonia.optim import apply_lr_scales, parameter_groups


class AlignedClassifier(pl.LightningModule):
    """Image classifier whose input gradients are shaped by penalties towards human maps.

    Args:
        arch: registered model name (``harmonia models`` lists them).
        arch_args: keyword arguments of the model constructor (``num_classes`` is added).
        num_classes: number of classes.
        objective: classification objective, ``objective(logits, labels) -> scalar``
            (``harmonia.losses.CrossEntropy``, ``TauCrossEntropy``, ``HKR`` or any module);
            default ``CrossEntropy(label_smoothing=0.1)``.
        penalties: ``harmonia.losses.Penalty`` objects (``Harmonization``, ``RightReasons``);
            default ``[Harmonization()]``, the reference setting; ``[]`` trains the objective
            alone.
        optimizer: optimizer factory; its ``weight_decay`` applies only to weights that are
            not normalization/embedding/class-token parameters (``harmonia.optim``).
        lr_scheduler: optional scheduler factory.
        lr_scheduler_interval: step the scheduler every ``epoch`` (default) or every optimizer
            ``step`` (one-cycle, or cosine with ``T_max`` in steps).
        lr_scales: learning-rate multipliers per model part, e.g. ``{backbone: 0.1}`` or
            ``{head: 10, net.layer4: 0.5}`` (parts: ``harmonia.models.parts``).
    """

    def __init__(
        self,
        arch: str = "lipschitz_cnn",
        arch_args: dict[str, Any] | None = None,
        num_classes: int = 10,
        objective: nn.Module | None = None,
        penalties: list[Penalty] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step'; got {lr_scheduler_interval!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = build_model(arch, num_classes=num_classes, **(arch_args or {}))
        self.objective = objective if objective is not None else CrossEntropy()
        penalties = [Harmonization()] if penalties is None else list(penalties)
        for i, penalty in enumerate(penalties):
            if not isinstance(penalty, Penalty):
                raise TypeError(f"penalties[{i}] is a {type(penalty).__name__}; expected a harmonia.losses.Penalty")
        self.penalties = nn.ModuleList(penalties)
        self.penalty_names = _unique_names([p.name for p in penalties])
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = lr_scheduler_interval
        self.lr_scales = dict(lr_scales or {})
        parameter_groups(self.model, self.lr_scales)  # fail at construction on an unknown part
        # ModuleDict keys may not shadow nn.Module attributes ("train"), hence the suffix.
        # "acc" is plain (micro) accuracy, what papers report; "acc_macro" the mean over classes.
        self.accuracy = nn.ModuleDict(
            {f"{stage}_{kind}": MulticlassAccuracy(num_classes, average=average, validate_args=False)
             for stage in ("train", "val", "test") for kind, average in (("acc", "micro"), ("acc_macro", "macro"))}
        )

    # ----- the forward pass and the gradients the penalties ask for --------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits of the wrapped model."""
        return self.model(x)

    def progress(self) -> float:
        """Training progress in [0, 1] (optimizer steps over the fit's total); 0 outside a fit."""
        if self._trainer is None:
            return 0.0
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return 0.0
        return min(self.global_step / max(total - 1, 1), 1.0)

    def forward_with_gradients(
        self, image: Tensor, label: Tensor, has_map: Tensor, penalties: list[Penalty], create_graph: bool
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Logits of every sample and, for the mapped ones, each input gradient ``penalties`` ask for.

        Returns ``(logits (N,K), {gradient_key: (M,C,H,W)}, mapped index (M,))``. Each sample is
        forwarded once; only the mapped samples pay for input gradients. A batch that mixes
        both is forwarded as two sub-batches (a BatchNorm model then normalizes each sub-batch
        with its own statistics).
        """
        mapped = has_map.nonzero().flatten()
        if mapped.numel() == 0 or not penalties:
            return self.model(image), {}, mapped
        if mapped.numel() == len(image):
            inputs = image.detach().requires_grad_(True)
            logits = logits_mapped = self.model(inputs)
        else:
            unmapped = (~has_map).nonzero().flatten()
            inputs = image[mapped].detach().requires_grad_(True)
            logits_mapped = self.model(inputs)
            logits_unmapped = self.model(image[unmapped])
            order = torch.argsort(torch.cat([mapped, unmapped]))
            logits = torch.cat([logits_mapped, logits_unmapped])[order]
        requests: dict[str, Penalty] = {}
        for penalty in penalties:
            requests.setdefault(penalty.gradient_key, penalty)
        labels = label[mapped]
        gradients = {}
        for i, (key, penalty) in enumerate(requests.items()):
            last = i == len(requests) - 1
            # Later gradients differentiate the same forward graph again: keep it until the last.
            (gradients[key],) = torch.autograd.grad(
                penalty.score(logits_mapped, labels).sum(), inputs, create_graph=create_graph,
                retain_graph=None if last else True,
            )
        return logits, gradients, mapped

    # ----- the steps --------------------------------------------------------------------
    def _step(self, batch: Sample, stage: str) -> Tensor:
        training = stage == "train"
        # Only a non-constant schedule reads the progress (the trainer's step estimate, per step).
        scheduled = training and any(not isinstance(p.schedule, Constant) for p in self.penalties)
        progress = self.progress() if scheduled else 0.0
        weights = [p.weight_at(progress) for p in self.penalties]
        # Training pays only for terms it trains; evaluation measures every term.
        active = [i for i, w in enumerate(weights) if w > 0 or not training]
        # Evaluation needs gradients w.r.t. inputs: escape no_grad / inference_mode locally.
        with torch.inference_mode(False), torch.enable_grad(), cached_weights():
            # A stand-alone validate/test creates inference tensors, which autograd may not
            # save; normal copies are cheap next to the double backward.
            image, human_map, has_map, label = (t.clone() if t.is_inference() else t for t in batch)
            # Fused attention kernels (flash, memory-efficient) have no double backward: the
            # penalized training forward of attention models (ViTs) uses the math kernel.
            double_backward = training and bool(active)
            with sdpa_kernel([SDPBackend.MATH]) if double_backward else nullcontext():
                logits, gradients, mapped = self.forward_with_gradients(
                    image, label, has_map, [self.penalties[i] for i in active], create_graph=training
                )
            objective = self.objective(logits, label)
            loss = objective
            terms: dict[int, Tensor] = {}
            # The terms on the maps cost little: keep them in full precision under bf16
            # autocast, whose pyramid convolutions would round both maps to bf16.
            with torch.autocast(image.device.type, enabled=False):
                for i in active:
                    penalty = self.penalties[i]
                    gradient = gradients.get(penalty.gradient_key)
                    if gradient is None:  # no mapped sample in this batch
                        terms[i] = objective.new_zeros(())
                        continue
                    terms[i] = penalty(gradient.float(), human_map[mapped].float(), len(label))
                    if training:
                        loss = loss + weights[i] * terms[i]
        if not training:
            loss, objective, logits = loss.detach(), objective.detach(), logits.detach()
            terms = {i: t.detach() for i, t in terms.items()}
        for kind in ("acc", "acc_macro"):
            # update() only: the metrics are logged per epoch, so no per-batch value is computed.
            self.accuracy[f"{stage}_{kind}"].update(logits, label)
        sync = not training
        self.log(f"{stage}/loss", loss, on_step=training, on_epoch=True, prog_bar=training, sync_dist=sync)
        self.log(f"{stage}/objective", objective, on_step=False, on_epoch=True, sync_dist=sync)
        for i, term in terms.items():
            self.log(f"{stage}/{self.penalty_names[i]}", term, on_step=False, on_epoch=True, sync_dist=sync)
        if training:
            for i, penalty in enumerate(self.penalties):
                if not isinstance(penalty.schedule, Constant):
                    self.log(f"train/lambda_{self.penalty_names[i]}", weights[i], on_step=True, on_epoch=False)
        self.log(f"{stage}/acc", self.accuracy[f"{stage}_acc"], on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc_macro", self.accuracy[f"{stage}_acc_macro"], on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Sample, batch_idx: int) -> Tensor:
        """``objective + Σ λ_i · penalty_i`` on a training batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Sample, batch_idx: int) -> None:
        """Validation objective, every penalty's term (weight 0 included) and accuracy."""
        self._step(batch, "val")

    def test_step(self, batch: Sample, batch_idx: int) -> None:
        """Test objective, penalty terms and accuracy."""
        self._step(batch, "test")

    def predict_step(self, batch: Sample, batch_idx: int) -> dict[str, Tensor]:
        """Logits, probabilities and predicted class of each sample."""
        image = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = self.model(image)
        return {"logits": logits, "probs": logits.softmax(-1), "pred": logits.argmax(-1)}

    def describe(self) -> str:
        """One line naming the model, the objective and each penalty with its weight."""
        terms = ", ".join(
            f"{name} λ {p.weight:g}" + ("" if isinstance(p.schedule, Constant) else f" ({p.schedule!r})")
            for name, p in zip(self.penalty_names, self.penalties)
        )
        return f"{self.hparams.arch} (objective {type(self.objective).__name__}; penalties: {terms or 'none'})"

    def on_fit_start(self) -> None:
        """Refuse precision settings under which the double backward is silently wrong, and data
        the model cannot take (:meth:`check_input`), before the first step."""
        precision = str(self.trainer.precision)
        trained = [name for name, p in zip(self.penalty_names, self.penalties) if p.weight > 0]
        if trained and precision.startswith("16"):
            raise ValueError(
                f"precision={precision!r} scales only the final loss, so the inner input gradient of the "
                f"penalties {trained} can underflow in fp16; use 'bf16-mixed' or '32-true'"
            )
        self.check_input()

    def check_input(self) -> None:
        """One dry forward of one training sample of the trainer's datamodule, in eval mode.

        A data image size (or channel count) the model cannot take would otherwise fail in a
        matmul at the first step, or hours later at the first monitor; here it fails at once,
        naming the options to change. Skipped without a datamodule or when its training data is
        a stream (reading one streamed sample would fill a whole shuffle buffer).
        """
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return
        loader = datamodule.train_dataloader()
        dataset = getattr(loader, "dataset", None)
        random_access = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        if isinstance(dataset, IterableDataset) or not random_access:
            return
        batch = None
        # Without automatic batching (no batch_sampler) the sampler yields whole index lists.
        batched = loader.batch_sampler is not None
        # Random worker-side crops draw from torch's generator: the check leaves it as it was.
        with torch.random.fork_rng(devices=[]):
            for i in range(min(len(dataset), 16)):  # a skipped bad sample reads as None
                item = dataset[i] if batched else dataset[[i]]
                if item is not None:
                    batch = loader.collate_fn([item] if batched else item)
                    break
        if batch is None:
            return
        finish = getattr(datamodule, "finish_batch", None)
        batch = finish(batch) if callable(finish) else batch
        image = batch.image if hasattr(batch, "image") else batch[0]
        precision = trainer.precision_plugin
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), precision.forward_context():
                self.model(precision.convert_input(image[:1].to(self.device)))
        except RuntimeError as err:
            raise ValueError(self._input_mismatch(tuple(image.shape[1:]), datamodule, err)) from err
        finally:
            self.train(was_training)

    def _input_mismatch(self, shape: tuple[int, ...], datamodule: Any, err: Exception) -> str:
        """The message of a failed dry forward: what the data gives, what the model expects, what to change."""
        expected = getattr(self.model, "input_shape", None)
        data_size = getattr(datamodule, "hparams", {}).get("image_size")
        option = f"data.image_size = {data_size}" if data_size is not None else "the data's image size"
        arch = self.hparams.arch
        hints = []
        if expected is not None and len(expected) == len(shape):
            if tuple(shape[1:]) != tuple(expected[1:]):
                hints.append(f"the data's images are {'x'.join(map(str, shape[1:]))} ({option}) but {arch} expects "
                             f"{'x'.join(map(str, expected[1:]))} (model arch_args.input_size = {expected[-1]}): "
                             "make the two sizes equal")
            if shape[0] != expected[0]:
                hints.append(f"the data's images have {shape[0]} channel(s) but {arch} expects {expected[0]} "
                             "(model arch_args.in_channels)")
        if not hints:
            hints.append(f"check {option} (images {'x'.join(map(str, shape))}) against the model's input size "
                         "(arch_args.input_size)")
        return f"the model cannot take the training data: {'; '.join(hints)}. A dry forward of one sample failed: {err}"

    def configure_optimizers(self) -> Any:
        """Optimizer with decay on non-normalization weights only, per-part lr; optional scheduler."""
        optimizer = apply_lr_scales(self.optimizer_factory(parameter_groups(self.model, self.lr_scales)))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}


def _unique_names(names: list[str]) -> list[str]:
    """``names`` with ``_1``, ``_2``… added to repeats, so every penalty logs under its own key."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out
