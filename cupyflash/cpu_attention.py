"""Exact attention on the CPU, memory-efficient by chunking over keys.

This is the CPU implementation of the ``cupyflash`` torch op: the same function as the CUDA kernels
(same masking rules, same LSE convention), computed in fp32 (fp64 for fp64 inputs) with an online
softmax over key chunks, so memory grows with Nq·chunk rather than Nq·Nk. It lets the compile backend
run and be tested on machines without a GPU.

Semantics shared with the kernels:
- scores S = scale · Q Kᵀ (+ attn_bias), causal masking aligned to the bottom-right corner
  (query i sees key j iff j <= i + Nk - Nq, as FlashAttention 2.1+);
- a query row that sees no key (all masked) gives out = 0 and lse = +inf (FlashAttention's convention:
  the backward then recomputes P = exp(S - lse) = 0 for it).
"""
from __future__ import annotations

import torch

KEY_CHUNK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_scores(q, k, bias, scale, causal, j0, j1, n_q, n_k):
    """Scaled scores for keys [j0, j1) with bias and causal mask applied, in the compute dtype."""
    s = torch.matmul(q, k[..., j0:j1, :].transpose(-1, -2)) * scale  # (B, H, Nq, j1-j0)
    if bias is not None:
        s = s + bias[..., j0:j1].to(s.dtype)
    if causal:
        rows = torch.arange(n_q).unsqueeze(1)  # (Nq, 1)
        cols = torch.arange(j0, j1).unsqueeze(0)  # (1, j1-j0)
        s = s.masked_fill(cols > rows + (n_k - n_q), float("-inf"))
    return s


def forward(q, k, v, attn_bias, scale: float, causal: bool):
    """Returns (out, lse): out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32."""
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    bias = None if attn_bias is None else attn_bias.to(cdt)
    n_q, n_k = q.shape[-2], k.shape[-2]
    batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    m_i = torch.full((*batch_shape, n_q), float("-inf"), dtype=cdt)  # running max
    l_i = torch.zeros((*batch_shape, n_q), dtype=cdt)  # running sum
    acc = torch.zeros((*batch_shape, n_q, v.shape[-1]), dtype=cdt)
    for j0 in range(0, n_k, KEY_CHUNK):
        j1 = min(j0 + KEY_CHUNK, n_k)
        s = _chunk_scores(qc, kc, bias, scale, causal, j0, j1, n_q, n_k)
        m_new = torch.maximum(m_i, s.amax(dim=-1))
        # A row that has seen only -inf keeps m = -inf; subtract 0 there to avoid (-inf) - (-inf) = nan.
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m_i - m_safe)
        l_i = l_i * alpha + p.sum(dim=-1)
        acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vc[..., j0:j1, :])
        m_i = m_new
    empty = l_i == 0
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(acc), acc / l_i.clamp_min(1e-38).unsqueeze(-1))
    lse = torch.where(empty, torch.full_like(m_i, float("inf")), m_i + torch.log(l_i.clamp_min(1e-38)))
    return out.to(q.dtype), lse.to(torch.float32)


def backward(dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool):
    """Returns (dq, dk, dv) recomputing P chunk by chunk from the saved lse (nothing N×N kept)."""
    cdt = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    do, o = dout.to(cdt), out.to(cdt)
    bias = None if attn_bias is None else attn_bias.to(cdt)
    n_q, n_k = q.shape[-2], k.shape[-2]
    lse_c = lse.to(cdt).unsqueeze(-1)  # (B, H, Nq, 1)
    d_i = (do * o).sum(dim=-1, keepdim=True)  # D = rowsum(dO ∘ O), (B, H, Nq, 1)
    dq = torch.zeros_like(qc)
    dk = torch.zeros(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + k.shape[-2:], dtype=cdt)
    dv = torch.zeros(torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]) + v.shape[-2:], dtype=cdt)
    for j0 in range(0, n_k, KEY_CHUNK):
        j1 = min(j0 + KEY_CHUNK, n_k)
        s = _chunk_scores(qc, kc, bias, scale, causal, j0, j1, n_q, n_k)
        p = torch.exp(s - lse_c)  # rows with lse = +inf give exactly 0
        dv[..., j0:j1, :] = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, vc[..., j0:j1, :].transpose(-1, -2))
        ds = p * (dp - d_i)
        dq += torch.matmul(ds, kc[..., j0:j1, :]) * scale
        dk[..., j0:j1, :] = torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
