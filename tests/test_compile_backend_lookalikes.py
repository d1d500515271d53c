"""Look-alikes are left alone (counter 0, eager results) and the report says why; masks that only look
causal are passed as a bias, never as causal=True."""
import math

import pytest
import torch
import torch.nn.functional as F

import compile_backend
from models.harness import assert_left_alone, compile_and_compare, skipped_reasons
from models.nanogpt import CausalSelfAttention

B, H, N, D = 2, 2, 6, 8


def _qkv(n_q=N, n_k=N):
    return torch.randn(B, H, n_q, D), torch.randn(B, H, n_k, D), torch.randn(B, H, n_k, D)


def softmax_over_queries(q, k, v):
    return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v


def probs_returned(q, k, v):
    p = (q @ k.transpose(-2, -1) / 8.0).softmax(dim=-1)
    return p @ v, p


def scores_returned(q, k, v):
    s = q @ k.transpose(-2, -1) / 8.0
    return s.softmax(dim=-1) @ v, s


def probs_times_two(q, k, v):
    return ((q @ k.transpose(-2, -1)).softmax(dim=-1) * 2) @ v


def relu_between(q, k, v):
    return torch.relu((q @ k.transpose(-2, -1)).softmax(dim=-1)) @ v


def inf_arbitrary_mask(q, k, v, keep):
    return (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v


def finite_fill_arbitrary_mask(q, k, v, keep):  # the "Annotated Transformer" spelling
    return (q @ k.transpose(-2, -1)).masked_fill(keep == 0, -1e9).softmax(dim=-1) @ v


def probs_transposed_on_left(q, k, v):  # Pᵀ V: each key's mix of the queries' rows, not attention
    return (q @ k.transpose(-2, -1)).softmax(dim=-1).transpose(-2, -1) @ v


def learned_bias(q, k, v, bias):
    return (q @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v


LOOKALIKES = [
    (softmax_over_queries, "not the key axis"),
    (probs_returned, "leave the graph"),
    (scores_returned, "other users"),
    (probs_times_two, "between the softmax and P·V"),
    (relu_between, "between the softmax and P·V"),
    (probs_transposed_on_left, "between the softmax and P·V"),
]


@pytest.mark.parametrize("fn,reason", LOOKALIKES, ids=[f.__name__ for f, _ in LOOKALIKES])
def test_lookalike_left_alone(fn, reason):
    torch.manual_seed(0)
    assert_left_alone(fn, *_qkv(), reason=reason)


@pytest.mark.parametrize("fn,form", [(inf_arbitrary_mask, "mask (NaN rows as eager)"),
                                     (finite_fill_arbitrary_mask, "mask (uniform rows as eager)")])
def test_fill_of_unprovable_mask_fused_as_keep_mask(fn, form):
    """Not a band, so not causal: the op takes the mask itself (rows without a key: test_compile_backend_fills)."""
    torch.manual_seed(0)
    keep = torch.rand(B, 1, N, N) > 0.3
    keep[..., 0] |= ~keep.any(-1)  # eager's NaN rows would defeat the comparison here
    graphs = compile_and_compare(fn, *_qkv(), keep, expect=1)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.cupyflash.flash_attn_fwd.default]
    assert op.args[5] is False and op.args[3] is not None
    torch._dynamo.reset()
    assert [s.mask_form for s in compile_backend.explain(fn, *_qkv(), keep).fused] == [form]


def test_bias_that_requires_grad_fused_with_its_gradient():
    """A learned bias (T5's relative position bias, ALiBi slopes): the op returns its gradient too."""
    torch.manual_seed(0)
    compile_and_compare(learned_bias, *_qkv(), torch.randn(1, H, N, N), expect=1)


def test_active_dropout_left_alone():
    torch.manual_seed(0)
    m = CausalSelfAttention(32, 2, block_size=16, dropout=0.1).train()
    reasons = skipped_reasons(m, torch.randn(2, 8, 32))
    assert reasons == ["dropout is not in the kernel yet (active dropout on the probabilities)"]


def not_quite_causal(q, k, v, diagonal):
    n_q, n_k = q.size(-2), k.size(-2)
    keep = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=diagonal)
    return torch.where(keep, q @ k.transpose(-2, -1) / math.sqrt(D), torch.finfo(q.dtype).min).softmax(-1) @ v


@pytest.mark.parametrize("diagonal,n_q,n_k,causal,right", [(0, 6, 6, True, -1), (1, 6, 6, False, 1),
                                                           (1, 4, 6, False, None), (0, 4, 6, False, None),
                                                           (2, 4, 6, True, -1), (0, 6, 4, False, 2)])
def test_causal_only_when_proven(diagonal, n_q, n_k, causal, right):
    """tril(diagonal) keeps j <= i + diagonal: the op's bottom-right causal mask iff diagonal == Nk - Nq, a
    window reaching ``right`` keys past that diagonal when diagonal > Nk - Nq; a triangle that hides the
    bottom-right diagonal itself (right None) is passed as a bias. The result is eager's either way."""
    torch.manual_seed(0)
    graphs = compile_and_compare(lambda q, k, v: not_quite_causal(q, k, v, diagonal), *_qkv(n_q, n_k), expect=1)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.cupyflash.flash_attn_fwd.default]
    assert op.args[5] is causal
    assert (op.args[3] is None) is (right is not None)
    assert op.kwargs["window_right"] == (-1 if right is None else right) and op.kwargs["window_left"] == -1


def test_upper_triangle_masked_with_triu_is_causal():
    def fn(q, k, v):
        drop = torch.ones(N, N, dtype=torch.bool).triu(1)
        return F.softmax((q @ k.transpose(-2, -1)).masked_fill(drop, float("-inf")), dim=-1) @ v

    graphs = compile_and_compare(fn, *_qkv(), expect=1)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.cupyflash.flash_attn_fwd.default]
    assert op.args[5] is True and op.args[3] is None


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_boolean_or_integer_tensor_added_to_scores_is_a_number(dtype):
    """Eager adds a boolean or integer tensor to the scores as numbers (True = 1): the op gets it as a float bias,
    never as a keep-mask (a boolean attn_bias means True = keep)."""
    torch.manual_seed(0)
    added = (torch.rand(B, 1, N, N) > 0.5).to(dtype)
    compile_and_compare(lambda q, k, v, m: (q @ k.transpose(-2, -1) * 0.25 + m).softmax(-1) @ v, *_qkv(), added,
                        expect=1, frozen=(3,))


def probs_on_right(q, k, v, bias):
    """EfficientViT's (MSRA) spelling: q, k, v (B, H, D, N), out = v · Pᵀ = (P · vᵀ)ᵀ."""
    attn = (q.transpose(-2, -1) @ k) * 0.25 + bias
    return v @ attn.softmax(dim=-1).transpose(-2, -1)


def test_probs_on_the_right_fused():
    """X · Pᵀ is attention with its out transposed: fused, eager's numbers and gradients, out (B, H, D, Nq)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, D, N) for _ in range(3))
    compile_and_compare(probs_on_right, q, k, v, torch.randn(1, H, N, N), expect=1)
