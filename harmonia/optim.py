"""Optimizer parameter groups (per-part learning rates, the reference's decay rule) and an lr schedule.

Plain PyTorch; ``AlignedClassifier.configure_optimizers`` wires them.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Sequence

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from harmonia.models.parts import check_parts, head_names, part_of


def decayed_parameters(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (decayed, not decayed) as the reference's L2 term does.

    The harmonization reference adds ``λ_w Σ ½‖W‖²`` over every trainable weight except
    normalization, embedding and class-token parameters. With SGD, ``weight_decay=λ_w`` on the
    first group is the same gradient.
    """
    skip_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
    skip_words = ("norm", "embed", "class_token", "cls_token", "pos_embed")
    decay, no_decay = [], []
    for module_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            # Parametrized layers (deel-torchlip) store the raw weight under "parametrizations";
            # only the leaf names can match a normalization layer's.
            leaf = f"{module_name}.{name}".lower().replace("parametrizations.", "")
            if isinstance(sub, skip_types) or any(w in leaf for w in skip_words):
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay


def parameter_groups(model: nn.Module, lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Parameter groups: one per (part, decayed or not), each with an ``lr_scale``.

    ``lr_scales`` maps parts (``harmonia.models.parts``: ``head``, ``backbone``, ``all`` or a
    module name such as ``net.layer4``) to a multiplier of the optimizer's learning rate; a
    parameter takes its most specific part's scale, 1 if none. Weight decay follows
    ``decayed_parameters`` (none on normalization/embedding/class-token parameters), whatever
    the part. Groups carry a ``name`` (``backbone``, ``head/no_decay``, ...), which Lightning's
    ``LearningRateMonitor`` uses. Apply the scales with ``apply_lr_scales`` once the optimizer
    exists (its default ``lr`` is only known then).
    """
    scales = dict(lr_scales or {})
    check_parts(model, scales, "lr_scales")
    if any(s < 0 for s in scales.values()):
        raise ValueError(f"lr_scales must be >= 0; got {scales}")
    names = {id(p): n for n, p in model.named_parameters()}
    heads = head_names(model)
    decay, no_decay = decayed_parameters(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for decayed, params in ((True, decay), (False, no_decay)):
        for param in params:
            part = part_of(names[id(param)], scales, heads) or "default"
            groups.setdefault((part, decayed), []).append(param)
    out = []
    for (part, decayed), params in groups.items():
        group: dict[str, Any] = {"params": params, "lr_scale": scales.get(part, 1.0),
                                 "name": part if decayed else f"{part}/no_decay"}
        if not decayed:
            group["weight_decay"] = 0.0
        out.append(group)
    return out


def apply_lr_scales(optimizer: Optimizer) -> Optimizer:
    """Multiply each group's ``lr`` by its ``lr_scale`` (groups built by ``parameter_groups``)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


class WarmupMultiStepLR(LRScheduler):
    """Linear warm-up, then the learning rate × ``gamma`` at each milestone (epochs, or steps).

    The harmonization lab's schedule (5 warm-up epochs, ×0.1 at epochs 30, 60, 80) in one
    scheduler that a YAML file can name, which ``SequentialLR`` cannot (it takes scheduler
    instances). Factor at epoch ``e``: ``start + (1 - start) · e / warmup_epochs`` while
    ``e < warmup_epochs``, then ``gamma ** (number of milestones ≤ e)``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_epochs: int = 0,
        warmup_start_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones) or warmup_epochs < 0 or not 0 < warmup_start_factor <= 1:
            raise ValueError("milestones must be increasing, warmup_epochs >= 0 and 0 < warmup_start_factor <= 1")
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_start_factor = warmup_start_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate at ``epoch``."""
        if epoch < self.warmup_epochs:
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * epoch / self.warmup_epochs
        return self.gamma ** bisect_right(self.milestones, epoch)

    def get_lr(self) -> list[float]:
        """Closed form: ``base_lr · factor(epoch)`` for every group."""
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
