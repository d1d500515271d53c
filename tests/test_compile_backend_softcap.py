"""Logit soft-capping (Gemma 2's cap · tanh(s / cap), FlashAttention-2's softcap) is fused in its spellings, with
the cap passed to the op; tanh on the scores in any other form is a look-alike left alone with the reason."""
import math

import pytest
import torch
import torch.nn.functional as F

import compile_backend
from compile_backend.rewrite import rewrite_graph
from models.harness import assert_left_alone, compile_and_compare
from models.hf import Gemma2Attention, llama_causal_mask

B, H, N, D = 2, 2, 7, 8
CAP = 0.75  # small enough that tanh bends the scores of these inputs: a dropped or wrong cap fails the comparison
OP = torch.ops.cupyflash.flash_attn_fwd.default


def _qkv(n_q=N, n_k=N):
    return (torch.randn(B, H, n_q, D), torch.randn(B, H, n_k, D), torch.randn(B, H, n_k, D))


def _op_node(graphs):
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is OP]
    return op


def divide_tanh_multiply(q, k, v):  # Gemma 2, statement by statement
    s = q @ k.transpose(-2, -1) * D ** -0.5
    s = s / CAP
    s = torch.tanh(s)
    s = s * CAP
    return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def cap_times_tanh_method(q, k, v):
    return (CAP * (q @ k.transpose(-2, -1) / math.sqrt(D) / CAP).tanh()).softmax(-1) @ v


def multiply_by_reciprocal(q, k, v):
    return (torch.tanh(torch.matmul(q, k.transpose(-2, -1)) * (1.0 / CAP)) * CAP).softmax(-1) @ v


def tensor_constant_cap(q, k, v):  # a cap made in the graph from a number (torch.tensor(c))
    cap = torch.tensor(CAP)
    return (torch.tanh(q @ k.transpose(-2, -1) / cap) * cap).softmax(-1) @ v


def functional_tanh_negative_cap(q, k, v):  # -c · tanh(s / -c) = c · tanh(s / c): tanh is odd
    return (F.tanh(q @ k.transpose(-2, -1) / -CAP) * -CAP).softmax(-1) @ v


def scaled_after_cap(q, k, v):  # h · cap · tanh(s / cap) is the op with cap and scale both times h
    return (torch.tanh(q @ k.transpose(-2, -1) / CAP) * CAP * 0.5).softmax(-1) @ v


def einsum_capped_with_bias(q, k, v, bias):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / CAP
    return (torch.tanh(s) * CAP + bias).softmax(-1) @ v


def capped_then_causal(q, k, v):
    n = q.size(-2)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    s = torch.tanh(q @ k.transpose(-2, -1) / CAP) * CAP
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


# (function, expected softcap, expected scale)
FUSED = [
    (divide_tanh_multiply, CAP, D ** -0.5),
    (cap_times_tanh_method, CAP, D ** -0.5),
    (multiply_by_reciprocal, CAP, 1.0),
    (tensor_constant_cap, CAP, 1.0),
    (functional_tanh_negative_cap, CAP, 1.0),
    (scaled_after_cap, CAP * 0.5, 0.5),
]


@pytest.mark.parametrize("fn,softcap,scale", FUSED, ids=[f[0].__name__ for f in FUSED])
def test_soft_capped_spellings_fused(fn, softcap, scale):
    torch.manual_seed(0)
    op = _op_node(compile_and_compare(fn, *_qkv(), expect=1))
    assert op.kwargs["softcap"] == pytest.approx(softcap, rel=1e-12)
    assert op.args[4] == pytest.approx(scale, rel=1e-12)


def test_learned_bias_after_cap_fused_with_its_gradient():
    """The bias is added after the cap (as the op adds it), and its gradient comes back through the op."""
    torch.manual_seed(0)
    graphs = compile_and_compare(einsum_capped_with_bias, *_qkv(), torch.randn(1, H, N, N), expect=1)
    op = _op_node(graphs)
    assert op.kwargs["softcap"] == pytest.approx(CAP) and op.args[3] is not None


def test_causal_after_cap_proven():
    torch.manual_seed(0)
    op = _op_node(compile_and_compare(capped_then_causal, *_qkv(), expect=1))
    assert op.args[5] is True and op.args[3] is None


def literal_cap(q, k, v):
    return (torch.tanh(q @ k.transpose(-2, -1) / 0.75) * 0.75).softmax(-1) @ v


def test_soft_cap_with_dynamic_lengths():
    """A cap written in the code stays a constant under dynamic=True: one graph serves every length."""
    torch.manual_seed(0)
    graphs = compile_and_compare(literal_cap, *_qkv(), expect=1, dynamic=True, calls=[_qkv(5, 5), _qkv(13, 13)])
    assert len(graphs) == 1


def test_gemma2_soft_cap_fused_after_recompile_for_a_new_length():
    """Static first compile, then a new length recompiles with a dynamic axis; the config's float cap stays a
    constant (Dynamo keeps floats that never change specialised), so both graphs are fused."""
    torch.manual_seed(0)
    m = Gemma2Attention(hidden_size=64, num_heads=4, num_key_value_heads=2, attn_logit_softcapping=CAP).eval()

    def inputs(t):
        return torch.randn(2, t, 64), llama_causal_mask(torch.ones(2, t), torch.float32)

    graphs = compile_and_compare(m, *inputs(9), expect=2, frozen=(1,), calls=[inputs(12), inputs(6)])
    assert len(graphs) == 2
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in graphs[1].graph.nodes)


def test_float_cap_made_symbolic_left_alone_with_the_reason():
    """Under dynamic=True Dynamo lifts float attributes (the cap, the scaling) to graph inputs, so their values
    may change without a recompile: the site is left alone, and the reason says how to keep them constant."""
    torch.manual_seed(0)
    m = Gemma2Attention(hidden_size=64, num_heads=4, num_key_value_heads=2, attn_logit_softcapping=CAP).eval()
    x, mask = torch.randn(2, 9, 64), llama_causal_mask(torch.ones(2, 9), torch.float32)
    compile_and_compare(m, x, mask, expect=0, grad=False, dynamic=True)
    torch._dynamo.reset()
    records = []

    def recorder(gm, example_inputs):
        records.extend(rewrite_graph(gm, example_inputs))
        return gm.forward

    torch.compile(m, backend=recorder, dynamic=True)(x, mask)
    (record,) = records
    assert not record.fused and "known only at run time" in record.reason
    assert "torch._dynamo.config.specialize_float = True" in record.reason


def test_soft_cap_through_inductor():
    torch.manual_seed(0)
    compile_and_compare(divide_tanh_multiply, *_qkv(), expect=1, inner="inductor")


def test_explain_reports_the_cap():
    torch._dynamo.reset()
    report = compile_backend.explain(divide_tanh_multiply, *_qkv())
    (site,) = report.fused
    assert site.softcap == pytest.approx(CAP)
    assert f"softcap={CAP:g}" in str(report)


# ---- look-alikes ---------------------------------------------------------------------------------

def caps_differ(q, k, v):
    return (torch.tanh(q @ k.transpose(-2, -1) / 30.0) * 50.0).softmax(-1) @ v


def bare_tanh(q, k, v):
    return torch.tanh(q @ k.transpose(-2, -1)).softmax(-1) @ v


def tanh_without_multiply(q, k, v):
    return torch.tanh(q @ k.transpose(-2, -1) / CAP).softmax(-1) @ v


def tanh_without_divide(q, k, v):
    return (torch.tanh(q @ k.transpose(-2, -1)) * CAP).softmax(-1) @ v


def tanh_then_cast_then_multiply(q, k, v):
    return (torch.tanh(q @ k.transpose(-2, -1) / CAP).double() * CAP).softmax(-1).float() @ v


def runtime_cap(q, k, v, cap):  # a cap that is a graph input: not a compile-time constant
    return (torch.tanh(q @ k.transpose(-2, -1) / cap) * cap).softmax(-1) @ v


def bias_inside_cap(q, k, v, bias):
    return (torch.tanh((q @ k.transpose(-2, -1) + bias) / CAP) * CAP).softmax(-1) @ v


def causal_mask_inside_cap(q, k, v):  # a -inf key becomes -cap after the tanh: no longer masked
    n = q.size(-2)
    keep = torch.ones(n, n, dtype=torch.bool).tril()
    s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
    return (torch.tanh(s / CAP) * CAP).softmax(-1) @ v


def capped_twice(q, k, v):
    s = torch.tanh(q @ k.transpose(-2, -1) / CAP) * CAP
    return (torch.tanh(s / 2.0) * 2.0).softmax(-1) @ v


LOOKALIKES = [
    (caps_differ, (), "between × 0.0333333 and × 50, not a division and a multiplication by one cap"),
    (bare_tanh, (), "tanh on the scores without a division by a constant cap before it and a multiplication"),
    (tanh_without_multiply, (), "without a division by a constant cap"),
    (tanh_without_divide, (), "without a division by a constant cap"),
    (tanh_then_cast_then_multiply, (), "without a division by a constant cap"),
    (runtime_cap, (torch.tensor(CAP),), "a soft-cap known only at run time"),
    (bias_inside_cap, (torch.randn(1, H, N, N),), "a bias or mask inside the soft-cap's tanh"),
    (causal_mask_inside_cap, (), "a bias or mask inside the soft-cap's tanh"),
    (capped_twice, (), "two soft-caps on the scores"),
]


@pytest.mark.parametrize("fn,extra,reason", LOOKALIKES, ids=[f[0].__name__ for f in LOOKALIKES])
def test_soft_cap_lookalike_left_alone(fn, extra, reason):
    torch.manual_seed(0)
    assert_left_alone(fn, *_qkv(), *extra, reason=reason)
