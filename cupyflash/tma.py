"""TMA tensor maps for the Hopper (sm_90a) kernels: the CUDA driver's cuTensorMapEncodeTiled, called through ctypes
(neither CuPy nor torch exposes it), encodes a (B, H, N, D) view as a 4-d map whose box is 64 columns x `rows` rows
with the 128-byte swizzle that the kernels' SwTile layout and wgmma descriptors read (kernels_cu/wgmma.cuh).
The map travels to the kernel by value: 128 bytes inside the launch's parameter struct (cupyflash/params.py)."""
from __future__ import annotations

import ctypes
import functools

MAP_BYTES = 128  # CUtensorMap: opaque bytes (cuda.h); the kernels declare it as TmaDesc (kernels_cu/params.cuh)
# cuda.h enums: CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion (https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__TENSOR__MEMORY.html)
_DATA_TYPE = {"float16": 6, "bfloat16": 9}
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
_BOX_COLS = 64  # the 128-byte swizzle's widest box: 64 two-byte elements


@functools.cache
def _encode_fn():
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    return fn


def _strides(shape, strides) -> tuple:
    """The view's strides with each size-1 dim's (any value, as torch allows) replaced by the contiguous one: TMA
    checks every stride, and only index 0 is ever read along that dim."""
    out = list(strides)
    for i in (2, 1, 0):
        if shape[i] == 1:
            out[i] = shape[i + 1] * out[i + 1]
    return tuple(out)


def unsupported_reason(shape, strides, element_size: int, data_ptr: int) -> str | None:
    """Why a (B, H, N, D) view cannot be a TMA map of our boxes, or None when it can."""
    *_, d = shape
    strides = _strides(shape, strides)
    if strides[-1] != 1:
        return f"its last dimension must be contiguous (stride {strides[-1]}, expected 1)"
    if d % 8:
        return f"head dim {d} is not a multiple of 8 (16-byte rows)"
    if data_ptr % 16:
        return "its data pointer is not 16-byte aligned"
    if any((s * element_size) % 16 for s in strides[:3]):
        return f"strides {tuple(strides[:3])} are not all multiples of 16 bytes"
    if 0 in strides[:3]:
        return f"strides {tuple(strides[:3])} broadcast a dimension (stride 0)"
    return None


# A map is a pure function of its arguments, and training loops hand the same buffers back (torch's caching
# allocator): the cache saves the driver call on most launches.
@functools.lru_cache(maxsize=1024)
def encode(dtype_name: str, shape: tuple, strides: tuple, element_size: int, data_ptr: int, rows: int) -> bytes:
    """The tensor map (MAP_BYTES bytes) of a (B, H, N, D) view (strides in elements) with boxes of `rows` x 64
    elements."""
    b, h, n, d = shape
    strides = _strides(shape, strides)
    desc = (ctypes.c_uint64 * 16)()
    dims = (ctypes.c_uint64 * 4)(d, n, h, b)  # innermost first
    byte_strides = (ctypes.c_uint64 * 3)(*(s * element_size for s in (strides[2], strides[1], strides[0])))
    box = (ctypes.c_uint32 * 4)(_BOX_COLS, rows, 1, 1)
    unit = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    err = _encode_fn()(ctypes.byref(desc), _DATA_TYPE[dtype_name], 4, ctypes.c_void_p(data_ptr), dims, byte_strides,
                       box, unit, 0, _SWIZZLE_128B, _L2_PROMOTION_128B, 0)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {err}) for shape {tuple(shape)}, strides "
                           f"{tuple(strides)}; this is a bug in cupyflash, please report it.")
    return bytes(desc)
