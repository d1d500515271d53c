"""The rebuild rule (cupyflash/cpu_attention.py) in the CUDA backward: rows whose logits are all huge negatives,
whose saved fp32 lse is too coarse to rebuild P = exp(S - lse) from.

- Left padding with a causal mask written as an additive finfo.min bias, as transformers builds it: in bf16 the
  padded rows are masked only by biases <= -1e30 (every logit MASKED_LOGIT, P = 1/n only to ~2.4e-4 from the lse);
  in fp16, finfo.min = -65504 is a finite fill whose lse fp32 holds to ~2^-8 in log2 units.
- Rows filled entirely with -1e9: every logit rounds to one fp32 value (ulp 128 at 1.44e9 in log2 units), so
  lse2 = m2 + log2 n rounds back to m2 and exp2(S2 - lse2) gives P = 1 for every key instead of 1/n. Before the
  kernels had the rule (backward calls with a bias: the forward's stats pass writes the rows' (m, log2 l)), dV, dK and
  dQ through such rows were n times too large: test_rows_filled_with_minus_1e9 failed on every case.

Both backward families: the Hopper kernels (sm_90) and mma.sync (launch.SM90_ENV=0). Gradients (dq, dk, dv, dbias)
against the CPU path in fp64 on the GPU with the tolerance rule (the same-dtype PyTorch math: reference.attention_ref).
"""
from __future__ import annotations

import math

import pytest
import torch

from cupyflash import cpu_attention, launch
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_within_rule, attention_ref, draw_inputs, rounding_floor,
                       seed_from)
from test_gpu_features import run_bwd, run_fwd

pytestmark = pytest.mark.gpu

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FAMILIES = ["hopper", "mma.sync"]


@pytest.fixture(autouse=True)
def rebuild_rule_on(monkeypatch):
    """The rule's default, whatever the environment says."""
    monkeypatch.delenv(launch.LSE_REBUILD_ENV, raising=False)


@pytest.fixture
def family(request, monkeypatch):
    """The backward family under test: the Hopper kernels need sm_90; mma.sync is forced with launch.SM90_ENV=0."""
    if request.param == "hopper" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper kernels run on sm_90 only")
    if request.param == "mma.sync":
        monkeypatch.setenv(launch.SM90_ENV, "0")
    return request.param


def check_against_fp64(q, k, v, dout, bias, causal):
    """out, lse, dq, dk, dv, dbias of the op against the CPU path in fp64 on the GPU, within the tolerance rule
    (2x / 3x the error of the same-dtype PyTorch math, whose bias is clamped to q's dtype's range, plus the rounding
    floor). Returns the op's (out, lse, dq, dk, dv, dbias)."""
    dtype, scale = q.dtype, 1.0 / math.sqrt(q.shape[-1])
    out, lse = run_fwd(q, k, v, bias, scale, causal, (-1, -1), 0.0, 0)
    dq, dk, dv, dbias = run_bwd(dout, q, k, v, bias, out, lse, scale, causal, (-1, -1), 0.0, 0, True)
    q64, k64, v64, dout64, bias64 = (t.detach().to(FP64) for t in (q, k, v, dout, bias))
    out64, lse64 = cpu_attention.forward(q64, k64, v64, bias64, scale, causal)
    ref_grads = cpu_attention.backward(dout64, q64, k64, v64, bias64, out64, lse64, scale, causal, bias_grad=True)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype,
                       bias=bias.clamp(min=torch.finfo(dtype).min), bias_grad=True)
    assert_within_rule(out, out64, pt.out, OUT_FACTOR, rounding_floor(out64, dtype), "out")
    assert_within_rule(lse, lse64, pt.lse, OUT_FACTOR, rounding_floor(lse64, FP32), "lse")
    for name, ours, ref, same in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), ref_grads,
                                     (pt.dq, pt.dk, pt.dv, pt.dbias)):
        assert_within_rule(ours, ref, same, GRAD_FACTOR, rounding_floor(ref, dtype), name)
    return out, lse, dq, dk, dv, dbias


def padded_causal_bias(lengths, n: int, dtype) -> torch.Tensor:
    """(B, 1, N, N) additive, as transformers builds it: 0 where query i may see key j (j <= i, j not left padding),
    finfo.min of `dtype` elsewhere."""
    pad = torch.arange(n, device="cuda") < (n - torch.tensor(lengths, device="cuda")).unsqueeze(1)  # (B, N)
    keep = torch.ones(n, n, dtype=torch.bool, device="cuda").tril() & ~pad[:, None, None, :]  # (B, 1, N, N)
    return torch.zeros(keep.shape, dtype=dtype, device="cuda").masked_fill(~keep, torch.finfo(dtype).min)


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_left_padding_with_finfo_min_causal_bias(dtype, head_dim, family):
    n, lengths = 203, (203, 131)
    q, k, v, dout = draw_inputs(len(lengths), 4, 2, n, n, head_dim, dtype, "contiguous",
                                seed_from("padding", dtype, head_dim, family))
    bias = padded_causal_bias(lengths, n, dtype)
    _, lse, *_ = check_against_fp64(q, k, v, dout, bias, causal=False)
    assert (lse[1, :, : n - lengths[1]] < cpu_attention.LSE_REBUILD).all(), "padded rows under the rebuild rule"


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_rows_filled_with_minus_1e9(dtype, head_dim, family):
    """Rows whose every key has bias -1e9 (fp16 cannot hold it: an fp32 bias there) beside rows of a random bias;
    in batch 1, head 2 every row is so filled, so P = 1/Nk there and dV of each key is sum_i dO_i / Nk."""
    b, h, n_q, n_k = 2, 4, 113, 203
    bias_dtype = BF16 if dtype == BF16 else FP32
    seed = seed_from("-1e9 rows", dtype, head_dim, family)
    q, k, v, dout = draw_inputs(b, h, h, n_q, n_k, head_dim, dtype, "contiguous", seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    bias = (2.0 * torch.randn(b, h, n_q, n_k, generator=gen, device="cuda")).to(bias_dtype)
    bias[0, :, [0, 7, 50, 112]] = -1e9
    bias[1, 2] = -1e9
    _, lse, _, _, dv, _ = check_against_fp64(q, k, v, dout, bias, causal=False)
    assert (lse[1, 2] < cpu_attention.LSE_REBUILD).all()
    uniform = (dout[1, 2].double().sum(dim=0) / n_k).expand(n_k, head_dim)  # (Nk, D)
    err = (dv[1, 2].double() - uniform).abs().max().item()
    assert err <= 2 * rounding_floor(uniform, dtype), f"dV of a head whose every row is -1e9: max error {err:.3e}"
