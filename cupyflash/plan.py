"""The launch plan: the one place that decides which kernels a call runs and with what.

``plan_for(layout)`` takes a call's layout (pass, dtype, shapes, strides, addresses modulo 16, score modifications,
the device's compute capability) and returns a frozen ``Plan``: the kernel family (the Hopper kernels or the
mma.sync ones) and why, the variant, its tiles, and per launch the grid, block, shared memory and the kernel's
parameter struct (kernels_cu/params.cuh), packed by cupyflash/params.py with placeholders for the call's addresses.
It is cached per layout, so a model calling with the same few layouts pays a dict lookup; launching
(``launch.execute``) only writes the call's addresses (and TMA maps) into the structs' slots.

Needs no GPU: every plan, with its structs, is built on the CPU in tests/test_plan.py.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

from . import driver, jit, launch, params, tiles
from .launch import ScoreMods
from .params import Buf, Slot, TmaSlot

HOPPER, MMA_SYNC = "hopper", "mma.sync"
# A call at a head dim only the Hopper kernels have (tiles.FORWARD_SM90 / BACKWARD_SM90 beside tiles.FORWARD /
# BACKWARD) that they decline: the face runs it zero-padded to validate.kernel_head_dim's on mma.sync; no steps.
PADDED = "padded"
# The Hopper forward without score mods, up to this many query rows: each thread block takes Q blocks n - 1 - x and x
# (equal work under a causal mask; the second loads under the first's last GEMMs and epilogue); past it one Q block
# per thread block. H200, bf16, pairs against one (results/fwd-pairs-ab-NVIDIA_H200.log): N 512 +2-14 %, 1024 +4-8 %,
# 2048 +3-9 %, 4096 0-3 %, 16384 -1 to -2 % (half as many thread blocks, twice as long: the last wave's tail).
PAIR_MAX_ROWS = 4096
# Past the pairs, the plain causal forward at a head dim of tiles.FORWARD_SM90_TALL takes that tile (jit.Variant.tall).
TALL_MIN_ROWS = PAIR_MAX_ROWS + 1
# The plain causal backward's grid puts K/V blocks outermost over groups of (batch, K/V head) pairs whose Q and dO take
# at most this many bytes (backward_grid): a third of the smallest L2 of the GPUs measured (H100 and H200, 50 MiB).
K_OUTER_MAX_BYTES = 16 << 20
K_OUTER_MAX_BLOCKS = 32  # ... and K/V blocks a head at most: past them the last wave's imbalance is negligible
# Grouped-query attention's Hopper backward splits a K/V head's query heads over thread blocks (backward_kv_split)
# until the grid has this many: four waves of a Hopper GPU's 132 SMs.
KV_SPLIT_MIN_BLOCKS = 4 * 132
SPLIT_KV_THREADS = 256  # flash_bwd_expand_kv_sm90, _sum_kv_sm90: one thread per 8 columns of a key row
# The split's copies (Plan.kv_part_shape): K and V repeated, the partial dK and dV, in this order in one array.
SPLIT_KV_BUFS = ("k_split", "v_split", "dk_part", "dv_part")
MAX_GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes
ROWS_PER_BLOCK = 8  # the mma.sync dQ conversion: one warp per row
PREPROCESS_THREADS = 256  # the backward's preprocess: lanes per row by preprocess_lanes
CONVERT_SM90_THREADS = 256  # flash_bwd_convert_dq_sm90: one thread per float4 of dQ_accum
KEY_MASK_THREADS = 256  # kernels_cu/key_mask.cuh kKeyMaskThreads
KEY_META_HEAD = 4  # ... kKeyMetaHead: a meta row's ints before its words
# Keys a meta row covers past Nk: the kernels read the words of whole K/V blocks, up to Bc - 1 keys past the last.
KEY_MASK_TAIL = 256
FORWARD_BUFS = ("q", "k", "v", "out", "lse")
BACKWARD_BUFS = ("q", "k", "v", "out", "dout", "lse", "d_vec", "dq_accum", "dq", "dk", "dv")
# A backward with a bias takes these after BACKWARD_BUFS where the rebuild rule is on (launch.LSE_REBUILD_ENV):
# row_lse, contiguous (B, H, Nq, 2) fp32, the rows' (hi, lo) pairs with P = exp2((s - hi) - lo) (the rebuild rule of
# cupyflash/cpu_attention.py; _stats_step).
BIAS_BACKWARD_BUFS = ("row_lse",)
# A backward whose LSE has a gradient takes dlse last: contiguous (B, H, Nq) fp32, subtracted from D by the preprocess.


def preprocess_lanes(d: int, dtype: str) -> int:
    """Lanes per row of the backward's preprocess (kernels_cu/flash_bwd.cuh preprocess_lanes, the same rule): one
    16-byte chunk of dO and O each, the row's chunks rounded up to a power of two, at most a warp."""
    lanes = 1
    while lanes < d * jit.ELEM_BYTES[dtype] // 16 and lanes < 32:
        lanes *= 2
    return lanes


def dq_accum_rows(n_q: int) -> int:
    """dQ_accum's rows per (batch, head): n_q rounded up to the Hopper backward's largest Q block, whose whole blocks
    it adds (kernels_cu/flash_bwd_sm90.cuh DqFrag); the mma.sync kernels use its first B·H·n_q rows. One size for
    both families and every tile, so a caller allocates it before the plan is known."""
    return -(-n_q // tiles.DQ_ACCUM_HEAD_ROWS) * tiles.DQ_ACCUM_HEAD_ROWS


class BiasLayout(NamedTuple):
    """The bias as the kernels read it: 4-D, broadcastable to (B, H, Nq, Nk), strides 0 along size-1 dims."""

    shape: tuple
    strides: tuple  # in elements
    f32: bool  # else q's dtype
    grad: bool = False  # the backward also sums dBias into an fp32 buffer shaped like the bias (contiguous)
    mask: bool = False  # a boolean keep-mask, as the caller passed it: the plan decides how the kernels take it


class CallLayout(NamedTuple):
    """What decides a call's kernels and arguments, apart from its buffers' addresses: the plan cache's key."""

    kernel: str  # the pass: "fwd" or "bwd"
    dtype: str  # "float16", "bfloat16", "float32"
    shape: tuple  # q's (B, H, Nq, D)
    n_k: int
    kv_heads: int
    # ((name, strides in elements, address % 16), ...): FORWARD_BUFS, BACKWARD_BUFS (+ BIAS_BACKWARD_BUFS, dlse)
    bufs: tuple
    causal: bool
    scale: float
    bias: BiasLayout | None = None
    window: tuple = (-1, -1)  # effective (left, right); -1: unbounded
    dropout_p: float = 0.0
    softcap: float = 0.0
    compute_capability: int = 90
    device_id: int = 0
    sm90_enabled: bool = True  # launch.SM90_ENV is not "0"


@dataclass(frozen=True)
class Step:
    """One kernel launch: `packed`, the kernel's parameter struct with params.Slot / params.TmaSlot placeholders."""

    variant: jit.Variant
    grid: tuple
    block: tuple
    shared_bytes: int
    packed: params.Packed

    @functools.cached_property
    def arg_block(self) -> driver.ArgBlock:
        """The struct's bytes for the driver, made once; each call writes its addresses into the slots."""
        return driver.ArgBlock(self.packed.template, self.packed.slots, self.packed.struct.param_offsets)

    @functools.cached_property
    def dims(self) -> tuple:
        return driver.dims(self.grid, self.block)

    def filled(self, ptrs: dict) -> dict:
        """The struct's values (dotted field path → value) with the call's addresses (`ptrs`: buffer name → device
        address) and TMA maps in place of the placeholders."""
        return {path: v.fill(ptrs) if isinstance(v, (Slot, TmaSlot)) else v for path, v in self.packed.values.items()}


@dataclass(frozen=True)
class Plan:
    layout: CallLayout
    family: str  # HOPPER, MMA_SYNC or PADDED
    why: str  # why this family: what the Hopper kernel declined, or that it takes the call
    variant: jit.Variant | None  # the attention kernel (the pass's main launch); None where PADDED
    tiles: object  # tiles.Tiles or tiles.Sm90Tiles of `variant`: the bias's tile classes use them
    steps: tuple  # the launches, in order
    tile_classes_shape: tuple | None  # (Bb, Hb, QB, KB) int8 classes of the bias for `tiles`, or None
    # How a boolean mask reaches the kernels: "keys", the plain Hopper kernels' key mask, its meta rows
    # (key_meta_shape int32, the first step writes them); "bias", as the additive 0 / -inf bias of `layout`, which the
    # face makes (contiguous) before launching; "" without a boolean mask.
    mask_form: str = ""
    key_meta_shape: tuple | None = None
    # A grouped-query backward split over thread blocks (backward_kv_split): one array of the call's dtype,
    # (4, B, H_kv · split, Nk, D), for SPLIT_KV_BUFS in order; the face allocates it. None: no split.
    kv_part_shape: tuple | None = None

    @property
    def needs(self) -> frozenset:
        """The buffer names whose addresses launch.execute needs."""
        return frozenset(slot.name for s in self.steps for _, slot in s.packed.slots)


# os.environ.get encodes the key and decodes the value at each read (1.4 µs, in every op call's key); the mapping's own
# dict holds the same entries encoded and follows every write through os.environ (CPython's os._Environ).
_ENVIRON = getattr(os.environ, "_data", None)
_SM90_KEY = os.environ.encodekey(launch.SM90_ENV) if _ENVIRON is not None else None


def sm90_enabled() -> bool:
    if type(_ENVIRON) is dict:
        value = _ENVIRON.get(_SM90_KEY)
        return value is None or os.environ.decodevalue(value) != "0"
    return os.environ.get(launch.SM90_ENV, "1") != "0"


def tile_classes_strides(classes_shape: tuple) -> tuple:
    """Strides of the contiguous int8 classes, 0 along size-1 dims (as the kernels read a broadcast buffer)."""
    bb, hb, n_qb, n_kb = classes_shape
    contiguous = (hb * n_qb * n_kb, n_qb * n_kb, n_kb, 1)
    return tuple(0 if n == 1 else s for n, s in zip(classes_shape, contiguous))


def dbias_strides(bias_shape: tuple) -> tuple:
    """Strides of the contiguous fp32 dBias accumulator, 0 along size-1 dims."""
    b, h, n_q, n_k = bias_shape
    contiguous = (h * n_q * n_k, n_q * n_k, n_k, 1)
    return tuple(0 if n == 1 else s for n, s in zip(bias_shape, contiguous))


def _score_mods(layout: CallLayout, classes_shape: tuple | None) -> ScoreMods:
    bias = layout.bias
    return ScoreMods(
        bias=None if bias is None else Buf(Slot("bias"), bias.strides),
        bias_f32=bias is not None and bias.f32,
        tile_classes=None if classes_shape is None else Buf(Slot("tile_classes"), tile_classes_strides(classes_shape)),
        dbias=Buf(Slot("dbias"), dbias_strides(bias.shape)) if bias is not None and bias.grad else None,
        window=tuple(layout.window), dropout_p=layout.dropout_p,
        seed_ptr=Slot("seed") if layout.dropout_p > 0 else 0, softcap=layout.softcap,
        scale_not_positive=not layout.scale > 0)


def _step(variant: jit.Variant, grid: tuple, block: tuple, packed: params.Packed) -> Step:
    return Step(variant, grid, block, variant.shared_bytes, packed)


def choose_family(layout: CallLayout, mods: ScoreMods) -> tuple[str, str]:
    """(family, why) of the pass's attention kernel: the one place where the Hopper kernel is taken or declined
    (launch.sm90_unsupported says what it can run); every call it declines runs on mma.sync, which takes all."""
    if not layout.sm90_enabled:
        return MMA_SYNC, f"{launch.SM90_ENV}=0"
    bufs = {name: Buf(address, strides) for name, strides, address in layout.bufs}  # addresses modulo 16 suffice
    q_like = {"q": bufs["q"]} if layout.kernel == "fwd" else {"q": bufs["q"], "dout": bufs["dout"]}
    why_not = launch.sm90_unsupported(layout.kernel, dtype=layout.dtype, shape=layout.shape, n_k=layout.n_k,
                                      kv_heads=layout.kv_heads, q_like=q_like, kv={"k": bufs["k"], "v": bufs["v"]},
                                      mods=mods, compute_capability=layout.compute_capability)
    if why_not is None:
        return HOPPER, "the Hopper kernel takes this call"
    return MMA_SYNC, why_not


@functools.lru_cache(maxsize=1024)
def plan_for(layout: CallLayout) -> Plan:
    """The call's Plan (see the module's docstring); raises NotImplementedError for a head dim with no backward.
    A boolean mask (layout.bias.mask) over keys alone, (Bb, 1, 1, Nk), with no other score mod, on a call the plain
    Hopper kernel takes, runs as its key mask; any other as an additive bias (Plan.mask_form)."""
    bias = layout.bias
    if bias is not None and bias.mask:
        plain = layout._replace(bias=None)
        if bias.shape[1:3] == (1, 1) and not _mods_any(plain) and choose_family(plain, ScoreMods())[0] == HOPPER:
            return _build(plain, key_mask=bias)
        additive = BiasLayout(bias.shape, dbias_strides(bias.shape), f32=False)
        return dataclasses.replace(_build(layout._replace(bias=additive)), mask_form="bias")
    return _build(layout)


def mma_sync_takes(kernel: str, dtype: str, head_dim: int) -> bool:
    """Whether an mma.sync kernel of pass `kernel` runs `head_dim` as it is (the Hopper kernels have more)."""
    return head_dim in tiles.table(kernel) if kernel == "fwd" else tiles.has_backward(dtype, head_dim)


def hopper_only(kernel: str, head_dim: int) -> bool:
    """Whether `head_dim` has a Hopper kernel of pass `kernel` and no mma.sync one: a call there is planned as it is,
    and runs padded where the plan says PADDED."""
    return head_dim in tiles.sm90_table(kernel) and head_dim not in tiles.table(kernel)


@functools.cache
def hopper_only_dims(kernel: str) -> tuple[int, ...]:
    """The head dims of hopper_only(kernel, ·), ascending: where a call between the mma.sync kernels' head dims runs
    padded on Hopper."""
    return tuple(sorted(d for d in tiles.sm90_table(kernel) if hopper_only(kernel, d)))


def key_meta_words(n_k: int) -> int:
    """Words of a key mask's meta row (kernels_cu/key_mask.cuh): Nk + KEY_MASK_TAIL keys, a multiple of 4 (16-byte
    rows)."""
    return -(-(n_k + KEY_MASK_TAIL) // 128) * 4


def _key_mask_step(layout: CallLayout, mask: BiasLayout) -> tuple[Step, Buf, tuple]:
    """The key mask's preparation: (its launch, the meta rows' Buf for the attention kernel, their shape)."""
    words = key_meta_words(layout.n_k)
    shape = (mask.shape[0], KEY_META_HEAD + words)
    meta = Buf(Slot("key_meta"), (shape[1] if shape[0] > 1 else 0,))
    packed = params.key_mask_prep(mask=Buf(Slot("key_mask"), mask.strides), n_k=layout.n_k, words=words, meta=meta)
    return (_step(jit.Variant("key_mask_prep", layout.dtype, 0), (shape[0],), (KEY_MASK_THREADS,), packed), meta,
            shape)


def _build(layout: CallLayout, key_mask: BiasLayout | None = None) -> Plan:
    """plan_for's Plan of a layout whose bias (if any) is additive; `key_mask`: the plain call's key mask."""
    if layout.kernel == "bwd":
        launch.require_backward(layout.shape[3], layout.dtype)
    batch, heads, n_q, d = layout.shape
    mma = None
    if mma_sync_takes(layout.kernel, layout.dtype, d):
        mma = jit.Variant(layout.kernel, layout.dtype, d, layout.causal, _mods_any(layout), layout.dropout_p > 0)
    # The bias is classified in the tiles of the kernel that reads it: on the mma.sync tiles first (the family
    # is not known yet), again below if the Hopper kernel takes the call.
    classes_shape = None if layout.bias is None or mma is None else _classes_shape(layout.bias.shape, mma.tiles)
    mods = _score_mods(layout, classes_shape)
    family, why = choose_family(layout, mods)
    if family == MMA_SYNC and mma is None:
        return Plan(layout, PADDED, f"{why}; mma.sync has no head_dim {d} kernel", None, None, (), None)
    if any(name == "row_lse" for name, _, _ in layout.bufs) and d not in tiles.FORWARD:
        return Plan(layout, PADDED, f"the rebuild rule's stats pass runs on the mma.sync forward, which has no "
                                    f"head_dim {d} kernel", None, None, (), None)
    variant = mma
    if family == HOPPER:
        variant, mods = launch.sm90_variant(layout.kernel, layout.dtype, d, layout.causal, mods)
    keys, key_meta_shape, prep, kv_part_shape = None, None, (), None
    if key_mask is not None:
        step, keys, key_meta_shape = _key_mask_step(layout, key_mask)
        prep = (step,)
        variant = dataclasses.replace(variant, key_mask=True)
    if (family == HOPPER and layout.kernel == "fwd" and variant.causal and not variant.mods and not variant.key_mask
            and d in tiles.FORWARD_SM90_TALL and n_q >= TALL_MIN_ROWS):
        variant = dataclasses.replace(variant, tall=True)
    t = variant.tiles
    if layout.bias is not None and _classes_shape(layout.bias.shape, t) != classes_shape:
        classes_shape = _classes_shape(layout.bias.shape, t)
        mods = dataclasses.replace(mods, tile_classes=Buf(Slot("tile_classes"), tile_classes_strides(classes_shape)))
    bufs = {name: Buf(Slot(name), strides) for name, strides, _ in layout.bufs}
    common = dict(dtype=layout.dtype, shape=layout.shape, n_k=layout.n_k, kv_heads=layout.kv_heads,
                  scale=layout.scale, mods=mods, tiles=t)
    if layout.kernel == "fwd":
        if family == HOPPER:
            packed = params.sm90_forward(**common, **{name: bufs[name] for name in FORWARD_BUFS}, keys=keys)
        else:
            packed = params.mma_forward(**common, **{name: bufs[name] for name in FORWARD_BUFS})
        q_blocks = math.ceil(n_q / t.Br)
        if family == HOPPER and not variant.mods and n_q <= PAIR_MAX_ROWS:
            q_blocks = math.ceil(q_blocks / 2)  # two Q blocks per thread block (flash_fwd_sm90.cuh says which)
        grid = (q_blocks, heads, batch)  # Q blocks × query heads × batch, as FlashAttention-2
        steps = (*prep, _step(variant, grid, (t.threads,), packed))
    else:
        row_lse = bufs.get("row_lse")
        if row_lse is not None and layout.bias is None:
            raise ValueError("row_lse without a bias: the rebuild rule's workspace goes with a bias only "
                             "(plan.BIAS_BACKWARD_BUFS)")
        kernel_bufs = {name: bufs[name] for name in BACKWARD_BUFS if name not in ("out", "dq")}
        split = backward_kv_split(layout, family, t.Bc)
        grid, outer_kv_heads = backward_grid(layout, family, t.Bc, split)
        expand, sums = (), ()
        if split > 1:
            kv_part_shape, expand, sums, copies = _kv_split_steps(layout, bufs, split)
            kernel_bufs.update(copies)
        if family == HOPPER:  # the kernel's K/V heads: the split copies' where split
            packed = (params.sm90_backward(**{**common, "kv_heads": layout.kv_heads * split}, **kernel_bufs,
                                           row_lse=row_lse, outer_kv_heads=outer_kv_heads, keys=keys),)
        else:  # one launch per column range (tiles.Tiles.out_cols); dBias from the first only
            packed = tuple(params.mma_backward(**{**common, "mods": mods if col0 == 0 else
                                                  dataclasses.replace(mods, dbias=None)},
                                               **kernel_bufs, row_lse=row_lse, col0=col0)
                           for col0 in range(0, d, t.launch_cols(d)))
        n_rows, accum_rows = batch * heads * n_q, batch * heads * dq_accum_rows(n_q)
        row_block = (32 * ROWS_PER_BLOCK,)
        pre = params.preprocess(dout=bufs["dout"], out=bufs["out"], d_vec=bufs["d_vec"], dq_accum=bufs["dq_accum"],
                                heads=heads, n_q=n_q, n_q_accum=dq_accum_rows(n_q), n_rows=accum_rows,
                                lse=None if row_lse is None else bufs["lse"], row_lse=row_lse,
                                dlse=bufs.get("dlse"))
        if family == HOPPER:  # dQ_accum in the Hopper kernel's fragment order: one thread per float4
            n_items = accum_rows * d // 4
            convert = (jit.Variant("bwd_convert_dq_sm90", layout.dtype, d),
                       (math.ceil(n_items / CONVERT_SM90_THREADS),), (CONVERT_SM90_THREADS,))
        else:
            n_items = n_rows
            convert = (jit.Variant("bwd_convert_dq", layout.dtype, d), (math.ceil(n_rows / ROWS_PER_BLOCK),),
                       row_block)
        conv = params.convert_dq(dq_accum=bufs["dq_accum"], dq=bufs["dq"], heads=heads, n_q=n_q, n_rows=n_items,
                                 scale=layout.scale)
        stats = () if row_lse is None else (_stats_step(layout, bufs),)
        pre_rows = PREPROCESS_THREADS // preprocess_lanes(d, layout.dtype)  # rows per thread block
        steps = (*prep, _step(jit.Variant("bwd_preprocess", layout.dtype, d), (math.ceil(accum_rows / pre_rows),),
                              (PREPROCESS_THREADS,), pre), *stats, *expand,
                 *(_step(variant, grid, (t.threads,), p) for p in packed), *sums,
                 _step(*convert, conv))
    return Plan(layout, family, why, variant, t, steps, classes_shape, "" if key_mask is None else "keys",
                key_meta_shape, kv_part_shape)


def _kv_split_steps(layout: CallLayout, bufs: dict, split: int) -> tuple[tuple, tuple, tuple, dict]:
    """(kv_part_shape, the expand step, the sum step, the attention kernel's k, v, dk, dv) of a backward split
    `split` times (backward_kv_split): the kernel reads K, V repeated per split and writes partial dK, dV, all four
    parts of one (4, B, H_kv · split, Nk, D) array in SPLIT_KV_BUFS' order."""
    batch, _, _, d = layout.shape
    kv_part_shape = (len(SPLIT_KV_BUFS), batch, layout.kv_heads * split, layout.n_k, d)
    strides = tuple(math.prod(kv_part_shape[i + 1:]) for i in range(1, 5))
    copies = {name: Buf(Slot(name), strides) for name in SPLIT_KV_BUFS}
    kv_shape = (batch, layout.kv_heads, layout.n_k, d)
    packed = params.split_kv(k=bufs["k"], v=bufs["v"], dk=bufs["dk"], dv=bufs["dv"], **copies, shape=kv_shape,
                             split=split)
    grid = (math.ceil(math.prod(kv_shape) // 8 / SPLIT_KV_THREADS), 2)  # grid.y: K, V
    expand, sums = ((_step(jit.Variant(kernel, layout.dtype, d), grid, (SPLIT_KV_THREADS,), packed),)
                    for kernel in jit.SPLIT_KV_KERNELS)
    kernel_bufs = dict(k=copies["k_split"], v=copies["v_split"], dk=copies["dk_part"], dv=copies["dv_part"])
    return kv_part_shape, expand, sums, kernel_bufs


def backward_kv_split(layout: CallLayout, family: str, bc: int) -> int:
    """Thread blocks per K/V block and K/V head of grouped-query attention's Hopper backward: 1 (one takes the
    group's every query head, summing dK and dV in registers), or the fewest (a divisor of the group G) that give the
    grid KV_SPLIT_MIN_BLOCKS thread blocks. Split, the kernel runs on H_kv · split K/V heads of G / split query heads
    each, over K and V repeated `split` times (flash_bwd_expand_kv_sm90), and a last launch adds up its partial dK
    and dV (flash_bwd_sum_kv_sm90); the kernel itself is unchanged. Unsplit, a small grid of long thread blocks: the
    Llama step's layer (T 2048 x 4, 16 query heads on 4 K/V heads, causal + key padding: 256 thread blocks) took
    549 µs in the kernel against 403 µs on K/V repeated to the 16 heads (1024 thread blocks; H100,
    benchmarks/llama_step.py --profile, session 22)."""
    batch, heads, _, _ = layout.shape
    group = heads // layout.kv_heads
    if family != HOPPER or group == 1:
        return 1
    blocks = batch * layout.kv_heads * math.ceil(layout.n_k / bc)
    return next(s for s in range(1, group + 1) if group % s == 0 and (s == group or blocks * s >= KV_SPLIT_MIN_BLOCKS))


def backward_grid(layout: CallLayout, family: str, bc: int, kv_split: int = 1) -> tuple[tuple, int]:
    """(grid, outer_kv_heads) of the backward's attention kernel: one thread block per (K/V block of `bc` keys, K/V
    head, batch), with `kv_split` times the layout's K/V heads (backward_kv_split). In that order (K/V blocks
    innermost) the blocks of one head run together and share its Q and dO in L2. Under a causal mask K/V block x
    sees the Q blocks from x on, so each head's blocks come heaviest first and the last wave mixes heavy and light
    ones. A plain causal call on the Hopper kernel with at most
    K_OUTER_MAX_BLOCKS K/V blocks instead takes its (batch, K/V head) pairs in groups whose Q and dO fit in
    K_OUTER_MAX_BYTES, each group's K/V blocks outermost (grid (pairs of a group, K/V blocks, groups);
    outer_kv_heads = H_kv tells the kernel): the group's heaviest blocks first, as list scheduling wants, and a
    head's Q and dO still in L2 for its next block. H100, same run (benchmarks/bwd_grid_ab.py,
    results/bwd-grid-ab-NVIDIA_H100_80GB_HBM3.md): kernel -8.0 % at the GPT's 8 x 12 heads at N 512 (d64), -1 to -8 %
    at N 1024-4096 (d64, d128), -11.8 % at the Llama step's grouped-query N 2048; at N 16384 (128 blocks) +1.0 %,
    as the simulation's -0.5 % said: nothing to gain there. Over all pairs at once (no groups) N 1024-2048 lost 5-59 %,
    a head's Q and dO evicted between its blocks. The score-mods variants and the mma.sync kernels keep the first
    order: decoding the other cost them registers they do not have (4-8 B spills at d96, d128)."""
    n_blocks = math.ceil(layout.n_k / bc)
    batch, heads, n_q, d = layout.shape
    kv_heads = layout.kv_heads * kv_split
    pairs = batch * kv_heads
    if family == HOPPER and layout.causal and not _mods_any(layout) and n_blocks <= K_OUTER_MAX_BLOCKS:
        per_pair = 2 * (heads // kv_heads) * n_q * d * jit.ELEM_BYTES[layout.dtype]  # its query heads' Q, dO
        group = max(g for g in range(1, pairs + 1) if pairs % g == 0 and (g == 1 or g * per_pair <= K_OUTER_MAX_BYTES))
        if group > 1 and pairs // group <= MAX_GRID_YZ:
            return (group, n_blocks, pairs // group), kv_heads
    return (n_blocks, kv_heads, batch), 0


def _stats_step(layout: CallLayout, bufs: dict) -> Step:
    """The backward's stats pass (the rebuild rule): the mma.sync forward of the call's dtype, head dim and causal
    flag in its stats mode (kernels_cu/flash_fwd.cuh) overwrites row_lse's pairs of the rows whose saved LSE is below
    LSE_REBUILD with their (m, log2 l); either backward kernel then reads them. Its bias is read in every tile (no
    tile classes: they are classified in the backward's tiles) and dropout plays no part (it acts after the
    softmax); it never writes out, so out is null."""
    batch, heads, n_q, d = layout.shape
    variant = jit.Variant("fwd", layout.dtype, d, layout.causal, True, False)
    mods = dataclasses.replace(_score_mods(layout, None), dbias=None, dropout_p=0.0, seed_ptr=0)
    t = variant.tiles
    packed = params.mma_forward(dtype=layout.dtype, shape=layout.shape, n_k=layout.n_k, kv_heads=layout.kv_heads,
                                q=bufs["q"], k=bufs["k"], v=bufs["v"], out=Buf(0, bufs["out"].strides),
                                lse=bufs["lse"], scale=layout.scale, mods=mods, tiles=t, row_stats=bufs["row_lse"])
    return _step(variant, (math.ceil(n_q / t.Br), heads, batch), (t.threads,), packed)


def _mods_any(layout: CallLayout) -> bool:
    """Whether the variant with score modifications compiled in is needed: launch.ScoreMods.any of the layout's."""
    return _score_mods(layout, None).any


def _classes_shape(bias_shape: tuple, t) -> tuple:
    bb, hb, _, _ = bias_shape
    _, _, n_qb, n_kb = launch.tile_grid(bias_shape, t.Br, t.Bc)
    return bb, hb, n_qb, n_kb

