"""Rows that see no key, as eager attention gives them under a finite mask fill: the op's ``unseen_rows`` option.

The attention kernels return such a row as 0 with lse = +inf (the op's convention). Eager masks with a finite fill
(``finfo.min``): the row's scores are then all equal, so its softmax is uniform over all Nk keys and
out_i = mean_j v_j = v̄. Its gradients, with P_ij = 1/Nk:

    dv_j += dO_i / Nk                                              (UNIFORM and UNIFORM_SCORES)
    dS_ij = (dO_i·v_j − dO_i·v̄) / Nk = dO_i·c_j / Nk,  c_j = v_j − v̄   (UNIFORM_SCORES only)
    dq_i = scale · Σ_j dS_ij k_j = scale · dO_i M,  M = Cᵀ K / Nk
    dk_j += scale · Σ_i dS_ij q_i = (scale / Nk) · GQᵀ c_j,  GQ = Σ_i dO_i ⊗ q_i

UNIFORM: eager replaced the scores (``masked_fill`` / ``where``), so no gradient reaches q or k from the row;
UNIFORM_SCORES: eager added the fill to the scores (whose gradient passes through the add). Sums over the K/V
head's unseen rows of all its query heads (grouped-query attention). Every term is O(N·D²), done after the attention
kernels, in place on the op's own outputs: on CUDA by kernels_cu/unseen_rows.cuh, whose launches end at once for a
(batch, K/V head) with no such row (no host synchronisation); on the CPU by the same formulas in torch.
"""
from __future__ import annotations

import functools
import math

import torch

from . import jit, launch, params
from .array_ops import ops_for
from .cpu_attention import compute_dtype
from .params import Buf, Slot
from .plan import Step

UNIFORM, UNIFORM_SCORES = 1, 2
MODES = (0, UNIFORM, UNIFORM_SCORES)
THREADS = 256  # kernels_cu/unseen_rows.cuh kUnseenThreads
ROWS_PER_BLOCK = 128  # ... kUnseenRowsPerBlock
SUM_ROWS = 256  # ... kUnseenSumRows
KEYS_PER_BLOCK = 128  # ... kUnseenKeysPerBlock
KV_KEYS = 64  # ... kUnseenKvKeys
FLAG_ROWS = 4 * THREADS  # unseen_flags: lse values per thread block
MAX_HEAD_DIM = 256  # the kernels' shared-memory rows


def check_mode(mode: int, dropout_p: float = 0.0) -> None:
    if mode not in MODES:
        raise ValueError(f"unseen_rows is {mode!r}; expected 0 (rows without keys give 0), {UNIFORM} (uniform over "
                         f"all keys) or {UNIFORM_SCORES} (uniform, with the scores' gradient)")
    if mode and dropout_p > 0:
        raise ValueError(f"unseen_rows is {mode} with dropout_p {dropout_p}: eager would drop a uniform row's "
                         "probabilities too; expected unseen_rows 0 with dropout")


def fill(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor, mode: int) -> None:
    """Writes v̄ (of the row's K/V head) into the rows of `out` (B, H, Nq, Dv) whose `lse` (B, H, Nq) is +inf;
    `mode` one of MODES (check_mode)."""
    if not mode or out.numel() == 0 or v.shape[2] == 0:  # no key: eager's row of an empty softmax is 0, as ours
        return
    if _on_cuda(out):
        _launch("fwd", mode, dict(out=out, v=v, lse=lse), out.shape[:3] + (0,), v, 1.0)
        return
    rows = torch.isposinf(lse).unsqueeze(-1)  # (B, H, Nq, 1)
    v_bar = _grouped(v.to(compute_dtype(v.dtype)).mean(-2, keepdim=True), out.shape[1])  # (B, H, 1, Dv)
    out.copy_(torch.where(rows, v_bar.to(out.dtype), out))


def backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dout: torch.Tensor, q: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, scale: float, mode: int) -> None:
    """Adds the unseen rows' gradients (module docstring) to the op's dq, dk, dv in place."""
    if not mode or q.numel() == 0 or v.shape[2] == 0:
        return
    if _on_cuda(q):
        _launch("bwd", mode, dict(q=q, k=k, v=v, dout=dout, dq=dq, dk=dk, dv=dv, lse=lse), q.shape, v, scale)
        return
    cdt = compute_dtype(q.dtype)
    batch, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    rows = torch.isposinf(lse).unsqueeze(-1)  # (B, H, Nq, 1)
    g = torch.where(rows, dout.to(cdt), 0).reshape(batch, kv_heads, -1, dout.shape[-1])  # (B, Hkv, G·Nq, Dv)
    dv.copy_(dv.to(cdt) + g.sum(-2, keepdim=True) / n_k)
    if mode != UNIFORM_SCORES:
        return
    v32, k32 = v.to(cdt), k.to(cdt)
    c = v32 - v32.mean(-2, keepdim=True)  # (B, Hkv, Nk, Dv)
    q_rows = torch.where(rows, q.to(cdt), 0).reshape(batch, kv_heads, -1, d)  # (B, Hkv, G·Nq, D)
    gq = g.transpose(-1, -2) @ q_rows  # (B, Hkv, Dv, D)
    dk.copy_(dk.to(cdt) + (scale / n_k) * (c @ gq))
    m = c.transpose(-1, -2) @ k32 / n_k  # (B, Hkv, Dv, D)
    dq_rows = (scale * (g @ m)).reshape(batch, heads, n_q, d)
    dq.copy_(torch.where(rows, dq_rows.to(dq.dtype), dq))


def _on_cuda(t: torch.Tensor) -> bool:
    """Whether the kernels run (benchmarks/host_overhead.py's CPU stub sends CPU tensors to them too)."""
    return t.device.type == "cuda"


def _grouped(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv, ...) → (B, H, ...): K/V head h serves query heads h·G … h·G + G − 1."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


_TORCH = ops_for(torch.empty(0))


def _launch(kernel: str, mode: int, tensors: dict, shape: tuple, v: torch.Tensor, scale: float) -> None:
    """The pass's kernels on torch's current stream, over a zeroed fp32 workspace (held until they are enqueued).
    `shape`: q's (B, H, Nq, D) (D 0 in the forward, which reads no q or k)."""
    if max(shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"unseen_rows: head dim {max(shape[3], v.shape[3])}; the kernels take up to {MAX_HEAD_DIM}")
    lse = tensors["lse"] = tensors["lse"].contiguous()  # unseen_flags reads a K/V head's rows as one run
    strides, ptrs = [], {}
    for name, t in tensors.items():
        strides.append((name, t.stride()))
        ptrs[name] = t.data_ptr()
    steps, ws_floats = _steps(kernel, mode, _TORCH.dtype_name(v), tuple(shape), v.shape[1], v.shape[2], v.shape[3],
                              tuple(strides), float(scale))
    ws = torch.zeros(ws_floats, dtype=torch.float32, device=v.device)
    ptrs["ws"] = ws.data_ptr()
    device_id = v.device.index or 0
    launch.run_sharing_params(steps, ptrs, _TORCH.stream_ptr(device_id), device_id)
    del ws, lse  # freed only now, after the kernels that use them are enqueued


def ws_per_head(d: int, d_v: int, kernel: str, mode: int) -> int:
    """Workspace floats per (batch, K/V head) (kernels_cu/unseen_rows.cuh UnseenWs): flag, v_sum, gsum, and for the
    backward of UNIFORM_SCORES k_sum, vk, gq."""
    gram = kernel == "bwd" and mode == UNIFORM_SCORES
    return 4 + 2 * d_v + (d + 2 * d * d_v if gram else 0)


@functools.lru_cache(maxsize=256)
def _steps(kernel: str, mode: int, dtype: str, shape: tuple, kv_heads: int, n_k: int, d_v: int, strides: tuple,
           scale: float) -> tuple[tuple, int]:
    """(the pass's Steps, workspace floats) for a layout: made once, each call writes its addresses into the one
    parameter struct they share (launch.run_sharing_params)."""
    batch, heads, n_q, d = shape
    ws_per = ws_per_head(d, d_v, kernel, mode)
    bufs = {name: Buf(Slot(name), s) for name, s in strides}
    bufs["ws"] = Buf(Slot("ws"), ())
    # The forward needs v̄ alone whatever the mode: its key sums skip K and VᵀK.
    packed = params.unseen_rows(bufs=bufs, shape=shape, kv_heads=kv_heads, n_k=n_k, d_v=d_v, ws_per=ws_per,
                                scale=scale, mode=mode if kernel == "bwd" else UNIFORM)
    group = heads // kv_heads
    grids = {"unseen_flags": (math.ceil(group * n_q / FLAG_ROWS), kv_heads, batch),
             "unseen_key_sums": (math.ceil(n_k / KEYS_PER_BLOCK), kv_heads, batch),
             "unseen_kv": (math.ceil(n_k / KV_KEYS), kv_heads, batch),
             "unseen_sums": (math.ceil(n_q / SUM_ROWS), heads, batch),
             **dict.fromkeys(("unseen_fill", "unseen_dq"), (math.ceil(n_q / ROWS_PER_BLOCK), heads, batch))}
    if kernel == "fwd":
        order = ("unseen_flags", "unseen_key_sums", "unseen_fill")
    elif mode == UNIFORM:
        order = ("unseen_flags", "unseen_sums", "unseen_kv")
    else:
        order = ("unseen_flags", "unseen_sums", "unseen_key_sums", "unseen_kv", "unseen_dq")
    steps = tuple(Step(jit.Variant(name, dtype, 0), grids[name], (THREADS,), 0, packed) for name in order)
    return steps, batch * kv_heads * ws_per
