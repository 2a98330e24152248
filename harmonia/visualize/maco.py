"""MACO feature visualization (Fel et al., NeurIPS 2023, "Unlocking Feature Visualization for
Deeper Networks with MAgnitude Constrained Optimization"), in plain PyTorch.

The image of each objective is ``irfft2(M · e^{iφ})`` with a fixed magnitude ``M`` (a
:class:`~harmonia.visualize.Spectrum` measured on the user's images) and a phase ``φ``, the
only variable. Pointwise steps then make it a model input: the phase is standardized, the
spatial image standardized, its colours recorrelated (fixed 3×3 matrix for RGB, identity for
grey), squashed by a sigmoid and scaled to the model's value range. Each step cuts random
crops of the canvas (centres ``~ N(0.5, center_std)`` of each side, sizes from a linear
schedule ``box[0] → box[1]`` with ``N(·, box_jitter)`` spread, clipped to
[0.05, max(1, box)]),
resizes them to the model's input, adds Gaussian ``N(0, noise)`` plus uniform
``U(-noise/2, noise/2)`` noise, and takes one NAdam step (lr 1.0) up the objective's mean
over the crops. The **transparency** of a pixel is ``Σ_steps |∂objective/∂pixel|`` (per
channel): where the model looked while the picture formed.

Defaults (xplique 1.x ``features_visualizations/maco.py``): 256 steps, 32 crops per step,
noise 0.08, crop size 0.5 → 0.05 (jitter 0.05), centres N(0.5, 0.15), NAdam lr 1.0, a
512×512 canvas for 224×224 ImageNet inputs (the canvas is the spectrum's size). horama 0.3
(``maco_fv.py``) uses 1000 steps, 6 crops, noise 0.05 and crops of 0.20–0.25 (its code draws
them from 0.25–0.30). Those settings zoom into a large canvas; on small inputs such as the
32×32 decoy digits a crop of 5% is a pixel and the picture's layout (where a corner is)
matters, so :data:`SMALL_INPUT_SETTINGS` draws on a canvas of the input's own size with
crops of 110% → 90% of it (a crop larger than the canvas shows a zero border, black on the
digits' black background, and lets the corners be seen as often as the centre) and centres
N(0.5, 0.04), 128 steps of 16 crops.

Engineering choices:
- **Batched over objectives**: ``B`` objectives optimize ``B`` images in one forward of
  ``B·crops`` crops. Every random draw (initial phase, crops, noise) of objective ``i`` comes
  from its own generator seeded by :func:`objective_seed` (``seed``, ``i``), and every
  normalization is per image, so an objective's picture does not depend on which other
  objectives share its batch, its process or its DDP rank.
- **Exact magnitude**: on the columns of the ``rfft2`` layout whose entries pair with each
  other, the phase is made antisymmetric (:func:`harmonia.visualize.spectrum.hermitian_mean`),
  so the spatial image's spectrum has exactly the fixed magnitude (``irfft2`` would otherwise
  keep only the Hermitian part, changing it).
- **Crops by matrices**: an axis-aligned crop resized to ``h×w`` is ``R_y · image · R_xᵀ``
  with small interpolation matrices (bilinear; a triangle filter widened when a crop
  shrinks, i.e. antialiased; zero outside the canvas). Two batched matmuls replace
  ``roi_align``/``grid_sample``, whose backward on GPU scatters with atomics
  (non-deterministic); matmul backward is deterministic. The matmuls contract over the
  whole canvas side (``B·crops·C·h·H·W`` multiply-adds for the first), so on CUDA they run in
  bfloat16 (``crop_dtype``; fp32 accumulation): a relative error of about 1e-3 in the crops,
  far below the noise added to them.
- **No side effects**: the model is put in eval mode and every submodule's mode restored;
  the gradients asked of autograd are the phase's and the image's only, so parameters'
  ``.grad`` are untouched; it runs under ``torch.inference_mode`` (a stand-alone
  ``validate``) by leaving it for its own tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from harmonia.concepts import LayerSplit
from harmonia.models import cached_weights
from harmonia.visualize.objectives import Layer, ModelOutputs, Objective
from harmonia.visualize.spectrum import Spectrum, hermitian_mean, recorrelate

XPLIQUE_SETTINGS: dict = {"steps": 256, "crops": 32, "box": (0.5, 0.05), "box_jitter": 0.05, "center_std": 0.15, "noise": 0.08}
"""xplique's MACO defaults (use with a spectrum of 512×512 for 224×224 inputs)."""
SMALL_INPUT_SETTINGS: dict = {"steps": 128, "crops": 16, "box": (1.1, 0.9), "box_jitter": 0.05, "center_std": 0.04, "noise": 0.08}
"""For small inputs (32×32 digits) drawn on a canvas of the input's size: crops keep the layout and reach the corners."""
PRESETS: dict[str, dict] = {"xplique": XPLIQUE_SETTINGS, "small": SMALL_INPUT_SETTINGS}


@dataclass
class MacoResult:
    """What :func:`run_maco` returns (batched: one row per objective).

    ``image`` ``(B, C, H, W)`` in the value range; ``alpha`` ``(B, C, H, W)`` the accumulated
    ``|∂objective/∂image|``; ``phase`` ``(B, C, H, W//2+1)`` the optimized phase variable;
    ``scores`` ``(B, steps)`` each step's mean objective over its crops.
    """

    image: Tensor
    alpha: Tensor
    phase: Tensor
    scores: Tensor


def objective_seed(seed: int, index: int) -> int:
    """The generator seed of objective ``index`` in a run seeded ``seed`` (distinct for distinct pairs)."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def standardize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit std over all but the first (objective) dimension."""
    flat = x.flatten(1)
    mean = flat.mean(1).view(-1, *[1] * (x.ndim - 1))
    std = flat.std(1).view(-1, *[1] * (x.ndim - 1))
    return (x - mean) / (std + eps)


def fourier_image(magnitude: Tensor, phase: Tensor, size: tuple[int, int]) -> Tensor:
    """``irfft2(M · e^{iφ})`` of the standardized, Hermitian-consistent phase: ``(B, C, H, W)``.

    Its ``rfft2`` has magnitude exactly ``magnitude`` (up to float rounding) whatever ``phase``.
    """
    phase = hermitian_mean(standardize(phase), size[1], -1.0)
    return torch.fft.irfft2(torch.polar(magnitude.expand_as(phase), phase), s=size)


def to_image(magnitude: Tensor, phase: Tensor, spectrum: Spectrum) -> Tensor:
    """The model-ready images ``(B, C, H, W)`` of ``phase`` under ``spectrum``'s magnitude, colours and range."""
    spatial = standardize(fourier_image(magnitude, phase, spectrum.size))
    low, high = spectrum.value_range
    return low + (high - low) * torch.sigmoid(recorrelate(spatial, spectrum.color_matrix.to(spatial)))


def resample_matrix(start: Tensor, extent: Tensor, out: int, length: int) -> Tensor:
    """Interpolation matrices ``(n, out, length)``: ``out`` samples of ``[start, start+extent]`` (fractions of the side).

    Output pixel ``i`` reads position ``x_i`` (pixel units) with a triangle filter of width
    ``max(1, scale)`` where ``scale = extent·length/out`` (plain bilinear when enlarging,
    antialiased when shrinking), normalized over all integer positions so that a constant
    image stays constant; positions outside the canvas read zero.
    """
    scale = (extent * length / out)[:, None, None]  # (n, 1, 1)
    width = scale.clamp_min(1.0)
    i = torch.arange(out, device=start.device, dtype=start.dtype)[None, :, None]
    x = start[:, None, None] * length + (i + 0.5) * scale - 0.5  # (n, out, 1)
    j = torch.arange(length, device=start.device, dtype=start.dtype)[None, None, :]
    weights = (1 - (x - j).abs() / width).clamp_min(0)
    # The normalizer sums the same filter over every integer (also outside the canvas); the
    # reach is bounded on the host (extent ≤ 2) so that no step waits for the device.
    reach = math.ceil(max(1.0, 2 * length / out)) + 1
    k = torch.floor(x) + torch.arange(-reach, reach + 1, device=start.device, dtype=start.dtype)[None, None, :]
    norm = (1 - (x - k).abs() / width).clamp_min(0).sum(-1, keepdim=True)
    return weights / norm


def crop_and_resize(image: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Crops ``(B, n, C, h, w)`` of ``image`` ``(B, C, H, W)`` given ``rows`` ``(B, n, h, H)`` and ``cols`` ``(B, n, w, W)``."""
    tall = torch.einsum("bnyh,bchw->bncyw", rows, image)
    return torch.einsum("bncyw,bnxw->bncyx", tall, cols)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode (every submodule's own flag restored after), gradients on even inside ``inference_mode``."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), cached_weights():
            yield
    finally:
        for m, flag in flags:
            m.train(flag)


class _Stop(Exception):
    """Raised by a capture hook once every needed activation is in (no logits needed)."""


@contextmanager
def capturing(model: nn.Module, layers: Sequence[Layer], needs_logits: bool) -> Iterator:
    """A function ``crops -> ModelOutputs`` that records ``layers``' outputs (hooks live inside the block)."""
    modules = {layer: LayerSplit(model, layer).module for layer in layers}
    captured: dict[Layer, Tensor] = {}
    handles = []

    def hook_for(layer: Layer):
        def hook(module: nn.Module, args: object, output: Tensor) -> None:
            captured.setdefault(layer, output)
            if not needs_logits and len(captured) == len(modules):
                raise _Stop

        return hook

    for layer, module in modules.items():
        handles.append(module.register_forward_hook(hook_for(layer)))

    def forward(x: Tensor) -> ModelOutputs:
        captured.clear()
        logits = None
        try:
            logits = model(x)
        except _Stop:
            pass
        missing = [layer for layer in modules if layer not in captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not called in the forward of {type(model).__name__}")
        return ModelOutputs(logits, dict(captured))

    try:
        yield forward
    finally:
        for handle in handles:
            handle.remove()


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _input_size(model: nn.Module, spectrum: Spectrum, input_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if input_size is not None:
        return (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]), int(input_size[1]))
    shape = getattr(model, "input_shape", None)  # Harmonia's ConvNet records (C, H, W)
    if shape is not None and len(shape) == 3:
        return int(shape[1]), int(shape[2])
    return spectrum.size


def run_maco(
    model: nn.Module,
    objectives: Objective | Sequence[Objective],
    spectrum: Spectrum,
    *,
    steps: int = 256,
    crops: int = 32,
    box: tuple[float, float] = (0.5, 0.05),
    box_jitter: float = 0.05,
    center_std: float = 0.15,
    noise: float = 0.08,
    lr: float = 1.0,
    input_size: int | tuple[int, int] | None = None,
    seed: int | Sequence[int] = 0,
    phase_std: float = 1.0,
    crop_dtype: torch.dtype | None = None,
) -> MacoResult:
    """Optimize one image per objective; see the module docstring for the method and defaults.

    Args:
        model: the classifier (any ``nn.Module`` taking ``(N, C, h, w)`` in the spectrum's range).
        objectives: one objective or a list (one image each, optimized together).
        spectrum: the fixed magnitude; its ``size`` is the canvas, its ``value_range`` the model's input range.
        steps, crops: optimizer steps; crops per step and objective.
        box: crop side as a fraction of the canvas side, linear from ``box[0]`` to ``box[1]``
            (above 1: the crop shows a zero border around the whole canvas).
        box_jitter, center_std: spread of the crop size and of the crop centre.
        noise: std of the Gaussian noise (and width of the uniform noise) added to the crops.
        lr: NAdam learning rate.
        input_size: the model's input ``(h, w)``; default ``model.input_shape`` (Harmonia's
            ConvNet) or the canvas size.
        seed: an int (objective ``i`` uses :func:`objective_seed` ``(seed, i)``) or one
            generator seed per objective (how a shard reproduces the full run).
        phase_std: std of the random initial phase.
        crop_dtype: dtype of the crop matmuls; default bfloat16 on CUDA (their cost would
            otherwise approach a small model's own), the image's float32 elsewhere.
    """
    objs = [objectives] if isinstance(objectives, Objective) else list(objectives)
    if not objs or not all(isinstance(o, Objective) for o in objs):
        raise ValueError("objectives must be an Objective or a non-empty list of Objectives")
    if steps < 1 or crops < 1:
        raise ValueError(f"steps and crops must be >= 1; got steps={steps}, crops={crops}")
    if not all(0 < b <= 2 for b in box):
        raise ValueError(f"box sizes are fractions of the canvas side in (0, 2]; got {box}")
    largest = max(1.0, *box)
    seeds = [int(s) for s in seed] if isinstance(seed, Sequence) else [objective_seed(int(seed), i) for i in range(len(objs))]
    if len(seeds) != len(objs):
        raise ValueError(f"{len(seeds)} seeds for {len(objs)} objectives")
    channels = getattr(model, "input_shape", (spectrum.channels,))[0]
    if channels != spectrum.channels:
        raise ValueError(f"the model takes {channels} channels, the spectrum has {spectrum.channels}")

    device = _device_of(model)
    if crop_dtype is None and device.type == "cuda":
        crop_dtype = torch.bfloat16
    height, width = spectrum.size
    in_h, in_w = _input_size(model, spectrum, input_size)
    n, b_count = crops, len(objs)
    layers = list(dict.fromkeys(layer for o in objs for layer in o.layers))
    needs_logits = any(o.needs_logits for o in objs)
    sizes = torch.linspace(box[0], box[1], steps).tolist()

    cpu_gens = [torch.Generator().manual_seed(s) for s in seeds]
    dev_gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    with frozen(model), capturing(model, layers, needs_logits) as forward:
        spec = spectrum.to(device)
        magnitude = spec.magnitude.clone()
        phase0 = torch.stack([torch.randn(spec.channels, height, width // 2 + 1, generator=g) * phase_std for g in cpu_gens])
        phase = phase0.to(device).requires_grad_(True)
        optimizer = torch.optim.NAdam([phase], lr=lr)
        alpha = torch.zeros(b_count, spec.channels, height, width, device=device)
        scores = torch.zeros(b_count, steps, device=device)
        for step, size in enumerate(sizes):
            image = to_image(magnitude, phase, spec)
            # Crop geometry per objective, from its own CPU generator (a few numbers).
            params = torch.stack([
                torch.cat([
                    (torch.randn(n, generator=g) * box_jitter + size).clamp(0.05, largest),
                    0.5 + torch.randn(n, generator=g) * center_std,
                    0.5 + torch.randn(n, generator=g) * center_std,
                ])
                for g in cpu_gens
            ]).to(device, image.dtype).view(b_count, 3, n)
            extent, cx, cy = params[:, 0].reshape(-1), params[:, 1].reshape(-1), params[:, 2].reshape(-1)
            rows = resample_matrix(cy - extent / 2, extent, in_h, height).view(b_count, n, in_h, height)
            cols = resample_matrix(cx - extent / 2, extent, in_w, width).view(b_count, n, in_w, width)
            if crop_dtype is not None and crop_dtype != image.dtype:
                cut = crop_and_resize(image.to(crop_dtype), rows.to(crop_dtype), cols.to(crop_dtype)).to(image.dtype)
            else:
                cut = crop_and_resize(image, rows, cols)  # (B, n, C, h, w)
            if noise > 0:
                shape = cut.shape[1:]
                jitter = torch.stack([
                    torch.randn(shape, generator=g, device=device) * noise + (torch.rand(shape, generator=g, device=device) - 0.5) * noise
                    for g in dev_gens
                ])
                cut = cut + jitter
            outputs = forward(cut.reshape(b_count * n, *cut.shape[2:]))
            per_objective = torch.stack([o.score(outputs.rows(i * n, (i + 1) * n)).mean() for i, o in enumerate(objs)])
            grad_phase, grad_image = torch.autograd.grad(per_objective.sum(), [phase, image])
            phase.grad = -grad_phase  # ascent
            optimizer.step()
            alpha += grad_image.abs()
            scores[:, step] = per_objective.detach()
        with torch.no_grad():
            final = to_image(magnitude, phase, spec)
    return MacoResult(final.detach(), alpha.detach(), phase.detach(), scores)


def maco(
    model: nn.Module,
    objective: Objective | Sequence[Objective],
    spectrum: Spectrum,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """``(image, alpha)`` of MACO for ``objective`` (``(C, H, W)`` each) or a list (``(B, C, H, W)``).

    Keyword arguments as :func:`run_maco` (defaults: xplique's; ``**SMALL_INPUT_SETTINGS`` for
    32×32-class inputs). ``alpha`` is the transparency (accumulated ``|∂objective/∂image|``);
    draw both with :func:`harmonia.visualize.maco_figure`.
    """
    result = run_maco(model, objective, spectrum, **kwargs)
    if isinstance(objective, Objective):
        return result.image[0], result.alpha[0]
    return result.image, result.alpha
