"""Björck-orthonormalized Conv2d/Linear layers computed on the small Gram matrix.

Why these exist: deel-torchlip 1.0.5's ``SpectralConv2d``/``SpectralLinear`` (same guarantee:
every singular value of the reshaped kernel ≤ 1, convolutions rescaled by ``1/k``) spend
most of a training step of the default digits model in Björck orthonormalization: up to 15
iterations of ``W ← 1.5 W − 0.5 W Wᵀ W`` on the full ``128×4096`` matrix, each followed by
a norm test that is read on the host (a device sync on GPU), with gradients rescaled by
``1.5`` per iteration past the fourth. Here:

- **Gram form.** Every Björck iterate is ``W_k = A_k W₀`` with ``A_k`` a polynomial in the
  ``m×m`` Gram matrix ``S₀ = W₀W₀ᵀ`` (``m`` = the smaller side, 128 for the digits
  model's dense layer, 64 and 9 for its convolutions). Iterating ``P = 1.5 I − 0.5 S``,
  ``A ← P A``, ``S ← P S P`` costs three ``m×m`` products instead of three ``m×m×n`` ones;
  the full-size matrix is touched twice (``W Wᵀ`` and ``A W``). Same iterates in exact
  arithmetic (tested against ``deel.torchlip.normalizers.bjorck_normalization``).
- **On the CPU: one eigendecomposition.** ``A`` is a polynomial in ``S₀``, so it acts on
  each eigenvalue alone: with ``S₀ = Q diag(λ) Qᵀ`` (one float64 LAPACK ``eigh``), the power
  steps, ``σ̂``, its floor and the ``iterations`` Björck steps are arithmetic on the ``m``
  eigenvalues and ``A = Q diag(h(λ)) Qᵀ`` (:class:`_SpectralFactor`); its backward is the
  exact derivative of the same function (Daleckii–Krein divided differences). It replaced
  ~150 small products and scalings per layer (and their autograd nodes), whose dispatch
  overhead was most of the constraint's cost on the digits model. Same values, gradients and power
  vector as the product path to 1e-10 in float64 (tested). Off the CPU (and with
  ``products = True``) the product iteration below runs instead: no host sync there, where a
  small ``eigh`` is slow. The Gram's backward is one product ``(G + Gᵀ)``-times-``W``
  (autograd's takes two).
- **Fixed iteration count, no host sync, exact gradient.** ``iterations`` steps always
  (default 12; deel-torchlip's stopping test ends after 4, 6 and 8 steps on this model's
  three layers once training has moved the weights), and autograd differentiates the very
  function that is computed (the power vector ``u`` and the rarely active floor below are
  constants of the gradient, as ``u`` is in ``torch.nn.utils.spectral_norm``).
- **Spectral scale from the Gram.** ``σ̂² = uᵀ S u`` with ``u`` a persistent power-iteration
  vector of ``S`` (``power_iterations`` cheap ``m×m`` matrix-vector steps per training
  forward; a lower bound of ``σ_max²``, exact at convergence), floored at ``0.51² ‖S⁴‖_F^¼``
  (an upper bound of ``σ_max²`` within a factor ``m^⅛ ≤ 1.83`` for ``m ≤ 128``, so the floor
  only acts when the power iteration is far off). The floor makes the guarantee
  unconditional: the Björck map ``s ↦ 1.5 s − 0.5 s³`` sends every ``s ∈ [0, 2]`` into
  ``[-1, 1]`` and keeps it there, and the floor keeps ``σ_max/σ̂ ≤ 1/0.51 < 2``. So the
  output's singular values are ≤ 1 for any weight, any optimizer step and any iteration
  count ≥ 1 (the README's NaN divergence after a large Adam step cannot occur).
- **Once per optimizer step.** The layers are ``torch.nn.utils.parametrize``
  parametrizations; inside :func:`cached_weights` (``AlignedClassifier`` runs every step in it) the
  weight, or ``BjorckLinear``'s factor ``A``, is computed once and shared by every forward
  of the step and by the double backward of the harmonization loss. Outside it, once per
  forward. Eval-mode forwards always use the current weights (deel-torchlip's reuse the
  last training forward's), without updating the power-iteration vector.
- **Dense layers without forming the weight.** ``BjorckLinear`` applies ``A`` to the
  activations (``(x W_rawᵀ) Aᵀ``) when the batch has fewer rows than the layer's larger
  side, which saves the ``m×m×n`` products of forming ``A W_raw`` and of its backward.
- **Precision.** The orthonormalization runs in the parameter's dtype (the CPU path's
  eigendecomposition in float64, cast back) with autocast disabled: under ``torch.autocast(..., dtype=torch.bfloat16)`` a bf16 Björck drifts ~0.4%
  above 1 (measured with deel-torchlip 1.0.5); only the convolution / matrix product that
  consumes the fp32 weight runs in bf16. bf16/fp16 *parameters* are refused.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

DEFAULT_ITERATIONS = 12
DEFAULT_POWER_ITERATIONS = 3
# σ̂² ≥ FLOOR² ‖S⁴‖_F^¼ ≥ FLOOR² σ_max², so σ_max/σ̂ ≤ 1/FLOOR < 2 (see the module docstring).
FLOOR = 0.51
# Padding modes for which the 1/k rescaling bounds the convolution by its kernel's norm.
# Reflect padding repeats interior pixels and breaks the bound (measured up to 1.24 on
# deel-torchlip 1.0.5); replicate does the same at the borders.
SAFE_PADDING = ("zeros", "circular")


def bjorck_factor(scaled_gram: Tensor, iterations: int) -> Tensor:
    """``A`` such that ``A W₀`` is ``iterations`` Björck steps (β = ½) from ``W₀``, given ``S₀ = W₀W₀ᵀ``.

    By ``3 (iterations − 1)`` matrix products, no host sync (the path off the CPU).

    ``W_{k+1} = W_k + ½ (I − W_kW_kᵀ) W_k = P_k W_k`` with ``P_k = 1.5 I − 0.5 S_k`` and
    ``S_{k+1} = P_k S_k P_k``. All ``P_k``, ``S_k`` are polynomials in ``S₀``: they commute and
    stay symmetric, so ``P_k X = 1.5 X − 0.5 S_k X`` is one fused ``addmm`` for any ``X`` in
    that family (three per step, no separate elementwise ops).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1; got {iterations}")
    s = scaled_gram
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    factor = torch.add(1.5 * eye, s, alpha=-0.5)  # P_0
    for _ in range(iterations - 1):
        sp = torch.addmm(s, s, s, beta=1.5, alpha=-0.5)  # S_k P_k
        s = torch.addmm(sp, s, sp, beta=1.5, alpha=-0.5)  # P_k S_k P_k = S_{k+1}
        factor = torch.addmm(factor, s, factor, beta=1.5, alpha=-0.5)  # P_{k+1} A_{k+1}
    return factor


def _bjorck_scalar(lam: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a(λ), a'(λ))``: the factor's eigenvalue for a Gram eigenvalue ``λ``, and its derivative.

    The scalar form of :func:`bjorck_factor`: ``a = Π_k (1.5 − 0.5 s_k)`` with ``s_0 = λ``,
    ``s_{k+1} = s_k (1.5 − 0.5 s_k)²``; the derivative by forward mode.
    """
    s, ds = lam, np.ones_like(lam)
    a, da = np.ones_like(lam), np.zeros_like(lam)
    for _ in range(iterations):
        p, dp = 1.5 - 0.5 * s, -0.5 * ds
        a, da = p * a, dp * a + p * da
        s, ds = s * p * p, ds * p * p + 2 * s * p * dp
    return a, da


def _divided_differences(x: np.ndarray, f: np.ndarray, df: np.ndarray) -> np.ndarray:
    """``D_ij = (f_i − f_j)/(x_i − x_j)``, ``(f'_i + f'_j)/2`` where ``x_i ≈ x_j``."""
    gap = x[:, None] - x[None, :]
    close = np.abs(gap) < 1e-7  # midpoint error ~ |f'''| gap² ≪ float32 precision; cancellation ≤ 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(close, 0.5 * (df[:, None] + df[None, :]), (f[:, None] - f[None, :]) / gap)


class _SpectralFactor(torch.autograd.Function):
    """The whole factor ``A = scale/σ̂ · f(S/σ̂²)`` of :meth:`BjorckOrthonormal.factor` from one ``eigh`` of ``S``.

    Why: ``f`` (``iterations`` Björck steps, :func:`bjorck_factor`) is a polynomial, so with
    ``S = Q diag(λ) Qᵀ`` it acts on each eigenvalue alone: ``A = Q diag(h(λ)) Qᵀ``; the power
    steps (``u ← Sᵏu / ‖Sᵏu‖``), ``σ̂² = max(uᵀSu, FLOOR² ‖S⁴‖_F^¼)`` (``‖S⁴‖_F^¼ = (Σλ⁸)^⅛``)
    are read off the same decomposition. On a CPU one float64 LAPACK ``eigh`` replaces ~150
    small ops and their autograd nodes per layer, which were
    most of the constraint's cost on the digits model; the per-eigenvalue arithmetic runs in
    NumPy (≤ 128 numbers: torch's per-op dispatch would cost more than the numbers). Same
    function as the op-by-op path in exact arithmetic (tested to 1e-10 in float64, values,
    gradients and the power vector).

    Backward, exact (Daleckii–Krein): with ``Ḡ = QᵀGQ``, ``∂L/∂S = Q (D ∘ Ḡ) Qᵀ + c uuᵀ``,
    ``D`` the divided differences of ``h`` over the ``λ``, ``c = Σ_i Ḡ_ii ∂h_i/∂σ̂²`` (zero when
    the floor, a constant of the gradient, sets ``σ̂``). All in float64: in float32 the rounding
    of ``Q`` mixes the large ``h ≈ 1.5^N`` of near-null directions into the others (measured
    4e-5 above 1 on a weight whose σ spans 5 decades). The weights need it to first order only
    (the harmonization loss's double backward is w.r.t. the input); a backward with
    ``create_graph=True`` through it raises rather than return a silently wrong second derivative.
    """

    @staticmethod
    def forward(ctx, gram: Tensor, u: Tensor, power_iterations: int, scale: float, iterations: int) -> Tensor:  # type: ignore[override]
        lam_t, q = torch.linalg.eigh(gram.double())
        lam = lam_t.numpy()
        coords = (u.double() @ q).numpy()  # u in the eigenbasis
        top = max(float(np.abs(lam).max()), torch.finfo(gram.dtype).tiny)
        if power_iterations:  # scaled by the top eigenvalue: no overflow for any step count
            coords = coords * (lam / top) ** power_iterations
            coords = coords / max(float(np.linalg.norm(coords)), 1e-12)
            u.copy_(q @ torch.from_numpy(coords))  # in place, as _power_method (a buffer, no graph)
        floor = FLOOR**2 * top * float(((lam / top) ** 8).sum()) ** 0.125
        estimate = float((lam * coords * coords).sum())
        sigma2 = max(estimate, floor)
        mu = lam / sigma2
        a, da = _bjorck_scalar(mu, iterations)
        coef = scale / math.sqrt(sigma2)
        ctx.save_for_backward(q)
        ctx.terms = (mu, a, da, coef, sigma2, q @ torch.from_numpy(coords) if estimate >= floor else None)
        return ((q * torch.from_numpy(a * coef)) @ q.T).to(gram.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative w.r.t. the weights
            raise RuntimeError(
                "the CPU Björck factor is differentiable once w.r.t. the weights (enough for the "
                "harmonization loss, whose second derivative is w.r.t. the input); for higher "
                "derivatives set `products = True` on every BjorckOrthonormal parametrization"
            )
        (q,) = ctx.saved_tensors
        mu, a, da, coef, sigma2, u = ctx.terms
        inner = q.T @ grad.double() @ q
        # h(λ) = coef · a(λ/σ̂²): divided differences over λ are those of a over μ, / σ̂².
        weights = torch.from_numpy((coef / sigma2) * _divided_differences(mu, a, da))
        gram_grad = q @ (weights * inner) @ q.T
        if u is not None:  # σ̂² = uᵀSu: ∂h/∂σ̂² = −coef/σ̂² (μ a'(μ) + a/2)
            dsigma2 = -(coef / sigma2) * float((inner.diagonal().numpy() * (mu * da + 0.5 * a)).sum())
            gram_grad = gram_grad + dsigma2 * torch.outer(u, u)
        return gram_grad.to(grad.dtype), None, None, None, None


class _Gram(torch.autograd.Function):
    """``M Mᵀ`` whose backward is one product ``(G + Gᵀ) M`` (autograd's ``mm`` backward takes two).

    On the digits model's 128×4096 layer that product is the largest one of the constraint.
    The backward is made of differentiable ops, so higher derivatives stay exact.
    """

    @staticmethod
    def forward(ctx, matrix: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(matrix)
        return matrix @ matrix.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (matrix,) = ctx.saved_tensors
        # As (Mᵀ G')ᵀ: MKL runs this layout faster for a wide M (the digits model's 128×4096).
        return (matrix.T @ (grad + grad.T)).T


def _top_eigenvalue_bound(gram: Tensor) -> Tensor:
    """``‖S⁴‖_F^¼ ≥ λ_max(S)`` for a symmetric PSD ``S`` (at most ``m^⅛ λ_max``), never below ``tiny``.

    Scaled by the trace first (``≥ λ_max``), so the fourth power neither overflows nor underflows.
    """
    trace = gram.diagonal().sum().clamp_min(torch.finfo(gram.dtype).tiny)
    power = gram / trace
    power = power @ power
    power = power @ power
    return (trace * torch.linalg.matrix_norm(power) ** 0.25).clamp_min(torch.finfo(gram.dtype).tiny)


class BjorckOrthonormal(nn.Module):
    """Parametrization ``W ↦ scale · Björck_N(W / σ̂)`` of a weight reshaped to ``(out, fan_in)``.

    See the module docstring for the algorithm and its guarantee: every singular value of
    the returned matrix (before ``scale``) is ≤ 1.
    """

    def __init__(
        self,
        weight: Tensor,
        iterations: int = DEFAULT_ITERATIONS,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if iterations < 1 or power_iterations < 0:
            raise ValueError(f"need iterations >= 1 and power_iterations >= 0; got {iterations}, {power_iterations}")
        self.iterations = iterations
        self.power_iterations = power_iterations
        self.scale = scale
        # Off the CPU (or when set, e.g. to compare) the op-by-op path; else _SpectralFactor.
        self.products = False
        matrix = self._matrix(weight.detach())
        u = torch.randn(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        self.register_buffer("_u", F.normalize(u, dim=0))
        self._power_method(matrix @ matrix.T, 30)  # start from a converged vector

    @staticmethod
    def _matrix(weight: Tensor) -> Tensor:
        """The weight as a wide ``(m, n)`` matrix, ``m ≤ n`` (transposed if tall)."""
        matrix = weight.flatten(1)
        return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T

    @torch.no_grad()
    def _power_method(self, gram: Tensor, steps: int) -> None:
        # In place (as torch's spectral_norm): DataParallel replicas share the buffer.
        for _ in range(steps):
            self._u.copy_(F.normalize(gram @ self._u, dim=0))

    def factor(self, weight: Tensor) -> Tensor:
        """The ``(m, m)`` matrix ``A`` (scale included) with ``A · matrix(weight)`` orthonormalized."""
        if weight.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"Björck orthonormalization needs float32/float64 weights, got {weight.dtype}: in "
                "bf16/fp16 the rounding alone lifts singular values ~0.4% above 1. Keep the "
                "parameters in float32 and use autocast (Lightning precision='bf16-mixed')."
            )
        with torch.autocast(device_type=weight.device.type, enabled=False):
            matrix = self._matrix(weight)
            gram = _Gram.apply(matrix)
            if weight.device.type == "cpu" and not self.products:
                steps = self.power_iterations if self.training else 0
                return _SpectralFactor.apply(gram, self._u, steps, self.scale, self.iterations)
            if self.training and self.power_iterations:
                self._power_method(gram.detach(), self.power_iterations)
            u = self._u.clone()  # the in-place update of a later forward must not touch this graph
            sigma2 = torch.maximum(u @ (gram @ u), FLOOR**2 * _top_eigenvalue_bound(gram.detach()))
            return bjorck_factor(gram / sigma2, self.iterations) * (self.scale / sigma2.sqrt())

    def forward(self, weight: Tensor) -> Tensor:
        """The orthonormalized (and scaled) weight, same shape and dtype as ``weight``."""
        factor = _factor(self, weight)  # shared with BjorckLinear's factor path within a step
        with torch.autocast(device_type=weight.device.type, enabled=False):
            ortho = factor @ self._matrix(weight)
        if ortho.shape != weight.flatten(1).shape:
            # Contiguous: oneDNN's kernel for a strided weight is slower (conv1 of the digits model).
            ortho = ortho.T.contiguous()
        return ortho.view(weight.shape)


_factors: dict[tuple[int, bool], Tensor] = {}
_cache_depth = 0


@contextlib.contextmanager
def cached_weights() -> Iterator[None]:
    """Orthonormalize each layer once inside the block, however many forwards it runs.

    ``torch.nn.utils.parametrize.cached()`` (which this enters) caches the weights of
    parametrized layers; this also caches the Björck factor that ``BjorckLinear`` applies
    without forming its weight. As with ``parametrize.cached()``, do not change the weights
    inside the block (run the optimizer step after it).
    """
    global _cache_depth
    with parametrize.cached():
        _cache_depth += 1
        try:
            yield
        finally:
            _cache_depth -= 1
            if not _cache_depth:
                _factors.clear()


def _factor(parametrization: BjorckOrthonormal, weight: Tensor) -> Tensor:
    """``parametrization.factor(weight)``, computed once per :func:`cached_weights` block."""
    if not _cache_depth:
        return parametrization.factor(weight)
    key = (id(parametrization), torch.is_grad_enabled())
    if key not in _factors:
        _factors[key] = parametrization.factor(weight)
    return _factors[key]


class BjorckLinear(nn.Linear):
    """``nn.Linear`` whose weight has all singular values ≤ 1 (≈ 1): 1-Lipschitz, gradient-norm preserving.

    Same guarantee and parametrization as ``deel.torchlip.SpectralLinear`` (orthogonal init,
    zero bias), computed as described in the module docstring. ``export`` turns it into a
    plain ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        iterations: int = DEFAULT_ITERATIONS,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        parametrize.register_parametrization(
            self, "weight", BjorckOrthonormal(self.weight, iterations, power_iterations)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ + b`` with the orthonormalized ``W = A W_raw``, applied as ``(x W_rawᵀ) Aᵀ``.

        Forming ``A W_raw`` costs ``3 m²n`` multiply-adds with its backward (``m`` = the
        smaller side, ``n`` the larger); applying ``A`` to the activations instead costs
        ``3 r m²`` for ``r`` rows of ``x``: fewer whenever ``r < n`` (64 rows vs 4096 inputs on
        the digits model's hidden layer). Larger inputs use the formed weight.
        """
        rows = x.numel() // x.shape[-1] if x.dim() > 1 else 1
        if rows >= max(self.in_features, self.out_features):
            return F.linear(x, self.weight, self.bias)
        raw = self.parametrizations.weight.original
        factor = _factor(self.parametrizations.weight[0], raw)
        if self.out_features <= self.in_features:  # W = A W_raw
            return F.linear(F.linear(x, raw), factor, self.bias)
        return F.linear(F.linear(x, factor.T), raw, self.bias)  # W = W_raw Aᵀ


class BjorckConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a Björck-orthonormal kernel rescaled by ``1/√(⌈kh/sh⌉⌈kw/sw⌉)``: 1-Lipschitz.

    The kernel reshaped to ``(out, in·kh·kw)`` has singular values ≤ 1; each input pixel
    enters at most ``⌈kh/sh⌉⌈kw/sw⌉`` output positions, hence the rescaling (deel-torchlip's
    ``SpectralConv2d`` coefficient when no input shape is given). Zero or circular padding
    only, no groups or dilation: other settings void the bound.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        padding_mode: str = "zeros",
        iterations: int = DEFAULT_ITERATIONS,
        power_iterations: int = DEFAULT_POWER_ITERATIONS,
    ) -> None:
        if padding_mode not in SAFE_PADDING:
            raise ValueError(
                f"padding_mode={padding_mode!r} is refused: only {SAFE_PADDING} keep the convolution "
                "1-Lipschitz (reflect padding measured up to 1.24 with deel-torchlip 1.0.5)"
            )
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, padding_mode=padding_mode
        )
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        scale = 1.0 / math.sqrt(math.ceil(kh / sh) * math.ceil(kw / sw))
        parametrize.register_parametrization(
            self, "weight", BjorckOrthonormal(self.weight, iterations, power_iterations, scale)
        )
