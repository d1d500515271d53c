"""The op on torch's own CPU flash-attention kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
backward), for the inputs where their results are ours: ``cpu_attention.route`` decides which, and builds the
``Plan`` run here. The results keep the op's contract and conventions (cpu_attention's docstring): out in q's
dtype, lse (B, H, Nq) fp32 in natural units, +inf for rows that see no key (torch's kernel gives lse 0 and out 0
there), so either backward can take the (out, lse) of either forward.

torch's ``is_causal`` is aligned to the top-left corner; our visibility is bottom-right aligned, optionally with a
right window. Query i then sees keys j <= i + offset, offset = Nk - Nq + right, which the plan expresses as at most
two kernel calls on slices: the rows [0, -offset) see no key; the keys [0, offset) are seen by every row (one
non-causal call); the next keys form a top-left causal block with the rows (one causal call). Two calls merge
through their lse as the online softmax merges key blocks, and the backward of each piece, given the merged out
and lse, is exactly its share of the gradients (P = exp(S - lse) and D = rowsum(dO ∘ O) are global).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Plan:
    """Query rows [0, row0) see no key; rows [row0, Nq) run one kernel call per piece (j0, j1, causal): keys
    [j0, j1), with torch's top-left causal mask over them when causal."""
    row0: int
    pieces: tuple
    # with a bias, per piece: (.., Nq - row0 or 1) bool, the rows whose keys there are all masked (torch's kernel
    # gives them lse 0, which must not enter the merge)
    no_key: Optional[tuple] = field(default=None, compare=False, repr=False)
    # (.., Nq) bool: rows masked only by biases <= MASKED_BIAS, which attend uniformly (cpu_attention computes
    # them; torch's kernel gives them P = 0 in the backward from our lse, their S being ~ -1e30 or below)
    chunked_rows: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)


def plan_for(n_q: int, n_k: int, band: tuple[int, int]) -> Optional[Plan]:
    """The Plan for our visibility rule, the (left, right) band around the bottom-right aligned diagonal
    (``cpu_attention.band``: causal applied), or None where torch's kernels cannot express it (a left window that
    bounds some row)."""
    left, right = band
    if 0 <= left < n_k - 1:  # left >= Nk - 1 lets the last row (and so every row) reach key 0: no bound
        return None
    if right < 0:
        return Plan(0, ((0, n_k, False),))
    offset = n_k - n_q + right  # query i sees keys j <= i + offset
    row0, j_causal, j_end = max(0, -offset), max(0, offset), min(n_k, offset + n_q)  # row0 < Nq as Nk > 0
    pieces = ((0, min(j_causal, n_k), False),) if j_causal > 0 else ()
    if j_end > j_causal:
        pieces += ((j_causal, j_end, True),)
    return Plan(row0, pieces)


def block_index(shape, rows, j0: int, j1: int) -> tuple:
    """The index of a bias-shaped tensor's rows (a slice or an index tensor) and keys [j0, j1), leaving its
    broadcast (size-1) dims whole."""
    return ..., rows if shape[-2] != 1 else slice(None), slice(j0, j1) if shape[-1] != 1 else slice(None)


def bias_block(t: Optional[torch.Tensor], rows, j0: int, j1: int) -> Optional[torch.Tensor]:
    return None if t is None else t[block_index(t.shape, rows, j0, j1)]


def row_max(bias: torch.Tensor, plan: Plan, n_q: int) -> list:
    """Per piece, (.., Nq - row0 or 1): the largest bias among the keys each of the plan's rows sees there (for a
    boolean mask, whether it sees a True). One pass over the bias per piece (three when causal)."""
    rows, n_rows = slice(plan.row0, None), n_q - plan.row0
    tops = []
    for j0, j1, causal in plan.pieces:
        b = bias_block(bias, rows, j0, j1)  # (.., n_rows or 1, j1-j0 or 1)
        if causal and b.shape[-1] != 1:  # top-left: row i sees keys j <= i
            later = torch.ones(n_rows, b.shape[-1], dtype=torch.bool, device=b.device).triu_(1)
            b = b.masked_fill(later, False if b.dtype == torch.bool else NEG_INF)
        tops.append(b.amax(dim=-1))
    return tops


def _unit_last(*tensors):
    """The tensors with a unit stride along D: torch's CPU flash kernels read D as contiguous whatever the strides
    (torch 2.13: a (B, H, D, N).transpose view gives wrong numbers, not an error; F.scaled_dot_product_attention
    copies before calling them)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def forward(q, k, v, bias: Optional[torch.Tensor], scale: float, plan: Plan):
    """(out, lse) in the op's contract. q, k, v: (B, H, N, D) in the compute dtype (fp32/fp64), k and v with q's
    heads; bias: additive in the compute dtype (route checked that it masks as ours, and found plan.no_key)."""
    q, k, v = _unit_last(q, k, v)
    rows = slice(plan.row0, None)
    q_rows = q[..., rows, :]  # (B, H, Nq - row0, D)
    outs, lses = [], []
    for i, (j0, j1, causal) in enumerate(plan.pieces):
        b = bias_block(bias, rows, j0, j1)
        o, l = _fwd(q_rows, k[..., j0:j1, :], v[..., j0:j1, :], 0.0, causal, attn_mask=b, scale=scale)
        if plan.no_key is not None:
            l = l.masked_fill(plan.no_key[i], NEG_INF)
        outs.append(o)
        lses.append(l)
    lse = lses[0] if len(lses) == 1 else torch.logaddexp(*lses)  # (B, H, Nq - row0)
    seen = lse > NEG_INF
    if len(outs) == 1:
        out_rows = outs[0]
    else:  # each piece's out is normalised by its own sum: weight it by its share exp(lse_piece - lse)
        lse_safe = torch.where(seen, lse, 0.0)
        out_rows = sum(o * torch.exp(l - lse_safe).unsqueeze(-1) for o, l in zip(outs, lses))
    lse_rows = torch.where(seen, lse, float("inf"))
    if plan.row0 == 0:
        return out_rows.contiguous(), lse_rows.to(torch.float32).contiguous()
    out = q.new_zeros(q.shape)
    out[..., rows, :] = out_rows
    lse_all = q.new_full(q.shape[:-1], float("inf"), dtype=torch.float32)
    lse_all[..., rows] = lse_rows
    return out, lse_all


def backward(dout, q, k, v, bias: Optional[torch.Tensor], out, lse, scale: float, plan: Plan):
    """(dq, dk, dv) contiguous, in the compute dtype, for q, k, v as forward takes them; lse: the op's (B, H, Nq)
    fp32 (+inf rows give P = 0 in torch's backward as in ours)."""
    dout, q, k, v, out = _unit_last(dout, q, k, v, out)
    rows = slice(plan.row0, None)
    args = (dout[..., rows, :], q[..., rows, :])
    saved = (out[..., rows, :], lse[..., rows].to(q.dtype))
    grads = [_bwd(*args, k[..., j0:j1, :], v[..., j0:j1, :], *saved, 0.0, causal,
                  attn_mask=bias_block(bias, rows, j0, j1), scale=scale) for j0, j1, causal in plan.pieces]
    if plan.row0 == 0 and len(plan.pieces) == 1 and plan.pieces[0][1] - plan.pieces[0][0] == k.shape[-2]:
        return tuple(g.contiguous() for g in grads[0])  # torch's come in its (B, N, H, D) layout
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype) for t in (q, k, v))  # keys no row sees get 0
    for (j0, j1, _), (g_q, g_k, g_v) in zip(plan.pieces, grads):
        dq[..., rows, :] += g_q
        dk[..., j0:j1, :] = g_k
        dv[..., j0:j1, :] = g_v
    return dq, dk, dv
