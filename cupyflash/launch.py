"""Kernel launches on raw device pointers: ``execute`` writes a call's addresses into the parameter structs of a
plan's launches (cupyflash/plan.py, cupyflash/params.py) and launches its kernels; what the Hopper kernels take; the
bias's tile classification. Both faces (torch op, CuPy arrays) reach it through cupyflash/cuda_path.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass

from . import driver, jit, params, tiles, tma
from .params import Buf
from .validate import kernel_head_dim

log = logging.getLogger(__name__)

def rows_aligned(ptr: int, row_strides_bytes) -> bool:
    """Whether every (b, h, n) row of a tensor starts 16-byte aligned, as the kernels' 16-byte cp.async copies
    need; the faces copy a tensor to contiguous memory when not."""
    return ptr % 16 == 0 and all(s % 16 == 0 for s in row_strides_bytes)


@functools.lru_cache(maxsize=None)
def _function(variant: jit.Variant, device_id: int) -> tuple:
    """(CuPy's kernel, its CUfunction handle) of `variant` on `device_id`, which must be current; the kernel is
    kept so that its handle stays valid."""
    kernel = jit.get_kernel(variant, device_id)
    return kernel, kernel.kernel.ptr


def _device(device_id: int):
    """`device_id` made current for the block, switched only when it is not already (entering cupy.cuda.Device
    costs more than the launch)."""
    import cupy

    return contextlib.nullcontext() if cupy.cuda.runtime.getDevice() == device_id else cupy.cuda.Device(device_id)


def _run(variant: jit.Variant, grid, block, packed: params.Packed, stream_ptr: int, device_id: int):
    """One launch of `variant` with its parameter struct packed at this call: the launches outside a plan."""
    with _device(device_id):
        driver.launch(_function(variant, device_id)[1], driver.dims(grid, block), variant.shared_bytes, stream_ptr,
                      driver.ArgBlock(packed.template, (), packed.struct.param_offsets).params({}))


def _run_step(step, ptrs: dict, stream_ptr: int, device_id: int) -> None:
    """One launch of a plan's step: its parameter struct was packed with the plan, the call writes its addresses."""
    driver.launch(_function(step.variant, device_id)[1], step.dims, step.shared_bytes, stream_ptr,
                  step.arg_block.params(ptrs))


@dataclass(frozen=True)
class ScoreMods:
    """Everything beyond softmax(scale · Q Kᵀ) (kernels_cu/scores.cuh defines each)."""

    bias: Buf | None = None  # (B, H, Nq, Nk) strides, 0 along broadcast dims
    bias_f32: bool = False  # else the bias has q's dtype
    tile_classes: Buf | None = None  # int8 TileClass per tile of the plan's kernel (cupyflash/tile_classes.py)
    dbias: Buf | None = None  # fp32 accumulator shaped like the bias (backward only)
    window: tuple = (-1, -1)  # (left, right) keys around the diagonal; -1: unbounded
    dropout_p: float = 0.0
    seed_ptr: int = 0  # device address of the int64 dropout seed (read by the kernels, so CUDA graphs replay it)
    softcap: float = 0.0  # logits = softcap · tanh(scale · q·k / softcap); 0: off
    # A scale <= 0: the plain Hopper forward takes each row's max on the unscaled scores and folds the scale into
    # exp2's FFMA, right for a scale > 0 only (masked scores, -inf, would turn NaN or +inf); the variant with the
    # mods compiled in scales first there (kernels_cu/flash_fwd_sm90.cuh).
    scale_not_positive: bool = False

    @property
    def any(self) -> bool:
        """Whether the kernel variant with these features compiled in is needed."""
        return (self.bias is not None or self.window != (-1, -1) or self.dropout_p > 0 or self.softcap > 0
                or self.scale_not_positive)


SM90_ENV = "CUPYFLASH_SM90"  # "0": the mma.sync kernels on Hopper too (A/B runs, bisecting)
# Backward calls with a bias apply the rebuild rule (cupyflash/cpu_attention.py) in the kernels: the row_lse
# workspace and the forward's stats pass (plan._stats_step). "0" turns it off (A/B runs, bisecting).
LSE_REBUILD_ENV = "CUPYFLASH_LSE_REBUILD"


def lse_rebuild_enabled() -> bool:
    return os.environ.get(LSE_REBUILD_ENV, "1") != "0"


def sm90_unsupported(kernel: str, *, dtype: str, shape: tuple, n_k: int, kv_heads: int, q_like: dict, kv: dict,
                     mods: ScoreMods, compute_capability: int) -> str | None:
    """Why the Hopper kernel of pass `kernel` ("fwd": kernels_cu/flash_fwd_sm90.cuh, "bwd": flash_bwd_sm90.cuh)
    does not take this call; None when it does. `q_like` / `kv`: the Bufs it reads through TMA, by name, shaped as
    q / as k. Every call it declines runs on the mma.sync kernel of that pass, which takes all."""
    if os.environ.get(SM90_ENV, "1") == "0":
        return f"{SM90_ENV}=0"
    # A buffer's address matters only modulo 16 (TMA's alignment), so the answer is cached by layout: it was 7.6 µs
    # of an H100 host's ~125 per forward.
    layouts = tuple(tuple((name, buf.strides, buf.ptr % 16) for name, buf in names.items()) for names in (q_like, kv))
    return _sm90_reason(kernel, dtype, tuple(shape), n_k, kv_heads, layouts, mods.dropout_p > 0,
                        compute_capability)


@functools.lru_cache(maxsize=1024)
def _sm90_reason(kernel: str, dtype: str, shape: tuple, n_k: int, kv_heads: int, layouts: tuple, dropout: bool,
                 compute_capability: int) -> str | None:
    """sm90_unsupported's answer; `layouts`: ((name, strides, address % 16) of each q-like buffer, then of k, v)."""
    batch, heads, n_q, d = shape
    table = tiles.sm90_table(kernel)
    if compute_capability != 90:
        return f"sm_{compute_capability}: wgmma and TMA are sm_90a instructions"
    if dtype not in jit.SM90_DTYPES:
        return f"dtype {dtype}: it takes {' and '.join(jit.SM90_DTYPES)}"
    if d not in table:
        return f"head_dim {d}: it takes {tuple(table)}"
    if dropout and not table[d].dropout:
        if table[d].wide:
            return f"dropout at head_dim {d}: its Hopper kernel has none (tiles.Sm90Tiles.dropout)"
        return f"dropout at head_dim {d}: its Hopper variant spilled registers (tiles.Sm90Tiles.dropout)"
    if 0 in shape:
        return f"an empty tensor {shape}"
    kv_shape = (batch, kv_heads, n_k, d)
    for named, buf_shape in zip(layouts, (shape, kv_shape)):
        for name, strides, address in named:
            reason = tma.unsupported_reason(buf_shape, strides, jit.ELEM_BYTES[dtype], address)
            if reason is not None:
                return f"{name}: {reason}"
    return None


def sm90_variant(kernel: str, dtype: str, head_dim: int, causal: bool, mods: ScoreMods) -> tuple:
    """(variant, mods) the Hopper kernel of pass `kernel` runs a call with. With score mods a causal mask is the
    window's right edge at the diagonal, which the kernels apply alike (scores.cuh make_score_mods), so causal calls
    take the non-causal variant with right = 0: a third fewer variants to compile (CI's compile check)."""
    if mods.any and causal:
        causal, mods = False, dataclasses.replace(mods, window=(mods.window[0], 0))
    return jit.Variant(f"{kernel}_sm90", dtype, head_dim, causal, mods.any, mods.dropout_p > 0), mods


# ---- launching

def execute(plan, ptrs: dict, stream_ptr: int, device_id: int) -> None:
    """Launches `plan`'s kernels (cupyflash/plan.py) on the stream with the call's addresses (`ptrs`: buffer name →
    device address, for each name in plan.needs)."""
    if plan.family != "hopper":
        log.debug("%s on mma.sync: %s", "forward" if plan.layout.kernel == "fwd" else "backward", plan.why)
    with _device(device_id):
        for step in plan.steps:
            _run_step(step, ptrs, stream_ptr, device_id)


def run_sharing_params(steps, ptrs: dict, stream_ptr: int, device_id: int) -> None:
    """Launches plan Steps (cupyflash/plan.py) whose kernels take one parameter struct, the same bytes: filled with
    the call's addresses once, for every launch (the driver copies it at each)."""
    params = steps[0].arg_block.params(ptrs)
    with _device(device_id):
        for step in steps:
            driver.launch(_function(step.variant, device_id)[1], step.dims, step.shared_bytes, stream_ptr, params)


def tile_grid(bias_shape: tuple, br: int, bc: int) -> tuple:
    """(tq, tk, QB, KB): the tiles of a pass's Br x Bc blocks over the bias's own (broadcast) shape; a size-1
    query or key dim is one tile of size 1 (cupyflash/tile_classes.py)."""
    _, _, nq, nk = bias_shape
    tq, tk = (br if nq > 1 else 1), (bc if nk > 1 else 1)
    return tq, tk, math.ceil(nq / tq), math.ceil(nk / tk)


def classify_tiles(*, dtype: str, bias: Buf, bias_shape: tuple, bias_f32: bool, br: int, bc: int, window: bool,
                   alloc, stream_ptr: int, device_id: int):
    """The int8 (Bb, Hb, QB, KB) TileClass of each bias tile (definition: cupyflash/tile_classes.py), computed on
    the GPU in two launches. `alloc(shape, dtype_name, zeroed)` returns (array, Buf) in the caller's library."""
    bb, hb, nq, _ = bias_shape
    tq, tk, n_qb, n_kb = tile_grid(bias_shape, br, bc)
    n_tiles = bb * hb * n_qb * n_kb
    # Every workspace stays referenced until both launches are queued: a freed one would be handed straight to
    # the next allocation on this stream (torch's and CuPy's pools), aliasing two buffers.
    classes, classes_buf = alloc((bb, hb, n_qb, n_kb), "int8", False)
    lo_arr, lo = alloc((n_tiles,), "float32", False)
    hi_arr, hi = alloc((n_tiles,), "float32", False)
    keeps_arr, row_keeps = alloc((bb * hb * nq,), "int32", True)
    # 16-byte loads need unit key stride, 16-byte aligned rows and tiles (sizes in elements)
    per16 = 16 // (4 if bias_f32 else jit.ELEM_BYTES[dtype])
    vec16 = (bias.strides[3] == 1 and tk % per16 == 0
             and rows_aligned(bias.ptr, [s * 16 // per16 for s in bias.strides[:3]]))
    minmax = jit.Variant("tile_minmax", dtype, 0)
    _run(minmax, (n_tiles,), (CLASS_THREADS,),
         params.TILE_MINMAX.pack(dict(bias=bias.ptr, bias_f32=int(bias_f32), bias_s=tuple(bias.strides[:4]), Hb=hb,
                                      nq=nq, nk=bias_shape[3], tq=tq, tk=tk, QB=n_qb, KB=n_kb, vec16=int(vec16),
                                      tile_min=lo.ptr, tile_max=hi.ptr, row_keeps=row_keeps.ptr)),
         stream_ptr, device_id)
    classify = jit.Variant("tile_classify", dtype, 0)
    _run(classify, (math.ceil(n_tiles / CLASS_THREADS),), (CLASS_THREADS,),
         params.TILE_CLASSIFY.pack(dict(tile_min=lo.ptr, tile_max=hi.ptr, row_keeps=row_keeps.ptr, nq=nq, tq=tq,
                                        QB=n_qb, KB=n_kb, n_tiles=n_tiles, window=int(window),
                                        classes=classes_buf.ptr)),
         stream_ptr, device_id)
    del lo_arr, hi_arr, keeps_arr  # freed only now, after both launches are on the stream
    return classes


CLASS_THREADS = 128  # kernels_cu/tile_classes.cuh kClassThreads


def require_backward(head_dim: int, dtype: str) -> None:
    """Raises NotImplementedError for a head dim and dtype with no backward kernel (before the faces classify bias
    tiles)."""
    why = tiles.no_backward_why(dtype, head_dim, kernel_head_dim(head_dim))
    if why is not None:
        raise NotImplementedError(why)
