"""Kernel launches on raw device pointers: the kernels' argument lists (built once per call layout by
cupyflash/plan.py, with placeholders for the addresses) and ``execute``, which fills in a call's addresses and
launches a plan's kernels. Both faces (torch op, CuPy arrays) reach it through cupyflash/cuda_path.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import driver, jit, tma
from .validate import kernel_head_dim
from .tiles import BACKWARD, BACKWARD_SM90, FORWARD_SM90

log = logging.getLogger(__name__)

_U64 = struct.Struct("<Q")
LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2 e): the kernels use exp2 with the scale folded in


@dataclass(frozen=True)
class Buf:
    """A (B, H, N, D) or (B, H, N) device buffer: its address and its strides in elements."""

    ptr: int
    strides: tuple

    def bhn(self) -> list:
        return [np.int64(s) for s in self.strides[:3]]


def rows_aligned(ptr: int, row_strides_bytes) -> bool:
    """Whether every (b, h, n) row of a tensor starts 16-byte aligned, as the kernels' 16-byte cp.async copies
    need; the faces copy a tensor to contiguous memory when not."""
    return ptr % 16 == 0 and all(s % 16 == 0 for s in row_strides_bytes)


class Slot(NamedTuple):
    """A placeholder in a plan's argument template for the device address of buffer `name`, filled at each call."""

    name: str

    nbytes = 8

    def fill(self, ptrs: dict):
        return np.uint64(ptrs[self.name])

    def write(self, buf, start: int, ptrs: dict) -> None:
        """fill's bytes into `buf` at `start` (driver.ArgBlock), without building the NumPy scalar."""
        _U64.pack_into(buf, start, ptrs[self.name])


class TmaSlot(NamedTuple):
    """A placeholder for the TMA map of buffer `name` (a (B, H, N, D) view with boxes of `rows` rows): the map holds
    the address, so it is encoded at the call (tma.encode caches it per address)."""

    name: str
    dtype: str
    shape: tuple
    strides: tuple
    rows: int

    nbytes = tma.TMA_DESC.itemsize

    def fill(self, ptrs: dict):
        return np.frombuffer(self._map(ptrs), dtype=tma.TMA_DESC)[0]

    def write(self, buf, start: int, ptrs: dict) -> None:
        buf[start:start + self.nbytes] = self._map(ptrs)

    def _map(self, ptrs: dict) -> bytes:
        return tma.encode(self.dtype, self.shape, self.strides, jit.ELEM_BYTES[self.dtype], ptrs[self.name],
                          self.rows)


def _address(ptr):
    """A kernel's pointer argument: the address, or the plan's Slot standing for it."""
    return ptr if isinstance(ptr, Slot) else np.uint64(ptr)


def _ptr(b: Buf):
    return _address(b.ptr)


def _optional_ptr(b: Buf | None):
    """A nullable pointer argument: null for None."""
    return np.uint64(0) if b is None else _ptr(b)


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


def _run(variant: jit.Variant, grid, block, args, stream_ptr: int, device_id: int, shared_bytes: int | None = None):
    """One launch of `variant` with `args` (NumPy scalars) packed at this call: the launches outside a plan."""
    with _device(device_id):
        driver.launch(_function(variant, device_id)[1], driver.dims(grid, block),
                      variant.shared_bytes if shared_bytes is None else shared_bytes, stream_ptr,
                      driver.ArgBlock(args).params({}))


def _run_step(step, ptrs: dict, stream_ptr: int, device_id: int) -> None:
    """One launch of a plan's step: its argument block was packed with the plan, the call writes its addresses."""
    driver.launch(_function(step.variant, device_id)[1], step.dims, step.shared_bytes, stream_ptr,
                  step.arg_block.params(ptrs))


NO_WINDOW = 1 << 30  # a window edge farther than any sequence: unbounded


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

    @property
    def any(self) -> bool:
        """Whether the kernel variant with these features compiled in is needed."""
        return self.bias is not None or self.window != (-1, -1) or self.dropout_p > 0 or self.softcap > 0

    def bias_args(self, buf: Buf | None) -> tuple:
        if buf is None:
            return (np.uint64(0), *[np.int64(0)] * 4)
        return (_ptr(buf), *[np.int64(s) for s in buf.strides[:4]])

    def window_args(self) -> tuple:
        return tuple(np.int32(NO_WINDOW if w < 0 else w) for w in self.window)

    def dropout_args(self) -> tuple:
        keep = 1.0 - self.dropout_p
        # An element is kept iff its 32-bit Philox word < threshold; 0xffffffff means "no dropout" (scores.cuh).
        threshold = 0xFFFFFFFF if self.dropout_p == 0 else min(0xFFFFFFFF, int(keep * 2.0 ** 32))
        if self.dropout_p > 0 and not self.seed_ptr:
            raise ValueError("dropout needs the device address of its seed (seed_ptr)")
        return np.uint32(threshold), np.float32(1.0 / keep), _address(self.seed_ptr)

    def softcap_args(self, scale: float) -> tuple:
        """(scale / softcap, softcap · log2 e): the kernels' tanh argument and log2-unit logit scale (0: off)."""
        if self.softcap <= 0:
            return np.float32(0.0), np.float32(0.0)
        return np.float32(scale / self.softcap), np.float32(self.softcap * LOG2E)


SM90_ENV = "CUPYFLASH_SM90"  # "0": the mma.sync kernels on Hopper too (A/B runs, bisecting)
# "1": backward calls with a bias apply the rebuild rule (cupyflash/cpu_attention.py) in the kernels: the row_lse
# workspace and the forward's stats pass (plan._stats_step). Off by default until its GPU tests
# (tests/test_gpu_masked_rows.py) have run: written while no GPU could be had.
LSE_REBUILD_ENV = "CUPYFLASH_LSE_REBUILD"


def lse_rebuild_enabled() -> bool:
    return os.environ.get(LSE_REBUILD_ENV, "0") == "1"


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
    return _sm90_reason(kernel, dtype, tuple(shape), n_k, kv_heads, layouts, mods.any, compute_capability)


@functools.lru_cache(maxsize=1024)
def _sm90_reason(kernel: str, dtype: str, shape: tuple, n_k: int, kv_heads: int, layouts: tuple, mods_any: bool,
                 compute_capability: int) -> str | None:
    """sm90_unsupported's answer; `layouts`: ((name, strides, address % 16) of each q-like buffer, then of k, v)."""
    batch, heads, n_q, d = shape
    table = FORWARD_SM90 if kernel == "fwd" else BACKWARD_SM90
    if compute_capability != 90:
        return f"sm_{compute_capability}: wgmma and TMA are sm_90a instructions"
    if dtype not in jit.SM90_DTYPES:
        return f"dtype {dtype}: it takes {' and '.join(jit.SM90_DTYPES)}"
    if d not in table:
        return f"head_dim {d}: it takes {tuple(table)}"
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


def sm90_mods_args(kernel: str, mods: ScoreMods, tiles, scale: float, row_lse: Buf | None = None) -> tuple:
    """The score-mod arguments of the Hopper kernel of pass `kernel` (after its scales): the mma.sync kernel's,
    with the tile classes' tile size after their strides (the plan classifies the bias in this kernel's tiles;
    kernels_cu/scores.cuh tile_class_span also combines smaller ones), and in the backward `row_lse` (nullable: the
    rows' (hi, lo) pairs of a call with a bias, cupyflash/plan.py). No-ops for the plain variants."""
    cls_tq, cls_tk = (tiles.Br, tiles.Bc) if mods.tile_classes is not None else (1, 1)
    dbias = mods.bias_args(mods.dbias) if kernel == "bwd" else ()
    rows = (_optional_ptr(row_lse),) if kernel == "bwd" else ()
    return (*mods.bias_args(mods.bias), np.int32(mods.bias_f32), *mods.bias_args(mods.tile_classes),
            np.int32(cls_tq), np.int32(cls_tk), *dbias, *mods.window_args(), *mods.dropout_args(),
            *mods.softcap_args(scale), *rows)


def _tma_maps(dtype: str, bufs) -> list:
    """The tensor maps of (Buf, (B, H, N, D) shape, box rows) triples, as TmaSlots of the plan's template."""
    return [TmaSlot(buf.ptr.name, dtype, tuple(shape), tuple(buf.strides), rows) for buf, shape, rows in bufs]


# ---- argument lists (kernels_cu: the kernels' parameters, in order); Bufs' addresses are the plan's Slots

def sm90_forward_args(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, out: Buf,
                      lse: Buf, scale: float, mods: ScoreMods, tiles) -> tuple:
    """kernels_cu/flash_fwd_sm90.cuh flash_fwd_sm90_kernel's arguments."""
    batch, heads, n_q, d = shape
    kv_shape = (batch, kv_heads, n_k, d)
    maps = _tma_maps(dtype, ((q, shape, tiles.Br), (k, kv_shape, tiles.Bc), (v, kv_shape, tiles.Bc)))
    return (*maps, _ptr(out), _ptr(lse), *out.bhn(), np.int32(n_q), np.int32(n_k), np.int32(heads // kv_heads),
            np.float32(scale * LOG2E), *sm90_mods_args("fwd", mods, tiles, scale))


def mma_forward_args(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, out: Buf,
                     lse: Buf, scale: float, mods: ScoreMods, tiles, row_stats: Buf | None = None) -> tuple:
    """kernels_cu/flash_fwd.cuh flash_fwd_kernel's arguments; with `row_stats`, its stats mode (`lse` read, `out`
    never written)."""
    batch, heads, n_q, d = shape
    return (_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), *q.bhn(), *k.bhn(), *v.bhn(), *out.bhn(),
            np.int32(n_q), np.int32(n_k), np.int32(heads // kv_heads), np.float32(scale * LOG2E),
            *mods.bias_args(mods.bias), np.int32(mods.bias_f32), *mods.bias_args(mods.tile_classes),
            *mods.window_args(), *mods.dropout_args(), *mods.softcap_args(scale), _optional_ptr(row_stats))


def sm90_backward_args(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, dout: Buf,
                       lse: Buf, d_vec: Buf, dq_accum: Buf, dk: Buf, dv: Buf, scale: float, mods: ScoreMods,
                       tiles, row_lse: Buf | None = None) -> tuple:
    """kernels_cu/flash_bwd_sm90.cuh flash_bwd_sm90_kernel's arguments."""
    batch, heads, n_q, d = shape
    kv_shape = (batch, kv_heads, n_k, d)
    maps = _tma_maps(dtype, ((q, shape, tiles.Br), (k, kv_shape, tiles.Bc), (v, kv_shape, tiles.Bc),
                             (dout, shape, tiles.Br)))
    return (*maps, _ptr(lse), _ptr(d_vec), _ptr(dq_accum), _ptr(dk), _ptr(dv), *dk.bhn(), *dv.bhn(),
            np.int32(n_q), np.int32(n_k), np.int32(heads // kv_heads), np.float32(scale * LOG2E), np.float32(scale),
            *sm90_mods_args("bwd", mods, tiles, scale, row_lse))


def mma_backward_args(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, dout: Buf,
                      lse: Buf, d_vec: Buf, dq_accum: Buf, dk: Buf, dv: Buf, scale: float, mods: ScoreMods,
                      tiles, row_lse: Buf | None = None) -> tuple:
    """kernels_cu/flash_bwd.cuh flash_bwd_kernel's arguments; `row_lse`: the rows' (hi, lo) pairs that replace the
    LSE (a backward with a bias, cupyflash/plan.py)."""
    batch, heads, n_q, d = shape
    return (_ptr(q), _ptr(k), _ptr(v), _ptr(dout), _ptr(lse), _ptr(d_vec), _ptr(dq_accum), _ptr(dk), _ptr(dv),
            *q.bhn(), *k.bhn(), *v.bhn(), *dout.bhn(), *dk.bhn(), *dv.bhn(), np.int32(n_q), np.int32(n_k),
            np.int32(heads // kv_heads), np.float32(scale * LOG2E), np.float32(scale),
            *mods.bias_args(mods.bias), np.int32(mods.bias_f32), *mods.bias_args(mods.tile_classes),
            *mods.bias_args(mods.dbias), *mods.window_args(), *mods.dropout_args(), *mods.softcap_args(scale),
            _optional_ptr(row_lse))


def preprocess_args(*, dout: Buf, out: Buf, d_vec: Buf, dq_accum: Buf, heads: int, n_q: int, n_rows: int,
                    lse: Buf | None = None, row_lse: Buf | None = None) -> tuple:
    """kernels_cu/flash_bwd.cuh flash_bwd_preprocess's arguments: D = rowsum(dO ∘ O), dQ_accum zeroed; with `lse`
    and `row_lse` (contiguous), row_lse = (lse · log2 e, 0) too."""
    if (lse is None) != (row_lse is None):
        raise ValueError("the preprocess writes row_lse from lse: pass both or neither")
    return (_ptr(dout), _ptr(out), _ptr(d_vec), _ptr(dq_accum), *dout.bhn(), *out.bhn(), np.int32(heads),
            np.int32(n_q), np.int64(n_rows), _optional_ptr(lse), _optional_ptr(row_lse))


def convert_dq_args(*, dq_accum: Buf, dq: Buf, heads: int, n_q: int, n_rows: int, scale: float) -> tuple:
    """kernels_cu/flash_bwd.cuh flash_bwd_convert_dq's arguments."""
    return (_ptr(dq_accum), _ptr(dq), *dq.bhn(), np.int32(heads), np.int32(n_q), np.int64(n_rows),
            np.float32(scale))


# ---- launching

def execute(plan, ptrs: dict, stream_ptr: int, device_id: int) -> None:
    """Launches `plan`'s kernels (cupyflash/plan.py) on the stream with the call's addresses (`ptrs`: buffer name →
    device address, for each name in plan.needs)."""
    if plan.family != "hopper":
        log.debug("%s on mma.sync: %s", "forward" if plan.layout.kernel == "fwd" else "backward", plan.why)
    with _device(device_id):
        for step in plan.steps:
            _run_step(step, ptrs, stream_ptr, device_id)


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
         (_ptr(bias), np.int32(bias_f32), *[np.int64(x) for x in bias.strides[:4]], np.int32(hb), np.int32(nq),
          np.int32(bias_shape[3]), np.int32(tq), np.int32(tk), np.int32(n_qb), np.int32(n_kb), np.int32(vec16),
          _ptr(lo), _ptr(hi), _ptr(row_keeps)), stream_ptr, device_id)
    classify = jit.Variant("tile_classify", dtype, 0)
    _run(classify, (math.ceil(n_tiles / CLASS_THREADS),), (CLASS_THREADS,),
         (_ptr(lo), _ptr(hi), _ptr(row_keeps), np.int32(nq), np.int32(tq), np.int32(n_qb), np.int32(n_kb),
          np.int64(n_tiles), np.int32(window), _ptr(classes_buf)), stream_ptr, device_id)
    del lo_arr, hi_arr, keeps_arr  # freed only now, after both launches are on the stream
    return classes


CLASS_THREADS = 128  # kernels_cu/tile_classes.cuh kClassThreads


def require_backward(head_dim: int) -> None:
    """Raises NotImplementedError for a head dim with no backward kernel (before the faces classify bias tiles)."""
    if kernel_head_dim(head_dim) not in BACKWARD:
        raise NotImplementedError(f"head_dim {head_dim} has a forward kernel only; the backward supports head dims "
                                  f"up to {max(BACKWARD)} ({', '.join(map(str, BACKWARD))} natively, others "
                                  f"zero-padded to the next)")
