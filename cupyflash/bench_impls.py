"""What the benchmarks time: our kernel and its peers behind one signature, their inputs, and one pass
(fwd, bwd, fwd+bwd) as a no-argument callable. Shared by ``cupyflash bench`` and the pytest-benchmark suite."""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

# Peers that materialise the (N, N) scores: their memory grows as B·H·N², so they stop at this N.
MAX_SEQLEN = {"sdpa-math": 4096, "naive": 4096}


def _cupyflash(q, k, v, causal):
    import cupyflash

    return cupyflash.flash_attention(q, k, v, causal=causal)


def _sdpa(backend_name: str):
    def run(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The backend is chosen at the forward; autograd records that backend's own backward.
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # square: top-left = bottom-right

    return run


def _naive(q, k, v, causal):
    """Eager softmax(Q Kᵀ / sqrt(D)) V in the inputs' dtype, as unfused model code writes it."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)  # (Nq, Nk)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, N, D)


IMPLS: dict[str, Callable] = {
    "cupyflash": _cupyflash,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
    "naive": _naive,
}


def make_inputs(shape, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def unavailable_reason(impl: str, q, k, v, dout, causal: bool) -> str | None:
    """None if `impl` runs forward and backward on these inputs; else why not (SDPA's own warnings included).

    Only "this backend cannot take these inputs" counts (RuntimeError from SDPA's dispatcher,
    NotImplementedError from ours, running out of memory); anything else propagates as a real failure.
    """
    if q.shape[-2] > MAX_SEQLEN.get(impl, q.shape[-2]):
        return f"{impl} materialises N x N scores; benchmarked only up to N = {MAX_SEQLEN[impl]}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = IMPLS[impl](q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
        except NotImplementedError as err:
            return f"{impl}: {err}"
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too; its text varies with the allocator's state
            return f"{impl}: out of GPU memory"
        except RuntimeError as err:
            if impl == "cupyflash":
                raise
            why = " | ".join(str(w.message).splitlines()[0] for w in caught)
            return f"{impl} unavailable: {str(err).splitlines()[0]}" + (f" ({why})" if why else "")
    return None


def pass_fn(impl: str, mode: str, q, k, v, dout, causal: bool) -> Callable[[], object]:
    """A no-argument callable running one pass; for "bwd", the forward runs once here, outside the timing."""
    fwd = IMPLS[impl]
    if mode == "fwd":
        return lambda: fwd(q, k, v, causal)
    if mode == "bwd":
        out = fwd(q, k, v, causal)
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    assert mode == "fwd+bwd", mode
    return lambda: torch.autograd.grad(fwd(q, k, v, causal), (q, k, v), dout)
