"""Rows that see no key: eager's exact output and gradients for them, beside the op's, with no host sync.

A site fused with causal/window flags and a per-key boolean mask can have query rows with no visible key (left
padding under a causal mask). Eager masks with a finite fill (``finfo.min``): such a row's scores are all
equal, so its softmax is uniform over all Nk keys and out_i = mean_j v_j = ō. The op returns 0 there. Autograd
of eager still reaches q and k through ``scores + mask`` (the fill absorbs the score's value, not its
derivative): with P_ij = 1/Nk,

    dS_ij = (dO_i·v_j − dO_i·ō) / Nk,   dq_i = scale · Σ_j dS_ij k_j,   dk_j += scale · Σ_i dS_ij q_i,
    dv_j += dO_i / Nk.

``uniform_rows`` gives these in O(N·D²): B_i = (scale / Nk) · q_iᵀ Kᵀ sg(V − ō) (sg: detach) has exactly those
derivatives in q and k, and corr_i = ō + B_i − sg(B_i) has the value ō. When eager
replaces the scores instead (``masked_fill`` / ``where``), no gradient reaches q or k from such a row: corr = ō.
The graph computes both and selects per row (``torch.where``); both functions are traced by AOT autograd.

A mask that is no band reaches the op as a boolean keep-mask; its rows without a key are those where the op
returns lse = +inf (``lse_unseen``; the op's convention, CPU path and kernels alike). Filled with a finite value
they are uniform as above; filled with -inf, eager's softmax gives NaN there and autograd spreads it: P's NaN row
reaches dv_j = Σ_i P_ij dO_i for every key (NaN · 0 is NaN, so whatever dO is) and, when the mask is added
rather than filled (whose backward zeroes the masked scores' gradient), dq_i and every dk_j through dS.
``nan_rows`` gives that row NaN with exactly those NaN gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from cupyflash.cpu_attention import compute_dtype


def unseen_rows(key_keep: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, causal: bool, window_left: int,
                window_right: int) -> torch.Tensor:
    """Bool (B', 1, Nq, 1): row i of batch b keeps no key under the op's band (bottom-right aligned, as the op)
    and ``key_keep`` (B', 1, 1, Nk), True = keep, B' = B or 1 (None: every key)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    diag = n_k - n_q
    right = 0 if causal else window_right
    # keep_count[..., t] = number of kept keys j < t, so the keys of [a, e) are keep_count[e] - keep_count[a].
    if key_keep is None:
        keep_count = torch.arange(n_k + 1, device=q.device).view(1, 1, 1, -1)  # (1, 1, 1, Nk + 1)
    else:
        counts = key_keep.to(torch.int32).cumsum(-1)  # (B', 1, 1, Nk)
        # cat, not F.pad: F.pad's trace specialized a dynamic Nk to its first value (one recompile per length).
        keep_count = torch.cat([torch.zeros_like(counts[..., :1]), counts], -1)  # (B', 1, 1, Nk + 1)
    rows = torch.arange(n_q, device=q.device)  # (Nq,)
    first = (rows + diag - window_left).clamp(0, n_k) if window_left >= 0 else torch.zeros_like(rows)
    end = (rows + diag + right + 1).clamp(0, n_k) if right >= 0 else torch.full_like(rows, n_k)
    end = torch.maximum(end, first)
    seen = keep_count[..., end] - keep_count[..., first]  # (B', 1, 1, Nq)
    return (seen == 0).transpose(-1, -2)  # (B', 1, Nq, 1)


def uniform_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unseen: torch.Tensor,
                 scale: float, through_scores: bool) -> torch.Tensor:
    """``out`` (B, H, Nq, D) with eager's uniform rows where ``unseen`` (broadcast to (B, H, Nq, 1)); q (B, H, Nq,
    D), k and v (B, Hkv, Nk, D) with Hkv dividing H (grouped-query attention: query heads h·G … h·G + G − 1 read
    K/V head h, as ``repeat_kv``/``repeat_interleave`` lay them out)."""
    group = q.shape[1] // k.shape[1]
    cdt = compute_dtype(q.dtype)
    v_bar = v.to(cdt).mean(-2, keepdim=True)  # (B, Hkv, 1, D)
    corr = v_bar.repeat_interleave(group, dim=1)  # (B, H, 1, D)
    # B_i - sg(B_i) is 0: only its gradient matters, so inference (and traced inference graphs) skip it.
    if through_scores and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        root = k.shape[-2] ** -0.5
        centred = ((v.to(cdt) - v_bar) * root).to(q.dtype).detach()  # (B, Hkv, Nk, D)
        corr = corr + _ScoresGradient.apply(q, k, centred, scale)
    return torch.where(unseen, corr.to(out.dtype), out)


class _ScoresGradient(torch.autograd.Function):
    """B − sg(B) for B = scale · Q M with M = Kᵀ C / √Nk per K/V head (C = (V − ō) / √Nk, a constant): the value 0,
    shaped like q, with B's derivatives in q and k (module docstring). Written out rather than traced through
    ``b - b.detach()``: the forward forms only M, not Q M (whose value is never used), and the backward reads q as
    the op saved it, not a grouped copy. Its GEMMs are O(N·D²) against attention's O(N²·D) and run in q's dtype on
    the tensor cores (fp32 accumulation): only gradients eager itself forms in that dtype come out of them. Both of
    M's factors carry 1/√Nk so its entries stay O(|k|·|v|), in fp16's range at any Nk."""

    @staticmethod
    def forward(ctx, q, k, centred, scale):
        m = (k * centred.shape[-2] ** -0.5).transpose(-1, -2) @ centred  # (B, Hkv, D, D)
        ctx.save_for_backward(q, centred, m)
        ctx.scale = scale
        return q.new_zeros(()).expand(q.shape)  # (B, H, Nq, D), no storage

    @staticmethod
    def backward(ctx, grad):
        q, centred, m = ctx.saved_tensors
        b, heads, n_q, d = q.shape
        kv_heads = centred.shape[1]
        grad = (ctx.scale * grad).to(q.dtype).reshape(b, kv_heads, heads // kv_heads * n_q, d)  # (B, Hkv, G·Nq, D)
        q_grouped = q.reshape(grad.shape)
        dq = (grad @ m.transpose(-1, -2)).reshape(q.shape)
        dm = q_grouped.transpose(-1, -2) @ grad  # (B, Hkv, D, D)
        dk = (centred @ dm.transpose(-1, -2)) * centred.shape[-2] ** -0.5  # (B, Hkv, Nk, D)
        return dq, dk, None, None


def lse_unseen(lse: torch.Tensor) -> torch.Tensor:
    """Bool (B, H, Nq, 1): the rows where the op saw no key, from its lse (B, H, Nq)."""
    return torch.isposinf(lse).unsqueeze(-1)


def nan_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unseen: torch.Tensor,
             through_scores: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` (B, H, Nq, D) with NaN in the rows where ``unseen`` (B, H, Nq, 1), whose gradient is NaN for every
    element of v (and with ``through_scores``, of k, of q's unseen rows and of those rows of an added ``bias`` that
    requires grad) of the heads with such a row, as eager's -inf mask gives; q (B, H, Nq, D), k and v (B, Hkv, Nk,
    D) with Hkv dividing H, bias broadcastable to (B, H, Nq, Nk)."""
    cdt = compute_dtype(q.dtype)
    total = v.to(cdt).sum((-2, -1), keepdim=True)  # (B, Hkv, 1, 1)
    if through_scores:
        total = total + k.to(cdt).sum((-2, -1), keepdim=True)
    total = total.repeat_interleave(q.shape[1] // total.shape[1], dim=1)  # (B, H, 1, 1)
    if through_scores:
        total = total + q.to(cdt).sum(-1, keepdim=True)  # (B, H, Nq, 1)
        if bias is not None and bias.requires_grad:
            total = total + bias.to(cdt).sum(-1, keepdim=True)
    # NaN only in unseen rows: elsewhere the factor is 0, so no NaN reaches the gradient of heads without one.
    nan = torch.zeros(unseen.shape, dtype=cdt, device=q.device).masked_fill(unseen, float("nan"))  # (B, H, Nq, 1)
    return torch.where(unseen, (nan * total).to(out.dtype), out)
