"""MLA's naive (materialised K/V) and absorbed (attention over the latent) forms are the same maths."""
from __future__ import annotations

import pytest
import torch

from dsv3_rt.core import mla


@pytest.mark.parametrize("start, n", [(0, 7), (5, 1), (9, 3)])
def test_naive_equals_absorbed(start, n):
    g = torch.Generator().manual_seed(start * 10 + n)
    heads, dn, dr, dv, r = 3, 12, 8, 10, 24
    length = start + n
    args = (torch.randn(n, heads, dn, generator=g), torch.randn(n, heads, dr, generator=g),
            torch.randn(length, r, generator=g), torch.randn(length, dr, generator=g),
            torch.randn(heads * (dn + dv), r, generator=g))
    a = mla.naive(*args, start, 0.3)
    b = mla.absorbed(*args, start, 0.3)
    assert a.shape == (n, heads, dv)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_causal_mask_hides_the_future():
    """Changing a later key/value must not change an earlier query's output."""
    g = torch.Generator().manual_seed(0)
    q_nope, q_pe = torch.randn(4, 2, 6, generator=g), torch.randn(4, 2, 4, generator=g)
    kv, pe, w = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g), torch.randn(2 * 11, 8, generator=g)
    before = mla.absorbed(q_nope, q_pe, kv, pe, w, 0, 0.5)
    kv2 = kv.clone()
    kv2[3] += 1.0
    after = mla.absorbed(q_nope, q_pe, kv2, pe, w, 0, 0.5)
    assert torch.equal(before[:3], after[:3]) and not torch.equal(before[3], after[3])
