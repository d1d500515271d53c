"""The CUDA kernels through the torch op, against the fp32 reference with the tolerance rule (tests/reference.py).

Every check draws fresh random inputs (seeded from its parameters) and poisons the allocator first, so the
op's freshly allocated outputs start as NaN. The sweep covers the axes that change code paths: odd lengths and
Nq != Nk (partial tiles, causal offsets, rows with no key), head dims (one template instance each), causal,
fp16/bf16, and transposed-view inputs (non-contiguous batch/head/seq strides).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import cupyflash
import cupyflash.torch_op  # registers torch.ops.cupyflash.*
from cupyflash import cuda_path, launch, plan
from cupyflash.array_ops import token_major_strides
from cupyflash.tiles import BACKWARD, BACKWARD_SM90, FORWARD_SM90
from cupyflash.validate import kernel_head_dim
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_close_ulps, assert_within_rule, attention_ref, causal_keep_mask,
                       nbytes, poison_cuda_allocator, rounding_floor, seed_from)

pytestmark = pytest.mark.gpu

FP16, BF16 = torch.float16, torch.bfloat16
HEAD_DIMS = (32, 64, 96, 128, 256)
LENGTHS = ((1, 1), (17, 17), (97, 97), (113, 203), (203, 113), (1023, 1024), (128, 128), (256, 512))
BATCH, HEADS = 2, 3


def fwd_op(q, k, v, scale, causal):
    return torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, causal)


def bwd_op(dout, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv); the op may return further outputs after them (the bias gradient)."""
    return tuple(torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, scale, causal))[:3]


def make_inputs(batch, heads, n_q, n_k, head_dim, dtype, layout, seed):
    """q, k, v, dout as (B, H, N, D); ``transposed``: views of (B, N, H, D) tensors, as models produce them."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(n):
        if layout == "contiguous":
            return torch.randn(batch, heads, n, head_dim, generator=gen, device="cuda", dtype=dtype)
        assert layout == "transposed", layout
        return torch.randn(batch, n, heads, head_dim, generator=gen, device="cuda", dtype=dtype).transpose(1, 2)

    return draw(n_q), draw(n_k), draw(n_k), draw(n_q)


def poisoned_fwd(q, k, v, scale, causal):
    b, h, n_q, d = q.shape
    poison_cuda_allocator(nbytes(q.shape, q.dtype), nbytes((b, h, n_q), torch.float32))  # out, lse
    return fwd_op(q, k, v, scale, causal)


def poisoned_bwd(dout, q, k, v, out, lse, scale, causal):
    b, h, n_q, d = q.shape
    poison_cuda_allocator(nbytes(q.shape, q.dtype), nbytes(k.shape, k.dtype), nbytes(v.shape, v.dtype),  # dq dk dv
                          nbytes((b, h, plan.dq_accum_rows(n_q), d), torch.float32),  # dq_accum: whole Q blocks
                          nbytes((b, h, n_q), torch.float32))  # D
    return bwd_op(dout, q, k, v, out, lse, scale, causal)


def run_backward_or_skip(head_dim, fn, *args):
    """head_dim 256 has no fp32 (TF32) backward (tiles.NO_TF32_BACKWARD): skip that case with the op's own
    message."""
    try:
        return fn(*args)
    except NotImplementedError as err:
        if head_dim == 256:
            pytest.skip(f"forward checked; backward for head_dim 256 raised NotImplementedError: {err}")
        raise


def check_against_reference(q, k, v, dout, *, causal, scale=None, backward=True):
    """Runs fwd (and bwd) through the op and applies the rule to out, lse (and dq, dk, dv)."""
    dtype, head_dim = q.dtype, q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out, lse = poisoned_fwd(q, k, v, scale, causal)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    ref = attention_ref(q, k, v, dout if backward else None, scale=scale, causal=causal)
    pt = attention_ref(q, k, v, dout if backward else None, scale=scale, causal=causal, compute_dtype=dtype)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, rounding_floor(ref.lse, torch.float32), "lse")
    if not backward:
        return out, lse, None
    grads = run_backward_or_skip(head_dim, poisoned_bwd, dout, q, k, v, out, lse, scale, causal)
    for name, ours, inp, r, p in zip(("dq", "dk", "dv"), grads, (q, k, v), (ref.dq, ref.dk, ref.dv),
                                     (pt.dq, pt.dk, pt.dv)):
        assert ours.dtype == dtype and ours.shape == inp.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
        assert ours.stride() == token_major_strides(inp.shape), f"{name}: strides {ours.stride()}, not the fake's"
        assert_within_rule(ours, r, p, GRAD_FACTOR, rounding_floor(r, dtype), name)
    return out, lse, grads


def _case(dtype, layout, n_q, n_k, head_dim, causal):
    name = f"{'fp16' if dtype == FP16 else 'bf16'}-{layout}-{n_q}x{n_k}-d{head_dim}-{'causal' if causal else 'full'}"
    return pytest.param(dtype, layout, n_q, n_k, head_dim, causal, id=name)


def _sweep():
    """Full cross of the core axes (lengths x head dim x causal) in fp16 contiguous, then smaller crosses for
    bf16 (a dtype changes the mma instruction and conversions) and for transposed views (strides)."""
    core = [_case(FP16, "contiguous", nq, nk, d, c)
            for (nq, nk), d, c in itertools.product(LENGTHS, HEAD_DIMS, (False, True))]
    bf16 = [_case(BF16, "contiguous", nq, nk, d, c)
            for (nq, nk), d, c in itertools.product(((1, 1), (113, 203), (203, 113), (1023, 1024)), HEAD_DIMS,
                                                    (False, True))]
    strided = [_case(dt, "transposed", nq, nk, d, c)
               for dt, (nq, nk), d, c in itertools.product((FP16, BF16), ((97, 97), (203, 113)), HEAD_DIMS,
                                                           (False, True))]
    return core + bf16 + strided


@pytest.mark.parametrize("dtype,layout,n_q,n_k,head_dim,causal", _sweep())
def test_fwd_bwd_against_reference(dtype, layout, n_q, n_k, head_dim, causal):
    seed = seed_from(dtype, layout, n_q, n_k, head_dim, causal)
    q, k, v, dout = make_inputs(BATCH, HEADS, n_q, n_k, head_dim, dtype, layout, seed)
    check_against_reference(q, k, v, dout, causal=causal)


# Between the kernels' head dims: run zero-padded to the next one (validate.kernel_head_dim), both passes.
PADDED_HEAD_DIMS = (8, 20, 80, 112, 160, 200)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", PADDED_HEAD_DIMS)
@pytest.mark.parametrize("dtype,layout", [(FP16, "contiguous"), (BF16, "transposed")])
def test_head_dims_between_the_kernels(dtype, layout, head_dim, causal):
    q, k, v, dout = make_inputs(BATCH, HEADS, 113, 203, head_dim, dtype, layout,
                                seed_from(dtype, layout, head_dim, causal))
    has_backward = kernel_head_dim(head_dim) in BACKWARD
    out, lse, _ = check_against_reference(q, k, v, dout, causal=causal, backward=has_backward)
    assert out.is_contiguous()
    if not has_backward:
        with pytest.raises(NotImplementedError, match=f"head_dim {head_dim} has a forward kernel only; the backward "
                                                      f"supports head dims up to 128"):
            bwd_op(dout, q, k, v, out, lse, 1.0 / math.sqrt(head_dim), causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_token_major_out(head_dim, with_bias, causal):
    """token_major_out=True: out in (B, Nq, H, D) memory with the contiguous call's values (the same kernels write
    through other strides), on the plain runner (the second call) and the general path (a bias; d80, which mma.sync pads);
    the backward from it gives the contiguous out's gradients (dq to a few ulps: its fp32 adds run in any order)."""
    q, k, v, dout = make_inputs(BATCH, HEADS, 203, 113, head_dim, BF16, "transposed",
                                seed_from(head_dim, with_bias, causal))
    bias = torch.randn(1, HEADS, 203, 113, device="cuda", dtype=BF16) if with_bias else None
    scale = 1.0 / math.sqrt(head_dim)
    op_fwd, op_bwd = torch.ops.cupyflash.flash_attn_fwd, torch.ops.cupyflash.flash_attn_bwd
    want, want_lse = op_fwd(q, k, v, bias, scale, causal)
    want_grads = op_bwd(dout, q, k, v, bias, want, want_lse, scale, causal)[:3]
    for _ in range(2):
        poison_cuda_allocator(nbytes(want.shape, BF16), nbytes(want_lse.shape, torch.float32))
        out, lse = op_fwd(q, k, v, bias, scale, causal, token_major_out=True)
        assert out.stride() == token_major_strides(out.shape)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        grads = op_bwd(dout, q, k, v, bias, out, lse, scale, causal)[:3]
        for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
            assert_close_ulps(g, w, name)


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_hopper = pytest.mark.skipif(not _is_hopper(), reason="the Hopper kernels run on sm_90 only; elsewhere the "
                                                            "mma.sync kernels take every call the sweep makes")


@needs_hopper
@pytest.mark.parametrize("n_q,n_k", [(256, 256), (640, 640), (1023, 1024), (517, 300)])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_forward_q_block_pairs_equal_one_per_thread_block(n_q, n_k, head_dim, causal, monkeypatch):
    """Two Q blocks per thread block (plan.PAIR_MAX_ROWS: n - 1 - x, then x) give bit for bit the outputs and LSE of
    one per thread block: each Q block is computed alike, only the thread block that runs it changes. Odd and even
    block counts, and Q blocks that see no key (n_q - n_k > Br, causal)."""
    q, k, v, _ = make_inputs(1, HEADS, n_q, n_k, head_dim, BF16, "contiguous", seed_from("pairs", n_q, head_dim))

    def forget_plans():  # every cache of plans and runners, so that the next call plans afresh
        plan.plan_for.cache_clear()
        cuda_path._KNOWN.clear()
        cupyflash.torch_op._PLAIN_FORWARDS.clear()

    def run():
        forget_plans()
        poison_cuda_allocator()
        out = fwd_op(q, k, v, head_dim ** -0.5, causal)
        (p,) = [p for p in cuda_path._KNOWN.values() if p.layout.kernel == "fwd"]
        assert p.family == plan.HOPPER
        return out, p.steps[-1].grid[0], math.ceil(n_q / p.tiles.Br)

    paired, grid, q_blocks = run()
    assert grid == math.ceil(q_blocks / 2)
    monkeypatch.setattr(plan, "PAIR_MAX_ROWS", 0)
    try:
        single, grid, q_blocks = run()
    finally:
        forget_plans()
    assert grid == q_blocks
    assert torch.equal(paired[0], single[0]) and torch.equal(paired[1], single[1])


@needs_hopper
@pytest.mark.parametrize("dtype,layout,n_q,n_k", [(BF16, "contiguous", 4097, 4097), (FP16, "transposed", 4500, 5003),
                                                  (BF16, "transposed", 6000, 4211)])
def test_hopper_causal_d64_past_the_pairs_takes_the_tall_tile(dtype, layout, n_q, n_k):
    """The causal d64 forward past plan.PAIR_MAX_ROWS query rows runs on 192-row Q blocks (jit.Variant.tall): the
    rule against the fp32 reference, forward and backward (its LSE), with Nq != Nk both ways (6000 x 4211: Q blocks
    at the top that see no key)."""
    q, k, v, dout = make_inputs(1, 2, n_q, n_k, 64, dtype, layout, seed_from("tall", n_q, n_k, layout))
    cuda_path._KNOWN.clear()  # so that the plan this call makes is the one found below
    cupyflash.torch_op._PLAIN_FORWARDS.clear()
    check_against_reference(q, k, v, dout, causal=True)
    (p,) = [p for p in cuda_path._KNOWN.values() if p.layout.kernel == "fwd"]
    assert p.family == plan.HOPPER and p.variant.tall and p.tiles.Br == 192


@needs_hopper
@pytest.mark.parametrize("head_dim", sorted(FORWARD_SM90))
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_hopper_kernels_take_plain_calls(layout, head_dim, caplog, monkeypatch):
    """On sm_90 the sweep's 16-bit plain and causal calls of the Hopper tables' head dims run on the Hopper kernels
    (no fallback line in the log; a head dim the Hopper backward lacks says so for the backward); with
    CUPYFLASH_SM90=0 they run on mma.sync and the log says why, for each pass."""
    q, k, v, dout = make_inputs(BATCH, HEADS, 97, 203, head_dim, BF16, layout, seed_from("hopper", layout, head_dim))

    def fallbacks():
        caplog.clear()
        with caplog.at_level("DEBUG", logger="cupyflash.launch"):
            out, lse = fwd_op(q, k, v, 0.1, True)
            bwd_op(dout, q, k, v, out, lse, 0.1, True)
        return [r.getMessage() for r in caplog.records if "on mma.sync" in r.getMessage()]

    no_hopper_backward = [] if head_dim in BACKWARD_SM90 else [
        f"backward on mma.sync: head_dim {head_dim}: it takes {tuple(BACKWARD_SM90)}"]
    assert fallbacks() == no_hopper_backward
    monkeypatch.setenv(launch.SM90_ENV, "0")
    assert fallbacks() == [f"forward on mma.sync: {launch.SM90_ENV}=0", f"backward on mma.sync: {launch.SM90_ENV}=0"]


@needs_hopper
@pytest.mark.parametrize("dtype,layout,n_q,n_k,head_dim,causal", [
    _case(dt, layout, nq, nk, d, c) for dt, layout, (nq, nk), d, c in itertools.product(
        (FP16, BF16), ("contiguous", "transposed"), ((1, 1), (113, 203), (203, 113), (1023, 1024)), sorted(FORWARD_SM90),
        (False, True))])
def test_mma_sync_kernels_on_hopper(dtype, layout, n_q, n_k, head_dim, causal, monkeypatch):
    """The calls the Hopper kernels take in the main sweep, run on the mma.sync kernels instead (CUPYFLASH_SM90=0):
    they serve them on every other GPU."""
    monkeypatch.setenv(launch.SM90_ENV, "0")
    q, k, v, dout = make_inputs(BATCH, HEADS, n_q, n_k, head_dim, dtype, layout,
                                seed_from("mma", dtype, layout, n_q, n_k, head_dim, causal))
    check_against_reference(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("n_q,n_k", [(203, 113), (512, 64)])  # (512, 64): whole query tiles see no key
def test_rows_without_keys(n_q, n_k, head_dim):
    """Causal with Nq > Nk: query i < Nq - Nk sees no key, so out = 0, lse = +inf and dq = 0 there."""
    q, k, v, dout = make_inputs(BATCH, HEADS, n_q, n_k, head_dim, FP16, "contiguous", seed_from(n_q, n_k, head_dim))
    scale = 1.0 / math.sqrt(head_dim)
    empty = n_q - n_k
    keep = causal_keep_mask(n_q, n_k, "cuda")  # (Nq, Nk)
    assert not keep[:empty].any() and keep[empty:].any(dim=-1).all()
    out, lse = poisoned_fwd(q, k, v, scale, True)
    assert torch.equal(out[:, :, :empty], torch.zeros_like(out[:, :, :empty])), "out must be 0 for rows with no key"
    assert torch.equal(lse[:, :, :empty], torch.full_like(lse[:, :, :empty], float("inf"))), \
        "lse must be +inf for rows with no key"
    assert torch.isfinite(lse[:, :, empty:]).all() and torch.isfinite(out).all()
    dq, dk, dv = run_backward_or_skip(head_dim, poisoned_bwd, dout, q, k, v, out, lse, scale, True)
    assert torch.equal(dq[:, :, :empty], torch.zeros_like(dq[:, :, :empty])), "dq must be 0 for rows with no key"
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_q,n_k", [(97, 203), (1023, 1024)])
@pytest.mark.parametrize("batch,heads", [(1, 1), (4, 16)])
def test_batch_and_heads(batch, heads, n_q, n_k, head_dim, causal):
    """Grid mapping over (batch, heads): a single program, and many (B·H = 64) with odd lengths."""
    seed = seed_from(batch, heads, n_q, n_k, head_dim, causal)
    q, k, v, dout = make_inputs(batch, heads, n_q, n_k, head_dim, BF16, "contiguous", seed)
    check_against_reference(q, k, v, dout, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_explicit_scale(scale, causal):
    """A scale other than 1/sqrt(D) reaches the kernels (folded into exp2 there)."""
    q, k, v, dout = make_inputs(BATCH, HEADS, 113, 203, 64, FP16, "contiguous", seed_from(scale, causal))
    check_against_reference(q, k, v, dout, causal=causal, scale=scale)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("causal", [False, True])
def test_autograd_matches_op(causal, layout):
    """cupyflash.flash_attention + autograd (strided dout included) gives the op's out and gradients."""
    q, k, v, dout = make_inputs(BATCH, HEADS, 203, 113, 64, BF16, layout, seed_from("autograd", causal, layout))
    out_op, _, grads_op = check_against_reference(q, k, v, dout, causal=causal)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = cupyflash.flash_attention(*leaves, causal=causal)
    out.backward(dout)
    assert_close_ulps(out, out_op, "out")
    for name, leaf, g in zip(("dq", "dk", "dv"), leaves, grads_op):
        assert_close_ulps(leaf.grad, g, name)


@pytest.mark.parametrize("nbytes_", [2 * 3 * 17 * 64 * 2, 2 * 3 * 1023 * 128 * 2])  # small pool, large pool
def test_poison_reaches_fresh_allocations(nbytes_):
    """The poisoning the checks rely on: a fresh torch allocation of a poisoned size starts as NaN."""
    poison_cuda_allocator(nbytes_)
    fresh = torch.empty(nbytes_ // 2, dtype=torch.float16, device="cuda")
    assert torch.isnan(fresh).all()


def test_current_stream_is_used():
    """The op runs on torch.cuda.current_stream(): inputs are written on a side stream after a ~tens of ms
    GPU sleep, and the op is called on that stream; a launch on any other stream reads the NaN placeholders."""
    n, head_dim = 256, 64
    scale = 1.0 / math.sqrt(head_dim)
    fresh = make_inputs(BATCH, HEADS, n, n, head_dim, FP16, "contiguous", seed_from("stream"))
    q, k, v, dout = (torch.full_like(t, float("nan")) for t in fresh)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        poison_cuda_allocator(nbytes(q.shape, q.dtype), nbytes(q.shape[:-1], torch.float32))  # before the sleep:
        # empty_cache synchronizes the device, which would hide a wrong-stream launch
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time at ~2 GHz
        for dst, src in zip((q, k, v, dout), fresh):
            dst.copy_(src)
        out, lse = fwd_op(q, k, v, scale, True)
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, scale, True)
    torch.cuda.current_stream().wait_stream(side)
    ref = attention_ref(*fresh, scale=scale, causal=True)
    pt = attention_ref(*fresh, scale=scale, causal=True, compute_dtype=FP16)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, FP16), "out")
    assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, rounding_floor(ref.lse, torch.float32), "lse")
    for name, ours, r, p in zip(("dq", "dk", "dv"), (dq, dk, dv), (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(ours, r, p, GRAD_FACTOR, rounding_floor(r, FP16), name)


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_graph_capture_and_replay(causal):
    """fwd + bwd captured in one CUDA graph (after warm-up on a side stream, so JIT compilation happens
    outside the capture) and replayed on new inputs copied into the static tensors, against the eager op."""
    n, head_dim, dtype = 197, 64, BF16
    scale = 1.0 / math.sqrt(head_dim)
    first = make_inputs(BATCH, HEADS, n, n, head_dim, dtype, "contiguous", seed_from("graph", causal, 0))
    static = [t.clone().requires_grad_() for t in first[:3]]
    static_dout = first[3].clone()

    def step():
        out = cupyflash.flash_attention(*static, causal=causal)
        return (out, *torch.autograd.grad(out, static, static_dout))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = step()

    for replay in (1, 2):
        new = make_inputs(BATCH, HEADS, n, n, head_dim, dtype, "contiguous", seed_from("graph", causal, replay))
        with torch.no_grad():
            for dst, src in zip((*static, static_dout), new):
                dst.copy_(src)
            for t in static_results:
                t.fill_(float("nan"))  # the replay must rewrite every output
        graph.replay()
        torch.cuda.synchronize()
        leaves = [t.clone().requires_grad_() for t in new[:3]]
        eager_out = cupyflash.flash_attention(*leaves, causal=causal)
        eager = (eager_out, *torch.autograd.grad(eager_out, leaves, new[3]))
        ref = attention_ref(*new, scale=scale, causal=causal)
        pt = attention_ref(*new, scale=scale, causal=causal, compute_dtype=dtype)
        for name, got, want, r, p, factor in zip(
                ("out", "dq", "dk", "dv"), static_results, eager, (ref.out, ref.dq, ref.dk, ref.dv),
                (pt.out, pt.dq, pt.dk, pt.dv), (OUT_FACTOR, GRAD_FACTOR, GRAD_FACTOR, GRAD_FACTOR)):
            assert_close_ulps(got, want, f"replay {replay} {name} vs eager")
            assert_within_rule(got, r, p, factor, rounding_floor(r, dtype), f"replay {replay} {name}")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_compile_fullgraph(causal):
    """cupyflash.flash_attention inside torch.compile(fullgraph=True) on a model-shaped block (fused qkv
    projection output viewed as (B, N, 3, H, D)), with backward, against eager and the reference."""
    torch._dynamo.reset()
    batch, n, heads, head_dim, dtype = 2, 197, 4, 64, BF16

    def attention_block(x):  # x: (B, N, 3·H·D)
        q, k, v = x.view(batch, n, 3, heads, head_dim).unbind(2)  # each (B, N, H, D)
        out = cupyflash.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        causal=causal)  # (B, H, N, D)
        return out.transpose(1, 2).reshape(batch, n, heads * head_dim)  # (B, N, H·D)

    gen = torch.Generator(device="cuda").manual_seed(seed_from("compile", causal))
    x = torch.randn(batch, n, 3 * heads * head_dim, generator=gen, device="cuda", dtype=dtype)
    grad_y = torch.randn(batch, n, heads * head_dim, generator=gen, device="cuda", dtype=dtype)
    compiled = torch.compile(attention_block, fullgraph=True)
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_c, y_e = compiled(x_c), attention_block(x_e)
    (dx_c,), (dx_e,) = torch.autograd.grad(y_c, x_c, grad_y), torch.autograd.grad(y_e, x_e, grad_y)
    assert_close_ulps(y_c, y_e, "compiled out vs eager")
    assert_close_ulps(dx_c, dx_e, "compiled dx vs eager")

    q, k, v = (t.transpose(1, 2) for t in x.view(batch, n, 3, heads, head_dim).unbind(2))  # (B, H, N, D)
    dout = grad_y.view(batch, n, heads, head_dim).transpose(1, 2)  # (B, H, N, D)
    scale = 1.0 / math.sqrt(head_dim)
    ref = attention_ref(q, k, v, dout, scale=scale, causal=causal)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype)
    out_c = y_c.view(batch, n, heads, head_dim).transpose(1, 2)  # (B, H, N, D)
    assert_within_rule(out_c, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "compiled out")
    for name, g, r, p in zip(("dq", "dk", "dv"), dx_c.view(batch, n, 3, heads, head_dim).unbind(2),
                             (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(g.transpose(1, 2), r, p, GRAD_FACTOR, rounding_floor(r, dtype), f"compiled {name}")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_cuda(causal, layout):
    """Schema, fake (meta) outputs incl. strides, autograd registration and AOT dispatch on CUDA inputs."""
    q, k, v, dout = make_inputs(2, 2, 65, 65, 64, FP16, layout, seed_from("opcheck", causal, layout))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.cupyflash.flash_attn_fwd.default, (*leaves, None, 0.125, causal))
    out, lse = fwd_op(q, k, v, 0.125, causal)
    torch.library.opcheck(torch.ops.cupyflash.flash_attn_bwd.default, (dout, q, k, v, None, out, lse, 0.125, causal))


def test_memory_linear_in_seqlen():
    """B=1, H=1, N=65536, D=64 bf16 causal fwd+bwd: an N x N intermediate would need 8 GiB (bf16) or 16 GiB
    (fp32); the peak growth over the inputs stays under 1 GiB in both torch's and CuPy's allocators. Rows at
    both ends (whose dq depends only on keys the reference can afford) are checked against the reference."""
    import cupy

    n, head_dim, dtype, rows = 65536, 64, BF16, 256
    scale = 1.0 / math.sqrt(head_dim)
    q, k, v, dout = make_inputs(1, 1, n, n, head_dim, dtype, "contiguous", seed_from("memory"))
    torch.cuda.synchronize()
    cupy_pool = cupy.get_default_memory_pool()
    cupy_before = cupy_pool.total_bytes()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = cupyflash.flash_attention(*leaves, causal=True)
    out.backward(dout)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    cupy_growth = cupy_pool.total_bytes() - cupy_before
    assert growth < 2**30, f"torch peak memory grew by {growth / 2**20:.0f} MiB for N={n}"
    assert cupy_growth < 2**30, f"CuPy's pool grew by {cupy_growth / 2**20:.0f} MiB for N={n}"
    grads = [t.grad for t in leaves]
    assert not torch.isnan(out).any() and not any(torch.isnan(g).any() for g in grads)

    # First rows: query i < rows sees keys 0..i only. Last rows: bottom-right alignment of a (rows, N) problem.
    for name, sl, k_sl in (("first rows", slice(0, rows), slice(0, rows)), ("last rows", slice(n - rows, n), slice(0, n))):
        ref = attention_ref(q[:, :, sl], k[:, :, k_sl], v[:, :, k_sl], dout[:, :, sl], scale=scale, causal=True)
        pt = attention_ref(q[:, :, sl], k[:, :, k_sl], v[:, :, k_sl], dout[:, :, sl], scale=scale, causal=True,
                           compute_dtype=dtype)
        assert_within_rule(out[:, :, sl], ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), f"out {name}")
        assert_within_rule(grads[0][:, :, sl], ref.dq, pt.dq, GRAD_FACTOR, rounding_floor(ref.dq, dtype), f"dq {name}")
