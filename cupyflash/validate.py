"""Input checks shared by the CuPy face and the torch op: every error names the tensor, the dimension and
what was expected."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

# What q, k, v may hold, as SDPA: attention of integer, boolean or complex tensors is not defined.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Head dims the CUDA kernels are instantiated for (the tile table in cupyflash/tiles.py has one row each).
GPU_HEAD_DIMS = (32, 64, 96, 128, 256)  # the kernels' own; any other head_dim up to 256 runs zero-padded to the next


def kernel_head_dim(head_dim: int) -> int | None:
    """The head dim of the kernels that run `head_dim` (>= 1): itself, or the next of GPU_HEAD_DIMS, q, k and v
    zero-padded to it (exact: zero columns add nothing to q·k, and v's give output columns that are sliced off);
    None above 256."""
    return next((d for d in GPU_HEAD_DIMS if d >= head_dim), None)
# float32 runs on TF32 tensor cores (10-bit mantissa), so it is taken only where the caller allows TF32.
GPU_DTYPES = ("float16", "bfloat16", "float32")
MAX_GRID_YZ = 65535
TF32_HOW = ("allow TF32 with torch.backends.cuda.matmul.allow_tf32 = True or "
            "torch.set_float32_matmul_precision('high') (torch), or allow_tf32=True (CuPy face), "
            "or pass float16/bfloat16")
# The front ends broadcast these as SDPA does (views, never copies); the ops and the shared checks take 4-D.
FRONT_END_BROADCASTS = ("cupyflash.flash_attention also takes a 2-D (seqlen_q, seqlen_k) or 3-D (heads, seqlen_q, "
                        "seqlen_k) attn_bias, as SDPA")
INT64_MAX = 2 ** 63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """What the checks need to know of a tensor, independent of the array library."""

    name: str
    shape: tuple
    strides: tuple  # in elements
    dtype: str  # "float16", "bfloat16", ...
    device: str  # "cuda:0", "cpu"


def check_attention_inputs(q: TensorInfo, k: TensorInfo, v: TensorInfo, bias: TensorInfo | None, *,
                           on_gpu: bool, tf32_allowed: bool = False) -> None:
    """Raises ValueError/TypeError naming the tensor and dimension for anything the kernels cannot take.

    ``tf32_allowed``: whether the caller accepts TF32 rounding for float32 inputs (torch: its matmul precision
    setting; CuPy face: ``allow_tf32=True``); the GPU refuses float32 without it rather than round silently.
    """
    for t in (q, k, v):
        if len(t.shape) != 4:
            raise ValueError(f"{t.name} must be 4-D (batch, heads, seqlen, head_dim); got {len(t.shape)}-D "
                             f"with shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        raise ValueError(f"batch (dim 0) must match: q has {q.shape[0]}, k has {k.shape[0]}, v has {v.shape[0]} "
                         f"(cupyflash.flash_attention broadcasts a batch of 1, as SDPA)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same heads (dim 1): k has {k.shape[1]}, v has {v.shape[1]}")
    if (q.shape[1] % k.shape[1] if k.shape[1] else q.shape[1]) != 0:
        raise ValueError(f"heads (dim 1) of q must be a multiple of those of k and v (grouped-query attention): "
                         f"q has {q.shape[1]}, k and v have {k.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same seqlen (dim 2): k has {k.shape[2]}, v has {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim (dim 3): q has {q.shape[3]}, k has {k.shape[3]}")
    if q.shape[3] == 0 and v.shape[3] != 0:
        raise ValueError(f"q and k have head_dim 0 (dim 3) but v has {v.shape[3]}: the logits would be the bias "
                         f"alone; pass q and k with a head_dim of at least 1")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected a floating dtype ({', '.join(FLOAT_DTYPES)}), as SDPA: "
                        f"attention is not defined on integer, boolean or complex tensors")
    for t in (k, v):
        if t.dtype != q.dtype:
            raise TypeError(f"{t.name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{t.name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if bias is not None:
        _check_bias(bias, q, k)
    # Where a dim is 0 the result is empty or zeros and nothing is launched (torch_op, cupy_api), so the kernels'
    # rules do not apply.
    if not on_gpu or is_empty(q.shape, k.shape):
        return
    if not q.device.startswith("cuda"):
        raise ValueError(f"q is on {q.device}; the CUDA kernels need tensors on a CUDA device")
    if q.dtype not in GPU_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; the CUDA kernels take {', '.join(GPU_DTYPES)}")
    if q.dtype == "float32" and not tf32_allowed:
        raise TypeError(f"q has dtype float32: the CUDA kernels run float32 on TF32 tensor cores (10-bit "
                        f"mantissa), which the caller has not allowed; {TF32_HOW}")
    for t in (q, v):
        if kernel_head_dim(t.shape[3]) is None:
            raise ValueError(f"head_dim (dim 3 of {t.name}) is {t.shape[3]}; the CUDA kernels support head dims up to "
                             f"{GPU_HEAD_DIMS[-1]} ({', '.join(map(str, GPU_HEAD_DIMS))} natively, others zero-padded "
                             f"to the next)")
    # The kernels' grids put heads on gridDim.y and batch on gridDim.z, each at most 65535.
    for dim, name in ((0, "batch"), (1, "heads")):
        if q.shape[dim] > MAX_GRID_YZ:
            raise ValueError(f"q has {q.shape[dim]} {name} (dim {dim}); the CUDA kernels take at most {MAX_GRID_YZ}: "
                             f"split the call along that dim")
    for t in (q, k, v):
        if t.strides[3] != 1:
            raise ValueError(f"{t.name} must be contiguous in its last dim (head_dim, dim 3): stride is "
                             f"{t.strides[3]}, expected 1")


def is_empty(q_shape: tuple, k_shape: tuple) -> bool:
    """Whether some dim of q or k (hence v) is 0: SDPA's result is then empty, or 0 where no key exists (Nk = 0)."""
    return 0 in q_shape or 0 in k_shape


def _check_bias(bias: TensorInfo, q: TensorInfo, k: TensorInfo) -> None:
    expected = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if len(bias.shape) != 4:
        raise ValueError(f"attn_bias must be 4-D, broadcastable to (batch, heads, seqlen_q, seqlen_k) = "
                         f"{expected}; got shape {tuple(bias.shape)} ({FRONT_END_BROADCASTS})")
    names = ("batch", "heads", "seqlen_q", "seqlen_k")
    for dim, (got, want) in enumerate(zip(bias.shape, expected)):
        if got not in (1, want):
            raise ValueError(f"attn_bias dim {dim} ({names[dim]}) is {got}; expected {want}"
                             + (" or 1 to broadcast" if want != 1 else ""))
    if bias.dtype != "bool" and bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"attn_bias has dtype {bias.dtype}; expected bool (a mask, True = keep) or a floating "
                        f"dtype (an additive bias), as SDPA: convert a 0/1 keep-mask to bool, an additive integer "
                        f"bias to q's dtype")
    if bias.device != q.device:
        raise ValueError(f"attn_bias is on {bias.device} but q is on {q.device}; all inputs must be on one device")


def check_backward_inputs(q: TensorInfo, v: TensorInfo, dout: TensorInfo, out: TensorInfo, lse: TensorInfo,
                          dlse: TensorInfo | None = None) -> None:
    """The backward's own inputs, beside q, k, v and the bias (check_attention_inputs): the forward's out and lse,
    the gradient of out, shaped (B, H, Nq, v's head dim), and that of lse, shaped as lse, or None."""
    want = (*q.shape[:3], v.shape[3])
    for t in (dout, out):
        if tuple(t.shape) != want or t.dtype != q.dtype:
            raise ValueError(f"{t.name} must be shaped like the output, (batch, heads, seqlen_q, v's head_dim) = "
                             f"{want}, in q's dtype {q.dtype}; got {tuple(t.shape)} {t.dtype}")
    if lse.shape != q.shape[:-1] or lse.dtype != "float32":
        raise ValueError(f"lse must be float32 of shape (batch, heads, seqlen_q) = {q.shape[:-1]}, "
                         f"got {lse.dtype} {lse.shape}")
    if dlse is not None and (dlse.shape != q.shape[:-1] or dlse.dtype != "float32"):
        raise ValueError(f"dlse (the gradient of lse) must be float32 of shape (batch, heads, seqlen_q) = "
                         f"{q.shape[:-1]}, got {dlse.dtype} {dlse.shape}")
    for t in (dout, out, lse) + (() if dlse is None else (dlse,)):
        if t.device != q.device:
            raise ValueError(f"{t.name} is on {t.device} but q is on {q.device}; all inputs must be on one device")


def check_bias_grad(bias_dtype: str | None, bias_grad: bool) -> None:
    """``bias_dtype``: the bias's dtype name, None without a bias."""
    if not bias_grad:
        return
    if bias_dtype is None:
        raise ValueError("bias_grad=True needs attn_bias; without a bias there is no gradient to return")
    if bias_dtype == "bool":
        raise ValueError("bias_grad=True but attn_bias is a boolean mask, which has no gradient; pass an additive "
                         "float bias or bias_grad=False")


def check_softcap(softcap: float) -> None:
    """softcap = 0 is off; otherwise logits become softcap · tanh(logits / softcap)."""
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap is {softcap}; expected a finite cap > 0 on the logits, or 0 for none")


def check_real(name: str, x, expected: str) -> float:
    """float(x) for a real number (bools and strings refused, which float() would take); names `name` otherwise."""
    if type(x) is float or type(x) is int:  # the common case, without the slower ABC check
        return float(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} is a {type(x).__name__}; expected {expected}")
    return float(x)


def default_scale(head_dim: int) -> float:
    """1/sqrt(head_dim); with head_dim 0 every logit is the bias alone, whatever the scale, so 1."""
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"scale is {scale}; expected a finite float (the default is 1/sqrt(head_dim))")


def check_causal(causal) -> None:
    """A bool, not anything truthy: causal='no' would mean True."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal is a {type(causal).__name__} ({causal!r}); expected True or False")


def check_window(window) -> tuple:
    """(left, right) ints from ``window``: a pair of ints, keys around the diagonal (-1: unbounded), or None for
    no window; anything else is refused naming ``window`` and what was expected."""
    if window is None:
        return -1, -1
    if type(window) is tuple and len(window) == 2 and type(window[0]) is int and type(window[1]) is int:
        left, right = window  # the common case, without the generic path below
    else:
        left, right = _window_pair(window)
    for name, w in (("window[0] (left)", left), ("window[1] (right)", right)):
        if w < -1:
            raise ValueError(f"{name} is {w}; expected a number of keys >= 0, or -1 for unbounded")
        if w > INT64_MAX:  # the ops take int64; any edge past the last key is unbounded anyway
            raise ValueError(f"{name} is {w}; expected at most 2**63 - 1 keys, or -1 for unbounded")
    return left, right


def _window_pair(window) -> tuple:
    try:
        if isinstance(window, (str, bytes)) or any(isinstance(w, bool) for w in window):
            raise TypeError
        left, right = (operator.index(w) for w in window)
    except (TypeError, ValueError):
        raise TypeError(f"window is {window!r}; expected (left, right): two ints, keys around the diagonal, "
                        f"-1 for unbounded (or None for no window)") from None
    return left, right


def effective_window(window: tuple, n_q: int, n_k: int) -> tuple:
    """The window with edges that reach past every key written -1 (unbounded): the same visible keys, and within
    the kernels' int32 arguments. Key j is visible to query i iff i + Nk - Nq - left <= j <= i + Nk - Nq + right,
    so left >= Nk - 1 or right >= Nq - 1 bounds nothing."""
    if window == (-1, -1):
        return window
    return tuple(-1 if w >= max(n_q, n_k) else w for w in window)
