"""Bad input gets a clear error that names the tensor, the dimension and what was expected.

CPU (CI): the shared checks through ``TensorInfo`` (GPU-only rules included, as ``on_gpu=True`` with a
"cuda:0" device string), the torch op with CPU tensors, and the CUDA-only CuPy face given host arrays.
GPU: the same rules reached through the torch op with CUDA tensors.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cupyflash
import cupyflash.torch_op  # noqa: F401  registers torch.ops.cupyflash.*
from cupyflash.torch_op import why_unsupported
from cupyflash.validate import GPU_HEAD_DIMS, TensorInfo, check_attention_inputs

NQ, NK, D = 17, 29, 64
BASE = {
    "q": {"shape": (2, 3, NQ, D), "dtype": "float16", "device": "cuda:0"},
    "k": {"shape": (2, 3, NK, D), "dtype": "float16", "device": "cuda:0"},
    "v": {"shape": (2, 3, NK, D), "dtype": "float16", "device": "cuda:0"},
}


def _contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _specs(overrides):
    specs = {name: dict(spec) for name, spec in BASE.items()}
    for name, change in overrides.items():
        specs.setdefault(name, {"dtype": "float16", "device": "cuda:0"}).update(change)
    return specs


def _info(name, spec):
    return TensorInfo(name, tuple(spec["shape"]), tuple(spec.get("strides") or _contiguous_strides(spec["shape"])),
                      spec["dtype"], spec["device"])


def _check_infos(overrides, on_gpu, tf32_allowed=False):
    specs = _specs(overrides)
    bias = _info("attn_bias", specs["attn_bias"]) if "attn_bias" in specs else None
    check_attention_inputs(_info("q", specs["q"]), _info("k", specs["k"]), _info("v", specs["v"]), bias,
                           on_gpu=on_gpu, tf32_allowed=tf32_allowed)


def _call_torch_op_on_cpu(overrides):
    specs = _specs(overrides)
    t = {name: torch.randn(spec["shape"]).to(getattr(torch, spec["dtype"])) for name, spec in specs.items()}
    torch.ops.cupyflash.flash_attn_fwd(t["q"], t["k"], t["v"], t.get("attn_bias"), 0.125, False)


# (id, overrides, exception, message pattern): every pattern names the tensor and the dim/expectation.
STRUCTURAL = [
    ("q-rank", {"q": {"shape": (2, 3, NQ)}}, ValueError,
     r"q must be 4-D \(batch, heads, seqlen, head_dim\); got 3-D with shape \(2, 3, 17\)"),
    ("k-rank", {"k": {"shape": (1, 2, 3, NK, D)}}, ValueError, r"k must be 4-D .*got 5-D"),
    ("batch", {"k": {"shape": (4, 3, NK, D)}}, ValueError, r"batch \(dim 0\) must match: q has 2, k has 4, v has 2"),
    ("heads", {"v": {"shape": (2, 5, NK, D)}}, ValueError, r"k and v must have the same heads \(dim 1\): k has 3, v has 5"),
    ("gqa_heads", {"k": {"shape": (2, 2, NK, D)}, "v": {"shape": (2, 2, NK, D)}}, ValueError,
     r"heads \(dim 1\) of q must be a multiple of those of k and v \(grouped-query attention\): q has 3, k and v have 2"),
    ("kv-seqlen", {"v": {"shape": (2, 3, NK + 1, D)}}, ValueError,
     r"k and v must have the same seqlen \(dim 2\): k has 29, v has 30"),
    ("qk-head-dim", {"k": {"shape": (2, 3, NK, 32)}, "v": {"shape": (2, 3, NK, 32)}}, ValueError,
     r"q and k must have the same head_dim \(dim 3\): q has 64, k has 32"),
    ("qk-head-dim-0", {n: {"shape": (2, 3, NQ if n == "q" else NK, 0)} for n in "qk"}, ValueError,
     r"q and k have head_dim 0 \(dim 3\) but v has 64: the logits would be the bias alone"),
    ("dtype", {"v": {"dtype": "float32"}}, TypeError, r"v has dtype float32 but q has float16"),
    ("q-dtype", {n: {"dtype": "int64"} for n in "qkv"}, TypeError,
     r"q has dtype int64; expected a floating dtype \(float16, bfloat16, float32, float64\), as SDPA"),
    ("q-dtype-bool", {n: {"dtype": "bool"} for n in "qkv"}, TypeError, r"q has dtype bool; expected a floating dtype"),
    ("kv-heads-0", {"k": {"shape": (2, 0, NK, D)}, "v": {"shape": (2, 0, NK, D)}}, ValueError,
     r"heads \(dim 1\) of q must be a multiple of those of k and v \(grouped-query attention\): q has 3, k and v "
     r"have 0"),
    ("bias-int", {"attn_bias": {"shape": (1, 1, NQ, NK), "dtype": "int64"}}, TypeError,
     r"attn_bias has dtype int64; expected bool \(a mask, True = keep\) or a floating dtype \(an additive bias\), "
     r"as SDPA: convert a 0/1 keep-mask to bool"),
    ("bias-rank", {"attn_bias": {"shape": (NQ, NK)}}, ValueError,
     r"attn_bias must be 4-D, broadcastable to \(batch, heads, seqlen_q, seqlen_k\) = \(2, 3, 17, 29\); got shape "
     r"\(17, 29\) \(cupyflash\.flash_attention also takes a 2-D \(seqlen_q, seqlen_k\) or 3-D"),
    ("bias-dim", {"attn_bias": {"shape": (2, 1, NQ, 7)}}, ValueError,
     r"attn_bias dim 3 \(seqlen_k\) is 7; expected 29 or 1"),
]

# Rules that need a device or the GPU-only checks: reachable here through TensorInfo only.
DEVICE_RULES = [
    ("device-mismatch", {"k": {"device": "cpu"}}, ValueError, r"k is on cpu but q is on cuda:0"),
    ("bias-device", {"attn_bias": {"shape": (1, 1, NQ, NK), "device": "cpu"}}, ValueError,
     r"attn_bias is on cpu but q is on cuda:0"),
    ("gpu-head-dim", {n: {"shape": (2, 3, NQ if n == "q" else NK, 264)} for n in "qkv"}, ValueError,
     r"head_dim \(dim 3 of q\) is 264; the CUDA kernels support head dims up to 256 \(32, 64, 96, 128, 256 "
     r"natively, others zero-padded to the next\)"),
    ("gpu-dtype", {n: {"dtype": "float64"} for n in "qkv"}, TypeError,
     r"q has dtype float64; the CUDA kernels take float16, bfloat16, float32"),
    ("gpu-fp32-without-tf32", {n: {"dtype": "float32"} for n in "qkv"}, TypeError,
     r"q has dtype float32: the CUDA kernels run float32 on TF32 tensor cores .*not allowed; allow TF32 with "
     r"torch\.backends\.cuda\.matmul\.allow_tf32 = True or torch\.set_float32_matmul_precision\('high'\) \(torch\), "
     r"or allow_tf32=True \(CuPy face\)"),
    ("gpu-last-dim-stride", {"k": {"strides": (3 * NK * D * 2, NK * D * 2, D * 2, 2)}}, ValueError,
     r"k must be contiguous in its last dim \(head_dim, dim 3\): stride is 2, expected 1"),
    ("gpu-host-tensors", {n: {"device": "cpu"} for n in "qkv"}, ValueError,
     r"q is on cpu; the CUDA kernels need tensors on a CUDA device"),
    ("gpu-grid-batch", {n: {"shape": (70000, 3, NQ if n == "q" else NK, D)} for n in "qkv"}, ValueError,
     r"q has 70000 batch \(dim 0\); the CUDA kernels take at most 65535"),
    ("gpu-grid-heads", {n: {"shape": (2, 70000, NQ if n == "q" else NK, D)} for n in "qkv"}, ValueError,
     r"q has 70000 heads \(dim 1\); the CUDA kernels take at most 65535"),
]


def _params(table):
    return [pytest.param(overrides, exc, pattern, id=name) for name, overrides, exc, pattern in table]


@pytest.mark.parametrize("overrides,exc,pattern", _params(STRUCTURAL))
def test_structural_errors_from_shared_checks(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _check_infos(overrides, on_gpu=True)


@pytest.mark.parametrize("overrides,exc,pattern", _params(STRUCTURAL))
def test_structural_errors_from_torch_op(overrides, exc, pattern):
    """The torch op (CPU tensors here) runs the same checks before any compute."""
    overrides = _specs(overrides)
    for spec in overrides.values():
        spec["device"] = "cpu"
    with pytest.raises(exc, match=pattern):
        _call_torch_op_on_cpu(overrides)


@pytest.mark.parametrize("overrides,exc,pattern", _params(DEVICE_RULES))
def test_device_and_gpu_rules(overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _check_infos(overrides, on_gpu=True)


@pytest.mark.parametrize("head_dim", [*GPU_HEAD_DIMS, 8, 20, 80, 160, 192])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_accepted_inputs_pass(dtype, head_dim):
    """What the kernels take passes: transposed (B, N, H, D) views, Nq != Nk, a broadcast bias; float32 where
    the caller allows TF32."""
    def transposed_view(n):  # strides of x.view(B, N, H, D).transpose(1, 2)
        return {"shape": (2, 3, n, head_dim), "strides": (n * 3 * head_dim, head_dim, 3 * head_dim, 1),
                "dtype": dtype, "device": "cuda:0"}

    _check_infos({"q": transposed_view(NQ), "k": transposed_view(NK), "v": transposed_view(NK),
                  "attn_bias": {"shape": (1, 3, 1, NK), "dtype": dtype}}, on_gpu=True, tf32_allowed=True)


# (id, op arguments after q, k, v, bias, scale, causal, message pattern): scalar arguments of the torch op.
SCALAR_ARGS = [
    ("softcap-negative", dict(softcap=-30.0), r"softcap is -30\.0; expected a finite cap > 0 on the logits, or 0"),
    ("softcap-nan", dict(softcap=float("nan")), r"softcap is nan; expected a finite cap > 0"),
    ("softcap-inf", dict(softcap=float("inf")), r"softcap is inf; expected a finite cap > 0"),
    ("window", dict(window_left=-2), r"window_left is -2; expected a number of keys >= 0, or -1 for unbounded"),
    ("dropout_p", dict(dropout_p=1.0), r"dropout_p is 1\.0; expected 0 <= dropout_p < 1"),
    ("no-seed", dict(dropout_p=0.1), r"dropout_seed is None but dropout_p is 0\.1; expected a one-element int64"),
    ("seed-dtype", dict(dropout_p=0.1, dropout_seed=torch.tensor(3, dtype=torch.int32)),
     r"dropout_seed has shape \(\), dtype torch\.int32 and is on cpu; expected one int64 element on q's device"),
    ("seed-shape", dict(dropout_p=0.1, dropout_seed=torch.tensor([3, 4])),
     r"dropout_seed has shape \(2,\), dtype torch\.int64 .*expected one int64 element"),
]


@pytest.mark.parametrize("kwargs,pattern", [pytest.param(kw, pat, id=name) for name, kw, pat in SCALAR_ARGS])
def test_scalar_argument_errors(kwargs, pattern):
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, False, **kwargs)
    if "softcap" in kwargs:
        with pytest.raises(ValueError, match=pattern):
            cupyflash.flash_attention(q, k, v, softcap=kwargs["softcap"])


@pytest.fixture
def matmul_precision():
    """Restores torch's fp32 matmul precision (the legacy API only: once the fp32_precision API is used, torch
    refuses to read the legacy flags for the rest of the process)."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def _fake_cuda(*shape, dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # fake CUDA tensors need no GPU, as in the compile backend's graphs
        return torch.empty(*shape, dtype=dtype, device="cuda")


@pytest.mark.parametrize("precision,fp32_ok", [("highest", False), ("high", True), ("medium", True)])
def test_why_unsupported_fp32_on_cuda_follows_torch_tf32_setting(matmul_precision, precision, fp32_ok):
    """The compile backend asks why_unsupported: fp32 CUDA sites are fused only where torch's own fp32 matmuls
    may use TF32 too; fp16 is unaffected by the setting."""
    matmul_precision(precision)
    assert cupyflash.torch_op.tf32_allowed() is fp32_ok
    assert torch.backends.cuda.matmul.allow_tf32 is fp32_ok  # the legacy flag says the same
    q, k = _fake_cuda(2, 3, NQ, D, dtype=torch.float32), _fake_cuda(2, 3, NK, D, dtype=torch.float32)
    reason = why_unsupported(q, k, k)
    if fp32_ok:
        assert reason is None
    else:
        assert "float32 on CUDA runs on TF32 tensor cores, which torch's settings do not allow" in reason
        assert "torch.set_float32_matmul_precision('high')" in reason
    half = _fake_cuda(2, 3, NQ, D, dtype=torch.float16), _fake_cuda(2, 3, NK, D, dtype=torch.float16)
    assert why_unsupported(half[0], half[1], half[1]) is None
    f64 = _fake_cuda(2, 3, NQ, D, dtype=torch.float64)
    assert why_unsupported(f64, f64, f64) == "dtype float64 on CUDA: the kernels take float16, bfloat16, float32"


@pytest.mark.parametrize("head_dim", [160, 256])
def test_why_unsupported_wide_heads_with_gradients(matmul_precision, head_dim):
    """Head dims above 128 have a 16-bit backward (two launches of 128 columns), no fp32 one: the compile backend
    fuses 16-bit sites that need gradients and leaves fp32 ones alone, saying why."""
    matmul_precision("high")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q, k = _fake_cuda(2, 3, NQ, head_dim, dtype=dtype), _fake_cuda(2, 3, NK, head_dim, dtype=dtype)
        assert why_unsupported(q, k, k) is None  # no gradients: the forward alone
        q.requires_grad_()
        reason = why_unsupported(q, k, k)
        if dtype == torch.float32:
            assert reason == (f"gradients on CUDA: head_dim {head_dim} in float32 has a forward kernel only: the TF32 "
                              f"backward supports head dims up to 128; float16 and bfloat16 up to 256")
        else:
            assert reason is None


def test_tf32_allowed_reads_the_fp32_precision_api():
    """torch >= 2.9's fp32_precision API: once used, torch raises on reading the legacy flags, so tf32_allowed
    must read the new one (in a fresh interpreter: the API cannot be undone in this one)."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    script = textwrap.dedent("""
        import torch
        from cupyflash.torch_op import tf32_allowed
        seen = []
        for setting in ("tf32", "ieee", "tf32"):
            torch.backends.cuda.matmul.fp32_precision = setting
            seen.append(tf32_allowed())
        torch.backends.fp32_precision = "ieee"  # the global setting, inherited by matmul
        torch.backends.cuda.matmul.fp32_precision = "none"
        seen.append(tf32_allowed())
        print(seen)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[True, False, True, False]"


def test_gpu_only_rules_do_not_apply_on_cpu():
    """head_dim 80 and float32 are fine for the CPU implementation (the GPU rules must be gated by on_gpu)."""
    _check_infos({n: {"shape": (2, 3, NQ if n == "q" else NK, 80), "dtype": "float32", "device": "cpu"}
                  for n in "qkv"}, on_gpu=False)
    q, k, v = torch.randn(1, 2, 5, 80), torch.randn(1, 2, 7, 80), torch.randn(1, 2, 7, 80)
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 1 / math.sqrt(80), False)
    assert out.shape == q.shape and lse.shape == (1, 2, 5)


# The CuPy face is CUDA-only: host arrays must be refused with the tensor's name, before touching a GPU.
HOST_NAMED = r"(?is)(?=.*\bq\b)(?=.*(cuda|gpu|device|host))"


def _host_inputs(kind):
    if kind == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.standard_normal((1, 2, 16, 64)).astype(np.float16) for _ in range(3)]
    return [torch.randn(1, 2, 16, 64, dtype=torch.bfloat16) for _ in range(3)]


@pytest.mark.parametrize("kind", ["numpy", "torch-cpu"])
def test_cupy_face_refuses_host_arrays(kind):
    cupy_api = pytest.importorskip("cupyflash.cupy_api", reason="cupyflash/cupy_api.py is not importable")
    q, k, v = _host_inputs(kind)
    with pytest.raises((TypeError, ValueError), match=HOST_NAMED):
        cupy_api.flash_attn_forward(q, k, v, causal=False)
    dout = q
    with pytest.raises((TypeError, ValueError), match=r"(?is)(?=.*\b(dout|q)\b)(?=.*(cuda|gpu|device|host))"):
        cupy_api.flash_attn_backward(dout, q, k, v, q, q[..., 0], causal=False)


# GPU: the same rules reached through the torch op with real CUDA tensors.
def _cuda(*shape, dtype=torch.float16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["head-dim-264", "float64", "float32-without-tf32", "last-dim-stride", "k-on-cpu",
                                  "seed-on-cpu"])
def test_torch_op_refuses_on_cuda(case, matmul_precision):
    matmul_precision("highest")
    q, k, v = _cuda(2, 3, NQ, D), _cuda(2, 3, NK, D), _cuda(2, 3, NK, D)
    kwargs = {}
    if case == "head-dim-264":  # every head dim up to 256 runs (zero-padded to the next kernel's)
        q, k, v = _cuda(2, 3, NQ, 264), _cuda(2, 3, NK, 264), _cuda(2, 3, NK, 264)
        exc, pattern = ValueError, r"head_dim \(dim 3 of q\) is 264; the CUDA kernels support head dims up to 256"
    elif case == "float64":
        q, k, v = (t.double() for t in (q, k, v))
        exc, pattern = TypeError, r"q has dtype float64; the CUDA kernels take float16, bfloat16, float32"
    elif case == "float32-without-tf32":
        q, k, v = (t.float() for t in (q, k, v))
        exc, pattern = TypeError, r"q has dtype float32: the CUDA kernels run float32 on TF32 tensor cores"
    elif case == "seed-on-cpu":
        kwargs = dict(dropout_p=0.1, dropout_seed=torch.tensor(3))
        exc, pattern = ValueError, r"dropout_seed .* is on cpu; expected one int64 element on q's device \(cuda:0\)"
    elif case == "last-dim-stride":
        v = _cuda(2, 3, D, NK).transpose(-1, -2)  # (B, H, Nk, D) with stride NK in the last dim
        exc, pattern = ValueError, rf"v must be contiguous in its last dim \(head_dim, dim 3\): stride is {NK}"
    else:
        k = k.cpu()
        exc, pattern = ValueError, r"k is on cpu but q is on cuda"
    with pytest.raises(exc, match=pattern):
        torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.125, False, **kwargs)


@pytest.mark.gpu
def test_attn_bias_on_cuda_refused_or_correct():
    """attn_bias on CUDA may be refused (NotImplementedError naming attn_bias) until the kernels take it;
    once they do, the result must match the reference with the bias added."""
    from reference import OUT_FACTOR, assert_within_rule, attention_ref, rounding_floor

    q, k, v = _cuda(2, 3, NQ, D), _cuda(2, 3, NK, D), _cuda(2, 3, NK, D)
    bias = _cuda(1, 3, NQ, NK)
    try:
        out, _ = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, 0.125, False)
    except NotImplementedError as err:
        assert "attn_bias" in str(err)
        return
    ref = attention_ref(q, k, v, scale=0.125, causal=False, bias=bias)
    pt = attention_ref(q, k, v, scale=0.125, causal=False, bias=bias, compute_dtype=q.dtype)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, q.dtype), "out with attn_bias")
