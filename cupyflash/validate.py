"""Input checks shared by the CuPy face and the torch op: every error names the tensor, the dimension and
what was expected."""
from __future__ import annotations

import math
from dataclasses import dataclass

# Head dims the CUDA kernels are instantiated for (the tile table in cupyflash/tiles.py has one row each).
GPU_HEAD_DIMS = (32, 64, 96, 128, 256)
# float32 runs on TF32 tensor cores (10-bit mantissa), so it is taken only where the caller allows TF32.
GPU_DTYPES = ("float16", "bfloat16", "float32")
MAX_GRID_YZ = 65535
TF32_HOW = ("allow TF32 with torch.backends.cuda.matmul.allow_tf32 = True or "
            "torch.set_float32_matmul_precision('high') (torch), or allow_tf32=True (CuPy face), "
            "or pass float16/bfloat16")


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
        raise ValueError(f"batch (dim 0) must match: q has {q.shape[0]}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same heads (dim 1): k has {k.shape[1]}, v has {v.shape[1]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"heads (dim 1) of q must be a multiple of those of k and v (grouped-query attention): "
                         f"q has {q.shape[1]}, k and v have {k.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same seqlen (dim 2): k has {k.shape[2]}, v has {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim (dim 3): q has {q.shape[3]}, k has {k.shape[3]}")
    if v.shape[3] != q.shape[3]:
        raise ValueError(f"v must have the head_dim of q (dim 3): expected {q.shape[3]}, got {v.shape[3]}")
    for t in (k, v):
        if t.dtype != q.dtype:
            raise TypeError(f"{t.name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{t.name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"seqlen (dim 2) must be at least 1: q has {q.shape[2]}, k has {k.shape[2]}")
    if bias is not None:
        _check_bias(bias, q, k)
    if not on_gpu:
        return
    if not q.device.startswith("cuda"):
        raise ValueError(f"q is on {q.device}; the CUDA kernels need tensors on a CUDA device")
    if q.dtype not in GPU_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; the CUDA kernels take {', '.join(GPU_DTYPES)}")
    if q.dtype == "float32" and not tf32_allowed:
        raise TypeError(f"q has dtype float32: the CUDA kernels run float32 on TF32 tensor cores (10-bit "
                        f"mantissa), which the caller has not allowed; {TF32_HOW}")
    if q.shape[3] not in GPU_HEAD_DIMS:
        raise ValueError(f"head_dim (dim 3 of q) is {q.shape[3]}; the CUDA kernels support {GPU_HEAD_DIMS}")
    # The kernels' grids put heads on gridDim.y and batch on gridDim.z, each at most 65535.
    for dim, name in ((0, "batch"), (1, "heads")):
        if q.shape[dim] > MAX_GRID_YZ:
            raise ValueError(f"q has {q.shape[dim]} {name} (dim {dim}); the CUDA kernels take at most {MAX_GRID_YZ}: "
                             f"split the call along that dim")
    for t in (q, k, v):
        if t.strides[3] != 1 and 0 not in t.shape:  # an empty array's strides are arbitrary (CuPy gives 0)
            raise ValueError(f"{t.name} must be contiguous in its last dim (head_dim, dim 3): stride is "
                             f"{t.strides[3]}, expected 1")


def _check_bias(bias: TensorInfo, q: TensorInfo, k: TensorInfo) -> None:
    expected = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if len(bias.shape) != 4:
        raise ValueError(f"attn_bias must be 4-D, broadcastable to (batch, heads, seqlen_q, seqlen_k) = "
                         f"{expected}; got shape {tuple(bias.shape)}")
    names = ("batch", "heads", "seqlen_q", "seqlen_k")
    for dim, (got, want) in enumerate(zip(bias.shape, expected)):
        if got not in (1, want):
            raise ValueError(f"attn_bias dim {dim} ({names[dim]}) is {got}; expected {want} or 1 to broadcast")
    if bias.device != q.device:
        raise ValueError(f"attn_bias is on {bias.device} but q is on {q.device}")


def check_softcap(softcap: float) -> None:
    """softcap = 0 is off; otherwise logits become softcap · tanh(logits / softcap)."""
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap is {softcap}; expected a finite cap > 0 on the logits, or 0 for none")
