"""Rows that see no key under a -inf mask: eager's NaN row and NaN gradients, beside the op's, with no host sync.

A mask that is no band reaches the op as a boolean keep-mask; its rows without a key are those where the op
returns lse = +inf (``lse_unseen``; the op's convention, CPU path and kernels alike). Filled with a finite value
they are uniform over all keys, which the op gives itself (its ``unseen_rows``, cupyflash/unseen_rows.py); filled
with -inf, eager's softmax gives NaN there and autograd spreads it: P's NaN row reaches dv_j = Σ_i P_ij dO_i for
every key (NaN · 0 is NaN, so whatever dO is) and, when the mask is added rather than filled (whose backward zeroes
the masked scores' gradient), dq_i and every dk_j through dS. ``nan_rows`` gives that row NaN with exactly those NaN
gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from cupyflash.cpu_attention import compute_dtype


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
