"""The gradient through the LSE on the GPU: a loss that reads lse as well as out (attention sinks' out · σ(lse - sink),
merging attention over key blocks) gets dLSE into the backward as D - dLSE (kernels_cu/flash_bwd.cuh's preprocess),
on the Hopper kernels (d64, d128, the wide backward at d256, d80 padded or not) and mma.sync's bias path.

Reference: PyTorch autograd of <out, g> + <lse, g_lse> in fp32 (lse from fp32 scores); the rule's same-dtype math
is the same in q's dtype (lse in fp32 from the rounded scores, as the kernels keep it). Every row sees a key (lse
finite), fresh inputs per case, the allocator poisoned before the backward.
"""
from __future__ import annotations

import math

import pytest
import torch

import cupyflash
import cupyflash.torch_op  # registers torch.ops.cupyflash.*
from cupyflash import plan
from reference import (GRAD_FACTOR, _no_tf32, assert_within_rule, draw_inputs, nbytes, poison_cuda_allocator,
                       rounding_floor, seed_from)

pytestmark = pytest.mark.gpu

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

CASES = [  # (head_dim, dtype, causal, (Nq, Nk), (Hq, Hkv), mask: None, "keys" (bool (B, 1, 1, Nk)) or "bias")
    (64, BF16, True, (113, 203), (4, 2), None),
    (128, FP16, False, (203, 113), (3, 3), "keys"),
    (128, BF16, True, (1023, 1024), (2, 1), None),
    (96, BF16, False, (17, 17), (2, 2), "bias"),
    (256, BF16, True, (97, 203), (2, 2), None),
    (80, FP16, False, (113, 203), (2, 1), None),
]


def _mask(kind, batch, n_k, gen):
    if kind == "keys":  # right padding, every row keeps its first key
        lengths = torch.randint(1, n_k + 1, (batch,), generator=gen, device="cuda")
        return (torch.arange(n_k, device="cuda") < lengths[:, None])[:, None, None, :]
    if kind == "bias":
        return 2.0 * torch.randn(batch, 1, 1, n_k, generator=gen, device="cuda")
    return None


def _loss_grads(q, k, v, mask, scale, causal, g, g_lse, dtype):
    """dq, dk, dv of <out, g> + <lse, g_lse> by autograd, the attention computed in `dtype` (lse in fp32)."""
    with _no_tf32(), torch.enable_grad():
        qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        group = q.shape[1] // k.shape[1]
        kw, vw = (t.repeat_interleave(group, dim=1) for t in (kc, vc))
        s = torch.matmul(qc * scale, kw.transpose(-1, -2))  # (B, H, Nq, Nk)
        if mask is not None and mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            s = s + mask.to(dtype)
        if causal:
            n_q, n_k = s.shape[-2:]
            seen = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).tril(n_k - n_q)
            s = s.masked_fill(~seen, float("-inf"))
        lse = torch.logsumexp(s.float(), dim=-1)
        out = torch.matmul(torch.softmax(s, dim=-1), vw)
        loss = (out.float() * g.float()).sum() + (lse * g_lse).sum()
        return torch.autograd.grad(loss, (qc, kc, vc))


@pytest.mark.parametrize("head_dim,dtype,causal,lengths,heads,mask_kind", CASES,
                         ids=[f"d{c[0]}-{'fp16' if c[1] == FP16 else 'bf16'}-{'causal' if c[2] else 'full'}-"
                              f"{c[3][0]}x{c[3][1]}-{c[4][0]}/{c[4][1]}-{c[5] or 'nomask'}" for c in CASES])
def test_lse_gradient_enters_the_backward(head_dim, dtype, causal, lengths, heads, mask_kind):
    seed = seed_from("lse-grad", head_dim, dtype, causal, lengths, heads, mask_kind)
    (n_q, n_k), (h_q, h_kv), batch = lengths, heads, 2
    q, k, v, g = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    g_lse = torch.randn(batch, h_q, n_q, generator=gen, device="cuda")
    mask = _mask(mask_kind, batch, n_k, gen)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, scale, causal)
    poison_cuda_allocator(nbytes(q.shape, dtype), nbytes(k.shape, dtype), nbytes(v.shape, dtype),
                          nbytes((batch, h_q, plan.dq_accum_rows(n_q), head_dim), FP32),
                          nbytes((batch, h_q, n_q), FP32))
    dq, dk, dv, _ = torch.ops.cupyflash.flash_attn_bwd(g, q, k, v, mask, out, lse, scale, causal, dlse=g_lse)
    ref = _loss_grads(q, k, v, mask, scale, causal, g, g_lse, FP32)
    same = _loss_grads(q, k, v, mask, scale, causal, g, g_lse, dtype)
    without = _loss_grads(q, k, v, mask, scale, causal, g, torch.zeros_like(g_lse), FP32)
    for name, ours, r, pt, r0 in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, same, without):
        assert_within_rule(ours, r, pt, GRAD_FACTOR, rounding_floor(r, dtype), name)
        if name != "dv":  # dV = Pᵀ dO has no LSE term; dQ and dK move by more than the rule allows
            assert (r - r0).abs().max() > 10 * (pt - r).abs().max(), f"{name}: g_lse too small to tell"


def test_flash_attention_return_lse_differentiates_both():
    """cupyflash.flash_attention(return_lse=True) under autograd gives the op's backward with dlse, bit for bit."""
    q, k, v, g = draw_inputs(2, 4, 2, 113, 203, 128, BF16, "transposed", seed_from("return-lse"))
    g_lse = torch.randn(2, 4, 113, device="cuda")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = cupyflash.flash_attention(*leaves, causal=True, return_lse=True)
    grads = torch.autograd.grad((out, lse), leaves, (g, g_lse))
    scale = 1.0 / math.sqrt(128)
    out2, lse2 = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, True)
    direct = torch.ops.cupyflash.flash_attn_bwd(g, q, k, v, None, out2, lse2, scale, True, dlse=g_lse)[:3]
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for name, a, b in zip(("dq", "dk", "dv"), grads, direct):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=2 * torch.finfo(BF16).eps * b.abs().max()), name
