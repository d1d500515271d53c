"""benchmarks/host_overhead.py's rows of SDPA's own ops on the CPU: they call the flash and cuDNN ops with the
arguments their schemas take, the backward from the forward's outputs (as AOTAutograd saves them), on meta tensors
(the ops' meta kernels run the argument checks and shapes without a GPU)."""
import pytest
import torch

from benchmark_scripts import host_overhead


@pytest.mark.parametrize("backend", ["flash", "cuDNN"])
def test_sdpa_op_rows_call_the_ops_as_inductor_does(backend):
    q, k, v, g = (torch.empty(1, 2, 128, 64, device="meta", dtype=torch.bfloat16) for _ in range(4))
    rows = host_overhead.sdpa_op_rows(q, k, v, g, 0.125)
    out = rows[f"SDPA {backend} op fwd (Inductor's call)"]()
    assert out[0].shape == q.shape and out[1].shape[:3] == q.shape[:3]
    grads = rows[f"SDPA {backend} ops fwd + bwd (Inductor's calls)"]()
    assert [t.shape for t in grads] == [q.shape, k.shape, v.shape]
