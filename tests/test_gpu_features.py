"""The kernels' score modifications through the torch op, against the fp32 reference with the tolerance rule:
additive (fp16/bf16/fp32, broadcast, strided) and boolean biases with their gradient, bias values <= -1e30
(finfo.min: uniform rows; -inf: rows without keys), grouped-query / multi-query K/V, sliding windows with and
without causal, Philox dropout (the exact mask, its rate, unbiasedness, determinism, seeding, CUDA graphs),
logit soft-capping, and fp32 inputs on TF32 tensor cores (against fp64, beside torch's TF32 math).

Reference: ``reference.semantics_ref`` (cupyflash/cpu_attention.py in fp32 on the GPU, the same seed); the
same-dtype PyTorch math the rule measures against: ``reference.attention_ref`` in fp16/bf16 with the same bias,
window and dropout keep mask (``cpu_attention.dropout_keep``). Inputs are fresh per case (seeded from its
parameters) and the allocator is poisoned before every launch, so an unwritten output element is NaN.
"""
from __future__ import annotations

import math

import pytest
import torch

import cupyflash
import cupyflash.torch_op  # registers torch.ops.cupyflash.*
from cupyflash import launch, plan
from cupyflash.cpu_attention import dropout_keep
from cupyflash.params import keep_probability
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_close_ulps, assert_dropout_runs_agree,
                       assert_within_rule, attention_ref, draw_inputs, nbytes, poison_cuda_allocator, rounding_floor,
                       seed_from, semantics_ref, visible_mask)

pytestmark = pytest.mark.gpu

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
BATCH = 2


def _name(dtype) -> str:
    return {FP16: "fp16", BF16: "bf16", FP32: "fp32", torch.bool: "bool"}[dtype]


BIAS_SHAPES = {  # name: (shape builder, strided): strided draws a permuted tensor and views it back
    "BHQK": (lambda b, h, nq, nk: (b, h, nq, nk), False),
    "1HQK": (lambda b, h, nq, nk: (1, h, nq, nk), False),
    "B11K": (lambda b, h, nq, nk: (b, 1, 1, nk), False),  # key padding
    "11QK": (lambda b, h, nq, nk: (1, 1, nq, nk), False),
    "B1Q1": (lambda b, h, nq, nk: (b, 1, nq, 1), False),  # size-1 key dim (a per-row constant)
    "BHQK-strided": (lambda b, h, nq, nk: (b, h, nq, nk), True),  # keys not the innermost dim
}


def draw_bias(shape_name, q, k, dtype, seed):
    """A random bias (2·N(0, 1), or a boolean mask keeping ~70 %) broadcastable to (B, Hq, Nq, Nk)."""
    builder, strided = BIAS_SHAPES[shape_name]
    shape = builder(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    gen = torch.Generator(device="cuda").manual_seed(seed)
    drawn = (shape[0], shape[1], shape[3], shape[2]) if strided else shape
    if dtype == torch.bool:
        bias = torch.rand(drawn, generator=gen, device="cuda") > 0.3
    else:
        bias = (2.0 * torch.randn(drawn, generator=gen, device="cuda", dtype=FP32)).to(dtype)
    return bias.transpose(-1, -2) if strided else bias


def run_fwd(q, k, v, bias, scale, causal, window, dropout_p, seed, softcap=0.0):
    b, h, n_q, _ = q.shape
    poison_cuda_allocator(nbytes(q.shape, q.dtype), nbytes((b, h, n_q), FP32))  # out, lse
    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda") if dropout_p > 0 else None
    return torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, scale, causal, window[0], window[1], dropout_p, seed_t,
                                              softcap)


def run_bwd(dout, q, k, v, bias, out, lse, scale, causal, window, dropout_p, seed, bias_grad, softcap=0.0):
    b, h, n_q, d = q.shape
    sizes = [nbytes(q.shape, q.dtype), nbytes(k.shape, k.dtype), nbytes(v.shape, v.dtype)]  # dq, dk, dv
    if bias_grad:
        sizes.append(nbytes(bias.shape, FP32))  # dbias accumulator
    sizes += [nbytes((b, h, plan.dq_accum_rows(n_q), d), FP32), nbytes((b, h, n_q), FP32)]  # dq_accum, D
    if bias is not None and launch.lse_rebuild_enabled():
        sizes.append(nbytes((b, h, n_q, 2), FP32))  # row_lse: the rebuild rule's (hi, lo) pairs
    poison_cuda_allocator(*sizes)
    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda") if dropout_p > 0 else None
    return torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, bias, out, lse, scale, causal, window[0], window[1],
                                              dropout_p, seed_t, bias_grad, softcap)


def check_features(q, k, v, dout, bias=None, *, causal=False, window=(-1, -1), dropout_p=0.0, seed=0,
                   bias_grad=False, scale=None, softcap=0.0):
    """fwd and bwd through the op; the rule on out, lse, dq, dk, dv (and dbias). Returns (out, lse, grads, ref)."""
    dtype, (b, h, n_q, d), n_k = q.dtype, q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = run_fwd(q, k, v, bias, scale, causal, window, dropout_p, seed, softcap)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == FP32 and lse.shape == q.shape[:-1]
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=causal, bias=bias, window=window, dropout_p=dropout_p,
                        seed=seed, bias_grad=bias_grad, softcap=softcap)
    keep = dropout_keep(seed, dropout_p, b, h, range(n_q), range(n_k)) if dropout_p > 0 else None
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype, bias=bias, window=window,
                       dropout_keep=keep, dropout_p=dropout_p, bias_grad=bias_grad, softcap=softcap)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, rounding_floor(ref.lse, FP32), "lse")

    dq, dk, dv, dbias = run_bwd(dout, q, k, v, bias, out, lse, scale, causal, window, dropout_p, seed, bias_grad,
                                softcap)
    for name, ours, inp, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), (q, k, v), (ref.dq, ref.dk, ref.dv),
                                     (pt.dq, pt.dk, pt.dv)):
        assert ours.dtype == dtype and ours.shape == inp.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
        assert_within_rule(ours, r, p, GRAD_FACTOR, rounding_floor(r, dtype), name)
    if bias_grad:
        assert dbias.dtype == bias.dtype and dbias.shape == bias.shape, f"dbias: {dbias.dtype} {tuple(dbias.shape)}"
        assert_within_rule(dbias, ref.dbias, pt.dbias, GRAD_FACTOR, rounding_floor(ref.dbias, dtype), "dbias")
    else:
        assert dbias.numel() == 0
    return out, lse, (dq, dk, dv, dbias), ref


def _dropout_seed(*params) -> int:
    """A seed with both 32-bit words nonzero (they are the two words of the Philox key)."""
    return (seed_from("hi", *params) << 30) ^ seed_from("lo", *params)


# ---- additive bias --------------------------------------------------------------------------------------------

LENGTHS = ((17, 17), (97, 97), (113, 203), (203, 113))


def _bias_cases():
    """Every (q dtype, bias dtype, bias shape); the other axes (causal, lengths, head dim, layout) cycle."""
    cases = []
    for i, (dtype, bias_kind, shape) in enumerate(
            (dt, bk, sh) for dt in (FP16, BF16) for bk in ("same", "fp32", "other") for sh in BIAS_SHAPES):
        bias_dtype = {"same": dtype, "fp32": FP32, "other": BF16 if dtype == FP16 else FP16}[bias_kind]
        causal, (n_q, n_k) = bool(i % 2), LENGTHS[(i // 2) % 4]
        head_dim, layout = (64, 128)[(i // 3) % 2], ("contiguous", "transposed")[(i // 5) % 2]
        cases.append(pytest.param(dtype, bias_dtype, shape, causal, n_q, n_k, head_dim, layout,
                                  id=f"{_name(dtype)}-bias{_name(bias_dtype)}-{shape}-{'causal' if causal else 'full'}"
                                     f"-{n_q}x{n_k}-d{head_dim}-{layout}"))
    return cases


@pytest.mark.parametrize("dtype,bias_dtype,shape,causal,n_q,n_k,head_dim,layout", _bias_cases())
def test_bias(dtype, bias_dtype, shape, causal, n_q, n_k, head_dim, layout):
    """Additive bias read directly (q's dtype, fp32) or converted (the other half type), broadcast by stride 0
    along size-1 dims or strided; dbias summed over the broadcast dims.

    A bias with a size-1 key dim adds a constant per row: out does not change, lse does (which checks the read),
    and its gradient Σ_j dS_ij = 0 exactly, so dbias there is rounding noise (in the kernels, D from the rounded
    O) with nothing to compare against: that shape runs the backward without the bias gradient."""
    seed = seed_from("bias", dtype, bias_dtype, shape, causal, n_q, n_k, head_dim, layout)
    q, k, v, dout = draw_inputs(BATCH, 3, 3, n_q, n_k, head_dim, dtype, layout, seed)
    bias = draw_bias(shape, q, k, bias_dtype, seed + 1)
    check_features(q, k, v, dout, bias, causal=causal, bias_grad=bias.shape[-1] != 1)


def test_expanded_bias_is_read_in_place():
    """A bias expanded (stride 0 along a dim of full size) is read through its strides, as a broadcast one."""
    q, k, v, dout = draw_inputs(BATCH, 4, 4, 113, 203, 64, FP16, "contiguous", seed_from("expanded"))
    base = draw_bias("B11K", q, k, FP16, seed_from("expanded bias"))
    bias = base.expand(BATCH, 4, 113, 203)
    check_features(q, k, v, dout, bias, causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,bias_dtype", [(FP16, FP32), (BF16, BF16), (BF16, FP32)])
def test_finfo_min_and_neg_inf(dtype, bias_dtype, causal):
    """Bias values <= -1e30: a row masked only by finfo.min attends uniformly (as eager softmax) with eager's
    gradients; -inf keys get weight 0; rows of -inf only give out 0, lse +inf, dq 0 and dbias 0."""
    n_q, n_k, h_q, h_kv = 97, 203, 4, 2
    seed = seed_from("finfo.min", dtype, bias_dtype, causal)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, n_q, n_k, 64, dtype, "contiguous", seed)
    bias = draw_bias("1HQK", q, k, bias_dtype, seed + 1)
    lowest, neg_inf = torch.finfo(bias_dtype).min, float("-inf")
    uniform_row, inf_row = 3, 10
    bias[:, 1, :, 150:170] = lowest  # keys masked for one head
    bias[:, 2, :, 64:66] = neg_inf
    bias[:, :, 20, ::2] = lowest  # every other key masked
    bias[:, :, 30, :100] = neg_inf  # -inf beside finfo.min: the finfo.min keys share the row uniformly
    bias[:, :, 30, 100:] = lowest
    bias[:, :, uniform_row] = lowest
    bias[:, :, inf_row] = neg_inf
    out, lse, (dq, dk, dv, dbias), ref = check_features(q, k, v, dout, bias, causal=causal, bias_grad=True)

    assert (out[:, :, inf_row] == 0).all() and (lse[:, :, inf_row] == float("inf")).all()
    assert (dq[:, :, inf_row] == 0).all() and (dbias[:, :, inf_row] == 0).all()
    assert torch.isfinite(lse[:, :, uniform_row]).all()
    seen = visible_mask(n_q, n_k, causal, (-1, -1), "cuda")[uniform_row]  # (Nk,)
    uniform = v.float().repeat_interleave(h_q // h_kv, dim=1)[:, :, seen].mean(dim=-2)  # (B, Hq, D)
    err = (out[:, :, uniform_row].float() - uniform).abs().max().item()
    assert err <= 2 * rounding_floor(uniform, dtype), f"finfo.min row: max|out - mean(v)| = {err:.3e}"


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scale", [0.0, -0.3])
@pytest.mark.parametrize("mods", ["causal", "key padding", "soft-cap", "bias"])
def test_scale_zero_or_negative(mods, scale, head_dim):
    """A scale of 0 (every logit the bias alone) or below 0 is a finite float the op takes: masked keys (causal, key
    padding, the tail past Nk) stay masked. The plain Hopper forward takes each row's max on unscaled scores, right
    for a scale > 0 only, so these calls take the variant with the score mods (launch.ScoreMods.scale_not_positive)."""
    n_q, n_k = 113, 203
    seed = seed_from("scale", mods, scale, head_dim)
    q, k, v, dout = draw_inputs(BATCH, 4, 2, n_q, n_k, head_dim, BF16, "contiguous", seed)
    bias = None
    if mods == "key padding":
        lengths = torch.tensor([n_k, 150], device="cuda")  # (BATCH,)
        bias = (torch.arange(n_k, device="cuda") < lengths[:, None])[:, None, None, :]
    elif mods == "bias":
        bias = draw_bias("BHQK", q, k, BF16, seed + 1)
    out, lse, _, _ = check_features(q, k, v, dout, bias, causal=mods in ("causal", "soft-cap"), scale=scale,
                                    softcap=30.0 if mods == "soft-cap" else 0.0, bias_grad=mods == "bias")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rise", [-60.0, 25.0, 60.0])
def test_row_max_moving_across_key_blocks(rise, causal, dtype, head_dim):
    """Logits that climb (or fall) along the keys by `rise` over Nk. Where the Hopper forward rescales lazily (d128
    causal, d256: flash_fwd_sm90.cuh kLazyRescale) a row's max, O and l move only once a block would give a P above
    2^8 (kRescaleSlack): a rise of 25 (36 in log2 units) passes it every other 128-key block, 60 at every block, a
    fall never after the first; under the causal mask early rows stop before the rise. Unscaled logits (scale 1):
    q·k = rise · key / Nk plus noise."""
    n_q, n_k = 1023, 1024
    seed = seed_from("row max", rise, causal, dtype, head_dim)
    q, k, v, dout = draw_inputs(BATCH, 4, 2, n_q, n_k, head_dim, dtype, "contiguous", seed, qk_scale=0.3)
    q[..., 0] = 1.0
    k[..., 0] = torch.linspace(0.0, rise, n_k, device="cuda", dtype=dtype)
    out, lse, _, _ = check_features(q, k, v, dout, causal=causal, scale=1.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("how", ["-inf bias", "bool mask", "window"])
def test_rows_without_keys(how):
    """Rows that see no key (all -inf, all False, or left of a window when Nq > Nk): out 0, lse +inf, dq 0,
    and no NaN anywhere."""
    n_q, n_k, h = 203, 113, 4
    q, k, v, dout = draw_inputs(BATCH, h, h, n_q, n_k, 64, BF16, "contiguous", seed_from("no keys", how))
    bias, window, empty = None, (-1, -1), torch.zeros(n_q, dtype=torch.bool, device="cuda")
    if how == "window":
        window = (16, 8)
        empty[: n_q - n_k - 8] = True  # i + (Nk - Nq) + 8 < 0
    else:
        empty[[0, 5, 64, 65, 130, 202]] = True
        bias = draw_bias("BHQK", q, k, BF16 if how == "-inf bias" else torch.bool, seed_from("no keys bias", how))
        bias[:, :, empty] = float("-inf") if how == "-inf bias" else False
        if how == "bool mask":
            bias[:, :, ~empty, 0] = True  # every other row keeps a key
    bias_grad = how == "-inf bias"
    out, lse, (dq, dk, dv, dbias), _ = check_features(q, k, v, dout, bias, window=window, bias_grad=bias_grad)
    assert (out[:, :, empty] == 0).all() and (lse[:, :, empty] == float("inf")).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    assert (dq[:, :, empty] == 0).all()
    if bias_grad:
        assert (dbias[:, :, empty] == 0).all()
    assert all(torch.isfinite(g).all() for g in (out, dq, dk, dv))


# ---- grouped-query attention ----------------------------------------------------------------------------------

def _gqa_cases():
    cases = []
    for i, ((h_q, h_kv), dtype, causal) in enumerate(
            (hh, dt, c) for hh in ((4, 2), (8, 2), (4, 1)) for dt in (FP16, BF16) for c in (False, True)):
        (n_q, n_k), head_dim = LENGTHS[i % 4], (64, 128)[(i // 2) % 2]
        layout = ("contiguous", "transposed")[(i // 3) % 2]
        with_bias = i % 3 == 2  # bias + causal + GQA in some
        cases.append(pytest.param(h_q, h_kv, dtype, causal, n_q, n_k, head_dim, layout, with_bias,
                                  id=f"hq{h_q}-hkv{h_kv}-{_name(dtype)}-{'causal' if causal else 'full'}-{n_q}x{n_k}"
                                     f"-d{head_dim}-{layout}{'-bias' if with_bias else ''}"))
    return cases


@pytest.mark.parametrize("h_q,h_kv,dtype,causal,n_q,n_k,head_dim,layout,with_bias", _gqa_cases())
def test_grouped_query(h_q, h_kv, dtype, causal, n_q, n_k, head_dim, layout, with_bias):
    """k, v with Hkv heads (group 2, 4; Hkv = 1: multi-query) read without a copy; dK/dV summed over the group
    and shaped (B, Hkv, Nk, D)."""
    seed = seed_from("gqa", h_q, h_kv, dtype, causal, n_q, n_k, head_dim, layout, with_bias)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, n_q, n_k, head_dim, dtype, layout, seed)
    bias = draw_bias("BHQK", q, k, dtype, seed + 1) if with_bias else None
    check_features(q, k, v, dout, bias, causal=causal, bias_grad=with_bias)


# ---- sliding window -------------------------------------------------------------------------------------------

WINDOW_CASES = [  # (window, causal, (Nq, Nk), dtype, head_dim, Hkv, bias shape or None)
    ((16, 8), False, (203, 113), FP16, 64, 3, None),
    ((16, 8), True, (113, 203), BF16, 128, 3, None),  # causal clips right to 0
    ((0, 0), False, (97, 97), FP16, 128, 1, None),  # the diagonal only
    ((0, 0), True, (203, 113), BF16, 64, 3, "BHQK"),
    ((32, -1), False, (113, 203), BF16, 64, 3, None),
    ((32, -1), True, (203, 113), FP16, 128, 1, "B11K"),  # window + bias + GQA
    ((-1, 5), False, (203, 113), FP16, 64, 3, None),  # rows without keys at the top
    ((-1, 5), True, (17, 17), BF16, 64, 3, None),
    ((7, 7), False, (17, 17), BF16, 128, 3, "11QK"),
    ((100, 0), False, (1023, 1024), BF16, 64, 1, None),  # whole K/V blocks skipped on both sides
    ((64, 64), False, (1023, 1024), FP16, 128, 1, "11QK"),
    ((200, 30), True, (1023, 1024), BF16, 128, 3, "1HQK"),
]


@pytest.mark.parametrize("window,causal,lengths,dtype,head_dim,h_kv,bias_shape", WINDOW_CASES,
                         ids=[f"w{w[0]}_{w[1]}-{'causal' if c else 'full'}-{nq}x{nk}-{_name(dt)}-d{d}-hkv{hkv}"
                              f"{'-' + bs if bs else ''}" for w, c, (nq, nk), dt, d, hkv, bs in WINDOW_CASES])
def test_window(window, causal, lengths, dtype, head_dim, h_kv, bias_shape):
    """Keys i + diag - left <= j <= i + diag + right (bottom-right aligned), combined with causal, a bias and
    grouped-query K/V; partial tiles at the window edges, skipped blocks and rows without keys."""
    n_q, n_k = lengths
    seed = seed_from("window", window, causal, lengths, dtype, head_dim, h_kv, bias_shape)
    q, k, v, dout = draw_inputs(1 if n_q > 1000 else BATCH, 3, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed)
    bias = draw_bias(bias_shape, q, k, dtype, seed + 1) if bias_shape else None
    check_features(q, k, v, dout, bias, causal=causal, window=window, bias_grad=bias is not None)


# ---- dropout --------------------------------------------------------------------------------------------------

DROPOUT_CASES = [  # (p, dtype, causal, (Nq, Nk), head_dim, Hq, Hkv, bias (shape, dtype) or None, window, layout)
    (0.1, FP16, False, (17, 17), 64, 3, 3, None, (-1, -1), "contiguous"),
    (0.3, BF16, True, (97, 97), 128, 3, 3, None, (-1, -1), "contiguous"),
    (0.2, FP16, True, (203, 113), 64, 4, 2, None, (-1, -1), "transposed"),
    (0.3, BF16, False, (113, 203), 64, 4, 1, ("B11K", torch.bool), (-1, -1), "contiguous"),  # mask + dropout
    (0.1, FP16, True, (113, 203), 128, 4, 2, ("BHQK", torch.bool), (-1, -1), "contiguous"),
    (0.25, FP16, False, (97, 97), 128, 3, 3, ("1HQK", FP32), (-1, -1), "transposed"),  # bias + its grad
    (0.5, BF16, True, (203, 113), 64, 4, 2, ("BHQK", BF16), (16, 8), "contiguous"),
    (0.15, BF16, False, (203, 113), 128, 3, 3, None, (32, 4), "transposed"),
]


@pytest.mark.parametrize("p,dtype,causal,lengths,head_dim,h_q,h_kv,bias,window,layout", DROPOUT_CASES,
                         ids=[f"p{c[0]}-{_name(c[1])}-{'causal' if c[2] else 'full'}-{c[3][0]}x{c[3][1]}-d{c[4]}"
                              f"-hq{c[5]}-hkv{c[6]}{'-' + c[7][0] + _name(c[7][1]) if c[7] else ''}"
                              f"-w{c[8][0]}_{c[8][1]}-{c[9]}" for c in DROPOUT_CASES])
def test_dropout_matches_reference(p, dtype, causal, lengths, head_dim, h_q, h_kv, bias, window, layout):
    """out, dq, dk, dv (and dbias) equal the reference computed with the kernels' own keep mask for the seed."""
    n_q, n_k = lengths
    seed = seed_from("dropout", p, dtype, causal, lengths, head_dim, h_q, h_kv, bias, window, layout)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, n_q, n_k, head_dim, dtype, layout, seed)
    attn_bias = draw_bias(bias[0], q, k, bias[1], seed + 1) if bias else None
    check_features(q, k, v, dout, attn_bias, causal=causal, window=window, dropout_p=p,
                   seed=_dropout_seed(seed), bias_grad=bias is not None and bias[1] != torch.bool)


def test_dropout_larger():
    """One larger dropout problem: many Q and K/V blocks, so the Philox counters cover block offsets."""
    q, k, v, dout = draw_inputs(1, 2, 2, 513, 1021, 64, BF16, "contiguous", seed_from("dropout larger"))
    check_features(q, k, v, dout, causal=True, dropout_p=0.2, seed=_dropout_seed("larger"))


@pytest.mark.parametrize("p", [0.1, 0.4])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_dropout_mask_is_exact(dtype, head_dim, p):
    """V = identity (Nk = D) makes out[i, j] = P[i, j] · keep[i, j] / keep_probability(p), so (out != 0) is the
    kernel's keep mask: it equals dropout_keep exactly (query heads index the mask under grouped-query attention)
    and its keep rate lies within binomial bounds of its keep probability (1 - p to a multiple of 1/256)."""
    n_q, n_k, h_q, h_kv = 203, head_dim, 4, 2
    seed = seed_from("mask", dtype, head_dim, p)
    q, k, _, _ = draw_inputs(BATCH, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed, qk_scale=0.5)
    v = torch.eye(n_k, dtype=dtype, device="cuda").expand(BATCH, h_kv, n_k, n_k).contiguous()  # (B, Hkv, Nk, D)
    scale, dseed = 1.0 / math.sqrt(head_dim), _dropout_seed("mask", dtype, head_dim, p)
    out, lse = run_fwd(q, k, v, None, scale, False, (-1, -1), p, dseed)
    keep = dropout_keep(dseed, p, BATCH, h_q, range(n_q), range(n_k)).cuda()
    kept = out != 0
    assert not torch.isnan(out).any()
    mismatch = kept != keep
    assert not mismatch.any(), (f"{int(mismatch.sum())} of {keep.numel()} elements kept/dropped unlike dropout_keep;"
                                f" first at {tuple(mismatch.nonzero()[0].tolist())}")
    n, n_kept = kept.numel(), int(kept.sum())
    keep_p = keep_probability(p)
    assert abs(n_kept - n * keep_p) <= 5 * math.sqrt(n * keep_p * (1 - keep_p)), f"kernel kept {n_kept} of {n} at p={p}"
    ref = semantics_ref(q, k, v, scale=scale, causal=False, dropout_p=p, seed=dseed)
    pt = attention_ref(q, k, v, scale=scale, causal=False, compute_dtype=dtype, dropout_keep=keep, dropout_p=p)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_dropout_mask_in_backward(dtype, head_dim):
    """dO = identity (Nq = D) makes dV[j, i] = P[i, j] · keep[i, j] / keep_probability(p): the backward regenerates the
    forward's mask exactly, across several K/V blocks."""
    n_q, n_k, h, p = head_dim, 203, 3, 0.3
    seed = seed_from("bwd mask", dtype, head_dim)
    q, k, v, _ = draw_inputs(BATCH, h, h, n_q, n_k, head_dim, dtype, "contiguous", seed, qk_scale=0.5)
    dout = torch.eye(n_q, dtype=dtype, device="cuda").expand(BATCH, h, n_q, n_q).contiguous()  # (B, H, Nq, D)
    scale, dseed = 1.0 / math.sqrt(head_dim), _dropout_seed("bwd mask", dtype, head_dim)
    out, lse = run_fwd(q, k, v, None, scale, False, (-1, -1), p, dseed)
    dq, dk, dv, _ = run_bwd(dout, q, k, v, None, out, lse, scale, False, (-1, -1), p, dseed, False)
    keep = dropout_keep(dseed, p, BATCH, h, range(n_q), range(n_k)).cuda()  # (B, H, Nq, Nk)
    assert not torch.isnan(dv).any()
    mismatch = (dv != 0) != keep.transpose(-1, -2)
    assert not mismatch.any(), f"{int(mismatch.sum())} of {keep.numel()} dV elements disagree with the mask"
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=False, dropout_p=p, seed=dseed)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=False, compute_dtype=dtype, dropout_keep=keep, dropout_p=p)
    for name, ours, r, pp in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(ours, r, pp, GRAD_FACTOR, rounding_floor(r, dtype), name)


def test_dropout_is_unbiased():
    """The mean of the dropout output over many seeds approaches the output without dropout, within 6 standard
    deviations of the mean (Var out_i = (1 - κ) / κ · Σ_j P_ij² v_j² per seed, κ the keep probability) plus the
    rule's allowance."""
    n_seeds, p, n, head_dim, dtype = 512, 0.3, 64, 64, FP16
    q, k, v, _ = draw_inputs(1, 2, 2, n, n, head_dim, dtype, "contiguous", seed_from("unbiased"))
    scale = 1.0 / math.sqrt(head_dim)
    total = torch.zeros(q.shape, dtype=torch.float64, device="cuda")
    for i in range(n_seeds):
        out, _ = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, False, -1, -1, p,
                                                    torch.tensor(_dropout_seed("unbiased", i), dtype=torch.int64,
                                                                 device="cuda"))
        assert not torch.isnan(out).any()
        total += out.double()
    mean = total / n_seeds
    ref = semantics_ref(q, k, v, scale=scale, causal=False)
    pt = attention_ref(q, k, v, scale=scale, causal=False, compute_dtype=dtype)
    probs = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)  # (B, H, N, N)
    keep_p = keep_probability(p)
    sd_mean = ((1 - keep_p) / keep_p * (probs ** 2 @ v.double() ** 2) / n_seeds).sqrt()  # (B, H, N, D)
    allowance = OUT_FACTOR * (pt.out.double() - ref.out.double()).abs().max().item() + rounding_floor(ref.out, dtype)
    excess = ((mean - ref.out.double()).abs() - allowance) / sd_mean
    assert excess.max().item() <= 6.0, (f"mean over {n_seeds} seeds is {excess.max().item():.1f} sd off the no-dropout "
                                        f"out")
    single = (out.double() - ref.out.double()).abs().max().item()
    assert single > 10 * allowance, "a single dropout run should differ clearly from the no-dropout output"


def test_dropout_determinism():
    """Same seed: identical out and lse bits, identical dK/dV (written once per block), dQ and dBias equal up to
    the order of their fp32 atomics; another seed changes nearly every output element."""
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, 64, BF16, "contiguous", seed_from("determinism"))
    bias = draw_bias("1HQK", q, k, BF16, seed_from("determinism bias"))
    scale, window, p = 0.125, (-1, -1), 0.2
    seed_a, seed_b = _dropout_seed("determinism", 0), _dropout_seed("determinism", 1)
    runs = []
    for seed in (seed_a, seed_a, seed_b):
        out, lse = run_fwd(q, k, v, bias, scale, True, window, p, seed)
        grads = run_bwd(dout, q, k, v, bias, out, lse, scale, True, window, p, seed, True)
        runs.append((out, lse, *grads))
    assert_dropout_runs_agree(runs)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_flash_attention_dropout_autograd(layout):
    """cupyflash.flash_attention draws the seed from torch's CUDA generator: torch.manual_seed reproduces out and
    every gradient (dbias included), the next draw differs, and the result is the reference for that seed."""
    dtype, scale, p, window = FP16, 0.1, 0.25, (40, 3)
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, 64, dtype, layout, seed_from("autograd", layout))
    bias = draw_bias("B11K", q, k, FP32, seed_from("autograd bias", layout))

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
        out = cupyflash.flash_attention(*leaves, scale=scale, window=window, dropout_p=p)
        out.backward(dout)
        return out.detach(), *(t.grad for t in leaves)

    torch.manual_seed(seed_from("manual seed", layout))
    first = run()
    torch.manual_seed(seed_from("manual seed", layout))
    again = run()
    other = run()
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), first[1:], again[1:]):
        # dq and dbias are sums of fp32 atomics, in a different order each run; dbias (B, 1, 1, Nk) sums over
        # heads and all query rows, so its rounding differences reach a few more ulps of its largest entry
        assert_close_ulps(a, b, f"{name}, same torch seed", ulps=8 if name == "dbias" else 2)
    torch.manual_seed(seed_from("manual seed", layout))
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cuda"))
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=False, bias=bias, window=window, dropout_p=p, seed=seed,
                        bias_grad=True)
    keep = dropout_keep(seed, p, BATCH, 4, range(113), range(203))
    pt = attention_ref(q, k, v, dout, scale=scale, causal=False, compute_dtype=dtype, bias=bias, window=window,
                       dropout_keep=keep, dropout_p=p, bias_grad=True)
    assert_within_rule(first[0], ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    for name, ours, r, pp in zip(("dq", "dk", "dv", "dbias"), first[1:], (ref.dq, ref.dk, ref.dv, ref.dbias),
                                 (pt.dq, pt.dk, pt.dv, pt.dbias)):
        assert_within_rule(ours, r, pp, GRAD_FACTOR, rounding_floor(r, dtype), name)


# ---- everything at once, smaller head dims --------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize("head_dim", [32, 96])
def test_all_features_other_head_dims(head_dim, dtype, causal):
    """Head dims 32 and 96 (their own tile rows): bias with its grad + grouped-query + window + dropout."""
    seed = seed_from("cross", head_dim, dtype, causal)
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, head_dim, dtype, "transposed", seed)
    bias = draw_bias("1HQK", q, k, FP32, seed + 1)
    check_features(q, k, v, dout, bias, causal=causal, window=(48, 24), dropout_p=0.15, seed=_dropout_seed(seed),
                   bias_grad=True)


# ---- the Hopper kernels with score mods ------------------------------------------------------------------------

def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def padding_mask(q, k, seed):
    """A transformers-style key padding mask (B, 1, 1, Nk), True = keep, each batch row its own valid length (at
    least 1): whole key tiles past it are skipped, and the tile holding the edge is read."""
    gen = torch.Generator().manual_seed(seed)
    n_k = k.shape[2]
    lengths = torch.randint(1, n_k + 1, (q.shape[0],), generator=gen)
    lengths[0] = min(n_k, 64)  # a 64-key tile kept whole beside skipped ones inside one 128-key Hopper tile
    return (torch.arange(n_k) < lengths[:, None]).to("cuda")[:, None, None, :]


HOPPER_CASES = [  # (dtype, head_dim, causal, (Nq, Nk), Hq, Hkv, bias (shape, dtype), window, softcap, dropout_p)
    (BF16, 128, False, (113, 203), 4, 2, ("padding", torch.bool), (-1, -1), 0.0, 0.0),
    (FP16, 64, True, (97, 97), 4, 1, ("padding", torch.bool), (-1, -1), 0.0, 0.0),
    (FP16, 128, False, (17, 17), 4, 4, ("BHQK", FP32), (-1, -1), 0.0, 0.0),
    (BF16, 64, False, (1, 1), 4, 2, ("1HQK", BF16), (-1, -1), 0.0, 0.0),
    (BF16, 64, False, (113, 203), 4, 2, None, (32, 8), 0.0, 0.0),
    (FP16, 128, True, (1023, 1024), 2, 1, None, (256, 0), 0.0, 0.0),  # sliding window: blocks skipped both sides
    (BF16, 128, True, (97, 97), 4, 2, None, (-1, -1), 5.0, 0.0),
    (FP16, 64, False, (113, 203), 4, 2, None, (-1, -1), 0.0, 0.2),
    (BF16, 128, True, (113, 203), 4, 2, ("1HQK", BF16), (48, 0), 5.0, 0.0),  # bias + window + soft-cap
    (FP16, 64, False, (203, 113), 4, 2, ("B11K", FP16), (40, 16), 5.0, 0.15),  # ... + dropout
    (BF16, 128, False, (17, 17), 4, 1, ("padding", torch.bool), (-1, -1), 5.0, 0.1),
    (FP16, 96, True, (113, 203), 4, 2, ("11QK", FP32), (48, 24), 5.0, 0.0),
]


@pytest.mark.skipif(not _is_hopper(), reason="the Hopper kernels run on sm_90 only")
@pytest.mark.parametrize("dtype,head_dim,causal,lengths,h_q,h_kv,bias,window,softcap,p", HOPPER_CASES,
                         ids=[f"{_name(c[0])}-d{c[1]}-{'causal' if c[2] else 'full'}-{c[3][0]}x{c[3][1]}-{c[4]}/{c[5]}"
                              f"-{c[6][0] if c[6] else 'nobias'}-w{c[7][0]}_{c[7][1]}-cap{c[8]}-p{c[9]}"
                              for c in HOPPER_CASES])
def test_hopper_kernels_take_score_mods(dtype, head_dim, causal, lengths, h_q, h_kv, bias, window, softcap, p,
                                         caplog, monkeypatch):
    """Bias (key padding as transformers passes it, broadcast, fp32 or 16-bit, with its gradient), windows, soft-cap
    and dropout, alone and combined, run on the Hopper kernels (no fallback in the launch log), within the rule; the
    mma.sync forward (CUPYFLASH_SM90=0) gives the same LSE (rows without keys: +inf from both) and an output within
    the rule, and the mma.sync backward from the Hopper forward's LSE gradients within it."""
    seed = seed_from("hopper mods", dtype, head_dim, causal, lengths, bias, window, softcap, p)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, *lengths, head_dim, dtype, "contiguous", seed,
                                qk_scale=2.0 if softcap else 1.0)
    attn_bias = None
    if bias is not None:
        attn_bias = padding_mask(q, k, seed) if bias[0] == "padding" else draw_bias(bias[0], q, k, bias[1], seed + 1)
    drop_seed = _dropout_seed(seed)

    def launched(fn):
        caplog.clear()
        with caplog.at_level("DEBUG", logger="cupyflash.launch"):
            result = fn()
        return result, [r.getMessage() for r in caplog.records if "on mma.sync" in r.getMessage()]

    (out, lse, _, ref), why = launched(lambda: check_features(
        q, k, v, dout, attn_bias, causal=causal, window=window, dropout_p=p, seed=drop_seed, softcap=softcap,
        bias_grad=attn_bias is not None and attn_bias.dtype != torch.bool))
    assert why == [], why

    monkeypatch.setenv(launch.SM90_ENV, "0")
    scale = 1.0 / math.sqrt(head_dim)
    (out_mma, lse_mma), why = launched(lambda: run_fwd(q, k, v, attn_bias, scale, causal, window, p, drop_seed,
                                                       softcap))
    assert why == [f"forward on mma.sync: {launch.SM90_ENV}=0"], why
    finite = torch.isfinite(lse_mma)  # rows without keys: +inf from both
    assert torch.equal(finite, torch.isfinite(lse)) and torch.equal(lse[~finite], lse_mma[~finite])
    assert (lse - lse_mma)[finite].abs().max().item() <= 1e-3 * (1 + lse_mma[finite].abs().max().item())
    # the reference's keep mask is dropout_keep's numbering, which check_features held the Hopper forward to
    keep = dropout_keep(drop_seed, p, BATCH, h_q, range(lengths[0]), range(lengths[1])) if p > 0 else None
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype, bias=attn_bias, window=window,
                       dropout_keep=keep, dropout_p=p, softcap=softcap)
    assert_within_rule(out_mma, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out (mma.sync)")
    # The passes choose their kernels independently: the mma.sync backward takes the Hopper forward's out and LSE
    (dq, dk, dv, _), why = launched(lambda: run_bwd(dout, q, k, v, attn_bias, out, lse, scale, causal, window, p,
                                                    drop_seed, False, softcap))
    assert why == [f"backward on mma.sync: {launch.SM90_ENV}=0"], why
    for name, ours, r, peer in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(ours, r, peer, GRAD_FACTOR, rounding_floor(r, dtype), f"{name} (mma.sync)")


# ---- dropout under CUDA graphs --------------------------------------------------------------------------------

def test_dropout_seed_advances_under_cuda_graph():
    """The kernels read the seed from device memory, where torch's CUDA generator writes it, so each replay of a
    captured fwd + bwd draws a new mask: replays differ, and each equals the eager op run with that replay's seed."""
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, 64, BF16, "contiguous", seed_from("graph dropout"))
    scale, p, window = 0.125, 0.2, (-1, -1)

    def step():
        seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cuda")  # as flash_attention draws it
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, True, -1, -1, p, seed)
        grads = torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, scale, True, -1, -1, p, seed)
        return seed, out, *grads[:3]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seed, out, dq, dk, dv = (t.clone() for t in static)
        outs.append(out)
        eager_out, eager_lse = run_fwd(q, k, v, None, scale, True, window, p, int(seed))
        eager_grads = run_bwd(dout, q, k, v, None, eager_out, eager_lse, scale, True, window, p, int(seed), False)
        assert torch.equal(out, eager_out), "a replay must equal the eager op with the seed it drew"
        for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), eager_grads[:3]):
            assert_close_ulps(got, want, f"replayed {name} vs eager with the replay's seed")
    changed = (outs[0] != outs[1]).float().mean().item()
    assert changed > 0.9, f"the second replay changed only {changed:.1%} of the outputs: its seed did not advance"


def test_flash_attention_dropout_differs_per_graph_replay():
    """The public function under capture: two replays drop different elements."""
    q, k, v, _ = draw_inputs(BATCH, 4, 4, 97, 97, 64, FP16, "contiguous", seed_from("graph dropout api"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cupyflash.flash_attention(q, k, v, dropout_p=0.3)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cupyflash.flash_attention(q, k, v, dropout_p=0.3)
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert (first != static_out).float().mean().item() > 0.9


# ---- logit soft-capping ---------------------------------------------------------------------------------------

SOFTCAP_CASES = [  # (dtype, head_dim, causal, (Nq, Nk), h_q, h_kv, bias shape / dtype, window, dropout_p, layout)
    (FP16, 64, False, (17, 17), 4, 4, None, (-1, -1), 0.0, "contiguous"),
    (BF16, 128, True, (113, 203), 4, 2, None, (-1, -1), 0.0, "transposed"),
    (FP16, 128, False, (203, 113), 4, 1, ("1HQK", FP32), (-1, -1), 0.0, "contiguous"),
    (BF16, 64, True, (97, 97), 4, 2, ("B11K", torch.bool), (30, -1), 0.15, "transposed"),
    (BF16, 32, False, (1023, 1024), 2, 2, ("BHQK", BF16), (-1, -1), 0.0, "contiguous"),
    (FP16, 96, True, (113, 203), 4, 2, ("11QK", FP16), (48, 24), 0.1, "contiguous"),
]


@pytest.mark.parametrize("dtype,head_dim,causal,lengths,h_q,h_kv,bias,window,p,layout", SOFTCAP_CASES,
                         ids=[f"{_name(c[0])}-d{c[1]}-{'causal' if c[2] else 'full'}-{c[3][0]}x{c[3][1]}"
                              f"-{c[4]}/{c[5]}-{c[6][0] if c[6] else 'nobias'}-p{c[8]}" for c in SOFTCAP_CASES])
def test_softcap(dtype, head_dim, causal, lengths, h_q, h_kv, bias, window, p, layout):
    """Soft-capped logits (cap 5 on scores drawn to reach ±15, so tanh saturates) alone and with bias (and its
    gradient), GQA, windows and dropout; forward and backward against the capped reference."""
    seed = seed_from("softcap", dtype, head_dim, causal, lengths)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, *lengths, head_dim, dtype, layout, seed, qk_scale=2.0)
    attn_bias = None if bias is None else draw_bias(bias[0], q, k, bias[1], seed + 1)
    check_features(q, k, v, dout, attn_bias, causal=causal, window=window, dropout_p=p, seed=_dropout_seed(seed),
                   bias_grad=attn_bias is not None and attn_bias.dtype != torch.bool, softcap=5.0)


def test_softcap_through_flash_attention():
    """The public function: softcap reaches both passes (autograd) and a large cap is the uncapped function."""
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, 64, BF16, "contiguous", seed_from("softcap api"), 2.0)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = cupyflash.flash_attention(*leaves, causal=True, softcap=3.0)
    out.backward(dout)
    ref = semantics_ref(q, k, v, dout, scale=0.125, causal=True, softcap=3.0)
    pt = attention_ref(q, k, v, dout, scale=0.125, causal=True, compute_dtype=BF16, softcap=3.0)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, BF16), "out")
    for name, leaf, r, pp in zip(("dq", "dk", "dv"), leaves, (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(leaf.grad, r, pp, GRAD_FACTOR, rounding_floor(r, BF16), name)
    uncapped = cupyflash.flash_attention(q, k, v, causal=True)
    assert not torch.allclose(out.detach(), uncapped, atol=1e-2), "cap 3 must change the result"


# ---- fp32 on TF32 tensor cores --------------------------------------------------------------------------------

def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32 (10-bit mantissa, nearest, ties away from zero: cvt.rna.tf32.f32)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class _TF32MatMul(torch.autograd.Function):
    """a @ b as a TF32 tensor core computes it: operands rounded to TF32, products accumulated in fp32 (run with
    TF32 off, so the rounding is ours and not cuBLAS's choice); the backward's two matmuls round alike."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _round_tf32(a) @ _round_tf32(b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        g = _round_tf32(grad)
        return g @ _round_tf32(b).transpose(-1, -2), _round_tf32(a).transpose(-1, -2) @ g


def torch_fp32_attention(q, k, v, dout, *, scale, causal, bias=None, matmul=torch.matmul):
    """torch's fp32 attention math, out and (dq, dk, dv), with `matmul` for its products."""
    with torch.enable_grad():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        group = q.shape[1] // k.shape[1]
        kw, vw = (t.repeat_interleave(group, dim=1) for t in leaves[1:])  # (B, H, Nk, D)
        s = matmul(leaves[0] * scale, kw.transpose(-1, -2))  # (B, H, Nq, Nk)
        if bias is not None:
            s = s + bias
        if causal:
            s = s.masked_fill(~visible_mask(q.shape[2], k.shape[2], True, (-1, -1), q.device), float("-inf"))
        out = matmul(torch.softmax(s, dim=-1), vw)
        grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def tf32_peers(q, k, v, dout, *, scale, causal, bias=None):
    """(TF32-rounded math, torch with allow_tf32): the first is the same-precision math the rule measures against
    (cuBLAS may run small or odd shapes in full fp32 even with TF32 allowed); the second is reported beside it."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        emulated = torch_fp32_attention(q, k, v, dout, scale=scale, causal=causal, bias=bias,
                                        matmul=_TF32MatMul.apply)
        torch.backends.cuda.matmul.allow_tf32 = True
        cublas = torch_fp32_attention(q, k, v, dout, scale=scale, causal=causal, bias=bias)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return emulated, cublas


TF32_CASES = [  # (head_dim, causal, (Nq, Nk), h_q, h_kv, bias, layout)
    (64, False, (97, 97), 4, 4, False, "contiguous"),
    (64, True, (113, 203), 4, 2, True, "transposed"),
    (128, True, (1023, 1024), 2, 2, False, "contiguous"),
    (128, False, (203, 113), 4, 1, True, "contiguous"),
    (32, True, (17, 17), 2, 2, False, "transposed"),
    (96, False, (113, 203), 4, 2, False, "contiguous"),
]


@pytest.mark.parametrize("head_dim,causal,lengths,h_q,h_kv,with_bias,layout", TF32_CASES,
                         ids=[f"d{c[0]}-{'causal' if c[1] else 'full'}-{c[2][0]}x{c[2][1]}-{c[3]}/{c[4]}"
                              f"-{'bias' if c[5] else 'nobias'}-{c[6]}" for c in TF32_CASES])
def test_fp32_on_tf32(head_dim, causal, lengths, h_q, h_kv, with_bias, layout):
    """fp32 inputs (TF32 allowed): our error against the fp64 reference is within 2x (3x for gradients) of torch's
    fp32 math with its matmul operands rounded to TF32, plus an fp32 rounding floor; printed beside the error of
    torch's own allow_tf32 matmuls."""
    seed = seed_from("tf32", head_dim, causal, lengths, with_bias)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, *lengths, head_dim, FP32, layout, seed)
    bias = draw_bias("1HQK", q, k, FP32, seed + 1) if with_bias else None
    scale = 1.0 / math.sqrt(head_dim)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out, lse = run_fwd(q, k, v, bias, scale, causal, (-1, -1), 0.0, 0)
        grads = run_bwd(dout, q, k, v, bias, out, lse, scale, causal, (-1, -1), 0.0, 0, False)[:3]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert out.dtype == FP32 and all(g.dtype == FP32 for g in grads)
    ref = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=torch.float64, bias=bias)
    (em_out, em_grads), (cb_out, cb_grads) = tf32_peers(q, k, v, dout, scale=scale, causal=causal, bias=bias)
    report = []
    for name, ours, r, em, cb, factor in zip(
            ("out", "dq", "dk", "dv"), (out, *grads), (ref.out, ref.dq, ref.dk, ref.dv), (em_out, *em_grads),
            (cb_out, *cb_grads), (OUT_FACTOR, GRAD_FACTOR, GRAD_FACTOR, GRAD_FACTOR)):
        errors = [(t.double() - r).abs().max().item() for t in (ours, em, cb)]
        report.append(f"{name}: ours {errors[0]:.2e}, TF32-rounded math {errors[1]:.2e}, torch allow_tf32 "
                      f"{errors[2]:.2e}")
        assert_within_rule(ours, r, em, factor, rounding_floor(r, FP32), name)
    print("max |error| vs fp64:", "; ".join(report))


def test_fp32_needs_tf32_allowed():
    q, k, v, _ = draw_inputs(1, 2, 2, 17, 17, 64, FP32, "contiguous", seed_from("tf32 refused"))
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with pytest.raises(TypeError, match="TF32"):
            cupyflash.flash_attention(q, k, v)
    finally:  # the precision setter also sets allow_tf32: restore it first
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cuda.matmul.allow_tf32 = saved[0]


# ---- bias tile classes on the GPU -----------------------------------------------------------------------------

@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("shape,br,bc,strided", [((2, 3, 203, 113), 128, 64, False), ((1, 1, 256, 256), 64, 64, True),
                                                 ((2, 1, 1, 97), 64, 32, False), ((1, 2, 97, 1), 32, 128, False),
                                                 ((1, 1, 1024, 1023), 128, 64, False),
                                                 ((2, 2, 256, 512), 64, 64, False),  # 16-byte loads
                                                 ((1, 1, 1000, 1024), 128, 32, False)])  # ragged rows, 16-byte loads
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_tile_classes_kernel_matches_definition(dtype, shape, br, bc, strided, window):
    """launch.classify_tiles (two CUDA kernels) against cupyflash/tile_classes.py (the definition, in torch) on
    biases mixing all-zero, all -inf, all finfo.min, fully masked rows and random tiles, ragged edges included,
    through both the element-wise and the 16-byte load paths."""
    from cupyflash import cuda_path, launch
    from cupyflash.array_ops import ops_for
    from cupyflash.tile_classes import tile_classes

    gen = torch.Generator(device="cuda").manual_seed(seed_from("classes", dtype, shape, br, bc, strided))
    drawn = (*shape[:2], shape[3], shape[2]) if strided else shape
    kind = torch.randint(0, 5, drawn, generator=gen, device="cuda")  # per element, then made tile-coherent below
    block = torch.randint(0, 5, (drawn[0], drawn[1], 1 + drawn[2] // 37, 1 + drawn[3] // 29), generator=gen,
                          device="cuda")
    block = block.repeat_interleave(37, dim=2)[:, :, :drawn[2]].repeat_interleave(29, dim=3)[..., :drawn[3]]
    kind = torch.where(block < 4, block, kind)  # mostly coherent regions, some per-element noise
    values = torch.stack([torch.zeros(drawn, device="cuda"), torch.full(drawn, float("-inf"), device="cuda"),
                          torch.full(drawn, torch.finfo(FP32).min, device="cuda"),
                          torch.randn(drawn, generator=gen, device="cuda"),
                          torch.full(drawn, -1e4, device="cuda")])
    bias = values.gather(0, kind.unsqueeze(0)).squeeze(0).to(dtype)
    if dtype != FP32:  # finfo(fp32).min is -inf in fp16; use each dtype's own "finfo.min" masking value
        bias = torch.where(kind == 2, torch.full((), torch.finfo(dtype).min, dtype=dtype, device="cuda"), bias)
    if strided:
        bias = bias.transpose(-1, -2)
    want = tile_classes(bias, br, bc, window=window)
    ctx = dict(stream_ptr=torch.cuda.current_stream().cuda_stream, device_id=torch.cuda.current_device())
    xp, held = ops_for(bias), []
    got = launch.classify_tiles(dtype=str(dtype).removeprefix("torch."), bias=cuda_path.broadcast_buf(xp, bias),
                                bias_shape=tuple(bias.shape), bias_f32=dtype == FP32, br=br, bc=bc, window=window,
                                alloc=cuda_path.holding_alloc(xp, bias, held), **ctx)
    assert got.dtype == torch.int8 and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu()), f"{int((got != want).sum())} of {got.numel()} tiles differ"
