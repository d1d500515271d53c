"""The kernels' parameter structs (kernels_cu/params.cuh): the one Python description of each layout, and the values
a launch puts in it.

Each kernel takes one struct by value (but the Hopper backward: BWD_SM90_ARGS); a ``Struct`` here lists its fields in
the C++ order with their C types, and lays them out by the C rules (each field at a multiple of its alignment, the
size a multiple of the largest), so ``Struct.pack`` gives the exact bytes cuLaunchKernel copies. The plan
(cupyflash/plan.py) packs each launch's struct once, with placeholders for the call's addresses (``Slot``: an 8-byte
device address; ``TmaSlot``: a 128-byte TMA map) at their byte offsets; each call writes only those
(cupyflash/driver.py). tests/test_params.py compiles a static_assert of every offset, type and size from these
descriptions against params.cuh.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

from . import jit, tma

LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2 e): the kernels use exp2 with the scale folded in
NO_WINDOW = 1 << 30  # a window edge farther than any sequence: unbounded (scores.cuh kNoWindow)
_U64 = struct.Struct("<Q")


class Scalar(NamedTuple):
    c_type: str  # as params.cuh spells it
    fmt: str | None  # struct's format; None: opaque bytes
    size: int
    align: int


I32 = Scalar("int", "<i", 4, 4)
U32 = Scalar("u32", "<I", 4, 4)
I64 = Scalar("i64", "<q", 8, 8)
F32 = Scalar("float", "<f", 4, 4)
PTR = Scalar("pointer", "<Q", 8, 8)  # any pointer: a device address
TMA = Scalar("TmaDesc", None, tma.MAP_BYTES, 64)  # CUtensorMap: 64-byte aligned


@dataclass(frozen=True)
class Buf:
    """A (B, H, N, D) or (B, H, N) device buffer: its address (or the plan's Slot) and its strides in elements."""

    ptr: object
    strides: tuple


class Slot(NamedTuple):
    """A placeholder for the device address of buffer `name`, written at each call."""

    name: str

    nbytes = 8

    def fill(self, ptrs: dict) -> int:
        return ptrs[self.name]

    def writer(self):
        """write(buf, start, address): the address into a struct's bytes `buf` at `start`."""
        return _U64.pack_into


class TmaSlot(NamedTuple):
    """A placeholder for the TMA map of buffer `name` (a (B, H, N, D) view with boxes of `rows` rows): the map holds
    the address, so it is encoded at the call (tma.encode caches it per address)."""

    name: str
    dtype: str
    shape: tuple
    strides: tuple
    rows: int

    nbytes = tma.MAP_BYTES

    def fill(self, ptrs: dict) -> bytes:
        return tma.encode(self.dtype, self.shape, self.strides, jit.ELEM_BYTES[self.dtype], ptrs[self.name],
                          self.rows)

    def writer(self):
        """write(buf, start, address): the map of the buffer at `address` into a struct's bytes `buf` at `start`.
        It remembers the maps by address for this slot alone, where tma.encode's cache hashes the dtype, shape and
        strides with it at each call (~1 µs a map on the CPU stub)."""
        maps, end = {}, self.nbytes

        def write(buf, start: int, address: int) -> None:
            encoded = maps.get(address)
            if encoded is None:
                if len(maps) >= 1024:
                    maps.clear()
                encoded = maps[address] = self.fill({self.name: address})
            buf[start:start + end] = encoded

        return write


class Struct:
    """A C struct: `fields` ((name, Scalar or Struct), ...) in declaration order; `c_type` names it in params.cuh
    (a template with any element type: the layouts do not depend on it). With `positional`, the fields are a kernel's
    parameters one by one (`c_type` the kernel's name): the driver passes a pointer to each (``param_offsets``)."""

    def __init__(self, c_type: str, fields: tuple, positional: bool = False):
        self.c_type, self.fields, self.positional = c_type, tuple(fields), positional
        offsets, end = [], 0
        for _, t in self.fields:
            end = -(-end // t.align) * t.align
            offsets.append(end)
            end += t.size
        self.align = max(t.align for _, t in self.fields)
        self.size = -(-end // self.align) * self.align
        self.offsets = dict(zip((name for name, _ in self.fields), offsets))
        # cuLaunchKernel's kernelParams: one pointer per kernel parameter, at these offsets of the packed bytes
        self.param_offsets = tuple(offsets) if positional else (0,)

    def __repr__(self) -> str:
        return f"Struct({self.c_type})"

    @functools.cached_property
    def leaves(self) -> tuple:
        """(dotted path, Scalar, byte offset) of every scalar field, in order."""
        out = []
        for name, t in self.fields:
            at = self.offsets[name]
            if isinstance(t, Struct):
                out += [(f"{name}.{path}", s, at + off) for path, s, off in t.leaves]
            else:
                out.append((name, t, at))
        return tuple(out)

    def flatten(self, values: dict) -> dict:
        """Dotted path → value of every leaf. `values` holds each field by name: a sub-struct as a dict of its own, or
        a sequence in its field order; a missing or unknown field is an error (no field defaults to zero)."""
        if set(values) != {name for name, _ in self.fields}:
            missing = [n for n, _ in self.fields if n not in values]
            unknown = sorted(set(values) - set(self.offsets))
            raise ValueError(f"{self.c_type}: fields missing {missing}, unknown {unknown}")
        flat = {}
        for name, t in self.fields:
            v = values[name]
            if isinstance(t, Struct):
                if not isinstance(v, dict):
                    if len(v) != len(t.fields):
                        raise ValueError(f"{self.c_type}.{name}: {len(v)} values for {len(t.fields)} fields")
                    v = dict(zip((n for n, _ in t.fields), v))
                flat.update({f"{name}.{path}": x for path, x in t.flatten(v).items()})
            else:
                flat[name] = v
        return flat

    def pack(self, values: dict) -> Packed:
        """The struct's bytes with `values` (see flatten); placeholders (Slot, TmaSlot) are left zero and listed
        with their byte offsets."""
        flat = self.flatten(values)
        raw = bytearray(self.size)
        slots = []
        for path, scalar, at in self.leaves:
            v = flat[path]
            if isinstance(v, (Slot, TmaSlot)):
                if v.nbytes != scalar.size:
                    raise TypeError(f"{self.c_type}.{path}: a {scalar.c_type} field cannot hold {v}")
                slots.append((at, v))
            elif scalar.fmt is None:
                raise TypeError(f"{self.c_type}.{path}: a {scalar.c_type} takes a TmaSlot, not {v!r}")
            else:
                try:
                    struct.pack_into(scalar.fmt, raw, at, v)
                except struct.error as err:
                    raise ValueError(f"{self.c_type}.{path} = {v!r} does not fit a {scalar.c_type}: {err}") from None
        return Packed(self, flat, bytes(raw), tuple(slots))


class Packed(NamedTuple):
    """A launch's parameter struct: `template`, its bytes with placeholders zero at `slots` ((byte offset, Slot or
    TmaSlot), ...), and `values` (dotted path → value) for reading back."""

    struct: Struct
    values: dict
    template: bytes
    slots: tuple

    def filled(self, ptrs: dict) -> bytes:
        """The bytes the kernel receives with the call's addresses (`ptrs`: buffer name → device address)."""
        raw = bytearray(self.template)
        for at, slot in self.slots:
            slot.writer()(raw, at, ptrs[slot.name])
        return bytes(raw)


# ---- the layouts: kernels_cu/params.cuh, field for field ------------------------------------------------------

def _flat(path: str) -> str:
    """A score mod's parameter name in the Hopper backward's list: "bias_s.b" → "bias_sb"."""
    return path.replace("_s.", "_s")


BHN = Struct("BhnStrides", (("b", I64), ("h", I64), ("n", I64)))
BHMN = Struct("BhmnStrides", (("b", I64), ("h", I64), ("m", I64), ("n", I64)))
ATTN = Struct("AttnParams", (("Nq", I32), ("Nk", I32), ("group", I32), ("scale_log2", F32)))
SCORE_MODS = Struct("ScoreModParams", (
    ("bias", PTR), ("bias_s", BHMN), ("bias_f32", I32),
    ("tile_cls", PTR), ("cls_s", BHMN), ("cls_tq", I32), ("cls_tk", I32),
    ("dbias", PTR), ("dbias_s", BHMN),
    ("win_left", I32), ("win_right", I32), ("keep_threshold", U32), ("inv_keep", F32),
    ("seed", PTR), ("cap_in", F32), ("cap_out", F32)))
FWD = Struct("FwdParams<u16>", (
    ("q", PTR), ("k", PTR), ("v", PTR), ("o", PTR), ("lse", PTR),
    ("q_s", BHN), ("k_s", BHN), ("v_s", BHN), ("o_s", BHN),
    ("attn", ATTN), ("mods", SCORE_MODS), ("row_stats", PTR)))
KEY_MASK = Struct("KeyMaskArgs", (("meta", PTR), ("sb", I64)))
FWD_SM90 = Struct("FwdSm90Params<u16>", (
    ("tm_q", TMA), ("tm_k", TMA), ("tm_v", TMA), ("o", PTR), ("lse", PTR), ("o_s", BHN),
    ("attn", ATTN), ("mods", SCORE_MODS), ("keys", KEY_MASK)))
BWD = Struct("BwdParams<u16>", (
    ("q", PTR), ("k", PTR), ("v", PTR), ("dout", PTR), ("lse", PTR), ("d_vec", PTR), ("dq_accum", PTR),
    ("dk", PTR), ("dv", PTR),
    ("q_s", BHN), ("k_s", BHN), ("v_s", BHN), ("do_s", BHN), ("dk_s", BHN), ("dv_s", BHN),
    ("attn", ATTN), ("scale", F32), ("col0", I32), ("mods", SCORE_MODS), ("row_lse", PTR)))
# The Hopper backward still takes its parameters one by one (kernels_cu/flash_bwd_sm90.cuh says why): these are
# its parameter list, the score mods' being SCORE_MODS's fields in order.
BWD_SM90_ARGS = Struct("flash_bwd_sm90_kernel", (
    ("tm_q", TMA), ("tm_k", TMA), ("tm_v", TMA), ("tm_do", TMA),
    ("lse", PTR), ("d_vec", PTR), ("dq_accum", PTR), ("dk", PTR), ("dv", PTR),
    *[(f"{t}_s{c}", I64) for t in ("dk", "dv") for c in "bhn"],
    ("Nq", I32), ("Nk", I32), ("group", I32), ("scale_log2", F32), ("scale", F32),
    *[(_flat(path), scalar) for path, scalar, _ in SCORE_MODS.leaves], ("row_lse", PTR), ("outer_kv_heads", I32),
    ("key_meta", PTR), ("key_meta_sb", I64)),
    positional=True)
BWD_PREPROCESS = Struct("BwdPreprocessParams<u16>", (
    ("dout", PTR), ("out", PTR), ("d_vec", PTR), ("dq_accum", PTR), ("do_s", BHN), ("o_s", BHN),
    ("H", I32), ("Nq", I32), ("Nq_accum", I32), ("n_rows", I64), ("lse", PTR), ("row_lse", PTR),
    ("dlse", PTR)))
CONVERT_DQ = Struct("ConvertDqParams<u16>", (
    ("dq_accum", PTR), ("dq", PTR), ("dq_s", BHN), ("H", I32), ("Nq", I32), ("n_rows", I64), ("scale", F32)))
SPLIT_KV = Struct("SplitKvParams<u16>", (
    ("k", PTR), ("v", PTR), ("k_split", PTR), ("v_split", PTR), ("dk_part", PTR), ("dv_part", PTR), ("dk", PTR),
    ("dv", PTR), ("k_s", BHN), ("v_s", BHN), ("split_s", BHN), ("dk_s", BHN), ("dv_s", BHN),
    ("H", I32), ("Nk", I32), ("DHead", I32), ("split", I32), ("n_items", I64)))
TILE_MINMAX = Struct("TileMinmaxParams", (
    ("bias", PTR), ("bias_f32", I32), ("bias_s", BHMN),
    ("Hb", I32), ("nq", I32), ("nk", I32), ("tq", I32), ("tk", I32), ("QB", I32), ("KB", I32), ("vec16", I32),
    ("tile_min", PTR), ("tile_max", PTR), ("row_keeps", PTR)))
KEY_MASK_PREP = Struct("KeyMaskPrepParams", (
    ("mask", PTR), ("mask_sb", I64), ("mask_sn", I64), ("Nk", I32), ("words", I32), ("meta", PTR), ("meta_sb", I64)))
UNSEEN_ROWS = Struct("UnseenRowsParams<u16>", (
    ("q", PTR), ("k", PTR), ("v", PTR), ("dout", PTR), ("out", PTR), ("dq", PTR), ("dk", PTR), ("dv", PTR),
    ("lse", PTR), ("ws", PTR),
    *[(f"{t}_s", BHN) for t in ("q", "k", "v", "do", "o", "dq", "dk", "dv")],
    ("H", I32), ("Hkv", I32), ("Nq", I32), ("Nk", I32), ("D", I32), ("Dv", I32), ("ws_per", I64), ("scale", F32),
    ("mode", I32)))
TILE_CLASSIFY = Struct("TileClassifyParams", (
    ("tile_min", PTR), ("tile_max", PTR), ("row_keeps", PTR), ("nq", I32), ("tq", I32), ("QB", I32), ("KB", I32),
    ("n_tiles", I64), ("window", I32), ("classes", PTR)))

KERNEL_STRUCTS = {"fwd": FWD, "fwd_sm90": FWD_SM90, "bwd": BWD, "bwd_sm90": BWD_SM90_ARGS,
                  "bwd_preprocess": BWD_PREPROCESS, "bwd_convert_dq": CONVERT_DQ,
                  "bwd_convert_dq_sm90": CONVERT_DQ, "bwd_expand_kv_sm90": SPLIT_KV,
                  "bwd_sum_kv_sm90": SPLIT_KV, "tile_minmax": TILE_MINMAX,
                  "tile_classify": TILE_CLASSIFY, "key_mask_prep": KEY_MASK_PREP,
                  **dict.fromkeys(jit.UNSEEN_KERNELS, UNSEEN_ROWS)}  # jit.KERNELS → its struct
STRUCTS = (BHN, BHMN, ATTN, SCORE_MODS, KEY_MASK,
           *(s for s in KERNEL_STRUCTS.values() if not s.positional))  # params.cuh


# ---- the values: each kernel's struct from the plan's buffers (Bufs whose addresses are Slots) ----------------

def _bhn(b: Buf) -> tuple:
    return tuple(b.strides[:3])


def _optional(b: Buf | None):
    """A nullable pointer: 0 for None."""
    return 0 if b is None else b.ptr


def _bhmn(b: Buf | None) -> tuple:
    """(pointer, BhmnStrides) of a nullable (B, H, Nq, Nk) buffer."""
    return (0, (0, 0, 0, 0)) if b is None else (b.ptr, tuple(b.strides[:4]))


def keep_threshold(dropout_p: float) -> int:
    """Dropout keeps a score iff its 8-bit random number is below this (kernels_cu/scores.cuh random_group): the keep
    probability 1 - dropout_p rounded to a multiple of 1/256, at least 1/256 (FlashAttention-2's dropout takes 8 bits
    too)."""
    return min(256, max(1, round((1.0 - dropout_p) * 256.0)))


def keep_probability(dropout_p: float) -> float:
    """The probability that dropout keeps a score, keep_threshold / 256; kept scores are scaled by its inverse, so the
    output's expectation is the attention without dropout."""
    return keep_threshold(dropout_p) / 256.0


def score_mods(kernel: str, mods, scale: float, tiles) -> dict:
    """ScoreModParams of launch.ScoreMods `mods` for the attention kernel of pass `kernel` ("fwd" or "bwd"): the
    tile classes' tile size is the kernel's (`tiles`; the plan classifies the bias in them), dBias the backward's
    only."""
    bias, bias_s = _bhmn(mods.bias)
    cls, cls_s = _bhmn(mods.tile_classes)
    dbias, dbias_s = _bhmn(mods.dbias if kernel == "bwd" else None)
    keep = keep_probability(mods.dropout_p)
    # An element is kept iff its 8-bit Philox number < threshold; 0xffffffff means "no dropout" (scores.cuh).
    threshold = 0xFFFFFFFF if mods.dropout_p == 0 else keep_threshold(mods.dropout_p)
    if mods.dropout_p > 0 and not mods.seed_ptr:
        raise ValueError("dropout needs the device address of its seed (seed_ptr)")
    # soft-capping: (scale / softcap, softcap · log2 e), the tanh argument and the log2-unit logit scale; 0: off
    cap = (scale / mods.softcap, mods.softcap * LOG2E) if mods.softcap > 0 else (0.0, 0.0)
    cls_tile = (tiles.Br, tiles.Bc) if mods.tile_classes is not None else (1, 1)
    left, right = (NO_WINDOW if w < 0 else w for w in mods.window)
    return dict(bias=bias, bias_s=bias_s, bias_f32=int(mods.bias_f32), tile_cls=cls, cls_s=cls_s,
                cls_tq=cls_tile[0], cls_tk=cls_tile[1], dbias=dbias, dbias_s=dbias_s, win_left=left, win_right=right,
                keep_threshold=threshold, inv_keep=1.0 / keep, seed=mods.seed_ptr, cap_in=cap[0], cap_out=cap[1])


def _attn(shape: tuple, n_k: int, kv_heads: int, scale: float) -> dict:
    batch, heads, n_q, d = shape
    return dict(Nq=n_q, Nk=n_k, group=heads // kv_heads, scale_log2=scale * LOG2E)


def _tma_maps(dtype: str, bufs) -> list:
    """The tensor maps of (Buf, (B, H, N, D) shape, box rows) triples, as TmaSlots."""
    return [TmaSlot(buf.ptr.name, dtype, tuple(shape), tuple(buf.strides), rows) for buf, shape, rows in bufs]


def _keys(keys: Buf | None) -> tuple:
    """KeyMaskArgs of a key mask's meta rows (a Buf whose strides are (rows' stride,)), or null."""
    return (0, 0) if keys is None else (keys.ptr, keys.strides[0])


def sm90_forward(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, out: Buf, lse: Buf,
                 scale: float, mods, tiles, keys: Buf | None = None) -> Packed:
    """flash_fwd_sm90_kernel's FwdSm90Params; `keys`: a key mask's meta rows (kernels_cu/key_mask.cuh)."""
    batch, heads, n_q, d = shape
    kv_shape = (batch, kv_heads, n_k, d)
    tm_q, tm_k, tm_v = _tma_maps(dtype, ((q, shape, tiles.Br), (k, kv_shape, tiles.Bc), (v, kv_shape, tiles.Bc)))
    return FWD_SM90.pack(dict(tm_q=tm_q, tm_k=tm_k, tm_v=tm_v, o=out.ptr, lse=lse.ptr, o_s=_bhn(out),
                              attn=_attn(shape, n_k, kv_heads, scale), mods=score_mods("fwd", mods, scale, tiles),
                              keys=_keys(keys)))


def mma_forward(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, out: Buf, lse: Buf,
                scale: float, mods, tiles, row_stats: Buf | None = None) -> Packed:
    """flash_fwd_kernel's FwdParams; with `row_stats`, its stats mode (`lse` read, `out` never written)."""
    return FWD.pack(dict(q=q.ptr, k=k.ptr, v=v.ptr, o=out.ptr, lse=lse.ptr, q_s=_bhn(q), k_s=_bhn(k), v_s=_bhn(v),
                         o_s=_bhn(out), attn=_attn(shape, n_k, kv_heads, scale),
                         mods=score_mods("fwd", mods, scale, tiles), row_stats=_optional(row_stats)))


def sm90_backward(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, dout: Buf, lse: Buf,
                  d_vec: Buf, dq_accum: Buf, dk: Buf, dv: Buf, scale: float, mods, tiles,
                  row_lse: Buf | None = None, outer_kv_heads: int = 0, keys: Buf | None = None) -> Packed:
    """flash_bwd_sm90_kernel's parameters (BWD_SM90_ARGS); `outer_kv_heads`: the grid's order
    (plan.backward_grid); `keys` as sm90_forward's."""
    batch, heads, n_q, d = shape
    kv_shape = (batch, kv_heads, n_k, d)
    tm_q, tm_k, tm_v, tm_do = _tma_maps(dtype, ((q, shape, tiles.Br), (k, kv_shape, tiles.Bc),
                                                (v, kv_shape, tiles.Bc), (dout, shape, tiles.Br)))
    strides = {f"{t}_s{c}": s for t, buf in (("dk", dk), ("dv", dv)) for c, s in zip("bhn", _bhn(buf))}
    mods_flat = SCORE_MODS.flatten(score_mods("bwd", mods, scale, tiles))
    return BWD_SM90_ARGS.pack(dict(tm_q=tm_q, tm_k=tm_k, tm_v=tm_v, tm_do=tm_do, lse=lse.ptr, d_vec=d_vec.ptr,
                                   dq_accum=dq_accum.ptr, dk=dk.ptr, dv=dv.ptr, **strides,
                                   **_attn(shape, n_k, kv_heads, scale), scale=scale,
                                   **{_flat(path): v for path, v in mods_flat.items()},
                                   row_lse=_optional(row_lse), outer_kv_heads=outer_kv_heads,
                                   **dict(zip(("key_meta", "key_meta_sb"), _keys(keys)))))


def mma_backward(*, dtype: str, shape: tuple, n_k: int, kv_heads: int, q: Buf, k: Buf, v: Buf, dout: Buf, lse: Buf,
                 d_vec: Buf, dq_accum: Buf, dk: Buf, dv: Buf, scale: float, mods, tiles,
                 row_lse: Buf | None = None, col0: int = 0) -> Packed:
    """flash_bwd_kernel's BwdParams; `row_lse`: the rows' (hi, lo) pairs that replace the LSE (a backward with a
    bias, cupyflash/plan.py); `col0`: the first column of the launch's range (tiles.Tiles.out_cols)."""
    return BWD.pack(dict(q=q.ptr, k=k.ptr, v=v.ptr, dout=dout.ptr, lse=lse.ptr, d_vec=d_vec.ptr,
                         dq_accum=dq_accum.ptr, dk=dk.ptr, dv=dv.ptr, q_s=_bhn(q), k_s=_bhn(k), v_s=_bhn(v),
                         do_s=_bhn(dout), dk_s=_bhn(dk), dv_s=_bhn(dv), attn=_attn(shape, n_k, kv_heads, scale),
                         scale=scale, col0=col0, mods=score_mods("bwd", mods, scale, tiles),
                         row_lse=_optional(row_lse)))


def preprocess(*, dout: Buf, out: Buf, d_vec: Buf, dq_accum: Buf, heads: int, n_q: int, n_q_accum: int,
               n_rows: int, lse: Buf | None = None, row_lse: Buf | None = None, dlse: Buf | None = None) -> Packed:
    """flash_bwd_preprocess's BwdPreprocessParams: D = rowsum(dO ∘ O) (- dlse, the LSE's gradient, contiguous
    (B, H, Nq)), dQ_accum's n_rows rows (n_q_accum per head) zeroed; with `lse` and `row_lse` (contiguous), row_lse =
    (lse · log2 e, 0) too."""
    if (lse is None) != (row_lse is None):
        raise ValueError("the preprocess writes row_lse from lse: pass both or neither")
    return BWD_PREPROCESS.pack(dict(dout=dout.ptr, out=out.ptr, d_vec=d_vec.ptr, dq_accum=dq_accum.ptr,
                                    do_s=_bhn(dout), o_s=_bhn(out), H=heads, Nq=n_q, Nq_accum=n_q_accum, n_rows=n_rows,
                                    lse=_optional(lse), row_lse=_optional(row_lse), dlse=_optional(dlse)))


def convert_dq(*, dq_accum: Buf, dq: Buf, heads: int, n_q: int, n_rows: int, scale: float) -> Packed:
    """flash_bwd_convert_dq's (and _sm90's) ConvertDqParams; `n_rows` counts the kernel's work items."""
    return CONVERT_DQ.pack(dict(dq_accum=dq_accum.ptr, dq=dq.ptr, dq_s=_bhn(dq), H=heads, Nq=n_q, n_rows=n_rows,
                                scale=scale))


def split_kv(*, k: Buf, v: Buf, k_split: Buf, v_split: Buf, dk_part: Buf, dv_part: Buf, dk: Buf, dv: Buf,
             shape: tuple, split: int) -> Packed:
    """flash_bwd_expand_kv_sm90's and flash_bwd_sum_kv_sm90's SplitKvParams: K, V, dK, dV of `shape` (B, H_kv, Nk,
    DHead), the split copies (B, H_kv · split, Nk, DHead) with one set of strides."""
    batch, heads, n_k, d = shape
    return SPLIT_KV.pack(dict(k=k.ptr, v=v.ptr, k_split=k_split.ptr, v_split=v_split.ptr, dk_part=dk_part.ptr,
                              dv_part=dv_part.ptr, dk=dk.ptr, dv=dv.ptr, k_s=_bhn(k), v_s=_bhn(v),
                              split_s=_bhn(k_split), dk_s=_bhn(dk), dv_s=_bhn(dv), H=heads, Nk=n_k, DHead=d,
                              split=split, n_items=batch * heads * n_k * d // 8))


def key_mask_prep(*, mask: Buf, n_k: int, words: int, meta: Buf) -> Packed:
    """key_mask_prep's KeyMaskPrepParams: `mask` a boolean (Bb, 1, 1, Nk) keep-mask (strides in elements, 0 along
    broadcast dims), `meta` its meta rows of 4 + `words` ints (strides (rows' stride,))."""
    return KEY_MASK_PREP.pack(dict(mask=mask.ptr, mask_sb=mask.strides[0], mask_sn=mask.strides[3], Nk=n_k,
                                   words=words, meta=meta.ptr, meta_sb=meta.strides[0]))


def unseen_rows(*, bufs: dict, shape: tuple, kv_heads: int, n_k: int, d_v: int, ws_per: int, scale: float,
                mode: int) -> Packed:
    """The rows-without-keys kernels' UnseenRowsParams: `bufs` the Bufs of the pass (the forward's out, v, lse; the
    backward's q, k, v, dout, dq, dk, dv, lse; and ws); those it lacks are null (that pass's kernels do not read
    them)."""
    batch, heads, n_q, d = shape
    tensors = ("q", "k", "v", "dout", "out", "dq", "dk", "dv")
    stride_fields = {"dout": "do_s", "out": "o_s"}  # the others' are name + "_s"
    return UNSEEN_ROWS.pack(dict(**{name: _optional(bufs.get(name)) for name in (*tensors, "lse", "ws")},
                                 **{stride_fields.get(name, f"{name}_s"): _bhn(bufs[name]) if name in bufs
                                    else (0, 0, 0) for name in tensors},
                                 H=heads, Hkv=kv_heads, Nq=n_q, Nk=n_k, D=d, Dv=d_v, ws_per=ws_per, scale=scale,
                                 mode=mode))
