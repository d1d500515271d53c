"""Context-parallel attention (cupyflash.distributed: ring and all-to-all) against single-process attention on the
full sequence (the plain op, CPU path): outputs and q/k/v gradients within the tolerance rule, fp64 reference.

Multi-rank cases run in groups of 2 and 4 processes on gloo over loopback. Starting a process and importing torch
takes seconds on a busy 2-core machine, so each group starts once (module-scoped fixture) and runs every case;
the processes are forked from a forkserver that imported torch and cupyflash once (a fresh process, never a fork
of pytest's, unlike the "fork" start method). Each rank records every case's outcome; the parametrised tests
read them, so a failure names its case and rank with the traceback.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cupyflash
from cupyflash.distributed import (ContextParallelAttention, check_shards, context_parallel_attention, gather_sequence,
                                   group_name)
from cupyflash.sequence_shards import chunks_of, shard_sequence, step_blocks, unshard_sequence
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_close_ulps, assert_within_rule, attention_ref, rounding_floor,
                       seed_from)

JOIN_TIMEOUT_S = 240  # a deadlocked ring fails the test instead of hanging CI


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype = torch.float32
    causal: bool = True
    layout: str = "zigzag"
    kv_heads: int = 4  # q has 4 heads: 2 is grouped-query
    softcap: float = 0.0
    chunk: int = 5  # sequence positions per chunk; the sequence is 2 · world · chunk long
    kv_chunk: int = 5  # k/v positions per chunk (non-causal cross-attention may differ)
    method: str = "ring"
    compiled: bool = False  # through ContextParallelAttention under torch.compile(fullgraph=True)
    worlds: tuple = (2, 4)  # group sizes it runs on


CASES = (
    Case("fp32-full", causal=False),
    Case("fp32-causal-zigzag"),
    Case("bf16-causal-zigzag-gqa", dtype=torch.bfloat16, kv_heads=2),
    Case("bf16-full-gqa", dtype=torch.bfloat16, causal=False, kv_heads=2),
    Case("fp32-causal-contiguous-gqa", layout="contiguous", kv_heads=2),
    Case("fp32-causal-softcap", softcap=2.0),
    Case("fp32-full-cross-lengths", causal=False, chunk=3, kv_chunk=7),
    Case("bf16-causal-zigzag-gqa-compiled", dtype=torch.bfloat16, kv_heads=2, compiled=True, worlds=(2,)),
    Case("a2a-fp32-causal-zigzag", method="all_to_all"),
    Case("a2a-bf16-causal-contiguous-gqa", dtype=torch.bfloat16, layout="contiguous", kv_heads=2,
         method="all_to_all", worlds=(2,)),  # 2 K/V heads split over 2 ranks, not 4
    Case("a2a-bf16-full", dtype=torch.bfloat16, causal=False, method="all_to_all"),
    Case("a2a-fp32-full-cross-lengths", causal=False, chunk=3, kv_chunk=7, method="all_to_all"),
)
FP64_CASE = Case("fp64-causal-zigzag-gqa", dtype=torch.float64, kv_heads=2)
# fp64 inputs: everything is fp64 but the lse, which the op keeps in fp32 (so the merge weights are fp32-exact).
FP64_TOL = 1e-6


def _full_inputs(case: Case, world: int):
    """Full-sequence q, k, v, dout (B=2, H=4, D=16), the same on every rank."""
    gen = torch.Generator().manual_seed(seed_from(case, world))
    n_q, n_k = 2 * world * case.chunk, 2 * world * case.kv_chunk
    q = torch.randn(2, 4, n_q, 16, generator=gen)
    k, v = (torch.randn(2, case.kv_heads, n_k, 16, generator=gen) for _ in range(2))
    dout = torch.randn(2, 4, n_q, 16, generator=gen)
    return [t.to(case.dtype) for t in (q, k, v, dout)]


def _plain(q, k, v, dout, case: Case):
    """out, dq, dk, dv of the plain op (CPU path) on the full sequence, in the inputs' dtype."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = cupyflash.flash_attention(q, k, v, causal=case.causal, softcap=case.softcap)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _sharded(q, k, v, dout, case: Case, rank: int, world: int):
    """out, dq, dk, dv of this rank's shards through the case's method."""
    q, k, v, dout = (shard_sequence(t, rank, world, layout=case.layout) for t in (q, k, v, dout))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    options = dict(causal=case.causal, layout=case.layout, method=case.method, softcap=case.softcap)
    if case.compiled:
        out = torch.compile(ContextParallelAttention(**options), fullgraph=True, backend="aot_eager")(q, k, v)
    else:
        out = context_parallel_attention(q, k, v, **options)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _check_case(case: Case, rank: int, world: int) -> None:
    q, k, v, dout = _full_inputs(case, world)
    ours = _sharded(q, k, v, dout, case, rank, world)
    names = ("out", "dq", "dk", "dv")
    if case.dtype == torch.float64:
        for name, got, want in zip(names, ours, _plain(q, k, v, dout, case)):
            torch.testing.assert_close(got, shard_sequence(want, rank, world, layout=case.layout),
                                       atol=FP64_TOL, rtol=FP64_TOL, msg=lambda m: f"{name}: {m}")
        return
    ref = _plain(*(t.double() for t in (q, k, v, dout)), case)  # the op computes fp64 inputs in fp64
    pt = attention_ref(q, k, v, dout, scale=1 / math.sqrt(16), causal=case.causal, compute_dtype=case.dtype,
                       softcap=case.softcap)
    for name, got, want, same_dtype in zip(names, ours, ref, (pt.out, pt.dq, pt.dk, pt.dv)):
        want, same_dtype = (shard_sequence(t, rank, world, layout=case.layout) for t in (want, same_dtype))
        assert_within_rule(got, want, same_dtype, OUT_FACTOR if name == "out" else GRAD_FACTOR,
                           rounding_floor(want, case.dtype), name)


def _check_refusals(rank: int, world: int) -> None:
    """Refused on every rank before any message is sent (the group stays in step)."""
    q, k, v = (torch.randn(1, 4, 4 * world + 1, 16) for _ in range(3))
    for method in ("ring", "all_to_all"):
        with pytest.raises(ValueError, match=r"q dim 2 \(local seqlen\) is \d+: the zigzag layout holds 2 equal"):
            context_parallel_attention(q, k, v, causal=True, method=method)
        with pytest.raises(ValueError, match=r"q dim 2 \(local seqlen\) is 4 but k's is 6"):
            context_parallel_attention(q[:, :, :4], k[:, :, :6], v[:, :, :6], causal=True, method=method)
        with pytest.raises(ValueError, match="takes no attn_bias"):
            context_parallel_attention(q, k, v, torch.zeros(1, 1, q.shape[2], q.shape[2] * world), method=method)
    with pytest.raises(ValueError, match=rf"k dim 1 \(heads\) is 1: method='all_to_all' splits the heads over {world}"):
        context_parallel_attention(q, k[:, :1], v[:, :1], method="all_to_all")
    check_shards(q=q, k=k)
    with pytest.raises(ValueError, match=r"q has shape \(1, 4, \d, 16\) on rank \d but \(1, 4, \d, 16\) on rank \d: "
                                         r"context-parallel attention needs every rank's shards to have the same shape"):
        check_shards(k=k, q=q[:, :, :4 + rank])
    with pytest.raises(ValueError, match=r"x dim 2 \(sequence\) has 30 entries: zigzag sharding over"):
        shard_sequence(torch.randn(1, 2, 30, 16), rank, world)
    full = torch.randn(1, 2, 8 * world, 16)
    for layout in ("zigzag", "contiguous"):
        shard = shard_sequence(full, rank, world, layout=layout)
        assert torch.equal(gather_sequence(shard, layout=layout), full)


def _run_group(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a group: every case, outcomes (\"ok\" or the traceback) to out_dir/rank{rank}.json."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    checks = {c.name: (lambda c=c: _check_case(c, rank, world)) for c in CASES + (FP64_CASE,) if world in c.worlds}
    checks["refusals-gather-check-shards"] = lambda: _check_refusals(rank, world)
    outcomes = {}
    for name, check in checks.items():
        try:
            check()
            outcomes[name] = "ok"
        except Exception:
            outcomes[name] = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def group_outcomes(request, tmp_path_factory):
    """{rank: {case: "ok" or traceback}} from one group of `world` processes."""
    world = request.param
    out_dir = str(tmp_path_factory.mktemp(f"ring{world}"))
    # torch._dynamo: the custom ops' first call imports it (~800 modules, seconds), as does torch.compile.
    mp.set_forkserver_preload(["torch", "torch._dynamo", "torch._functorch.aot_autograd", "cupyflash.distributed",
                               __name__])
    context = mp.start_processes(_run_group, args=(world, _free_port(), out_dir), nprocs=world, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # one rank at a time
            if time.monotonic() >= deadline:
                pytest.fail(f"the group of {world} ranks did not finish in {JOIN_TIMEOUT_S} s (a deadlocked ring?)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    outcomes = {}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            outcomes[rank] = json.load(f)
    return outcomes


@pytest.mark.parametrize("name", [c.name for c in CASES + (FP64_CASE,)] + ["refusals-gather-check-shards"])
def test_matches_full_sequence(group_outcomes, name):
    if name not in group_outcomes[0]:
        pytest.skip(f"{name} runs on groups of {next(c.worlds for c in CASES if c.name == name)} ranks")
    failures = {rank: got[name] for rank, got in group_outcomes.items() if got[name] != "ok"}
    assert not failures, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failures.items())


# Single rank, in this process.

@pytest.fixture(scope="module")
def single_rank():
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["ring", "all_to_all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads,n_q,n_k", [(4, 13, 13), (2, 9, 21)])
def test_single_rank_is_the_plain_op(single_rank, method, dtype, causal, kv_heads, n_q, n_k):
    """Bit for bit, any lengths (seqlen_q ≠ seqlen_k with causal aligned bottom-right, as the op)."""
    gen = torch.Generator().manual_seed(seed_from(dtype, causal, kv_heads, n_q, n_k))
    q = torch.randn(2, 4, n_q, 16, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(2, kv_heads, n_k, 16, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    dout = torch.randn(2, 4, n_q, 16, generator=gen).to(dtype)
    ours = context_parallel_attention(q, k, v, causal=causal, method=method)
    plain = cupyflash.flash_attention(q, k, v, causal=causal)
    assert torch.equal(ours, plain)
    grads = zip(torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(plain, (q, k, v), dout))
    for name, (a, b) in zip("qkv", grads):
        assert torch.equal(a, b), f"d{name}: max difference {(a - b).abs().max().item():.3e}"


def test_compiled_without_graph_break(single_rank):
    """fullgraph=True: Dynamo traces through the layer (one custom op) and the function with the default group."""
    layer = ContextParallelAttention(causal=True)

    def block(q, k, v):
        return (layer(q * 2, k, v) + context_parallel_attention(q, k, v, method="all_to_all")).sin()

    q = torch.randn(1, 4, 12, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 16, requires_grad=True) for _ in range(2))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v), block(q, k, v)
    assert torch.equal(got, want)
    dout = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["ring_attn_fwd", "all_to_all_attn_fwd"])
def test_opcheck(single_rank, op):
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(getattr(torch.ops.cupyflash, op).default, (q, k, v, 0.25, True, 0.0, "zigzag",
                                                                      group_name(None)),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dropout_p=0.1), "takes no dropout"),
    (dict(window=(4, 0)), "takes no sliding window"),
    (dict(layout="striped"), "layout is 'striped'; expected one of 'zigzag', 'contiguous'"),
    (dict(method="ulysses"), "method is 'ulysses'; expected one of 'ring', 'all_to_all'"),
])
def test_refused_options(single_rank, kwargs, message):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=message):
        context_parallel_attention(q, q, q, causal=True, **kwargs)


# Layouts and block plans (no process group).

@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_roundtrip_and_positions(layout, world):
    n = 6 * world
    positions = torch.arange(n)
    shards = [shard_sequence(positions, r, world, layout=layout, dim=0) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout=layout, dim=0), positions)
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    if layout == "zigzag" and world > 1:  # rank r holds chunks r and 2P-1-r
        assert shards[0].tolist() == [0, 1, 2] + list(range(n - 3, n))


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_step_blocks_cover_the_causal_triangle_once(layout, world):
    """Over all ranks and ring steps, the blocks (a diagonal block counted as its lower triangle) cover every
    (query, key) pair with key <= query exactly once and nothing else."""
    per_rank = 2 if layout == "zigzag" else 1
    chunk = 3
    n_local = per_rank * chunk
    positions = [shard_sequence(torch.arange(per_rank * world * chunk), r, world, layout=layout, dim=0)
                 for r in range(world)]
    seen = torch.zeros(n_local * world, n_local * world, dtype=torch.int64)
    work = torch.zeros(world, world, dtype=torch.int64)  # (step, rank): pairs computed
    for rank in range(world):
        for step in range(world):
            kv_rank = (rank - step) % world
            for b in step_blocks(rank, kv_rank, world, layout, True, n_local, n_local):
                rows, keys = positions[rank][b.rows], positions[kv_rank][b.keys]
                pairs = torch.ones(len(rows), len(keys), dtype=torch.int64)
                seen[rows.unsqueeze(1), keys.unsqueeze(0)] += pairs.tril() if b.causal else pairs
                work[step, rank] += len(rows) * len(keys)
    assert torch.equal(seen, torch.ones_like(seen).tril())
    if layout == "zigzag":  # load-balanced: after the local step, every rank computes as much at every step
        assert (work[1:] == work[1:, :1]).all()


def test_zigzag_chunks():
    assert [chunks_of(r, 4, "zigzag") for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ring", "all_to_all"])
@pytest.mark.parametrize("causal", [False, True])
def test_single_rank_is_the_plain_op_on_cuda(single_rank, method, causal):
    """On one GPU, a group of one rank (no messages) gives the plain op's bits, forward and backward."""
    gen = torch.Generator(device="cuda").manual_seed(seed_from("cuda", causal))
    q = torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    k, v = (torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    dout = torch.randn_like(q)
    ours = context_parallel_attention(q, k, v, causal=causal, method=method)
    plain = cupyflash.flash_attention(q, k, v, causal=causal)
    assert torch.equal(ours, plain)
    grads = zip(torch.autograd.grad(ours, (q, k, v), dout), torch.autograd.grad(plain, (q, k, v), dout))
    for name, (a, b) in zip("qkv", grads):
        # dQ sums fp32 atomics in a varying order: a last-bit difference is the op's own run-to-run noise.
        if name == "q":
            assert_close_ulps(a, b, "dq")
        else:
            assert torch.equal(a, b), f"d{name}"
