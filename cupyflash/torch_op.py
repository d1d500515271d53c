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

# Feature flags of the CUDA kernels; the compile backend asks `why_unsupported` before it fuses a site.
GPU_SUPPORTS_BIAS = False


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(name, tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."), str(t.device))


def _check(q, k, v, attn_bias):
    bias = None if attn_bias is None else _info("attn_bias", attn_bias)
    check_attention_inputs(_info("q", q), _info("k", k), _info("v", v), bias, on_gpu=q.device.type == "cuda")
    if q.device.type == "cuda" and attn_bias is not None and not GPU_SUPPORTS_BIAS:
        raise NotImplementedError("attn_bias is not supported by the CUDA kernels yet; pass causal=True for "
                                  "causal masks, or run on the CPU")


def why_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_bias: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if the op can take these inputs (real or fake tensors), else a one-line reason."""
    if attn_bias is not None and attn_bias.requires_grad:
        return "the attention bias requires grad, and the op does not return a bias gradient yet"
    if q.device.type == "cuda":
        dtype = str(q.dtype).removeprefix("torch.")
        if dtype not in GPU_DTYPES:
            return f"dtype {dtype} on CUDA: the kernels take {' or '.join(GPU_DTYPES)}"
        if q.shape[-1] not in GPU_HEAD_DIMS:
            return f"head_dim {q.shape[-1]} on CUDA: the kernels support {GPU_HEAD_DIMS}"
        if q.shape[-1] not in BACKWARD and any(t.requires_grad for t in (q, k, v)):
            return (f"head_dim {q.shape[-1]} needs gradients on CUDA: the backward kernels support "
                    f"{tuple(BACKWARD)}")
        if attn_bias is not None and not GPU_SUPPORTS_BIAS:
            return "an additive mask/bias on CUDA: the kernels do not take one yet"
    elif q.device.type != "cpu":
        return f"device {q.device.type}: only cuda and cpu are supported"
    try:
        _check(q, k, v, attn_bias)
    except (ValueError, TypeError, NotImplementedError) as err:
        return str(err)
    return None


@torch.library.custom_op("cupyflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
                   scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, Nq, D) like q, lse (B, H, Nq) fp32)."""
    _check(q, k, v, attn_bias)
    if q.device.type == "cuda":
        from . import cuda_attention

        return cuda_attention.forward(q, k, v, attn_bias, scale, causal)
    return cpu_attention.forward(q, k, v, attn_bias, scale, causal)


@flash_attn_fwd.register_fake
def _(q, k, v, attn_bias, scale, causal):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("cupyflash::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) shaped like q, k, v."""
    if q.device.type == "cuda":
        from . import cuda_attention

        return cuda_attention.backward(dout, q, k, v, attn_bias, out, lse, scale, causal)
    return cpu_attention.backward(dout, q, k, v, attn_bias, out, lse, scale, causal)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, attn_bias, out, lse, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_bias, out, lse)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, dout, dlse):
    q, k, v, attn_bias, out, lse = ctx.saved_tensors
    if attn_bias is not None and ctx.needs_input_grad[3]:
        raise NotImplementedError("cupyflash does not compute the gradient of attn_bias yet")
    dq, dk, dv = flash_attn_bwd(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, attn_bias, out,
                                lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                    *, scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """softmax(scale · q kᵀ + attn_bias) v for (B, H, N, D) tensors, differentiable in q, k, v.

    ``scale`` defaults to 1/sqrt(head_dim); ``causal`` masks aligned to the bottom-right corner.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out, _ = flash_attn_fwd(q, k, v, attn_bias, float(scale), bool(causal))
    return out
