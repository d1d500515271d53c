"""The fused-site counter counts only sites of graphs the inner compiler compiled: a graph it rejects is run
unfused by Dynamo (split at a graph break and traced again, or eagerly under ``suppress_errors``).

Inductor's ``compile_fx`` is replaced by one that rejects every graph holding a marker op (``torch.sinc``), so the
failure comes at a known graph. transformers' Mixtral (grouped-mm experts under AOTAutograd) fails the same way,
with a DataDependentOutputException and graph-break retries, but takes ~40 s to compile on the CPU."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import DataDependentOutputException

from models.harness import OP


def attention(q, k, v):
    return (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v  # (B, H, N, D)


def attention_then_marker(q, k, v):
    """One frame: when its graph is rejected, all of it runs eagerly."""
    out = (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v  # (B, H, N, D)
    return torch.sinc(out) + out


def call_attention_then_marker(q, k, v):
    """Two frames: when the outer one is rejected, Dynamo compiles ``attention`` on its own."""
    out = attention(q, k, v)
    return torch.sinc(out) + out


def _qkv():
    return [torch.randn(1, 2, 5, 16) for _ in range(3)]


@pytest.fixture
def rejecting_inner(monkeypatch):
    """Returns ``use(error)``: from then on the inner compiler raises ``error`` for graphs with the marker and
    returns the others as traced; ``use`` gives the list of (accepted, op nodes in the graph) per call."""
    calls = []

    def use(error):
        def compile_fx(gm, example_inputs, config_patches=None):
            rejected = any(n.target is torch.sinc for n in gm.graph.nodes)
            calls.append((not rejected, sum(n.target is OP for n in gm.graph.nodes)))
            if rejected:
                raise error
            return gm.forward

        monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", compile_fx)
        return calls

    torch._dynamo.reset()
    counters.clear()
    yield use
    torch._dynamo.reset()


def _counted_as_compiled(calls):
    """The counter equals the op nodes of accepted graphs, and a rejected graph held a fused site (so counting
    before the inner compile would have counted it)."""
    assert any(not ok and n_ops for ok, n_ops in calls), calls
    assert counters["cupyflash"]["attention_fused"] == sum(n_ops for ok, n_ops in calls if ok), calls


def test_compiled_graph_counts():
    torch._dynamo.reset()
    counters.clear()
    q, k, v = _qkv()
    out = torch.compile(attention, backend="cupyflash", options={"inner": "aot_eager"})(q, k, v)
    torch.testing.assert_close(out, attention(q, k, v))
    assert counters["cupyflash"]["attention_fused"] == 1


def test_failed_inner_compile_is_not_counted(rejecting_inner):
    calls = rejecting_inner(RuntimeError("inner compiler says no"))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="inner compiler says no"):
        torch.compile(attention_then_marker, backend="cupyflash")(*_qkv())
    _counted_as_compiled(calls)
    assert counters["cupyflash"]["attention_fused"] == 0


def test_eager_fallback_is_not_counted(rejecting_inner, monkeypatch):
    """suppress_errors: Dynamo runs the rejected frame eagerly, attention unfused."""
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", True)
    calls = rejecting_inner(RuntimeError("inner compiler says no"))
    q, k, v = _qkv()
    out = torch.compile(attention_then_marker, backend="cupyflash")(q, k, v)
    torch.testing.assert_close(out, attention_then_marker(q, k, v))
    _counted_as_compiled(calls)
    assert counters["cupyflash"]["attention_fused"] == 0


def test_graph_break_retry_counts_the_site_once(rejecting_inner):
    """A data-dependent failure (Mixtral's): Dynamo retries with graph breaks, skips the frame and compiles
    ``attention`` on its own; the site is counted once, for the graph that compiled."""
    calls = rejecting_inner(DataDependentOutputException(torch.ops.aten._local_scalar_dense.default))
    q, k, v = _qkv()
    out = torch.compile(call_attention_then_marker, backend="cupyflash")(q, k, v)
    torch.testing.assert_close(out, call_attention_then_marker(q, k, v))
    _counted_as_compiled(calls)
    assert counters["cupyflash"]["attention_fused"] == 1
    assert sum(n_ops for _, n_ops in calls) > 1, calls  # counting every rewrite would overcount
