"""Which calls the Hopper kernels (kernels_cu/flash_fwd_sm90.cuh, flash_bwd_sm90.cuh) take, decided on the host with
no GPU: every call they decline runs on the mma.sync kernels, so a wrong "yes" here would be a wrong answer or a
failed launch there."""
from __future__ import annotations

import dataclasses
import re

import pytest

from cupyflash import jit, launch, params, tma
from cupyflash.tiles import BACKWARD_SM90, FORWARD_SM90

B, H, HKV, NQ, NK = 2, 8, 2, 300, 517
ALIGNED = 1 << 20  # a 16-byte aligned address


def _buf(shape, layout="contiguous", ptr=ALIGNED):
    """A (B, H, N, D) Buf: contiguous, or a transposed view of (B, N, H, D) as models produce."""
    b, h, n, d = shape
    strides = (h * n * d, n * d, d, 1) if layout == "contiguous" else (n * h * d, d, h * d, 1)
    return launch.Buf(ptr, strides)


def _why(d=128, dtype="bfloat16", cc=90, mods=launch.ScoreMods(), q=None, k=None, v=None, dout=None, kernel="bwd",
         forward=None):
    """The backward's answer (it reads dout too); the forward's is checked to agree where dout plays no part and
    the backward takes the call (above 128 it takes no bias and no dropout), or to be `forward` where given."""
    q = q or _buf((B, H, NQ, d))
    k = k or _buf((B, HKV, NK, d))
    v = v or _buf((B, HKV, NK, d), "transposed")
    dout = dout or _buf((B, H, NQ, d))
    common = dict(dtype=dtype, shape=(B, H, NQ, d), n_k=NK, kv_heads=HKV, kv={"k": k, "v": v}, mods=mods,
                  compute_capability=cc)
    fwd = launch.sm90_unsupported("fwd", q_like={"q": q}, **common)
    bwd = launch.sm90_unsupported("bwd", q_like={"q": q, "dout": dout}, **common)
    if forward is not None:
        assert fwd == forward, fwd
    elif not (fwd is None and bwd is not None and (bwd.startswith("dout") or d not in BACKWARD_SM90)) and not (
            fwd is None and bwd is not None and bwd.startswith(("score mods", "a bias", "dropout"))):
        # the same reason; a head dim's names each pass's own table
        assert fwd == bwd or (fwd.startswith("head_dim") and fwd.split(":")[0] == bwd.split(":")[0]), (fwd, bwd)
    return bwd


@pytest.mark.parametrize("d", sorted(BACKWARD_SM90))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_takes_plain_16bit_calls_on_sm90(d, dtype):
    assert _why(d=d, dtype=dtype) is None
    assert _why(d=d, q=_buf((B, H, NQ, d), "transposed")) is None


def test_both_passes_take_the_same_head_dims():
    assert sorted(FORWARD_SM90) == sorted(BACKWARD_SM90)
    common = dict(dtype="bfloat16", shape=(B, H, NQ, 256), n_k=NK, kv_heads=HKV, compute_capability=90,
                  q_like={"q": _buf((B, H, NQ, 256))},
                  kv={"k": _buf((B, HKV, NK, 256)), "v": _buf((B, HKV, NK, 256), "transposed")})
    assert launch.sm90_unsupported("fwd", mods=launch.ScoreMods(softcap=30.0), **common) is None
    assert launch.sm90_unsupported("fwd", mods=launch.ScoreMods(dropout_p=0.1), **common).startswith(
        "dropout at head_dim 256")


def test_size_one_dims_may_have_any_stride():
    q = launch.Buf(ALIGNED, (3, NQ * 128, 128, 1))  # B = 1: torch allows any batch stride
    assert launch.sm90_unsupported("bwd", dtype="bfloat16", shape=(1, H, NQ, 128), n_k=NK, kv_heads=HKV,
                                   q_like={"q": q, "dout": _buf((1, H, NQ, 128))},
                                   kv={"k": _buf((1, HKV, NK, 128)), "v": _buf((1, HKV, NK, 128))},
                                   mods=launch.ScoreMods(), compute_capability=90) is None


@pytest.mark.parametrize("case,pattern", [
    (dict(cc=80), "sm_80"),
    (dict(cc=100), "sm_100"),
    (dict(dtype="float32"), "dtype float32"),
    (dict(d=224), "head_dim 224"),
    (dict(d=112), "head_dim 112"),
    (dict(q=launch.Buf(ALIGNED + 8, (H * NQ * 128, NQ * 128, 128, 1))), "q: its data pointer"),
    (dict(k=launch.Buf(ALIGNED, (HKV * NK * 132, NK * 132, 132, 1))), "k: strides"),
    (dict(v=launch.Buf(ALIGNED, (HKV * NK * 128, NK * 128, 1, NK))), "v: its last dimension"),
    (dict(k=launch.Buf(ALIGNED, (NK * 128, 0, 128, 1))), "k: .*stride 0"),
    (dict(dout=launch.Buf(ALIGNED + 2, (H * NQ * 128, NQ * 128, 128, 1))), "dout: its data pointer"),
])
def test_declines_what_it_cannot_run(case, pattern):
    why = _why(**case)
    assert why is not None
    assert re.search(pattern, why), why


def test_environment_switch_declines_everything(monkeypatch):
    monkeypatch.setenv(launch.SM90_ENV, "0")
    assert _why() == f"{launch.SM90_ENV}=0"


def test_unsupported_reason_names_the_problem():
    assert tma.unsupported_reason((2, 3, 10, 128), (3840, 1280, 128, 1), 2, ALIGNED) is None
    assert "multiple of 8" in tma.unsupported_reason((2, 3, 10, 100), (3000, 1000, 100, 1), 2, ALIGNED)


def test_hopper_variants_build_for_sm90a_only():
    hopper = [v for v in jit.all_variants() if v.kernel in ("fwd_sm90", "bwd_sm90")]
    assert {(v.kernel, v.dtype, v.head_dim, v.causal) for v in hopper} == {
        (kernel, dt, d, c) for kernel, table in (("fwd_sm90", FORWARD_SM90), ("bwd_sm90", BACKWARD_SM90))
        for dt in ("float16", "bfloat16") for d in table for c in (False, True)}
    key = hopper[0].module_key
    assert jit.arch_options(key, "sm_90") == jit.arch_options(key, None) == ("-arch=sm_90a",)
    with pytest.raises(ValueError, match="sm_90 only"):
        jit.arch_options(key, "sm_80")
    assert key in jit.module_keys("sm_90") and key not in jit.module_keys("sm_80")
    assert all(v.module_key == key for v in hopper if (v.dtype, v.head_dim) == (hopper[0].dtype, hopper[0].head_dim))
    assert "flash_bwd_sm90_kernel" in jit.source_for(hopper[0]) and "flash_fwd_sm90_kernel" not in jit.source_for()


SCORE_MODS = {
    "bias": launch.ScoreMods(bias=launch.Buf(ALIGNED, (0, 0, 0, 1)), tile_classes=launch.Buf(ALIGNED, (0, 0, 0, 1))),
    "window": launch.ScoreMods(window=(16, 0)),
    "softcap": launch.ScoreMods(softcap=30.0),
    "dropout": launch.ScoreMods(dropout_p=0.1, seed_ptr=ALIGNED),
}

BIAS_WITH_GRAD = dataclasses.replace(SCORE_MODS["bias"], dbias=launch.Buf(ALIGNED, (0, 0, 0, 1)))


@pytest.mark.parametrize("mod", sorted(SCORE_MODS))
@pytest.mark.parametrize("d", sorted(BACKWARD_SM90))
def test_takes_score_mods(mod, d):
    """Every score mod on the Hopper kernels of both passes at every head dim; dropout's forward on mma.sync at a head
    dim whose Hopper variant spilled (tiles.Sm90Tiles.dropout: d32, d160 and up), its backward still on Hopper up to
    128; above 128 the wide backward takes a bias, a window and soft-capping, not dropout (Sm90Tiles.dropout)."""
    spilled = mod == "dropout" and not FORWARD_SM90[d].dropout
    forward = f"dropout at head_dim {d}: its Hopper variant spilled registers (tiles.Sm90Tiles.dropout)" if spilled \
        else None
    backward = None
    if d > 128 and mod == "dropout":
        backward = f"dropout at head_dim {d}: its Hopper kernel has none (tiles.Sm90Tiles.dropout)"
    assert _why(d=d, mods=SCORE_MODS[mod], forward=forward) == backward
    assert spilled == (mod == "dropout" and d in (32, 160, 192, 256))


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("mods", [launch.ScoreMods(), *SCORE_MODS.values(), BIAS_WITH_GRAD],
                         ids=["plain", *SCORE_MODS, "bias+dbias"])
def test_mods_parameters_of_the_hopper_kernels(kernel, mods):
    """The score mods' struct (params.SCORE_MODS) of the Hopper kernel of pass `kernel`: the tile classes' tile size
    is that kernel's (the plan classifies the bias in its tiles), dBias the backward's only; all of it packs."""
    tiles = (FORWARD_SM90 if kernel == "fwd" else BACKWARD_SM90)[128]
    values = params.score_mods(kernel, mods, 0.125, tiles)
    params.SCORE_MODS.pack(values)
    assert (values["cls_tq"], values["cls_tk"]) == ((tiles.Br, tiles.Bc) if mods.tile_classes else (1, 1))
    assert (values["dbias"] != 0) == (kernel == "bwd" and mods.dbias is not None)
    assert (values["seed"] != 0) == (mods.dropout_p > 0)


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mods", [launch.ScoreMods(), *SCORE_MODS.values(), launch.ScoreMods(window=(16, 4))],
                         ids=["plain", *SCORE_MODS, "window-right"])
def test_every_hopper_launch_has_a_compiled_variant(kernel, causal, mods):
    """The variant a call runs is one CI compiles; with score mods a causal mask becomes the window's right edge at
    the diagonal (its left edge kept), on the non-causal variant."""
    variant, run_mods = launch.sm90_variant(kernel, "bfloat16", 128, causal, mods)
    assert variant in jit.all_variants(), variant
    assert (variant.mods, variant.dropout) == (mods.any, mods.dropout_p > 0)
    if causal and mods.any:
        assert not variant.causal and run_mods.window == (mods.window[0], 0)
        assert dataclasses.replace(run_mods, window=mods.window) == mods
    else:
        assert variant.causal == causal and run_mods == mods
