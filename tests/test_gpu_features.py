"""The kernels' score modifications through the torch op, against the fp32 reference with the tolerance rule:
additive (fp16/bf16/fp32, broadcast, strided) and boolean biases with their gradient, bias values <= -1e30
(finfo.min: uniform rows; -inf: rows without keys), grouped-query / multi-query K/V, sliding windows with and
without causal, and Philox dropout (the exact mask, its rate, unbiasedness, determinism, seeding).

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
from cupyflash.cpu_attention import dropout_keep
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_close_ulps, assert_within_rule, attention_ref, nbytes,
                       poison_cuda_allocator, rounding_floor, seed_from, semantics_ref, visible_mask)

pytestmark = pytest.mark.gpu

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
BATCH = 2


def _name(dtype) -> str:
    return {FP16: "fp16", BF16: "bf16", FP32: "fp32", torch.bool: "bool"}[dtype]


def draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, layout, seed, qk_scale=1.0):
    """q, dout (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D); ``transposed``: views of (B, N, H, D) tensors."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(heads, n, factor=1.0):
        if layout == "contiguous":
            t = torch.randn(batch, heads, n, head_dim, generator=gen, device="cuda", dtype=dtype)
        else:
            assert layout == "transposed", layout
            t = torch.randn(batch, n, heads, head_dim, generator=gen, device="cuda", dtype=dtype).transpose(1, 2)
        return t.mul_(factor) if factor != 1.0 else t

    q, k, v, dout = draw(h_q, n_q, qk_scale), draw(h_kv, n_k, qk_scale), draw(h_kv, n_k), draw(h_q, n_q)
    return q, k, v, dout


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


def run_fwd(q, k, v, bias, scale, causal, window, dropout_p, seed):
    b, h, n_q, _ = q.shape
    poison_cuda_allocator(nbytes(q.shape, q.dtype), nbytes((b, h, n_q), FP32))  # out, lse
    seed_t = torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None
    return torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, scale, causal, window[0], window[1], dropout_p, seed_t)


def run_bwd(dout, q, k, v, bias, out, lse, scale, causal, window, dropout_p, seed, bias_grad):
    b, h, n_q, d = q.shape
    sizes = [nbytes(q.shape, q.dtype), nbytes(k.shape, k.dtype), nbytes(v.shape, v.dtype)]  # dq, dk, dv
    if bias_grad:
        sizes.append(nbytes(bias.shape, FP32))  # dbias accumulator
    sizes += [nbytes(q.shape, FP32), nbytes((b, h, n_q), FP32)]  # dq_accum, D
    poison_cuda_allocator(*sizes)
    seed_t = torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None
    return torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, bias, out, lse, scale, causal, window[0], window[1],
                                              dropout_p, seed_t, bias_grad)


def check_features(q, k, v, dout, bias=None, *, causal=False, window=(-1, -1), dropout_p=0.0, seed=0,
                   bias_grad=False, scale=None):
    """fwd and bwd through the op; the rule on out, lse, dq, dk, dv (and dbias). Returns (out, lse, grads, ref)."""
    dtype, (b, h, n_q, d), n_k = q.dtype, q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = run_fwd(q, k, v, bias, scale, causal, window, dropout_p, seed)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == FP32 and lse.shape == q.shape[:-1]
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=causal, bias=bias, window=window, dropout_p=dropout_p,
                        seed=seed, bias_grad=bias_grad)
    keep = dropout_keep(seed, dropout_p, b, h, range(n_q), range(n_k)) if dropout_p > 0 else None
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype, bias=bias, window=window,
                       dropout_keep=keep, dropout_p=dropout_p, bias_grad=bias_grad)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, rounding_floor(ref.lse, FP32), "lse")

    dq, dk, dv, dbias = run_bwd(dout, q, k, v, bias, out, lse, scale, causal, window, dropout_p, seed, bias_grad)
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
    """A seed with both 32-bit words nonzero (the kernels take them as two arguments)."""
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
    """V = identity (Nk = D) makes out[i, j] = P[i, j] · keep[i, j] / (1 - p), so (out != 0) is the kernel's
    keep mask: it equals dropout_keep exactly (query heads index the mask under grouped-query attention) and
    its keep rate lies within binomial bounds of 1 - p."""
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
    assert abs(n_kept - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p)), f"kernel kept {n_kept} of {n} at p={p}"
    ref = semantics_ref(q, k, v, scale=scale, causal=False, dropout_p=p, seed=dseed)
    pt = attention_ref(q, k, v, scale=scale, causal=False, compute_dtype=dtype, dropout_keep=keep, dropout_p=p)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_dropout_mask_in_backward(dtype, head_dim):
    """dO = identity (Nq = D) makes dV[j, i] = P[i, j] · keep[i, j] / (1 - p): the backward regenerates the
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
    deviations of the mean (Var out_i = p / (1 - p) · Σ_j P_ij² v_j² per seed) plus the rule's allowance."""
    n_seeds, p, n, head_dim, dtype = 512, 0.3, 64, 64, FP16
    q, k, v, _ = draw_inputs(1, 2, 2, n, n, head_dim, dtype, "contiguous", seed_from("unbiased"))
    scale = 1.0 / math.sqrt(head_dim)
    total = torch.zeros(q.shape, dtype=torch.float64, device="cuda")
    for i in range(n_seeds):
        out, _ = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, False, -1, -1, p,
                                                    torch.tensor(_dropout_seed("unbiased", i), dtype=torch.int64))
        assert not torch.isnan(out).any()
        total += out.double()
    mean = total / n_seeds
    ref = semantics_ref(q, k, v, scale=scale, causal=False)
    pt = attention_ref(q, k, v, scale=scale, causal=False, compute_dtype=dtype)
    probs = torch.softmax(scale * q.double() @ k.double().transpose(-1, -2), dim=-1)  # (B, H, N, N)
    sd_mean = (p / (1 - p) * (probs ** 2 @ v.double() ** 2) / n_seeds).sqrt()  # (B, H, N, D)
    allowance = OUT_FACTOR * (pt.out.double() - ref.out.double()).abs().max().item() + rounding_floor(ref.out, dtype)
    excess = ((mean - ref.out.double()).abs() - allowance) / sd_mean
    assert excess.max().item() <= 6.0, f"mean over {n_seeds} seeds is {excess.max().item():.1f} sd off the no-dropout out"
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
    (out1, lse1, dq1, dk1, dv1, db1), (out2, lse2, dq2, dk2, dv2, db2), (out3, lse3, *_) = runs
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert torch.equal(dk1, dk2) and torch.equal(dv1, dv2)
    assert_close_ulps(dq1, dq2, "dq, same seed")
    assert_close_ulps(db1, db2, "dbias, same seed")
    assert torch.equal(lse3, lse1), "dropout acts after the softmax: the lse does not depend on the seed"
    changed = (out3 != out1).float().mean().item()
    assert changed > 0.9, f"another seed changed only {changed:.1%} of the outputs"


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_flash_attention_dropout_autograd(layout):
    """cupyflash.flash_attention draws the seed from torch's CPU generator: torch.manual_seed reproduces out and
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
        assert_close_ulps(a, b, f"{name}, same torch seed")
    torch.manual_seed(seed_from("manual seed", layout))
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
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
