"""Grouped-query K/V: where K and V are their KV heads repeated in place (transformers' repeat_kv,
repeat_interleave), the op reads the KV heads and the repeated copies leave the graph; a repeat in another head
order is passed as it is."""
import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv

import compile_backend
from models.harness import OP, compile_and_compare

B, H, KV, N, D = 2, 4, 2, 7, 8


def _inputs():
    return torch.randn(B, H, N, D), torch.randn(B, KV, N, D), torch.randn(B, KV, N, D)


def _attend(q, k, v):
    return torch.softmax(q @ k.transpose(2, 3) * D ** -0.5, dim=-1) @ v


def transformers_repeat_kv(q, k, v):
    return _attend(q, repeat_kv(k, H // KV), repeat_kv(v, H // KV))


def repeat_interleave(q, k, v):
    return _attend(q, k.repeat_interleave(H // KV, dim=1), torch.repeat_interleave(v, H // KV, dim=1))


def unsqueeze_spelling(q, k, v):
    grow = lambda t: t.unsqueeze(2).expand(B, KV, H // KV, N, D).reshape(B, H, N, D)  # noqa: E731
    return _attend(q, grow(k), grow(v))


def heads_tiled(q, k, v):  # head h reads KV head h % KV: not the op's grouping
    return _attend(q, k.repeat(1, H // KV, 1, 1), v.repeat(1, H // KV, 1, 1))


def only_k_repeated(q, k, v):
    return _attend(q, repeat_kv(k, H // KV), v.repeat(1, H // KV, 1, 1))


def _fused_record(fn):
    torch._dynamo.reset()
    report = compile_backend.explain(fn, *_inputs())
    assert len(report.fused) == 1, str(report)
    return report.fused[0]


@pytest.mark.parametrize("fn", [transformers_repeat_kv, repeat_interleave, unsqueeze_spelling])
def test_repeated_kv_heads_are_read_in_place(fn):
    graphs = compile_and_compare(fn, *_inputs(), expect=1)
    record = _fused_record(fn)
    assert record.kv_heads == KV and f"kv_heads={KV}" in str(record)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is OP]
    assert [tuple(a.meta["example_value"].shape) for a in op.args[1:3]] == [(B, KV, N, D)] * 2
    left = [n for gm in graphs for n in gm.graph.nodes if n.target in ("expand", "repeat_interleave",
                                                                       torch.repeat_interleave)]
    assert not left, f"the repeated copies stayed in the graph: {left}"


@pytest.mark.parametrize("fn", [heads_tiled, only_k_repeated])
def test_other_head_orders_pass_the_copies(fn):
    graphs = compile_and_compare(fn, *_inputs(), expect=1)
    assert _fused_record(fn).kv_heads is None
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is OP]
    assert [tuple(a.meta["example_value"].shape) for a in op.args[1:3]] == [(B, H, N, D)] * 2
