"""The torch op's CPU implementation against eager math, and its registration (opcheck)."""
import pytest
import torch

import cupyflash


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (97, 33), (33, 97)])
def test_cpu_matches_eager_fp64(causal, n_q, n_k):
    torch.manual_seed(n_q * 1000 + n_k)
    q = torch.randn(2, 3, n_q, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, n_k, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = cupyflash.flash_attention(q, k, v, causal=causal)
    s = q @ k.transpose(-1, -2) / 4.0
    if causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        s = s.masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, dim=-1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # lse is kept in fp32


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.cupyflash.flash_attn_fwd.default, (q, k, v, None, 0.3, True))
