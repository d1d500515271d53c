"""Rows masked only by finfo.min biases (cupyflash/cpu_attention.py, "the rebuild rule"): left padding with a
causal mask written as an additive finfo.min bias, as transformers builds it for batched training and
generation. The first query rows of a padded sequence see no unmasked key, attend uniformly, and their lse
(~ MASKED_LOGIT + log Nk ~ -2835) is too large for fp32 to rebuild P from: the backward recomputes their max and
sum instead. fp32 gradients must meet the tolerance rule against fp64 eager math."""
from __future__ import annotations

import pytest
import torch

import cupyflash
from cupyflash import cpu_attention
from reference import GRAD_FACTOR, OUT_FACTOR, assert_within_rule, rounding_floor, seed_from


def padded_causal_bias(lengths, n: int, dtype) -> torch.Tensor:
    """(B, 1, N, N) additive: 0 where query i may see key j (j <= i, j not left padding), finfo.min elsewhere."""
    pad = torch.arange(n) < (n - torch.tensor(lengths)).unsqueeze(1)  # (B, N): padding keys
    keep = torch.ones(n, n, dtype=torch.bool).tril() & ~pad[:, None, None, :]  # (B, 1, N, N)
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def eager(q, k, v, bias, scale):
    group = q.shape[1] // k.shape[1]
    s = scale * q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) + bias
    return torch.softmax(s, dim=-1) @ v.repeat_interleave(group, dim=1)


@pytest.mark.parametrize("path", ["routed", "chunked"])
@pytest.mark.parametrize("n,lengths,h_kv", [(48, (41, 48), 2), (113, (60, 100, 113), 4)])
def test_left_padding_gradients_within_rule_fp32(n, lengths, h_kv, path, monkeypatch):
    """out, dq, dk, dv of fp32 inputs against fp64 eager math: within 2x (3x for gradients) fp32 eager's error
    plus the rounding floor. Before the rebuild rule, P of the padded rows was off by up to 2.4e-4 relative.
    ``routed``: as route sends it (torch's kernels, the padded rows on the chunked path); ``chunked``: all on
    the chunked path."""
    gen = torch.Generator().manual_seed(seed_from("left padding", n, lengths, h_kv))
    b, h, d, scale = len(lengths), 4, 32, 32 ** -0.5
    q, dout = (torch.randn(b, h, n, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(b, h_kv, n, d, generator=gen) for _ in range(2))
    bias = padded_causal_bias(lengths, n, torch.float32)
    plan = cpu_attention.route(q, k, bias, False, (-1, -1), 0.0, 0.0)
    assert plan is not None and plan.chunked_rows is not None
    if path == "chunked":
        monkeypatch.setattr(cpu_attention, "route", lambda *args, **kwargs: None)
    _, lse = cpu_attention.forward(q, k, v, bias, scale, False)
    assert (lse < cpu_attention.LSE_REBUILD).any(), "the padded rows must fall under the rebuild rule"

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, bias.to(dtype))
        return (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))

    ours = run(lambda q_, k_, v_, b_: cupyflash.flash_attention(q_, k_, v_, b_, scale=scale), torch.float32)
    ref = run(lambda *t: eager(*t, scale), torch.float64)
    same = run(lambda *t: eager(*t, scale), torch.float32)
    for name, got, want, pt in zip(("out", "dq", "dk", "dv"), ours, ref, same):
        factor = OUT_FACTOR if name == "out" else GRAD_FACTOR
        assert_within_rule(got, want, pt, factor, rounding_floor(want, torch.float32), name)


def test_rebuilt_rows_are_uniform_exactly():
    """P of a row masked only by finfo.min is 1/n to fp32 rounding in the backward: with every row so masked,
    dV of each key is the sum of dO over the rows / n (n = Nk), and the saved lse is left as it was."""
    n, d = 40, 16
    gen = torch.Generator().manual_seed(seed_from("uniform rows"))
    q, k, v, dout = (torch.randn(1, 1, n, d, generator=gen) for _ in range(4))
    bias = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)  # every row masked only by finfo.min
    out, lse = cpu_attention.forward(q, k, v, bias, 0.125, False)
    saved = lse.clone()
    _, _, dv, _ = cpu_attention.backward(dout, q, k, v, bias, out, lse, 0.125, False)
    assert torch.equal(lse, saved), "the backward must not write into the saved lse"
    want = dout.double().sum(dim=-2, keepdim=True).expand(1, 1, n, d) / n
    assert (dv.double() - want).abs().max() <= 4 * torch.finfo(torch.float32).eps * want.abs().max()
