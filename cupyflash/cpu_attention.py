"""Exact attention on the CPU, memory-efficient (device-agnostic: the GPU tests run it in fp32 on the GPU as their
reference).

This is the CPU implementation of the ``cupyflash`` torch op: the same function as the CUDA kernels
(kernels_cu/scores.cuh), computed in fp32 (fp64 for fp64 inputs). ``route`` sends each call either to torch's own
CPU flash-attention kernels (``cpu_torch_kernels``: where their results are ours, they are ~10x faster) or to the
chunked online softmax here, whose memory grows with Nq·KEY_CHUNK rather than Nq·Nk. It lets the compile backend
run and be tested without a GPU.

Semantics shared with the kernels:
- logits = scale · Q Kᵀ + attn_bias, or with a soft cap (FlashAttention-2's ``softcap``, Gemma 2's logit
  capping) softcap · tanh(scale · Q Kᵀ / softcap) + attn_bias: the bias is added after the cap;
- a bias at or below -1e30 (finfo.min of fp32/bf16, or -inf) masks its key:
  the logit becomes MASKED_LOGIT (-inf stays -inf), so beside any other key it gets weight 0 and a row masked
  only that way attends uniformly, as eager softmax does after finfo.min absorbs the score; its gradient flows
  as eager's does through the score it replaced;
- key j is visible to query i iff i + diag - left <= j <= i + diag + right, diag = Nk - Nq (bottom-right
  aligned, as FlashAttention 2.1+); causal sets right = 0; -1 means unbounded;
- a query row that sees no key gives out = 0 and lse = +inf (FlashAttention's convention: the backward then
  recomputes P = exp(S - lse) = 0 for it);
- grouped-query attention: q has a multiple of k/v's heads, query head h uses K/V head h // group;
- dropout drops P after the softmax with the kernels' Philox4x32-7 words (`dropout_keep`), so CPU and GPU
  drop the same elements for the same seed.

The backward's P, and rows masked only by biases <= -1e30 (the "rebuild rule"): the backward recomputes
P = exp(S - lse) from the saved lse, except in rows whose saved lse is below LSE_REBUILD = MASKED_LOGIT / 2
(-2048 in the kernels' log2 units). There it recomputes the row's max m and sum l = sum_j exp(S_j - m) over all
its keys (exactly as the forward does, before the backward's key loop) and uses P = exp(S - m) / l. Why: a row
masked only by such biases has every visible logit equal to MASKED_LOGIT, so lse = MASKED_LOGIT + log(n) (n
keys) ~ -2839, which fp32 holds only to 2^-12 absolute: exp(S - lse) would be 1/n only to ~2.4e-4 relative,
and such rows' gradients (left padding with a causal mask written as finfo.min, what transformers builds) would
exceed the tolerance rule. With m = MASKED_LOGIT and l = n kept apart, S - m = 0 exactly and P = 1/n to fp32
rounding. The lse saved by the forward is unchanged (still MASKED_LOGIT + log(n) for such rows, +inf for rows
without keys), so (out, lse) stays the op's contract; a row with real logits has lse >= its largest logit, far
above LSE_REBUILD, and even if not, exp(S - m) / l is that row's P too. A row whose every key has a large finite
bias (-1e9) needs the rule most: its logits round to one value and lse = m + log(n) rounds back to m, so
exp(S - lse) would be 1, not 1/n. The CUDA backward applies the rule in calls with an added bias (only a finite
bias gives such rows exact logits; without one the logits' own rounding is as large as the lse's, and a boolean
mask's -inf leaves a row real logits or none): a stats pass of the forward
kernel (kernels_cu/flash_fwd.cuh) writes those rows' (m, log2 l) for the backward kernels (cupyflash/plan.py),
unless launch.LSE_REBUILD_ENV is "0".
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import cpu_torch_kernels
from .cpu_torch_kernels import bias_block, block_index
from .params import keep_probability, keep_threshold

KEY_CHUNK = 1024
MASKED_BIAS = -1e30
MASKED_LOGIT = -4096.0 * math.log(2.0)  # the kernels' kMaskedLogit2 (log2 units) in natural units
LSE_REBUILD = MASKED_LOGIT / 2  # rows with a saved lse below it get P from their recomputed m and l (see above)
NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32 (what the kernels accumulate in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


PHILOX_ROUNDS = 7  # kernels_cu/scores.cuh kPhiloxRounds


def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-7 (kernels_cu/scores.cuh kPhiloxRounds) on uint64 numpy arrays holding 32-bit words (products of two
    words fit in 64 bits)."""
    mask = np.uint64(0xFFFFFFFF)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(PHILOX_ROUNDS):
        p0, p1 = c0 * np.uint64(0xD2511F53), c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def dropout_keep(seed: int, dropout_p: float, batch: int, heads: int, rows, cols) -> torch.Tensor:
    """Bool (B, H, len(rows), len(cols)): True where the kernels keep P[b, h, row, col] for this seed."""
    threshold = keep_threshold(dropout_p)
    bh = np.arange(batch * heads, dtype=np.uint64).reshape(batch, heads, 1, 1)
    r = np.asarray(rows, dtype=np.uint64).reshape(1, 1, -1, 1)
    c = np.asarray(cols, dtype=np.uint64).reshape(1, 1, 1, -1)
    bh, r, c = np.broadcast_arrays(bh, r, c)
    # One Philox call per group {row, row + 8} x {col, col + 1, col + 8, col + 9, col + 16, ..., col + 25}
    # (kernels_cu/scores.cuh random_group): the group's index drops bit 3 of the row and bits 0, 3 and 4 of the
    # column; bit 3 of the row and of the column pick the element's word, bit 4 and bit 0 of the column its byte.
    one, two, three, four, five, seven, eight = (np.uint64(n) for n in (1, 2, 3, 4, 5, 7, 8))
    group_row, group_col = (r >> four) << three | r & seven, (c >> five) << two | (c & seven) >> one
    words = _philox(group_col, group_row, bh & np.uint64(0xFFFFFFFF), bh >> np.uint64(32),
                    seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    word = np.choose(((c >> three & one) << one | r >> three & one).astype(np.intp), words)
    number = word >> (((c >> four & one) << one | c & one) * eight) & np.uint64(0xFF)
    return torch.from_numpy(number < np.uint64(threshold))


def _widen_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """K/V heads repeated to the query heads (grouped-query attention)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _as_additive(attn_bias, dtype):
    """Boolean masks (True = keep, as SDPA) become additive 0 / -inf."""
    if attn_bias is None or attn_bias.dtype != torch.bool:
        return attn_bias
    zero, neg_inf = (torch.full((), x, dtype=dtype, device=attn_bias.device) for x in (0.0, float("-inf")))
    return torch.where(attn_bias, zero, neg_inf)


def band(causal: bool, window) -> tuple[int, int]:
    """(left, right) of the keys each query sees around its diagonal, -1 unbounded: causal is a right edge of 0
    (tighter than any right window)."""
    left, right = window
    return left, 0 if causal else right


def _same_head_dims(q, v) -> bool:
    """torch's CPU kernels take one head dim for q, k and v; a v with its own (SDPA allows it) runs here."""
    return q.shape[-1] == v.shape[-1]


def route(q: torch.Tensor, k: torch.Tensor, attn_bias: Optional[torch.Tensor], causal: bool, window,
          dropout_p: float, softcap: float, bias_grad: bool = False,
          lse: Optional[torch.Tensor] = None) -> Optional[cpu_torch_kernels.Plan]:
    """Where a call runs: a Plan for torch's CPU kernels (cpu_torch_kernels), or None for the chunked path here.

    torch's kernels compute softmax(scale · Q Kᵀ + mask) V with a top-left causal flag and give out and lse;
    a call goes there only where that is our function to rounding. Each case, in order:
    - not on the CPU: they are CPU kernels (the GPU tests run the chunked path on CUDA as their fp32 reference);
    - dropout: the kernels must drop what the CUDA kernels drop, our Philox stream, not torch's generator;
    - soft cap: torch's kernels have none;
    - the bias gradient (backward): torch's backward gives none;
    - an empty dimension: the chunked path gives the empty/zero results without special cases;
    - windows: bottom-right causal and right windows become slices of top-left causal calls
      (cpu_torch_kernels.plan_for); a left window that bounds some row cannot be expressed;
    - an additive bias with values <= MASKED_BIAS other than -inf: ours sets those logits to MASKED_LOGIT, where
      torch's kernel adds the bias to the score. Beside a key above MASKED_BIAS both give them weight 0
      (exp(-1e30 - m) = 0): key padding, right padding, causal masks written in finfo.min. A row that sees
      keys above -inf but none above MASKED_BIAS attends uniformly in ours (left padding with a causal mask
      in finfo.min, as transformers builds it), unevenly or with lse ~ -3e38 in torch's: those rows
      (plan.chunked_rows) are computed here, the rest by torch's kernels, unless they are over half the rows
      (then all here: cheaper);
    - rows under the rebuild rule (saved lse < LSE_REBUILD, see the module docstring) other than chunked_rows:
      torch's backward takes P from the lse. The forward checks its result the same way: a row whose real
      logits are all below LSE_REBUILD would give keys masked to MASKED_LOGIT some weight in ours, none in
      torch's;
    - everything else goes to torch's kernels: boolean masks (as 0/-inf), additive biases (rows whose keys are
      all -inf get out 0, lse +inf as ours), grouped-query K/V (widened to q's heads), fp16/bf16 (computed
      in fp32 as here), fp32 and fp64.
    """
    if q.device.type != "cpu" or dropout_p > 0 or softcap > 0 or bias_grad:
        return None
    if min(q.shape) == 0 or min(k.shape) == 0:
        return None
    n_q = q.shape[-2]
    plan = cpu_torch_kernels.plan_for(n_q, k.shape[-2], band(causal, window))
    if plan is not None and attn_bias is not None:
        tops = cpu_torch_kernels.row_max(attn_bias, plan, n_q)  # per piece, (.., Nq - row0 or 1)
        is_bool = attn_bias.dtype == torch.bool
        plan = dataclasses.replace(plan, no_key=tuple(~t if is_bool else t == NEG_INF for t in tops))
        top = functools.reduce(torch.maximum, tops)
        uniform = None if is_bool else (top <= MASKED_BIAS) & (top > NEG_INF)
        if uniform is not None and bool(uniform.any()):
            uniform = torch.nn.functional.pad(uniform.expand(*uniform.shape[:-1], n_q - plan.row0), (plan.row0, 0))
            if 2 * _count(_union_rows(uniform)) > n_q:
                return None
            plan = dataclasses.replace(plan, chunked_rows=uniform)
    if plan is not None and lse is not None and under_rebuild_rule(lse, plan):
        return None
    return plan


def under_rebuild_rule(lse: torch.Tensor, plan: cpu_torch_kernels.Plan) -> bool:
    """Whether a row outside plan.chunked_rows has its P rebuilt from its recomputed max and sum (module
    docstring): route's case."""
    rebuild = lse < LSE_REBUILD
    if plan.chunked_rows is not None:
        rebuild &= ~plan.chunked_rows
    return bool(rebuild.any())


def _union_rows(rows: torch.Tensor):
    """The rows set in some batch or head of a (.., Nq) bool: a slice when they are consecutive (left padding:
    indexing by a slice is a view, by an index tensor a gather), else an index tensor (R,)."""
    index = rows.reshape(-1, rows.shape[-1]).any(dim=0).nonzero().squeeze(1)
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == len(index) else index


def _count(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


@dataclass
class _Inputs:
    """A call's inputs as the chunked path reads them: compute dtype, K/V widened to q's heads, the bias additive
    with its masked keys found once (not per chunk)."""
    q: torch.Tensor  # (B, H, Nq, D)
    k: torch.Tensor  # (B, H, Nk, D)
    v: torch.Tensor  # (B, H, Nk, D)
    bias: Optional[torch.Tensor]  # additive, broadcastable to (B, H, Nq, Nk)
    masked: Optional[torch.Tensor]  # bool, bias-shaped: bias <= MASKED_BIAS (None if nowhere)
    masked_logit: Optional[torch.Tensor]  # bias-shaped: MASKED_LOGIT, or -inf where the bias is -inf
    scale: float
    softcap: float
    left: int  # the window, causal applied: -1 unbounded
    right: int

    @property
    def diag(self) -> int:
        return self.k.shape[-2] - self.q.shape[-2]


def _prepare(q, k, v, attn_bias, scale, causal, window, softcap, plan) -> _Inputs:
    """``plan``: route's, None when everything runs on the chunked path (torch's kernels need no masked keys found,
    only the rows the chunked path computes beside them)."""
    chunked = plan is None or plan.chunked_rows is not None
    cdt = compute_dtype(q.dtype)
    heads = q.shape[1]
    bias = _as_additive(attn_bias, cdt)
    bias = None if bias is None else bias.to(cdt)
    masked = masked_logit = None
    # Only the chunked path replaces logits: in torch's kernels, route checked that keys masked so get weight 0.
    if bias is not None and chunked:
        masked = bias <= MASKED_BIAS
        if bool(masked.any()):
            masked_logit = torch.full_like(bias, MASKED_LOGIT).masked_fill_(bias == NEG_INF, NEG_INF)
        else:
            masked = None
    left, right = band(causal, window)
    return _Inputs(q.to(cdt), _widen_kv(k, heads).to(cdt), _widen_kv(v, heads).to(cdt), bias, masked, masked_logit,
                   scale, softcap, left, right)


def _rows_seeing(x: _Inputs, j0: int, j1: int) -> tuple[int, int]:
    """[r0, r1): the query rows that see some key of [j0, j1) (none when r0 >= r1)."""
    r0 = 0 if x.right < 0 else max(0, j0 - x.diag - x.right)
    r1 = x.q.shape[-2] if x.left < 0 else min(x.q.shape[-2], j1 - x.diag + x.left)
    return r0, r1


def _hide_invisible(x: _Inputs, s: torch.Tensor, rows, j0: int, j1: int) -> None:
    """Sets the logits s (B, H, R, j1-j0) of query rows ``rows`` (a slice or an index tensor) to -inf where the key
    is not visible. Of a slice, only the rows that miss some key of the chunk are touched (when causal, the
    chunk's diagonal block), not the ones that see it whole."""
    if isinstance(rows, torch.Tensor):
        spans = [(rows, s)]
    else:
        r0, r1 = rows.start, rows.stop
        bounds = []
        if x.right >= 0:  # rows before i = j1 - 1 - diag - right miss the chunk's last keys
            bounds.append((r0, min(r1, j1 - 1 - x.diag - x.right)))
        if x.left >= 0:  # rows after i = j0 + left - diag miss its first keys
            bounds.append((max(r0, j0 + x.left - x.diag + 1), r1))
        spans = [(torch.arange(a, b, device=s.device), s[..., a - r0:b - r0, :]) for a, b in bounds if a < b]
    cols = torch.arange(j0, j1, device=s.device)  # (j1-j0,)
    for ids, part in spans:
        first = ids.unsqueeze(1) + x.diag  # (R', 1): the key on each row's diagonal
        hidden = torch.zeros(len(ids), j1 - j0, dtype=torch.bool, device=s.device)
        if x.right >= 0:
            hidden |= cols > first + x.right
        if x.left >= 0:
            hidden |= cols < first - x.left
        part.masked_fill_(hidden, NEG_INF)


def _logits(x: _Inputs, rows, j0: int, j1: int):
    """(logits, tanh) of query rows ``rows`` (a slice or an index tensor) and keys [j0, j1), with the cap, bias and
    visibility applied; tanh is tanh(scale · q kᵀ / softcap), the backward's cap derivative 1 - tanh², or None
    without a cap."""
    s = torch.matmul(x.q[..., rows, :], x.k[..., j0:j1, :].transpose(-1, -2))  # (B, H, R, j1-j0)
    s.mul_(x.scale)
    tanh = None
    if x.softcap > 0:
        tanh = torch.tanh(s / x.softcap)
        s = torch.mul(tanh, x.softcap)
    if x.bias is not None:
        s.add_(bias_block(x.bias, rows, j0, j1))
        if x.masked is not None:
            s = torch.where(bias_block(x.masked, rows, j0, j1), bias_block(x.masked_logit, rows, j0, j1), s)
    _hide_invisible(x, s, rows, j0, j1)
    return s, tanh


def _online_step(m_old: torch.Tensor, s: torch.Tensor):
    """One key chunk of the online softmax: (p, alpha, m_new) with p = exp(s - m_new) computed in s's memory and
    alpha = exp(m_old - m_new), the rescale of what was summed before."""
    m_new = torch.maximum(m_old, s.amax(dim=-1))
    # A row that has seen only -inf keeps m = -inf; subtract 0 there to avoid (-inf) - (-inf) = nan.
    m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)
    p = s.sub_(m_safe.unsqueeze(-1)).exp_()
    return p, torch.exp(m_old - m_safe), m_new


def _key_chunks(x: _Inputs):
    """(j0, j1, rows): each key chunk with the slice of query rows that see some of its keys (a causal or
    windowed call skips the rest: half the work when causal)."""
    n_k = x.k.shape[-2]
    for j0 in range(0, n_k, KEY_CHUNK):
        j1 = min(j0 + KEY_CHUNK, n_k)
        r0, r1 = _rows_seeing(x, j0, j1)
        if r0 < r1:
            yield j0, j1, slice(r0, r1)


def forward(q, k, v, attn_bias, scale: float, causal: bool, window=(-1, -1), dropout_p: float = 0.0,
            seed: Optional[torch.Tensor] = None, *, softcap: float = 0.0):
    """Returns (out, lse): out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32. ``seed``: the dropout seed, a
    one-element int64 tensor (None without dropout)."""
    plan = route(q, k, attn_bias, causal, window, dropout_p, softcap) if _same_head_dims(q, v) else None
    x = _prepare(q, k, v, attn_bias, scale, causal, window, softcap, plan)
    if plan is not None:
        out, lse = cpu_torch_kernels.forward(x.q, x.k, x.v, x.bias, scale, plan)
        if plan.chunked_rows is not None:
            rows = _union_rows(plan.chunked_rows)
            m, l, acc = _row_softmax(x, rows, with_v=True)  # (B, H, R), (B, H, R), (B, H, R, D)
            sel = plan.chunked_rows[..., rows]  # (.., R)
            out[..., rows, :] = torch.where(sel.unsqueeze(-1), acc / l.clamp_min(1.0).unsqueeze(-1), out[..., rows, :])
            lse[..., rows] = torch.where(sel, (m + torch.log(l)).float(), lse[..., rows])
        if not under_rebuild_rule(lse, plan):  # route's case, which only the result can tell
            return out.to(q.dtype), lse
        x = _prepare(q, k, v, attn_bias, scale, causal, window, softcap, None)
    shape = x.q.shape[:-1]  # (B, H, Nq)
    m_i = torch.full(shape, NEG_INF, dtype=x.q.dtype, device=q.device)  # running max
    l_i = torch.zeros(shape, dtype=x.q.dtype, device=q.device)  # running sum (before dropout)
    acc = torch.zeros((*shape, v.shape[-1]), dtype=x.q.dtype, device=q.device)
    philox_key = int(seed) if dropout_p > 0 else 0  # read from the seed tensor once
    for j0, j1, rows in _key_chunks(x):
        s, _ = _logits(x, rows, j0, j1)
        p, alpha, m_i[..., rows] = _online_step(m_i[..., rows], s)
        l_i[..., rows] = l_i[..., rows] * alpha + p.sum(dim=-1)
        if dropout_p > 0:
            keep = dropout_keep(philox_key, dropout_p, q.shape[0], q.shape[1], range(rows.start, rows.stop),
                                range(j0, j1))
            p.mul_(keep.to(p.device))
        acc[..., rows, :].mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p, x.v[..., j0:j1, :]))
    empty = l_i == 0
    norm = (l_i * keep_probability(dropout_p)).clamp_min(1e-38).unsqueeze(-1)
    out = torch.where(empty.unsqueeze(-1), 0.0, acc / norm)
    lse = torch.where(empty, float("inf"), m_i + torch.log(l_i.clamp_min(1e-38)))
    return out.to(q.dtype), lse.to(torch.float32)


def _all_key_chunks(x: _Inputs, rows):
    """(j0, j1, rows) for every key chunk, with the same rows (a slice or an index tensor; not restricted)."""
    for j0 in range(0, x.k.shape[-2], KEY_CHUNK):
        yield j0, min(j0 + KEY_CHUNK, x.k.shape[-2]), rows


def _row_softmax(x: _Inputs, rows, with_v: bool):
    """(m, l, acc) of query rows ``rows`` (a slice or an index tensor) over all keys: their max logit and sum of
    exp(S - m), each (B, H, R), and with_v the sum of exp(S - m) V, (B, H, R, D) (None without)."""
    m = torch.full((*x.q.shape[:2], _count(rows)), NEG_INF, dtype=x.q.dtype, device=x.q.device)  # (B, H, R)
    l = torch.zeros_like(m)
    acc = x.q.new_zeros((*m.shape, x.v.shape[-1])) if with_v else None
    for j0, j1, _ in _all_key_chunks(x, rows):
        p, alpha, m = _online_step(m, _logits(x, rows, j0, j1)[0])
        l = l * alpha + p.sum(dim=-1)
        if with_v:
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, x.v[..., j0:j1, :])
    return m, l, acc


def _softmax_shift(x: _Inputs, lse: torch.Tensor):
    """(shift, inv_l), each (B, H, Nq, 1) in the compute dtype, with P = exp(S - shift) · inv_l: shift = lse
    and no inv_l (None) for every row, except the rows of the rebuild rule (module docstring) when some are
    there: shift = m and inv_l = 1/l from an exact recomputation of those rows' max and sum."""
    shift = lse.to(x.q.dtype).unsqueeze(-1)
    rebuild = lse < LSE_REBUILD  # (B, H, Nq)
    if not bool(rebuild.any()):
        return shift, None
    rows = _union_rows(rebuild)
    m, l, _ = _row_softmax(x, rows, with_v=False)  # (B, H, R) each
    shift, inv_l = shift.clone(), torch.ones_like(shift)  # shift may be the caller's lse itself
    sel = rebuild[..., rows].unsqueeze(-1)  # (B, H, R, 1)
    shift[..., rows, :] = torch.where(sel, m.unsqueeze(-1), shift[..., rows, :])
    inv_l[..., rows, :] = torch.where(sel, 1.0 / l.unsqueeze(-1), 1.0)
    return shift, inv_l


def _sum_to_shape(t: torch.Tensor, shape) -> torch.Tensor:
    """Sums `t` over the dims where `shape` broadcasts (size 1), keeping them."""
    dims = [d for d, n in enumerate(shape) if n == 1 and t.shape[d] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def backward(dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool, window=(-1, -1),
             dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None, bias_grad: bool = False, *,
             softcap: float = 0.0, dlse: Optional[torch.Tensor] = None):
    """Returns (dq, dk, dv, dbias) recomputing P chunk by chunk from the saved lse (nothing N×N kept); dbias is
    shaped like attn_bias when bias_grad, else None. (out, lse) may come from either forward path. ``dlse``: the
    gradient reaching lse, or None (torch's kernels take none: such a call runs chunked)."""
    plan = (route(q, k, attn_bias, causal, window, dropout_p, softcap, bias_grad, lse)
            if _same_head_dims(q, v) and dlse is None else None)
    x = _prepare(q, k, v, attn_bias, scale, causal, window, softcap, plan)
    do, o = dout.to(x.q.dtype), out.to(x.q.dtype)
    if plan is not None:
        # plan.chunked_rows get P = 0 in torch's backward (S ~ -1e30 or below, lse ~ MASKED_LOGIT): add theirs
        dq, dk, dv = cpu_torch_kernels.backward(do, x.q, x.k, x.v, x.bias, o, lse, scale, plan)
        if plan.chunked_rows is not None:
            rows = _union_rows(plan.chunked_rows)
            parts = _chunked_backward(x, do, o, lse, None, 0.0, None, False, rows=(rows, plan.chunked_rows))
            dq, dk, dv = (a + b for a, b in zip((dq, dk, dv), parts))
        dbias = None
    else:
        dq, dk, dv, dbias = _chunked_backward(x, do, o, lse, attn_bias, dropout_p, seed, bias_grad, dlse=dlse)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # sum the gradients of the query heads that share a K/V head
        dk = dk.unflatten(1, (k.shape[1], group)).sum(2)  # (B, Hkv, Nk, D)
        dv = dv.unflatten(1, (v.shape[1], group)).sum(2)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if dbias is None else dbias.to(attn_bias.dtype))


def _chunked_backward(x: _Inputs, do, o, lse, attn_bias, dropout_p, seed, bias_grad, rows=None, dlse=None):
    """(dq, dk, dv, dbias) in the compute dtype with dk, dv for q's heads. ``rows``: (rows as _union_rows gives
    them, selected (.., Nq) bool) to take only the selected rows' share (no dropout, no bias gradient), or None
    for all."""
    d_i = (do * o).sum(dim=-1, keepdim=True)  # D = rowsum(dO ∘ O), (B, H, Nq, 1)
    if dlse is not None:  # dLSE_i / dS_ij = P_ij: the LSE's gradient enters dS = P ∘ (dP - D) as D - dLSE
        d_i = d_i - dlse.unsqueeze(-1).to(d_i.dtype)
    shift, inv_l = _softmax_shift(x, lse)
    chunks = _key_chunks(x)
    if rows is not None:
        some, selected = rows
        inv_l = torch.where(selected.unsqueeze(-1), 1.0 if inv_l is None else inv_l, 0.0)  # P = 0 elsewhere
        chunks = _all_key_chunks(x, some)
    # Contiguous whatever the inputs' strides, as the op promises.
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (x.q, x.k, x.v))
    dbias = torch.zeros(attn_bias.shape, dtype=x.q.dtype, device=x.q.device) if bias_grad else None
    philox_key = int(seed) if dropout_p > 0 else 0  # read from the seed tensor once
    batch, heads = x.q.shape[:2]
    for j0, j1, rows in chunks:
        s, tanh = _logits(x, rows, j0, j1)
        p = s.sub_(shift[..., rows, :]).exp_()  # rows with lse = +inf give exactly 0
        if inv_l is not None:
            p.mul_(inv_l[..., rows, :])
        do_r = do[..., rows, :]
        dp = torch.matmul(do_r, x.v[..., j0:j1, :].transpose(-1, -2))
        if dropout_p > 0:
            keep = dropout_keep(philox_key, dropout_p, batch, heads, range(rows.start, rows.stop), range(j0, j1))
            keep = keep.to(p.device) / keep_probability(dropout_p)
            dv[..., j0:j1, :] += torch.matmul((p * keep).transpose(-1, -2), do_r)
            dp.mul_(keep)
        else:
            dv[..., j0:j1, :] += torch.matmul(p.transpose(-1, -2), do_r)
        ds = p.mul_(dp.sub_(d_i[..., rows, :]))  # dL/dlogits, which is also dL/dbias: the bias is added after the cap
        # d(softcap · tanh(x / softcap))/dx = 1 - tanh²
        ds_raw = ds if tanh is None else ds * (1.0 - tanh * tanh)
        dq[..., rows, :] += torch.matmul(ds_raw, x.k[..., j0:j1, :]).mul_(x.scale)
        dk[..., j0:j1, :] += torch.matmul(ds_raw.transpose(-1, -2), x.q[..., rows, :]).mul_(x.scale)
        if dbias is not None:  # _sum_to_shape sums over the bias's broadcast dims, keys and rows included
            dbias[block_index(dbias.shape, rows, j0, j1)] += _sum_to_shape(ds, attn_bias.shape)
    return dq, dk, dv, dbias
