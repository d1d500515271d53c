"""The CuPy face (``cupyflash.cupy_api``): fp16 and fp32 (TF32) CuPy arrays with every score modification (additive
and boolean biases with their gradient, grouped-query K/V, windows, Philox dropout, soft-capping), alone and
combined, against the torch op's CUDA path on the same memory (the same kernels: equal outputs) and against the
reference with the tolerance rule; bf16 torch tensors passed through (every argument reaches the torch op).

The bias tile classes: cupyflash/tile_classes.py on torch tensors and NumPy arrays (CPU) and CuPy arrays (GPU), and
the GPU classification the CuPy face launches, against their definition. CPU: argument errors raised before any
array is touched, and an import without torch.

Inputs are fresh per case (seeded from its parameters) and every CuPy allocation of the face is NaN-filled before
it is handed out, so an output element the kernels forget to write shows up as NaN.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import cupyflash.torch_op  # noqa: F401  registers torch.ops.cupyflash.*
from cupyflash.cpu_attention import dropout_keep
from cupyflash.tile_classes import MASKED_BIAS, READ, SKIP, ZERO, tile_classes
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_close_ulps, assert_dropout_runs_agree, assert_within_rule,
                       attention_ref, draw_inputs, rounding_floor, seed_from, semantics_ref)

ROOT = Path(__file__).resolve().parents[1]
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
BATCH = 2
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy_api():
    return pytest.importorskip("cupyflash.cupy_api", reason="cupyflash/cupy_api.py is not importable")


# ---- CPU: bias tile classes on torch tensors and NumPy-like arrays ---------------------------------------------

def _classes_by_definition(bias: np.ndarray, br: int, bc: int, window: bool) -> np.ndarray:
    """The module docstring of cupyflash/tile_classes.py, tile by tile in fp64 (ragged edge tiles are padded with
    -inf keys and rows, so they are never ZERO)."""
    bb, hb, nq, nk = bias.shape
    tq, tk = (br if nq > 1 else 1), (bc if nk > 1 else 1)
    b = bias.astype(np.float64)
    classes = np.empty((bb, hb, -(-nq // tq), -(-nk // tk)), dtype=np.int8)  # (Bb, Hb, QB, KB)
    for i, j, qb, kb in np.ndindex(classes.shape):
        rows, cols = slice(qb * tq, (qb + 1) * tq), slice(kb * tk, (kb + 1) * tk)
        tile = b[i, j, rows, cols]
        rows_keep_a_key = (b[i, j, rows, :] > MASKED_BIAS).any(axis=1).all()
        if (tile == -np.inf).all() or (not window and (tile <= MASKED_BIAS).all() and rows_keep_a_key):
            classes[i, j, qb, kb] = SKIP
        elif tile.shape == (tq, tk) and (tile == 0).all():
            classes[i, j, qb, kb] = ZERO
        else:
            classes[i, j, qb, kb] = READ
    return classes


def _patchy_bias(shape, dtype, patch, seed) -> np.ndarray:
    """A bias made of `patch`-sized blocks, each all zero, all -inf, all finfo.min, a -inf/finfo.min mix or random
    (with stray 0 and -inf): whole tiles of every class, and in the first head a last row masked only by finfo.min
    (of fp32 a mask value, of fp16 an ordinary number)."""
    rng = np.random.default_rng(seed)
    bias = rng.standard_normal(shape).astype(dtype)
    lowest = np.finfo(dtype).min
    for i, j in np.ndindex(shape[:2]):
        for r in range(0, shape[2], patch[0]):
            for c in range(0, shape[3], patch[1]):
                view = bias[i, j, r:r + patch[0], c:c + patch[1]]
                kind = rng.integers(6)
                if kind == 0:
                    view[...] = 0.0
                elif kind == 1:
                    view[...] = -np.inf
                elif kind == 2:
                    view[...] = lowest
                elif kind == 3:
                    view[...] = np.where(rng.random(view.shape) < 0.5, -np.inf, lowest)
                elif kind == 4:
                    view[rng.random(view.shape) < 0.3] = 0.0
                    view[rng.random(view.shape) < 0.3] = -np.inf
    if shape[2] > 1:
        bias[0, 0, -1, :] = lowest  # a row masked only by finfo.min: without a window its tiles are never skipped
    return bias


TILE_SHAPES = [(2, 3, 45, 70), (1, 2, 33, 1), (2, 1, 1, 50), (1, 1, 64, 64), (2, 2, 37, 29)]


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("br,bc", [(16, 16), (8, 32), (32, 8)])
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=["x".join(map(str, s)) for s in TILE_SHAPES])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tile_classes_torch_and_numpy_match_definition(dtype, shape, br, bc, window):
    """One implementation over two libraries: torch tensors (the torch op) and NumPy arrays (the NumPy-like path
    CuPy arrays take) give the classes of the definition, as int8 of their own library, for contiguous, strided
    and broadcast (stride 0) biases."""
    bias = _patchy_bias(shape, np.dtype(dtype), (br, bc), seed_from("tiles", dtype, shape, br, bc))
    want = _classes_by_definition(bias, br, bc, window)
    if shape == TILE_SHAPES[0] and not window:
        assert set(np.unique(want).tolist()) == {SKIP, ZERO, READ}, "the patches must give tiles of every class"
    from_torch = tile_classes(torch.from_numpy(bias), br, bc, window=window)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.int8
    np.testing.assert_array_equal(from_torch.numpy(), want, err_msg="torch")
    from_numpy = tile_classes(bias, br, bc, window=window)
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.int8
    np.testing.assert_array_equal(from_numpy, want, err_msg="numpy")
    strided = np.ascontiguousarray(bias.swapaxes(-1, -2)).swapaxes(-1, -2)  # keys not the innermost dim
    np.testing.assert_array_equal(tile_classes(strided, br, bc, window=window), want, err_msg="numpy, strided")
    broadcast = np.broadcast_to(bias[:1], bias.shape)  # stride 0 along batch
    np.testing.assert_array_equal(tile_classes(broadcast, br, bc, window=window),
                                  _classes_by_definition(np.ascontiguousarray(broadcast), br, bc, window),
                                  err_msg="numpy, broadcast")


def test_tile_classes_bf16_torch_matches_definition():
    bias = torch.from_numpy(_patchy_bias((2, 3, 45, 70), np.float32, (16, 16), seed_from("tiles bf16")))
    bias = bias.to(BF16)
    for window in (False, True):
        want = _classes_by_definition(bias.float().numpy(), 16, 16, window)  # bf16 → fp32 is exact
        np.testing.assert_array_equal(tile_classes(bias, 16, 16, window=window).numpy(), want)


def test_tile_classes_refuses_other_array_types():
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor, cupy\.ndarray or numpy\.ndarray, got builtins"):
        tile_classes([[[[0.0]]]], 16, 16, window=False)


# ---- CPU: argument errors, raised before any array is touched ---------------------------------------------------

def _host(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float16)


OPTION_ERRORS = [  # (id, keyword arguments, exception, message pattern)
    ("softcap-negative", dict(softcap=-1.0), ValueError, r"softcap is -1\.0; expected a finite cap > 0 on the logits"),
    ("softcap-nan", dict(softcap=float("nan")), ValueError, r"softcap is nan; expected a finite cap"),
    ("softcap-type", dict(softcap="5"), TypeError, r"softcap is a str; expected a float \(0 for none\)"),
    ("dropout-1", dict(dropout_p=1.0), ValueError, r"dropout_p is 1\.0; expected 0 <= dropout_p < 1"),
    ("dropout-negative", dict(dropout_p=-0.1), ValueError, r"dropout_p is -0\.1; expected 0 <= dropout_p < 1"),
    ("dropout-nan", dict(dropout_p=float("nan")), ValueError, r"dropout_p is nan; expected 0 <= dropout_p < 1"),
    ("dropout-type", dict(dropout_p="0.1"), TypeError, r"dropout_p is a str; expected a float, 0 <= dropout_p < 1"),
    ("seed-float", dict(dropout_p=0.1, dropout_seed=1.5), TypeError,
     r"dropout_seed is a float; expected an int .*or None to draw one from cupy\.random"),
    ("seed-bool", dict(dropout_p=0.1, dropout_seed=True), TypeError, r"dropout_seed is a bool; expected an int"),
    ("seed-array", dict(dropout_p=0.1, dropout_seed=np.array([3])), TypeError,
     r"dropout_seed is a ndarray; expected an int"),
    ("seed-too-large", dict(dropout_p=0.1, dropout_seed=2 ** 64), ValueError,
     r"dropout_seed is 18446744073709551616; expected a 64-bit int, in \[-2\*\*63, 2\*\*64\)"),
    ("window-left", dict(window=(-2, 0)), ValueError,
     r"window\[0\] \(left\) is -2; expected a number of keys >= 0, or -1 for unbounded"),
    ("window-right", dict(window=(4, -3)), ValueError, r"window\[1\] \(right\) is -3; expected a number of keys"),
    ("window-int", dict(window=8), TypeError, r"window is 8; expected \(left, right\): two ints"),
    ("window-float", dict(window=(8.0, 0)), TypeError, r"window is \(8\.0, 0\); expected \(left, right\)"),
    ("window-three", dict(window=(1, 2, 3)), TypeError, r"window is \(1, 2, 3\); expected \(left, right\)"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", [pytest.param(kw, e, p, id=i) for i, kw, e, p in OPTION_ERRORS])
def test_option_errors_need_no_gpu(cupy_api, kwargs, exc, pattern):
    """Each bad scalar argument is named, in the forward and the backward, before the (host) arrays are looked at."""
    q, kv = _host(1, 2, 16, 64), _host(1, 2, 24, 64)
    with pytest.raises(exc, match=pattern):
        cupy_api.flash_attn_forward(q, kv, kv, **kwargs)
    with pytest.raises(exc, match=pattern):
        cupy_api.flash_attn_backward(q, q, kv, kv, q, q[..., 0].astype(np.float32), **kwargs)


def test_valid_options_reach_the_array_checks(cupy_api):
    """Accepted arguments (both seed ranges' ends, a window, a cap) pass on to the array checks, which refuse the
    host array by name."""
    q, kv = _host(1, 2, 16, 64), _host(1, 2, 24, 64)
    for seed in (-2 ** 63, 2 ** 64 - 1, np.int64(7)):
        with pytest.raises(TypeError, match=r"q is a numpy\.ndarray; the CuPy face takes cupy\.ndarray"):
            cupy_api.flash_attn_forward(q, kv, kv, window=(8, 0), dropout_p=0.5, dropout_seed=seed, softcap=30.0)


BACKWARD_ERRORS = [  # (id, keyword arguments, message pattern)
    ("no-seed", dict(dropout_p=0.2), r"dropout_seed is None but dropout_p is 0\.2: the backward regenerates the "
                                     r"forward's dropout mask from its seed, so pass the int the forward used"),
    ("bias-grad-without-bias", dict(bias_grad=True), r"bias_grad=True needs attn_bias"),
    ("bias-grad-of-mask", dict(bias_grad=True, attn_bias=np.ones((1, 1, 16, 24), dtype=bool)),
     r"bias_grad=True but attn_bias is a boolean mask, which has no gradient"),
]


@pytest.mark.parametrize("kwargs,pattern", [pytest.param(kw, p, id=i) for i, kw, p in BACKWARD_ERRORS])
def test_backward_argument_errors_need_no_gpu(cupy_api, kwargs, pattern):
    q, kv = _host(1, 2, 16, 64), _host(1, 2, 24, 64)
    with pytest.raises(ValueError, match=pattern):
        cupy_api.flash_attn_backward(q, q, kv, kv, q, q[..., 0].astype(np.float32), **kwargs)


def test_cupy_face_imports_and_checks_without_torch(tmp_path):
    """The wheel runs without torch: the CuPy face, its argument checks and the tile classes (on NumPy arrays)
    work with torch unimportable, and nothing imports it."""
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    script = textwrap.dedent("""
        import sys
        import numpy as np
        from cupyflash import cupy_api
        from cupyflash.tile_classes import tile_classes
        print(tile_classes(np.zeros((1, 1, 5, 7), np.float16), 4, 4, window=False).tolist())
        try:
            cupy_api.flash_attn_forward(np.zeros((1, 1, 4, 64), np.float16), None, None, softcap=-1.0)
        except ValueError as err:
            print(err)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (blocker, ROOT)))}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes, error, torch_modules = proc.stdout.strip().splitlines()
    assert classes == "[[[[1, 2], [2, 2]]]]"  # the one whole all-zero tile reads nothing; the ragged ones read
    assert error.startswith("softcap is -1.0; expected a finite cap")
    assert torch_modules == "[]"


# ---- GPU helpers ------------------------------------------------------------------------------------------------

BIAS_SHAPES = {  # name: the bias's shape for (B, H, Nq, Nk)
    "BHQK": lambda b, h, nq, nk: (b, h, nq, nk),
    "1HQK": lambda b, h, nq, nk: (1, h, nq, nk),
    "B11K": lambda b, h, nq, nk: (b, 1, 1, nk),  # key padding
    "11QK": lambda b, h, nq, nk: (1, 1, nq, nk),
    "B1Q1": lambda b, h, nq, nk: (b, 1, nq, 1),  # size-1 key dim: a constant per row
}


def draw_bias(kind, q, k, dtype, seed):
    """(torch bias, CuPy bias) on the same memory, broadcastable to (B, Hq, Nq, Nk): 2·N(0, 1), or a boolean mask
    keeping ~70 %. Kinds: a BIAS_SHAPES name; "BHQK-strided" (keys not the innermost dim); "expanded" (a B11K bias
    expanded to full size: stride 0 along dims of full size); "padding" (B11K, every key from a per-batch length
    on masked: finfo.min for float biases, as Hugging Face builds them, False for masks)."""
    import cupy

    b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if kind == "padding":
        lengths = torch.randint(nk // 4, nk // 2 + 1, (b, 1, 1, 1), generator=gen, device="cuda")
        lengths[0] = nk  # one batch without padding: its tiles are all zero
        keep = torch.arange(nk, device="cuda") < lengths  # (B, 1, 1, Nk)
        bias = keep if dtype == torch.bool else torch.zeros(keep.shape, dtype=dtype, device="cuda").masked_fill(
            ~keep, torch.finfo(dtype).min)
        return bias, _cupy_view(bias)
    shape = BIAS_SHAPES["B11K" if kind == "expanded" else kind.removesuffix("-strided")](b, h, nq, nk)
    drawn = (shape[0], shape[1], shape[3], shape[2]) if kind.endswith("-strided") else shape
    if dtype == torch.bool:
        bias = torch.rand(drawn, generator=gen, device="cuda") > 0.3
    else:
        bias = (2.0 * torch.randn(drawn, generator=gen, device="cuda", dtype=FP32)).to(dtype)
    if kind.endswith("-strided"):
        bias = bias.transpose(-1, -2)
    if kind == "expanded":
        base_c = _cupy_view(bias)
        return bias.expand(b, h, nq, nk), cupy.broadcast_to(base_c, (b, h, nq, nk))
    return bias, _cupy_view(bias)


def _cupy_view(t):
    """A zero-copy CuPy view of a CUDA tensor (strides kept), once torch's stream has written it."""
    import cupy

    torch.cuda.synchronize()
    return cupy.from_dlpack(t)


def _to_torch(a):
    import cupy

    cupy.cuda.get_current_stream().synchronize()
    return torch.from_dlpack(a)


@contextlib.contextmanager
def poisoned_cupy_allocations():
    """Every CuPy allocation inside is filled with 0xFF bytes (NaN in fp16 and fp32) on the current stream before it
    is handed out, so an output element the kernels do not write reads as NaN (workspaces the face zeroes stay
    zero: cupy.zeros writes after)."""
    import cupy

    base = cupy.cuda.get_allocator()

    def poisoned(size):
        mem = base(size)
        if size:
            mem.memset_async(0xFF, size)
        return mem

    with cupy.cuda.using_allocator(poisoned):
        yield


@contextlib.contextmanager
def torch_tf32():
    """Lets the torch op take fp32 (it follows torch's TF32 setting) and torch's matmuls round to TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _dropout_seed(*params) -> int:
    """A seed with both 32-bit words nonzero (they are the two words of the Philox key)."""
    return (seed_from("hi", *params) << 30) ^ seed_from("lo", *params)


def check_cupy_features(cupy_api, q, k, v, dout, bias=None, bias_c=None, *, causal=False, window=(-1, -1),
                        dropout_p=0.0, seed=0, softcap=0.0, bias_grad=False):
    """The CuPy face on CuPy views of the CUDA tensors (bias: `bias_c`, the same memory) against the torch op on the
    tensors (the same kernels: equal out, lse, dk and dv; dq and dbias up to the order of their fp32 atomics), and
    against the reference with the tolerance rule. Returns {name: the face's result as a torch tensor}."""
    import cupy

    dtype, (b, h, n_q, d), n_k = q.dtype, q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(d)
    opts = dict(scale=scale, causal=causal, window=window, dropout_p=dropout_p,
                dropout_seed=seed if dropout_p > 0 else None, softcap=softcap, allow_tf32=dtype == FP32)
    qc, kc, vc, doc = (_cupy_view(t) for t in (q, k, v, dout))
    with poisoned_cupy_allocations():
        out_c, lse_c = cupy_api.flash_attn_forward(qc, kc, vc, bias_c, **opts)
        grads_c = cupy_api.flash_attn_backward(doc, qc, kc, vc, out_c, lse_c, bias_c, bias_grad=bias_grad, **opts)
    assert len(grads_c) == (4 if bias_grad else 3), f"{len(grads_c)} gradients for bias_grad={bias_grad}"
    names = ("out", "lse", "dq", "dk", "dv", "dbias")
    likes = (q, q[..., 0], q, k, v, bias)
    cupy_dtype = {FP16: cupy.float16, FP32: cupy.float32}
    for name, a, like in zip(names, (out_c, lse_c, *grads_c), likes):
        want = cupy.float32 if name == "lse" else cupy_dtype[like.dtype]
        assert isinstance(a, cupy.ndarray), f"{name}: {type(a)}"
        assert a.dtype == want and a.shape == tuple(like.shape), f"{name}: {a.dtype} {a.shape}"
        assert a.flags.c_contiguous, f"{name}: strides {a.strides}"
    ours = {name: _to_torch(a) for name, a in zip(names, (out_c, lse_c, *grads_c))}

    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda") if dropout_p > 0 else None
    with torch_tf32() if dtype == FP32 else contextlib.nullcontext():
        out_t, lse_t = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, scale, causal, *window, dropout_p, seed_t,
                                                          softcap)
        grads_t = torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, bias, out_t, lse_t, scale, causal, *window,
                                                     dropout_p, seed_t, bias_grad, softcap)
    for name, t in zip(("out", "lse", "dk", "dv"), (out_t, lse_t, grads_t[1], grads_t[2])):
        assert torch.equal(ours[name], t), f"{name}: the CuPy face differs from the torch op on the same inputs"
    assert_close_ulps(ours["dq"], grads_t[0], "dq vs torch op")
    if bias_grad:
        assert_close_ulps(ours["dbias"], grads_t[3], "dbias vs torch op")

    if dtype == FP32:
        # Equal to the torch op on the same memory (above), whose TF32 error against fp64 is held to the rule
        # beside TF32-rounded torch math in tests/test_gpu_features.py::test_fp32_on_tf32. A peer computed here
        # with torch's allow_tf32 is no TF32 peer: cuBLAS runs small and odd shapes in full fp32 even then.
        return ours
    kw = dict(scale=scale, causal=causal, window=window, dropout_p=dropout_p, seed=seed, bias_grad=bias_grad,
              softcap=softcap)
    r = semantics_ref(q, k, v, dout, bias=bias, **kw)
    keep = dropout_keep(seed, dropout_p, b, h, range(n_q), range(n_k)) if dropout_p > 0 else None
    kw.pop("seed")
    p = attention_ref(q, k, v, dout, compute_dtype=dtype, bias=bias, dropout_keep=keep, **kw)
    ref, pt = ({n: getattr(x, n) for n in names} for x in (r, p))
    assert_within_rule(ours["out"], ref["out"], pt["out"], OUT_FACTOR, rounding_floor(ref["out"], dtype), "out")
    assert_within_rule(ours["lse"], ref["lse"], pt["lse"], OUT_FACTOR, rounding_floor(ref["lse"], FP32), "lse")
    for name in ("dq", "dk", "dv", "dbias") if bias_grad else ("dq", "dk", "dv"):
        # dbias is rounded to the bias's dtype: the floor is that of the coarser of it and q's.
        floor_dtype = max((dtype, ours[name].dtype), key=lambda t: torch.finfo(t).eps)
        assert_within_rule(ours[name], ref[name], pt[name], GRAD_FACTOR, rounding_floor(ref[name], floor_dtype),
                           name)
    return ours


# ---- GPU: bias tile classes of CuPy arrays ---------------------------------------------------------------------

GPU_TILE_CASES = [((2, 3, 203, 113), 128, 64), ((2, 1, 1, 97), 64, 32), ((1, 2, 97, 1), 32, 128),
                  ((2, 2, 256, 512), 64, 64),  # 16-byte loads
                  ((1, 1, 1000, 1024), 128, 32)]  # ragged rows, 16-byte loads


@gpu
@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "broadcast"])
@pytest.mark.parametrize("shape,br,bc", GPU_TILE_CASES, ids=[f"{'x'.join(map(str, c[0]))}-{c[1]}x{c[2]}"
                                                             for c in GPU_TILE_CASES])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tile_classes_of_cupy_arrays(cupy_api, dtype, shape, br, bc, layout, window):
    """The classification the CuPy face launches (launch.classify_tiles, two kernels, on CuPy's allocations) and
    cupyflash/tile_classes.py on the CuPy array itself both give the definition's classes, for contiguous, strided
    (keys not innermost) and broadcast (stride 0 along batch) biases."""
    import cupy

    from cupyflash import cuda_path, launch
    from cupyflash.array_ops import ops_for

    bias = cupy.asarray(_patchy_bias(shape, np.dtype(dtype), (br, bc), seed_from("gpu tiles", dtype, shape, br, bc)))
    if layout == "strided":
        bias = cupy.ascontiguousarray(bias.swapaxes(-1, -2)).swapaxes(-1, -2)
    elif layout == "broadcast":
        bias = cupy.broadcast_to(bias[:1], bias.shape)
    want = _classes_by_definition(cupy.asnumpy(bias), br, bc, window)
    reference = tile_classes(bias, br, bc, window=window)
    assert isinstance(reference, cupy.ndarray) and reference.dtype == cupy.int8
    np.testing.assert_array_equal(cupy.asnumpy(reference), want, err_msg="tile_classes on the CuPy array")
    xp, held = ops_for(bias), []
    got = launch.classify_tiles(dtype=dtype, bias=cuda_path.broadcast_buf(xp, bias), bias_shape=bias.shape,
                                bias_f32=dtype == "float32", br=br, bc=bc, window=window,
                                alloc=cuda_path.holding_alloc(xp, bias, held),
                                stream_ptr=cupy.cuda.get_current_stream().ptr, device_id=bias.device.id)
    assert isinstance(got, cupy.ndarray) and got.dtype == cupy.int8
    np.testing.assert_array_equal(cupy.asnumpy(got), want, err_msg="launch.classify_tiles")


# ---- GPU: fp16 CuPy arrays, each feature alone and combined -----------------------------------------------------

@gpu
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_q,n_k", [(113, 203), (203, 113)])
def test_cupy_fp16_matches_torch_op(cupy_api, n_q, n_k, head_dim, causal, layout):
    """No score modification: the plain kernels, strided (transposed-view) arrays read in place."""
    q, k, v, dout = draw_inputs(2, 3, 3, n_q, n_k, head_dim, FP16, layout,
                                seed_from("cupy", n_q, n_k, head_dim, causal, layout))
    check_cupy_features(cupy_api, q, k, v, dout, causal=causal)


FEATURE_CASES = [  # (id, head_dim, causal, (Nq, Nk), Hq, Hkv, bias (kind, dtype) or None, window, p, softcap, layout)
    ("bias-fp16", 64, False, (113, 203), 3, 3, ("BHQK", FP16), (-1, -1), 0.0, 0.0, "contiguous"),
    ("bias-fp32-heads", 128, False, (203, 113), 3, 3, ("1HQK", FP32), (-1, -1), 0.0, 0.0, "transposed"),
    ("bias-key-padding", 64, True, (97, 97), 3, 3, ("B11K", FP16), (-1, -1), 0.0, 0.0, "contiguous"),
    ("bias-strided", 128, False, (113, 203), 3, 3, ("BHQK-strided", FP32), (-1, -1), 0.0, 0.0, "contiguous"),
    ("bias-rows", 64, False, (17, 17), 3, 3, ("B1Q1", FP16), (-1, -1), 0.0, 0.0, "contiguous"),
    ("bias-expanded", 64, True, (113, 203), 4, 4, ("expanded", FP16), (-1, -1), 0.0, 0.0, "contiguous"),
    ("mask", 128, False, (203, 113), 3, 3, ("BHQK", torch.bool), (-1, -1), 0.0, 0.0, "contiguous"),
    ("mask-11QK", 64, True, (113, 203), 3, 3, ("11QK", torch.bool), (-1, -1), 0.0, 0.0, "transposed"),
    ("gqa", 64, False, (113, 203), 4, 2, None, (-1, -1), 0.0, 0.0, "contiguous"),
    ("mqa-causal", 128, True, (203, 113), 4, 1, None, (-1, -1), 0.0, 0.0, "transposed"),
    ("bias+causal+gqa", 128, True, (113, 203), 4, 2, ("1HQK", FP32), (-1, -1), 0.0, 0.0, "contiguous"),
    ("bias+causal+mqa", 64, True, (203, 113), 4, 1, ("BHQK", FP16), (-1, -1), 0.0, 0.0, "transposed"),
    ("window", 64, False, (203, 113), 3, 3, None, (16, 8), 0.0, 0.0, "contiguous"),
    ("window+causal", 128, True, (113, 203), 3, 3, None, (32, -1), 0.0, 0.0, "contiguous"),
    ("window-diagonal", 64, False, (97, 97), 3, 1, None, (0, 0), 0.0, 0.0, "contiguous"),
    ("window-rows-without-keys", 64, False, (203, 113), 3, 3, None, (-1, 5), 0.0, 0.0, "contiguous"),
    ("dropout", 64, False, (113, 203), 3, 3, None, (-1, -1), 0.2, 0.0, "contiguous"),
    ("dropout+causal", 128, True, (97, 97), 3, 3, None, (-1, -1), 0.3, 0.0, "transposed"),
    ("mask+dropout", 64, False, (113, 203), 4, 2, ("B11K", torch.bool), (-1, -1), 0.3, 0.0, "contiguous"),
    ("mask+dropout+causal", 128, True, (113, 203), 4, 2, ("BHQK", torch.bool), (-1, -1), 0.1, 0.0, "contiguous"),
    ("bias+dropout", 128, False, (97, 97), 3, 3, ("1HQK", FP32), (-1, -1), 0.25, 0.0, "transposed"),
    ("softcap", 64, False, (17, 17), 4, 4, None, (-1, -1), 0.0, 5.0, "contiguous"),
    ("softcap+causal", 128, True, (113, 203), 4, 2, None, (-1, -1), 0.0, 5.0, "transposed"),
    ("softcap+window", 64, False, (203, 113), 3, 3, None, (48, 24), 0.0, 5.0, "contiguous"),
    ("softcap+window+causal+bias", 128, True, (113, 203), 4, 2, ("11QK", FP32), (30, -1), 0.0, 5.0, "contiguous"),
    ("everything-d32", 32, True, (113, 203), 4, 2, ("1HQK", FP32), (48, 24), 0.15, 5.0, "transposed"),
    ("everything-d96", 96, False, (203, 113), 4, 2, ("B11K", torch.bool), (48, 24), 0.15, 5.0, "transposed"),
    ("padding-finfo-min-large", 64, False, (1023, 1024), 2, 2, ("padding", FP32), (-1, -1), 0.0, 0.0, "contiguous"),
    ("padding-mask-large", 128, True, (1023, 1024), 2, 1, ("padding", torch.bool), (-1, -1), 0.1, 0.0,
     "contiguous"),
]


@gpu
@pytest.mark.parametrize("head_dim,causal,lengths,h_q,h_kv,bias,window,p,softcap,layout",
                         [pytest.param(*c[1:], id=c[0]) for c in FEATURE_CASES])
def test_cupy_features(cupy_api, head_dim, causal, lengths, h_q, h_kv, bias, window, p, softcap, layout):
    """Biases (fp16, fp32, masks; broadcast, strided, expanded, padding masks whose tiles are skipped or not read)
    with their gradient, grouped-query K/V, windows, dropout and soft-capping, alone and combined."""
    n_q, n_k = lengths
    seed = seed_from("cupy features", head_dim, causal, lengths, h_q, h_kv, bias, window, p, softcap, layout)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, n_q, n_k, head_dim, FP16, layout, seed,
                                qk_scale=2.0 if softcap else 1.0)
    attn_bias, bias_c = draw_bias(bias[0], q, k, bias[1], seed + 1) if bias else (None, None)
    # A size-1 key dim adds a constant per row, whose gradient is exactly 0: nothing to compare (test_gpu_features).
    bias_grad = attn_bias is not None and attn_bias.dtype != torch.bool and attn_bias.shape[-1] != 1
    check_cupy_features(cupy_api, q, k, v, dout, attn_bias, bias_c, causal=causal, window=window, dropout_p=p,
                        seed=_dropout_seed(seed), softcap=softcap, bias_grad=bias_grad)


# ---- GPU: fp32 on TF32 tensor cores -----------------------------------------------------------------------------

TF32_CASES = [  # (id, head_dim, causal, (Nq, Nk), Hq, Hkv, bias (kind, dtype) or None, window, p, softcap, layout)
    ("plain", 64, False, (97, 97), 3, 3, None, (-1, -1), 0.0, 0.0, "contiguous"),
    ("bias+causal+gqa", 128, True, (113, 203), 4, 2, ("1HQK", FP32), (-1, -1), 0.0, 0.0, "transposed"),
    ("fp16-bias", 64, False, (203, 113), 3, 3, ("B11K", FP16), (-1, -1), 0.0, 0.0, "contiguous"),
    ("mask+dropout+softcap+window", 64, True, (113, 203), 4, 2, ("BHQK", torch.bool), (40, 8), 0.2, 5.0,
     "transposed"),
    ("d96", 96, False, (113, 203), 4, 2, None, (-1, -1), 0.0, 0.0, "contiguous"),
]


@gpu
@pytest.mark.parametrize("head_dim,causal,lengths,h_q,h_kv,bias,window,p,softcap,layout",
                         [pytest.param(*c[1:], id=c[0]) for c in TF32_CASES])
def test_cupy_fp32_with_allow_tf32(cupy_api, head_dim, causal, lengths, h_q, h_kv, bias, window, p, softcap,
                                   layout):
    """fp32 arrays with allow_tf32=True: the torch op's TF32 kernels (equal results; their accuracy is tested in
    test_gpu_features.py::test_fp32_on_tf32); an fp16 bias is read as fp32."""
    seed = seed_from("cupy tf32", head_dim, causal, lengths, h_q, h_kv, bias, window, p, softcap, layout)
    q, k, v, dout = draw_inputs(BATCH, h_q, h_kv, *lengths, head_dim, FP32, layout, seed,
                                qk_scale=2.0 if softcap else 1.0)
    attn_bias, bias_c = draw_bias(bias[0], q, k, bias[1], seed + 1) if bias else (None, None)
    check_cupy_features(cupy_api, q, k, v, dout, attn_bias, bias_c, causal=causal, window=window, dropout_p=p,
                        seed=_dropout_seed(seed), softcap=softcap,
                        bias_grad=attn_bias is not None and attn_bias.dtype != torch.bool)


@gpu
def test_fp32_needs_allow_tf32(cupy_api):
    """Without allow_tf32, fp32 is refused with the way to allow it, for CuPy arrays and torch tensors alike."""
    q, k, v, _ = draw_inputs(1, 2, 2, 17, 17, 64, FP32, "contiguous", seed_from("tf32 refused"))
    qc, kc, vc = (_cupy_view(t) for t in (q, k, v))
    for args in ((qc, kc, vc), (q, k, v)):
        with pytest.raises(TypeError, match=r"q has dtype float32: .*TF32 tensor cores.*allow_tf32=True"):
            cupy_api.flash_attn_forward(*args)


# ---- GPU: dropout seeds ---------------------------------------------------------------------------------------

@gpu
def test_dropout_determinism_and_seeds(cupy_api):
    """Same seed: identical out and lse bits, identical dK/dV, dQ and dBias equal up to the order of their fp32
    atomics; another seed changes nearly every output element but not the lse (dropout acts after the softmax)."""
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, 64, FP16, "contiguous", seed_from("cupy determinism"))
    _, bias = draw_bias("1HQK", q, k, FP16, seed_from("cupy determinism bias"))
    qc, kc, vc, doc = (_cupy_view(t) for t in (q, k, v, dout))
    opts = dict(causal=True, window=(64, -1), dropout_p=0.2)
    runs = []
    for seed in (_dropout_seed("cupy det", 0), _dropout_seed("cupy det", 0), _dropout_seed("cupy det", 1)):
        with poisoned_cupy_allocations():
            out, lse = cupy_api.flash_attn_forward(qc, kc, vc, bias, dropout_seed=seed, **opts)
            grads = cupy_api.flash_attn_backward(doc, qc, kc, vc, out, lse, bias, dropout_seed=seed, bias_grad=True,
                                                 **opts)
        runs.append([_to_torch(a) for a in (out, lse, *grads)])
    assert not any(torch.isnan(t).any() for t in runs[0])
    assert_dropout_runs_agree(runs)


@gpu
def test_dropout_seed_none_draws_from_cupy_random(cupy_api):
    """dropout_seed=None draws the key from cupy.random on the device: cupy.random.seed reproduces the run, the key is
    the next draw of cupy.random (the run equals the one with that int), and the next call draws another."""
    import cupy

    q, k, v, _ = draw_inputs(BATCH, 4, 4, 97, 203, 64, FP16, "contiguous", seed_from("cupy seed none"))
    qc, kc, vc = (_cupy_view(t) for t in (q, k, v))

    def run(seed=None):
        return _to_torch(cupy_api.flash_attn_forward(qc, kc, vc, causal=True, dropout_p=0.3, dropout_seed=seed)[0])

    cupy.random.seed(1234)
    first, following = run(), run()
    cupy.random.seed(1234)
    again = run()
    cupy.random.seed(1234)
    drawn = int(cupy.random.randint(0, 2 ** 62, size=(), dtype=cupy.int64))
    assert torch.equal(first, again), "cupy.random.seed must reproduce a run with dropout_seed=None"
    assert torch.equal(first, run(drawn)), "the key must be cupy.random's next draw"
    assert (first != following).float().mean().item() > 0.9, "the next call must draw another key"


@gpu
def test_seed_bits_above_int63(cupy_api):
    """Seeds in [2**63, 2**64) are taken as their 64 bits: the same run as the int64 with those bits, and the
    reference's mask for them."""
    q, k, v, _ = draw_inputs(1, 2, 2, 97, 97, 64, FP16, "contiguous", seed_from("cupy seed bits"))
    qc, kc, vc = (_cupy_view(t) for t in (q, k, v))
    seed = 2 ** 64 - 12345
    out_u, _ = cupy_api.flash_attn_forward(qc, kc, vc, dropout_p=0.3, dropout_seed=seed)
    out_i, _ = cupy_api.flash_attn_forward(qc, kc, vc, dropout_p=0.3, dropout_seed=seed - 2 ** 64)
    assert torch.equal(_to_torch(out_u), _to_torch(out_i))
    ref = semantics_ref(q, k, v, scale=0.125, causal=False, dropout_p=0.3, seed=seed)
    keep = dropout_keep(seed, 0.3, 1, 2, range(97), range(97))
    pt = attention_ref(q, k, v, scale=0.125, causal=False, compute_dtype=FP16, dropout_keep=keep, dropout_p=0.3)
    assert_within_rule(_to_torch(out_u), ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, FP16), "out")


# ---- GPU: torch tensors through the face ------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_torch_tensors_through_dlpack(cupy_api, head_dim, causal):
    """Torch tensors (here bf16, which CuPy has no dtype for) go through the torch op and come back as torch."""
    q, k, v, dout = draw_inputs(2, 3, 3, 97, 203, head_dim, BF16, "contiguous", seed_from("dlpack", head_dim, causal))
    scale = 0.3
    out, lse = cupy_api.flash_attn_forward(q, k, v, scale=scale, causal=causal)
    grads = cupy_api.flash_attn_backward(dout, q, k, v, out, lse, scale=scale, causal=causal)
    assert len(grads) == 3
    torch.cuda.synchronize()
    for name, t, like, dtype in (("out", out, q, BF16), ("lse", lse, q[..., 0], FP32), ("dq", grads[0], q, BF16),
                                 ("dk", grads[1], k, BF16), ("dv", grads[2], v, BF16)):
        assert isinstance(t, torch.Tensor), f"{name}: got {type(t)}, expected torch.Tensor for torch inputs"
        assert t.dtype == dtype and t.shape == like.shape and t.is_cuda, f"{name}: {t.dtype} {tuple(t.shape)}"
    ref = attention_ref(q, k, v, dout, scale=scale, causal=causal)
    pt = attention_ref(q, k, v, dout, scale=scale, causal=causal, compute_dtype=BF16)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, BF16), "out")
    assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, rounding_floor(ref.lse, FP32), "lse")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, (ref.dq, ref.dk, ref.dv), (pt.dq, pt.dk, pt.dv)):
        assert_within_rule(g, r, p, GRAD_FACTOR, rounding_floor(r, BF16), name)


@gpu
def test_torch_tensors_take_every_option(cupy_api):
    """bf16 tensors with a bias (and its gradient), GQA, causal, a window, dropout with an int seed and a soft cap:
    every argument reaches the torch op (equal to calling it), and the result is the reference's."""
    q, k, v, dout = draw_inputs(BATCH, 4, 2, 113, 203, 64, BF16, "transposed", seed_from("torch options"), 2.0)
    bias, _ = draw_bias("1HQK", q, k, BF16, seed_from("torch options bias"))
    seed, scale, window, p, cap = _dropout_seed("torch options"), 0.125, (48, 8), 0.2, 5.0
    opts = dict(scale=scale, causal=True, window=window, dropout_p=p, dropout_seed=seed, softcap=cap)
    out, lse = cupy_api.flash_attn_forward(q, k, v, bias, **opts)
    dq, dk, dv, dbias = cupy_api.flash_attn_backward(dout, q, k, v, out, lse, bias, bias_grad=True, **opts)
    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda")
    out_t, lse_t = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, scale, True, *window, p, seed_t, cap)
    grads_t = torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, bias, out_t, lse_t, scale, True, *window, p, seed_t,
                                                 True, cap)
    assert torch.equal(out, out_t) and torch.equal(lse, lse_t)
    for name, ours, theirs in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), grads_t):
        assert_close_ulps(ours, theirs, f"{name} vs torch op")
    ref = semantics_ref(q, k, v, dout, scale=scale, causal=True, bias=bias, window=window, dropout_p=p, seed=seed,
                        bias_grad=True, softcap=cap)
    keep = dropout_keep(seed, p, BATCH, 4, range(113), range(203))
    pt = attention_ref(q, k, v, dout, scale=scale, causal=True, compute_dtype=BF16, bias=bias, window=window,
                       dropout_keep=keep, dropout_p=p, bias_grad=True, softcap=cap)
    assert_within_rule(out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, BF16), "out")
    for name, ours, r, pp in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), (ref.dq, ref.dk, ref.dv, ref.dbias),
                                 (pt.dq, pt.dk, pt.dv, pt.dbias)):
        assert_within_rule(ours, r, pp, GRAD_FACTOR, rounding_floor(r, BF16), name)


@gpu
def test_torch_tensors_seed_none_follows_torch_generator(cupy_api):
    """Torch tensors with dropout_seed=None draw the key from torch's generator, as cupyflash.flash_attention."""
    q, k, v, _ = draw_inputs(BATCH, 4, 4, 97, 97, 64, BF16, "contiguous", seed_from("torch seed none"))
    torch.manual_seed(99)
    first, following = (cupy_api.flash_attn_forward(q, k, v, dropout_p=0.3)[0] for _ in range(2))
    torch.manual_seed(99)
    again = cupy_api.flash_attn_forward(q, k, v, dropout_p=0.3)[0]
    assert torch.equal(first, again) and (first != following).float().mean().item() > 0.9


# ---- GPU: input errors ------------------------------------------------------------------------------------------

@gpu
def test_host_array_among_device_arrays_is_named(cupy_api):
    """A host (NumPy) k next to CuPy q and v: the error names k."""
    import cupy

    q = cupy.random.standard_normal((1, 2, 16, 64), dtype=cupy.float32).astype(cupy.float16)
    k = np.random.default_rng(0).standard_normal((1, 2, 16, 64)).astype(np.float16)
    with pytest.raises((TypeError, ValueError), match=r"(?is)(?=.*\bk\b)(?=.*(cuda|gpu|device|host|numpy))"):
        cupy_api.flash_attn_forward(q, k, q, causal=False)


def _bias_errors():
    """(id, bias builder taking the cupy module, exception, pattern) for q (1, 2, 16, D) and k, v (1, 2, 24, D)."""
    return [
        ("float64", lambda cp: cp.zeros((1, 2, 16, 24), dtype=cp.float64), TypeError,
         r"attn_bias has dtype float64; expected bool \(a mask, True = keep\), float16 or float32"),
        ("int8", lambda cp: cp.zeros((1, 2, 16, 24), dtype=cp.int8), TypeError, r"attn_bias has dtype int8"),
        ("seqlen_q", lambda cp: cp.zeros((1, 2, 5, 24), dtype=cp.float16), ValueError,
         r"attn_bias dim 2 \(seqlen_q\) is 5; expected 16 or 1 to broadcast"),
        ("seqlen_k", lambda cp: cp.zeros((1, 1, 1, 16), dtype=cp.float16), ValueError,
         r"attn_bias dim 3 \(seqlen_k\) is 16; expected 24 or 1 to broadcast"),
        ("3-D", lambda cp: cp.zeros((2, 16, 24), dtype=cp.float16), ValueError,
         r"attn_bias must be 4-D, broadcastable to \(batch, heads, seqlen_q, seqlen_k\) = \(1, 2, 16, 24\)"),
        ("host", lambda cp: np.zeros((1, 2, 16, 24), dtype=np.float16), TypeError,
         r"attn_bias is a numpy\.ndarray; the CuPy face takes cupy\.ndarray"),
        ("torch-beside-cupy", lambda cp: torch.zeros(1, 2, 16, 24, device="cuda", dtype=FP16), TypeError,
         r"attn_bias is a torch\.Tensor; the CuPy face takes cupy\.ndarray"),
    ]


@gpu
@pytest.mark.parametrize("build,exc,pattern", [pytest.param(b, e, p, id=i) for i, b, e, p in _bias_errors()])
def test_bias_errors(cupy_api, build, exc, pattern):
    """Each bad attn_bias is named with the dim and what was expected, in the forward and the backward."""
    import cupy

    q, k, v, dout = draw_inputs(1, 2, 2, 16, 24, 64, FP16, "contiguous", seed_from("bias errors"))
    qc, kc, vc, doc = (_cupy_view(t) for t in (q, k, v, dout))
    bias = build(cupy)
    with pytest.raises(exc, match=pattern):
        cupy_api.flash_attn_forward(qc, kc, vc, bias)
    out, lse = cupy_api.flash_attn_forward(qc, kc, vc)
    with pytest.raises(exc, match=pattern):
        cupy_api.flash_attn_backward(doc, qc, kc, vc, out, lse, bias)


@gpu
def test_cupy_bias_beside_torch_tensors_is_named(cupy_api):
    import cupy

    q, k, v, _ = draw_inputs(1, 2, 2, 16, 24, 64, BF16, "contiguous", seed_from("mixed kinds"))
    with pytest.raises(TypeError, match=r"attn_bias is a cupy\.ndarray but q is a torch tensor"):
        cupy_api.flash_attn_forward(q, k, v, cupy.zeros((1, 1, 16, 24), dtype=cupy.float16))


@gpu
def test_backward_array_errors(cupy_api):
    """dout, out and lse that do not fit q are named, with what was expected."""
    import cupy

    q, k, v, dout = draw_inputs(1, 2, 2, 16, 24, 64, FP16, "contiguous", seed_from("backward errors"))
    qc, kc, vc, doc = (_cupy_view(t) for t in (q, k, v, dout))
    out, lse = cupy_api.flash_attn_forward(qc, kc, vc)
    with pytest.raises(ValueError, match=r"dout must be shaped like the output, \(batch, heads, seqlen_q, v's "
                                         r"head_dim\) = \(1, 2, 16, 64\), in q's dtype float16; got "
                                         r"\(1, 2, 15, 64\) float16"):
        cupy_api.flash_attn_backward(doc[:, :, 1:], qc, kc, vc, out, lse)
    with pytest.raises(ValueError, match=r"out must be shaped like the output, .* got \(1, 2, 16, 64\) float32"):
        cupy_api.flash_attn_backward(doc, qc, kc, vc, out.astype(cupy.float32), lse)
    with pytest.raises(ValueError, match=r"lse must be float32 of shape \(batch, heads, seqlen_q\) = \(1, 2, 16\), "
                                         r"got float16"):
        cupy_api.flash_attn_backward(doc, qc, kc, vc, out, lse.astype(cupy.float16))


@gpu
def test_strided_dout_and_empty_batch(cupy_api):
    """dout with a non-contiguous last dim is read through a copy (same gradients); batch 0 gives empty results
    without a launch."""
    import cupy

    q, k, v, dout = draw_inputs(1, 2, 2, 64, 96, 64, FP16, "contiguous", seed_from("strided dout"))
    qc, kc, vc, doc = (_cupy_view(t) for t in (q, k, v, dout))
    out, lse = cupy_api.flash_attn_forward(qc, kc, vc, causal=True)
    strided = cupy.ascontiguousarray(doc.swapaxes(-1, -2)).swapaxes(-1, -2)  # (B, H, Nq, D), last-dim stride Nq
    assert strided.strides[3] != strided.itemsize
    want = cupy_api.flash_attn_backward(doc, qc, kc, vc, out, lse, causal=True)
    got = cupy_api.flash_attn_backward(strided, qc, kc, vc, out, lse, causal=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close_ulps(_to_torch(a), _to_torch(b), f"{name}, strided dout")
    empty_q, empty_kv = cupy.empty((0, 2, 16, 64), cupy.float16), cupy.empty((0, 2, 24, 64), cupy.float16)
    out, lse = cupy_api.flash_attn_forward(empty_q, empty_kv, empty_kv)
    assert out.shape == (0, 2, 16, 64) and lse.shape == (0, 2, 16)
    grads = cupy_api.flash_attn_backward(empty_q, empty_q, empty_kv, empty_kv, out, lse)
    assert [g.shape for g in grads] == [(0, 2, 16, 64), (0, 2, 24, 64), (0, 2, 24, 64)]
