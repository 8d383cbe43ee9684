"""GuardSpace maths as pure functions: damping, preconditioned SVD init, null-space basis, projection, bound."""

from __future__ import annotations

import pytest
import torch

from peft_safety.guardspace import decomposition
from peft_safety.guardspace.decomposition import (
    PARTIAL_SVD_MIN_RATIO,
    bounded_input_scale,
    calibration_error_bound,
    covariance_spectrum,
    damp_covariance,
    damp_covariance_spectral,
    null_dimensions,
    null_space_basis,
    output_energy,
    output_energy_from_product,
    project_rows,
    smallest_component_init,
    smallest_singular_triplets,
)


def low_rank_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, n, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, n).double()


def covariance_of(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def residual(c: torch.Tensor, d: float) -> float:
    damped = c + d * torch.diagonal(c).mean() * torch.eye(c.shape[0], dtype=c.dtype)
    return float(torch.linalg.matrix_norm(damped @ torch.linalg.inv(damped) - torch.eye(c.shape[0], dtype=c.dtype)))


@pytest.mark.parametrize("tolerance", [0.05, 1e-14, 3e-15])
def test_damping_doubling_rule(tolerance):
    # badly conditioned, singular covariance: tiny tolerances force several doublings
    c = covariance_of(low_rank_inputs(20, 48) * torch.logspace(0, 6, 48).double())
    damped, inverse, d = damp_covariance(c, start=0.01, tolerance=tolerance)
    torch.testing.assert_close(damped, c + d * torch.diagonal(c).mean() * torch.eye(48, dtype=torch.float64))
    torch.testing.assert_close(inverse, torch.linalg.inv(damped))
    # d is the first value of 0.01 * 2**j meeting the criterion
    j = round(torch.log2(torch.tensor(d / 0.01)).item())
    assert d == pytest.approx(0.01 * 2**j, rel=1e-12)
    assert residual(c, d) < tolerance
    assert all(residual(c, 0.01 * 2**i) >= tolerance for i in range(j))


def test_damping_gives_up_with_a_clear_error():
    c = covariance_of(low_rank_inputs(20, 48) * torch.logspace(0, 6, 48).double())
    with pytest.raises(ValueError, match="Could not damp the covariance of site 'x'.*Raise `damping_tolerance`"):
        damp_covariance(c, tolerance=1e-30, max_doublings=3, site="site 'x'")


@pytest.mark.parametrize(
    "covariance, kwargs, message",
    [
        (torch.zeros(4, 4, dtype=torch.float64), {}, "diagonal mean is 0 .*no scale to damp"),
        (torch.full((4, 4), float("nan"), dtype=torch.float64), {}, "holds NaN or Inf"),
        (torch.eye(4, dtype=torch.float64) * float("inf"), {}, "holds NaN or Inf"),
        (-torch.eye(4, dtype=torch.float64), {}, "diagonal mean is -1"),
        (torch.eye(4, dtype=torch.float64), {"tolerance": 0.0}, "must be finite positive numbers"),
        (torch.eye(4, dtype=torch.float64), {"start": 0.0}, "must be finite positive numbers"),
        (torch.eye(4, dtype=torch.float64), {"start": float("nan")}, "must be finite positive numbers"),
    ],
)
def test_each_damping_failure_has_its_own_message(covariance, kwargs, message):
    with pytest.raises(ValueError, match=f"Cannot damp the covariance of site 's': .*{message}"):
        damp_covariance(covariance, site="site 's'", **kwargs)


@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.5])
def test_preconditioned_svd_reconstructs_the_weight(scaling):
    torch.manual_seed(0)
    m, n, r = 24, 32, 5
    weight = torch.randn(m, n)
    damped, inverse, _ = damp_covariance(covariance_of(low_rank_inputs(10, n)))
    u, s, vh = torch.linalg.svd(weight.double() @ damped, full_matrices=False)
    b0, a0, kept = smallest_component_init(weight, damped, inverse, r, scaling)
    assert b0.shape == (m, r) and a0.shape == (r, n) and b0.dtype == torch.float32
    # the r smallest singular values, largest of them first
    torch.testing.assert_close(kept.double(), s[-r:], rtol=1e-6, atol=0)
    assert torch.all(kept[:-1] >= kept[1:])
    # W = U S (C~^-1 V)^T: the adapter part plus the remaining (largest) components is W
    remaining = (u[:, :-r] * s[:-r]) @ (vh[:-r] @ inverse)
    torch.testing.assert_close(scaling * b0.double() @ a0.double() + remaining, weight.double(), rtol=0, atol=1e-5)
    # and with every component in the adapter, the adapter alone is W
    b_all, a_all, _ = smallest_component_init(weight, damped, inverse, min(m, n), scaling)
    torch.testing.assert_close(scaling * b_all @ a_all, weight, rtol=0, atol=1e-5)


def test_balanced_factors_keep_the_product_and_equal_the_norms():
    """Balancing rescales each component (equal norms in A0 and B0) without changing B0 A0; the paper's factors
    are ~1/damping larger in A0 on a rank-deficient covariance."""
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    damped, inverse, _ = damp_covariance(covariance_of(low_rank_inputs(10, 32)))
    b_paper, a_paper, kept = smallest_component_init(weight, damped, inverse, 5, 2.0)
    b0, a0, kept_balanced = smallest_component_init(weight, damped, inverse, 5, 2.0, balance=True)
    torch.testing.assert_close(b0.double() @ a0.double(), b_paper.double() @ a_paper.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a0.norm(dim=1), b0.norm(dim=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(kept_balanced, kept)
    assert float((a_paper.norm(dim=1) / b_paper.norm(dim=0)).min()) > 10  # what balancing removes


def test_init_rejects_bad_rank():
    damped, inverse, _ = damp_covariance(torch.eye(8, dtype=torch.float64))
    for r in (0, 7):
        with pytest.raises(ValueError, match=r"min\(out, in\)=6"):
            smallest_component_init(torch.randn(6, 8), damped, inverse, r, 1.0)


@pytest.mark.parametrize("tokens, expected_kind", [(10, "range"), (40, "null")])
def test_null_or_range_basis_whichever_is_smaller(tokens, expected_kind):
    n = 48
    x = low_rank_inputs(tokens, n)
    c = covariance_of(x)
    basis = null_space_basis(c, threshold=1e-10)
    assert basis.null_dim == n - tokens
    assert basis.kind == expected_kind
    assert basis.basis.shape == (n, min(n - tokens, tokens))
    assert basis.in_features == n
    torch.testing.assert_close(basis.basis.T @ basis.basis, torch.eye(basis.basis.shape[1]), rtol=0, atol=1e-5)
    # counts match the eigen-decomposition with a relative threshold
    eigenvalues = torch.linalg.eigvalsh(c)
    for threshold in (1e-10, 1e-3, 1e-1):
        expected = int((eigenvalues <= threshold * eigenvalues[-1]).sum())
        assert null_space_basis(c, threshold).null_dim == expected


def test_null_and_range_projectors_agree_and_annihilate_calibration_inputs():
    n, tokens = 48, 30
    x = low_rank_inputs(tokens, n, seed=3)
    eigenvalues, vectors = torch.linalg.eigh(covariance_of(x))
    null = eigenvalues <= 1e-10 * eigenvalues[-1]
    null_basis, range_basis = vectors[:, null].float(), vectors[:, ~null].float()
    matrix = torch.randn(6, n)
    via_null = project_rows(matrix, null_basis, "null")
    via_range = project_rows(matrix, range_basis, "range")
    torch.testing.assert_close(via_null, via_range, rtol=0, atol=1e-5)
    dense = null_basis @ null_basis.T
    torch.testing.assert_close(dense, dense @ dense, rtol=0, atol=1e-5)  # a projector
    assert float((via_null @ x.float().T).abs().max()) < 1e-4 * float(matrix.abs().max() * x.abs().max())


@pytest.mark.parametrize("kind", ["null", "range"])
def test_project_rows_equals_dense_product(kind):
    torch.manual_seed(1)
    n = 40
    basis, _ = torch.linalg.qr(torch.randn(n, 13))
    matrix = torch.randn(7, n)
    dense = basis @ basis.T if kind == "null" else torch.eye(n) - basis @ basis.T
    torch.testing.assert_close(project_rows(matrix, basis, kind), matrix @ dense, rtol=0, atol=1e-5)
    # the basis is cast to the matrix' dtype
    assert project_rows(matrix.double(), basis, kind).dtype == torch.float64


@pytest.mark.parametrize("threshold", [1e-6, 1e-3, 1e-1])
def test_calibration_error_bound_holds_for_approximate_null_spaces(threshold):
    n = 32
    # full-rank inputs with a decaying spectrum: the "null space" at the threshold is only approximate
    x = low_rank_inputs(200, n, seed=5) * torch.logspace(0, -6, n).double()
    c = covariance_of(x)
    basis = null_space_basis(c, threshold)
    assert 0 < basis.null_dim < n
    generator = torch.Generator().manual_seed(0)
    update = project_rows(torch.randn(16, n, generator=generator, dtype=torch.float64), basis.basis, basis.kind)
    rms_change = float(((x @ update.T) ** 2).sum(dim=1).mean().sqrt())
    bound = calibration_error_bound(float(torch.linalg.matrix_norm(update, ord=2)), c, threshold)
    assert 0 < rms_change <= bound * (1 + 1e-6)


def test_auto_threshold_takes_the_exact_null_space_when_it_is_large_enough():
    n, tokens = 48, 30
    # 30 orthogonal input directions: an 18-dim exact null space, and 10 of the 30 with eigenvalues below 1e-6
    generator = torch.Generator().manual_seed(7)
    directions, _ = torch.linalg.qr(torch.randn(n, tokens, generator=generator, dtype=torch.float64))
    spectrum = torch.cat([torch.logspace(-9, -7, 10), torch.logspace(-3, 0, 20)]).double()
    x = (directions * spectrum.sqrt()).T * tokens**0.5  # (tokens, n), second moment sum_i spectrum_i d_i d_i^T
    c = covariance_of(x)
    values = torch.linalg.eigvalsh(c)
    near = int((values <= 1e-6 * values[-1]).sum())
    assert near > n - tokens
    exact = null_space_basis(c, "auto", min_exact_dim=4)
    assert (exact.null_dim, exact.rule, exact.leak_values.numel()) == (n - tokens, "exact", 0)
    # not enough exact directions for the rank: the paper's threshold, and the extra directions leak
    fallback = null_space_basis(c, "auto", min_exact_dim=n - tokens + 1)
    assert (fallback.null_dim, fallback.rule) == (near, "1e-06")
    assert fallback.leak_values.numel() == near - (n - tokens)
    torch.testing.assert_close(fallback.leak_values.double(), values[n - tokens : near], rtol=1e-4, atol=0)
    # leak vectors are eigenvectors of C with those eigenvalues, inside the null space
    vectors = fallback.leak_vectors.double()
    torch.testing.assert_close(c @ vectors, vectors * fallback.leak_values.double(), rtol=0, atol=1e-6 * values[-1])
    inside = project_rows(vectors.T.float(), fallback.basis, fallback.kind)
    torch.testing.assert_close(inside, vectors.T.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens", [10, 40])  # range and null bases
def test_leakage_identity_over_stored_eigenpairs(tokens):
    """``E ||dW x||^2 = sum_j lambda_j ||dW n_j||^2`` for ``dW = dW P``, over the leaking eigenpairs alone."""
    n = 48
    x = low_rank_inputs(200, n, seed=tokens) * torch.logspace(0, -5, n).double()
    c = covariance_of(x)
    basis = null_space_basis(c, 1e-4)
    assert basis.leak_values.numel() == basis.null_dim > 0
    generator = torch.Generator().manual_seed(0)
    update = project_rows(torch.randn(16, n, generator=generator, dtype=torch.float64), basis.basis, basis.kind)
    measured = float(((x @ update.T) ** 2).sum(dim=1).mean())
    certified = float(((update @ basis.leak_vectors.double()) ** 2).sum(0) @ basis.leak_values.double())
    assert certified == pytest.approx(measured, rel=1e-4)


def test_bounded_input_scale_gives_lora_row_norms():
    rows = torch.tensor([[300.0, 400.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    scale = bounded_input_scale(rows)
    norms = (rows * scale.unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(norms[[0, 2]], torch.full((2,), 3**-0.5))
    assert scale[1] == 1.0  # a row with nothing in the null space keeps g = 1


@pytest.mark.parametrize("tolerance", [0.05, 1e-9])
def test_spectral_damping_matches_the_explicit_rule(tolerance):
    """The damping through the eigen-decomposition picks the explicit rule's ``d`` and applies the same ``C~^{-1}``."""
    c = covariance_of(low_rank_inputs(20, 48) * torch.logspace(0, 3, 48).double())
    damped, inverse, d = damp_covariance(c, tolerance=tolerance)
    spectral = damp_covariance_spectral(c, covariance_spectrum(c), tolerance=tolerance)
    assert spectral.damping == d
    assert spectral.shift == pytest.approx(d * float(torch.diagonal(c).mean()))
    torch.testing.assert_close(spectral.damped, damped)
    rows = torch.randn(5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spectral.solve_rows(rows), rows @ inverse, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="Could not damp the covariance of site 'x'"):
        damp_covariance_spectral(c, tolerance=1e-30, max_doublings=3, site="site 'x'")
    with pytest.raises(ValueError, match="diagonal mean is 0 .*no scale to damp"):
        damp_covariance_spectral(torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(240, 320), (320, 240), (256, 256)])
def test_partial_smallest_triplets_match_the_full_svd(shape, monkeypatch):
    """The partial method (QR, inverse subspace iteration, Rayleigh-Ritz) gives the full SVD's r smallest triplets
    on an ill-conditioned preconditioned product ``W C~`` (rank-deficient ``C``)."""
    m, n = shape
    r = 8
    assert min(m, n) >= PARTIAL_SVD_MIN_RATIO * (2 * r + 8)

    def no_fallback(matrix, r):
        raise AssertionError("the partial method fell back to the full SVD")

    monkeypatch.setattr(decomposition, "_full_smallest_triplets", no_fallback)
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    damped, _, _ = damp_covariance(covariance_of(low_rank_inputs(n // 3, n)))
    product = weight @ damped
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    u_r, s_r, vh_r = smallest_singular_triplets(product, r)
    assert u_r.shape == (m, r) and s_r.shape == (r,) and vh_r.shape == (r, n)
    torch.testing.assert_close(s_r, s[-r:], rtol=1e-10, atol=0)
    torch.testing.assert_close(product @ vh_r.T, u_r * s_r, rtol=0, atol=1e-12 * float(s[0]))
    torch.testing.assert_close(vh_r @ vh_r.T, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-12)
    # same subspaces, hence the same adapter product U_r U_r^T W
    torch.testing.assert_close(u_r @ u_r.T @ weight, u[:, -r:] @ u[:, -r:].T @ weight, rtol=0, atol=1e-8)


def test_output_energy_from_the_damped_product():
    c = covariance_of(low_rank_inputs(10, 32))
    weight = torch.randn(24, 32)
    spectral = damp_covariance_spectral(c)
    product = weight.double() @ spectral.damped
    torch.testing.assert_close(
        output_energy_from_product(weight, product, spectral.shift), output_energy(weight, c), rtol=1e-12, atol=0
    )


def test_null_dimensions_follow_the_basis_rule():
    """The eigenvalue-only rule (used to allocate ranks before any basis exists) counts what the basis keeps."""
    n, tokens = 40, 25
    c = covariance_of(low_rank_inputs(tokens, n))
    values = torch.linalg.eigvalsh(c)
    for threshold, min_exact in (("auto", 4), ("auto", n - tokens + 1), (1e-4, 1)):
        basis = null_space_basis(c, threshold, min_exact_dim=min_exact)
        dims = null_dimensions(values, threshold, min_exact_dim=min_exact)
        assert (dims.null_dim, dims.rule) == (basis.null_dim, basis.rule)
        assert dims.null_dim - dims.exact_dim == basis.leak_values.numel()
    assert null_dimensions(values, "auto", min_exact_dim=4).rule == "exact"
    assert null_dimensions(values, "auto", min_exact_dim=4).null_dim == n - tokens
