"""The test reference and the tolerance rule themselves (CPU): the reference agrees with the op's exact CPU
implementation in fp64 (same masking and lse conventions), and the rule rejects what it must."""
import pytest
import torch

import cupyflash.torch_op  # noqa: F401  registers torch.ops.cupyflash.*
from reference import (GRAD_FACTOR, OUT_FACTOR, assert_within_rule, attention_ref, rounding_floor, seed_from)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (40, 9), (9, 40)])  # (40, 9): rows with no key
def test_reference_matches_cpu_op_fp64(n_q, n_k, causal):
    torch.manual_seed(seed_from(n_q, n_k, causal))
    q = torch.randn(2, 3, n_q, 16, dtype=torch.float64)
    k, v = torch.randn(2, 3, n_k, 16, dtype=torch.float64), torch.randn(2, 3, n_k, 16, dtype=torch.float64)
    dout = torch.randn(2, 3, n_q, 16, dtype=torch.float64)
    ref = attention_ref(q, k, v, dout, scale=0.25, causal=causal, compute_dtype=torch.float64)
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, causal)
    grads = torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, None, out, lse, 0.25, causal)
    torch.testing.assert_close(out, ref.out)
    torch.testing.assert_close(lse, ref.lse.float())  # +inf rows compare equal
    for got, want in zip(grads, (ref.dq, ref.dk, ref.dv)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # the op's lse is fp32
    if causal and n_q > n_k:
        assert torch.isinf(ref.lse[..., : n_q - n_k]).all() and (ref.out[..., : n_q - n_k, :] == 0).all()


def _triple(dtype=torch.float16):
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 33, 32, dtype=dtype) for _ in range(4))
    ref = attention_ref(q, k, v, dout, scale=0.2, causal=True)
    pt = attention_ref(q, k, v, dout, scale=0.2, causal=True, compute_dtype=dtype)
    return ref, pt


def test_rule_accepts_same_dtype_math():
    ref, pt = _triple()
    assert_within_rule(pt.out, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, torch.float16), "out")
    assert_within_rule(pt.dq, ref.dq, pt.dq, GRAD_FACTOR, rounding_floor(ref.dq, torch.float16), "dq")


def test_rule_rejects_a_wrong_element():
    ref, pt = _triple()
    wrong = pt.out.clone()
    wrong[0, 1, 20, 3] += 0.05
    with pytest.raises(AssertionError, match=r"out: max\|ours - ref\|.*worst at \(0, 1, 20, 3\)"):
        assert_within_rule(wrong, ref.out, pt.out, OUT_FACTOR, rounding_floor(ref.out, torch.float16), "out")


def test_rule_rejects_nan_and_misplaced_inf():
    ref, pt = _triple()
    nan_out = pt.out.clone()
    nan_out[0, 0, 0, 0] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_within_rule(nan_out, ref.out, pt.out, OUT_FACTOR, 1e-3, "out")
    lse = ref.lse.clone()
    lse[0, 0, 5] = float("inf")
    with pytest.raises(AssertionError, match="finiteness"):
        assert_within_rule(lse, ref.lse, pt.lse, OUT_FACTOR, 1e-3, "lse")
