"""Compile a model with the cupyflash backend and compare it with eager: outputs, gradients, the fused
counter, and the op's presence in the rewritten graphs."""
from __future__ import annotations

import copy

import torch
from torch._dynamo.utils import counters

import compile_backend

OP = torch.ops.cupyflash.flash_attn_fwd.default


def _grads(module, tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors] + \
        [None if p.grad is None else p.grad.clone() for p in (module.parameters() if module else [])]


def _outputs(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


def compile_and_compare(model, *args, expect: int, inner: str = "aot_eager", grad: bool = True,
                        atol: float = 2e-5, rtol: float = 2e-5, dynamic=None, calls=None, frozen=()):
    """Run ``model(*args)`` eagerly and through backend="cupyflash" (a spy around it, to keep the graphs);
    assert equal outputs and gradients, ``expect`` fused sites and as many op nodes. ``calls`` is a list
    of further argument tuples run after the first (e.g. other sequence lengths); arguments at the
    ``frozen`` positions (masks) do not require grad. Returns the graphs."""
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def spy(gm, example_inputs):
        compiled = compile_backend.cupyflash_backend(gm, example_inputs, options={"inner": inner})
        graphs.append(gm)
        return compiled

    module = model if isinstance(model, torch.nn.Module) else None
    twin = copy.deepcopy(module) if module is not None else model
    compiled = torch.compile(twin, backend=spy, dynamic=dynamic)
    for call_args in [args, *(calls or [])]:
        eager_in, comp_in = ([a.detach().clone().requires_grad_(grad and a.is_floating_point() and i not in frozen)
                              if isinstance(a, torch.Tensor) else a for i, a in enumerate(call_args)]
                             for _ in range(2))
        want = _outputs(model(*eager_in))
        got = _outputs(compiled(*comp_in))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
        if grad:
            seed = [torch.randn_like(w) for w in want]
            torch.autograd.backward(want, seed)
            torch.autograd.backward(got, seed)
            leaves_e = [a for a in eager_in if isinstance(a, torch.Tensor) and a.requires_grad]
            leaves_c = [a for a in comp_in if isinstance(a, torch.Tensor) and a.requires_grad]
            for g, w in zip(_grads(twin if module else None, leaves_c), _grads(module, leaves_e)):
                assert (g is None) == (w is None)
                if g is not None:
                    torch.testing.assert_close(g, w, atol=atol * 10, rtol=rtol * 10)
            if module is not None:
                module.zero_grad(set_to_none=True)
                twin.zero_grad(set_to_none=True)
    assert counters["cupyflash"]["attention_fused"] == expect, dict(counters["cupyflash"])
    n_ops = sum(1 for gm in graphs for n in gm.graph.nodes if n.target is OP)
    assert n_ops == expect, f"{n_ops} op nodes in the rewritten graphs, expected {expect}"
    return graphs


def skipped_reasons(model, *args) -> list[str]:
    torch._dynamo.reset()
    report = compile_backend.explain(model, *args)
    assert not report.fused, str(report)
    return [s.reason for s in report.skipped]


def assert_left_alone(model, *args, reason: str, inner: str = "aot_eager"):
    """The site is not fused (counter 0, outputs equal eager) and explain gives ``reason``."""
    compile_and_compare(model, *args, expect=0, inner=inner, grad=False)
    reasons = skipped_reasons(model, *args)
    assert any(reason in r for r in reasons), reasons
