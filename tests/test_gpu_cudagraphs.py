"""CUDA graphs in a standard training loop: torch.compile(backend="cupyflash", mode="reduce-overhead") (and
``options={"mode": "reduce-overhead"}``) runs forward, backward and AdamW step for several steps, each begun with
``torch.compiler.cudagraph_mark_step_begin()`` as torch's docs ask, records and replays CUDA graphs, and gives the
losses of the same loop without graphs. Inductor + SDPA (the model hand-rewritten, benchmarks/e2e_step.py) runs the
same loop as the control: a failure in both is torch's or the loop's, a failure in the cupyflash loop alone is ours.

The GPT is benchmarks/e2e_step.py's at a small size (bf16, head_dim 64). Two batches alternate, so the model learns
them and the loss falls step by step: a replay that read a stale batch or stale weights would give another loss."""
import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

from benchmark_scripts import e2e_step

pytestmark = pytest.mark.gpu

VOCAB, T, BATCH, LAYERS, D_MODEL, HEADS = 256, 128, 4, 2, 128, 2
STEPS = 6

LOOPS = {  # name: (attention, torch.compile's arguments with CUDA graphs; without them, only the backend)
    "cupyflash mode=": ("naive", dict(backend="cupyflash", mode="reduce-overhead")),
    "cupyflash options=": ("naive", dict(backend="cupyflash", options={"mode": "reduce-overhead"})),
    "inductor sdpa (control)": ("sdpa", dict(backend="inductor", mode="reduce-overhead")),
}


@functools.cache
def _models():
    return e2e_step.build_models(VOCAB, T, LAYERS, D_MODEL, HEADS, torch.bfloat16)


def _batches():
    """A fresh pair of tensors every step (as a data loader gives), cycling over two batches."""
    pairs = [e2e_step.make_batch(VOCAB, T, BATCH, torch.device("cpu"), seed=s) for s in (1, 2)]
    return [tuple(t.cuda() for t in pairs[i % 2]) for i in range(STEPS)]


def _train(attention: str, compile_kwargs: dict, graphs: bool) -> tuple[list[float], int]:
    """The loop; returns (each step's loss, fused attention sites)."""
    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(_models()[attention]).cuda()
    step_model = torch.compile(model, **compile_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    losses = []
    for idx, tgt in _batches():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss = step_model(idx, tgt)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # read before the next replay overwrites the graph's output
    if graphs:
        from torch._inductor import cudagraph_trees

        assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor skipped CUDA graphs (see its log)"
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"
    return losses, counters["cupyflash"]["attention_fused"]


@functools.cache
def _without_graphs(attention: str, backend: str) -> tuple[list[float], int]:
    return _train(attention, dict(backend=backend), graphs=False)


@pytest.mark.parametrize("name", LOOPS)
def test_reduce_overhead_training_loop_matches_no_graphs(name):
    attention, with_graphs = LOOPS[name]
    want, fused_want = _without_graphs(attention, with_graphs["backend"])
    got, fused = _train(attention, with_graphs, graphs=True)
    assert fused == fused_want == (LAYERS if attention == "naive" else 0)
    assert want[-1] < want[0] - 0.5, f"the loop without graphs did not learn: {want}"
    # The same kernels replayed: equal up to rounding (the backward sums dQ with atomics, in any order); a stale
    # batch would be off by ~0.4 (the two batches' losses differ by that much), stale weights by more.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=5e-3, atol=1e-3,
                               msg=lambda m: f"{name}: losses with CUDA graphs {got}, without {want}\n{m}")
