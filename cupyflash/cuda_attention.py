"""CUDA path of the torch op: outputs allocated by torch, kernels launched on torch's current stream."""
from __future__ import annotations

import torch

from . import launch
from .errors import require_gpu


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if every row starts 16-byte aligned (cp.async copies 16 bytes), else a contiguous copy."""
    aligned = t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:3])
    return t if aligned else t.contiguous()


def _buf(t: torch.Tensor) -> launch.Buf:
    return launch.Buf(t.data_ptr(), tuple(t.stride()))


def _launch_context(q: torch.Tensor) -> dict:
    require_gpu(q.device.index)
    dtype = str(q.dtype).removeprefix("torch.")
    return dict(dtype=dtype, stream_ptr=torch.cuda.current_stream(q.device).cuda_stream, device_id=q.device.index)


def forward(q, k, v, attn_bias, scale: float, causal: bool):
    out = torch.empty_like(q)  # same strides as the fake implementation in torch_op
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, Nq)
    if out.numel() == 0:
        return out, lse
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    launch.forward(causal=causal, shape=tuple(q.shape), n_k=k.shape[2], q=_buf(q), k=_buf(k), v=_buf(v),
                   out=_buf(out), lse=_buf(lse), scale=scale, **_launch_context(q))
    return out, lse


def backward(dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out, dout = (_kernel_ready(t) for t in (q, k, v, out, dout))
    batch, heads, n_q, d = q.shape
    dq_accum = torch.zeros((batch, heads, n_q, d), dtype=torch.float32, device=q.device)  # atomically summed
    d_vec = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)  # D = rowsum(dO ∘ O)
    launch.backward(causal=causal, shape=tuple(q.shape), n_k=k.shape[2], q=_buf(q), k=_buf(k), v=_buf(v),
                    out=_buf(out), dout=_buf(dout), lse=_buf(lse.contiguous()), d_vec=_buf(d_vec),
                    dq_accum=_buf(dq_accum), dq=_buf(dq), dk=_buf(dk), dv=_buf(dv), scale=scale,
                    **_launch_context(q))
    return dq, dk, dv
