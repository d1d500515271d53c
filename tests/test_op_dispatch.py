"""The ops' Autograd kernel (torch_op._direct_autograd): the body at once for plain no-grad calls, torch's generic
path for everything else, so modes, fake tensors and autograd still see the op."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import cupyflash
from cupyflash import torch_op  # noqa: F401  (registers the ops)

FWD, BWD = torch.ops.cupyflash.flash_attn_fwd, torch.ops.cupyflash.flash_attn_bwd


def _qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 17, 32, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _reference(q, k, v):
    """fp64 causal attention and its log-sum-exp."""
    q, k, v = (t.double() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2) * 0.125).masked_fill(torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v, s.logsumexp(-1)


def test_no_grad_call_gives_the_body_s_result():
    q, k, v = _qkv()
    with torch.no_grad():
        out, lse = FWD(q, k, v, None, 0.125, True)
    ref_out, ref_lse = _reference(q, k, v)
    torch.testing.assert_close(out, ref_out.float())
    torch.testing.assert_close(lse, ref_lse.float())


class _Spy(TorchDispatchMode):
    """Records every op that reaches the mode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_still_sees_both_ops():
    q, k, v = _qkv()
    with torch.no_grad(), _Spy() as spy:
        out, lse = FWD(q, k, v, None, 0.125, False)
        BWD(torch.ones_like(out), q, k, v, None, out, lse, 0.125, False)
    assert FWD.default in spy.seen and BWD.default in spy.seen


def test_the_kernel_s_decision_follows_each_call_s_keyset():
    """The kernel remembers its decision by keyset bits: a plain call's keyset, then a mode's, then the plain one
    again each get their own path."""
    q, k, v = _qkv()
    with torch.no_grad():
        plain, _ = FWD(q, k, v, None, 0.125, True)
        with _Spy() as spy:
            spied, _ = FWD(q, k, v, None, 0.125, True)
        again, _ = FWD(q, k, v, None, 0.125, True)
    assert spy.seen == [FWD.default]
    torch.testing.assert_close(spied, plain)
    torch.testing.assert_close(again, plain)


def test_fake_tensors_get_the_fake_implementation():
    with FakeTensorMode() as mode:
        q, k, v = (mode.from_tensor(t) for t in _qkv())
        with torch.no_grad():
            out, lse = FWD(q, k, v, None, 0.125, False)
    assert isinstance(out, FakeTensor) and out.shape == (1, 2, 17, 32) and lse.shape == (1, 2, 17)


def test_parameters_record_gradients_too():
    q, k, v = _qkv()
    out, _ = FWD(torch.nn.Parameter(q), k, v, None, 0.125, True)
    assert out.grad_fn is not None and "cupyflash" in type(out.grad_fn).__name__


def test_calls_recording_gradients_take_the_op_s_autograd():
    q, k, v = _qkv(requires_grad=True)
    out, _ = FWD(q, k, v, None, 0.125, True)
    assert out.grad_fn is not None
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = _reference(*ref)
    for got, want in zip(grads, torch.autograd.grad(ref_out.sum(), ref)):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("face", ["op", "function"])
def test_forward_ad_tangents_are_refused_not_dropped(face, grad):
    """No forward-AD formula: a dual input raises; torch's generic custom-op kernel would drop its tangent."""
    q, k, v = _qkv()
    call = ((lambda x: FWD(x, k, v, None, 0.125, True)) if face == "op"
            else (lambda x: cupyflash.flash_attention(x, k, v, causal=True)))
    with fwAD.dual_level(), torch.set_grad_enabled(grad):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            call(fwAD.make_dual(q, torch.randn_like(q)))
