"""CUDA path of the torch op: cupyflash/cuda_path.py on torch tensors (outputs allocated by torch, kernels launched
on torch's current stream)."""
from __future__ import annotations

import torch

from . import cuda_path
from .array_ops import ops_for
from .plan import sm90_enabled  # noqa: F401  (the setting the plans depend on: torch_op's call keys read it here)

_TORCH = ops_for(torch.empty(0))


def forward(q, k, v, attn_bias, scale: float, causal: bool, window=(-1, -1), dropout_p: float = 0.0, seed=None,
            softcap: float = 0.0, token_major: bool = False):
    """`seed`: the dropout seed, one int64 element on q's device (the kernels read it there, so a CUDA graph
    replays with the seed drawn at that replay)."""
    return cuda_path.forward(_TORCH, q, k, v, attn_bias, scale, causal, window, dropout_p, seed, softcap, token_major)


def plain_forward_runner(q, k, v, scale: float, causal: bool, window: tuple, softcap: float,
                         token_major: bool = False, keys=None):
    return cuda_path.plain_forward_runner(_TORCH, q, k, v, scale, causal, window, softcap, token_major, keys)


def backward(dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool, window=(-1, -1),
             dropout_p: float = 0.0, seed=None, bias_grad: bool = False, softcap: float = 0.0, dlse=None):
    return cuda_path.backward(_TORCH, dout, q, k, v, attn_bias, out, lse, scale, causal, window, dropout_p, seed,
                              bias_grad, softcap, dlse)


def plain_backward_runner(dout, q, k, v, out, lse, scale: float, causal: bool, window: tuple, softcap: float,
                          keys=None):
    return cuda_path.plain_backward_runner(_TORCH, dout, q, k, v, out, lse, scale, causal, window, softcap, keys)
