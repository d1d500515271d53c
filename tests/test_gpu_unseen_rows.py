"""The op's ``unseen_rows`` on the GPU (kernels_cu/unseen_rows.cuh): rows that see no key under a causal mask and a
left-padded key mask get eager's uniform row and its gradients (a fill that replaced the scores, or was added to
them), on the Hopper kernels' key-mask path and on mma.sync; out, dq, dk, dv against eager in fp64 within the
tolerance rule (2x, 3x for gradients, eager's same-dtype error, plus the rounding floor); grouped-query heads, odd
lengths, Nq != Nk, a head dim the kernels pad, outputs on poisoned memory, fresh inputs per case."""
from __future__ import annotations

import pytest
import torch

import cupyflash.torch_op  # noqa: F401  (registers torch.ops.cupyflash.*)
from cupyflash import launch
from cupyflash import unseen_rows as unseen
from cupyflash.unseen_rows import UNIFORM, UNIFORM_SCORES
from reference import assert_within_rule, nbytes, poison_cuda_allocator, rounding_floor, seed_from
from test_unseen_rows import eager, left_padded_keep

pytestmark = pytest.mark.gpu

FP16, BF16 = torch.float16, torch.bfloat16
FWD, BWD = torch.ops.cupyflash.flash_attn_fwd, torch.ops.cupyflash.flash_attn_bwd
# (B, H, H_kv, Nq, Nk, D): the lengths of the rule's sweep
SHAPES = [(3, 4, 2, 17, 17, 64), (3, 4, 1, 113, 203, 128), (2, 8, 2, 1023, 1024, 128), (2, 4, 4, 97, 97, 80),
          (3, 6, 3, 20, 17, 64), (2, 4, 2, 300, 260, 32)]


@pytest.mark.parametrize("family", ["hopper", "mma.sync"])
@pytest.mark.parametrize("mode", [UNIFORM, UNIFORM_SCORES], ids=["replaced", "added"])
@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_without_keys_as_eager(shape, dtype, mode, family, monkeypatch):
    if family == "mma.sync":
        monkeypatch.setenv(launch.SM90_ENV, "0")
    batch, heads, kv_heads, n_q, n_k, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed_from(shape, dtype, mode, family))

    def draw(*size):
        return torch.randn(*size, generator=gen, device="cuda", dtype=torch.float64)

    q64, k64, v64 = draw(batch, heads, n_q, d), draw(batch, kv_heads, n_k, d), draw(batch, kv_heads, n_k, d)
    dout64 = draw(batch, heads, n_q, d)
    lengths = [n_k, max(1, n_k // 3), 1][:batch]
    keys, keep = left_padded_keep(lengths, n_q, n_k, "cuda")
    scale = d ** -0.5
    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, dout64))

    poison_cuda_allocator(nbytes(q.shape, dtype), nbytes(q.shape[:3], torch.float32))  # out, lse
    out, lse = FWD(q, k, v, keys, scale, True, unseen_rows=mode)
    rows = torch.isposinf(lse)
    assert int(rows.sum()) == int((~keep.any(-1)).sum()) * heads > 0
    poison_cuda_allocator(*(nbytes(t.shape, dtype) for t in (q, k, v)))  # dq, dk, dv
    dq, dk, dv, _ = BWD(dout, q, k, v, keys, out, lse, scale, True, unseen_rows=mode)
    torch.cuda.synchronize()

    ref_inputs = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref = eager(*ref_inputs, keep, scale, mode)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout64)
    same_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    same = eager(*same_inputs, keep, scale, mode)
    same_grads = torch.autograd.grad(same, same_inputs, dout)
    assert_within_rule(out, ref, same, 2.0, rounding_floor(ref, dtype), "out")
    for name, g, r, e in zip("qkv", (dq, dk, dv), ref_grads, same_grads):
        assert_within_rule(g, r, e, 3.0, rounding_floor(r, dtype), f"d{name}")


@pytest.mark.parametrize("mode", [UNIFORM, UNIFORM_SCORES], ids=["replaced", "added"])
def test_no_unseen_row_changes_nothing(mode):
    """Right padding under a causal mask: every row sees a key, the launches end at once and the outputs are the
    op's without the option, bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    q, k, v, dout = (torch.randn(2, 8, 300, 64, generator=gen, device="cuda").to(BF16) for _ in range(4))
    keys = left_padded_keep([300, 40], 300, 300, "cuda")[0].flip(-1)
    base = FWD(q, k, v, keys, 0.125, True)
    out, lse = FWD(q, k, v, keys, 0.125, True, unseen_rows=mode)
    assert torch.equal(out, base[0]) and torch.equal(lse, base[1])
    grads = BWD(dout, q, k, v, keys, out, lse, 0.125, True, unseen_rows=mode)[:3]
    assert all(torch.equal(a, b) for a, b in zip(grads, BWD(dout, q, k, v, keys, out, lse, 0.125, True)[:3]))


@pytest.mark.parametrize("d, d_v", [(64, 64), (40, 72), (192, 192), (256, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
def test_kernels_match_the_torch_formulas(d, d_v, dtype):
    """The kernels alone (cupyflash.unseen_rows.fill / backward on CUDA tensors) against the same formulas in torch
    on the CPU, both modes, at any head dim up to 256 (more than one pass of the Dv x D sums from 192 on), v with its
    own head dim, rows without keys scattered over heads and batch rows, one K/V head without any."""
    gen = torch.Generator().manual_seed(seed_from(d, d_v, dtype))
    batch, heads, kv_heads, n_q, n_k = 2, 6, 3, 300, 333
    q, dout, out, dq = (torch.randn(batch, heads, n_q, width, generator=gen).to(dtype)
                        for width in (d, d_v, d_v, d))
    k, v, dk, dv = (torch.randn(batch, kv_heads, n_k, width, generator=gen).to(dtype) for width in (d, d_v, d, d_v))
    lse = torch.randn(batch, heads, n_q, generator=gen)
    lse[torch.rand(lse.shape, generator=gen) < 0.3] = float("inf")
    lse[1, 2:4] = 1.0  # batch row 1, K/V head 1: every row sees a key
    for mode in (UNIFORM, UNIFORM_SCORES):
        cpu = [t.clone() for t in (out, dq, dk, dv)]
        gpu = [t.cuda() for t in (out, dq, dk, dv)]
        unseen.fill(cpu[0], lse, v, mode)
        unseen.fill(gpu[0], lse.cuda(), v.cuda(), mode)
        unseen.backward(*cpu[1:], dout, q, k, v, lse, 0.3, mode)
        unseen.backward(*gpu[1:], *(t.cuda() for t in (dout, q, k, v, lse)), 0.3, mode)
        for name, c, g in zip(("out", "dq", "dk", "dv"), cpu, gpu):
            tol = 2e-3 if dtype == torch.float32 else 1e-2  # fp32: TF32 tensor cores, as the attention kernels'
            torch.testing.assert_close(g.cpu(), c, atol=tol, rtol=tol, msg=lambda m: f"mode {mode}, {name}: {m}")
