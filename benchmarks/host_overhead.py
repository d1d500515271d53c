"""Host time per call of the forward (and fwd+bwd) with the GPU idle (B = H = 1, N = 128), through the public API
and the launch layer, beside torch SDPA's: what a short sequence pays on top of its kernels.

    python benchmarks/host_overhead.py              # on a GPU
    python benchmarks/host_overhead.py --cpu-stub   # anywhere: the CUDA path's front end on CPU tensors

``--cpu-stub`` runs the CUDA path (checks, plan, allocations, argument filling) on CPU tensors with only the device
stubbed out: no GPU query (an sm_90 is pretended), stream 0, TMA maps of zeros, and kernel calls that do nothing. It
times the Python the host runs per call, not a GPU's launch latency; its numbers are "CPU stub, not GPU".
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import cupyflash
from cupyflash import cuda_attention, launch
from cupyflash.errors import gpu_missing


def per_call_us(fn, n: int = 400, sync=None) -> float:
    """Best of 3 batches of `n` calls: host wall time per call (the GPU work is tiny and asynchronous)."""
    sync = sync or torch.cuda.synchronize
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    sync()
    return best


def install_cpu_stub() -> None:
    """Sends CPU tensors down the CUDA path with the device stubbed (see the module's docstring)."""
    import importlib

    from cupyflash import array_ops, errors, tma, torch_op

    gpu = errors.GPUInfo(0, "CPU stub", 90)
    for name in ("launch", "cuda_attention", "cuda_path"):
        try:
            module = importlib.import_module(f"cupyflash.{name}")
        except ImportError:  # a tree from before cuda_path.py
            continue
        if hasattr(module, "require_gpu"):
            module.require_gpu = lambda device_id=None: gpu
        if hasattr(module, "_stream_ptr"):
            module._stream_ptr = lambda device_index: 0
    if hasattr(array_ops.TorchOps, "stream_ptr"):
        array_ops.TorchOps.stream_ptr = lambda self, device_id: 0
    launch._run = lambda *args, **kwargs: None
    if hasattr(launch, "_run_step"):  # the driver launch: arguments packed as on the GPU, the launch itself skipped
        import contextlib

        from cupyflash import driver

        launch._device = lambda device_id: contextlib.nullcontext()
        launch._function = lambda variant, device_id: (None, 0)
        driver.launch = lambda *args: None
    tma._encode_fn = lambda: (lambda *args: 0)
    torch_op._impl = lambda q: cuda_attention
    try:
        from cupyflash import unseen_rows
        unseen_rows._on_cuda = lambda t: True
    except ImportError:  # a tree from before the op's unseen_rows
        pass


def stub_rows(causal: bool = True) -> dict:
    """The calls --cpu-stub times: B = H = 1, N = 128, d64, bf16, causal (issue 15's shape), as the user calls the
    eager function and as Inductor's code calls the ops."""
    q, k, v, g = (torch.randn(1, 1, 128, 64, dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fwd_op, bwd_op = torch.ops.cupyflash.flash_attn_fwd.default, torch.ops.cupyflash.flash_attn_bwd.default
    scale = 0.125

    def op_fwd_bwd(keys=None, unseen_rows=0):
        out, lse = fwd_op(q, k, v, keys, scale, causal, unseen_rows=unseen_rows)
        return bwd_op(g, q, k, v, keys, out, lse, scale, causal, unseen_rows=unseen_rows)

    keys = torch.ones(1, 1, 1, 128, dtype=torch.bool)  # a key padding mask, the plain kernels' key mask on sm_90
    return {
        "flash_attention fwd (no grad)": lambda: cupyflash.flash_attention(q, k, v, causal=causal),
        "flash_attention fwd (requires_grad)": lambda: cupyflash.flash_attention(*leaves, causal=causal),
        "flash_attention fwd + bwd": lambda: torch.autograd.grad(
            cupyflash.flash_attention(*leaves, causal=causal), leaves, g),
        "op fwd (Inductor's call)": lambda: fwd_op(q, k, v, None, scale, causal),
        "op fwd + bwd (Inductor's calls)": op_fwd_bwd,
        "op fwd + bwd, key padding mask": lambda: op_fwd_bwd(keys),
        "op fwd + bwd, key padding, unseen_rows 2": lambda: op_fwd_bwd(keys, 2),
    }


def piece_rows(q, k, v) -> dict:
    """The forward's pieces alone, on q, k, v: checks, plan lookup (call key built from the tensors, cache hit),
    output allocation, and launching (filling the plan's template; the kernel call itself is the device's); and
    what a plain op call runs instead of the first three: its call key and runner lookup, and the runner's
    allocators bound once."""
    from cupyflash import cuda_path, plan, torch_op
    from cupyflash.array_ops import ops_for

    xp = ops_for(q)
    out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)
    bufs = dict(q=q, k=k, v=v, out=out, lse=lse)

    def layout():
        return plan.CallLayout("fwd", "bfloat16", tuple(q.shape), k.shape[2], k.shape[1],
                               tuple(cuda_path._entry(xp, n, a) for n, a in bufs.items()), True, 0.125,
                               compute_capability=90, device_id=q.device.index, sm90_enabled=plan.sm90_enabled())

    p = plan.plan_for(layout())
    ptrs = {n: xp.address(a) for n, a in bufs.items()}
    options = (0.125, True, (-1, -1), 0.0, 0.0)

    def lookup():
        return cuda_path._planned(xp, "fwd", (q, k, v), None, options, lambda ready: p)

    runners = {}
    plain_options = (0.125, True, -1, -1, 0.0)
    runners[torch_op._plain_key((q, k, v), plain_options)] = None
    new_out, new_lse = xp.allocator(q.shape, "bfloat16", q), xp.allocator(q.shape[:-1], "float32", q)
    return {
        "  checks (layout key, cache hit)": lambda: torch_op._check_tensors(q, k, v, None),
        "  plan lookup (call key, cache hit)": lookup,
        "  allocation (out, lse)": lambda: (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)),
        "  launch (fill the template, run)": lambda: launch.execute(p, ptrs, 0, q.device.index or 0),
        "  plain call: call key, runner lookup": lambda: runners.get(torch_op._plain_key((q, k, v), plain_options)),
        "  plain call: allocation (out, lse)": lambda: (new_out(), new_lse()),
    }


def main_cpu_stub() -> int:
    install_cpu_stub()
    print("# CPU stub, not GPU: host time per call of the CUDA path's front end on CPU tensors, device stubbed; "
          "B = H = 1, N = 128, d64, bf16, causal")
    q, k, v = (torch.randn(1, 1, 128, 64, dtype=torch.bfloat16) for _ in range(3))
    for name, fn in {**stub_rows(), **piece_rows(q, k, v)}.items():
        print(f"{name:40s} {per_call_us(fn, 1000, sync=lambda: None):7.1f} us", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-stub", action="store_true", help="the CUDA path's host code on CPU tensors, device "
                                                                "stubbed (no GPU needed)")
    if parser.parse_args(argv).cpu_stub:
        return main_cpu_stub()
    if gpu_missing("host_overhead.py"):
        return 2
    q, k, v, g = (torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd_bwd():
        torch.autograd.grad(cupyflash.flash_attention(*leaves), leaves, g)

    def fwd_bwd_calling_thread():
        with torch.autograd.set_multithreading_enabled(False):
            fwd_bwd()

    class Doubling(torch.autograd.Function):
        """The autograd engine's own cost for a Python node on CUDA: one pointwise kernel each way."""

        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    fwd_op, bwd_op = torch.ops.cupyflash.flash_attn_fwd.default, torch.ops.cupyflash.flash_attn_bwd.default
    scale = q.shape[-1] ** -0.5

    def op_fwd_bwd(keys=None):
        out, lse = fwd_op(q, k, v, keys, scale, False)
        return bwd_op(g, q, k, v, keys, out, lse, scale, False)

    keys = torch.ones(1, 1, 1, 128, dtype=torch.bool, device="cuda")  # key padding: the key mask on sm_90

    rows = {
        "flash_attention fwd (requires_grad)": lambda: cupyflash.flash_attention(*leaves),
        "flash_attention fwd (no grad)": lambda: cupyflash.flash_attention(q, k, v),
        "flash_attention fwd + bwd": fwd_bwd,
        "flash_attention fwd + bwd, autograd on the calling thread": fwd_bwd_calling_thread,
        "op fwd (Inductor's call)": lambda: fwd_op(q, k, v, None, scale, False),
        "op fwd + bwd (Inductor's calls)": op_fwd_bwd,
        "op fwd + bwd, key padding mask": lambda: op_fwd_bwd(keys),
        "SDPA fwd + bwd, key padding mask": lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(*leaves, attn_mask=keys), leaves, g),
        "a Python autograd.Function's fwd + bwd (the engine alone)": lambda: torch.autograd.grad(
            Doubling.apply(leaves[0]), leaves[0], g),
        "SDPA flash fwd (no grad)": lambda: F.scaled_dot_product_attention(q, k, v),
        "SDPA flash fwd (requires_grad)": lambda: F.scaled_dot_product_attention(*leaves),
        "SDPA flash fwd + bwd": lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves), leaves, g),
    }
    rows.update(sdpa_op_rows(q, k, v, g, scale))
    print(f"# {torch.cuda.get_device_name()}: host time per call, B = H = 1, N = 128, D = 128, bf16")
    rows.update(piece_rows(q, k, v))
    for name, fn in rows.items():
        try:
            fn()
        except RuntimeError as err:  # a backend this GPU or build lacks (cuDNN's attention)
            print(f"{name:40s} n/a: {(str(err).splitlines() or [''])[0][:100]}", flush=True)
            continue
        print(f"{name:40s} {per_call_us(fn):7.1f} us", flush=True)
    return 0


def sdpa_op_rows(q, k, v, g, scale: float) -> dict:
    """SDPA's flash and cuDNN ops as Inductor's generated code calls them (aten overloads, no autograd), beside
    "op fwd (Inductor's call)": what a compiled model with SDPA pays per call. The backward's arguments are the
    forward's outputs, as AOTAutograd saves them; cuDNN's attn_bias is undefined (None), as without a mask."""
    aten = torch.ops.aten
    n_q, n_k = q.shape[2], k.shape[2]

    def flash_fwd():
        return aten._scaled_dot_product_flash_attention.default(q, k, v, 0.0, False, False, scale=scale)

    def flash_fwd_bwd():
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = flash_fwd()
        return aten._scaled_dot_product_flash_attention_backward.default(
            g, q, k, v, out, lse, cum_q, cum_k, n_q, n_k, 0.0, False, seed, offset, scale=scale)

    def cudnn_fwd():
        return aten._scaled_dot_product_cudnn_attention.default(q, k, v, None, True, 0.0, False, False, scale=scale)

    def cudnn_fwd_bwd():
        out, lse, cum_q, cum_k, _, _, seed, offset, _ = cudnn_fwd()
        return aten._scaled_dot_product_cudnn_attention_backward.default(
            g, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, n_q, n_k, 0.0, False, scale=scale)

    return {"SDPA flash op fwd (Inductor's call)": flash_fwd,
            "SDPA flash ops fwd + bwd (Inductor's calls)": flash_fwd_bwd,
            "SDPA cuDNN op fwd (Inductor's call)": cudnn_fwd,
            "SDPA cuDNN ops fwd + bwd (Inductor's calls)": cudnn_fwd_bwd}


if __name__ == "__main__":
    sys.exit(main())
