"""The torch op's CPU implementation against eager math, and its registration (opcheck)."""
import pytest
import torch

import cupyflash
import cupyflash.torch_op  # noqa: F401  (registers torch.ops.cupyflash.*: a test run alone needs it too)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (97, 33), (33, 97)])
def test_cpu_matches_eager_fp64(causal, n_q, n_k):
    torch.manual_seed(n_q * 1000 + n_k)
    q = torch.randn(2, 3, n_q, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, n_k, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = cupyflash.flash_attention(q, k, v, causal=causal)
    s = q @ k.transpose(-1, -2) / 4.0
    if causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q)
        s = s.masked_fill(~keep, float("-inf"))
    ref = torch.softmax(s, dim=-1).nan_to_num(0.0) @ v
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)  # lse is kept in fp32


@pytest.mark.parametrize("token_major", [False, True])
def test_opcheck(token_major):
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.cupyflash.flash_attn_fwd.default, (q, k, v, None, 0.3, True),
                          {"token_major_out": token_major})


@pytest.mark.parametrize("case", ["softcap", "dropout", "bias-softcap-dropout"])
def test_opcheck_softcap_and_dropout(case):
    """Schema, fake implementation and autograd registration with the trailing softcap and the seed tensor."""
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 9, 9, requires_grad=True) if case.startswith("bias") else None
    p = 0.0 if case == "softcap" else 0.2
    seed = torch.tensor(12345, dtype=torch.int64) if p else None
    cap = 0.0 if case == "dropout" else 2.5
    torch.library.opcheck(torch.ops.cupyflash.flash_attn_fwd.default, (q, k, v, bias, 0.3, True, -1, -1, p, seed, cap))


def test_dropout_seed_reaches_the_implementation_as_a_device_tensor(monkeypatch):
    """flash_attention hands the implementation the seed as a 0-dim int64 tensor on q's device (the CUDA kernels
    read it from device memory), not a host int, and nothing when dropout is off."""
    seen = []
    forward = cupyflash.cpu_attention.forward

    def spy(*args, **kwargs):
        seen.append(args[8])
        return forward(*args, **kwargs)

    monkeypatch.setattr(cupyflash.cpu_attention, "forward", spy)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    cupyflash.flash_attention(q, k, v, dropout_p=0.2)
    cupyflash.flash_attention(q, k, v)
    (seed, off) = seen
    assert isinstance(seed, torch.Tensor) and seed.shape == () and seed.dtype == torch.int64
    assert seed.device == q.device and off is None


def test_compiled_dropout_draws_a_fresh_seed_per_call():
    """Under torch.compile the seed is an RNG op in the graph, not a constant traced once: each call drops
    differently (as each replay of a captured CUDA graph does), and torch.manual_seed reproduces a call."""
    q, k, v = (torch.randn(1, 2, 17, 8) for _ in range(3))
    fn = torch.compile(lambda q, k, v: cupyflash.flash_attention(q, k, v, dropout_p=0.3), backend="aot_eager",
                       fullgraph=True)
    torch.manual_seed(5)
    first, second = fn(q, k, v), fn(q, k, v)
    assert not torch.equal(first, second)
    torch.manual_seed(5)
    assert torch.equal(fn(q, k, v), first)


@pytest.mark.parametrize("features", [
    dict(causal=True),
    dict(causal=False, window=(5, 2), softcap=20.0),
    dict(causal=True, bias=True),
])
def test_eager_path_matches_the_op(features, monkeypatch):
    """flash_attention outside torch.compile skips the custom-op dispatcher (torch_op._EagerAttention) and must
    give exactly the op's outputs and gradients, bias gradient included; it must not call the op."""
    from cupyflash import torch_op

    torch.manual_seed(len(features))
    q = torch.randn(2, 4, 37, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 29, 16, dtype=torch.float64) for _ in range(2))  # grouped-query heads
    bias = torch.randn(2, 1, 37, 29, dtype=torch.float64) if features.get("bias") else None
    dout = torch.randn(2, 4, 37, 16, dtype=torch.float64)
    causal, window, softcap = features["causal"], features.get("window", (-1, -1)), features.get("softcap", 0.0)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias) if t is not None]
        out = fn(*leaves[:3], leaves[3] if bias is not None else None)
        return (out, *torch.autograd.grad(out, leaves, dout))

    op = run(lambda q_, k_, v_, b_: torch.ops.cupyflash.flash_attn_fwd(q_, k_, v_, b_, 0.25, causal, *window, 0.0,
                                                                         None, softcap)[0])
    monkeypatch.setattr(torch_op, "flash_attn_fwd", lambda *a: pytest.fail("the eager path called the op"))
    eager = run(lambda q_, k_, v_, b_: cupyflash.flash_attention(q_, k_, v_, b_, scale=0.25, causal=causal,
                                                                 window=window, softcap=softcap))
    assert len(eager) == len(op) == (5 if bias is not None else 4)
    for got, want in zip(eager, op):
        assert torch.equal(got, want)


def test_input_checks_cached_by_layout_still_refuse_every_bad_call():
    """The op's input checks are cached per (shape, strides, dtype, device) of q, k, v: a layout that passed is not
    checked again, and one that fails raises each time (only passing checks are cached)."""
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    for _ in range(2):
        assert cupyflash.flash_attention(q, k, v).shape == q.shape
        with pytest.raises(ValueError, match="same head_dim"):
            cupyflash.flash_attention(q, k[..., :4], v)
        with pytest.raises(TypeError, match="dtype"):
            cupyflash.flash_attention(q, k.float(), v)


def _lse_loss_ref(q, k, v, g, g_lse, causal, mask=None):
    """<out, g> + <lse, g_lse> in fp64 autograd: the reference for the op's gradient through the LSE."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n_q, n_k = s.shape[-2:]
    if causal:
        s = s.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(n_k - n_q), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    loss = (torch.softmax(s, -1) @ v * g.double()).sum() + (torch.logsumexp(s, -1) * g_lse.double()).sum()
    return torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True)])
def test_lse_gradient_reaches_q_and_k(causal, masked):
    """A loss reading lse (attention sinks, merging partial attentions) gets its gradient through the backward
    (D - dLSE): the op under autograd, its backward called with dlse, and flash_attention(return_lse=True), against
    fp64 autograd; a key mask leaves the masked keys' gradient 0."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (17, 23, 23))
    g, g_lse = torch.randn(2, 3, 17, 16), torch.randn(2, 3, 17)
    mask = (torch.rand(2, 1, 1, 23) > 0.3) if masked else None
    if masked:
        mask[..., 0] = True  # every row keeps a key: lse finite
    ref = _lse_loss_ref(q, k, v, g, g_lse, causal, mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.cupyflash.flash_attn_fwd(*leaves, mask, 0.25, causal)
    assert out.requires_grad and lse.requires_grad
    by_autograd = torch.autograd.grad((out, lse), leaves, (g, g_lse))
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, 0.25, causal)
    by_call = torch.ops.cupyflash.flash_attn_bwd(g, q, k, v, mask, out, lse, 0.25, causal, dlse=g_lse)[:3]
    out, lse = cupyflash.flash_attention(*leaves, mask, causal=causal, return_lse=True)
    by_function = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), leaves)
    for grads in (by_autograd, by_call, by_function):
        for name, ours, want in zip(("dq", "dk", "dv"), grads, ref):
            torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    without = _lse_loss_ref(q, k, v, g, torch.zeros_like(g_lse), causal, mask)
    assert (without[0] - ref[0]).abs().max() > 0.1  # the LSE's term is there to be missed


def test_lse_gradient_alone_and_out_gradient_alone():
    """Only lse in the loss (out's gradient None: zeros stand in) or only out (lse's None: no dlse, the plain
    backward) give fp64 autograd's gradients."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    out, lse = cupyflash.flash_attention(q, k, v, return_lse=True)
    dq, dk, dv = torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True)
    ref = _lse_loss_ref(q, k, v, torch.zeros(1, 2, 9, 8), torch.ones(1, 2, 9), False)
    torch.testing.assert_close(dq.double(), ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dk.double(), ref[1], rtol=1e-4, atol=1e-5)
    assert dv is None or not dv.any()
    out, lse = cupyflash.flash_attention(q, k, v, return_lse=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = _lse_loss_ref(q, k, v, torch.ones(1, 2, 9, 8), torch.zeros(1, 2, 9), False)
    for ours, want in zip(grads, ref):
        torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-5)


def test_lse_gradient_under_torch_compile():
    """The LSE's gradient through the op as AOTAutograd traces it (the op's registered autograd and fake)."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 11, 8, requires_grad=True) for _ in range(3))
    sink = torch.randn(2, requires_grad=True)

    def sinks(q, k, v, sink):
        out, lse = cupyflash.flash_attention(q, k, v, causal=True, return_lse=True)
        return out * torch.sigmoid(lse - sink[:, None])[..., None]

    eager = torch.autograd.grad(sinks(q, k, v, sink).square().sum(), (q, k, v, sink))
    compiled = torch.compile(sinks, backend="aot_eager", fullgraph=True)
    for ours, want in zip(torch.autograd.grad(compiled(q, k, v, sink).square().sum(), (q, k, v, sink)), eager):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_bad_lse_gradient_is_refused_by_name():
    q, k, v, dout = (torch.randn(1, 2, 5, 8) for _ in range(4))
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, False)
    with pytest.raises(ValueError, match=r"dlse \(the gradient of lse\) must be float32 of shape"):
        torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, 0.25, False, dlse=lse[..., :4])
    with pytest.raises(ValueError, match="dlse .* must be float32"):
        torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, 0.25, False, dlse=lse.double())
    with pytest.raises(ValueError, match="return_lse=True with dropout_p=1"):
        cupyflash.flash_attention(q, k, v, dropout_p=1.0, return_lse=True)


def test_backward_op_called_directly_still_refuses_bad_input_after_a_good_call():
    """The op's backward skips its checks for layouts that passed before (what its forward handed it), but a user's
    direct call with a new, bad layout is refused with the usual message, every time."""
    q, k, v, dout = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(4))
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, False)
    for _ in range(2):
        assert torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, 0.25, False)[0].shape == q.shape
        with pytest.raises(ValueError, match="lse must be float32"):
            torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse[..., :4], 0.25, False)
        with pytest.raises(ValueError, match="dout must be shaped like the output"):
            torch.ops.cupyflash.flash_attn_bwd(dout[..., :4], q, k, v, None, out, lse, 0.25, False)
        with pytest.raises(ValueError, match="scale is nan"):
            torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, float("nan"), False)


@pytest.mark.parametrize("layout", ["contiguous", "heads-inner"])
def test_gradients_in_token_major_memory_real_and_fake(layout):
    """flash_attn_bwd's dq, dk, dv have (B, N, H, D) memory whatever q's layout, as its fake says (Inductor asserts
    the fake's strides on the real outputs): a projection's q, k, v views take their gradients back without a
    transpose."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cupyflash import torch_op

    def make(shape):
        if layout == "heads-inner":
            return torch.randn(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2)  # (B, H, N, D)
        return torch.randn(shape)

    q, k, v = make((2, 4, 9, 16)), make((2, 2, 7, 16)), make((2, 2, 7, 16))
    out, lse = torch_op.flash_attn_fwd(q, k, v, None, 0.25, False)
    dout = torch.randn_like(out)
    real = torch_op.flash_attn_bwd(dout, q, k, v, None, out, lse, 0.25, False)[:3]
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv, fdout, fout, flse = (mode.from_tensor(t) for t in (q, k, v, dout, out, lse))
        fake = torch_op.flash_attn_bwd(fdout, fq, fk, fv, None, fout, flse, 0.25, False)[:3]
    for g, f, t in zip(real, fake, (q, k, v)):
        assert g.shape == t.shape and g.stride() == f.stride() and g.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("head_dims", [(16, 16), (16, 8)])  # Dv = Dq, and Dv < Dq
def test_out_layout_real_and_fake(token_major, head_dims):
    """flash_attn_fwd's out is contiguous, or with token_major_out in (B, Nq, H, Dv) memory, as its fake says,
    with the same values; the backward takes either."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cupyflash import torch_op

    d, dv = head_dims
    q, k, v = torch.randn(2, 4, 9, d), torch.randn(2, 4, 7, d), torch.randn(2, 4, 7, dv)
    want, want_lse = torch_op.flash_attn_fwd(q, k, v, None, 0.25, True)
    out, lse = torch_op.flash_attn_fwd(q, k, v, None, 0.25, True, token_major_out=token_major)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = torch_op.flash_attn_fwd(*(mode.from_tensor(t) for t in (q, k, v)), None, 0.25, True,
                                       token_major_out=token_major)[0]
    assert out.shape == fake.shape == (2, 4, 9, dv) and out.stride() == fake.stride()
    assert out.transpose(1, 2).is_contiguous() if token_major else out.is_contiguous()
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    dout = torch.randn_like(want)
    grads = torch_op.flash_attn_bwd(dout, q, k, v, None, out, lse, 0.25, True)[:3]
    for g, w in zip(grads, torch_op.flash_attn_bwd(dout, q, k, v, None, want, want_lse, 0.25, True)[:3]):
        assert torch.equal(g, w)


@pytest.mark.parametrize("strided", ["q", "k", "v", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_inputs_with_a_strided_head_dim(strided, causal):
    """q, k, v whose D is not contiguous ((B, N, 3, H, D).permute(2, 0, 3, 4, 1): XCiT attends over channels so)
    give the contiguous inputs' out and gradients. torch's CPU flash kernels, which the CPU path calls, read D as
    contiguous whatever its stride: 4-6 of error before session 30's copy."""
    torch.manual_seed(5)
    packed = torch.randn(2, 23, 3, 4, 17, requires_grad=True)  # (B, D, 3, H, N): N = 17 "tokens" of D = 23
    parts = packed.permute(2, 0, 3, 4, 1).unbind(0)  # each (B, H, 17, 23), stride 204 along D
    q, k, v = (t if strided in (name, "all") else t.contiguous() for name, t in zip("qkv", parts))
    out = cupyflash.flash_attention(q, k, v, causal=causal)
    s = q.double() @ k.double().transpose(-1, -2) * 23 ** -0.5
    if causal:
        s = s.masked_fill(~torch.ones(17, 17, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ v.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, packed, g)
    (want,) = torch.autograd.grad(ref, packed, g.double())
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
