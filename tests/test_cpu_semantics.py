"""The op's semantics (cupyflash/cpu_attention.py, shared with kernels_cu/scores.cuh) against naive eager math on
the CPU: additive and boolean biases (with the bias gradient), grouped-query K/V, sliding windows, masked rows,
and the Philox dropout mask. The GPU feature tests use cpu_attention as their fp32 reference and
``reference.attention_ref`` as their same-dtype baseline, so this also checks that the two agree.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cupyflash
import cupyflash.torch_op  # noqa: F401  registers torch.ops.cupyflash.*
from cupyflash import cpu_attention
from reference import attention_ref, seed_from, visible_mask

F64 = torch.float64
B, HQ, D = 2, 4, 16
GRAD_TOL = dict(atol=1e-6, rtol=1e-5)  # the op keeps lse in fp32, so its recomputed P is fp32-accurate


def _randn(*shape, gen, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _make_bias(kind, n_q, n_k, gen):
    """(bias, bias_grad) for a bias kind: None, additive of a broadcast shape, or a boolean mask."""
    if kind == "none":
        return None, False
    if kind == "bool":  # (B, 1, Nq, Nk), about a quarter of the keys masked, row 3 without any key
        mask = torch.rand(B, 1, n_q, n_k, generator=gen) > 0.25
        mask[:, :, min(3, n_q - 1)] = False
        return mask, False
    shape = {"full": (B, HQ, n_q, n_k), "keys": (B, 1, 1, n_k), "rows": (1, HQ, n_q, 1)}[kind]
    return 2.0 * _randn(*shape, gen=gen), True


def _check_against_naive(q, k, v, dout, bias, *, scale, causal, window, dropout_p, seed, bias_grad, softcap=0.0):
    seed_t = torch.tensor(seed, dtype=torch.int64) if dropout_p > 0 else None  # as flash_attention passes it
    out, lse = cpu_attention.forward(q, k, v, bias, scale, causal, window, dropout_p, seed_t, softcap=softcap)
    dq, dk, dv, dbias = cpu_attention.backward(dout, q, k, v, bias, out, lse, scale, causal, window, dropout_p,
                                               seed_t, bias_grad, softcap=softcap)
    keep = None
    if dropout_p > 0:
        keep = cpu_attention.dropout_keep(seed, dropout_p, q.shape[0], q.shape[1], range(q.shape[2]),
                                          range(k.shape[2]))
    ref = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=F64, bias=bias, window=window,
                        dropout_keep=keep, dropout_p=dropout_p, bias_grad=bias_grad, softcap=softcap)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref.out)
    torch.testing.assert_close(lse, ref.lse.float())  # +inf rows compare equal
    for name, got, want in (("dq", dq, ref.dq), ("dk", dk, ref.dk), ("dv", dv, ref.dv), ("dbias", dbias, ref.dbias)):
        if name == "dbias" and not bias_grad:
            assert got is None
            continue
        assert got.shape == want.shape and not torch.isnan(got).any(), name
        # A broadcast bias's gradient sums `summed` fp32-accurate products an element: its error grows as their root
        summed = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] // want.numel() if name == "dbias" else 1
        tol = dict(GRAD_TOL, atol=GRAD_TOL["atol"] * math.sqrt(summed))
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")
    return out, lse, (dq, dk, dv, dbias)


CASES = [  # (bias kind, K/V heads, window, causal, dropout_p, (Nq, Nk))
    ("none", 4, (-1, -1), False, 0.0, (17, 17)),
    ("full", 4, (-1, -1), False, 0.0, (40, 9)),
    ("full", 2, (-1, -1), True, 0.0, (40, 9)),  # causal Nq > Nk: rows without keys
    ("keys", 1, (-1, -1), True, 0.0, (9, 40)),
    ("rows", 2, (5, 3), False, 0.0, (17, 33)),
    ("bool", 4, (-1, -1), False, 0.0, (17, 33)),
    ("bool", 1, (4, -1), True, 0.0, (33, 17)),
    ("none", 2, (0, 0), False, 0.0, (17, 17)),
    ("full", 4, (7, 2), True, 0.0, (33, 17)),  # causal clips right to 0
    ("keys", 2, (-1, 2), False, 0.0, (40, 9)),  # right window with Nq > Nk: rows without keys
    ("none", 4, (-1, -1), False, 0.25, (17, 33)),
    ("bool", 2, (-1, -1), True, 0.25, (33, 17)),
    ("full", 1, (6, 6), False, 0.5, (40, 9)),
]


@pytest.mark.parametrize("bias_kind,h_kv,window,causal,dropout_p,lengths", CASES,
                         ids=[f"{c[0]}-hkv{c[1]}-w{c[2][0]}_{c[2][1]}-{'causal' if c[3] else 'full'}-p{c[4]}-"
                              f"{c[5][0]}x{c[5][1]}" for c in CASES])
def test_features_match_naive_fp64(bias_kind, h_kv, window, causal, dropout_p, lengths):
    """out, lse, dq, dk, dv (and dbias) of cpu_attention equal naive softmax math with the same bias, window,
    grouped-query K/V and dropout keep mask."""
    n_q, n_k = lengths
    gen = torch.Generator().manual_seed(seed_from(bias_kind, h_kv, window, causal, dropout_p, lengths))
    q, dout = _randn(B, HQ, n_q, D, gen=gen), _randn(B, HQ, n_q, D, gen=gen)
    k, v = _randn(B, h_kv, n_k, D, gen=gen), _randn(B, h_kv, n_k, D, gen=gen)
    bias, bias_grad = _make_bias(bias_kind, n_q, n_k, gen)
    out, lse, grads = _check_against_naive(q, k, v, dout, bias, scale=0.3, causal=causal, window=window,
                                           dropout_p=dropout_p, seed=seed_from("dropout", lengths),
                                           bias_grad=bias_grad)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape  # dK/dV summed over the group


SOFTCAP_CASES = [  # (softcap, bias kind, K/V heads, window, causal, dropout_p, (Nq, Nk))
    (0.5, "none", 4, (-1, -1), False, 0.0, (17, 17)),  # tanh saturated on most scores
    (50.0, "none", 4, (-1, -1), True, 0.0, (1, 1)),  # nearly linear
    (2.0, "full", 2, (-1, -1), True, 0.0, (40, 9)),  # causal Nq > Nk: rows without keys
    (3.0, "keys", 1, (-1, -1), True, 0.25, (9, 40)),  # bias + causal + multi-query + dropout
    (1.5, "full", 2, (-1, -1), False, 0.25, (97, 33)),
    (2.0, "rows", 2, (5, 3), False, 0.0, (17, 33)),
    (1.0, "bool", 4, (-1, -1), True, 0.5, (33, 17)),
    (4.0, "full", 4, (7, 2), True, 0.0, (113, 203)),
]


@pytest.mark.parametrize("softcap,bias_kind,h_kv,window,causal,dropout_p,lengths", SOFTCAP_CASES,
                         ids=[f"cap{c[0]}-{c[1]}-hkv{c[2]}-w{c[3][0]}_{c[3][1]}-{'causal' if c[4] else 'full'}-"
                              f"p{c[5]}-{c[6][0]}x{c[6][1]}" for c in SOFTCAP_CASES])
def test_softcap_matches_naive_fp64(softcap, bias_kind, h_kv, window, causal, dropout_p, lengths):
    """Soft-capped logits softcap · tanh(scale · q kᵀ / softcap) + bias: out, lse, dq, dk, dv and dbias (the
    gradient w.r.t. the bias, added after the cap) of cpu_attention equal naive fp64 math through autograd."""
    n_q, n_k = lengths
    gen = torch.Generator().manual_seed(seed_from("softcap", softcap, bias_kind, h_kv, window, causal, lengths))
    q, dout = _randn(B, HQ, n_q, D, gen=gen), _randn(B, HQ, n_q, D, gen=gen)
    k, v = _randn(B, h_kv, n_k, D, gen=gen), _randn(B, h_kv, n_k, D, gen=gen)
    bias, bias_grad = _make_bias(bias_kind, n_q, n_k, gen)
    scale = 0.5  # scale · q kᵀ has std 2 here: well into tanh's curved part for the small caps
    _, lse, _ = _check_against_naive(q, k, v, dout, bias, scale=scale, causal=causal, window=window,
                                     dropout_p=dropout_p, seed=seed_from("dropout", lengths), bias_grad=bias_grad,
                                     softcap=softcap)
    if softcap < 10:  # the cap must change the result, or this would not test it
        _, lse_plain = cpu_attention.forward(q, k, v, bias, scale, causal, window)
        seen = torch.isfinite(lse)
        assert (lse - lse_plain)[seen].abs().max() > 0.1


def test_softcap_through_flash_attention_equals_gemma2_eager():
    """flash_attention(..., softcap=) with a learned bias, finfo.min-masked keys and grouped-query heads against
    Gemma 2's eager code (HF transformers eager_attention_forward), differentiated by autograd in all of q, k,
    v and the bias (rows masked entirely: test_finfo_min_rows_match_eager)."""
    n_q, n_k, cap, scaling = 13, 29, 5.0, D ** -0.5
    gen = torch.Generator().manual_seed(seed_from("gemma2 eager"))
    q, dout = (_randn(B, HQ, n_q, D, gen=gen) * 3 for _ in range(2))
    k, v = (_randn(B, 2, n_k, D, gen=gen) * 3 for _ in range(2))
    bias = _randn(B, 1, n_q, n_k, gen=gen)
    bias[..., 20:] = torch.finfo(F64).min  # keys masked the way HF masks them
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = cupyflash.flash_attention(*leaves, scale=scaling, softcap=cap)
    grads = torch.autograd.grad(out, leaves, dout)

    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    qe, ke, ve, be = eager_leaves
    attn_weights = torch.matmul(qe, ke.repeat_interleave(2, dim=1).transpose(2, 3)) * scaling
    attn_weights = attn_weights / cap
    attn_weights = torch.tanh(attn_weights)
    attn_weights = attn_weights * cap
    attn_weights = attn_weights + be
    ref = torch.softmax(attn_weights, dim=-1) @ ve.repeat_interleave(2, dim=1)
    ref_grads = torch.autograd.grad(ref, eager_leaves, dout)
    torch.testing.assert_close(out, ref)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert got.shape == want.shape and not torch.isnan(got).any(), name
        torch.testing.assert_close(got, want, **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    assert (grads[3][..., 20:].abs() < 1e-30).all(), "masked keys get no bias gradient"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (3, 1), (0, 0), (2, -1), (-1, 0), (-1, 4), (30, 30)])
@pytest.mark.parametrize("n_q,n_k", [(11, 11), (15, 7), (7, 15)])
def test_window_by_definition(n_q, n_k, window, causal):
    """Which keys each query sees, read off the output with V = identity (out[i, j] > 0 iff key j is seen),
    against the docstring's rule written out element by element."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    diag = n_k - n_q
    want = torch.tensor([[(left < 0 or j >= i + diag - left) and (right < 0 or j <= i + diag + right)
                          for j in range(n_k)] for i in range(n_q)])
    gen = torch.Generator().manual_seed(seed_from("window", n_q, n_k, window, causal))
    q, k = _randn(1, 1, n_q, n_k, gen=gen), _randn(1, 1, n_k, n_k, gen=gen)
    v = torch.eye(n_k, dtype=F64).view(1, 1, n_k, n_k)
    out, lse = cpu_attention.forward(q, k, v, None, 0.1, causal, window)
    assert torch.equal(out[0, 0] > 0, want)
    assert torch.equal(visible_mask(n_q, n_k, causal, window, "cpu"), want)
    no_key = ~want.any(dim=-1)
    assert torch.equal(torch.isinf(lse[0, 0]), no_key) and (lse[0, 0][no_key] > 0).all()
    assert (out[0, 0][no_key] == 0).all()


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_finfo_min_rows_match_eager(causal, bias_dtype, softcap):
    """A bias of finfo.min (fp32 or bf16, both <= -1e30) masks its key; a row masked only that way attends
    uniformly, and out and every gradient (dbias included) match eager fp32 math, where finfo.min absorbs the
    score (soft-capped or not). Keys masked by -inf in a row that also has finfo.min keys get weight 0."""
    n_q, n_k = 9, 13
    gen = torch.Generator().manual_seed(seed_from("finfo.min", causal, bias_dtype, softcap))
    q, dout = (torch.randn(B, HQ, n_q, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, 2, n_k, D, generator=gen) for _ in range(2))
    bias = torch.randn(B, HQ, n_q, n_k, generator=gen).to(bias_dtype)
    lowest = torch.finfo(bias_dtype).min
    bias[:, :, 2] = lowest  # row masked only by finfo.min: uniform over its visible keys
    bias[:, :, 5, :6] = lowest  # row with masked and normal keys
    bias[:, :, 7, :4] = float("-inf")  # -inf beside finfo.min: weight 0 for the -inf keys
    bias[:, :, 7, 4:] = lowest
    bias[:, 1, :, 10] = lowest  # one key masked for a whole head
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out = cupyflash.flash_attention(*leaves, scale=0.25, causal=causal, softcap=softcap)
    grads = torch.autograd.grad(out, leaves, dout)

    eager_leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    qe, ke, ve, be = eager_leaves
    s = 0.25 * qe @ ke.repeat_interleave(2, dim=1).transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s + be  # promotes bf16 bias to fp32
    assert (s[:, :, 2] == lowest).all(), "eager absorbs the score into finfo.min"
    if causal:
        s = s.masked_fill(~visible_mask(n_q, n_k, True, (-1, -1), "cpu"), float("-inf"))
    ref = torch.softmax(s, dim=-1) @ ve.repeat_interleave(2, dim=1)
    ref_grads = torch.autograd.grad(ref, eager_leaves, dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # P of a finfo.min-only row is rebuilt from its exact max and sum (the rebuild rule), not from its lse near
    # MASKED_LOGIT (~ -2839, which fp32 holds to ~2^-12): fp32 accuracy. dbias comes back in the bias's dtype,
    # where both sides round: one bf16 ulp is 2^-7 relative.
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert got.dtype == want.dtype and not torch.isnan(got).any(), name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=max(1e-5, torch.finfo(got.dtype).eps),
                                   msg=lambda m: f"{name}: {m}")
    seen = visible_mask(n_q, n_k, causal, (-1, -1), "cpu")[2]  # (Nk,)
    uniform = v.repeat_interleave(2, dim=1)[:, :, seen].mean(dim=-2)  # (B, H, D)
    torch.testing.assert_close(out[:, :, 2], uniform, atol=1e-5, rtol=1e-5)
    assert grads[3][:, :, 7, :4].eq(0).all(), "dbias of -inf keys is 0"
    _, lse = cpu_attention.forward(q, k, v, bias, 0.25, causal, softcap=softcap)
    expected = cpu_attention.MASKED_LOGIT + math.log(int(seen.sum()))
    torch.testing.assert_close(lse[:, :, 2], torch.full_like(lse[:, :, 2], expected))


@pytest.mark.parametrize("how", ["-inf bias", "bool mask"])
def test_rows_without_keys(how):
    """Rows whose keys are all -inf (or False): out 0, lse +inf, their dq and dbias 0; other rows as without
    them (eager math on the remaining rows)."""
    n_q, n_k, empty = 11, 7, [0, 4, 10]
    gen = torch.Generator().manual_seed(seed_from("rows without keys", how))
    q, dout = (_randn(B, HQ, n_q, D, gen=gen) for _ in range(2))
    k, v = (_randn(B, HQ, n_k, D, gen=gen) for _ in range(2))
    raw = _randn(1, HQ, n_q, n_k, gen=gen)
    raw[:, :, empty] = float("-inf")
    bias = raw if how == "-inf bias" else torch.isfinite(raw)
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in (q, k, v, bias)]
    out = cupyflash.flash_attention(*leaves, scale=0.25)
    wrt = leaves if how == "-inf bias" else leaves[:3]
    grads = torch.autograd.grad(out, wrt, dout)
    _, lse = cpu_attention.forward(q, k, v, bias, 0.25, False)
    assert (out[:, :, empty] == 0).all() and (lse[:, :, empty] == float("inf")).all()
    assert (grads[0][:, :, empty] == 0).all()
    if how == "-inf bias":
        assert (grads[3][:, :, empty] == 0).all()
    rest = [i for i in range(n_q) if i not in empty]
    s = 0.25 * q[:, :, rest] @ k.transpose(-1, -2)  # (B, H, Nq - 3, Nk): the other rows see every key
    if how == "-inf bias":
        s = s + raw[:, :, rest]
    torch.testing.assert_close(out[:, :, rest], torch.softmax(s, dim=-1) @ v)
    assert all(not torch.isnan(g).any() for g in grads)


def test_dropout_keep_deterministic_and_rate():
    """dropout_keep is a pure function of (seed, element): repeated calls and any sub-range (the chunks the CPU
    path draws) agree; its keep rate is its keep probability within binomial bounds (the 8-bit threshold within
    1/512 of 1 - p); seeds (their high word too) differ."""
    rows, cols = range(97), range(203)
    for p in (0.1, 0.5, 0.8):
        assert abs((1 - p) - cpu_attention.keep_threshold(p) / 256) <= 1 / 512
        keep_p = cpu_attention.keep_probability(p)
        seed = seed_from("keep", p)
        keep = cpu_attention.dropout_keep(seed, p, 2, 3, rows, cols)
        assert keep.shape == (2, 3, 97, 203) and keep.dtype == torch.bool
        assert torch.equal(keep, cpu_attention.dropout_keep(seed, p, 2, 3, rows, cols))
        part = cpu_attention.dropout_keep(seed, p, 2, 3, range(40, 60), range(128, 203))
        assert torch.equal(part, keep[:, :, 40:60, 128:203])
        n = keep.numel()
        kept = int(keep.sum())
        assert abs(kept - n * keep_p) <= 5 * math.sqrt(n * keep_p * (1 - keep_p)), f"p={p}: kept {kept} of {n}"
        for other in (seed + 1, seed + 2 ** 32):
            differ = (cpu_attention.dropout_keep(other, p, 2, 3, rows, cols) != keep).float().mean().item()
            assert differ > p * (1 - p), f"seed {other} vs {seed}: only {differ:.3f} of the mask differs"
        heads = cpu_attention.dropout_keep(seed, p, 2, 3, rows, cols)
        assert not torch.equal(heads[0, 0], heads[0, 1]) and not torch.equal(heads[0, 0], heads[1, 0])


def test_philox_known_answers():
    """The generator is Philox4x32-7: Random123's known-answer vectors (kat_vectors, philox4x32 7), all four output
    words (the dropout numbers of a group of eight elements, two 16-bit halves each)."""
    assert cpu_attention.PHILOX_ROUNDS == 7
    vectors = [((0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
               ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A))]
    for counter, key, want in vectors:
        c = [np.array([w], dtype=np.uint64) for w in counter]
        assert tuple(int(w[0]) for w in cpu_attention._philox(*c, *key)) == want


def test_dropout_seed_reproducible_through_flash_attention():
    """flash_attention draws its seed from torch's CPU generator: torch.manual_seed reproduces out and grads,
    the next draw differs, and the op with that seed gives the same result."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, dout = (_randn(1, 2, 17, D, gen=gen).requires_grad_() for _ in range(4))

    def run():
        out = cupyflash.flash_attention(q, k, v, dropout_p=0.3)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    torch.manual_seed(123)
    first = run()
    torch.manual_seed(123)
    assert all(torch.equal(a, b) for a, b in zip(first, run()))
    assert not torch.equal(first[0], run()[0])
    torch.manual_seed(123)
    seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    out, _ = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, False, -1, -1, 0.3, seed)
    assert torch.equal(out, first[0])
