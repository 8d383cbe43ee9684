"""GuardSpace maths as pure tensor functions (no model, no PEFT).

Shapes: ``W`` is ``(m, n)`` (out x in), ``C`` the ``(n, n)`` uncentered input covariance, ``r`` the adapter rank.
Everything is computed in float64 and returned in float32 unless stated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

PAPER_THRESHOLD = 1e-6  # the paper's relative eigenvalue threshold, used where no exact null space exists
EXACT_NULL_ROUNDING = 10.0  # exact-null eigenvalues of a float sum of outer products are at most ~n * eps * lambda_max
EFFECTIVE_ROW_NORM = 3**-0.5  # row norm of PEFT's default (Kaiming-uniform) ``lora_A`` initialisation


@dataclass
class ProjectorBasis:
    """Orthonormal basis defining the null-space projector ``P`` (``n x n``, never materialised).

    ``kind == "null"``: ``basis`` is ``N`` (``n x k``) and ``P = N N^T``.
    ``kind == "range"``: ``basis`` is ``R`` (``n x (n - k)``) and ``P = I - R R^T``.
    Whichever of the two is smaller is stored.

    ``leak_vectors`` (``n x j``) and ``leak_values`` (``j``) are the kept null directions whose eigenvalue is not
    an exact zero (above the rounding floor of the covariance), with their eigenvalues: the only directions
    through which an update ``dW = dW P`` can change the outputs on the calibration inputs,
    ``E ||dW x||^2 = sum_j lambda_j ||dW n_j||^2``. Empty when the null space is exact.
    ``rule`` says how the null space was chosen: ``"exact"`` or the relative threshold used.
    """

    basis: torch.Tensor
    kind: str
    null_dim: int
    leak_vectors: torch.Tensor
    leak_values: torch.Tensor
    rule: str

    @property
    def in_features(self) -> int:
        return self.basis.shape[0]


DAMPING_PROBES = 16  # probe vectors of the residual estimate of `damp_covariance_spectral()`


@dataclass
class CovarianceSpectrum:
    """Eigen-decomposition ``C = Q diag(lambda) Q^T`` of a covariance, in float64.

    ``values`` (``(n,)``) ascend; ``vectors`` is ``Q`` (``n x n``, orthonormal columns). One per input site serves
    the null-space basis (`null_space_basis()`) and the damped inverse (`damp_covariance_spectral()`).
    """

    values: torch.Tensor
    vectors: torch.Tensor


def symmetric_part(matrix: torch.Tensor) -> torch.Tensor:
    """``(A + A^T) / 2`` of a square matrix: a covariance summed in floats is symmetric only to rounding."""
    return (matrix + matrix.T) / 2


def covariance_spectrum(covariance: torch.Tensor) -> CovarianceSpectrum:
    """`CovarianceSpectrum` of ``C`` (``n x n``), symmetrised, by one full float64 eigen-decomposition.

    LAPACK's divide-and-conquer solver (``syevd``) deflates the cluster of (near-)zero eigenvalues of a
    rank-deficient covariance, which makes it cheaper than eigenvalues followed by a subset of vectors (``syevr``).
    ``Q`` is orthonormal to about ``n`` eps.
    """
    values, vectors = torch.linalg.eigh(symmetric_part(covariance.double()))
    return CovarianceSpectrum(values, vectors)


@dataclass
class DampedCovariance:
    """``C~ = C + d * mean(diag C) * I`` (``n x n``, float64) with the spectrum of ``C`` that inverts it.

    ``shift`` is the added ``d * mean(diag C)``, so ``C~^{-1} = Q diag(1 / (lambda + shift)) Q^T``.
    """

    damped: torch.Tensor
    damping: float
    shift: float
    spectrum: CovarianceSpectrum

    def solve_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ C~^{-1}`` for a ``(r, n)`` matrix in ``O(r n^2)``, on the spectrum's device and in its dtype."""
        return _shifted_solve(self.spectrum, self.shift, rows)

    def to(self, device: torch.device | str) -> DampedCovariance:
        """The same damped covariance, with its spectrum, on ``device``."""
        spectrum = CovarianceSpectrum(self.spectrum.values.to(device), self.spectrum.vectors.to(device))
        return DampedCovariance(self.damped.to(device), self.damping, self.shift, spectrum)


def _checked_scale(covariance: torch.Tensor, start: float, tolerance: float, site: str) -> tuple[torch.Tensor, float]:
    """``(C, mean(diag C))`` in float64 after the checks shared by both damping functions (see `damp_covariance()`)."""
    if not (start > 0 and tolerance > 0 and math.isfinite(start) and math.isfinite(tolerance)):
        raise ValueError(
            f"Cannot damp the covariance of {site}: damping_start={start!r} and damping_tolerance={tolerance!r} "
            "must be finite positive numbers."
        )
    c = covariance.double()
    if not bool(torch.isfinite(c).all()):
        raise ValueError(
            f"Cannot damp the covariance of {site}: it holds NaN or Inf. Collect the safety statistics again "
            "(the model produced non-finite activations, or the statistics file is corrupt)."
        )
    scale = float(torch.diagonal(c).mean())
    if not scale > 0:
        raise ValueError(
            f"Cannot damp the covariance of {site}: its diagonal mean is {scale:g} (all-zero or not a "
            "covariance), so it has no scale to damp. Collect the safety statistics again on this model, or leave "
            "this layer out of `target_modules`."
        )
    return c, scale


def _not_damped(site: str, tolerance: float, max_doublings: int, start: float) -> ValueError:
    return ValueError(
        f"Could not damp the covariance of {site} to an invertible matrix within damping_tolerance={tolerance:g} "
        f"after {max_doublings} doublings of damping_start={start:g} (the inverse stays inaccurate in float64). "
        "Raise `damping_tolerance` (default 0.05) or `damping_start` (default 0.01)."
    )


def damp_covariance(
    covariance: torch.Tensor,
    start: float = 0.01,
    tolerance: float = 0.05,
    max_doublings: int = 40,
    site: str = "the layer",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Damped covariance ``C~ = C + d * mean(diag C) * I`` and its explicit inverse (the paper's doubling rule).

    ``d`` starts at ``start`` and doubles until ``||C~ C~^{-1} - I||_F < tolerance``. Each try costs an inverse and
    an ``n x n`` product; the init uses `damp_covariance_spectral()`, which needs neither.

    Returns:
        ``(C~, C~^{-1}, d)`` in float64.

    Raises:
        ValueError: each cause with its own message (``site`` names the covariance): a non-finite covariance, a
            covariance without scale (all zero), invalid ``start``/``tolerance``, or a tolerance not reached.
    """
    c, scale = _checked_scale(covariance, start, tolerance, site)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    damping = start
    for _ in range(max_doublings):
        damped = c + damping * scale * eye
        inverse = torch.linalg.inv(damped)
        if torch.linalg.matrix_norm(damped @ inverse - eye) < tolerance:
            return damped, inverse, damping
        damping *= 2
    raise _not_damped(site, tolerance, max_doublings, start)


def _shifted_solve(spectrum: CovarianceSpectrum, shift: float, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ (C + shift I)^{-1} = ((rows Q) / (lambda + shift)) Q^T`` for ``(r, n)`` rows."""
    vectors = spectrum.vectors
    return ((rows.to(vectors) @ vectors) / (spectrum.values + shift)) @ vectors.T


def damp_covariance_spectral(
    covariance: torch.Tensor,
    spectrum: CovarianceSpectrum | None = None,
    start: float = 0.01,
    tolerance: float = 0.05,
    max_doublings: int = 40,
    site: str = "the layer",
    probes: int = DAMPING_PROBES,
) -> DampedCovariance:
    """The paper's doubling rule (`damp_covariance()`) on the eigen-decomposition of ``C``, with no inverse.

    ``C~^{-1}`` is applied through the spectrum (``spectrum``, computed when not given), so a try costs no
    factorisation: the residual ``E = C~ C~^{-1} - I`` is estimated on ``p = probes`` fixed Gaussian vectors ``Z``
    (``n x p``, seed 0): ``E[||E Z||_F^2] = p ||E||_F^2``, so ``||E Z||_F / sqrt(p)`` estimates ``||E||_F`` in
    ``O(n^2 p)``. ``d`` doubles while that estimate is at least ``tolerance`` or some ``lambda + shift`` is not
    positive. At the default ``d = 0.01`` the residual is about ``1e-12`` on rank-deficient covariances, far from
    ``tolerance = 0.05``, so the estimate picks the ``d`` of the explicit check.

    Raises:
        ValueError: as `damp_covariance()`.
    """
    c, scale = _checked_scale(covariance, start, tolerance, site)
    spectrum = covariance_spectrum(c) if spectrum is None else spectrum
    n = c.shape[0]
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, probes, generator=generator, dtype=c.dtype).to(c.device)
    damping = start
    for _ in range(max_doublings):
        shift = damping * scale
        if bool((spectrum.values + shift > 0).all()):
            solved = _shifted_solve(spectrum, shift, z.T).T.to(c)
            residual = c @ solved + shift * solved - z
            if float(torch.linalg.matrix_norm(residual)) < tolerance * probes**0.5:
                damped = c.clone()
                damped.diagonal().add_(shift)
                return DampedCovariance(damped, damping, shift, spectrum)
        damping *= 2
    raise _not_damped(site, tolerance, max_doublings, start)


PARTIAL_SVD_MIN_RATIO = 8  # the partial method runs when min(m, n) >= this many times its block size
PARTIAL_SVD_MAX_ITERATIONS = 200
PARTIAL_SVD_CHECK_EVERY = 5


def smallest_singular_triplets(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` smallest singular triplets of a float64 ``(m, n)`` matrix ``M``: ``(U_r, S_r, V_r^T)``.

    ``U_r`` is ``(m, r)``, ``S_r`` ``(r,)`` (descending: the largest of them first, as in ``torch.linalg.svd``)
    and ``V_r^T`` ``(r, n)``; the same triplets as the last ``r`` of a full SVD, up to signs (and rotations within
    repeated singular values).

    With ``k = min(m, n)`` and a block of ``b = 2 r + 8`` vectors (``k >= 8 b``), it avoids the full SVD:

    1. ``R`` (``k x k``, upper triangular) from a Householder QR of ``M`` (``m >= n``) or of ``M^T``: ``R`` has the
       singular values of ``M``, and the right singular vectors of ``R`` are those of ``M`` (resp. its left ones).
    2. Inverse subspace iteration on ``R^T R``: ``X <- qr(R^{-1} R^{-T} X)``, two triangular solves per step
       (``O(k^2 b)``); the ``r`` smallest directions converge as ``(sigma_r / sigma_{b+1})^{2t}``. Working with
       ``R`` (backward-stable QR and solves), never with the Gram matrix ``M^T M``, keeps the accuracy of the
       full SVD (absolute error ``~ eps sigma_max`` on the singular values, not ``~ sqrt(eps) sigma_max``).
    3. Rayleigh-Ritz on ``M`` itself: the thin SVD of ``M X`` (or ``M^T X``, ``b`` columns) gives the triplets.

    Every few steps the Ritz residuals ``||R^T p_i - s_i x_i||`` of the ``r`` smallest pairs are checked; the
    iteration stops when they reach ``64 eps ||R||_F``, or when they stop halving while below ``sqrt(eps) ||R||_F``:
    the rounding floor of the solves, about ``eps cond(R) ||R||``, which is also the full SVD's error on those
    vectors when the gap below ``sigma_r`` is of the order of ``sigma_r``. On the benchmark model's layers the
    singular values agree with the full SVD's to ``1e-11`` (relative). Otherwise (a singular or badly separated
    spectrum, or a small ``k``) the full SVD is used.
    """
    m, n = matrix.shape
    k = min(m, n)
    block = 2 * r + 8
    if k < PARTIAL_SVD_MIN_RATIO * block:
        return _full_smallest_triplets(matrix, r)
    tall = m >= n
    operand = matrix if tall else matrix.T  # (max(m, n), k): its right singular vectors are the ones iterated
    triangular = torch.linalg.qr(operand, mode="r").R
    scale = float(torch.linalg.matrix_norm(triangular))
    eps = torch.finfo(matrix.dtype).eps
    generator = torch.Generator().manual_seed(0)
    x = torch.linalg.qr(torch.randn(k, block, generator=generator, dtype=matrix.dtype).to(matrix.device)).Q
    previous = math.inf
    for step in range(1, PARTIAL_SVD_MAX_ITERATIONS + 1):
        y = torch.linalg.solve_triangular(triangular.T, x, upper=False)
        x = torch.linalg.qr(torch.linalg.solve_triangular(triangular, y, upper=True)).Q
        if step % PARTIAL_SVD_CHECK_EVERY:
            continue
        p, s, zh = torch.linalg.svd(triangular @ x, full_matrices=False)
        ritz = x @ zh[-r:].T
        residual = float((triangular.T @ p[:, -r:] - ritz * s[-r:]).norm(dim=0).max())
        if not math.isfinite(residual):
            break
        if residual <= 64 * eps * scale or (residual <= eps**0.5 * scale and residual > previous / 2):
            p, s, zh = torch.linalg.svd(operand @ x, full_matrices=False)  # Rayleigh-Ritz on M itself
            other = x @ zh[-r:].T
            if tall:
                return p[:, -r:], s[-r:], other.T
            return other, s[-r:], p[:, -r:].T
        previous = residual
    return _full_smallest_triplets(matrix, r)


def _full_smallest_triplets(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``r`` smallest triplets of ``matrix`` from its full (thin) SVD."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, -r:], s[-r:], vh[-r:]


def smallest_component_init(
    weight: torch.Tensor,
    damped: torch.Tensor,
    damped_inverse: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    r: int,
    scaling: float,
    balance: bool = False,
    product: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adapter factors from the ``r`` smallest components of the covariance-preconditioned SVD.

    ``M = W C~ = U S V^T`` gives ``W = U S (C~^{-1} V)^T`` exactly. With ``U_r, S_r, V_r`` the ``r`` smallest
    components and ``S'_r = S_r / scaling``:

        B0 = U_r S'_r^{1/2}                (m x r)
        A0 = S'_r^{1/2} V_r^T C~^{-1}      (r x n)

    so that ``scaling * B0 @ A0 = U_r U_r^T W`` is the part of ``W`` carried by those components. With
    ``balance``, component ``i`` is then rescaled, ``A0[i] *= k_i`` and ``B0[:, i] /= k_i`` with
    ``k_i = (|B0[:, i]| / |A0[i]|)^{1/2}``: the product is unchanged, and ``A0`` no longer carries the ``1 / d``
    growth of ``C~^{-1}`` in the (near-)null directions of ``C`` (``d`` the damping).

    The SVD runs in float64. The smallest singular values set the scale of ``B0`` and ``A0``, and a float32 SVD
    (or a Gram-matrix eigen-decomposition) lifts them to its noise floor, about ``1e-7 sigma_max``: factors up to
    hundreds of times larger, whose trained updates then amplify the float rounding of upstream layers on the
    calibration prompts (measured on the 8-bit test model: 1e-2 instead of 1e-6 relative change).

    The ``r`` smallest triplets come from `smallest_singular_triplets()` (a float64 partial method with the accuracy
    of the full SVD, which it falls back to).

    ``damped_inverse`` is ``C~^{-1}`` (``n x n``) or a function giving ``rows @ C~^{-1}`` for ``(r, n)`` rows (e.g.
    `DampedCovariance.solve_rows`). ``product`` is ``M = W C~`` in float64 when the caller already has it.
    The two steps are `smallest_components()` and `component_factors()`.

    Returns:
        ``(B0, A0, S_r)`` in float32, ``S_r`` the kept singular values, largest of them first.
    """
    components = smallest_components(weight, damped, damped_inverse, r, product)
    return component_factors(components, scaling, balance)


@dataclass
class SmallestComponents:
    """The ``r`` smallest components of ``M = W C~ = U S V^T``, before any adapter scaling (float64).

    ``left`` is ``U_r`` (``m x r``), ``singular_values`` ``S_r`` (``(r,)``, largest first) and ``solved_rows``
    ``V_r^T C~^{-1}`` (``r x n``): ``U_r S_r (V_r^T C~^{-1}) = U_r U_r^T W``.
    """

    left: torch.Tensor
    singular_values: torch.Tensor
    solved_rows: torch.Tensor

    def to(self, dtype: torch.dtype) -> SmallestComponents:
        return SmallestComponents(self.left.to(dtype), self.singular_values.to(dtype), self.solved_rows.to(dtype))


def smallest_components(
    weight: torch.Tensor,
    damped: torch.Tensor,
    damped_inverse: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    r: int,
    product: torch.Tensor | None = None,
) -> SmallestComponents:
    """`SmallestComponents` of ``W`` (``(m, n)``) under ``C~`` (arguments as in `smallest_component_init()`)."""
    m, n = weight.shape
    if not 0 < r <= min(m, n):
        raise ValueError(f"r={r} must be between 1 and min(out, in)={min(m, n)} for a {m}x{n} layer.")
    u_r, s_r, vh_r = smallest_singular_triplets(weight.double() @ damped if product is None else product, r)
    solved = vh_r @ damped_inverse if isinstance(damped_inverse, torch.Tensor) else damped_inverse(vh_r)
    return SmallestComponents(u_r, s_r, solved.to(u_r))


def component_factors(
    components: SmallestComponents, scaling: float, balance: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B0, A0, S_r)`` in float32 from `SmallestComponents` and the adapter's ``scaling`` (see
    `smallest_component_init()`): ``B0 = U_r S'^{1/2}``, ``A0 = S'^{1/2} V_r^T C~^{-1}``, ``S' = S_r / scaling``."""
    s_r = components.singular_values
    root = (s_r / scaling).sqrt()
    b0 = components.left * root
    a0 = root.unsqueeze(1) * components.solved_rows
    if balance:
        # |row i of A0| = |col i of B0|: same product, but C~^{-1} no longer makes A0 ~1/damping times larger
        # than B0 in the (near-)null directions
        factor = (b0.norm(dim=0) / a0.norm(dim=1).clamp_min(1e-300)).sqrt()
        a0, b0 = a0 * factor.unsqueeze(1), b0 / factor
    return b0.float().contiguous(), a0.float().contiguous(), s_r.float()


def exact_null_floor(n: int, dtype: torch.dtype) -> float:
    """Relative eigenvalue below which a direction of an ``n x n`` covariance summed in ``dtype`` is an exact zero.

    A direction that no calibration input touches has eigenvalue 0 up to the rounding of the sum and of the
    eigen-solver, at most about ``n * eps * lambda_max``; any direction an input does touch sits far above it
    (measured gaps of 8 orders of magnitude in float64).
    """
    return EXACT_NULL_ROUNDING * n * torch.finfo(dtype).eps


@dataclass
class NullDimensions:
    """How many eigenvalues of a covariance form its null space (``null_dim``, ``k``) and how many of those are
    exact zeros (``exact_dim``); ``rule`` is ``"exact"`` or the relative threshold used."""

    null_dim: int
    exact_dim: int
    rule: str


def null_dimensions(
    values: torch.Tensor,
    threshold: float | str = "auto",
    min_exact_dim: int = 1,
    accumulation_dtype: torch.dtype = torch.float64,
) -> NullDimensions:
    """The null-space rule of `null_space_basis()` on ascending eigenvalues ``values`` (``(n,)``) alone.

    ``threshold="auto"``: the exact null space (eigenvalues at the rounding floor, `exact_null_floor()`) when it has
    at least ``min_exact_dim`` directions, otherwise the paper's ``lambda <= 1e-6 lambda_max``. A float
    ``threshold`` keeps every direction with ``lambda <= threshold * lambda_max``.
    """
    top = values[-1].clamp_min(0)
    floor = exact_null_floor(values.numel(), accumulation_dtype)
    exact_dim = int((values <= floor * top).sum())
    if threshold == "auto" and floor < PAPER_THRESHOLD and exact_dim >= min_exact_dim:
        return NullDimensions(exact_dim, exact_dim, "exact")
    relative = PAPER_THRESHOLD if threshold == "auto" else float(threshold)
    null_dim = int((values <= relative * top).sum())
    return NullDimensions(null_dim, min(exact_dim, null_dim), f"{relative:g}")


def null_space_basis(
    covariance: torch.Tensor | None = None,
    threshold: float | str = "auto",
    min_exact_dim: int = 1,
    accumulation_dtype: torch.dtype = torch.float64,
    compact: bool = False,
    spectrum: CovarianceSpectrum | None = None,
    dims: NullDimensions | None = None,
) -> ProjectorBasis:
    """Basis of the null space of ``C`` (``n x n``) and its leaking directions, by the rule of `null_dimensions()`.

    One eigen-decomposition (`covariance_spectrum()` of ``covariance``, or ``spectrum`` when given) gives the
    eigenvalues and both bases; ``P = N N^T`` is an orthogonal projector to float precision. ``dims`` replaces the
    rule's counts (e.g. those a rank allocation was made from). The smaller of the null basis ``N`` (``k`` vectors,
    if ``k <= n - k``) and the range basis ``R`` is stored. ``compact``: the leak vectors are columns of ``N``, so
    ``N`` is stored whenever ``n k`` floats is no more than ``R`` plus the leak vectors, ``n (n - k + j)``.
    """
    if spectrum is None:
        if covariance is None:
            raise TypeError("null_space_basis() needs `covariance` or `spectrum`.")
        spectrum = covariance_spectrum(covariance)
    values, vectors = spectrum.values, spectrum.vectors
    n = values.numel()
    if dims is None:
        dims = null_dimensions(values, threshold, min_exact_dim, accumulation_dtype)
    null_dim, exact_dim = dims.null_dim, dims.exact_dim
    stored = exact_dim if compact else null_dim  # compact: the leak vectors come with N at no extra cost
    store_null = stored <= n - null_dim
    kind, basis = ("null", vectors[:, :null_dim]) if store_null else ("range", vectors[:, null_dim:])
    leak_values, leak_vectors = values[exact_dim:null_dim], vectors[:, exact_dim:null_dim]
    return ProjectorBasis(
        basis.float().contiguous(),
        kind,
        null_dim,
        leak_vectors.float().contiguous(),
        leak_values.clamp_min(0).float().contiguous(),
        dims.rule,
    )


def bounded_input_scale(projected_A: torch.Tensor, row_norm: float = EFFECTIVE_ROW_NORM) -> torch.Tensor:
    """Per-component factors ``g`` (``(r,)``) giving the rows of ``g * (A0 P)`` the norm ``row_norm``.

    The paper's ``A0 = S^{1/2} V^T C~^{-1}`` is about ``1 / damping`` times larger than ``B0`` in the null directions
    of ``C``. Kept as the *stored* ``lora_A``, that size makes ``A`` turn slowly under Adam (its steps are about the
    learning rate per entry), which keeps the update in the row space the decomposition chose. Applied as it is,
    the same size makes every step of ``B`` move the update hundreds of times more than in plain LoRA. The adapter
    therefore applies ``A_eff = g * A`` with rows of plain LoRA's initial norm: the update grows as plain LoRA's
    does, and ``A`` still turns as slowly as the paper's. Rows that vanish on the null space keep ``g = 1``.
    """
    norms = projected_A.norm(dim=1)
    return torch.where(norms > 0, row_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))


def output_energy(weight: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``tr(W C W^T)`` in float64: the mean squared output of ``W`` (``(m, n)``) on inputs of second moment ``C``."""
    w = weight.double()
    return ((w @ covariance.double()) * w).sum()


def output_energy_from_product(weight: torch.Tensor, damped_product: torch.Tensor, shift: float) -> torch.Tensor:
    """`output_energy()` from ``damped_product = W (C + shift I)`` (``(m, n)``, float64), in ``O(m n)``.

    ``tr(W C W^T) = sum(W * W (C + shift I)) - shift ||W||_F^2``; the init has this product anyway (``W C~``).
    """
    w = weight.double()
    return (damped_product * w).sum() - shift * (w * w).sum()


def project_rows(matrix: torch.Tensor, basis: torch.Tensor, kind: str) -> torch.Tensor:
    """``matrix @ P`` for a ``(r, n)`` matrix, in ``O(r n k)``: ``(M N) N^T`` or ``M - (M R) R^T``."""
    basis = basis.to(matrix.dtype)
    if kind == "null":
        return (matrix @ basis) @ basis.T
    return matrix - (matrix @ basis) @ basis.T


def calibration_error_bound(update_norm: float, covariance: torch.Tensor, threshold: float) -> float:
    """Bound on the RMS output change on calibration inputs when the null space is approximate.

    For an update ``dW = dW P``, ``E_t ||dW x_t||^2 = tr(dW P C P dW^T) <= ||dW||_2^2 * lambda_k`` where
    ``lambda_k <= threshold * lambda_max`` is the largest discarded eigenvalue, so the RMS change is at most
    ``||dW||_2 * sqrt(threshold * lambda_max)``.
    """
    lambda_max = float(torch.linalg.eigvalsh(covariance.double())[-1])
    return update_norm * (threshold * max(lambda_max, 0.0)) ** 0.5
