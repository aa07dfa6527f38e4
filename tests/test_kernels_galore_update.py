"""GaLore's fused update kernel (kernels/galore_update.py) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from longtune.kernels.galore_update import galore_update, galore_update_reference


@pytest.mark.parametrize("side, shape, rank", [("right", (50, 40), 8), ("left", (40, 70), 8), ("right", (33, 17), 17)],
                         ids=["right", "left", "full-rank-odd"])
@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_fused_update_matches_the_reference_fp32(side, shape, rank, decay):
    gen = torch.Generator().manual_seed(0)
    rows, cols = shape
    low = (rows, rank) if side == "right" else (rank, cols)
    basis = torch.randn(*((rank, cols) if side == "right" else (rows, rank)), generator=gen)
    m, v = torch.randn(*low, generator=gen), torch.rand(*low, generator=gen) + 0.01
    w = torch.randn(*shape, generator=gen)
    expected = w.clone()
    galore_update_reference(expected, m, v, basis, side, step_size=1e-2, scale=0.25, eps=1e-6, decay=decay)
    galore_update(w, m, v, basis, side, step_size=1e-2, scale=0.25, eps=1e-6, decay=decay)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(w, torch.randn(*shape, generator=torch.Generator().manual_seed(0)))


def test_fused_update_reads_strided_moments():
    gen = torch.Generator().manual_seed(1)
    m, v = torch.randn(8, 30, generator=gen).t(), torch.rand(8, 30, generator=gen).t() + 0.1  # (30, 8), strided
    basis, w = torch.randn(8, 20, generator=gen), torch.randn(30, 20, generator=gen)
    expected = w.clone()
    galore_update_reference(expected, m, v, basis, "right", 1e-2, 0.25, 1e-6)
    galore_update(w, m, v, basis, "right", 1e-2, 0.25, 1e-6)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
