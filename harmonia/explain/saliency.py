"""Gradient saliency and SmoothGrad as ``attribute(model, x, target)`` methods.

Both read the input gradient of ``harmonia.explain.gradient``; they differ only in where it is
taken (at ``x``, or averaged over noisy copies of ``x``) and in how channels are reduced.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from harmonia.explain.base import (
    Explainer,
    Reduction,
    batched_gradients,
    check_positive,
    check_reduction,
    gradients_on,
    reduce_channels,
)
from harmonia.explain.gradient import SCORES, Score, class_score, input_gradient


class Saliency(Explainer):
    """Input-gradient saliency: the map the harmonization penalty trains and the monitors score.

    ``map = reduce(∂ score_y(x) / ∂x)`` with ``score`` the target's raw logit or its
    log-probability. The harmonization penalty (``harmonia.losses.Harmonization``) owns one of
    these and calls ``score_of`` and ``reduce`` on the gradient of its own training forward, so
    ``attribute`` with the same object gives exactly the map the loss trains.

    Args:
        reduction: channel reduction (``harmonia.explain.base.reduce_channels``). Default
            ``max_abs``: Xplique's ``Saliency`` and the harmonization paper's evaluation
            explainer; ``mean`` is the reference loss's signed map; ``mean_abs`` penalizes any
            sensitivity, whatever its sign.
        score: ``logit`` (the harmonization reference and the ClickMe evaluation) or
            ``log_prob`` (see ``harmonia.explain.gradient.class_score``).
        create_graph: keep ``attribute``'s maps differentiable w.r.t. the model's parameters
            (for a loss written by hand); the training penalty decides this itself.
        batch_size: images per forward/backward.
    """

    def __init__(
        self, reduction: Reduction = "max_abs", score: Score = "logit", create_graph: bool = False, batch_size: int = 64
    ) -> None:
        super().__init__(batch_size)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}; got {score!r}")
        self.score, self.reduction, self.create_graph = score, check_reduction(reduction), bool(create_graph)

    def score_of(self, logits: Tensor, target: Tensor) -> Tensor:
        """The per-sample score ``(N,)`` whose input gradient this saliency reads."""
        return class_score(logits, target, self.score)

    def reduce(self, gradient: Tensor) -> Tensor:
        """``(N,C,H,W)`` input gradient → ``(N,1,H,W)`` map."""
        return reduce_channels(gradient, self.reduction)

    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        if self.create_graph:
            with gradients_on():
                inputs = x.detach().requires_grad_(True)
                grad = input_gradient(model(inputs), inputs, target, create_graph=True, score=self.score)
            return self.reduce(grad)
        grads = torch.empty_like(x, dtype=torch.float32)
        for part, grad in batched_gradients(model, lambda s: (x[s], target[s]), len(x), self.batch_size, self.score):
            grads[part] = grad.float()
        return self.reduce(grads)


class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al. 2017): the input gradient averaged over noisy copies of ``x``.

    ``map = reduce_channels(mean_s ∂ logit_y(x + ε_s) / ∂x)`` with ``ε_s ~ N(0, noise²)``,
    ``s = 1..nb_samples`` (Xplique: mean of signed gradients, then the channel reducer).

    The noise is ``torch.randn(nb_samples, C, H, W, generator=torch.Generator().manual_seed(seed))
    * noise``, drawn on the CPU and shared by every image of the batch: the same image gets the
    same map whatever batch, batch size, device or DDP rank it is explained in (common random
    numbers; Xplique draws fresh noise per image, which only changes the Monte-Carlo error).

    Args:
        nb_samples: noisy copies per image (Xplique default 50).
        noise: standard deviation of the Gaussian noise, absolute, on the model's input scale
            (Xplique default 0.2; Harmonia's inputs are [0, 1] images, so 0.2 is 20% of the range).
        reduction: channel reduction of the averaged gradient (default ``mean``, Xplique's).
        seed: seed of the noise generator.
        batch_size: noisy copies per forward/backward.
    """

    def __init__(
        self,
        nb_samples: int = 50,
        noise: float = 0.2,
        reduction: Reduction = "mean",
        seed: int = 0,
        batch_size: int = 64,
    ) -> None:
        super().__init__(batch_size)
        check_positive(nb_samples=nb_samples)
        if noise < 0:
            raise ValueError(f"noise must be >= 0; got {noise}")
        self.nb_samples, self.noise, self.reduction, self.seed = int(nb_samples), float(noise), check_reduction(reduction), int(seed)

    def noise_samples(self, shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The ``(nb_samples, C, H, W)`` noise added to every image (see the class docstring)."""
        generator = torch.Generator().manual_seed(self.seed)
        return (torch.randn(self.nb_samples, *shape, generator=generator) * self.noise).to(device, dtype)

    def _attribute(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        eps = self.noise_samples(tuple(x.shape[1:]), x.device, x.dtype)
        nb = self.nb_samples
        image = torch.arange(len(x) * nb, device=x.device) // nb  # flat index → image
        sample = torch.arange(len(x) * nb, device=x.device) % nb  # flat index → noise draw

        def noisy(part: slice) -> tuple[Tensor, Tensor]:
            return x[image[part]] + eps[sample[part]], target[image[part]]

        total = torch.zeros_like(x, dtype=torch.float32)
        for part, grad in batched_gradients(model, noisy, len(x) * nb, self.batch_size):
            total.index_add_(0, image[part], grad.float())
        return reduce_channels(total / nb, self.reduction)
