"""``cupyflash demo``: fuse the naive attention of a small GPT, check it against eager, time it.

Steps: build ``demo_model.GPT`` (nanoGPT's manual attention), print the backend's rewrite report, compile
with ``torch.compile(model, backend="cupyflash")``, compare logits, loss and every parameter gradient with
eager against a higher-precision reference, and on a GPU time a training step (eager, plain
``torch.compile``, cupyflash) with its peak memory. Without a usable GPU it runs a small CPU version
(inner backend ``aot_eager`` so compiling is quick) that still shows the rewrite and the check.
"""
from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import dataclass, field

import torch

from .demo_model import GPT, GPTConfig
from .errors import CupyflashError, gpu_unavailable_reason
from .progress import Progress

log = logging.getLogger(__name__)

FUSED_COUNTER = ("cupyflash", "attention_fused")  # torch._dynamo.utils.counters[...][...]
WARMUP_STEPS = 3  # the first step compiles; the next ones settle the allocator and autotuning


@dataclass(frozen=True)
class Setup:
    """Everything that differs between the GPU and the CPU run."""

    device: str
    config: GPTConfig
    batch: int
    dtype: torch.dtype  # the dtype eager and cupyflash run in
    ref_dtype: torch.dtype  # the reference both are measured against
    backend_options: dict = field(default_factory=dict)


# GPT-2 small widths at half depth: real attention shapes (T=1024, head_dim 64) that compile in about a minute.
GPU_SETUP = Setup("cuda", GPTConfig(block_size=1024, vocab_size=50304, n_layer=6, n_head=12, n_embd=768),
                  batch=8, dtype=torch.bfloat16, ref_dtype=torch.float32)
# Small enough for a 2-core CI machine; T=64 is not a multiple of any tile, which is fine on the CPU path.
CPU_SETUP = Setup("cpu", GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64),
                  batch=2, dtype=torch.float32, ref_dtype=torch.float64, backend_options={"inner": "aot_eager"})


class PlotUnavailableError(CupyflashError):
    pass


def cupyflash_backend():
    """The backend to hand ``torch.compile``: its registered name, or the function when not installed."""
    import compile_backend
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend("cupyflash")
        return "cupyflash"
    except InvalidBackend:
        # The name is registered through the package's entry point, which exists only once it is pip-installed.
        log.debug("backend 'cupyflash' not registered (package not installed); passing the function directly")
        return compile_backend.cupyflash_backend


def _inputs(setup: Setup, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (setup.batch, setup.config.block_size)  # (B, T)
    idx = torch.randint(setup.config.vocab_size, shape, generator=gen)
    targets = torch.randint(setup.config.vocab_size, shape, generator=gen)
    return idx.to(setup.device), targets.to(setup.device)


def _fused_count() -> int:
    from torch._dynamo.utils import counters

    return counters[FUSED_COUNTER[0]][FUSED_COUNTER[1]]


def _reset_fused_count() -> None:
    from torch._dynamo.utils import counters

    counters[FUSED_COUNTER[0]].pop(FUSED_COUNTER[1], None)


# ---- correctness ---------------------------------------------------------------------------------------

def _forward_backward(model, idx, targets) -> dict[str, torch.Tensor]:
    """Logits, loss and every parameter gradient of one step, by name."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    results = {"logits": logits.detach(), "loss": loss.detach()}
    # torch.compile's wrapper prefixes names with "_orig_mod."; name the parameters as the model does.
    module = getattr(model, "_orig_mod", model)
    results.update({f"grad {n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    return results


def _rounding_floor(t: torch.Tensor) -> float:
    # FlashAttention's tests' floor: the rounding error of the dtype at magnitude ~0.3.
    return 2 * ((t + 0.3 - 0.3) - t).abs().max().item()


@dataclass(frozen=True)
class Check:
    """One compared tensor: errors of eager and of cupyflash against the reference, and the bound."""

    name: str
    eager_err: float
    fused_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.fused_err <= self.bound

    @property
    def used(self) -> float:
        """How much of the bound the error uses (> 1 fails)."""
        if self.bound == 0:
            return float("inf") if self.fused_err else 0.0
        return self.fused_err / self.bound


def compare(ref: dict, eager: dict, fused: dict) -> list[Check]:
    """The tolerance rule of DEVELOPERS.md: cupyflash's error against the reference is at most 2× (3× for
    gradients) the error of the same-dtype eager math, plus the dtype's rounding floor."""
    checks = []
    for name, want in ref.items():
        want = want.double()
        eager_err = (eager[name].double() - want).abs().max().item()
        fused_err = (fused[name].double() - want).abs().max().item()
        factor = 3 if name.startswith("grad") else 2
        checks.append(Check(name, eager_err, fused_err, factor * eager_err + _rounding_floor(eager[name])))
    return checks


def check_against_eager(setup: Setup, model: GPT, fused_model, idx, targets) -> bool:
    """Runs reference, eager and fused once each; prints the errors and PASS/FAIL; True on PASS."""
    ref = _forward_backward(copy.deepcopy(model).to(setup.ref_dtype), idx, targets)
    eager = _forward_backward(copy.deepcopy(model).to(setup.dtype), idx, targets)
    _reset_fused_count()
    fused = _forward_backward(fused_model, idx, targets)
    n_fused, n_layers = _fused_count(), setup.config.n_layer
    checks = compare(ref, eager, fused)
    grads = [c for c in checks if c.name.startswith("grad")]
    worst = max(grads, key=lambda c: c.used)
    ref_name = str(setup.ref_dtype).removeprefix("torch.")
    print(f"\ncheck against a {ref_name} reference (rule: cupyflash error <= 2x eager error, 3x for gradients,"
          f" + rounding floor):")
    for c in [x for x in checks if not x.name.startswith("grad")] + [worst]:
        label = f"gradients ({len(grads)}), worst {c.name[5:]}" if c is worst else c.name
        print(f"  {label:<44} eager {c.eager_err:.2e}  cupyflash {c.fused_err:.2e}  bound {c.bound:.2e}  "
              f"{'ok' if c.ok else 'FAIL'}")
    failed = [c.name for c in checks if not c.ok]
    fused_ok = n_fused == n_layers
    print(f"  fused attention sites: {n_fused} (the model has {n_layers} attention layers)  "
          f"{'ok' if fused_ok else 'FAIL'}")
    if failed:
        print(f"  out of bound: {', '.join(failed)}")
    if not fused_ok:
        print("  the backend did not fuse every attention layer; the report above says why")
    passed = fused_ok and not failed
    print("PASS" if passed else "FAIL")
    return passed


# ---- timing (GPU only) ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    name: str
    step_ms: float  # median over the timed steps
    peak_mib: float  # peak memory of a step above the weights and optimizer state held before it
    tokens_per_step: int


def time_training_step(name: str, model, idx, targets, steps: int) -> Timing:
    """Median time (CUDA events) and peak extra memory of zero_grad + forward + backward + AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()

    with Progress(WARMUP_STEPS + steps, f"timing {name}") as bar:
        for _ in range(WARMUP_STEPS):
            step()
            bar.advance()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            bar.advance()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del opt
    return Timing(name, statistics.median(times), peak, idx.numel())


def format_table(timings: list[Timing]) -> str:
    base = timings[0]
    lines = [f"{'':<16}{'step (ms)':>12}{'tokens/s':>12}{'speedup':>10}{'peak step mem (MiB)':>22}"]
    for t in timings:
        lines.append(f"{t.name:<16}{t.step_ms:>12.2f}{t.tokens_per_step / t.step_ms * 1e3:>12,.0f}"
                     f"{base.step_ms / t.step_ms:>9.2f}x{t.peak_mib:>22,.0f}")
    return "\n".join(lines)


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailableError("--plot needs matplotlib, which is not installed; "
                                   "pip install 'cupyflash[plot]' or drop --plot.") from None
    return plt


def plot(timings: list[Timing], path: str, title: str) -> None:
    plt = require_matplotlib()
    names = [t.name for t in timings]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_t.bar(names, [t.step_ms for t in timings], color="tab:blue")
    ax_t.set_ylabel("training step (ms, median)")
    ax_m.bar(names, [t.peak_mib for t in timings], color="tab:orange")
    ax_m.set_ylabel("peak step memory (MiB)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_all(setup: Setup, model: GPT, fused_model, idx, targets, steps: int) -> list[Timing]:
    """Eager, plain torch.compile (Inductor) and cupyflash, one after another on the same inputs."""
    variants = [("eager", lambda: copy.deepcopy(model).to(setup.dtype)),
                ("torch.compile", lambda: torch.compile(copy.deepcopy(model).to(setup.dtype))),
                ("cupyflash", lambda: fused_model)]
    timings = []
    for name, build in variants:
        timings.append(time_training_step(name, build(), idx, targets, steps))
        torch.cuda.empty_cache()  # the last variant's freed blocks must not count toward the next one
    return timings


# ---- the job --------------------------------------------------------------------------------------------

def run(*, force_cpu: bool = False, steps: int = 20, plot_path: str | None = None) -> int:
    """The demo; returns the process exit code (0 PASS, 1 FAIL)."""
    if plot_path:
        require_matplotlib()  # fail before minutes of compiling, not after
    reason = None if force_cpu else gpu_unavailable_reason()
    setup = CPU_SETUP if force_cpu or reason else GPU_SETUP
    cpu_path = "the CPU path (small GPT, inner backend aot_eager, no timings)"
    if force_cpu:
        print(f"--cpu: running {cpu_path}.")
    elif reason:
        print(f"No GPU: {reason}. Running {cpu_path}.")
    import compile_backend

    cfg = setup.config
    print(f"GPT: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, T {cfg.block_size}, "
          f"batch {setup.batch}, {str(setup.dtype).removeprefix('torch.')} on {setup.device}")
    torch.manual_seed(0)
    model = GPT(cfg).to(setup.device)  # fp32 master copy; each run takes its own copy in its dtype
    idx, targets = _inputs(setup)

    print("\nrewrite report:")
    print(compile_backend.explain(copy.deepcopy(model).to(setup.dtype), idx, targets))

    fused_model = torch.compile(copy.deepcopy(model).to(setup.dtype), backend=cupyflash_backend(),
                                options=setup.backend_options or None)
    passed = check_against_eager(setup, model, fused_model, idx, targets)
    if setup.device == "cuda":
        timings = time_all(setup, model, fused_model, idx, targets, steps)
        gpu = torch.cuda.get_device_name()
        print(f"\ntraining step on {gpu} (median of {steps}, B={setup.batch}, T={cfg.block_size}):")
        print(format_table(timings))
        if plot_path:
            plot(timings, plot_path, f"GPT training step on {gpu}")
            print(f"plot written to {plot_path}")
    elif plot_path:
        print("no plot: timings need a GPU")
    return 0 if passed else 1
