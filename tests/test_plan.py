"""The launch plan (cupyflash/plan.py) on the CPU: which kernel family, variant and tiles each call layout gets and
why, the plan cache, and every launch's parameter struct (cupyflash/params.py) against its kernel and as the driver
reads it; then the CUDA path of the faces (cupyflash/cuda_path.py) on CPU tensors with only the device stubbed, down
to the kernel calls."""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import re
import struct

import pytest
import torch

import cupyflash
from cupyflash import cuda_attention, errors, jit, launch, params, plan, tiles, tma, torch_op, validate

B, H, HKV, NQ, NK = 2, 8, 2, 300, 517
ALIGNED = 1 << 20


def _contiguous(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _steps(p: plan.Plan) -> tuple:
    """The plan's launches less a grouped-query split's K/V copies and dK/dV sums (tested on their own: the layouts
    here have 4 query heads a K/V head and few thread blocks, which the Hopper backward splits,
    plan.backward_kv_split)."""
    return tuple(s for s in p.steps if s.variant.kernel not in jit.SPLIT_KV_KERNELS)


def _kernels(p: plan.Plan) -> list:
    return [s.variant.kernel for s in _steps(p)]


def _layout(kernel="fwd", dtype="bfloat16", d=64, cc=90, causal=False, bias=None, window=(-1, -1), dropout_p=0.0,
            softcap=0.0, strides=None, addresses=None, device_id=0, sm90=True, n_q=NQ, n_k=NK):
    """A CallLayout of contiguous buffers (overrides by name in `strides` / `addresses`, modulo 16); a backward with
    an added bias (not a boolean mask) has the row_lse workspace, as cuda_path gives it."""
    q_shape, kv_shape = (B, H, n_q, d), (B, HKV, n_k, d)
    shapes = dict(q=q_shape, k=kv_shape, v=kv_shape, out=q_shape, dout=q_shape, lse=q_shape[:3], d_vec=q_shape[:3],
                  dq_accum=(B, H, plan.dq_accum_rows(n_q), d), dq=q_shape, dk=kv_shape, dv=kv_shape,
                  row_lse=(*q_shape[:3], 2))
    names = plan.FORWARD_BUFS if kernel == "fwd" else plan.BACKWARD_BUFS
    if kernel == "bwd" and bias is not None and not bias.mask:
        names += plan.BIAS_BACKWARD_BUFS
    strides, addresses = strides or {}, addresses or {}
    bufs = tuple((n, strides.get(n, _contiguous(shapes[n])), addresses.get(n, 0)) for n in names)
    return plan.CallLayout(kernel, dtype, q_shape, n_k, HKV, bufs, causal, 0.125, bias, window, dropout_p, softcap,
                           cc, device_id, sm90)


BIAS = plan.BiasLayout((B, 1, NQ, NK), (NQ * NK, 0, NK, 1), False)
# A boolean keep-mask over the keys per batch row, as attention_mask[:, None, None, :] gives it
KEY_MASK = plan.BiasLayout((B, 1, 1, NK), (NK, 0, 0, 1), False, mask=True)


def _slot_names(step) -> dict:
    """Field path → buffer name of each address placeholder in the step's parameter struct."""
    return {path: v.name for path, v in step.packed.values.items() if isinstance(v, params.Slot)}


# ---- which family, variant and tiles, and why ------------------------------------------------------------------

@pytest.mark.parametrize("kernel,d", [(kernel, d) for kernel, table in (("fwd", tiles.FORWARD_SM90),
                                                                       ("bwd", tiles.BACKWARD_SM90)) for d in table])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_takes_plain_16bit_calls_on_sm90(kernel, d, dtype, causal):
    p = plan.plan_for(_layout(kernel, dtype, d, causal=causal))
    assert (p.family, p.why) == (plan.HOPPER, "the Hopper kernel takes this call")
    assert p.variant == jit.Variant(f"{kernel}_sm90", dtype, d, causal)
    want = (tiles.sm90_forward_tiles(d, mods=False, causal=causal) if kernel == "fwd"
            else tiles.sm90_backward_tiles(d, mods=False))
    assert p.tiles == want
    (step,) = [s for s in p.steps if s.variant == p.variant]
    assert step.block == (p.tiles.threads,) and p.tiles.threads == 128 * (p.tiles.consumers + 1)
    if kernel == "fwd":  # Q blocks of Br rows, 64 per consumer warpgroup, two per thread block
        assert p.tiles.Br == 64 * p.tiles.consumers and step.grid == (math.ceil(math.ceil(NQ / p.tiles.Br) / 2), H, B)


@pytest.mark.parametrize("n_q,pairs", [(1, 1), (128, 1), (129, 1), (300, 2), (513, 3), (4096, 16), (4097, 33)])
def test_hopper_forward_pairs_q_blocks_and_mods_take_one(monkeypatch, n_q, pairs):
    """The plain Hopper forward's thread blocks take Q blocks n - 1 - x and x (flash_fwd_sm90.cuh): ceil(n / 2) of
    them up to PAIR_MAX_ROWS query rows, one each past it; with score mods (the skipped tiles' count takes the whole
    thread block) or PAIR_MAX_ROWS = 0, one each."""
    layout = _layout("fwd", "bfloat16", 128, causal=True)._replace(shape=(B, H, n_q, 128))
    assert plan.plan_for(layout).steps[0].grid == (pairs, H, B)
    mods = plan.plan_for(layout._replace(causal=False, window=(64, 0))).steps[-1]
    assert mods.variant.mods and mods.grid == (math.ceil(n_q / 128), H, B)
    monkeypatch.setattr(plan, "PAIR_MAX_ROWS", 0)
    plan.plan_for.cache_clear()
    assert plan.plan_for(layout).steps[0].grid == (math.ceil(n_q / 128), H, B)
    plan.plan_for.cache_clear()


def test_forward_d64_plain_tiles_are_192_rows_causal_and_mods_keep_128():
    """FlashAttention-3's d64 forward tile (192 x 128, three consumer warpgroups) for the plain call; the causal one
    keeps 128 rows (192 lost at N 1024, tiles.py), and so do the score mods' variants, with their bias's tile
    classes."""
    plain = plan.plan_for(_layout("fwd", "bfloat16", 64))
    assert (plain.tiles.Br, plain.tiles.Bc, plain.tiles.threads) == (192, 128, 512)
    causal = plan.plan_for(_layout("fwd", "bfloat16", 64, causal=True))
    assert (causal.tiles.Br, causal.tiles.threads) == (128, 384)
    mods = plan.plan_for(_layout("fwd", "bfloat16", 64, window=(16, 0)))
    assert mods.variant.mods and (mods.tiles.Br, mods.tiles.threads) == (128, 384)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_forward_d64_causal_takes_the_tall_tile_past_the_pairs(dtype):
    """Past PAIR_MAX_ROWS query rows (where the 128-row Q blocks no longer go in pairs) the plain causal d64 forward
    takes the 192-row tile (jit.Variant.tall); up to it, with a key mask, score mods, at d128 or in the backward,
    not."""
    def fwd(n_q, **kw):
        return plan.plan_for(_layout("fwd", dtype, kw.pop("d", 64), n_q=n_q, n_k=n_q + 5, **kw))

    tall = fwd(plan.TALL_MIN_ROWS, causal=True)
    assert tall.variant == jit.Variant("fwd_sm90", dtype, 64, True, tall=True) and tall.variant.name.endswith("_tall")
    assert (tall.tiles.Br, tall.tiles.Bc, tall.tiles.threads) == (192, 128, 512)
    (step,) = tall.steps
    assert step.grid == (math.ceil(plan.TALL_MIN_ROWS / 192), H, B) and step.block == (512,)
    assert tall.variant in jit.all_variants()  # compiled, and in CI's compile check
    pairs = fwd(plan.PAIR_MAX_ROWS, causal=True)
    assert not pairs.variant.tall and pairs.tiles.Br == 128
    assert pairs.steps[0].grid == (math.ceil(plan.PAIR_MAX_ROWS / 128 / 2), H, B)
    for other in (fwd(8192, causal=True, bias=KEY_MASK._replace(shape=(B, 1, 1, 8197), strides=(8197, 0, 0, 1))),
                  fwd(8192, causal=True, window=(64, 0)), fwd(8192, causal=True, d=128), fwd(8192)):
        assert not other.variant.tall and other.variant != tall.variant
    bwd = plan.plan_for(_layout("bwd", dtype, 64, causal=True, n_q=8192, n_k=8192))
    assert not bwd.variant.tall


TRANSPOSED_Q = dict(q=(NQ * H * 64, 64, H * 64, 1))  # a (B, N, H, D) view, as models produce: TMA takes it


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("change,pattern", [
    (dict(cc=80), r"^sm_80: wgmma and TMA are sm_90a instructions$"),
    (dict(cc=89), r"^sm_89"),
    (dict(cc=100), r"^sm_100"),
    (dict(dtype="float32"), r"^dtype float32: it takes float16 and bfloat16$"),
    (dict(d=256, dropout_p=0.1), r"^(dropout|score mods) at head_dim 256"),  # fwd: dropout; bwd: no score mods
    (dict(addresses=dict(q=8)), r"^q: its data pointer is not 16-byte aligned$"),
    (dict(addresses=dict(v=2)), r"^v: its data pointer"),
    (dict(strides=dict(k=(HKV * NK * 68, NK * 68, 68, 1))), r"^k: strides"),
    (dict(strides=dict(k=(NK * 64, 0, 64, 1))), r"^k: .*stride 0"),
    (dict(strides=dict(v=(HKV * NK * 64, NK * 64, 1, NK))), r"^v: its last dimension"),
    (dict(sm90=False), rf"^{launch.SM90_ENV}=0$"),
])
def test_hopper_declined_says_why_and_mma_sync_runs(kernel, change, pattern):
    p = plan.plan_for(_layout(kernel, **change))
    assert p.family == plan.MMA_SYNC and re.search(pattern, p.why), p.why
    layout = p.layout
    mods = layout.bias is not None or layout.window != (-1, -1) or layout.dropout_p > 0 or layout.softcap > 0
    assert p.variant == jit.Variant(kernel, layout.dtype, layout.shape[3], False, mods, layout.dropout_p > 0)
    assert p.tiles == p.variant.tiles


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_dim_256_on_hopper_and_dropout_on_mma_sync(dtype):
    """d256: the Hopper forward (80-key blocks plain or causal, 64 with score mods), the wide Hopper backward, and
    dropout on mma.sync (its Hopper forward variant spilled, so it is neither planned nor compiled)."""
    fwd = plan.plan_for(_layout("fwd", dtype, 256, causal=True))
    assert fwd.family == plan.HOPPER and fwd.tiles == tiles.FORWARD_SM90_PLAIN[256, True] and fwd.tiles.Bc == 80
    assert fwd.steps[0].shared_bytes == fwd.variant.shared_bytes <= 232448  # sm_90's opt-in shared memory
    windowed = plan.plan_for(_layout("fwd", dtype, 256, window=(32, 0)))
    assert windowed.family == plan.HOPPER and windowed.tiles == tiles.FORWARD_SM90[256] and windowed.tiles.Bc == 64
    bwd = plan.plan_for(_layout("bwd", dtype, 256, causal=True))
    assert bwd.family == plan.HOPPER and bwd.tiles.wide
    dropped = plan.plan_for(_layout("fwd", dtype, 256, dropout_p=0.1))
    assert dropped.family == plan.MMA_SYNC
    assert dropped.why == "dropout at head_dim 256: its Hopper variant spilled registers (tiles.Sm90Tiles.dropout)"
    compiled = {v.name for v in jit.all_variants()}
    short = {"float16": "f16", "bfloat16": "bf16"}[dtype]
    assert f"fwd_sm90_{short}_d256_mods" in compiled and f"fwd_sm90_{short}_d256_mods_dropout" not in compiled


@pytest.mark.parametrize("kernel,d", [("fwd", 80), ("fwd", 160), ("fwd", 192), ("bwd", 80), ("bwd", 160), ("bwd", 192)])
def test_head_dims_only_the_hopper_kernels_have(kernel, d):
    """Head dims with a Hopper kernel and no mma.sync one run as they are on sm_90 (tiles of 128, 192 or 256 columns,
    the tensors' own DHead in the variant: d160 and d192's plain and causal forward on 192 x 112 keys); where the
    Hopper kernel declines the call its plan says PADDED (no steps) and the faces pad to validate.kernel_head_dim's,
    as every head dim between the kernels'."""
    assert plan.hopper_only(kernel, d) and not plan.mma_sync_takes(kernel, "bfloat16", d)
    p = plan.plan_for(_layout(kernel, "bfloat16", d, causal=True))
    assert p.family == plan.HOPPER and p.variant.head_dim == d and p.tiles.tile_head_dim(d) in (128, 192, 256)
    if kernel == "fwd" and d in (160, 192):
        assert (p.tiles.tile_head_dim(d), p.tiles.Bc) == (192, 112)
    assert p.steps and all(s.variant.head_dim == d for s in p.steps if s.variant.kernel not in jit.SPLIT_KV_KERNELS)
    assert p.variant in jit.all_variants()
    declined = [(_layout(kernel, "bfloat16", d, cc=80), "sm_80: wgmma"),
                (_layout(kernel, "bfloat16", d, addresses=dict(k=8)), "k: its data pointer")]
    if kernel == "fwd" or tiles.has_backward("float32", validate.kernel_head_dim(d)):
        declined.append((_layout(kernel, "float32", d), "dtype float32"))
    else:  # no TF32 backward above 128 at all
        with pytest.raises(NotImplementedError, match=f"head_dim {d} in float32 has a forward kernel only"):
            plan.plan_for(_layout(kernel, "float32", d))
    for layout, why in declined:
        padded = plan.plan_for(layout)
        assert (padded.family, padded.steps, padded.variant) == (plan.PADDED, (), None)
        assert padded.why.startswith(why) and padded.why.endswith(f"mma.sync has no head_dim {d} kernel")
    if kernel == "fwd" and d > 128:
        assert plan.plan_for(_layout(kernel, "bfloat16", d, dropout_p=0.1)).family == plan.PADDED


@pytest.mark.parametrize("d", [160, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_the_backward_above_128_runs_on_the_wide_hopper_kernel(d, causal):
    """d160 / d192 / d256: the wide Hopper backward (flash_bwd_sm90_wide.cuh, 64 x 64 blocks, 256-column tiles), plain,
    causal, with a bias, a window or soft-capping (its mods variant, no causal one: a causal window is right = 0) or
    a key mask (its key-mask variant). An added bias's rebuild-rule rows come from mma.sync's forward, which has
    d256 only: d160 and d192 with one run PADDED to 256 (cuda_path), on the wide kernel there."""
    p = plan.plan_for(_layout("bwd", "bfloat16", d, causal=causal))
    assert p.family == plan.HOPPER and p.tiles.wide and (p.tiles.Br, p.tiles.Bc) == (64, 64)
    assert p.variant.expression.startswith("cupyflash::flash_bwd_sm90_wide_kernel<cupyflash::bf16, 256, ")
    (main,) = [s for s in p.steps if s.variant == p.variant]
    assert main.shared_bytes == p.variant.shared_bytes <= 232448 and main.block == (384,)
    assert main.grid[0] * main.grid[1] * main.grid[2] == B * HKV * math.ceil(NK / 64) * plan.backward_kv_split(
        _layout("bwd", "bfloat16", d, causal=causal), plan.HOPPER, 64)
    masked = plan.plan_for(_layout("bwd", "bfloat16", d, causal=causal, bias=KEY_MASK))
    assert masked.mask_form == "keys" and masked.family == plan.HOPPER and masked.tiles.wide
    assert masked.variant.name == f"bwd_sm90_bf16_d{d}{'_causal' if causal else ''}_keys"
    biased = plan.plan_for(_layout("bwd", "bfloat16", d, causal=causal, bias=BIAS))
    if d == 256:
        assert biased.family == plan.HOPPER and biased.tiles.wide and biased.variant.mods
        assert biased.variant.shared_bytes == main.shared_bytes + 2 * 64 * 4  # each Q/dO slot's rows' lo
    else:
        assert biased.family == plan.PADDED and "rebuild rule" in biased.why
    for change in (dict(window=(32, 0)), dict(softcap=30.0), dict(causal=True, window=(32, 0))):
        p = plan.plan_for(_layout("bwd", "bfloat16", d, **change))
        assert p.family == plan.HOPPER and p.tiles.wide and p.variant.mods and not p.variant.causal
    compiled = {v.name for v in jit.all_variants()}
    assert {f"bwd_sm90_bf16_d{d}_causal", f"bwd_sm90_bf16_d{d}_mods", f"bwd_sm90_bf16_d{d}_causal_keys"} <= compiled
    assert f"bwd_sm90_bf16_d{d}_mods_dropout" not in compiled


def test_hopper_backward_reads_dout_through_tma_too():
    assert plan.plan_for(_layout("fwd", addresses=dict(dout=8))).family == plan.HOPPER  # no dout in the forward
    p = plan.plan_for(_layout("bwd", addresses=dict(dout=8)))
    assert p.family == plan.MMA_SYNC and p.why.startswith("dout: its data pointer")


def test_transposed_views_stay_on_hopper():
    assert plan.plan_for(_layout("fwd", strides=TRANSPOSED_Q)).family == plan.HOPPER


@pytest.mark.parametrize("kernel,dtype,d,causal,want", [
    ("fwd", "float16", 128, False, tiles.FORWARD_PLAIN[128]),  # the plain forward's own shape
    ("fwd", "float16", 128, True, tiles.FORWARD[128]),
    ("fwd", "bfloat16", 64, False, tiles.FORWARD[64]),
    ("fwd", "float32", 64, False, tiles.TF32[("fwd", 64)]),
    ("fwd", "float16", 256, True, tiles.FORWARD[256]),
    ("bwd", "bfloat16", 64, True, tiles.BACKWARD[64]),
    ("bwd", "float32", 128, False, tiles.TF32[("bwd", 128)]),
    ("bwd", "float16", 96, False, tiles.BACKWARD[96]),
])
def test_mma_sync_tiles_grid_block_and_shared_memory(kernel, dtype, d, causal, want):
    p = plan.plan_for(_layout(kernel, dtype, d, cc=80, causal=causal))
    assert p.family == plan.MMA_SYNC and p.tiles == want
    main = p.steps[0 if kernel == "fwd" else 1]
    assert main.variant == p.variant and main.block == (want.threads,)
    assert main.shared_bytes == p.variant.shared_bytes > 0
    if kernel == "fwd":
        assert len(p.steps) == 1 and main.grid == (math.ceil(NQ / want.Br), H, B)
    else:
        assert [s.variant.kernel for s in p.steps] == ["bwd_preprocess", "bwd", "bwd_convert_dq"]
        assert main.grid == (math.ceil(NK / want.Bc), HKV, B)  # K/V blocks x K/V heads x batch
        # the preprocess zeroes dQ_accum's whole rows (Q blocks of the Hopper kernel), the conversion reads B·H·Nq
        pre_rows = plan.PREPROCESS_THREADS // plan.preprocess_lanes(d, dtype)
        assert p.steps[0].grid == (math.ceil(B * H * plan.dq_accum_rows(NQ) / pre_rows),)
        assert p.steps[0].block == (plan.PREPROCESS_THREADS,)
        assert p.steps[2].grid == (math.ceil(B * H * NQ / plan.ROWS_PER_BLOCK),) and p.steps[0].shared_bytes == 0


def test_bias_tile_classes_follow_the_plans_tiles():
    p = plan.plan_for(_layout("bwd", "float16", 64, cc=80, bias=BIAS._replace(grad=True)))
    t = p.tiles
    assert p.tile_classes_shape == (B, 1, math.ceil(NQ / t.Br), math.ceil(NK / t.Bc))
    main = p.steps[2]
    names = [slot.name for _, slot in main.packed.slots]
    assert names == ["q", "k", "v", "dout", "lse", "d_vec", "dq_accum", "dk", "dv", "bias", "tile_classes", "dbias",
                     "row_lse"]


@pytest.mark.parametrize("cc,main_kernel", [(80, "bwd"), (90, "bwd_sm90")])
@pytest.mark.parametrize("change", [dict(causal=True), dict(window=(16, 0), softcap=20.0),
                                    dict(dropout_p=0.25, bias=BIAS._replace(grad=True), causal=True)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backward_with_a_bias_runs_the_stats_pass(cc, main_kernel, change, dtype):
    """The rebuild rule (cpu_attention.py) in the kernels: a backward with a bias runs preprocess (row_lse = (LSE ·
    log2 e, 0)), the mma.sync forward's stats mode of the call's dtype, head dim and causal flag (without dropout or
    tile classes, out null, reading the saved LSE, writing row_lse), then the main kernel reading row_lse, whatever its
    family; a backward without one is unchanged, its row_lse pointers null."""
    biased = plan.plan_for(_layout("bwd", dtype, 64, cc=cc, **{"bias": BIAS, **change}))
    convert = "bwd_convert_dq_sm90" if main_kernel == "bwd_sm90" else "bwd_convert_dq"
    assert _kernels(biased) == ["bwd_preprocess", "fwd", main_kernel, convert]
    pre, stats, main, _ = _steps(biased)
    causal = change.get("causal", False)
    assert stats.variant == jit.Variant("fwd", dtype, 64, causal, mods=True, dropout=False)
    t = stats.variant.tiles
    assert stats.grid == (math.ceil(NQ / t.Br), H, B) and stats.block == (t.threads,)
    assert stats.shared_bytes == stats.variant.shared_bytes
    names = _slot_names(stats)
    assert names["lse"] == "lse" and names["row_stats"] == "row_lse" and stats.packed.values["o"] == 0  # out: null
    assert "tile_classes" not in names.values() and "seed" not in names.values()
    # no dropout: every word is kept (params.score_mods)
    assert stats.packed.values["mods.keep_threshold"] == 0xFFFFFFFF
    left, right = stats.packed.values["mods.win_left"], stats.packed.values["mods.win_right"]
    assert (left, right) == tuple(params.NO_WINDOW if w < 0 else w for w in change.get("window", (-1, -1)))
    assert _slot_names(pre)["lse"] == "lse" and _slot_names(pre)["row_lse"] == "row_lse"
    assert _slot_names(main)["row_lse"] == "row_lse"

    plain = plan.plan_for(_layout("bwd", dtype, 64, cc=cc, **{k: v for k, v in change.items() if k != "bias"}))
    assert _kernels(plain) == ["bwd_preprocess", main_kernel, convert]
    assert "row_lse" not in plain.needs
    pre_values, main_values = (s.packed.values for s in _steps(plain)[:2])
    assert (pre_values["lse"], pre_values["row_lse"], main_values["row_lse"]) == (0, 0, 0)


@pytest.mark.parametrize("n_q", [1, 64, 97, 1023])
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_hopper_backward_adds_dq_in_whole_q_blocks(n_q, d):
    """The Hopper backward adds dQ_accum in its fragment order, whole Q blocks of Br rows per head
    (flash_bwd_sm90.cuh DqFrag): dQ_accum has dq_accum_rows(n_q) rows per head, n_q rounded up to the largest Br of
    any variant (the plain d64's 128, the score mods' 64), all zeroed by the preprocess, and
    flash_bwd_convert_dq_sm90 reads them back, one thread per float4."""
    layout = _layout("bwd", d=d, n_q=n_q)
    p = plan.plan_for(layout)
    assert p.family == plan.HOPPER
    largest = max(t.Br for t in (*tiles.BACKWARD_SM90.values(), *tiles.BACKWARD_SM90_PLAIN.values()))
    assert largest == tiles.DQ_ACCUM_HEAD_ROWS
    rows = plan.dq_accum_rows(n_q)
    assert rows % p.tiles.Br == 0 and rows % largest == 0 and n_q <= rows < n_q + largest
    pre, _, conv = _steps(p)
    assert conv.variant == jit.Variant("bwd_convert_dq_sm90", layout.dtype, d)
    assert pre.packed.values["Nq_accum"] == rows and pre.packed.values["n_rows"] == B * H * rows
    assert pre.grid == (math.ceil(B * H * rows / (plan.PREPROCESS_THREADS // plan.preprocess_lanes(d, layout.dtype))),)
    items = B * H * rows * d // 4
    assert conv.packed.values["n_rows"] == items
    assert conv.grid == (math.ceil(items / plan.CONVERT_SM90_THREADS),) and conv.block == (plan.CONVERT_SM90_THREADS,)


def test_row_lse_goes_with_the_bias():
    """Only with a bias; a bias without it (launch.LSE_REBUILD_ENV "0") plans as before the rule."""
    with_bias = _layout("bwd", bias=BIAS)
    without = plan.plan_for(with_bias._replace(bufs=with_bias.bufs[:-1]))
    assert _kernels(without) == ["bwd_preprocess", "bwd_sm90", "bwd_convert_dq_sm90"]
    assert "row_lse" not in without.needs
    with pytest.raises(ValueError, match="row_lse without a bias"):
        plan.plan_for(with_bias._replace(bias=None))


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("change", [dict(bias=BIAS), dict(window=(16, 0)), dict(dropout_p=0.1), dict(softcap=30.0),
                                    dict(causal=True, bias=BIAS, window=(16, -1))])
def test_hopper_takes_score_mods(kernel, change):
    """Every score mod runs on the Hopper kernels, the bias classified in their tiles; with mods a causal mask is
    the window's right edge at the diagonal, on the non-causal variant (launch.sm90_variant)."""
    p = plan.plan_for(_layout(kernel, **change))
    assert p.family == plan.HOPPER, p.why
    assert p.variant.kernel == f"{kernel}_sm90" and p.variant.mods and not p.variant.causal
    if "bias" in change:
        assert p.tile_classes_shape == (B, 1, math.ceil(NQ / p.tiles.Br), math.ceil(NK / p.tiles.Bc))


def test_no_backward_head_dim():
    with pytest.raises(NotImplementedError, match="head_dim 256 in float32 has a forward kernel only: the TF32 "
                                                  "backward supports head dims up to 128; float16 and bfloat16 up "
                                                  "to 256"):
        plan.plan_for(_layout("bwd", dtype="float32", d=256, cc=80))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wide_head_backward_runs_one_launch_per_column_range(dtype):
    """d256 on mma.sync (sm_80): two launches of the same variant, columns 0-127 and 128-255 (tiles.Tiles.out_cols),
    both between the preprocess and the dQ conversion; only the first adds into dBias."""
    p = plan.plan_for(_layout("bwd", dtype=dtype, d=256, cc=80, bias=BIAS._replace(grad=True)))
    assert p.family == plan.MMA_SYNC
    kernels = [s.variant.kernel for s in p.steps]
    assert kernels[0] == "bwd_preprocess" and kernels[-1] == "bwd_convert_dq"
    main = [s for s in p.steps if s.variant.kernel == "bwd"]
    assert len(main) == 2 and main[0].variant == main[1].variant == p.variant
    assert p.tiles.launch_cols(256) == 128
    assert [s.packed.values["col0"] for s in main] == [0, 128]
    assert [_slot_names(s).get("mods.dbias") for s in main] == ["dbias", None]
    assert all(s.packed.values["mods.dbias"] == 0 for s in main[1:])


# ---- the cache -------------------------------------------------------------------------------------------------

def test_same_layout_hits_the_cache_and_any_change_misses():
    plan.plan_for.cache_clear()
    base = _layout("fwd", causal=True)
    p = plan.plan_for(base)
    assert plan.plan_for(_layout("fwd", causal=True)) is p
    info = plan.plan_for.cache_info()
    assert plan.plan_for(_layout("fwd", causal=True)) is p and plan.plan_for.cache_info().hits == info.hits + 1
    for other in (_layout("fwd", causal=True, strides=TRANSPOSED_Q), _layout("fwd", causal=True, addresses=dict(k=8)),
                  _layout("fwd", causal=True, device_id=1), _layout("fwd", causal=True, cc=80),
                  _layout("fwd", causal=False), _layout("bwd", causal=True)):
        misses = plan.plan_for.cache_info().misses
        assert plan.plan_for(other) is not p and plan.plan_for.cache_info().misses == misses + 1


# ---- parameter structs against the kernels ----------------------------------------------------------------------

KERNEL_NAMES = {"fwd": "flash_fwd_kernel", "fwd_sm90": "flash_fwd_sm90_kernel", "bwd": "flash_bwd_kernel",
                "bwd_sm90": "flash_bwd_sm90_kernel", "bwd_preprocess": "flash_bwd_preprocess",
                "bwd_convert_dq": "flash_bwd_convert_dq", "bwd_convert_dq_sm90": "flash_bwd_convert_dq_sm90",
                "bwd_expand_kv_sm90": "flash_bwd_expand_kv_sm90", "bwd_sum_kv_sm90": "flash_bwd_sum_kv_sm90",
                "key_mask_prep": "key_mask_prep"}


def _kernel_struct(name: str) -> str:
    """The struct (name without template arguments) __global__ `name` in kernels_cu takes, its one parameter."""
    text = "\n".join(p.read_text() for p in jit.kernel_dir().glob("*.cuh"))
    signature = re.search(rf"\b{name}\(([^)]*)\)\s*{{", text).group(1)
    m = re.fullmatch(r"const (__grid_constant__ )?(\w+)(<[^>]*>)? params", signature.strip())
    assert m, signature
    return m.group(2)


EVERY_VARIANT = [  # (kernel, layout changes): each family, plain and with every score modification
    *[(k, dict(causal=c)) for k in ("fwd", "bwd") for c in (False, True)],
    *[(k, dict(cc=80, causal=c, bias=BIAS._replace(grad=k == "bwd"), window=(8, 3), softcap=20.0))
      for k in ("fwd", "bwd") for c in (False, True)],
    *[(k, dict(cc=80, dropout_p=0.25, bias=BIAS._replace(f32=True))) for k in ("fwd", "bwd")],
    *[(k, dict(causal=c, bias=BIAS._replace(grad=k == "bwd"), window=(8, 3), softcap=20.0))
      for k in ("fwd", "bwd") for c in (False, True)],
    *[(k, dict(dropout_p=0.25, bias=BIAS._replace(f32=True))) for k in ("fwd", "bwd")],
    *[(k, dict(causal=c, bias=KEY_MASK)) for k in ("fwd", "bwd") for c in (False, True)],
]


@pytest.mark.parametrize("kernel,change", EVERY_VARIANT)
def test_every_launch_fills_its_kernels_parameters(kernel, change, monkeypatch):
    maps = {}  # no driver here: each map is 128 bytes naming its buffer's address

    def encode(desc, *args):
        address = args[2].value
        ctypes.memmove(desc, address.to_bytes(8, "little") * 16, 128)
        maps[address] = True
        return 0

    monkeypatch.setattr(tma, "_encode_fn", lambda: encode)
    tma.encode.cache_clear()
    p = plan.plan_for(_layout(kernel, **change))
    ptrs = {name: ALIGNED + 4096 * i for i, name in enumerate(sorted(p.needs))}
    assert p.needs <= set(plan.BACKWARD_BUFS + plan.BIAS_BACKWARD_BUFS) | {"bias", "tile_classes", "dbias", "seed",
                                                                          "key_mask", "key_meta",
                                                                          *plan.SPLIT_KV_BUFS}
    for step in p.steps:
        layout = params.KERNEL_STRUCTS[step.variant.kernel]
        assert step.packed.struct is layout, step.variant.name
        if not layout.positional:  # the Hopper backward's list: tests/test_params.py
            assert _kernel_struct(KERNEL_NAMES[step.variant.kernel]) == layout.c_type.split("<")[0]
        values = step.filled(ptrs)
        for at, slot in step.packed.slots:
            if isinstance(slot, params.Slot):
                assert values[next(k for k, v in step.packed.values.items() if v is slot)] == ptrs[slot.name]
        # What the driver reads: kernelParams pointers at the struct's bytes (one per parameter for a positional
        # list), the call's addresses and TMA maps in place.
        want = bytearray(layout.size)
        for path, scalar, at in layout.leaves:
            v = values[path]
            want[at:at + scalar.size] = v if scalar.fmt is None else struct.pack(scalar.fmt, v)
        block = step.arg_block.params(ptrs)
        assert len(block) == len(layout.param_offsets)
        assert ctypes.string_at(block[0], layout.size) == bytes(want), step.variant.name
        assert [at - block[0] for at in block] == list(layout.param_offsets)
        for at, slot in step.packed.slots:
            if isinstance(slot, params.TmaSlot):
                assert want[at:at + 8] == ptrs[slot.name].to_bytes(8, "little")
    if change.get("dropout_p"):
        assert "seed" in p.needs
    if p.family == plan.HOPPER:
        assert maps


# ---- the faces' CUDA path on CPU tensors, device stubbed --------------------------------------------------------

@pytest.fixture
def stubbed_device(monkeypatch):
    """CPU tensors down the CUDA path: an sm_80 pretended, stream 0, kernel calls recorded instead of launched."""
    from cupyflash import array_ops, cuda_path

    launched = []
    gpu = errors.GPUInfo(0, "stub", 80)
    monkeypatch.setattr(cuda_path, "require_gpu", lambda device_id=None: gpu)
    monkeypatch.setattr(array_ops.TorchOps, "stream_ptr", lambda self, device_id: 0)
    monkeypatch.setattr(launch, "_device", lambda device_id: contextlib.nullcontext())
    monkeypatch.setattr(launch, "_run",
                        lambda variant, grid, block, packed, *rest: launched.append((variant, packed.values)))
    monkeypatch.setattr(launch, "_run_step",
                        lambda step, ptrs, *rest: launched.append((step.variant, step.filled(ptrs))))
    return launched


def test_forward_and_backward_launch_with_the_tensors_addresses(stubbed_device, monkeypatch):
    monkeypatch.setenv(launch.LSE_REBUILD_ENV, "1")
    q = torch.randn(2, 4, 33, 64, dtype=torch.float16).transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, D)
    k, v = (torch.randn(2, 2, 40, 64, dtype=torch.float16) for _ in range(2))
    bias = torch.randn(2, 1, 33, 40, dtype=torch.float16)
    out, lse = cuda_attention.forward(q, k, v, bias, 0.125, True)
    names = [variant.kernel for variant, _ in stubbed_device]
    assert names == ["tile_minmax", "tile_classify", "fwd"]
    args = stubbed_device[-1][1]
    assert [args[name] for name in ("q", "k", "v", "o", "lse")] == [t.data_ptr() for t in (q, k, v, out, lse)]
    assert [args[f"q_s.{c}"] for c in "bhn"] == list(q.stride()[:3])
    assert args["mods.bias"] == bias.data_ptr()
    assert [args[f"mods.bias_s.{c}"] for c in "bhmn"] == [bias.stride(0), 0, *bias.stride()[2:]]
    stubbed_device.clear()
    dout = torch.randn_like(q)
    dq, dk, dv, dbias = cuda_attention.backward(dout, q, k, v, bias, out, lse, 0.125, True, bias_grad=True)
    assert [variant.kernel for variant, _ in stubbed_device] == ["tile_minmax", "tile_classify", "bwd_preprocess",
                                                                  "fwd", "bwd", "bwd_convert_dq"]
    pre, stats, main = (args for _, args in stubbed_device[2:5])
    assert [main[name] for name in ("q", "k", "v", "dout", "lse", "dk", "dv")] == [
        t.data_ptr() for t in (q, k, v, dout, lse, dk, dv)]
    # the stats pass reads q, k, v and the saved lse, and all three share one row_lse workspace
    assert [stats[name] for name in ("q", "k", "v", "o", "lse")] == [q.data_ptr(), k.data_ptr(), v.data_ptr(), 0,
                                                                     lse.data_ptr()]
    assert pre["lse"] == lse.data_ptr() and pre["row_lse"] == stats["row_stats"] == main["row_lse"] != 0
    assert dq.shape == q.shape and dbias.shape == bias.shape and dbias.dtype == bias.dtype
    stubbed_device.clear()
    monkeypatch.setenv(launch.LSE_REBUILD_ENV, "0")  # the rule off: the backward as before it, no row_lse
    cuda_attention.backward(dout, q, k, v, bias, out, lse, 0.125, True, bias_grad=True)
    assert [variant.kernel for variant, _ in stubbed_device] == ["tile_minmax", "tile_classify", "bwd_preprocess",
                                                                  "bwd", "bwd_convert_dq"]
    assert stubbed_device[3][1]["row_lse"] == 0


def test_unaligned_inputs_are_copied_before_planning(stubbed_device):
    storage = torch.randn(2 * 4 * 33 * 64 + 1, dtype=torch.float16)
    q = storage[1:].view(2, 4, 33, 64)  # every row 2 bytes off 16
    k, v = (torch.randn(2, 4, 40, 64, dtype=torch.float16) for _ in range(2))
    cuda_attention.forward(q, k, v, None, 0.125, False)
    (variant, args), = stubbed_device
    assert variant.kernel == "fwd" and args["q"] != q.data_ptr() and args["q"] % 16 == 0


@pytest.mark.parametrize("head_dim,kernel_d", [(8, 32), (80, 96), (112, 128), (200, 256)])
def test_head_dims_between_the_kernels_run_zero_padded(stubbed_device, head_dim, kernel_d):
    q = torch.randn(2, 4, 33, head_dim, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 40, head_dim, dtype=torch.bfloat16) for _ in range(2))
    out, lse = cuda_attention.forward(q, k, v, None, 0.125, True)
    (variant, args), = stubbed_device
    assert variant.kernel == "fwd" and variant.head_dim == kernel_d
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == q.shape[:3]
    if kernel_d in tiles.BACKWARD:
        stubbed_device.clear()
        dq, dk, dv, _ = cuda_attention.backward(torch.randn_like(q), q, k, v, None, out, lse, 0.125, True)
        launches = kernel_d // tiles.BACKWARD[kernel_d].launch_cols(kernel_d)  # d256: one per column range
        assert [variant.kernel for variant, _ in stubbed_device] == ["bwd_preprocess", *["bwd"] * launches,
                                                                     "bwd_convert_dq"]
        assert all(v.head_dim == kernel_d for v, _ in stubbed_device)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    else:
        with pytest.raises(NotImplementedError, match=f"head_dim {head_dim} has a forward kernel only"):
            cuda_attention.backward(torch.randn_like(q), q, k, v, None, out, lse, 0.125, True)


@pytest.mark.parametrize("head_dim", [80, 160, 192])
def test_hopper_only_head_dims_run_without_copies_on_sm90(stubbed_hopper, head_dim):
    """On sm_90, d80 / d160 / d192 reach the Hopper kernels of both passes at their own head dim with the tensors' own
    addresses (no padded copies). Grouped-query K/V and a transposed q, as models give them."""
    launched = stubbed_hopper
    q = torch.randn(2, 40, 4, head_dim, dtype=torch.bfloat16).transpose(1, 2)  # (B, H, N, D) of (B, N, H, D) memory
    k, v = (torch.randn(2, 2, 40, head_dim, dtype=torch.bfloat16) for _ in range(2))
    out, lse = cuda_attention.forward(q, k, v, None, 0.125, True)
    (variant, ptrs), = launched
    assert variant == jit.Variant("fwd_sm90", "bfloat16", head_dim, True)
    assert [ptrs[n] for n in ("q", "k", "v", "out")] == [t.data_ptr() for t in (q, k, v, out)]
    assert out.shape == q.shape
    launched.clear()
    dq, dk, dv, _ = cuda_attention.backward(torch.randn_like(out), q, k, v, None, out, lse, 0.125, True)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    kernels = [(variant.kernel, ptrs) for variant, ptrs in launched if variant.kernel not in jit.SPLIT_KV_KERNELS]
    assert [k for k, _ in kernels] == ["bwd_preprocess", "bwd_sm90", "bwd_convert_dq_sm90"]
    assert kernels[1][1]["dout"] != 0 and kernels[0][1]["dout"] == kernels[1][1]["dout"]
    assert all(variant.head_dim == head_dim for variant, _ in launched)


def test_hopper_only_head_dim_with_a_bias_runs_its_backward_padded(stubbed_hopper, monkeypatch):
    """d80 with a bias: the forward runs at 80 on the Hopper kernel, the backward at 96: its rebuild rule's stats pass
    is the mma.sync forward's (plan._stats_step), which has no d80 kernel."""
    from cupyflash import cuda_path

    monkeypatch.setattr(cuda_path, "_KNOWN", {})
    launched = stubbed_hopper
    q, k, v = (torch.randn(2, 2, 40, 80, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 2, 40, 40, dtype=torch.bfloat16)
    out, lse = cuda_attention.forward(q, k, v, bias, 0.125, False)
    assert [(variant.kernel, variant.head_dim) for variant, _ in launched if variant.kernel.startswith("fwd")] == \
        [("fwd_sm90", 80)]
    launched.clear()
    dq, dk, dv, dbias = cuda_attention.backward(torch.randn_like(out), q, k, v, bias, out, lse, 0.125, False,
                                                bias_grad=True)
    assert (dq.shape, dk.shape, dv.shape, dbias.shape) == (q.shape, k.shape, v.shape, bias.shape)
    assert {variant.head_dim for variant, _ in launched if variant.kernel in ("fwd", "bwd", "bwd_sm90")} == {96}


@pytest.mark.parametrize("head_dim,hopper_d", [(72, 80), (104, 128), (136, 160), (176, 192), (200, 256)])
def test_head_dims_between_run_padded_to_the_next_hopper_one(stubbed_hopper, head_dim, hopper_d):
    """On sm_90 a head dim no kernel has runs padded to the next the Hopper kernels take as it is (d136 on 160
    columns, not mma.sync's 256), both passes; where the Hopper plan declines it there (dropout above 128), on to
    mma.sync's."""
    launched = stubbed_hopper
    q, k, v = (torch.randn(2, 2, 40, head_dim, dtype=torch.bfloat16) for _ in range(3))
    out, lse = cuda_attention.forward(q, k, v, None, 0.125, True)
    assert [(variant.kernel, variant.head_dim) for variant, _ in launched] == [("fwd_sm90", hopper_d)]
    launched.clear()
    dq, dk, dv, _ = cuda_attention.backward(torch.randn_like(out), q, k, v, None, out, lse, 0.125, True)
    assert (out.shape, dq.shape, dk.shape, dv.shape) == (q.shape, q.shape, k.shape, v.shape)
    assert "bwd_sm90" in [variant.kernel for variant, _ in launched]
    assert {variant.head_dim for variant, _ in launched} == {hopper_d}
    if hopper_d > 128:
        launched.clear()
        cuda_attention.forward(q, k, v, None, 0.125, False, dropout_p=0.1, seed=torch.tensor(1))
        assert [(variant.kernel, variant.head_dim) for variant, _ in launched] == [("fwd", 256)]


def test_value_head_dim_other_than_q_runs_both_padded_to_one(stubbed_device):
    q, k = torch.randn(2, 4, 33, 40, dtype=torch.bfloat16), torch.randn(2, 2, 40, 40, dtype=torch.bfloat16)
    v = torch.randn(2, 2, 40, 72, dtype=torch.bfloat16)
    out, lse = cuda_attention.forward(q, k, v, None, 0.125, False)
    (variant, _), = stubbed_device
    assert variant.head_dim == 96 and out.shape == (2, 4, 33, 72) and out.is_contiguous()
    dq, dk, dv, _ = cuda_attention.backward(torch.randn_like(out), q, k, v, None, out, lse, 0.125, False)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_a_call_seen_before_is_planned_from_its_key(stubbed_device, monkeypatch):
    """cuda_path._planned: one plan per call key (boolean masks keyed as converted); a call whose inputs need a copy
    is planned again each time (its copies are fresh)."""
    from cupyflash import cuda_path

    planned = []
    real = cuda_path._plan
    monkeypatch.setattr(cuda_path, "_plan", lambda *a, **kw: planned.append(a[1]) or real(*a, **kw))
    monkeypatch.setattr(cuda_path, "_KNOWN", {})
    q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.float16) for _ in range(3))
    mask = torch.rand(1, 1, 40, 40) > 0.3
    for _ in range(3):
        out, lse = cuda_attention.forward(q, k, v, mask, 0.125, False)
        cuda_attention.backward(torch.randn_like(q), q, k, v, mask, out, lse, 0.125, False)
    assert planned == ["fwd", "bwd"]
    unaligned = torch.randn(1 * 2 * 40 * 64 + 1, dtype=torch.float16)[1:].view(1, 2, 40, 64)
    for _ in range(2):
        cuda_attention.forward(unaligned, k, v, None, 0.125, False)
    assert planned == ["fwd", "bwd", "fwd", "fwd"]


def test_launches_outside_a_plan_pass_bytes_that_outlive_their_block(monkeypatch):
    """launch._run packs a struct for one launch (the bias tile classes): its kernelParams must still point to the
    struct's bytes when the driver reads them, though nothing else holds the block (it did not: the GPU read a
    freed buffer, an illegal address in tile_minmax)."""
    import gc

    from cupyflash import driver

    packed = params.TILE_CLASSIFY.pack(dict(tile_min=0x1000, tile_max=0x2000, row_keeps=0x3000, nq=97, tq=64, QB=2,
                                            KB=4, n_tiles=8, window=0, classes=0x4000))
    seen = []

    def read_at_launch(function, dims6, shared_bytes, stream_ptr, kernel_params):
        gc.collect()
        junk = [ctypes.create_string_buffer(b"\xff" * len(packed.template)) for _ in range(64)]  # reuse freed memory
        seen.append(ctypes.string_at(kernel_params[0], len(packed.template)))
        del junk

    monkeypatch.setattr(launch, "_function", lambda variant, device: (None, 0))
    monkeypatch.setattr(launch, "_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(driver, "launch", read_at_launch)
    launch._run(jit.Variant("tile_classify", "float16", 0), (1,), (128,), packed, 0, 0)
    assert seen == [packed.template]


def test_plain_op_calls_run_their_plan_without_checking_again(stubbed_device, monkeypatch):
    """The ops' plain calls (no bias, no dropout), as Inductor's code makes them layer after layer: the first of a
    call key takes the whole path; the next launches the same kernels with the same arguments but its own tensors'
    addresses, without the checks; a call with another layout takes the whole path again."""
    monkeypatch.setattr(torch_op, "_impl", lambda q: cuda_attention)
    monkeypatch.setattr(torch_op, "_PLAIN_FORWARDS", {})
    monkeypatch.setattr(torch_op, "_PLAIN_BACKWARDS", {})
    fwd, bwd = torch.ops.cupyflash.flash_attn_fwd.default, torch.ops.cupyflash.flash_attn_bwd.default

    def inputs(n_q=33):
        q = torch.randn(2, 4, n_q, 64, dtype=torch.float16).transpose(1, 2).contiguous().transpose(1, 2)
        return (q, *(torch.randn(2, 2, 40, 64, dtype=torch.float16) for _ in range(2)))

    def calls(q, k, v):
        out, lse = fwd(q, k, v, None, 0.125, True, 16, 0)
        dq, dk, dv, dbias = bwd(torch.randn_like(out), q, k, v, None, out, lse, 0.125, True, 16, 0)
        assert (dq.shape, dk.shape, dv.shape, dbias.shape) == (q.shape, k.shape, v.shape, (0,))
        launched = list(stubbed_device)
        stubbed_device.clear()
        return launched, (q, k, v, out, lse, dq, dk, dv)

    first, _ = calls(*inputs())

    def checked_again(*args):
        raise AssertionError("checked again")

    monkeypatch.setattr(torch_op, "_check", checked_again)
    monkeypatch.setattr(torch_op, "_check_backward", checked_again)
    second, (q, k, v, out, lse, dq, dk, dv) = calls(*inputs())
    assert [variant for variant, _ in second] == [variant for variant, _ in first]
    assert [variant.kernel for variant, _ in second] == ["fwd", "bwd_preprocess", "bwd", "bwd_convert_dq"]
    addresses = {"q": q, "k": k, "v": v, "o": out, "out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    for (_, before), (_, now) in zip(first, second):
        assert before.keys() == now.keys()
        for name in before:
            if before[name] != now[name] and name not in ("dout", "d_vec", "dq_accum"):
                assert now[name] == addresses[name].data_ptr(), name
    # the workspaces share one allocation on both paths (the checked first call, the plain second): dq_accum
    # (B, H, Nq, D) fp32, then d_vec 256 bytes aligned past its end
    for launched in (first, second):
        (_, workspace), = [(v, args) for v, args in launched if v.kernel == "bwd_preprocess"]
        offset = workspace["d_vec"] - workspace["dq_accum"]
        assert offset >= 4 * q.numel() and offset % 256 == 0
    _, third = calls(*inputs())  # new outputs each call, the second's still alive
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(third[3:], (out, lse, dq, dk, dv)))
    assert all(t.device == q.device for t in third[3:]) and third[3].is_contiguous() and third[4].is_contiguous()
    # the gradients' memory is (B, N, H, D) (array_ops.token_major_strides): dq's that of q here
    assert all(t.transpose(1, 2).is_contiguous() for t in third[5:]) and third[5].stride() == q.stride()
    assert [t.dtype for t in third[3:]] == [torch.float16, torch.float32, *[torch.float16] * 3]
    # flash_attention's forward and backward (autograd outside torch.compile) take the same plans
    q, k, v = (t.requires_grad_() for t in inputs())
    cupyflash.flash_attention(q, k, v, causal=True, window=(16, 0)).sum().backward()
    assert [variant.kernel for variant, _ in stubbed_device] == ["fwd", "bwd_preprocess", "bwd", "bwd_convert_dq"]
    assert stubbed_device[0][1]["q"] == q.data_ptr() and all(t.grad is not None for t in (q, k, v))
    stubbed_device.clear()
    with pytest.raises(AssertionError, match="checked again"):
        calls(*inputs(n_q=34))


@pytest.mark.parametrize("value", [None, "0", "1", "", " 0"])
def test_sm90_switch_follows_the_environment(monkeypatch, value):
    """plan.sm90_enabled reads CUPYFLASH_SM90 through os.environ's own dict (each call key reads it): it sees every
    write through os.environ at once, as os.environ.get would."""
    if value is None:
        monkeypatch.delenv(launch.SM90_ENV, raising=False)
    else:
        monkeypatch.setenv(launch.SM90_ENV, value)
    assert plan.sm90_enabled() is (os.environ.get(launch.SM90_ENV, "1") != "0")
    monkeypatch.setenv(launch.SM90_ENV, "0")
    assert plan.sm90_enabled() is False


def test_out_layout_reaches_the_kernel(stubbed_device, monkeypatch):
    """The forward's out strides are part of its plan: a contiguous call, then token_major_out with the same q, k, v
    layout, on the checked path and then the plain runner; a plan made for one layout would write the other's out in
    the wrong order (it did, before the option entered cuda_path._planned's key)."""
    from cupyflash import cuda_path

    monkeypatch.setattr(torch_op, "_impl", lambda q: cuda_attention)
    monkeypatch.setattr(torch_op, "_PLAIN_FORWARDS", {})
    monkeypatch.setattr(cuda_path, "_KNOWN", {})
    q, k, v = (torch.randn(2, 4, 33, 64, dtype=torch.float16) for _ in range(3))
    for token_major in (False, True, False, True):
        for _ in range(2):
            out, _ = torch.ops.cupyflash.flash_attn_fwd.default(q, k, v, None, 0.125, True, token_major_out=token_major)
            assert out.transpose(1, 2).is_contiguous() if token_major else out.is_contiguous()
            (variant, args), = stubbed_device
            assert variant.kernel == "fwd" and args["o"] == out.data_ptr()
            assert [args[f"o_s.{c}"] for c in "bhn"] == list(out.stride()[:3])
            stubbed_device.clear()


@pytest.mark.parametrize("dtype,d,lanes", [("bfloat16", 32, 4), ("float16", 64, 8), ("bfloat16", 96, 16),
                                           ("bfloat16", 128, 16), ("float16", 256, 32), ("float32", 32, 8),
                                           ("float32", 128, 32), ("float32", 256, 32)])
def test_preprocess_lanes_match_the_kernels_rule(dtype, d, lanes):
    """The preprocess's grid (rows per thread block) follows from its lanes per row, which the kernel computes
    itself (kernels_cu/flash_bwd.cuh preprocess_lanes): NVRTC checks the C++ rule gives Python's."""
    assert plan.preprocess_lanes(d, dtype) == lanes
    try:
        nvrtc = jit._nvrtc()
    except Exception as err:
        pytest.skip(f"NVRTC cannot be loaded ({type(err).__name__}: {err})")
    source = (jit._inline(jit.kernel_dir() / "flash_bwd.cuh", set())
              + f"\nstatic_assert(cupyflash::preprocess_lanes({d}, {jit.ELEM_BYTES[dtype]}) == {lanes}, "
                f"\"preprocess_lanes\");\n")
    prog = nvrtc.createProgram(source, "preprocess_lanes.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", "-arch=sm_80"])
        except Exception:
            pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


# Q and dO of a (batch, K/V head) pair in the layouts below: 2 tensors x H / HKV query heads x n_q x 64 columns x 2
# bytes; the most rows for one group of all B x HKV pairs
N_Q_ALL_PAIRS = plan.K_OUTER_MAX_BYTES // (B * HKV * 2 * (H // HKV) * 64 * 2)


@pytest.fixture
def no_kv_split(monkeypatch):
    """Plans without the grouped-query backward's split (plan.backward_kv_split: 1 at any grid), none cached."""
    monkeypatch.setattr(plan, "KV_SPLIT_MIN_BLOCKS", 0)
    plan.plan_for.cache_clear()
    yield
    plan.plan_for.cache_clear()


def _decoded(grid: tuple, outer_kv_heads: int) -> list:
    """(batch, K/V head, K/V block) of each thread block, in launch order (x fastest), as the backward kernels
    decode blockIdx (kernels_cu/flash_bwd_sm90.cuh)."""
    out = []
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                if outer_kv_heads:
                    pair = z * grid[0] + x
                    out.append((pair // outer_kv_heads, pair % outer_kv_heads, y))
                else:
                    out.append((z, y, x))
    return out


@pytest.mark.parametrize("causal,n_q,mods,group", [
    (True, 512, {}, B * HKV), (True, N_Q_ALL_PAIRS, {}, B * HKV), (True, N_Q_ALL_PAIRS + 1, {}, 2),
    (True, 2 * N_Q_ALL_PAIRS + 1, {}, 1), (False, 512, {}, 1), (True, 512, dict(window=(128, 0)), 1),
    (True, 512, dict(softcap=30.0), 1), (True, 512, dict(n_k=128 * plan.K_OUTER_MAX_BLOCKS), B * HKV),
    (True, 512, dict(n_k=128 * plan.K_OUTER_MAX_BLOCKS + 1), 1)])
def test_small_plain_causal_backward_puts_key_blocks_outermost(causal, n_q, mods, group, no_kv_split):
    """plan.backward_grid: a plain causal call on the Hopper kernel takes its (batch, K/V head) pairs in the largest
    groups (dividing them) whose Q and dO fit in K_OUTER_MAX_BYTES, each group's K/V blocks outermost: grid (pairs of
    a group, K/V blocks, groups), outer_kv_heads = HKV. Groups of one (or any other call) keep (K/V blocks, K/V heads,
    batch). Either way the kernel's decoding of blockIdx visits every (batch, K/V head, K/V block) once, and with
    groups each group's first K/V block (the heaviest under the mask) before its second. The mma.sync kernel always
    takes the first order. (Without the grouped-query split here: test_grouped_query_backward_splits_... below.)"""
    p = plan.plan_for(_layout("bwd", "bfloat16", 64, causal=causal, n_q=n_q, **mods))
    main = p.steps[1]
    assert p.family == plan.HOPPER
    mma = plan.plan_for(_layout("bwd", "bfloat16", 64, cc=80, causal=causal, n_q=n_q, **mods))
    n_k = mods.get("n_k", NK)
    assert mma.steps[1].grid == (math.ceil(n_k / mma.tiles.Bc), HKV, B)
    n_blocks = math.ceil(n_k / p.tiles.Bc)
    outer = main.packed.values["outer_kv_heads"]
    assert main.grid == ((group, n_blocks, B * HKV // group) if group > 1 else (n_blocks, HKV, B))
    assert outer == (HKV if group > 1 else 0)
    visits = _decoded(main.grid, outer)
    assert sorted(visits) == [(b, h, x) for b in range(B) for h in range(HKV) for x in range(n_blocks)]
    if group > 1:
        assert [x for _, _, x in visits[:group]] == [0] * group
    fwd = plan.plan_for(_layout("fwd", "bfloat16", 64, causal=causal, n_q=n_q, **mods))
    assert fwd.steps[0].grid[1:] == (H, B)


@pytest.mark.parametrize("shape,n_k,kv_heads,causal,split", [
    ((4, 16, 2048, 128), 2048, 4, True, 4),  # the Llama step's layer: 4 x 4 x 16 K/V blocks = 256 thread blocks
    ((1, 16, 8192, 128), 8192, 4, False, 4),  # 4 x 64 = 256
    ((2, 16, 4096, 128), 4096, 4, True, 4),  # 2 x 4 x 32 = 256, x 2 = 512 < 528: the next divisor, 4
    ((8, 16, 8192, 128), 8192, 4, True, 1),  # 2048 thread blocks: no split
    ((2, 24, 1024, 64), 1024, 4, True, 6),  # group 6: 2 x 4 x 8 = 64 thread blocks, x 6 = 384 < 528: the whole group
    ((2, 24, 4096, 64), 4096, 4, True, 3),  # 2 x 4 x 32 = 256: x 2 = 512, x 3 = 768
    ((2, 16, 512, 64), 517, 16, True, 1),  # no grouped query
])
def test_grouped_query_backward_splits_heads_over_thread_blocks(shape, n_k, kv_heads, causal, split):
    """plan.backward_kv_split: a grouped-query Hopper backward with fewer than KV_SPLIT_MIN_BLOCKS thread blocks
    splits each K/V head's query heads over the fewest thread blocks (a divisor of the group) that reach it. The
    unchanged kernel then runs on kv_heads · split K/V heads of G / split query heads each, over copies of K and V
    (flash_bwd_expand_kv_sm90 repeats each head `split` times) into partial dK, dV (flash_bwd_sum_kv_sm90 adds them
    into dk and dv): four (B, H_kv · split, Nk, D) parts of the plan's kv_part array, contiguous. Its grid visits
    every (batch, split K/V head, K/V block) once. mma.sync is never split."""
    batch, heads, n_q, d = shape
    q_shape, kv_shape = shape, (batch, kv_heads, n_k, d)
    shapes = dict(q=q_shape, k=kv_shape, v=kv_shape, out=q_shape, dout=q_shape, lse=q_shape[:3], d_vec=q_shape[:3],
                  dq_accum=(batch, heads, plan.dq_accum_rows(n_q), d), dq=q_shape, dk=kv_shape, dv=kv_shape)
    layout = plan.CallLayout("bwd", "bfloat16", q_shape, n_k, kv_heads,
                             tuple((n, _contiguous(shapes[n]), 0) for n in plan.BACKWARD_BUFS), causal, 0.125)
    p = plan.plan_for(layout)
    assert p.family == plan.HOPPER
    n_blocks = math.ceil(n_k / p.tiles.Bc)
    assert plan.backward_kv_split(layout, p.family, p.tiles.Bc) == split
    assert split == 1 or batch * kv_heads * n_blocks * split >= plan.KV_SPLIT_MIN_BLOCKS or split == heads // kv_heads
    main = next(s for s in p.steps if s.variant == p.variant)
    assert main.packed.values["group"] == heads // kv_heads // split
    names = {**_slot_names(main), **{path: v.name for path, v in main.packed.values.items()
                                     if isinstance(v, params.TmaSlot)}}
    kernels = [s.variant.kernel for s in p.steps]
    if split == 1:
        assert p.kv_part_shape is None and kernels == ["bwd_preprocess", "bwd_sm90", "bwd_convert_dq_sm90"]
        assert [names[n] for n in ("tm_k", "tm_v", "dk", "dv")] == ["k", "v", "dk", "dv"]
    else:
        assert p.kv_part_shape == (4, batch, kv_heads * split, n_k, d)
        assert [names[n] for n in ("tm_k", "tm_v", "dk", "dv")] == list(plan.SPLIT_KV_BUFS)
        part = _contiguous(p.kv_part_shape[1:])
        assert [main.packed.values[f"dk_s{c}"] for c in "bhn"] == list(part[:3])
        tm_k = main.packed.values["tm_k"]
        assert tm_k.shape == (batch, kv_heads * split, n_k, d) and tm_k.strides == part
        assert kernels == ["bwd_preprocess", "bwd_expand_kv_sm90", "bwd_sm90", "bwd_sum_kv_sm90",
                           "bwd_convert_dq_sm90"]
        expand, sums = p.steps[1], p.steps[3]
        items = batch * kv_heads * n_k * d // 8
        for step, kernel in ((expand, "bwd_expand_kv_sm90"), (sums, "bwd_sum_kv_sm90")):
            assert step.variant == jit.Variant(kernel, "bfloat16", d)
            assert step.grid == (math.ceil(items / plan.SPLIT_KV_THREADS), 2) and step.block == (plan.SPLIT_KV_THREADS,)
            assert {f: step.packed.values[f] for f in ("H", "Nk", "DHead", "split", "n_items")} == dict(
                H=kv_heads, Nk=n_k, DHead=d, split=split, n_items=items)
            assert [step.packed.values[f"split_s.{c}"] for c in "bhn"] == list(part[:3])
            assert _slot_names(step) == {**{n: n for n in ("k", "v", "dk", "dv")},
                                         **{n: n for n in plan.SPLIT_KV_BUFS}}
    visits = _decoded(main.grid, main.packed.values["outer_kv_heads"])
    assert sorted(visits) == [(b, h, x) for b in range(batch) for h in range(kv_heads * split)
                              for x in range(n_blocks)]
    mma = plan.plan_for(layout._replace(compute_capability=80))
    assert mma.kv_part_shape is None and mma.steps[1].grid[1] == kv_heads


# ---- boolean masks: the plain Hopper kernels' key mask, or an added bias -----------------------------------------

@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch_rows", [B, 1])
@pytest.mark.parametrize("d", [64, 128])
def test_boolean_key_mask_runs_as_the_plain_hopper_kernels_key_mask(kernel, causal, batch_rows, d):
    mask = KEY_MASK._replace(shape=(batch_rows, 1, 1, NK), strides=(NK if batch_rows > 1 else 0, 0, 0, 3))
    p = plan.plan_for(_layout(kernel, d=d, causal=causal, bias=mask))
    assert (p.family, p.mask_form) == (plan.HOPPER, "keys")
    assert p.variant == jit.Variant(f"{kernel}_sm90", "bfloat16", d, causal, key_mask=True)
    assert p.layout.bias is None and p.tile_classes_shape is None  # no bias, no tile classes, no stats pass
    words = plan.key_meta_words(NK)
    assert p.key_meta_shape == (batch_rows, plan.KEY_META_HEAD + words)
    prep = p.steps[0]
    assert (prep.variant.kernel, prep.grid, prep.block) == ("key_mask_prep", (batch_rows,), (plan.KEY_MASK_THREADS,))
    assert _slot_names(prep) == {"mask": "key_mask", "meta": "key_meta"}
    sb = plan.KEY_META_HEAD + words if batch_rows > 1 else 0
    assert {f: prep.packed.values[f] for f in ("mask_sb", "mask_sn", "Nk", "words", "meta_sb")} == dict(
        mask_sb=mask.strides[0], mask_sn=3, Nk=NK, words=words, meta_sb=sb)
    (main,) = [s for s in p.steps if s.variant == p.variant]
    meta, meta_sb = ("keys.meta", "keys.sb") if kernel == "fwd" else ("key_meta", "key_meta_sb")
    assert _slot_names(main)[meta] == "key_meta" and main.packed.values[meta_sb] == sb
    assert _kernels(p) == (
        ["key_mask_prep", "fwd_sm90"] if kernel == "fwd" else
        ["key_mask_prep", "bwd_preprocess", "bwd_sm90", "bwd_convert_dq_sm90"])
    # the plain path's grid: Q-block pairs forward, the causal backward's K/V blocks outermost
    plain = plan.plan_for(_layout(kernel, d=d, causal=causal))
    assert main.grid == _steps(plain)[0 if kernel == "fwd" else 1].grid


def test_key_meta_rows_cover_a_whole_block_past_the_last_key():
    """The kernels read the words of whole K/V blocks (up to 175 keys past Nk) and one word more (key_mask.cuh
    bits_from); rows of 16 bytes."""
    largest_bc = max(t.Bc for t in (*tiles.FORWARD_SM90.values(), *tiles.BACKWARD_SM90.values()))
    for n_k in (1, 17, 31, 32, 33, 4096, 8193):
        words = plan.key_meta_words(n_k)
        assert words % 4 == 0 and 32 * words >= n_k + largest_bc + 32 and 32 * words <= n_k + plan.KEY_MASK_TAIL + 128


@pytest.mark.parametrize("kernel,change,why", [
    ("fwd", dict(bias=KEY_MASK._replace(shape=(B, 1, NQ, NK), strides=(NQ * NK, 0, NK, 1))), "per query"),
    ("bwd", dict(bias=KEY_MASK._replace(shape=(B, H, 1, NK), strides=(H * NK, NK, 0, 1))), "per head"),
    ("fwd", dict(bias=KEY_MASK, window=(8, 0)), "a window"),
    ("bwd", dict(bias=KEY_MASK, softcap=20.0), "soft-capping"),
    ("fwd", dict(bias=KEY_MASK, dropout_p=0.1), "dropout"),
    ("bwd", dict(bias=KEY_MASK, cc=80), "mma.sync"),
    ("fwd", dict(bias=KEY_MASK, sm90=False), "mma.sync"),
    ("bwd", dict(bias=KEY_MASK, d=256, window=(32, 0)), "a window beside it on the wide Hopper backward"),
])
def test_other_boolean_masks_run_as_an_added_bias(kernel, change, why):
    """Plan.mask_form "bias": the face turns the mask into 0 / -inf, contiguous, as the plan's layout says."""
    p = plan.plan_for(_layout(kernel, **change))
    mask = change["bias"]
    assert p.mask_form == "bias" and not p.variant.key_mask and p.key_meta_shape is None, why
    assert p.layout.bias == plan.BiasLayout(mask.shape, plan.dbias_strides(mask.shape), f32=False)
    assert p.tile_classes_shape is not None and "key_mask_prep" not in [s.variant.kernel for s in p.steps]


@pytest.mark.parametrize("scale", [0.0, -0.125])
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_a_scale_not_above_zero_takes_the_score_mods_variant(scale, kernel, causal):
    """The plain Hopper forward takes each row's max on unscaled scores (right for a scale > 0 only): a scale <= 0
    plans the variant with the score mods on both passes, and a key mask beside it runs as an added bias."""
    p = plan.plan_for(_layout(kernel, causal=causal)._replace(scale=scale))
    assert p.family == plan.HOPPER and p.variant.mods
    assert plan.plan_for(_layout(kernel, causal=causal)).variant.mods is False
    masked = plan.plan_for(_layout(kernel, causal=causal, bias=KEY_MASK)._replace(scale=scale))
    assert masked.mask_form == "bias" and masked.variant.mods and not masked.variant.key_mask


@pytest.fixture
def stubbed_hopper(monkeypatch):
    """stubbed_device's twin with an sm_90 pretended (TMA maps not encoded): each launch recorded with the
    addresses it was given."""
    from cupyflash import array_ops, cuda_path

    launched = []
    monkeypatch.setattr(cuda_path, "require_gpu", lambda device_id=None: errors.GPUInfo(0, "stub", 90))
    monkeypatch.setattr(array_ops.TorchOps, "stream_ptr", lambda self, device_id: 0)
    monkeypatch.setattr(launch, "_device", lambda device_id: contextlib.nullcontext())
    monkeypatch.setattr(launch, "_run", lambda variant, grid, block, packed, *rest: launched.append((variant, {})))
    monkeypatch.setattr(launch, "_run_step", lambda step, ptrs, *rest: launched.append((step.variant, dict(ptrs))))
    monkeypatch.setattr(tma, "_encode_fn", lambda: lambda desc, *args: 0)
    tma.encode.cache_clear()
    return launched


def test_boolean_masks_reach_the_kernels_as_the_plan_says(stubbed_hopper, monkeypatch):
    """cuda_path on CPU tensors with an sm_90 stubbed: a key mask's address goes to key_mask_prep, whose meta rows
    the attention kernels read; a mask over queries is converted and classified as a bias; neither backward runs
    the rebuild rule's stats pass (0 / -inf leave every row's LSE as the scores make it)."""
    launched = stubbed_hopper
    monkeypatch.setenv(launch.LSE_REBUILD_ENV, "1")
    q, k, v = (torch.randn(2, 4, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    keep = torch.rand(2, 40) > 0.3
    out, lse = cuda_attention.forward(q, k, v, keep[:, None, None, :], 0.125, True)
    assert [variant.name for variant, _ in launched] == ["key_mask_prep_bf16", "fwd_sm90_bf16_d64_causal_keys"]
    ptrs = launched[1][1]
    assert ptrs["key_mask"] == keep.data_ptr() and ptrs["key_meta"] == launched[0][1]["key_meta"]
    launched.clear()
    cuda_attention.backward(torch.randn_like(q), q, k, v, keep[:, None, None, :], out, lse, 0.125, True)
    assert [variant.kernel for variant, _ in launched] == ["key_mask_prep", "bwd_preprocess", "bwd_sm90",
                                                           "bwd_convert_dq_sm90"]
    launched.clear()
    per_query = torch.rand(2, 1, 40, 40) > 0.3
    out, lse = cuda_attention.forward(q, k, v, per_query, 0.125, False)
    cuda_attention.backward(torch.randn_like(q), q, k, v, per_query, out, lse, 0.125, False)
    assert [variant.kernel for variant, _ in launched] == ["tile_minmax", "tile_classify", "fwd_sm90",
                                                           "tile_minmax", "tile_classify", "bwd_preprocess",
                                                           "bwd_sm90", "bwd_convert_dq_sm90"]
    assert launched[2][1]["bias"] != per_query.data_ptr()  # the converted 0 / -inf bias


def test_key_mask_op_calls_run_their_plan_without_checking_again(stubbed_hopper, monkeypatch):
    """The ops' calls with a boolean key mask the plan runs as the kernels' key mask take the plain calls' runners:
    the next call of a call key launches the same kernels with its own tensors' and mask's addresses, unchecked. A
    mask the plan takes as an added bias (here over queries) goes the whole way each time."""
    monkeypatch.setattr(torch_op, "_impl", lambda q: cuda_attention)
    monkeypatch.setattr(torch_op, "_PLAIN_FORWARDS", {})
    monkeypatch.setattr(torch_op, "_PLAIN_BACKWARDS", {})
    fwd, bwd = torch.ops.cupyflash.flash_attn_fwd.default, torch.ops.cupyflash.flash_attn_bwd.default

    def calls(mask):
        q, k, v = (torch.randn(2, h, 40, 64, dtype=torch.bfloat16) for h in (4, 2, 2))
        keep = mask()
        out, lse = fwd(q, k, v, keep, 0.125, True)
        dq, dk, dv, _ = bwd(torch.randn_like(out), q, k, v, keep, out, lse, 0.125, True)
        launched = list(stubbed_hopper)
        stubbed_hopper.clear()
        return launched, dict(q=q, k=k, v=v, out=out, lse=lse, dq=dq, dk=dk, dv=dv, key_mask=keep)

    def key_mask():
        return (torch.rand(2, 40) > 0.3)[:, None, None, :]

    first, _ = calls(key_mask)

    def checked_again(*args):
        raise AssertionError("checked again")

    monkeypatch.setattr(torch_op, "_check", checked_again)
    monkeypatch.setattr(torch_op, "_check_backward", checked_again)
    second, tensors = calls(key_mask)
    assert [variant for variant, _ in second] == [variant for variant, _ in first]
    assert [variant.kernel for variant, _ in second] == ["key_mask_prep", "fwd_sm90", "key_mask_prep",
                                                         "bwd_preprocess", "bwd_expand_kv_sm90", "bwd_sm90",
                                                         "bwd_sum_kv_sm90", "bwd_convert_dq_sm90"]
    for _, ptrs in second:
        for name in ("q", "k", "v", "out", "lse", "dq", "dk", "dv", "key_mask"):
            if name in ptrs:
                assert ptrs[name] == tensors[name].data_ptr(), name
    assert second[0][1]["key_meta"] == second[1][1]["key_meta"] != 0
    assert second[2][1]["key_meta"] == second[4][1]["key_meta"] != 0
    with pytest.raises(AssertionError, match="checked again"):
        calls(lambda: torch.rand(2, 1, 40, 40) > 0.3)
