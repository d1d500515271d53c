"""The CuPy face: attention on CuPy arrays (B, H, N, D), for pipelines without torch.

CuPy has no bfloat16 dtype, so CuPy arrays run in fp16, or in fp32 on TF32 tensor cores where the caller allows it
(``allow_tf32=True``); bf16 callers pass CUDA torch tensors (or anything torch can take through DLPack), which go
through the torch op's CUDA path and come back as torch tensors. Kernels run on CuPy's current stream of q's device.

Semantics (bias and masks, windows, dropout, soft cap): cupyflash/cpu_attention.py. CuPy arrays and the torch op's
CUDA tensors share one CUDA path (cupyflash/cuda_path.py) over the array adapter of cupyflash/array_ops.py.
"""
from __future__ import annotations

import math
import numbers

from . import cuda_path
from .array_ops import ops_for
from .validate import (GPU_HEAD_DIMS, TensorInfo, check_attention_inputs, check_backward_inputs, check_bias_grad,
                       check_causal, check_real, check_scale, check_softcap, check_window, default_scale,
                       effective_window, is_empty)

BIAS_DTYPES = ("bool", "float16", "float32")
# The seed's 64 bits are the Philox key (kernels_cu/scores.cuh), so int64 and uint64 values are both taken.
SEED_MIN, SEED_END = -2 ** 63, 2 ** 64


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def _check_options(scale, causal, window, dropout_p, dropout_seed, softcap) -> tuple:
    """Checks the scalar arguments before any array is touched; returns the window as (left, right) ints."""
    if scale is not None:
        check_scale(check_real("scale", scale, "a float, or None for 1/sqrt(head_dim)"))
    check_causal(causal)
    window = check_window(window)
    dropout_p = check_real("dropout_p", dropout_p, "a float, 0 <= dropout_p < 1")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p is {dropout_p!r}; expected 0 <= dropout_p < 1")
    if dropout_seed is not None:
        if not isinstance(dropout_seed, numbers.Integral) or isinstance(dropout_seed, bool):
            raise TypeError(f"dropout_seed is a {type(dropout_seed).__name__}; expected an int (the Philox key, the "
                            f"same in the forward and the backward), or None to draw one from cupy.random")
        if not SEED_MIN <= dropout_seed < SEED_END:
            raise ValueError(f"dropout_seed is {dropout_seed}; expected a 64-bit int, in [-2**63, 2**64)")
    check_softcap(check_real("softcap", softcap, "a float (0 for none)"))
    return window


def _scale(scale, q) -> float:
    """The scale as a float (checked by _check_options), by default 1/sqrt(head_dim) of the checked array q."""
    return default_scale(q.shape[-1]) if scale is None else float(scale)


def _check_backward_seed(dropout_p: float, dropout_seed) -> None:
    if dropout_p > 0 and dropout_seed is None:
        raise ValueError(f"dropout_seed is None but dropout_p is {dropout_p}: the backward regenerates the forward's "
                         f"dropout mask from its seed, so pass the int the forward used")


def _require_tf32(q, allow_tf32: bool) -> None:
    """fp32 torch tensors: the CuPy face asks for allow_tf32 as for CuPy arrays (the op then follows torch's own
    TF32 setting too)."""
    if _dtype_name(q) == "float32" and not allow_tf32:
        raise TypeError("q has dtype float32: the CUDA kernels run float32 on TF32 tensor cores (10-bit mantissa), "
                        "which the caller has not allowed; pass allow_tf32=True (torch tensors also need "
                        "torch.set_float32_matmul_precision('high')), or float16/bfloat16")


# ---- torch tensors: the torch op's CUDA path -------------------------------------------------------------------

def _require_cuda_tensors(**tensors) -> None:
    """The CuPy face is CUDA-only: a CPU torch tensor is refused by name (the torch op has the CPU path), and so is
    a non-torch array beside torch tensors (one call takes one kind)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not _is_torch(t):
            raise TypeError(f"{name} is a {type(t).__module__}.{type(t).__name__} but q is a torch tensor; pass "
                            f"every array of one call as the same kind (torch.from_dlpack converts)")
        if t.device.type != "cuda":
            raise TypeError(f"{name} is a torch tensor on {t.device}; the CuPy face takes CUDA arrays only, so move "
                            f"it to the GPU (.cuda()) or call cupyflash.flash_attention for the CPU path")


def _torch_seed(dropout_seed, dropout_p: float, q):
    """The op's seed: one int64 element on q's device; None draws it from torch's generator of q's device (as
    cupyflash.flash_attention does), on the device."""
    import torch

    if dropout_p == 0:
        return None
    if dropout_seed is None:
        return torch.randint(0, 2 ** 62, (), dtype=torch.int64, device=q.device)
    return torch.tensor(_as_int64(dropout_seed), dtype=torch.int64, device=q.device)


def _as_int64(seed: int) -> int:
    """The int64 with the seed's 64 bits."""
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


# ---- CuPy arrays -----------------------------------------------------------------------------------------------

def _as_cupy(name: str, x):
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__}; the CuPy face takes cupy.ndarray "
                    f"(fp16, fp32) or CUDA torch tensors, one kind per call: move host arrays to the GPU "
                    f"(cupy.asarray(...)), convert others with cupy.from_dlpack")


def _info(name: str, a) -> TensorInfo:
    return TensorInfo(name, tuple(a.shape), tuple(s // a.itemsize for s in a.strides), str(a.dtype),
                      f"cuda:{a.device.id}")


def _check_arrays(q, k, v, bias, allow_tf32: bool) -> None:
    bias_info = None if bias is None else _info("attn_bias", bias)
    check_attention_inputs(_info("q", q), _info("k", k), _info("v", v), bias_info, on_gpu=True,
                           tf32_allowed=bool(allow_tf32))
    # The shared checks let empty problems through (nothing to launch), but head_dim 0 still has an LSE to compute.
    if q.shape[3] == 0:
        raise ValueError(f"head_dim (dim 3 of q) is 0; the CUDA kernels support head dims from 1 to "
                         f"{GPU_HEAD_DIMS[-1]}, and the CuPy face has no other path (cupyflash.flash_attention returns "
                         f"SDPA's empty result)")
    if bias is not None and str(bias.dtype) not in BIAS_DTYPES:
        raise TypeError(f"attn_bias has dtype {bias.dtype}; expected bool (a mask, True = keep), float16 or "
                        f"float32")


def _seed_on_device(dropout_seed, dropout_p: float):
    """The seed as one int64 on the current device (the kernels read the Philox key there), or None without
    dropout; None draws it from cupy.random on the device, so cupy.random.seed reproduces it."""
    import cupy

    if dropout_p == 0:
        return None
    if dropout_seed is None:
        return cupy.random.randint(0, 2 ** 62, size=(), dtype=cupy.int64)
    return cupy.asarray(_as_int64(dropout_seed), dtype=cupy.int64)


# ---- the face --------------------------------------------------------------------------------------------------

def flash_attn_forward(q, k, v, attn_bias=None, *, scale: float | None = None, causal: bool = False,
                       window: tuple = (-1, -1), dropout_p: float = 0.0, dropout_seed: int | None = None,
                       softcap: float = 0.0, allow_tf32: bool = False):
    """Returns (out (B, H, Nq, D), lse (B, H, Nq) fp32 natural-log log-sum-exp of the logits).

    ``attn_bias``: additive (float16, float32) or boolean (True = keep), 4-D, broadcastable to (B, H, Nq, Nk) by
    size-1 dims (read in place, never expanded). k and v may have fewer heads than q (grouped-query attention).
    ``scale`` defaults to 1/sqrt(head_dim); ``causal`` and ``window`` = (left, right) keys around the diagonal
    (-1: unbounded; None: no window) are aligned to the bottom-right corner. ``softcap`` > 0 caps the logits before
    the bias: softcap · tanh(scale · q kᵀ / softcap). ``dropout_p`` drops attention probabilities with the Philox
    key ``dropout_seed``, an int (pass the same to the backward); None draws one from cupy.random (torch tensors:
    torch's generator), so cupy.random.seed reproduces a run. float32 inputs need ``allow_tf32=True``: the
    kernels run them on TF32 tensor cores. A dim of 0 other than head_dim gives empty results, or with no key out
    = 0 and lse = +inf, as the torch op.
    """
    window = _check_options(scale, causal, window, dropout_p, dropout_seed, softcap)
    if _is_torch(q):
        from .torch_op import flash_attn_fwd

        _require_cuda_tensors(q=q, k=k, v=v, attn_bias=attn_bias)
        _require_tf32(q, allow_tf32)
        return flash_attn_fwd(q, k, v, attn_bias, _scale(scale, q), causal, *window, float(dropout_p),
                              _torch_seed(dropout_seed, dropout_p, q), float(softcap))
    import cupy

    q, k, v = _as_cupy("q", q), _as_cupy("k", k), _as_cupy("v", v)
    attn_bias = None if attn_bias is None else _as_cupy("attn_bias", attn_bias)
    _check_arrays(q, k, v, attn_bias, allow_tf32)
    scale, window = _scale(scale, q), effective_window(window, q.shape[2], k.shape[2])
    with q.device:
        if is_empty(q.shape, k.shape):  # nothing to launch: no element, or rows that see no key (out 0, lse +inf)
            return cupy.zeros(q.shape, dtype=q.dtype), cupy.full(q.shape[:-1], math.inf, dtype=cupy.float32)
        seed = _seed_on_device(dropout_seed, dropout_p)
        return cuda_path.forward(ops_for(q), q, k, v, attn_bias, scale, causal, window, float(dropout_p), seed,
                                 float(softcap))


def flash_attn_backward(dout, q, k, v, out, lse, attn_bias=None, *, scale: float | None = None,
                        causal: bool = False, window: tuple = (-1, -1), dropout_p: float = 0.0,
                        dropout_seed: int | None = None, softcap: float = 0.0, bias_grad: bool = False,
                        allow_tf32: bool = False, dlse=None):
    """Returns (dq, dk, dv), or (dq, dk, dv, dbias) with ``bias_grad``, for the forward's (out, lse) with the same
    arguments, recomputing the attention matrix block by block. ``dlse``: the gradient of a loss that reads lse too
    ((B, H, Nq) fp32), or None.

    dq, dk, dv are contiguous and shaped like q, k, v (dk, dv summed over the query heads sharing a K/V head);
    dbias is shaped like ``attn_bias`` (summed over its broadcast dims) in its dtype. Dropout regenerates the
    forward's mask from ``dropout_seed``, which is required here: pass the int the forward used.
    """
    window = _check_options(scale, causal, window, dropout_p, dropout_seed, softcap)
    _check_backward_seed(dropout_p, dropout_seed)
    check_bias_grad(None if attn_bias is None else _dtype_name(attn_bias), bias_grad)
    if _is_torch(q):
        from .torch_op import flash_attn_bwd

        _require_cuda_tensors(dout=dout, q=q, k=k, v=v, out=out, lse=lse, attn_bias=attn_bias, dlse=dlse)
        _require_tf32(q, allow_tf32)
        dout, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout, out))  # as the op's autograd does
        grads = flash_attn_bwd(dout, q, k, v, attn_bias, out, lse, _scale(scale, q), causal, *window,
                               float(dropout_p),
                               _torch_seed(dropout_seed, dropout_p, q), bool(bias_grad), float(softcap),
                               dlse=dlse)
        return grads if bias_grad else grads[:3]
    import cupy

    q, k, v = _as_cupy("q", q), _as_cupy("k", k), _as_cupy("v", v)
    dout, out, lse = _as_cupy("dout", dout), _as_cupy("out", out), _as_cupy("lse", lse)
    attn_bias = None if attn_bias is None else _as_cupy("attn_bias", attn_bias)
    dlse = None if dlse is None else _as_cupy("dlse", dlse)
    _check_arrays(q, k, v, attn_bias, allow_tf32)
    check_backward_inputs(_info("q", q), _info("v", v), _info("dout", dout), _info("out", out), _info("lse", lse),
                          None if dlse is None else _info("dlse", dlse))
    scale, window = _scale(scale, q), effective_window(window, q.shape[2], k.shape[2])
    with q.device:
        seed = _seed_on_device(dropout_seed, dropout_p)
        dq, dk, dv, dbias = cuda_path.backward(ops_for(q), dout, q, k, v, attn_bias, out, lse, scale, causal, window,
                                               float(dropout_p), seed, bool(bias_grad), float(softcap), dlse)
    return (dq, dk, dv) if dbias is None else (dq, dk, dv, dbias)
