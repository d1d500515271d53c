"""The CuPy face: attention on CuPy arrays (B, H, N, D), for pipelines without torch.

CuPy has no bfloat16 dtype, so CuPy arrays run in fp16; bf16 callers pass CUDA torch tensors (or anything
torch can take through DLPack), which go through the torch op's CUDA path and come back as torch tensors.
Kernels run on CuPy's current stream.
"""
from __future__ import annotations

import math

from . import launch
from .errors import require_gpu
from .validate import TensorInfo, check_attention_inputs


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _require_cuda_tensors(**tensors) -> None:
    """The CuPy face is CUDA-only: a CPU torch tensor is refused by name (the torch op has the CPU path)."""
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise TypeError(f"{name} is a torch tensor on {t.device}; the CuPy face takes CUDA arrays only, so move "
                            f"it to the GPU (.cuda()) or call cupyflash.flash_attention for the CPU path")


def _as_cupy(name: str, x):
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__}; the CuPy face takes cupy.ndarray "
                    f"(fp16) or CUDA torch tensors, so move it to the GPU first (cupy.asarray(...))")


def _info(name: str, a) -> TensorInfo:
    return TensorInfo(name, tuple(a.shape), tuple(s // a.itemsize for s in a.strides), str(a.dtype),
                      f"cuda:{a.device.id}")


def _kernel_ready(a):
    """`a` itself if every row starts 16-byte aligned (cp.async copies 16 bytes), else a contiguous copy."""
    import cupy

    return a if launch.rows_aligned(a.data.ptr, a.strides[:3]) else cupy.ascontiguousarray(a)


def _buf(a) -> launch.Buf:
    return launch.Buf(a.data.ptr, tuple(s // a.itemsize for s in a.strides))


def _context(q, k) -> dict:
    import cupy

    require_gpu(q.device.id)
    return dict(dtype=str(q.dtype), kv_heads=k.shape[1], stream_ptr=cupy.cuda.get_current_stream().ptr,
                device_id=q.device.id)


def flash_attn_forward(q, k, v, *, scale: float | None = None, causal: bool = False):
    """Returns (out (B, H, Nq, D), lse (B, H, Nq) fp32 natural-log log-sum-exp of scale · q kᵀ)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _is_torch(q):
        from .torch_op import flash_attn_fwd

        _require_cuda_tensors(q=q, k=k, v=v)
        return flash_attn_fwd(q, k, v, None, scale, bool(causal))
    import cupy

    q, k, v = _as_cupy("q", q), _as_cupy("k", k), _as_cupy("v", v)
    check_attention_inputs(_info("q", q), _info("k", k), _info("v", v), None, on_gpu=True)
    out = cupy.empty(q.shape, dtype=q.dtype)
    lse = cupy.empty(q.shape[:-1], dtype=cupy.float32)
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    launch.forward(causal=bool(causal), shape=q.shape, n_k=k.shape[2], q=_buf(q), k=_buf(k), v=_buf(v),
                   out=_buf(out), lse=_buf(lse), scale=scale, mods=launch.ScoreMods(), **_context(q, k))
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, *, scale: float | None = None, causal: bool = False):
    """Returns (dq, dk, dv) for the forward's (out, lse), recomputing the attention matrix block by block."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _is_torch(q):
        from .torch_op import flash_attn_bwd

        _require_cuda_tensors(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
        return flash_attn_bwd(dout, q, k, v, None, out, lse, scale, bool(causal))[:3]
    import cupy

    q, k, v = _as_cupy("q", q), _as_cupy("k", k), _as_cupy("v", v)
    dout, out, lse = _as_cupy("dout", dout), _as_cupy("out", out), _as_cupy("lse", lse)
    check_attention_inputs(_info("q", q), _info("k", k), _info("v", v), None, on_gpu=True)
    for name, a in (("dout", dout), ("out", out)):
        if a.shape != q.shape or a.dtype != q.dtype:
            raise ValueError(f"{name} must match q: expected shape {q.shape} {q.dtype}, got {a.shape} {a.dtype}")
    if lse.shape != q.shape[:-1] or lse.dtype != cupy.float32:
        raise ValueError(f"lse must be float32 of shape (batch, heads, seqlen_q) = {q.shape[:-1]}, "
                         f"got {lse.dtype} {lse.shape}")
    dq, dk, dv = cupy.empty_like(q), cupy.empty_like(k), cupy.empty_like(v)
    batch, heads, n_q, d = q.shape
    dq_accum = cupy.zeros((batch, heads, n_q, d), dtype=cupy.float32)  # atomically summed
    d_vec = cupy.empty((batch, heads, n_q), dtype=cupy.float32)  # D = rowsum(dO ∘ O)
    q, k, v, out, dout = (_kernel_ready(a) for a in (q, k, v, out, dout))
    launch.backward(causal=bool(causal), shape=q.shape, n_k=k.shape[2], q=_buf(q), k=_buf(k), v=_buf(v),
                    out=_buf(out), dout=_buf(dout), lse=_buf(cupy.ascontiguousarray(lse)), d_vec=_buf(d_vec),
                    dq_accum=_buf(dq_accum), dq=_buf(dq), dk=_buf(dk), dv=_buf(dv), scale=scale,
                    mods=launch.ScoreMods(), **_context(q, k))
    return dq, dk, dv
