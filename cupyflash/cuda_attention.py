"""CUDA path of the torch op: outputs allocated by torch, kernels launched on torch's current stream."""
from __future__ import annotations

import torch

from . import launch
from .errors import require_gpu
from .tiles import for_pass


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """`t` itself if every row starts 16-byte aligned (cp.async copies 16 bytes), else a contiguous copy."""
    aligned = launch.rows_aligned(t.data_ptr(), [s * t.element_size() for s in t.stride()[:3]])
    return t if aligned else t.contiguous()


def _buf(t: torch.Tensor) -> launch.Buf:
    return launch.Buf(t.data_ptr(), tuple(t.stride()))


def _broadcast_buf(t: torch.Tensor) -> launch.Buf:
    """A (B, H, Nq, Nk)-broadcastable buffer: stride 0 along its size-1 dims, so it is never expanded."""
    return launch.Buf(t.data_ptr(), tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride())))


def _kernel_bias(attn_bias, q):
    """The bias as the kernels read it: q's dtype or fp32; boolean masks become additive 0 / -inf."""
    if attn_bias is None:
        return None
    if attn_bias.dtype == torch.bool:
        return torch.where(attn_bias, torch.zeros((), dtype=q.dtype, device=q.device),
                           torch.full((), float("-inf"), dtype=q.dtype, device=q.device))
    return attn_bias if attn_bias.dtype in (q.dtype, torch.float32) else attn_bias.float()


def _alloc(device):
    """launch.classify_tiles's allocator: torch tensors on `device`, on torch's current stream."""
    def alloc(shape, dtype: str, zeroed: bool):
        make = torch.zeros if zeroed else torch.empty
        t = make(shape, dtype=getattr(torch, dtype), device=device)
        return t, _buf(t)

    return alloc


def _mods(bias, tiles, causal, window, dropout_p, seed, softcap, ctx, dbias=None) -> launch.ScoreMods:
    """The launch's ScoreMods; `tiles` are the pass's tiles (its bias tiles are classified for skipping)."""
    classes = None
    if bias is not None:
        classes = launch.classify_tiles(dtype=ctx["dtype"], bias=_broadcast_buf(bias), bias_shape=tuple(bias.shape),
                                        bias_f32=bias.dtype == torch.float32, br=tiles.Br, bc=tiles.Bc,
                                        window=causal or tuple(window) != (-1, -1), alloc=_alloc(bias.device),
                                        stream_ptr=ctx["stream_ptr"], device_id=ctx["device_id"])
    return launch.ScoreMods(bias=None if bias is None else _broadcast_buf(bias),
                            bias_f32=bias is not None and bias.dtype == torch.float32,
                            tile_classes=None if classes is None else _broadcast_buf(classes),
                            dbias=None if dbias is None else _broadcast_buf(dbias), window=tuple(window),
                            dropout_p=dropout_p, seed_ptr=0 if seed is None else seed.data_ptr(), softcap=softcap)


def _stream_ptr(device_index: int) -> int:
    """torch's current stream on the device, as the raw cudaStream_t. torch._C._cuda_getCurrentRawStream is what
    Inductor's generated code calls before each launch (`from torch._C import _cuda_getCurrentRawStream as
    get_raw_stream`): 0.2 µs, where torch.cuda.current_stream(device) builds a Stream object first (6 µs on an H100's
    host, benchmarks/results/host-overhead-NVIDIA_H100_80GB_HBM3.log)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device_index) if raw is not None else torch.cuda.current_stream(device_index).cuda_stream


def _launch_context(q: torch.Tensor, k: torch.Tensor) -> dict:
    require_gpu(q.device.index)
    dtype = str(q.dtype).removeprefix("torch.")
    return dict(dtype=dtype, kv_heads=k.shape[1], stream_ptr=_stream_ptr(q.device.index), device_id=q.device.index)


def forward(q, k, v, attn_bias, scale: float, causal: bool, window=(-1, -1), dropout_p: float = 0.0, seed=None,
            softcap: float = 0.0):
    """`seed`: the dropout seed, one int64 element on q's device (the kernels read it there, so a CUDA graph
    replays with the seed drawn at that replay)."""
    out = q.new_empty(q.shape)  # contiguous, as the fake implementation in torch_op
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, Nq)
    if out.numel() == 0:
        return out, lse
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    bias = _kernel_bias(attn_bias, q)
    ctx = _launch_context(q, k)
    launch.forward(causal=causal, shape=tuple(q.shape), n_k=k.shape[2], q=_buf(q), k=_buf(k), v=_buf(v),
                   out=_buf(out), lse=_buf(lse), scale=scale,
                   mods=_mods(bias, for_pass("fwd", ctx["dtype"], q.shape[-1]), causal, window, dropout_p, seed,
                              softcap, ctx), **ctx)
    return out, lse


def backward(dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool, window=(-1, -1),
             dropout_p: float = 0.0, seed=None, bias_grad: bool = False, softcap: float = 0.0):
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the fake
    # dBias is summed atomically over the bias's broadcast dims, in fp32.
    dbias = torch.zeros(attn_bias.shape, dtype=torch.float32, device=q.device) if bias_grad else None
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), None if dbias is None else dbias.to(attn_bias.dtype)
    q, k, v, out, dout = (_kernel_ready(t) for t in (q, k, v, out, dout))
    batch, heads, n_q, d = q.shape
    dq_accum = torch.empty((batch, heads, n_q, d), dtype=torch.float32, device=q.device)  # zeroed, then summed
    d_vec = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)  # D = rowsum(dO ∘ O)
    bias = _kernel_bias(attn_bias, q)
    ctx = _launch_context(q, k)
    launch.require_backward(d)
    launch.backward(causal=causal, shape=tuple(q.shape), n_k=k.shape[2], q=_buf(q), k=_buf(k), v=_buf(v),
                    out=_buf(out), dout=_buf(dout), lse=_buf(lse.contiguous()), d_vec=_buf(d_vec),
                    dq_accum=_buf(dq_accum), dq=_buf(dq), dk=_buf(dk), dv=_buf(dv), scale=scale,
                    mods=_mods(bias, for_pass("bwd", ctx["dtype"], d), causal, window, dropout_p, seed, softcap,
                               ctx, dbias), **ctx)
    return dq, dk, dv, None if dbias is None else dbias.to(attn_bias.dtype)
