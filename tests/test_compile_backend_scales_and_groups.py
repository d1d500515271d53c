"""Scores scaled by numbers known only at run time, and scores with more than two batch dims.

- A factor one per row at most (a learned per-head temperature (H, 1, 1) as XCiT's, Swin V2's clamped and
  exponentiated logit scale, a per-query factor (..., N, 1), a 0-dim tensor, a float Dynamo made symbolic) applied
  to Q·Kᵀ before any bias, mask or soft-cap is folded into q: (q · t) kᵀ = (q kᵀ) · t, its gradient through the
  product. After a bias or mask it would leave those unscaled: left alone, with the reason. A factor per key is no
  scale of the rows: left alone.
- Scores (B, G, H, N, N) (Twins' and Hiera's windows: batch, groups, heads) run with the leading batch dims merged.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import compile_backend
from models.harness import assert_left_alone, compile_and_compare

B, H, N, D = 2, 4, 7, 8


def _qkv(*batch, n=N):
    return tuple(torch.randn(*batch, n, D) for _ in range(3))


class Temperature(torch.nn.Module):
    """XCiT's cross-covariance attention: l2-normalised q and k, a learned temperature per head."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def forward(self, q, k, v):
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        return attn.softmax(dim=-1) @ v


class CosineWithBias(torch.nn.Module):
    """Swin V2's cosine attention: a clamped, exponentiated logit scale per head, then a relative-position bias."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.log(10 * torch.ones(H, 1, 1)))
        self.table = torch.nn.Parameter(torch.randn(H, N, N))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp() + 16 * torch.sigmoid(self.table)
        return attn.softmax(dim=-1) @ v


def per_query_divisor(q, k, v, t):
    n = q.size(-2)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    return ((q @ k.transpose(-2, -1)) / t).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def zero_dim_factor(q, k, v, t):
    return ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v


@pytest.mark.parametrize("model,extra", [
    (Temperature(), ()),
    (CosineWithBias(), ()),
    (per_query_divisor, (torch.rand(B, H, N, 1) + 0.5,)),
    (zero_dim_factor, (torch.tensor(0.3),)),
], ids=["temperature", "cosine-logit-scale", "per-query", "0-dim"])
def test_run_time_factor_folded_into_q(model, extra):
    """Eager's outputs and gradients (the factors' too), one fused site, and the report says what scaled q."""
    torch.manual_seed(0)
    compile_and_compare(model, *_qkv(B, H), *extra, expect=1)
    torch._dynamo.reset()
    (site,) = compile_backend.explain(model, *_qkv(B, H), *extra).fused
    assert any("known at run time" in note for note in site.notes), site.notes


def test_symbolic_float_scale_folded_under_dynamic_shapes():
    """Under dynamic=True, 1/sqrt(D) of a symbolic size is a symbolic float: fused at every length."""
    def attn(q, k, v):
        return ((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))).softmax(-1) @ v

    torch.manual_seed(1)
    compile_and_compare(attn, *_qkv(B, H), expect=1, dynamic=True, calls=[_qkv(B, H, n=11), _qkv(B, H, n=5)])


def factor_after_bias(q, k, v, bias, t):
    return ((q @ k.transpose(-2, -1) + bias) * t).softmax(-1) @ v


def per_key_factor(q, k, v, t):
    return ((q @ k.transpose(-2, -1)) * t).softmax(-1) @ v


def test_run_time_factor_look_alikes_left_alone():
    torch.manual_seed(2)
    assert_left_alone(factor_after_bias, *_qkv(B, H), torch.randn(1, H, N, N), torch.rand(H, 1, 1) + 0.5,
                      reason="scaled by numbers known only at run time after a bias")
    compile_and_compare(per_key_factor, *_qkv(B, H), torch.rand(1, 1, 1, N) + 0.5, expect=0, grad=False)


class Grouped(torch.nn.Module):
    """Attention within windows: (B, G, H, N, D) with a causal mask and a learned (G, H, N, N) bias."""

    def __init__(self, groups):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(groups, H, N, N))

    def forward(self, q, k, v):
        keep = torch.ones(N, N, dtype=torch.bool).tril()
        s = (q @ k.transpose(-2, -1)) * D ** -0.5 + self.bias
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_scores_with_three_batch_dims():
    torch.manual_seed(3)
    graphs = compile_and_compare(Grouped(3), *_qkv(B, 3, H), expect=1)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.cupyflash.flash_attn_fwd.default]
    assert tuple(op.args[0].meta["example_value"].shape) == (B * 3, H, N, D)
