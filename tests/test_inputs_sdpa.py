"""Inputs beside torch.nn.functional.scaled_dot_product_attention (issue 17), on the CPU path: what SDPA refuses
gets a clear error naming the tensor or argument and what was expected; what SDPA accepts and the kernels can
do gives SDPA's result (values and gradients within the tolerance rule), broadcast shapes included.

Faces: ``cupyflash.flash_attention``, ``torch.ops.cupyflash.flash_attn_fwd`` and, for the scalar arguments it
checks before touching an array, the CuPy face; the compile path through ``why_unsupported`` and ``explain``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import GRAD_FACTOR, OUT_FACTOR, assert_within_rule, rounding_floor, seed_from

import compile_backend
import cupyflash
from cupyflash import cupy_api, torch_op
from cupyflash.torch_op import why_unsupported

B, H, NQ, NK, D = 2, 3, 9, 13, 16


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _qkv(name, q_shape=(B, H, NQ, D), k_shape=(B, H, NK, D), v_shape=None):
    return (_randn(*q_shape, seed=seed_from(name, "q")), _randn(*k_shape, seed=seed_from(name, "k")),
            _randn(*(v_shape or k_shape), seed=seed_from(name, "v")))


def _fa(q, k, v, bias=None, **kwargs):
    return cupyflash.flash_attention(q, k, v, bias, **kwargs)


def _op(q, k, v, bias=None, **kwargs):
    return torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, 0.25, False, **kwargs)[0]


def _sdpa(q, k, v, bias=None, **kwargs):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=q.shape[1] > k.shape[1], **kwargs)


def _out_and_grads(fn, inputs, dout):
    """fn(*inputs) and the gradients of its floating inputs for ``dout`` (None where an input is not floating)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    # SDPA leaves a bias out of its graph where the batch is empty: its gradient is then zeros.
    return [out.detach(), *torch.autograd.grad(out, wanted, dout, materialize_grads=True)]


def _assert_matches_sdpa(inputs, name, device="cpu", dtype=torch.float32, **kwargs):
    """Ours within the rule of SDPA in fp64, measured against SDPA in ``dtype``, for out and every gradient; the
    fp32 CPU ``inputs`` are moved to ``device`` and floating ones (but a float32 bias) cast to ``dtype``."""
    def cast(t, to):
        if t is None or not t.is_floating_point():
            return None if t is None else t.to(device)
        return t.to(device, torch.float32 if t is inputs[3] and to != torch.float64 else to)

    inputs_in_dtype = [cast(t, dtype) for t in inputs]
    ref_inputs = [cast(t, torch.float64) for t in inputs]
    dout = _randn(*_sdpa(*ref_inputs, **kwargs).shape, seed=seed_from(name, "dout"))
    ours = _out_and_grads(lambda *t: _fa(*t, **kwargs), inputs_in_dtype, dout.to(device, dtype))
    # SDPA's CUDA kernels take a float bias only in q's dtype: its same-dtype math gets the bias rounded to it.
    sdpa_in_dtype = [t.to(dtype) if device == "cuda" and i == 3 and t is not None and t.is_floating_point() else t
                     for i, t in enumerate(inputs_in_dtype)]
    same_dtype = _out_and_grads(lambda *t: _sdpa(*t, **kwargs), sdpa_in_dtype, dout.to(device, dtype))
    ref = _out_and_grads(lambda *t: _sdpa(*t, **kwargs), ref_inputs, dout.to(device, torch.float64))
    assert len(ours) == len(same_dtype) == len(ref)
    for i, (got, pt, want) in enumerate(zip(ours, same_dtype, ref)):
        factor = OUT_FACTOR if i == 0 else GRAD_FACTOR
        assert_within_rule(got, want, pt, factor, rounding_floor(want, dtype), f"{name} result {i}")


# ---- what SDPA refuses ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("face", [_fa, _op], ids=["function", "op"])
def test_non_floating_qkv_refused_as_sdpa(face, dtype):
    q, k, v = (t.to(dtype) for t in _qkv("dtype"))
    with pytest.raises((RuntimeError, NotImplementedError)):
        _sdpa(q, k, v)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=rf"q has dtype {name}; expected a floating dtype \(float16, bfloat16, "
                                        rf"float32, float64\), as SDPA"):
        face(q, k, v)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64])
@pytest.mark.parametrize("face", [_fa, _op], ids=["function", "op"])
def test_integer_or_complex_bias_refused_as_sdpa(face, dtype):
    """An int64 0/1 mask would otherwise be added (+0/+1) rather than keep keys: SDPA raises, so do we."""
    q, k, v = _qkv("int bias")
    mask = (torch.arange(NK) % 3 != 0).expand(1, 1, NQ, NK).to(dtype)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        _sdpa(q, k, v, mask)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=rf"attn_bias has dtype {name}; expected bool \(a mask, True = keep\) or a "
                                        rf"floating dtype \(an additive bias\), as SDPA: convert a 0/1 keep-mask to "
                                        rf"bool, an additive integer bias to q's dtype"):
        face(q, k, v, mask)


def test_integer_bias_refused_by_the_op_and_added_as_numbers_by_the_backend():
    """The op refuses an int64 bias (why_unsupported says so); scores plus an int64 tensor in model code are eager's
    addition of numbers, so the backend passes that tensor as a float bias and fuses the site with eager's result."""
    def scores_plus_int_mask(q, k, v, mask):
        return (q @ k.transpose(-2, -1) * 0.25 + mask).softmax(-1) @ v

    q, k, v = _qkv("compile int bias")
    mask = torch.randint(0, 2, (1, 1, NQ, NK), generator=torch.Generator().manual_seed(seed_from("mask")))
    reason = why_unsupported(q, k, v, mask)
    assert reason.startswith("attn_bias has dtype int64; expected bool (a mask, True = keep) or a floating dtype")
    assert why_unsupported(q.long(), k.long(), v.long()).startswith("q has dtype int64; expected a floating dtype")
    torch._dynamo.reset()
    report = compile_backend.explain(scores_plus_int_mask, q, k, v, mask)
    assert [s.fused for s in report.sites] == [True] and report.fused[0].mask_form == "dense bias"
    torch._dynamo.reset()
    compiled = torch.compile(scores_plus_int_mask, backend="cupyflash", options={"inner": "eager"})
    torch.testing.assert_close(compiled(q, k, v, mask), scores_plus_int_mask(q, k, v, mask))


@pytest.mark.parametrize("d_v", [8, 24])
def test_value_head_dim_other_than_q_matches_sdpa(d_v):
    """SDPA lets v's head dim differ from q's: out is (B, H, Nq, v's), and every gradient is SDPA's."""
    q, k, v = _qkv(f"v head dim {d_v}", v_shape=(B, H, NK, d_v))
    _assert_matches_sdpa([q, k, v, None], f"v head dim {d_v}")
    assert _op(q, k, v).shape == (B, H, NQ, d_v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d_q,d_v", [(64, 32), (32, 64), (96, 80), (40, 128)])
def test_value_head_dim_other_than_q_matches_sdpa_on_cuda(d_q, d_v, dtype):
    """The kernels run both zero-padded to one head dim (cupyflash/cuda_path.py) and slice the results back."""
    name = f"cuda v head dim {d_q} {d_v}"
    q, k, v = _qkv(name, (B, H, NQ, d_q), (B, H, NK, d_q), (B, H, NK, d_v))
    _assert_matches_sdpa([q, k, v, None], name, device="cuda", dtype=dtype)


WINDOW_ERRORS = [  # (window, exception, message pattern)
    (5, TypeError, r"window is 5; expected \(left, right\): two ints, keys around the diagonal, -1 for unbounded "
                   r"\(or None for no window\)"),
    ((1, 2, 3), TypeError, r"window is \(1, 2, 3\); expected \(left, right\): two ints"),
    ((1.5, 0), TypeError, r"window is \(1\.5, 0\); expected \(left, right\): two ints"),
    ((True, False), TypeError, r"window is \(True, False\); expected \(left, right\): two ints"),
    ("10", TypeError, r"window is '10'; expected \(left, right\)"),
    ((-2, 0), ValueError, r"window\[0\] \(left\) is -2; expected a number of keys >= 0, or -1 for unbounded"),
    ((0, -3), ValueError, r"window\[1\] \(right\) is -3; expected a number of keys >= 0, or -1 for unbounded"),
    ((2 ** 70, 0), ValueError, r"window\[0\] \(left\) is 1180591620717411303424; expected at most 2\*\*63 - 1 keys"),
]


@pytest.mark.parametrize("window,exc,pattern", WINDOW_ERRORS, ids=[repr(w[0]) for w in WINDOW_ERRORS])
def test_window_must_be_a_pair_of_ints(window, exc, pattern):
    q, k, v = _qkv("window")
    with pytest.raises(exc, match=pattern):
        _fa(q, k, v, window=window)
    host = np.zeros((1, 2, 16, 64), np.float16)  # the CuPy face checks its arguments before any array
    with pytest.raises(exc, match=pattern):
        cupy_api.flash_attn_forward(host, host, host, window=window)


def test_window_none_and_edges_past_every_key_mean_unbounded():
    q, k, v = _qkv("window none")
    unbounded = _fa(q, k, v)
    assert torch.equal(_fa(q, k, v, window=None), unbounded)
    assert torch.equal(_fa(q, k, v, window=[NK, 2 ** 62]), unbounded)
    assert torch.equal(_op(q, k, v, window_left=2 ** 40, window_right=NQ), _op(q, k, v))
    assert torch.equal(_fa(q, k, v, window=(2 ** 40, 0)), _fa(q, k, v, causal=True))
    assert not torch.equal(_fa(q, k, v, window=(NK - 2, -1)), unbounded)  # the last edge that still bounds
    with pytest.raises(TypeError, match=r"q is a numpy\.ndarray; the CuPy face takes cupy\.ndarray"):
        cupy_api.flash_attn_forward(np.zeros((1, 2, 16, 64), np.float16), None, None, window=None)


SCALAR_ERRORS = [  # (keyword arguments, exception, message pattern)
    (dict(scale=float("nan")), ValueError, r"scale is nan; expected a finite float \(the default is 1/sqrt"),
    (dict(scale=float("inf")), ValueError, r"scale is inf; expected a finite float"),
    (dict(scale="0.5"), TypeError, r"scale is a str; expected a float, or None for 1/sqrt\(head_dim\)"),
    (dict(scale=True), TypeError, r"scale is a bool; expected a float"),
    (dict(scale=1j), TypeError, r"scale is a complex; expected a float"),
    (dict(causal="no"), TypeError, r"causal is a str \('no'\); expected True or False"),
    (dict(causal=None), TypeError, r"causal is a NoneType \(None\); expected True or False"),
    (dict(causal=1), TypeError, r"causal is a int \(1\); expected True or False"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p is a str; expected a float, 0 <= dropout_p"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p is 1\.5; expected 0 <= dropout_p <= 1"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p is -0\.1; expected 0 <= dropout_p <= 1"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p is nan; expected 0 <= dropout_p <= 1"),
    (dict(softcap="30"), TypeError, r"softcap is a str; expected a float \(0 for none\)"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", SCALAR_ERRORS, ids=[str(kw) for kw, _, _ in SCALAR_ERRORS])
def test_scalar_arguments_checked_by_type_and_value(kwargs, exc, pattern):
    """float('0.5') and bool('no') would take these silently."""
    q, k, v = _qkv("scalars")
    with pytest.raises(exc, match=pattern):
        _fa(q, k, v, **kwargs)
    if "dropout_p" not in kwargs:  # the CuPy face takes dropout_p < 1 only (covered in test_cupy_face.py)
        host = np.zeros((1, 2, 16, 64), np.float16)
        with pytest.raises(exc, match=pattern):
            cupy_api.flash_attn_forward(host, host, host, **kwargs)


def test_op_refuses_a_non_finite_scale_and_dropout_one():
    q, k, v = _qkv("op scalars")
    with pytest.raises(ValueError, match=r"scale is nan; expected a finite float"):
        torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, float("nan"), False)
    with pytest.raises(ValueError, match=r"dropout_p is 1\.0; expected 0 <= dropout_p < 1 \(cupyflash\.flash_attention "
                                         r"takes 1, which drops every probability, and returns zeros, as SDPA\)"):
        _op(q, k, v, dropout_p=1.0, dropout_seed=torch.tensor(3))


def test_scalars_sdpa_takes_as_tensors_or_ints_give_the_same_result():
    q, k, v = _qkv("scalar kinds")
    assert torch.equal(_fa(q, k, v, scale=torch.tensor(0.5)), _fa(q, k, v, scale=0.5))
    assert torch.equal(_fa(q, k, v, scale=1), _fa(q, k, v, scale=1.0))
    assert torch.equal(_fa(q, k, v, dropout_p=torch.tensor(0.0), softcap=np.float32(0)), _fa(q, k, v))


NOT_TENSORS = [  # (argument, value, message pattern)
    ("q", [[1.0]], r"q is a list; expected a torch\.Tensor \(batch, heads, seqlen, head_dim\)"),
    ("q", None, r"q is a NoneType; expected a torch\.Tensor"),
    ("k", np.zeros((B, H, NK, D), np.float32), r"k is a numpy\.ndarray; expected a torch\.Tensor"),
    ("v", 1.0, r"v is a float; expected a torch\.Tensor"),
    ("attn_bias", np.zeros((NQ, NK), np.float32), r"attn_bias is a numpy\.ndarray; expected a torch\.Tensor or None"),
]


@pytest.mark.parametrize("name,value,pattern", NOT_TENSORS, ids=[n for n, _, _ in NOT_TENSORS])
def test_non_tensor_inputs_named(name, value, pattern):
    args = dict(zip("qkv", _qkv("not tensors")), attn_bias=None)
    args[name] = value
    with pytest.raises(TypeError, match=pattern):
        _fa(args["q"], args["k"], args["v"], args["attn_bias"])


BIAS_ERRORS = [  # (bias, exception, message pattern)
    (torch.zeros(NK), ValueError, r"attn_bias must be 4-D, broadcastable to \(batch, heads, seqlen_q, seqlen_k\) = "
                                  r"\(2, 3, 9, 13\); got shape \(13,\) \(cupyflash\.flash_attention also takes a 2-D"),
    (torch.zeros(()), ValueError, r"attn_bias must be 4-D, .*got shape \(\)"),
    (torch.zeros(1, B, H, NQ, NK), ValueError, r"attn_bias must be 4-D, .*got shape \(1, 2, 3, 9, 13\)"),
    (torch.zeros(NQ, 5), ValueError, r"attn_bias dim 3 \(seqlen_k\) is 5; expected 13 or 1 to broadcast"),
    (torch.zeros(2, NQ, NK), ValueError, r"attn_bias dim 1 \(heads\) is 2; expected 3 or 1 to broadcast"),
    (torch.zeros(B, 1, NQ, NK)[:1].expand(4, 1, NQ, NK), ValueError, r"attn_bias dim 0 \(batch\) is 4; expected 2 "
                                                                     r"or 1 to broadcast"),
    (torch.zeros(NQ, NK, device="meta"), ValueError,
     r"attn_bias is on meta but q is on cpu; all inputs must be on one device"),
]


@pytest.mark.parametrize("bias,exc,pattern", BIAS_ERRORS, ids=["1-D", "0-D", "5-D", "seqlen_k", "heads", "batch", "device"])
def test_bias_errors_name_the_dim_and_expectation(bias, exc, pattern):
    q, k, v = _qkv("bias errors")
    with pytest.raises(exc, match=pattern):
        _fa(q, k, v, bias)


def test_bias_of_another_floating_dtype_is_read_in_the_compute_dtype():
    """Wider than SDPA (which wants bool or q's dtype): a float64 bias beside fp32 q is read in fp32."""
    q, k, v = _qkv("bias dtype")
    bias = _randn(1, H, NQ, NK, seed=seed_from("bias dtype", "bias"), dtype=torch.float64)
    assert torch.equal(_fa(q, k, v, bias), _fa(q, k, v, bias.float()))


def test_cached_input_checks_keep_refusing_bad_dtypes():
    q, k, v = _qkv("cached")
    for _ in range(2):
        assert _fa(q, k, v).shape == q.shape
        with pytest.raises(TypeError, match="q has dtype int64"):
            _fa(q.long(), k.long(), v.long())
        with pytest.raises(TypeError, match="attn_bias has dtype int64"):
            _fa(q, k, v, torch.ones(NQ, NK, dtype=torch.int64))


# ---- what SDPA accepts ------------------------------------------------------------------------------------------

EMPTY = [  # (id, q shape, k shape): some dim 0
    ("batch-0", (0, H, NQ, D), (0, H, NK, D)),
    ("heads-0", (B, 0, NQ, D), (B, 0, NK, D)),
    ("seqlen_q-0", (B, H, 0, D), (B, H, NK, D)),
    ("seqlen_k-0", (B, H, NQ, D), (B, H, 0, D)),
    ("head_dim-0", (B, H, NQ, 0), (B, H, NK, 0)),
]


@pytest.mark.parametrize("q_shape,k_shape", [pytest.param(q, k, id=i) for i, q, k in EMPTY])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_empty_dims_give_sdpas_result(q_shape, k_shape, with_bias):
    """SDPA returns an empty tensor (or zeros where no key exists) and empty or zero gradients."""
    q, k, v = _qkv("empty", q_shape, k_shape)
    inputs = [q, k, v]
    if with_bias:
        inputs.append(_randn(1, 1, q_shape[2], k_shape[2], seed=seed_from("empty", "bias")))
    dout = _randn(*q_shape, seed=seed_from("empty", "dout"))
    ours = _out_and_grads(_fa, inputs, dout)
    theirs = _out_and_grads(_sdpa, inputs, dout)
    for got, want in zip(ours, theirs, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("q_shape,k_shape", [pytest.param(q, k, id=i) for i, q, k in EMPTY])
def test_empty_dims_on_cuda_give_sdpas_result(q_shape, k_shape):
    """Nothing reaches the kernels (head_dim 0 is not one of theirs): the results of the CPU SDPA, on the GPU."""
    inputs = [*_qkv("empty cuda", q_shape, k_shape), _randn(1, 1, q_shape[2], k_shape[2], seed=seed_from("bias"))]
    dout = _randn(*q_shape, seed=seed_from("empty cuda", "dout"))
    want = _out_and_grads(_sdpa, inputs, dout)
    got = _out_and_grads(_fa, [t.to("cuda", torch.float16) for t in inputs], dout.to("cuda", torch.float16))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.is_cuda and torch.equal(g.cpu().float(), w)


@pytest.mark.gpu
@pytest.mark.parametrize("q_shape,k_shape", [pytest.param(q, k, id=i) for i, q, k in EMPTY if q[3]])
def test_empty_dims_on_the_cupy_face(q_shape, k_shape):
    """No element, or no key: out 0 and lse +inf, gradients 0, without a launch."""
    import cupy

    q, k = cupy.ones((*q_shape[:3], 64), cupy.float16), cupy.ones((*k_shape[:3], 64), cupy.float16)
    out, lse = cupy_api.flash_attn_forward(q, k, k)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert not out.any() and bool((lse == math.inf).all())
    grads = cupy_api.flash_attn_backward(cupy.ones_like(out), q, k, k, out, lse)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape] and not any(g.any() for g in grads)


class _HostArray:
    """What the CuPy face's array checks read of an array (shape, strides, itemsize, dtype, device id), so they run
    without a GPU."""

    def __init__(self, shape):
        self.shape, self.itemsize, self.dtype = shape, 2, "float16"
        self.strides = tuple(2 * math.prod(shape[i + 1:]) for i in range(len(shape)))
        self.device = type("Device", (), {"id": 0})()


def test_cupy_face_refuses_head_dim_0():
    """The torch op computes the LSE of head_dim 0 with its CPU implementation on the device; the CuPy face has
    none, so it says so."""
    with pytest.raises(ValueError, match=r"head_dim \(dim 3 of q\) is 0; the CUDA kernels support head dims from 1 "
                                         r"to 256, and the CuPy face has no other path"):
        cupy_api._check_arrays(*(_HostArray((1, 2, n, 0)) for n in (5, 7, 7)), None, False)


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_0_lse_is_that_of_the_bias_alone(causal):
    """With no feature every logit is the bias (masked by causal): the op's lse is its logsumexp."""
    q, k, v = _qkv("head_dim 0 lse", (B, H, NQ, 0), (B, H, NK, 0))
    bias = _randn(B, 1, NQ, NK, seed=seed_from("head_dim 0 lse", "bias"))
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, 0.5, causal)
    assert out.shape == q.shape
    keep = torch.ones(NQ, NK, dtype=torch.bool).tril(NK - NQ) if causal else torch.ones(NQ, NK, dtype=torch.bool)
    logits = bias.expand(B, H, NQ, NK)
    ref = logits.double().masked_fill(~keep, -math.inf).logsumexp(-1)
    same_dtype = logits.masked_fill(~keep, -math.inf).logsumexp(-1)
    assert_within_rule(lse, ref, same_dtype, OUT_FACTOR, rounding_floor(ref, torch.float32), "lse")


BROADCASTS = [  # (id, q shape, k and v shape, bias shape or None, bias dtype)
    ("bias-2d", (B, H, NQ, D), (B, H, NK, D), (NQ, NK), torch.float32),
    ("bias-3d", (B, H, NQ, D), (B, H, NK, D), (H, NQ, NK), torch.float32),
    ("bias-3d-heads-1", (B, H, NQ, D), (B, H, NK, D), (1, NQ, NK), torch.float32),
    ("bias-3d-rows-1", (B, H, NQ, D), (B, H, NK, D), (H, 1, NK), torch.float32),
    ("mask-2d", (B, H, NQ, D), (B, H, NK, D), (NQ, NK), torch.bool),
    ("mask-3d", (B, H, NQ, D), (B, H, NK, D), (H, NQ, NK), torch.bool),
    ("kv-batch-1", (B, H, NQ, D), (1, H, NK, D), None, None),
    ("q-batch-1", (1, H, NQ, D), (B, H, NK, D), None, None),
    ("q-one-head", (B, 1, NQ, D), (B, H, NK, D), None, None),
    ("kv-batch-1-gqa-bias-2d", (B, 4, NQ, D), (1, 2, NK, D), (NQ, NK), torch.float32),
]


@pytest.mark.parametrize("q_shape,kv_shape,bias_shape,bias_dtype",
                         [pytest.param(*case[1:], id=case[0]) for case in BROADCASTS])
def test_sdpa_broadcast_shapes_match_sdpa(q_shape, kv_shape, bias_shape, bias_dtype):
    """Values and gradients (of q, k, v and a float bias, in their own shapes) within the rule."""
    name = f"broadcast {q_shape} {kv_shape} {bias_shape}"
    q, k, v = _qkv(name, q_shape, kv_shape)
    bias = None
    if bias_dtype == torch.bool:
        bias = _randn(*bias_shape, seed=seed_from(name, "mask")) > -0.5
        bias[..., -1] = True  # every row keeps a key (rows with none are another issue's)
    elif bias_dtype is not None:
        bias = _randn(*bias_shape, seed=seed_from(name, "bias"))
    _assert_matches_sdpa([q, k, v, bias], name)


def test_k_batch_1_beside_v_batch_2_matches_sdpa():
    q, k, v = _qkv("k batch 1", (B, H, NQ, D), (B, H, NK, D))
    _assert_matches_sdpa([q, k[:1], v, None], "k batch 1")


@pytest.mark.gpu
@pytest.mark.parametrize("q_shape,kv_shape,bias_shape,bias_dtype",
                         [pytest.param(*case[1:], id=case[0]) for case in BROADCASTS])
def test_sdpa_broadcast_shapes_match_sdpa_on_cuda(q_shape, kv_shape, bias_shape, bias_dtype):
    """The stride-0 views reach the CUDA kernels (fp16, head_dim 64; a float bias stays fp32)."""
    q_shape, kv_shape = (*q_shape[:3], 64), (*kv_shape[:3], 64)
    name = f"cuda broadcast {q_shape} {kv_shape} {bias_shape}"
    q, k, v = _qkv(name, q_shape, kv_shape)
    bias = None
    if bias_dtype == torch.bool:
        bias = _randn(*bias_shape, seed=seed_from(name, "mask")) > -0.5
        bias[..., -1] = True
    elif bias_dtype is not None:
        bias = _randn(*bias_shape, seed=seed_from(name, "bias"))
    _assert_matches_sdpa([q, k, v, bias], name, device="cuda", dtype=torch.float16)


def test_broadcast_is_views_not_copies(monkeypatch):
    """The op receives stride-0 expanded views of the caller's storage, never a materialised copy."""
    seen = {}

    def spy(*args):
        seen.update(zip(("q", "k", "v", "attn_bias"), args[:4]))
        return forward(*args)

    forward = torch_op._checked_forward
    monkeypatch.setattr(torch_op, "_checked_forward", spy)
    q, k, v = _qkv("views", (B, H, NQ, D), (1, H, NK, D))
    bias = _randn(NQ, NK, seed=seed_from("views", "bias"))
    _fa(q, k, v, bias)
    assert seen["k"].data_ptr() == k.data_ptr() and seen["k"].stride(0) == 0 and seen["k"].shape[0] == B
    assert seen["attn_bias"].data_ptr() == bias.data_ptr() and seen["attn_bias"].shape == (1, 1, NQ, NK)


def test_dropout_1_gives_zeros_and_zero_gradients_without_launching(monkeypatch):
    monkeypatch.setattr(torch_op, "_checked_forward", lambda *a: pytest.fail("dropout_p = 1 launched the forward"))
    q, k, v = _qkv("dropout 1")
    bias = _randn(NQ, NK, seed=seed_from("dropout 1", "bias"))
    dout = _randn(B, H, NQ, D, seed=seed_from("dropout 1", "dout"))
    ours = _out_and_grads(lambda *t: _fa(*t, dropout_p=1.0), [q, k, v, bias], dout)
    theirs = _out_and_grads(lambda *t: _sdpa(*t, dropout_p=1.0), [q, k, v, bias], dout)
    for got, want in zip(ours, theirs, strict=True):
        assert got.shape == want.shape and torch.equal(got, want) and not got.any()
    with pytest.raises(TypeError, match="q has dtype int64"):  # still checked
        _fa(q.long(), k.long(), v.long(), dropout_p=1.0)


def test_broadcasts_and_dropout_1_trace_under_torch_compile():
    """The front end's views and the dropout_p = 1 path compile in one graph with dynamic shapes."""
    def attend(q, k, v, bias, dropout_p):
        return cupyflash.flash_attention(q, k, v, bias, window=(4, 0), dropout_p=dropout_p)

    q, k, v = _qkv("compiled", (B, H, NQ, D), (1, H, NK, D))
    bias = _randn(NQ, NK, seed=seed_from("compiled", "bias"))
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(q, k, v, bias, 0.0), attend(q, k, v, bias, 0.0))
    zeros = compiled(q, k, v, bias, 1.0)
    assert zeros.shape == q.shape and not zeros.any()


def _bwd_args(**changes):
    q, k, v = _qkv("op backward")
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, False)
    args = dict(dout=torch.randn_like(out), q=q, k=k, v=v, attn_bias=None, out=out, lse=lse, scale=0.25,
                causal=False)
    args.update(changes)
    return args


BACKWARD_ERRORS = [  # (changes to the backward's arguments, exception, message pattern)
    (dict(dout=torch.zeros(B, H, NQ, 8)), ValueError,
     r"dout must be shaped like the output, \(batch, heads, seqlen_q, v's head_dim\) = \(2, 3, 9, 16\), in q's "
     r"dtype float32; got \(2, 3, 9, 8\) float32"),
    (dict(out=torch.zeros(B, H, NQ, D, dtype=torch.float64)), ValueError, r"out must be shaped like the output, .*got .* float64"),
    (dict(lse=torch.zeros(B, H, NQ, dtype=torch.float16)), ValueError,
     r"lse must be float32 of shape \(batch, heads, seqlen_q\) = \(2, 3, 9\), got float16"),
    (dict(lse=torch.zeros(B, H, NQ, device="meta")), ValueError,
     r"lse is on meta but q is on cpu; all inputs must be on one device"),
    (dict(bias_grad=True), ValueError, r"bias_grad=True needs attn_bias"),
    (dict(attn_bias=torch.ones(1, 1, NQ, NK, dtype=torch.bool), bias_grad=True), ValueError,
     r"bias_grad=True but attn_bias is a boolean mask, which has no gradient"),
    (dict(k=torch.zeros(B, H, NK, D, dtype=torch.int64)), TypeError, r"k has dtype int64 but q has float32"),
    (dict(window_left=-5), ValueError, r"window_left is -5; expected a number of keys >= 0, or -1 for unbounded"),
]


@pytest.mark.parametrize("changes,exc,pattern", BACKWARD_ERRORS, ids=[",".join(c) for c, _, _ in BACKWARD_ERRORS])
def test_op_backward_checks_its_inputs(changes, exc, pattern):
    """The backward op called directly gets the forward's checks and its own (autograd passes the forward's)."""
    with pytest.raises(exc, match=pattern):
        torch.ops.cupyflash.flash_attn_bwd(**_bwd_args(**changes))


def test_op_with_a_meta_tensor_among_cpu_ones_is_refused():
    """The dispatcher sends such a call to the fake implementation, which would return uninitialised tensors."""
    q, k, v = _qkv("meta")
    with pytest.raises(ValueError, match=r"attn_bias is on meta but q is on cpu; all inputs must be on one device"):
        _op(q, k, v, torch.zeros(1, 1, NQ, NK, device="meta"))
