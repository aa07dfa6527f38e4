"""GaLore's projections: a rank-r basis for one weight's gradient, and the maps into and out of its span.

A weight of shape (m, n) is projected on its smaller side, as in the paper: with m >= n ("right") the basis B
is (r, n) and the gradient G maps to G @ B.T, of shape (m, r); with m < n ("left") B is (m, r) and G maps to
B.T @ G, of shape (r, n). Back: low @ B, or B @ low, times `scale`.

Three ways to find the basis, every `update_proj_gap` steps:
- `svd`: the top-r singular vectors of the gradient (torch.linalg.svd in fp32), the paper's projector;
- `randomized`: the same subspace by randomized subspace iteration (Halko et al.), warm-started from the
  previous basis: a few matmuls and a thin QR instead of a full SVD (GaLore 2 uses a randomized SVD);
- `random`: an orthonormal basis from a seeded Gaussian, independent of the gradient (APOLLO's idea): it costs
  no SVD and is never stored, since (seed, weight, refresh) regenerate it.
"""

from __future__ import annotations

import torch

PROJECTORS = ("svd", "randomized", "random")
OVERSAMPLE, POWER_ITERS = 8, 2


def side_of(shape: torch.Size | tuple[int, int]) -> str:
    return "right" if shape[0] >= shape[1] else "left"


def project(grad: torch.Tensor, basis: torch.Tensor, side: str | None = None) -> torch.Tensor:
    side = side or side_of(grad.shape)
    return grad @ basis.t() if side == "right" else basis.t() @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str, scale: float) -> torch.Tensor:
    return (low @ basis if side == "right" else basis @ low) * scale


def _as_columns(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """The matrix whose top left singular vectors the basis holds: G for "left", G.T for "right"."""
    return matrix if side == "left" else matrix.t()


def _to_basis(columns: torch.Tensor, side: str, dtype: torch.dtype) -> torch.Tensor:
    return (columns if side == "left" else columns.t()).to(dtype).contiguous()


def svd_basis(grad: torch.Tensor, rank: int) -> torch.Tensor:
    """The paper's projector: the top-r singular vectors on the smaller side, in the gradient's dtype."""
    side = side_of(grad.shape)
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return (vh[:rank] if side == "right" else u[:, :rank]).to(grad.dtype).contiguous()


def randomized_basis(grad: torch.Tensor, rank: int, previous: torch.Tensor | None,
                     generator: torch.Generator) -> torch.Tensor:
    """Top-r singular subspace by subspace iteration: start from the previous basis (the subspace drifts slowly
    between refreshes; its power step counts as one of the `POWER_ITERS`) or a Gaussian, power steps with
    re-orthonormalisation, then a small SVD of the projected (k x q) matrix to pick the best r of the
    k = r + OVERSAMPLE directions."""
    side = side_of(grad.shape)
    a = _as_columns(grad.float(), side)  # (p, q): we want its top-r left singular vectors, p = smaller side
    p, q = a.shape
    k = min(rank + OVERSAMPLE, p)
    fresh = k if previous is None else k - previous.shape[-1 if side == "left" else 0]
    y = a @ torch.randn(q, fresh, generator=generator).to(a.device)
    if previous is not None:  # warm start: the previous basis's directions after one power step, topped up
        prev = _as_columns(previous.float(), side)  # (p, r)
        y = torch.cat([a @ (a.t() @ prev), y], dim=1)
    q_mat, _ = torch.linalg.qr(y)
    for _ in range(POWER_ITERS - (previous is not None)):  # the warm start's power step counts as one
        q_mat, _ = torch.linalg.qr(a @ (a.t() @ q_mat))
    u_small, _, _ = torch.linalg.svd(q_mat.t() @ a, full_matrices=False)
    return _to_basis(q_mat @ u_small[:, :rank], side, grad.dtype)


def random_basis(shape: tuple[int, int], rank: int, seed: int, index: int, refresh: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """An orthonormal rank-r basis drawn from (seed, weight index, refresh count): the same call gives the same
    basis, so a checkpoint keeps three integers instead of the matrix."""
    side = side_of(shape)
    p = min(shape)
    generator = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + index) * 1_000_003 + refresh)
    gauss = torch.randn(p, min(rank, p), generator=generator, dtype=torch.float32)
    q_mat, _ = torch.linalg.qr(gauss)
    return _to_basis(q_mat, side, dtype).to(device)


def rotate_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                   side: str) -> None:
    """Carry the moments from the old basis's coordinates into the new one's, in place. The first moment turns
    exactly (R = B_old B_new^T for a right basis, B_new^T B_old for a left one); the second is not a vector in
    that space, so it takes the squared rotation, which keeps it non-negative (an approximation)."""
    r = old.float() @ new.float().t() if side == "right" else new.float().t() @ old.float()
    turn = (lambda x, m: x.float() @ m) if side == "right" else (lambda x, m: m @ x.float())
    exp_avg.copy_(turn(exp_avg, r))
    exp_avg_sq.copy_(turn(exp_avg_sq, r * r))
