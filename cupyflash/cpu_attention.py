"""Exact attention on the CPU, memory-efficient by chunking over keys (device-agnostic: the GPU tests run it in
fp32 on the GPU as their reference).

This is the CPU implementation of the ``cupyflash`` torch op: the same function as the CUDA kernels
(kernels_cu/scores.cuh), computed in fp32 (fp64 for fp64 inputs) with an online softmax over key chunks, so
memory grows with Nq·chunk rather than Nq·Nk. It lets the compile backend run and be tested without a GPU.

Semantics shared with the kernels:
- logits = scale · Q Kᵀ + attn_bias, or with a soft cap (FlashAttention-2's ``softcap``, Gemma 2's logit
  capping) softcap · tanh(scale · Q Kᵀ / softcap) + attn_bias: the bias is added after the cap;
- a bias at or below -1e30 (finfo.min of fp32/bf16, or -inf) masks its key:
  the logit becomes MASKED_LOGIT (-inf stays -inf), so beside any other key it gets weight 0 and a row masked
  only that way attends uniformly, as eager softmax does after finfo.min absorbs the score;
- key j is visible to query i iff i + diag - left <= j <= i + diag + right, diag = Nk - Nq (bottom-right
  aligned, as FlashAttention 2.1+); causal sets right = 0; -1 means unbounded;
- a query row that sees no key gives out = 0 and lse = +inf (FlashAttention's convention: the backward then
  recomputes P = exp(S - lse) = 0 for it);
- grouped-query attention: q has a multiple of k/v's heads, query head h uses K/V head h // group;
- dropout drops P after the softmax with the kernels' Philox4x32-10 words (`dropout_keep`), so CPU and GPU
  drop the same elements for the same seed.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

KEY_CHUNK = 1024
MASKED_BIAS = -1e30
MASKED_LOGIT = -4096.0 * math.log(2.0)  # the kernels' kMaskedLogit2 (log2 units) in natural units


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 numpy arrays holding 32-bit words (products of two words fit in 64 bits)."""
    mask = np.uint64(0xFFFFFFFF)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1


def dropout_keep(seed: int, dropout_p: float, batch: int, heads: int, rows, cols) -> torch.Tensor:
    """Bool (B, H, len(rows), len(cols)): True where the kernels keep P[b, h, row, col] for this seed."""
    threshold = min(0xFFFFFFFF, int((1.0 - dropout_p) * 2.0 ** 32))
    bh = np.arange(batch * heads, dtype=np.uint64).reshape(batch, heads, 1, 1)
    r = np.asarray(rows, dtype=np.uint64).reshape(1, 1, -1, 1)
    c = np.asarray(cols, dtype=np.uint64).reshape(1, 1, 1, -1)
    bh, r, c = np.broadcast_arrays(bh, r, c)
    x, y = _philox(c >> np.uint64(1), r, bh & np.uint64(0xFFFFFFFF), bh >> np.uint64(32),
                   seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    word = np.where((c & np.uint64(1)) == 1, y, x)
    return torch.from_numpy(word < np.uint64(threshold))


def _visible(n_q, n_k, j0, j1, causal, window, device):
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    rows = torch.arange(n_q, device=device).unsqueeze(1)  # (Nq, 1)
    cols = torch.arange(j0, j1, device=device).unsqueeze(0)  # (1, j1-j0)
    keep = torch.ones(n_q, j1 - j0, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= cols <= rows + (n_k - n_q) + right
    if left >= 0:
        keep &= cols >= rows + (n_k - n_q) - left
    return keep


def _chunk_logits(q, k, bias, scale, causal, window, j0, j1, softcap):
    """(logits, tanh) for keys [j0, j1) with the cap, bias and visibility applied, in the compute dtype; tanh is
    tanh(scale · q kᵀ / softcap), the backward's cap derivative 1 - tanh², or None without a cap."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    s = torch.matmul(q, k[..., j0:j1, :].transpose(-1, -2)) * scale  # (B, H, Nq, j1-j0)
    tanh = None
    if softcap > 0:
        tanh = torch.tanh(s / softcap)
        s = softcap * tanh
    if bias is not None:
        b = bias[..., j0:j1] if bias.shape[-1] != 1 else bias
        masked = torch.where(b == float("-inf"), torch.full_like(b, float("-inf")), torch.full_like(b, MASKED_LOGIT))
        s = torch.where(b <= MASKED_BIAS, masked, s + b)
    return s.masked_fill(~_visible(n_q, n_k, j0, j1, causal, window, q.device), float("-inf")), tanh


def _widen_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V heads repeated to the query heads (grouped-query attention)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _as_additive(attn_bias, dtype):
    """Boolean masks (True = keep, as SDPA) become additive 0 / -inf."""
    if attn_bias is None or attn_bias.dtype != torch.bool:
        return attn_bias
    zero, neg_inf = (torch.full((), x, dtype=dtype, device=attn_bias.device) for x in (0.0, float("-inf")))
    return torch.where(attn_bias, zero, neg_inf)


def forward(q, k, v, attn_bias, scale: float, causal: bool, window=(-1, -1), dropout_p: float = 0.0,
            seed: Optional[torch.Tensor] = None, *, softcap: float = 0.0):
    """Returns (out, lse): out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32. ``seed``: the dropout seed, a
    one-element int64 tensor (None without dropout)."""
    cdt = _compute_dtype(q.dtype)
    heads = q.shape[1]
    qc, kc, vc = q.to(cdt), _widen_kv(k, heads).to(cdt), _widen_kv(v, heads).to(cdt)
    bias = _as_additive(attn_bias, cdt)
    bias = None if bias is None else bias.to(cdt)
    n_q, n_k = q.shape[-2], k.shape[-2]
    m_i = torch.full((*q.shape[:2], n_q), float("-inf"), dtype=cdt, device=q.device)  # running max
    l_i = torch.zeros((*q.shape[:2], n_q), dtype=cdt, device=q.device)  # running sum (before dropout)
    acc = torch.zeros((*q.shape[:2], n_q, v.shape[-1]), dtype=cdt, device=q.device)
    philox_key = int(seed) if dropout_p > 0 else 0  # read from the seed tensor once
    for j0 in range(0, n_k, KEY_CHUNK):
        j1 = min(j0 + KEY_CHUNK, n_k)
        s, _ = _chunk_logits(qc, kc, bias, scale, causal, window, j0, j1, softcap)
        m_new = torch.maximum(m_i, s.amax(dim=-1))
        # A row that has seen only -inf keeps m = -inf; subtract 0 there to avoid (-inf) - (-inf) = nan.
        m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        alpha = torch.exp(m_i - m_safe)
        l_i = l_i * alpha + p.sum(dim=-1)
        if dropout_p > 0:
            p = p * dropout_keep(philox_key, dropout_p, q.shape[0], heads, range(n_q), range(j0, j1)).to(p.device)
        acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vc[..., j0:j1, :])
        m_i = m_new
    empty = l_i == 0
    norm = (l_i * (1.0 - dropout_p)).clamp_min(1e-38).unsqueeze(-1)
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(acc), acc / norm)
    lse = torch.where(empty, torch.full_like(m_i, float("inf")), m_i + torch.log(l_i.clamp_min(1e-38)))
    return out.to(q.dtype), lse.to(torch.float32)


def _sum_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Sums `t` over the dims where `shape` broadcasts (size 1), keeping them."""
    dims = [d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def backward(dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool, window=(-1, -1),
             dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None, bias_grad: bool = False, *,
             softcap: float = 0.0):
    """Returns (dq, dk, dv, dbias) recomputing P chunk by chunk from the saved lse (nothing N×N kept); dbias is
    shaped like attn_bias when bias_grad, else None."""
    cdt = _compute_dtype(q.dtype)
    heads = q.shape[1]
    qc, kc, vc = q.to(cdt), _widen_kv(k, heads).to(cdt), _widen_kv(v, heads).to(cdt)
    do, o = dout.to(cdt), out.to(cdt)
    bias = _as_additive(attn_bias, cdt)
    bias = None if bias is None else bias.to(cdt)
    n_q, n_k = q.shape[-2], k.shape[-2]
    lse_c = lse.to(cdt).unsqueeze(-1)  # (B, H, Nq, 1)
    d_i = (do * o).sum(dim=-1, keepdim=True)  # D = rowsum(dO ∘ O), (B, H, Nq, 1)
    # Contiguous whatever the inputs' strides, as the op promises.
    dq, dk, dv = (torch.zeros(t.shape, dtype=cdt, device=q.device) for t in (qc, kc, vc))
    dbias = torch.zeros(attn_bias.shape, dtype=cdt, device=q.device) if bias_grad else None
    philox_key = int(seed) if dropout_p > 0 else 0  # read from the seed tensor once
    for j0 in range(0, n_k, KEY_CHUNK):
        j1 = min(j0 + KEY_CHUNK, n_k)
        s, tanh = _chunk_logits(qc, kc, bias, scale, causal, window, j0, j1, softcap)
        p = torch.exp(s - lse_c)  # rows with lse = +inf give exactly 0
        dp = torch.matmul(do, vc[..., j0:j1, :].transpose(-1, -2))
        if dropout_p > 0:
            keep = dropout_keep(philox_key, dropout_p, q.shape[0], heads, range(n_q), range(j0, j1)).to(p.device)
            keep = keep / (1.0 - dropout_p)
            dv[..., j0:j1, :] = torch.matmul((p * keep).transpose(-1, -2), do)
            dp = dp * keep
        else:
            dv[..., j0:j1, :] = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (dp - d_i)  # dL/dlogits, which is also dL/dbias: the bias is added after the cap
        # d(softcap · tanh(x / softcap))/dx = 1 - tanh²
        ds_raw = ds if tanh is None else ds * (1.0 - tanh * tanh)
        dq += torch.matmul(ds_raw, kc[..., j0:j1, :]) * scale
        dk[..., j0:j1, :] = torch.matmul(ds_raw.transpose(-1, -2), qc) * scale
        if dbias is not None:
            ds_b = _sum_to_shape(ds, attn_bias.shape)
            if attn_bias.shape[-1] == 1:
                dbias += ds_b.sum(dim=-1, keepdim=True)
            else:
                dbias[..., j0:j1] += ds_b
    group = heads // k.shape[1]
    if group > 1:  # sum the gradients of the query heads that share a K/V head
        dk = dk.unflatten(1, (k.shape[1], group)).sum(2)  # (B, Hkv, Nk, D)
        dv = dv.unflatten(1, (v.shape[1], group)).sum(2)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if dbias is None else dbias.to(attn_bias.dtype))
