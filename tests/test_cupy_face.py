"""The CuPy face (``cupyflash.cupy_api``): fp16 CuPy arrays against the torch op and the reference, and
bf16 torch tensors passed through DLPack (returned as torch tensors)."""
from __future__ import annotations

import math

import pytest
import torch

import cupyflash.torch_op  # noqa: F401  registers torch.ops.cupyflash.*
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_close_ulps, assert_within_rule, attention_ref,
                       rounding_floor, seed_from)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy_api():
    return pytest.importorskip("cupyflash.cupy_api", reason="cupyflash/cupy_api.py is not importable")


def _torch_inputs(n_q, n_k, head_dim, dtype, layout, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(n):
        if layout == "contiguous":
            return torch.randn(2, 3, n, head_dim, generator=gen, device="cuda", dtype=dtype)  # (B, H, N, D)
        return torch.randn(2, n, 3, head_dim, generator=gen, device="cuda", dtype=dtype).transpose(1, 2)

    return draw(n_q), draw(n_k), draw(n_k), draw(n_q)


def _check_rule(out, lse, grads, q, k, v, dout, scale, causal):
    dtype = q.dtype
    ref = attention_ref(q, k, v, dout, scale=scale, causal=causal)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=dtype)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, dtype), "out")
    assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, rounding_floor(ref.lse, torch.float32), "lse")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(g, r, p, GRAD_FACTOR, rounding_floor(r, dtype), name)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_q,n_k", [(113, 203), (203, 113)])
def test_cupy_fp16_matches_torch_op(cupy_api, n_q, n_k, head_dim, causal, layout):
    import cupy

    q, k, v, dout = _torch_inputs(n_q, n_k, head_dim, torch.float16, layout, seed_from("cupy", n_q, n_k, head_dim,
                                                                                      causal, layout))
    scale = 1.0 / math.sqrt(head_dim)
    torch.cuda.synchronize()  # inputs are written on torch's stream; CuPy launches on its own current stream
    qc, kc, vc, doc = (cupy.from_dlpack(t) for t in (q, k, v, dout))  # zero-copy views, strides kept
    out_c, lse_c = cupy_api.flash_attn_forward(qc, kc, vc, causal=causal)
    dq_c, dk_c, dv_c = cupy_api.flash_attn_backward(doc, qc, kc, vc, out_c, lse_c, causal=causal)
    cupy.cuda.get_current_stream().synchronize()
    for name, arr, like, dtype in (("out", out_c, q, cupy.float16), ("lse", lse_c, q[..., 0], cupy.float32),
                                   ("dq", dq_c, q, cupy.float16), ("dk", dk_c, k, cupy.float16),
                                   ("dv", dv_c, v, cupy.float16)):
        assert isinstance(arr, cupy.ndarray), f"{name}: {type(arr)}"
        assert arr.dtype == dtype and arr.shape == tuple(like.shape), f"{name}: {arr.dtype} {arr.shape}"
    out, lse, dq, dk, dv = (torch.from_dlpack(a) for a in (out_c, lse_c, dq_c, dk_c, dv_c))

    out_t, lse_t = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, causal)
    grads_t = torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out_t, lse_t, scale, causal)
    assert_close_ulps(out, out_t, "out vs torch op")
    assert_close_ulps(lse, lse_t, "lse vs torch op")
    for name, g, g_t in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_t):
        assert_close_ulps(g, g_t, f"{name} vs torch op")
    _check_rule(out, lse, (dq, dk, dv), q, k, v, dout, scale, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_torch_tensors_through_dlpack(cupy_api, head_dim, causal):
    """Objects with __dlpack__ (here torch bf16, which CuPy has no dtype for) come back as the same kind."""
    q, k, v, dout = _torch_inputs(97, 203, head_dim, torch.bfloat16, "contiguous", seed_from("dlpack", head_dim, causal))
    scale = 0.3
    out, lse = cupy_api.flash_attn_forward(q, k, v, scale=scale, causal=causal)
    dq, dk, dv = cupy_api.flash_attn_backward(dout, q, k, v, out, lse, scale=scale, causal=causal)
    torch.cuda.synchronize()
    for name, t, like, dtype in (("out", out, q, torch.bfloat16), ("lse", lse, q[..., 0], torch.float32),
                                 ("dq", dq, q, torch.bfloat16), ("dk", dk, k, torch.bfloat16),
                                 ("dv", dv, v, torch.bfloat16)):
        assert isinstance(t, torch.Tensor), f"{name}: got {type(t)}, expected torch.Tensor for torch inputs"
        assert t.dtype == dtype and t.shape == like.shape and t.is_cuda, f"{name}: {t.dtype} {tuple(t.shape)}"
    _check_rule(out, lse, (dq, dk, dv), q, k, v, dout, scale, causal)


def test_host_array_among_device_arrays_is_named(cupy_api):
    """A host (NumPy) k next to CuPy q and v: the error names k."""
    import cupy
    import numpy as np

    q = cupy.random.standard_normal((1, 2, 16, 64), dtype=cupy.float32).astype(cupy.float16)
    k = np.random.default_rng(0).standard_normal((1, 2, 16, 64)).astype(np.float16)
    with pytest.raises((TypeError, ValueError), match=r"(?is)(?=.*\bk\b)(?=.*(cuda|gpu|device|host|numpy))"):
        cupy_api.flash_attn_forward(q, k, q, causal=False)
