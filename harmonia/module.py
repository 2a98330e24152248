"""``AlignedClassifier``: a classifier trained with ``objective + λ · harmonization``.

Follow one batch: ``training_step`` → ``forward_with_saliency`` (one forward per sample; the
samples that carry a human map are forwarded with ``requires_grad`` on their inputs and give
a saliency map through ``torch.autograd.grad(create_graph=True)``) → ``objective(logits, y)``
and ``HarmonizationLoss(saliency, map)`` → one ordinary backward (done by Lightning).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics.classification import MulticlassAccuracy

from harmonia.data.sample import Sample
from harmonia.explain.gradient import Score, input_gradient
from harmonia.losses import HarmonizationLoss, build_objective
from harmonia.losses.harmonization import TokenNormalization
from harmonia.losses.rrr import RightReasonsLoss, log_prob_sum
from harmonia.models import build_model, cached_weights
from harmonia.optim import apply_lr_scales, parameter_groups


class AlignedClassifier(pl.LightningModule):
    """Image classifier whose input-gradient saliency is pushed towards human maps.

    Args:
        arch: registered model name (``harmonia models`` lists them).
        arch_args: keyword arguments of the model constructor (``num_classes`` is added).
        num_classes: number of classes.
        objective: ``cross_entropy`` | ``tau_cross_entropy`` | ``hkr``.
        objective_args: keyword arguments of the objective (e.g. ``label_smoothing: 0.1``).
        lambda_harmonization: weight λ of the harmonization term (0 disables it in training;
            it is still measured on validation and test data).
        pyramid_levels: Gaussian pyramid levels compared (reference: 5).
        pyramid_first_level: first level compared (reference: 0, full resolution); see
            ``HarmonizationLoss``.
        token_normalization: ``batch`` (reference number) or ``mapped`` (see SPEC §1).
        saliency: channel reduction of the input gradient. ``signed`` (the reference): mean
            of the signed gradient; standardize-cut then ignores negative evidence, so a model
            may keep using a region with a negative-signed gradient unpunished. ``abs``: mean
            of |gradient|, so any sensitivity outside the human map is penalized.
        saliency_score: what the saliency differentiates: ``logit`` (the reference: the
            true class's logit) or ``log_prob`` (its log-softmax, which also moves with every
            other class's logit; a model can read a shortcut through the other logits while
            the true logit's gradient stays flat, see benchmarks/README.md).
        lambda_rrr: weight of the Right-for-the-Right-Reasons penalty (Ross et al. 2017,
            ``harmonia.losses.rrr``) on ``∂ Σ_k log p_k / ∂x`` outside the human map; 0
            (default) disables it. Independent of ``lambda_harmonization``.
        optimizer: optimizer factory; its ``weight_decay`` applies only to weights that are
            not normalization/embedding/class-token parameters (the reference's L2 term; with
            SGD, ``weight_decay = λ_w`` is the reference's ``λ_w Σ ½‖W‖²``).
        lr_scheduler: optional scheduler factory.
        lr_scheduler_interval: step the scheduler every ``epoch`` (default) or every optimizer
            ``step`` (one-cycle, or cosine with ``T_max`` in steps).
        lr_scales: learning-rate multipliers per model part, e.g. ``{backbone: 0.1}`` or
            ``{head: 10, net.layer4: 0.5}`` (parts: ``harmonia.models.parts``); the decay rule
            above holds in every group.
        lambda_end_scale: multiplier of λ at the end of training: λ follows a cosine from
            ``lambda_harmonization`` at the first optimizer step to ``lambda_end_scale ·
            lambda_harmonization`` at the last one (of ``max_epochs``/``max_steps``), per step.
            1 (default) keeps λ constant. Below 1, the term weighs most while the classifier is
            forming (when a shortcut is learned) and less once the features are set; λ = 0
            still means no harmonization at all, whatever the scale.
    """

    def __init__(
        self,
        arch: str = "lipschitz_cnn",
        arch_args: dict[str, Any] | None = None,
        num_classes: int = 10,
        objective: str = "cross_entropy",
        objective_args: dict[str, Any] | None = None,
        lambda_harmonization: float = 1.0,
        pyramid_levels: int = 5,
        token_normalization: TokenNormalization = "batch",
        saliency: Literal["signed", "abs"] = "signed",
        saliency_score: Score = "logit",
        lambda_rrr: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        lr_scales: dict[str, float] | None = None,
        lambda_end_scale: float = 1.0,
        pyramid_first_level: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("lambda_harmonization", lambda_harmonization), ("lambda_rrr", lambda_rrr),
                            ("lambda_end_scale", lambda_end_scale)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0; got {value}")
        if saliency_score not in ("logit", "log_prob"):
            raise ValueError(f"saliency_score must be 'logit' or 'log_prob'; got {saliency_score!r}")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step'; got {lr_scheduler_interval!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = build_model(arch, num_classes=num_classes, **(arch_args or {}))
        self.objective = build_objective(objective, **(objective_args or {}))
        self.harmonization = HarmonizationLoss(pyramid_levels, token_normalization, first_level=pyramid_first_level)
        self.lambda_harmonization = lambda_harmonization
        self.lambda_end_scale = lambda_end_scale
        if saliency not in ("signed", "abs"):
            raise ValueError(f"saliency must be 'signed' or 'abs'; got {saliency!r}")
        self.saliency = saliency
        self.saliency_score = saliency_score
        self.lambda_rrr = lambda_rrr
        self.rrr = RightReasonsLoss(token_normalization)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = lr_scheduler_interval
        self.lr_scales = dict(lr_scales or {})
        parameter_groups(self.model, self.lr_scales)  # fail at construction on an unknown part
        # ModuleDict keys may not shadow nn.Module attributes ("train"), hence the suffix.
        self.accuracy = torch.nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(num_classes, validate_args=False) for stage in ("train", "val", "test")}
        )

    def current_lambda(self) -> float:
        """λ of the harmonization term at this training step (the schedule, if any).

        Without a schedule, or outside a fit, it is ``lambda_harmonization``.
        """
        if self.lambda_end_scale == 1.0 or self._trainer is None:
            return self.lambda_harmonization
        total = self.trainer.estimated_stepping_batches
        progress = min(self.global_step / max(total - 1, 1), 1.0) if math.isfinite(total) else 0.0
        scale = self.lambda_end_scale + (1.0 - self.lambda_end_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lambda_harmonization * scale

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the wrapped model."""
        return self.model(x)

    def forward_with_saliency(
        self, image: Tensor, label: Tensor, has_map: Tensor, create_graph: bool
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Logits of every sample and the harmonization saliency of the mapped ones.

        Returns ``(logits (N,K), saliency (M,1,H,W) or None, mapped index (M,))``. Only the
        mapped samples pay for the input gradient; each sample is forwarded once. A batch that
        mixes both is forwarded as two sub-batches (note: a BatchNorm model then normalizes
        each sub-batch with its own statistics).
        """
        logits, saliency, _, mapped = self.forward_with_explanations(image, label, has_map, create_graph)
        return logits, saliency, mapped

    def forward_with_explanations(
        self, image: Tensor, label: Tensor, has_map: Tensor, create_graph: bool,
        saliency: bool = True, rrr: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """Logits, and for the mapped samples the saliency and/or the RRR input gradient.

        Returns ``(logits (N,K), saliency (M,1,H,W) | None, rrr gradient (M,C,H,W) | None,
        mapped index (M,))``. Both explanations come from the same forward of the mapped
        samples (the graph is kept for the second gradient).
        """
        mapped = has_map.nonzero().flatten()
        if mapped.numel() == 0 or not (saliency or rrr):
            return self.model(image), None, None, mapped
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
        saliency_map = rrr_gradient = None
        if saliency:
            grad = input_gradient(
                logits_mapped, inputs, label[mapped], create_graph, self.saliency_score, retain_graph=rrr or None
            )
            saliency_map = self._reduce(grad)
        if rrr:
            (rrr_gradient,) = torch.autograd.grad(log_prob_sum(logits_mapped), inputs, create_graph=create_graph)
        return logits, saliency_map, rrr_gradient, mapped

    def _reduce(self, grad: Tensor) -> Tensor:
        """Channel reduction of the input gradient to a ``(M,1,H,W)`` saliency map."""
        return (grad.abs() if self.saliency == "abs" else grad).mean(dim=1, keepdim=True)

    def _step(self, batch: Sample, stage: str) -> Tensor:
        training = stage == "train"
        lam = self.current_lambda() if training else self.lambda_harmonization
        want_saliency = lam > 0 or not training
        want_rrr = self.lambda_rrr > 0
        # Evaluation needs gradients w.r.t. inputs: escape no_grad / inference_mode locally.
        with torch.inference_mode(False), torch.enable_grad(), cached_weights():
            # A stand-alone validate/test creates inference tensors, which autograd may not
            # save; normal copies are cheap next to the double backward.
            image, human_map, has_map, label = (t.clone() if t.is_inference() else t for t in batch)
            # Fused attention kernels (flash, memory-efficient) have no double backward: the
            # harmonized training forward of attention models (ViTs) uses the math kernel.
            double_backward = training and (want_saliency or want_rrr)
            with sdpa_kernel([SDPBackend.MATH]) if double_backward else nullcontext():
                logits, saliency, rrr_gradient, mapped = self.forward_with_explanations(
                    image, label, has_map, training, want_saliency, want_rrr
                )
            objective = self.objective(logits, label)
            if saliency is None:
                harmonization = objective.new_zeros(())
            else:
                # The loss on the maps costs little: keep it in full precision under bf16 autocast,
                # whose pyramid convolutions would round both maps to bf16 (measured on ResNet-18
                # and a ViT: 25-45% of the bf16 error of the harmonization gradient).
                with torch.autocast(image.device.type, enabled=False):
                    harmonization = self.harmonization(saliency, human_map[mapped].to(saliency.dtype), len(label))
            loss = objective + lam * harmonization
            rrr = objective.new_zeros(())
            if rrr_gradient is not None:
                rrr = self.rrr(rrr_gradient, human_map[mapped].to(rrr_gradient.dtype), len(label))
                loss = loss + self.lambda_rrr * rrr
        if not training:
            loss, objective, harmonization, rrr, logits = (t.detach() for t in (loss, objective, harmonization, rrr, logits))
        accuracy = self.accuracy[f"{stage}_acc"]
        # update() only: the metric is logged per epoch, so no per-batch value is computed.
        accuracy.update(logits, label)
        on_step = training
        sync = not training
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=training, sync_dist=sync)
        self.log(f"{stage}/objective", objective, on_step=False, on_epoch=True, sync_dist=sync)
        self.log(f"{stage}/harmonization", harmonization, on_step=False, on_epoch=True, sync_dist=sync)
        if training and self.lambda_end_scale != 1.0:
            self.log("train/lambda_harmonization", lam, on_step=True, on_epoch=False)
        if want_rrr:
            self.log(f"{stage}/rrr", rrr, on_step=False, on_epoch=True, sync_dist=sync)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Sample, batch_idx: int) -> Tensor:
        """``objective + λ · harmonization`` on a training batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Sample, batch_idx: int) -> None:
        """Validation loss terms and accuracy (harmonization measured even when λ = 0)."""
        self._step(batch, "val")

    def test_step(self, batch: Sample, batch_idx: int) -> None:
        """Test loss terms and accuracy."""
        self._step(batch, "test")

    def predict_step(self, batch: Sample, batch_idx: int) -> dict[str, Tensor]:
        """Logits, probabilities and predicted class of each sample."""
        image = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = self.model(image)
        return {"logits": logits, "probs": logits.softmax(-1), "pred": logits.argmax(-1)}

    def on_fit_start(self) -> None:
        """Refuse precision settings under which the double backward is silently wrong."""
        precision = str(self.trainer.precision)
        if self.lambda_harmonization > 0 and precision.startswith("16"):
            raise ValueError(
                f"precision={precision!r} scales only the final loss, so the inner input gradient "
                "of the harmonization term can underflow in fp16; use 'bf16-mixed' or '32-true'"
            )

    def configure_optimizers(self) -> Any:
        """Optimizer with decay on non-normalization weights only, per-part lr; optional scheduler."""
        optimizer = apply_lr_scales(self.optimizer_factory(parameter_groups(self.model, self.lr_scales)))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
