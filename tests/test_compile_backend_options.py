"""The backend as torch.compile calls it: entry point, inner compilers, mode/options, dynamic shapes,
the explain report and the log."""
import logging
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from torch._dynamo.utils import counters

import compile_backend
from models.harness import compile_and_compare
from models.nanogpt import GPT, CausalSelfAttention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_inner_compilers(inner):
    compile_and_compare(CausalSelfAttention(32, 2, block_size=16), torch.randn(2, 8, 32), expect=1, inner=inner)


def test_entry_point_needs_no_import():
    """backend="cupyflash" resolves through the torch_dynamo_backends entry point in a fresh interpreter
    that never imports compile_backend (needs the project installed, as `pip install -e .` does)."""
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    if "cupyflash" not in names:
        pytest.skip("the project is not pip-installed here, so its entry point is not registered")
    script = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.utils import counters
        def attn(q, k, v):
            return (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v
        q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
        out = torch.compile(attn, backend="cupyflash", options={"inner": "aot_eager"})(q, k, v)
        torch.testing.assert_close(out, attn(q, k, v))
        assert counters["cupyflash"]["attention_fused"] == 1, counters
        assert "compile_backend" in sys.modules  # loaded by torch, not by us
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_mode_and_options_reach_inductor(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    m = CausalSelfAttention(32, 2, block_size=16).eval()
    torch._dynamo.reset()
    torch.compile(m, backend="cupyflash", mode="reduce-overhead")(torch.randn(1, 4, 32))
    assert seen == {"triton.cudagraphs": True}
    seen.clear()
    torch._dynamo.reset()
    opts = {"mode": "max-autotune-no-cudagraphs", "epilogue_fusion": False}
    torch.compile(m, backend=compile_backend.cupyflash_backend, options=opts)(torch.randn(1, 4, 32))
    assert seen == {"max_autotune": True, "coordinate_descent_tuning": True, "epilogue_fusion": False}


@pytest.mark.parametrize("options,message", [({"inner": "tvm"}, "options['inner']"),
                                             ({"no_such_knob": 1}, "unknown option 'no_such_knob'"),
                                             ({"inner": "eager", "max_autotune": True}, "apply to Inductor")])
def test_bad_options_are_named(options, message):
    torch._dynamo.reset()
    fn = torch.compile(lambda q: (q @ q.mT).softmax(-1) @ q, backend="cupyflash", options=options)
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("(", r"\(")):
        fn(torch.randn(1, 1, 4, 8))


def test_dynamic_sequence_axis_marked():
    m = CausalSelfAttention(32, 2, block_size=32)
    graphs = compile_and_compare(m, torch.randn(2, 8, 32), expect=1, dynamic=True,
                                 calls=[(torch.randn(2, 13, 32),), (torch.randn(2, 5, 32),)])
    assert len(graphs) == 1  # one dynamic graph served every length, fused


def test_dynamic_by_recompile_keeps_fusing():
    """Static first compile, then a new length recompiles with a dynamic axis: fused both times."""
    m = GPT(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)
    graphs = compile_and_compare(m, torch.randint(0, 64, (2, 8)), expect=2,
                                 calls=[(torch.randint(0, 64, (2, 11)),), (torch.randint(0, 64, (2, 6)),)])
    assert len(graphs) == 2
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in graphs[1].graph.nodes)


def test_explain_report_lists_fused_and_skipped_sites():
    def two_sites(q, k, v):
        fused = (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
        return fused + probs @ v, probs

    torch._dynamo.reset()
    counters.clear()
    report = compile_backend.explain(two_sites, *(torch.randn(1, 2, 5, 16) for _ in range(3)))
    assert [s.fused for s in report.sites] == [True, False]
    assert report.fused[0].scale == 0.25 and report.fused[0].causal is False and report.fused[0].has_bias is False
    assert "leave the graph" in report.skipped[0].reason
    text = str(report)
    assert "2 softmax-attention site(s), 1 fused, 1 left alone" in text
    assert "two_sites" in text and "FUSED" in text and "skipped: the attention probabilities leave the graph" in text
    assert counters["cupyflash"]["attention_fused"] == 0  # explain does not count


def test_sites_are_logged(caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="cupyflash.compile"):
        torch.compile(CausalSelfAttention(32, 2, block_size=16), backend="cupyflash",
                      options={"inner": "eager"})(torch.randn(1, 4, 32))
    assert any("fused attention at" in r.getMessage() and r.name == "cupyflash.compile" for r in caplog.records)


def test_training_steps_match_eager():
    """A few optimizer steps: the fused model's parameters track eager's."""
    ref = GPT(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    fused = GPT(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    fused.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    counters.clear()
    step_fused = torch.compile(fused, backend="cupyflash", options={"inner": "aot_eager"})
    # SGD: Adam's normalisation would magnify rounding-level gradient differences on tiny gradients.
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, fused)]
    for _ in range(3):
        idx, tgt = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
        for model, opt in ((ref, opts[0]), (step_fused, opts[1])):
            opt.zero_grad()
            model(idx, tgt).backward()
            opt.step()
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert counters["cupyflash"]["attention_fused"] == 2
