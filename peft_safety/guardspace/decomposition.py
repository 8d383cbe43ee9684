"""GuardSpace maths as pure tensor functions (no model, no PEFT).

Shapes: ``W`` is ``(m, n)`` (out x in), ``C`` the ``(n, n)`` uncentered input covariance, ``r`` the adapter rank.
Everything is computed in float64 and returned in float32 unless stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import scipy.linalg
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


def damp_covariance(
    covariance: torch.Tensor,
    start: float = 0.01,
    tolerance: float = 0.05,
    max_doublings: int = 40,
    site: str = "the layer",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Damped covariance ``C~ = C + d * mean(diag C) * I`` and its inverse (the paper's doubling rule).

    ``d`` starts at ``start`` and doubles until ``||C~ C~^{-1} - I||_F < tolerance``.

    Returns:
        ``(C~, C~^{-1}, d)`` in float64.

    Raises:
        ValueError: each cause with its own message (``site`` names the covariance): a non-finite covariance, a
            covariance without scale (all zero), invalid ``start``/``tolerance``, or a tolerance not reached.
    """
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
    n = c.shape[0]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    scale = torch.diagonal(c).mean()
    if not bool(scale > 0):
        raise ValueError(
            f"Cannot damp the covariance of {site}: its diagonal mean is {float(scale):g} (all-zero or not a "
            "covariance), so it has no scale to damp. Collect the safety statistics again on this model, or leave "
            "this layer out of `target_modules`."
        )
    damping = start
    for _ in range(max_doublings):
        damped = c + damping * scale * eye
        inverse = torch.linalg.inv(damped)
        if torch.linalg.matrix_norm(damped @ inverse - eye) < tolerance:
            return damped, inverse, damping
        damping *= 2
    raise ValueError(
        f"Could not damp the covariance of {site} to an invertible matrix within damping_tolerance={tolerance:g} "
        f"after {max_doublings} doublings of damping_start={start:g} (the inverse stays inaccurate in float64). "
        "Raise `damping_tolerance` (default 0.05) or `damping_start` (default 0.01)."
    )


def eigenpairs(symmetric: torch.Tensor, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors ``first..last`` (inclusive) of a symmetric float64 matrix.

    On CPU only the requested vectors are computed (LAPACK ``syevr`` through SciPy): a subset costs a fraction of a
    full ``eigh`` or SVD. Elsewhere (e.g. CUDA) a full ``torch.linalg.eigh`` is sliced.
    """
    if symmetric.device.type == "cpu":
        values, vectors = scipy.linalg.eigh(symmetric.numpy(), subset_by_index=[first, last], driver="evr")
        return torch.from_numpy(values), torch.from_numpy(vectors)
    values, vectors = torch.linalg.eigh(symmetric)
    return values[first : last + 1], vectors[:, first : last + 1]


def eigenvalues(symmetric: torch.Tensor) -> torch.Tensor:
    """All eigenvalues (ascending) of a symmetric float64 matrix, without eigenvectors."""
    if symmetric.device.type == "cpu":
        return torch.from_numpy(scipy.linalg.eigh(symmetric.numpy(), eigvals_only=True, driver="evr"))
    return torch.linalg.eigvalsh(symmetric)


def smallest_component_init(
    weight: torch.Tensor,
    damped: torch.Tensor,
    damped_inverse: torch.Tensor,
    r: int,
    scaling: float,
    balance: bool = False,
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

    Returns:
        ``(B0, A0, S_r)`` in float32, ``S_r`` the kept singular values, largest of them first.
    """
    m, n = weight.shape
    if not 0 < r <= min(m, n):
        raise ValueError(f"r={r} must be between 1 and min(out, in)={min(m, n)} for a {m}x{n} layer.")
    u, s, vh = torch.linalg.svd(weight.double() @ damped, full_matrices=False)
    u_r, s_r, vh_r = u[:, -r:], s[-r:], vh[-r:]
    root = (s_r / scaling).sqrt()
    b0 = u_r * root
    a0 = (root.unsqueeze(1) * vh_r) @ damped_inverse
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


def null_space_basis(
    covariance: torch.Tensor,
    threshold: float | str = "auto",
    min_exact_dim: int = 1,
    accumulation_dtype: torch.dtype = torch.float64,
    compact: bool = False,
) -> ProjectorBasis:
    """Basis of the null space of ``C`` (``n x n``) and its leaking directions.

    ``threshold="auto"``: the exact null space (eigenvalues at the rounding floor, `exact_null_floor()`) when
    it has at least ``min_exact_dim`` directions, otherwise the paper's ``lambda <= 1e-6 lambda_max``. A float
    ``threshold`` keeps every direction with ``lambda <= threshold * lambda_max``.

    All eigenvalues are computed first (no vectors), then only the smaller of the null basis ``N`` (``k``
    vectors, if ``k <= n - k``) and the range basis ``R``, plus the near-null vectors when ``R`` is stored. The
    basis is re-orthonormalised (QR) so that ``P`` is an exact orthogonal projector to float precision. ``compact``:
    the leak vectors are columns of ``N``, so ``N`` is stored whenever ``n k`` floats is no more than ``R`` plus the
    leak vectors, ``n (n - k + j)``.
    """
    c = covariance.double()
    c = (c + c.T) / 2
    n = c.shape[0]
    values = eigenvalues(c)
    top = values[-1].clamp_min(0)
    floor = exact_null_floor(n, accumulation_dtype)
    exact_dim = int((values <= floor * top).sum())
    if threshold == "auto" and floor < PAPER_THRESHOLD and exact_dim >= min_exact_dim:
        null_dim, rule = exact_dim, "exact"
    else:
        relative = PAPER_THRESHOLD if threshold == "auto" else float(threshold)
        null_dim, rule = int((values <= relative * top).sum()), f"{relative:g}"
    exact_dim = min(exact_dim, null_dim)
    stored = exact_dim if compact else null_dim  # compact: the leak vectors come with N at no extra cost
    store_null = stored <= n - null_dim
    kind, first, last = ("null", 0, null_dim - 1) if store_null else ("range", null_dim, n - 1)
    if last < first:
        basis = torch.zeros(n, 0, dtype=c.dtype, device=c.device)
    else:
        _, vectors = eigenpairs(c, first, last)
        basis, _ = torch.linalg.qr(vectors.to(c.device))
    if null_dim == exact_dim:
        leak_values, leak_vectors = values[:0], torch.zeros(n, 0, dtype=c.dtype, device=c.device)
    elif kind == "null":
        leak_values, leak_vectors = values[exact_dim:null_dim], basis[:, exact_dim:]
    else:
        leak_values, leak_vectors = eigenpairs(c, exact_dim, null_dim - 1)
    return ProjectorBasis(
        basis.float().contiguous(),
        kind,
        null_dim,
        leak_vectors.to(c.device).float().contiguous(),
        leak_values.to(c.device).clamp_min(0).float().contiguous(),
        rule,
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
