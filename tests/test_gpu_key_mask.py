"""Boolean key-padding masks on the GPU: attn_bias a bool (B, 1, 1, Nk) or (1, 1, 1, Nk) keep-mask (True = keep),
one key mask per batch row, broadcast over heads and query rows, forward and backward.

On Hopper such a mask runs on the plain kernels' key-mask path (plan attribute ``mask_form == "keys"``) instead of
being converted to an additive 0 / -inf bias (``mask_form == "bias"``); with a window, soft-cap or dropout beside it
the call may take the converted-bias path. Either way the numbers must stay right:

- mask patterns per batch row: right padding (the first L_b keys kept), left padding (the last L_b kept), random
  holes (~70 % kept, a whole 128-key tile dropped in one row), all kept, and one batch row with no kept key; built
  from a (B, Nk) bool tensor as the view ``m[:, None, None, :]``, as a contiguous (B, 1, 1, Nk) tensor, as a
  (B, 1, 1, Nk) view whose keys are strided (a transposed (Nk, B) tensor), and as one (1, 1, 1, Nk) row shared by
  every batch row;
- causal or not, Nq != Nk, grouped-query and multi-head K/V, head dims 32 / 64 / 96 / 128, fp16 and bf16;
- out, lse, dq, dk, dv through the torch op against the fp32 reference with the same mask
  (``reference.semantics_ref``), within FlashAttention's rule (``reference.assert_within_rule``: 2x, 3x for the
  gradients, the error of the same-dtype PyTorch math ``reference.attention_ref``, plus the rounding floor), with
  the allocator poisoned before each launch (``test_gpu_features.run_fwd`` / ``run_bwd``) and fresh inputs per case;
- rows that see no key (a fully masked batch row; with causal, the early rows under left padding or Nq > Nk) have
  the op's documented values (docs/API.md "Rows with every key masked", cupyflash/cpu_attention.py): out = 0,
  lse = +inf, dq = 0, and keys no query row sees (masked, or outside causal / window) get dk = dv = 0 exactly; no
  NaN or inf anywhere else.
"""
from __future__ import annotations

import math

import pytest
import torch

import cupyflash
import cupyflash.torch_op  # registers torch.ops.cupyflash.*
from cupyflash import cuda_path, launch, plan, torch_op
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_within_rule, attention_ref, draw_inputs, rounding_floor,
                       seed_from, semantics_ref, visible_mask)
from test_gpu_features import check_features

pytestmark = pytest.mark.gpu

FP16, BF16 = torch.float16, torch.bfloat16
HOPPER_BC = 128  # the Hopper kernels' key tile (tiles.FORWARD_SM90 / BACKWARD_SM90): lengths at and across its edge
PATTERNS = ("right", "left", "holes", "all", "empty-row")
FORMS = ("view", "contiguous", "strided", "shared")


def _name(dtype) -> str:
    return {FP16: "fp16", BF16: "bf16"}[dtype]


def _dropout_seed(*params) -> int:
    """A seed with both 32-bit words nonzero (the two words of the Philox key)."""
    return (seed_from("hi", *params) << 30) ^ seed_from("lo", *params)


def _lengths(pattern: str, batch: int, n_k: int, gen) -> list:
    """Kept lengths per batch row, different per row: a tile edge (128 keys kept of more), full or 1, a random one."""
    edge = HOPPER_BC if n_k > HOPPER_BC else max(1, (2 * n_k) // 3)
    rand = int(torch.randint(1, n_k + 1, (), generator=gen))
    first = [n_k, edge, rand] if pattern == "right" else [edge, 1, rand]
    return (first + [int(x) for x in torch.randint(1, n_k + 1, (max(0, batch - 3),), generator=gen)])[:batch]


def _holes(n_k: int, gen) -> torch.Tensor:
    """(Nk,) bool, ~70 % kept, non-contiguous."""
    return torch.rand(n_k, generator=gen) > 0.3


def key_keep(pattern: str, batch: int, n_k: int, seed: int) -> torch.Tensor:
    """(B, Nk) bool on the GPU, True = keep, one pattern per batch row (see the module's docstring)."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.arange(n_k)
    if pattern == "right":
        keep = cols < torch.tensor(_lengths(pattern, batch, n_k, gen))[:, None]
    elif pattern == "left":
        keep = cols >= n_k - torch.tensor(_lengths(pattern, batch, n_k, gen))[:, None]
    elif pattern == "holes":
        keep = torch.stack([_holes(n_k, gen) for _ in range(batch)])
        if batch > 1:  # a whole Hopper key tile dropped between kept ones (or the tail of a short row)
            keep[1, HOPPER_BC:2 * HOPPER_BC] = False
    elif pattern == "all":
        keep = torch.ones(batch, n_k, dtype=torch.bool)
    else:
        assert pattern == "empty-row", pattern
        keep = torch.stack([_holes(n_k, gen) for _ in range(batch)])
        keep[1] = False  # this batch row sees no key at all
        if batch > 2:
            keep[2] = cols < max(1, min(n_k, HOPPER_BC) // 2)  # right padding beside it
    return keep.to("cuda")


def as_mask(keep: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(attn_bias, the (B, Nk) keep it applies to every batch row): `keep` (B, Nk) as a (B, 1, 1, Nk) or, shared,
    a (1, 1, 1, Nk) boolean attn_bias."""
    batch, n_k = keep.shape
    if form == "view":
        return keep[:, None, None, :], keep
    if form == "contiguous":
        mask = torch.empty(batch, 1, 1, n_k, dtype=torch.bool, device=keep.device).copy_(keep[:, None, None, :])
        assert mask.is_contiguous()
        return mask, keep
    if form == "strided":  # keys not the innermost dim: a (Nk, B) tensor viewed as (B, Nk)
        mask = keep.t().contiguous().t()[:, None, None, :]
        assert mask.stride(-1) == batch or batch == 1
        return mask, keep
    assert form == "shared", form
    return keep[:1].reshape(1, 1, 1, n_k).clone(), keep[:1].expand(batch, n_k)


def assert_rows_without_keys(keep, out, lse, dq, dk, dv, *, causal: bool, window=(-1, -1)) -> torch.Tensor:
    """The op's semantics where the mask (with causal / window) leaves nothing: query rows that see no key give
    out = 0, lse = +inf and dq = 0; keys no query row of their batch row sees get dk = dv = 0 (their P is 0); all
    else finite. `lse` may be None (the public function returns none). Returns the (B, Nq) bool of rows that see no
    key."""
    n_q, n_k = out.shape[2], keep.shape[1]
    sees = visible_mask(n_q, n_k, causal, window, out.device)[None] & keep[:, None, :]  # (B, Nq, Nk)
    empty, unseen = ~sees.any(dim=-1), ~sees.any(dim=-2)  # (B, Nq), (B, Nk)

    def at(t, where):  # (B, H, N, ...) at the (B, N) positions `where`: (count, H, ...)
        return t.transpose(1, 2)[where]

    assert (at(out, empty) == 0).all(), "out of rows that see no key must be 0"
    assert (at(dq, empty) == 0).all(), "dq of rows that see no key must be 0"
    assert (at(dk, unseen) == 0).all() and (at(dv, unseen) == 0).all(), "dk, dv of keys no row sees must be 0"
    if lse is not None:
        assert (at(lse, empty) == float("inf")).all(), "lse of rows that see no key must be +inf"
        assert torch.isfinite(at(lse, ~empty)).all(), "lse of rows that see a key must be finite"
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} non-finite entries"
    return empty


def check_key_mask(q, k, v, dout, keep, mask, *, causal, window=(-1, -1), softcap=0.0, dropout_p=0.0, seed=0):
    """fwd + bwd through the op (poisoned allocations) within the rule against the fp32 reference with the mask,
    then the semantics of rows without keys. Returns (out, lse, dq, dk, dv, empty rows)."""
    out, lse, (dq, dk, dv, dbias), _ = check_features(q, k, v, dout, mask, causal=causal, window=window,
                                                       dropout_p=dropout_p, seed=seed, softcap=softcap)
    assert dbias.numel() == 0
    empty = assert_rows_without_keys(keep, out, lse, dq, dk, dv, causal=causal, window=window)
    return out, lse, dq, dk, dv, empty


# ---- every pattern and mask form, one medium shape -------------------------------------------------------------

def _pattern_cases():
    cases = []
    for i, (pattern, form, causal, dtype) in enumerate(
            (p, f, c, dt) for p in PATTERNS for f in FORMS for c in (False, True) for dt in (FP16, BF16)):
        head_dim = (64, 128)[(i // 2) % 2]
        h_q, h_kv = ((8, 2), (4, 4))[(i // 4) % 2]
        layout = ("contiguous", "transposed")[(i // 3) % 2]
        cases.append(pytest.param(pattern, form, causal, dtype, head_dim, h_q, h_kv, layout,
                                  id=f"{pattern}-{form}-{'causal' if causal else 'full'}-{_name(dtype)}-d{head_dim}"
                                     f"-{h_q}/{h_kv}-{layout}"))
    return cases


@pytest.mark.parametrize("pattern,form,causal,dtype,head_dim,h_q,h_kv,layout", _pattern_cases())
def test_key_mask_patterns(pattern, form, causal, dtype, head_dim, h_q, h_kv, layout):
    """Each pattern in each mask form, causal or not, on Nq = 113 query rows over Nk = 203 keys (a full and a
    partial key tile), grouped-query (8 / 2) and multi-head K/V."""
    n_q, n_k, batch = 113, 203, 3
    seed = seed_from("key mask patterns", pattern, form, causal, dtype, head_dim, h_q, h_kv, layout)
    q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, layout, seed)
    mask, keep = as_mask(key_keep(pattern, batch, n_k, seed + 1), form)
    _, _, _, _, _, empty = check_key_mask(q, k, v, dout, keep, mask, causal=causal)
    if pattern == "empty-row" and form != "shared":
        assert empty[1].all()


# ---- every shape and head dim, the patterns cycling ------------------------------------------------------------

SHAPES = ((1, 17), (17, 17), (113, 203), (203, 113), (256, 128), (1023, 1024))


def _shape_cases():
    cases = []
    for i, ((n_q, n_k), head_dim, causal) in enumerate(
            (s, d, c) for s in SHAPES for d in (32, 64, 96, 128) for c in (False, True)):
        dtype = (FP16, BF16)[i % 2]
        pattern = ("right", "left", "holes", "empty-row")[(i // 2) % 4]
        h_q, h_kv = ((8, 2), (4, 4), (4, 1))[(i // 3) % 3]
        form = ("view", "contiguous")[(i // 5) % 2]
        cases.append(pytest.param(n_q, n_k, head_dim, causal, dtype, pattern, h_q, h_kv, form,
                                  id=f"{n_q}x{n_k}-d{head_dim}-{'causal' if causal else 'full'}-{_name(dtype)}"
                                     f"-{pattern}-{h_q}/{h_kv}-{form}"))
    return cases


@pytest.mark.parametrize("n_q,n_k,head_dim,causal,dtype,pattern,h_q,h_kv,form", _shape_cases())
def test_key_mask_shapes(n_q, n_k, head_dim, causal, dtype, pattern, h_q, h_kv, form):
    """Decoding (Nq = 1), Nq = Nk, Nq < Nk and Nq > Nk (causal: the first Nq - Nk rows see no key), several key
    tiles (1023 x 1024), every head dim the kernels have."""
    batch = 2 if n_q * n_k > 2 ** 16 else 3
    seed = seed_from("key mask shapes", n_q, n_k, head_dim, causal, dtype, pattern, h_q, h_kv, form)
    q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed)
    mask, keep = as_mask(key_keep(pattern, batch, n_k, seed + 1), form)
    check_key_mask(q, k, v, dout, keep, mask, causal=causal)


# ---- rows that see no key --------------------------------------------------------------------------------------

NO_KEY_CASES = {  # name: ((Nq, Nk), causal, pattern, form)
    "empty-batch-row": ((113, 203), False, "empty-row", "view"),
    "causal-left-padding": ((203, 203), True, "left", "view"),
    "causal-nq-over-nk-left-padding": ((256, 128), True, "left", "contiguous"),
    "all-masked-shared": ((113, 203), False, "none", "shared"),
}


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=_name)
@pytest.mark.parametrize("case", list(NO_KEY_CASES))
def test_rows_that_see_no_key(case, dtype):
    """Rows without a key beside rows with one: out 0, lse +inf, dq 0, and dk = dv = 0 for the keys no row sees;
    a fully masked batch row has all its gradients 0; no NaN anywhere (eager softmax would give NaN there)."""
    (n_q, n_k), causal, pattern, form = NO_KEY_CASES[case]
    batch, h_q, h_kv, head_dim = 3, 8, 2, 64
    seed = seed_from("key mask no key", case, dtype)
    q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed)
    if pattern == "none":
        keep = torch.zeros(batch, n_k, dtype=torch.bool, device="cuda")
    else:
        keep = key_keep(pattern, batch, n_k, seed + 1)
    mask, keep = as_mask(keep, form)
    out, lse, dq, dk, dv, empty = check_key_mask(q, k, v, dout, keep, mask, causal=causal)
    assert empty.any() and not empty.all() or pattern == "none", "the case must mix rows with and without keys"
    if pattern in ("empty-row", "none"):
        b = slice(None) if pattern == "none" else 1
        assert (out[b] == 0).all() and (lse[b] == float("inf")).all()
        assert (dq[b] == 0).all() and (dk[b] == 0).all() and (dv[b] == 0).all()
    if causal and pattern == "left":
        # batch row 1 keeps only the last key: every row but the last sees nothing
        assert empty[1, :-1].all() and not empty[1, -1]


# ---- the mma.sync kernels with a key mask ----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_key_mask_on_mma_sync(pattern, causal, monkeypatch):
    """Every pattern with the Hopper kernels off (launch.SM90_ENV=0): the mma.sync kernels take the mask."""
    monkeypatch.setenv(launch.SM90_ENV, "0")
    dtype = BF16 if causal else FP16
    seed = seed_from("key mask mma.sync", pattern, causal)
    q, k, v, dout = draw_inputs(3, 8, 2, 113, 203, 64, dtype, "contiguous", seed)
    mask, keep = as_mask(key_keep(pattern, 3, 203, seed + 1), "view")
    check_key_mask(q, k, v, dout, keep, mask, causal=causal)


# ---- a window, soft-cap or dropout beside the key mask ---------------------------------------------------------

COMBO_CASES = [  # (dtype, head_dim, causal, (Nq, Nk), Hq, Hkv, pattern, form, window, softcap, dropout_p)
    (BF16, 128, False, (113, 203), 8, 2, "right", "view", (32, 8), 0.0, 0.0),
    (FP16, 64, True, (256, 256), 4, 4, "left", "contiguous", (64, 0), 0.0, 0.0),  # causal sliding window
    (BF16, 64, True, (113, 203), 8, 2, "holes", "view", (-1, -1), 5.0, 0.0),
    (FP16, 128, False, (203, 113), 4, 1, "empty-row", "view", (48, 24), 5.0, 0.0),  # window + soft-cap
    (BF16, 96, False, (17, 17), 4, 4, "right", "shared", (-1, -1), 5.0, 0.0),
    (FP16, 128, True, (1023, 1024), 4, 2, "left", "view", (256, 0), 5.0, 0.0),
    (BF16, 128, False, (113, 203), 8, 2, "right", "view", (-1, -1), 0.0, 0.2),  # dropout
]


@pytest.mark.parametrize("dtype,head_dim,causal,lengths,h_q,h_kv,pattern,form,window,softcap,p", COMBO_CASES,
                         ids=[f"{_name(c[0])}-d{c[1]}-{'causal' if c[2] else 'full'}-{c[3][0]}x{c[3][1]}-{c[4]}/{c[5]}"
                              f"-{c[6]}-{c[7]}-w{c[8][0]}_{c[8][1]}-cap{c[9]}-p{c[10]}" for c in COMBO_CASES])
def test_key_mask_with_window_softcap_dropout(dtype, head_dim, causal, lengths, h_q, h_kv, pattern, form, window,
                                              softcap, p):
    """A key mask beside a sliding window, soft-capping (scores drawn to reach ±15, so tanh saturates) or dropout
    (the reference with the kernels' keep mask): still right, rows left without keys included."""
    n_q, n_k = lengths
    batch = 2 if n_q * n_k > 2 ** 16 else 3
    seed = seed_from("key mask combos", dtype, head_dim, causal, lengths, pattern, form, window, softcap, p)
    q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed,
                                qk_scale=2.0 if softcap else 1.0)
    mask, keep = as_mask(key_keep(pattern, batch, n_k, seed + 1), form)
    check_key_mask(q, k, v, dout, keep, mask, causal=causal, window=window, softcap=softcap, dropout_p=p,
                   seed=_dropout_seed(seed) if p > 0 else 0)


# ---- the public function -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=_name)
def test_flash_attention_with_key_mask(dtype, causal):
    """cupyflash.flash_attention with a (B, 1, 1, Nk) bool mask and autograd: out, dq, dk, dv within the rule, and
    rows without keys as the op gives them."""
    n_q, n_k, batch, h_q, h_kv, head_dim = 203, 203, 3, 8, 2, 128
    seed = seed_from("key mask flash_attention", dtype, causal)
    q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "transposed", seed)
    mask, keep = as_mask(key_keep("left" if causal else "empty-row", batch, n_k, seed + 1), "view")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = cupyflash.flash_attention(*leaves, mask, causal=causal)
    out.backward(dout)
    dq, dk, dv = (t.grad for t in leaves)
    scale = 1.0 / math.sqrt(head_dim)
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=causal, bias=mask)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype, bias=mask)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    for name, ours, r, same in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert ours.shape == r.shape and ours.dtype == dtype
        assert_within_rule(ours, r, same, GRAD_FACTOR, rounding_floor(r, dtype), name)
    assert_rows_without_keys(keep, out.detach(), None, dq, dk, dv, causal=causal)


# ---- the key-mask path is taken on Hopper ------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["view", "contiguous", "shared"])
def test_hopper_takes_key_mask_path(form, causal, monkeypatch):
    """On sm_90 a (B, 1, 1, Nk) or (1, 1, 1, Nk) bool mask runs the plain Hopper kernels' key-mask path: after a
    forward and a backward, a plan in cuda_path._KNOWN has family "hopper" and mask_form "keys" (a mask converted
    to an additive bias gives "bias"). The numbers are checked too."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels run on sm_90 only")
    monkeypatch.delenv(launch.SM90_ENV, raising=False)
    monkeypatch.setattr(cuda_path, "_KNOWN", {})  # only this test's plans, none run from an earlier test's runner
    monkeypatch.setattr(torch_op, "_PLAIN_FORWARDS", {})
    monkeypatch.setattr(torch_op, "_PLAIN_BACKWARDS", {})
    n, batch, h_q, h_kv, head_dim, dtype = 256, 2, 8, 2, 128, BF16
    seed = seed_from("key mask hopper path", form, causal)
    q, k, v, dout = draw_inputs(batch, h_q, h_kv, n, n, head_dim, dtype, "contiguous", seed)
    mask, keep = as_mask(key_keep("right", batch, n, seed + 1), form)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = cupyflash.flash_attention(*leaves, mask, causal=causal)
    out.backward(dout)
    torch.cuda.synchronize()
    plans = list(cuda_path._KNOWN.values())
    seen = [(p.layout.kernel, p.family, getattr(p, "mask_form", "<no mask_form>")) for p in plans]
    assert any(getattr(p, "mask_form", None) == "keys" and p.family == "hopper" for p in plans), (
        f"no Hopper plan with mask_form 'keys' among (pass, family, mask_form) {seen}")
    scale = 1.0 / math.sqrt(head_dim)
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=causal, bias=mask)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype, bias=mask)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    for name, leaf, r, same in zip(("dq", "dk", "dv"), leaves, (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(leaf.grad, r, same, GRAD_FACTOR, rounding_floor(r, dtype), name)
    assert_rows_without_keys(keep, out.detach(), None, *(t.grad for t in leaves), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_calls_run_from_their_runners(causal, monkeypatch):
    """On sm_90 the op's calls with a key mask the plan takes as the kernels' key mask get the plain calls' runners
    (torch_op._PLAIN_FORWARDS / _PLAIN_BACKWARDS): the next call of the layout, with another mask and other
    tensors, launches the plan unchecked; its numbers are within the rule too."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the key mask runs on the Hopper kernels, sm_90 only")
    monkeypatch.delenv(launch.SM90_ENV, raising=False)
    monkeypatch.setattr(torch_op, "_PLAIN_FORWARDS", {})
    monkeypatch.setattr(torch_op, "_PLAIN_BACKWARDS", {})
    n_q, n_k, batch, h_q, h_kv, head_dim, dtype = 113, 203, 3, 4, 2, 64, FP16
    scale = 1.0 / math.sqrt(head_dim)
    for round_, pattern in enumerate(("right", "holes", "left")):
        seed = seed_from("key mask runners", causal, pattern)
        q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed)
        mask, keep = as_mask(key_keep(pattern, batch, n_k, seed + 1), "view")
        runners = [r for table in (torch_op._PLAIN_FORWARDS, torch_op._PLAIN_BACKWARDS) for r in table.values()]
        assert len(runners) == (0 if round_ == 0 else 2) and all(r is not None for r in runners)
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, scale, causal)
        dq, dk, dv, _ = torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, mask, out, lse, scale, causal)
        ref = semantics_ref(q, k, v, dout, scale=scale, causal=causal, bias=mask)
        pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype, bias=mask)
        assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
        for name, ours, r, same in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref.dq, ref.dk, ref.dv),
                                       (pt.dq, pt.dk, pt.dv)):
            assert_within_rule(ours, r, same, GRAD_FACTOR, rounding_floor(r, dtype), name)
        assert_rows_without_keys(keep, out, lse, dq, dk, dv, causal=causal)


# ---- grouped-query backward split over thread blocks ----------------------------------------------------------

SPLIT_CASES = [  # (B, Hq, Hkv, Nq, Nk, D, dtype, causal, key pattern or None): few thread blocks, so split
    (2, 16, 4, 1024, 1024, 128, BF16, True, "right"),  # the Llama step's layer, shorter: split 4
    (2, 8, 2, 333, 777, 64, FP16, False, "left"),
    (1, 6, 2, 300, 300, 96, BF16, True, "holes"),  # group 3: split 3
    (3, 8, 1, 200, 517, 32, BF16, True, None),  # multi-query, no mask: split 8
]


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[f"b{c[0]}-hq{c[1]}-hkv{c[2]}-{c[3]}x{c[4]}-d{c[5]}-{_name(c[6])}-"
                                                   f"{'causal' if c[7] else 'full'}-{c[8] or 'nomask'}"
                                                   for c in SPLIT_CASES])
def test_grouped_query_backward_split_or_not(case, split, monkeypatch):
    """plan.backward_kv_split on sm_90: with fewer than KV_SPLIT_MIN_BLOCKS thread blocks the backward runs over K/V
    repeated per split (flash_bwd_expand_kv_sm90) and adds up its partial dK, dV (flash_bwd_sum_kv_sm90): the
    backward plan has kv_part_shape; with KV_SPLIT_MIN_BLOCKS 0 it has none. Both within the rule, with the key
    mask's semantics where there is one."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels run on sm_90 only")
    batch, h_q, h_kv, n_q, n_k, head_dim, dtype, causal, pattern = case
    monkeypatch.delenv(launch.SM90_ENV, raising=False)
    if not split:
        monkeypatch.setattr(plan, "KV_SPLIT_MIN_BLOCKS", 0)
    plan.plan_for.cache_clear()  # plans of either setting are made afresh (and dropped after)
    monkeypatch.setattr(cuda_path, "_KNOWN", {})
    monkeypatch.setattr(torch_op, "_PLAIN_FORWARDS", {})
    monkeypatch.setattr(torch_op, "_PLAIN_BACKWARDS", {})
    try:
        seed = seed_from("gqa split", *case[:6], _name(dtype), causal, pattern)
        q, k, v, dout = draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, "contiguous", seed)
        if pattern is None:
            check_features(q, k, v, dout, causal=causal)
        else:
            keep = key_keep(pattern, batch, n_k, seed + 1)
            check_key_mask(q, k, v, dout, keep, keep[:, None, None, :], causal=causal)
        backward = [p for p in cuda_path._KNOWN.values() if p.layout.kernel == "bwd"]
        assert backward and all(p.family == "hopper" for p in backward)
        group = h_q // h_kv
        assert all(p.kv_part_shape == ((4, batch, h_kv * group, n_k, head_dim) if split else None)
                   for p in backward), [p.kv_part_shape for p in backward]
    finally:
        plan.plan_for.cache_clear()
