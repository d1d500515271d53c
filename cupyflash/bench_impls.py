"""What the benchmarks time: our kernel and its peers behind one signature, their inputs, and one pass
(fwd, bwd, fwd+bwd) as a no-argument callable. ``IMPLS`` is the one list of them, shared by ``cupyflash bench``,
``benchmarks/floor.py`` and the pytest-benchmark suite.

Importing this module needs no torch (``cupyflash bench`` parses its flags and formats tables without it), so
torch is imported where it is used.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable


def _cupyflash(q, k, v, causal):
    import cupyflash

    return cupyflash.flash_attention(q, k, v, causal=causal)


def _sdpa(backend_name: str):
    def run(q, k, v, causal):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The backend is chosen at the forward; autograd records that backend's own backward.
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # square: top-left = bottom-right

    return run


def _fa4(q, k, v, causal):
    """FlashAttention-4 takes (B, N, H, D): it gets transposed views of our (B, H, N, D), not copies (its kernels
    take any strides with the last one 1), and its backward is autograd's through ``flash_attn_func``."""
    from flash_attn.cute import flash_attn_func

    out, _lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, N, H, D)
                                softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal)
    return out.transpose(1, 2)  # (B, H, N, D)


def _naive(q, k, v, causal):
    """Eager softmax(Q Kᵀ / sqrt(D)) V in the inputs' dtype, as unfused model code writes it."""
    import torch

    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)  # (Nq, Nk)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, N, D)


@dataclass(frozen=True)
class Impl:
    run: Callable  # (q, k, v, causal) -> out, all (B, H, N, D)
    label: str  # its columns in the table
    flag: str | None = None  # its name in ``--peers`` (None: ours, always run)
    ratio: bool = False  # a default peer of ``cupyflash bench`` and floor.py; the table divides our TFLOP/s by its
    max_seqlen: int | None = None  # holds the (N, N) scores (memory B·H·N²): benchmarked only up to this N
    refuses: tuple = ()  # what it raises for inputs it cannot take (besides NotImplementedError and OOM)
    needs: str | None = None  # a module it imports, never a dependency of ours: skipped where not importable


OURS = "cupyflash"
IMPLS: dict[str, Impl] = {
    OURS: Impl(_cupyflash, "cupyflash"),
    "sdpa-flash": Impl(_sdpa("FLASH_ATTENTION"), "SDPA flash", "flash", ratio=True, refuses=(RuntimeError,)),
    "sdpa-cudnn": Impl(_sdpa("CUDNN_ATTENTION"), "SDPA cuDNN", "cudnn", ratio=True, refuses=(RuntimeError,)),
    # FA4 checks what it supports (arch, head dim, dtype) with assert.
    "fa4": Impl(_fa4, "FA4", "fa4", ratio=True, refuses=(AssertionError,), needs="flash_attn.cute"),
    "sdpa-math": Impl(_sdpa("MATH"), "SDPA math", "math", max_seqlen=4096, refuses=(RuntimeError,)),
    "naive": Impl(_naive, "naive eager", "naive", max_seqlen=4096, refuses=(RuntimeError,)),
}


@functools.cache
def not_importable(impl: str) -> str | None:
    """None if `impl` can be imported here; else one line saying it is skipped and why."""
    module = IMPLS[impl].needs
    if module is None:
        return None
    try:
        importlib.import_module(module)
    except Exception as err:  # not only ImportError: a broken install of an optional peer is a skip as well
        why = (str(err).splitlines() or [""])[0]
        return f"{IMPLS[impl].label} skipped: {module} is not importable ({type(err).__name__}: {why})"
    return None


def make_inputs(shape, dtype, seed=0):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def unavailable_reason(impl: str, q, k, v, dout, causal: bool) -> str | None:
    """None if `impl` runs forward and backward on these inputs; else why not (SDPA's own warnings included).

    Only "this implementation cannot take these inputs" counts (not importable, NotImplementedError, running
    out of memory, what ``Impl.refuses`` names); anything else propagates as a real failure.
    """
    import torch

    spec = IMPLS[impl]
    missing = not_importable(impl)
    if missing:
        return missing
    if spec.max_seqlen is not None and q.shape[-2] > spec.max_seqlen:
        return f"{impl} materialises N x N scores; benchmarked only up to N = {spec.max_seqlen}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = spec.run(q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
        except NotImplementedError as err:
            return f"{impl}: {err}"
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too; its text varies with the allocator's state
            return f"{impl}: out of GPU memory"
        except spec.refuses as err:
            why = " | ".join(str(w.message).splitlines()[0] for w in caught)
            first = (str(err).splitlines() or [type(err).__name__])[0]  # a bare assert has no text
            return f"{impl} unavailable: {first}" + (f" ({why})" if why else "")
    return None


def pass_fn(impl: str, mode: str, q, k, v, dout, causal: bool) -> Callable[[], object]:
    """A no-argument callable running one pass; for "bwd", the forward runs once here, outside the timing."""
    import torch

    fwd = IMPLS[impl].run
    if mode == "fwd":
        return lambda: fwd(q, k, v, causal)
    if mode == "bwd":
        out = fwd(q, k, v, causal)
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    assert mode == "fwd+bwd", mode
    return lambda: torch.autograd.grad(fwd(q, k, v, causal), (q, k, v), dout)
