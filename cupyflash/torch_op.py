"""The torch face: ``cupyflash::flash_attn_fwd`` / ``cupyflash::flash_attn_bwd`` custom ops with fake
(meta) implementations and autograd, usable in eager, under ``torch.compile`` and in CUDA graphs.

CUDA tensors run the CuPy-launched kernels on ``torch.cuda.current_stream()`` with outputs allocated by
torch; CPU tensors run the exact chunked implementation in ``cpu_attention`` (same semantics).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import cpu_attention
from .tiles import BACKWARD
from .validate import GPU_DTYPES, GPU_HEAD_DIMS, TensorInfo, check_attention_inputs

def _info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), str(t.device))


def _check(q, k, v, attn_bias, window=(-1, -1), dropout_p=0.0):
    bias = None if attn_bias is None else _info("attn_bias", attn_bias)
    check_attention_inputs(_info("q", q), _info("k", k), _info("v", v), bias, on_gpu=q.device.type == "cuda")
    for name, w in zip(("window_left", "window_right"), window):
        if w < -1:
            raise ValueError(f"{name} is {w}; expected a number of keys >= 0, or -1 for unbounded")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p is {dropout_p}; expected 0 <= dropout_p < 1")


def why_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_bias: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if the op can take these inputs (real or fake tensors), else a one-line reason."""
    if q.device.type == "cuda":
        dtype = str(q.dtype).removeprefix("torch.")
        if dtype not in GPU_DTYPES:
            return f"dtype {dtype} on CUDA: the kernels take {' or '.join(GPU_DTYPES)}"
        if q.shape[-1] not in GPU_HEAD_DIMS:
            return f"head_dim {q.shape[-1]} on CUDA: the kernels support {GPU_HEAD_DIMS}"
        if q.shape[-1] not in BACKWARD and any(t.requires_grad for t in (q, k, v)):
            return (f"head_dim {q.shape[-1]} needs gradients on CUDA: the backward kernels support "
                    f"{tuple(BACKWARD)}")
    elif q.device.type != "cpu":
        return f"device {q.device.type}: only cuda and cpu are supported"
    try:
        _check(q, k, v, attn_bias)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def _seed(dropout_seed: Optional[torch.Tensor]) -> int:
    return 0 if dropout_seed is None else int(dropout_seed.item())


@torch.library.custom_op("cupyflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
                   scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
                   dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, Nq, D), lse (B, H, Nq) fp32), both contiguous whatever the strides of q, k, v (as
    a matmul's output would be). Semantics: cupyflash/cpu_attention.py."""
    _check(q, k, v, attn_bias, (window_left, window_right), dropout_p)
    impl = _impl(q)
    return impl.forward(q, k, v, attn_bias, scale, causal, (window_left, window_right), dropout_p,
                        _seed(dropout_seed))


def _impl(q: torch.Tensor):
    if q.device.type == "cuda":
        from . import cuda_attention

        return cuda_attention
    return cpu_attention


@flash_attn_fwd.register_fake
def _(q, k, v, attn_bias, scale, causal, window_left=-1, window_right=-1, dropout_p=0.0, dropout_seed=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("cupyflash::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
                   causal: bool, window_left: int = -1, window_right: int = -1, dropout_p: float = 0.0,
                   dropout_seed: Optional[torch.Tensor] = None, bias_grad: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns contiguous (dq, dk, dv, dbias) shaped like q, k, v and attn_bias (dbias is empty unless
    bias_grad)."""
    dq, dk, dv, dbias = _impl(q).backward(dout, q, k, v, attn_bias, out, lse, scale, causal,
                                          (window_left, window_right), dropout_p, _seed(dropout_seed), bias_grad)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


@flash_attn_bwd.register_fake
def _(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left=-1, window_right=-1, dropout_p=0.0,
      dropout_seed=None, bias_grad=False):
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_bias, out, lse, dropout_seed)
    ctx.scale, ctx.causal, ctx.window, ctx.dropout_p = scale, causal, (window_left, window_right), dropout_p


def _backward(ctx, dout, dlse):
    q, k, v, attn_bias, out, lse, dropout_seed = ctx.saved_tensors
    bias_grad = attn_bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = flash_attn_bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, attn_bias,
                                       out, lse, ctx.scale, ctx.causal, *ctx.window, ctx.dropout_p, dropout_seed,
                                       bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                    *, scale: Optional[float] = None, causal: bool = False, window: tuple = (-1, -1),
                    dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(softmax(scale · q kᵀ + attn_bias)) v for (B, H, N, D) tensors, differentiable in q, k, v and a
    floating attn_bias.

    ``attn_bias``: additive (fp16/bf16/fp32) or boolean (True = keep, as SDPA), 4-D, broadcastable to
    (B, H, Nq, Nk) by size-1 dims. k and v may have fewer heads than q (grouped-query attention).
    ``scale`` defaults to 1/sqrt(head_dim); ``causal`` and ``window`` = (left, right) keys around the diagonal
    (-1: unbounded) are aligned to the bottom-right corner. ``dropout_p`` draws its seed from torch's default
    generator, so ``torch.manual_seed`` reproduces a run.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64) if dropout_p > 0 else None
    out, _ = flash_attn_fwd(q, k, v, attn_bias, float(scale), bool(causal), int(window[0]), int(window[1]),
                            float(dropout_p), seed)
    return out
