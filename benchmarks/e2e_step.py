"""End-to-end GPT training step: the cupyflash backend against what a user already has, in one process.

The GPT of gpt_train_step.py (d_model 768, 12 heads, causal, bf16; one forward + backward + AdamW step) at four
(T, batch, layers) shapes, each variant from the same weights and batch:

    eager-naive           the naive attention (nanoGPT's manual path), eager
    inductor-naive        the same, torch.compile (Inductor)
    eager-sdpa            the model hand-rewritten to F.scaled_dot_product_attention (nanoGPT's flash path), eager
    inductor-sdpa         the same, torch.compile (Inductor): the baseline to beat
    cupyflash             the naive model, torch.compile(backend="cupyflash")
    cupyflash-graphs      the same with mode="reduce-overhead" (CUDA graphs; cudagraph_mark_step_begin each step)
    inductor-sdpa-graphs  Inductor + SDPA with mode="reduce-overhead" (the control for CUDA graphs; not by default)

Median step time (CUDA events around each step, after warm-up) and peak allocated memory (weights, AdamW state and
activations), the first step's loss (the same weights and batch, so the same loss up to rounding) and the fused
sites. Writes a markdown table and JSON to benchmarks/results/e2e-<GPU>.{md,json}.

    python benchmarks/e2e_step.py                                   # all four shapes, ~10+ min of compiling
    python benchmarks/e2e_step.py --shapes 512x8x12 --merge         # one shape; --merge keeps the other rows
    python benchmarks/e2e_step.py --variants inductor-sdpa-graphs cupyflash-graphs --merge
    python benchmarks/e2e_step.py --quick                           # smoke run: T=1024 only, 2 + 3 steps
    python benchmarks/e2e_step.py --variants inductor-sdpa cupyflash --interleave  # steps in turns: host drift shared
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from gpt_train_step import GPT, CausalSelfAttention, step_timer

SHAPES = ((512, 8, 12), (1024, 16, 4), (4096, 4, 4), (16384, 1, 4))  # (T, batch, layers)
QUICK_SHAPE = (1024, 16, 4)
RESULTS = Path(__file__).resolve().parent / "results"
LOSS_RTOL = 0.01  # a first-step loss this far (relative) from eager-naive's is flagged in the notes


class SDPACausalSelfAttention(CausalSelfAttention):
    """The naive layer hand-rewritten to ``F.scaled_dot_product_attention``, as nanoGPT's flash path: same
    parameters, no mask buffer (``is_causal`` replaces it)."""

    def __init__(self, d_model, n_head, block_size, dropout):
        super().__init__(d_model, n_head, 0, dropout)
        del self.bias

    def attend(self, q, k, v):
        p = self.attn_dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)


@dataclass(frozen=True)
class Variant:
    name: str
    attention: str  # "naive" or "sdpa": which of build_models' models
    backend: Optional[str]  # None: eager; "inductor" or "cupyflash"
    graphs: bool = False  # mode="reduce-overhead", torch.compiler.cudagraph_mark_step_begin() before each step

    def compile(self, model: torch.nn.Module, compiler: str = "inductor"):
        """``model`` as this variant runs it; ``compiler="aot_eager"`` stands in for Inductor (CPU checks)."""
        if self.backend is None:
            return model
        if self.graphs and compiler != "inductor":
            raise ValueError(f"{self.name}: CUDA graphs need Inductor, not compiler={compiler!r}")
        mode = "reduce-overhead" if self.graphs else None
        if self.backend == "cupyflash":
            options = None if compiler == "inductor" else {"inner": compiler}
            return torch.compile(model, backend="cupyflash", mode=mode, options=options)
        return torch.compile(model, backend=compiler, mode=mode)


VARIANTS = {v.name: v for v in (
    Variant("eager-naive", "naive", None),
    Variant("inductor-naive", "naive", "inductor"),
    Variant("eager-sdpa", "sdpa", None),
    Variant("inductor-sdpa", "sdpa", "inductor"),
    Variant("cupyflash", "naive", "cupyflash"),
    Variant("cupyflash-graphs", "naive", "cupyflash", graphs=True),
    Variant("inductor-sdpa-graphs", "sdpa", "inductor", graphs=True),
)}
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if name != "inductor-sdpa-graphs")


def build_models(vocab: int, T: int, layers: int, d_model: int, heads: int, dtype: torch.dtype) -> dict:
    """{attention kind: GPT} on the CPU, all with the naive model's weights."""
    torch.manual_seed(0)
    models = {"naive": GPT(vocab, T, layers, d_model, heads).to(dtype)}
    sdpa = GPT(vocab, T, layers, d_model, heads, attention=SDPACausalSelfAttention).to(dtype)
    missing, unexpected = sdpa.load_state_dict(models["naive"].state_dict(), strict=False)
    if missing or any(not key.endswith(".attn.bias") for key in unexpected):
        raise AssertionError(f"SDPA model's weights differ from the naive one's: {missing=} {unexpected=}")
    models["sdpa"] = sdpa
    return models


def make_batch(vocab: int, T: int, batch: int, device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), both (batch, T)."""
    gen = torch.Generator().manual_seed(seed)
    idx, tgt = (torch.randint(0, vocab, (batch, T), generator=gen) for _ in range(2))
    return idx.to(device), tgt.to(device)


def train_step(variant: Variant, base: torch.nn.Module, batch, device, compiler: str = "inductor"):
    """(model on ``device``, a function doing one training step and returning the loss)."""
    model = copy.deepcopy(base).to(device)
    step_model = variant.compile(model, compiler)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    idx, tgt = batch

    def step():
        if variant.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss = step_model(idx, tgt)
        loss.backward()
        opt.step()
        return loss

    return model, step


def _failure_note(err: Exception) -> str:
    """A row's note for a variant that raised: "out of memory", else the error's type and first line (traceback
    printed)."""
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    traceback.print_exc()
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _new_row(name: str) -> dict:
    return {"variant": name, "ms": None, "peak_gib": None, "loss": None, "fused": None, "note": "", "step_ms": []}


def _warmed_up(variant: Variant, base: torch.nn.Module, batch, device, warmup: int, compiler: str, row: dict):
    """The variant's step function after `warmup` steps (compilation included); the first step's loss into `row`."""
    _, step = train_step(variant, base, batch, device, compiler)
    row["loss"] = step().item()  # compiles; before the next step, which may overwrite a CUDA graph's output
    for _ in range(warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return step


def measure(variant: Variant, base: torch.nn.Module, batch, device, warmup: int, steps: int,
            compiler: str = "inductor") -> dict:
    """One variant's row: median step ms, peak GiB, first loss, fused sites; a failure becomes the row's note."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    row = _new_row(variant.name)
    try:
        step = _warmed_up(variant, base, batch, device, warmup, compiler, row)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed = step_timer(device)
        row["step_ms"] = [timed(step) for _ in range(steps)]
        row["ms"] = statistics.median(row["step_ms"])
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as err:  # noqa: BLE001 - one variant's failure is a result, the others still run
        row["note"] = _failure_note(err)
    if variant.backend == "cupyflash":
        row["fused"] = counters["cupyflash"]["attention_fused"]
    return row


def _memory_allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure_interleaved(names, models: dict, batch, device, warmup: int, steps: int,
                        compiler: str = "inductor") -> list[dict]:
    """measure()'s rows with the variants' timed steps taken in turns, the order rotating each round: every variant
    built and warmed up first, then step i of each. A host-bound step's time drifts with the host over a run (the
    same tree has measured 12 and 20 ms a step on two hosts), and turns give every variant the same drift. Peak
    memory is still each variant's own: the most allocated during its steps, less what the other variants held."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    rows, live = [], []
    for name in names:
        variant = VARIANTS[name]
        row = _new_row(name)
        fused_before, held_before = counters["cupyflash"]["attention_fused"], _memory_allocated(device)
        try:
            step = _warmed_up(variant, models[variant.attention], batch, device, warmup, compiler, row)
            live.append((row, step, _memory_allocated(device) - held_before))  # its weights and optimizer state
        except Exception as err:  # noqa: BLE001 - one variant's failure is a result, the others still run
            row["note"] = _failure_note(err)
        if variant.backend == "cupyflash":
            row["fused"] = counters["cupyflash"]["attention_fused"] - fused_before
        rows.append(row)
    timed, peaks = step_timer(device), {id(row): 0 for row, _, _ in live}
    for i in range(steps):
        if not live:
            break
        for entry in live[i % len(live):] + live[:i % len(live)]:
            row, step, own = entry
            others = _memory_allocated(device) - own
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                row["step_ms"].append(timed(step))
            except Exception as err:  # noqa: BLE001 - as in measure(): the row notes it, the others go on
                row["note"] = _failure_note(err)
                live.remove(entry)
                continue
            if device.type == "cuda":
                peaks[id(row)] = max(peaks[id(row)], torch.cuda.max_memory_allocated() - others)
    for row, _, _ in live:
        row["ms"] = statistics.median(row["step_ms"])
        if device.type == "cuda":
            row["peak_gib"] = peaks[id(row)] / 2**30
    return rows


def _release(device) -> None:
    torch._dynamo.reset()  # also frees CUDA graph trees' memory pools
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_shape(T: int, batch_size: int, layers: int, variants, args, device) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    models = build_models(args.vocab, T, layers, args.d_model, args.heads, dtype)
    batch = make_batch(args.vocab, T, batch_size, device)
    if args.interleave:
        print(f"T={T} batch={batch_size} layers={layers}: {' '.join(variants)}, in turns ...", file=sys.stderr,
              flush=True)
        rows = [{"T": T, "batch": batch_size, "layers": layers, **row}
                for row in measure_interleaved(variants, models, batch, device, args.warmup, args.steps,
                                               args.compiler)]
        _release(device)
        check_rows(rows)
        return rows
    rows = []
    for name in variants:
        variant = VARIANTS[name]
        print(f"T={T} batch={batch_size} layers={layers}: {name} ...", file=sys.stderr, flush=True)
        row = measure(variant, models[variant.attention], batch, device, args.warmup, args.steps, args.compiler)
        _release(device)
        rows.append({"T": T, "batch": batch_size, "layers": layers, **row})
    check_rows(rows)
    return rows


def check_rows(rows: list[dict]) -> None:
    """Notes on rows whose loss strays from eager-naive's (or the first measured) or that fused too few sites."""
    ref = next((r["loss"] for r in sorted(rows, key=lambda r: r["variant"] != "eager-naive")
                if r["loss"] is not None), None)
    for r in rows:
        problems = []
        if r["loss"] is not None and ref is not None and abs(r["loss"] - ref) > LOSS_RTOL * max(1.0, abs(ref)):
            problems.append(f"loss {r['loss']:.4f} differs from {ref:.4f}")
        if r["fused"] is not None and r["fused"] != r["layers"] and not r["note"]:
            problems.append(f"fused {r['fused']} of {r['layers']} attention sites")
        r["note"] = "; ".join(filter(None, [r["note"], *problems]))


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(meta: dict, rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    shapes = list(dict.fromkeys((r["T"], r["batch"], r["layers"]) for r in rows))
    by = {(r["T"], r["batch"], r["layers"], r["variant"]): r for r in rows}
    ratios = [v for v in ("cupyflash", "cupyflash-graphs") if v in variants and "inductor-sdpa" in variants]
    lines = [f"# GPT training step, end to end, on {meta['gpu']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}; d_model {meta['d_model']}, {meta['heads']} heads, "
             f"vocab {meta['vocab']}, {meta['dtype']}, causal; forward + backward + AdamW step; median of "
             f"{meta['steps']} steps after {meta['warmup']} warm-up (CUDA events"
             f"{'; steps of the variants in turns' if meta.get('interleave') else ''}); peak = "
             f"torch.cuda.max_memory_allocated (weights, optimizer state, activations). `python "
             f"benchmarks/e2e_step.py`", "",
             "## Step time (ms, median)", "",
             "| T, batch, layers | " + " | ".join(variants) + "".join(f" | {v} / inductor-sdpa" for v in ratios) + " |",
             "|---" * (1 + len(variants) + len(ratios)) + "|"]
    for s in shapes:
        cells = [_cell(by.get((*s, v), {}).get("ms"), ".2f") for v in variants]
        base = by.get((*s, "inductor-sdpa"), {}).get("ms")
        for v in ratios:
            ms = by.get((*s, v), {}).get("ms")
            cells.append(_cell(None if ms is None or not base else ms / base, ".2f"))
        lines.append(f"| {s[0]}, {s[1]}, {s[2]} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak memory (GiB)", "", "| T, batch, layers | " + " | ".join(variants) + " |",
              "|---" * (1 + len(variants)) + "|"]
    for s in shapes:
        lines.append(f"| {s[0]}, {s[1]}, {s[2]} | "
                     + " | ".join(_cell(by.get((*s, v), {}).get("peak_gib"), ".2f") for v in variants) + " |")
    lines += ["", "## Checks: first step's loss (same weights and batch), fused sites, notes", "",
              "| T, batch, layers | variant | loss | fused | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['T']}, {r['batch']}, {r['layers']} | {r['variant']} | {_cell(r['loss'], '.4f')} | "
                     f"{_cell(r['fused'], 'd')} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _shape(text: str) -> tuple[int, int, int]:
    try:
        T, batch, layers = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is TxBATCHxLAYERS, e.g. 512x8x12; got {text!r}") from None
    return T, batch, layers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=_shape, nargs="+",
                   help="TxBATCHxLAYERS ... (default: " + " ".join("x".join(map(str, s)) for s in SHAPES)
                   + "; with --quick: " + "x".join(map(str, QUICK_SHAPE)) + ")")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=DEFAULT_VARIANTS,
                   help=f"(default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 warm-up and 3 timed steps, one shape")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"],
                   help="what compiles the compiled variants (aot_eager: a CPU smoke run)")
    p.add_argument("--out", type=Path,
                   help="markdown file (default: benchmarks/results/e2e-<GPU>[-quick].md); JSON beside it")
    p.add_argument("--interleave", action="store_true",
                   help="build every variant of a shape first, then time their steps in turns (host drift shared)")
    p.add_argument("--merge", action="store_true",
                   help="keep the existing JSON's rows (same GPU, torch and settings) that this run does not measure")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 2, 3
    args.shapes = args.shapes or ([QUICK_SHAPE] if args.quick else list(SHAPES))
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    return args


def _key(row: dict) -> tuple:
    return row["T"], row["batch"], row["layers"], row["variant"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "d_model": args.d_model,
            "heads": args.heads, "vocab": args.vocab, "dtype": args.dtype, "warmup": args.warmup,
            "steps": args.steps, "compiler": args.compiler, "interleave": args.interleave}
    out = args.out or RESULTS / f"e2e-{gpu.replace(' ', '_')}{'-quick' if args.quick else ''}.md"
    json_path = out.with_suffix(".json")
    rows = []
    for T, batch, layers in args.shapes:
        rows += run_shape(T, batch, layers, args.variants, args, device)
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        if old["meta"] == meta:
            done = {_key(r) for r in rows}
            rows = sorted([r for r in old["rows"] if _key(r) not in done] + rows,
                          key=lambda r: (*_key(r)[:3], list(VARIANTS).index(r["variant"])))
        else:
            print(f"--merge: {json_path} was measured with {old['meta']}, not {meta}; its rows are replaced",
                  file=sys.stderr)
    table = markdown(meta, rows)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out} and {json_path}", file=sys.stderr)
    return 1 if any(r["note"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
