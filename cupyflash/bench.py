"""``cupyflash bench``: attention TFLOP/s and peak memory against N, ours and its peers', in one run on this GPU.

For each dtype, head dim and mask it sweeps N with B·N = ``--tokens`` and H·D = ``--hidden``, and times each
pass (fwd, bwd, fwd+bwd) of cupyflash and the chosen peers (``bench_impls.IMPLS``; an optional peer not importable
here, FlashAttention-4, is skipped with one line saying so): median GPU time by CUDA events after warm-up
(``gpu_timing.median_timer``), peak memory above the inputs during one call. TFLOP/s counts 4·B·H·N²·D for the
forward (half if causal), 2.5x that for the backward and 3.5x for fwd+bwd. It prints a markdown table, writes
the records and our TFLOP/s over each ratio peer's as JSON (``--json``) and plots them (``--plot``, through
``plot_results``).

Importing this module needs neither torch nor a GPU: parsing, the table, the JSON and the plot work on the
records alone, so they are tested on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

from .bench_impls import IMPLS, OURS
from .bench_shapes import HIDDEN, MODES, TOKENS, attention_flops, bench_shape
from .errors import CupyflashError, NoGPUError, require_gpu
from .progress import Progress

PEERS = {spec.flag: impl for impl, spec in IMPLS.items() if spec.flag}  # --peers flag -> impl
RATIO_TO = tuple(impl for impl, spec in IMPLS.items() if spec.ratio)  # default peers; the table divides by them
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # flag -> torch attribute
CAUSAL = {"yes": True, "no": False}
DEFAULT_SEQLENS = tuple(2**i for i in range(9, 15))  # 512 .. 16384


# ---- arguments --------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    """An argparse type: a whole number, at least 1 (the CLI's counts and sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of milliseconds, got {text}")
    return value


def _list_of(convert, choices=None):
    """An argparse type for comma-separated values, each checked against `choices` (dict: mapped through it)."""
    def parse(text: str) -> tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        bad = [item for item in items if choices is not None and item not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {','.join(choices)}")
        return tuple(convert(item) for item in items)
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``cupyflash bench``; values arrive parsed (tuples of ints, dtype names, bools, impl names)."""
    parser.add_argument("--head-dims", type=_list_of(positive_int), default=(64, 128), metavar="64,128")
    parser.add_argument("--dtypes", type=_list_of(str, DTYPES), default=("bf16", "fp16"), metavar="bf16,fp16")
    parser.add_argument("--causal", type=_list_of(CAUSAL.get, CAUSAL), default=(False, True), metavar="yes,no")
    parser.add_argument("--seqlens", type=_list_of(positive_int), default=DEFAULT_SEQLENS, metavar="512,...,16384",
                        help="sequence lengths N (default: powers of two from 512 to 16384)")
    parser.add_argument("--tokens", type=positive_int, default=TOKENS,
                        help=f"batch x N (batch at least 1; default {TOKENS})")
    parser.add_argument("--hidden", type=positive_int, default=HIDDEN, help=f"heads x head_dim (default {HIDDEN})")
    parser.add_argument("--passes", type=_list_of(str, MODES), default=MODES, metavar=",".join(MODES))
    parser.add_argument("--peers", type=_list_of(PEERS.get, PEERS), default=RATIO_TO,
                        metavar=",".join(IMPLS[p].flag for p in RATIO_TO),
                        help=f"implementations to compare with, of {','.join(PEERS)} (math and naive hold N x N "
                        "scores: up to N = 4096; fa4, FlashAttention-4, runs where flash_attn.cute is importable)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the meta data, records and ratios as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG plot (needs matplotlib)")
    parser.add_argument("--warmup-ms", type=_positive_ms, default=25.0, help="warm-up per timing (default 25)")
    parser.add_argument("--rep-ms", type=_positive_ms, default=100.0, help="timed repeats per timing (default 100)")


# ---- measuring (GPU) --------------------------------------------------------------------------------------

def _require_cuda():
    """The GPU torch and CuPy will use; NoGPUError (exit 2, one sentence) without one."""
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError(f"bench needs a CUDA GPU and torch {torch.__version__} sees none; run it on a machine "
                         f"with an NVIDIA GPU (sm_80 or newer).")
    return require_gpu(torch.cuda.current_device())  # CuPy sees it too, and it is sm_80 or newer


def _failure(impl: str, err: Exception) -> tuple[str, bool]:
    """(note, is_error): running out of memory is a limit of this GPU, anything else is a failure to report."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return f"{impl}: out of GPU memory", False
    return f"{impl}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}", True


def _measure_impl(impl: str, base: dict, passes, inputs, timer) -> list[dict]:
    """One record per pass; where `impl` cannot run, its numbers are None and `note` says why."""
    from .bench_impls import pass_fn, unavailable_reason
    from .gpu_timing import peak_memory_bytes

    causal = base["causal"]
    try:
        note, error = unavailable_reason(impl, *inputs, causal), False  # also warms up (JIT-compiles ours)
    except Exception as err:  # a peer's failure must not end the sweep; it is reported instead
        note, error = _failure(impl, err)
    records = []
    for mode in passes:
        flops = attention_flops(base["batch"], base["heads"], base["n"], base["n"], base["head_dim"], causal, mode)
        record = dict(base, impl=impl, **{"pass": mode}, flops=flops, ms=None, tflops=None, peak_mib=None,
                      note=note, error=error)
        if note is None:
            try:
                fn = pass_fn(impl, mode, *inputs, causal)
                peak_mib = peak_memory_bytes(fn) / 2**20
                ms = timer(fn)
                record.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, peak_mib=peak_mib)
            except Exception as err:
                record["note"], record["error"] = _failure(impl, err)
            fn = None  # frees the saved forward of a "bwd" pass before the next pass allocates
        records.append(record)
    return records


def importable_peers(peers) -> tuple[tuple, list[str]]:
    """(`peers` without repeats, minus those not importable here; one line per peer left out saying why)."""
    from . import bench_impls

    peers = tuple(dict.fromkeys(peers))
    skipped = {p: bench_impls.not_importable(p) for p in peers}
    return tuple(p for p in peers if not skipped[p]), [why for why in skipped.values() if why]


def measure(args: argparse.Namespace, timer, peers) -> list[dict]:
    """Every (dtype, head dim, mask, N) x (ours and `peers`) x pass of `args`, as flat records."""
    import torch

    from .bench_impls import make_inputs

    impls = (OURS,) + tuple(peers)
    configs = list(itertools.product(args.dtypes, args.head_dims, args.causal, args.seqlens))
    records = []
    with Progress(len(configs) * len(impls), "cupyflash bench") as bar:
        for dtype, head_dim, causal, n in configs:
            batch, heads, _, _ = shape = bench_shape(n, head_dim, args.tokens, args.hidden)  # (B, H, N, D)
            inputs = make_inputs(shape, getattr(torch, DTYPES[dtype]))  # q, k, v, dout
            base = dict(dtype=dtype, head_dim=head_dim, causal=causal, n=n, batch=batch, heads=heads)
            for impl in impls:
                records += _measure_impl(impl, base, args.passes, inputs, timer)
                bar.advance(note=f"{_config_name(base)} N={n} {impl}")
            del inputs
            torch.cuda.empty_cache()  # this N's blocks must not count toward the next N's peak
    return records


def _meta(gpu, timer_name: str, args: argparse.Namespace, seconds: float, skipped: list[str]) -> dict:
    import torch

    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = "not importable"
    return dict(gpu=gpu.name, sm=gpu.arch, torch=torch.__version__, cuda=torch.version.cuda, cupy=cupy_version,
                timer=f"{timer_name}, warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                tokens=args.tokens, hidden=args.hidden, seconds=round(seconds, 1), skipped=skipped)


# ---- reporting (records only) -----------------------------------------------------------------------------

def _config_name(r: dict) -> str:
    return f"{r['dtype']} d{r['head_dim']} {'causal' if r['causal'] else 'full'}"


def _label(impl: str) -> str:
    return IMPLS[impl].label if impl in IMPLS else impl


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


ROW_KEYS = ("dtype", "head_dim", "causal", "n", "batch", "heads", "pass")


def _rows(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """The records by table row (the values of ROW_KEYS), then by implementation."""
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault(tuple(r[key] for key in ROW_KEYS), {})[r["impl"]] = r
    return rows


def _ratio(by_impl: dict[str, dict], peer: str) -> float | None:
    """Our TFLOP/s over `peer`'s in one row; None unless both ran."""
    ours, theirs = (by_impl.get(impl, {}).get("tflops") for impl in (OURS, peer))
    return ours / theirs if ours is not None and theirs else None


def ratio_records(records: list[dict]) -> list[dict]:
    """The table's "ours / peer" cells as records (ROW_KEYS, ``peer``, ``ours_over``), where both ran."""
    out = []
    for row, by_impl in _rows(records).items():
        for peer in RATIO_TO:
            ratio = _ratio(by_impl, peer)
            if ratio is not None:
                out.append(dict(zip(ROW_KEYS, row), peer=peer, ours_over=round(ratio, 3)))
    return out


def format_table(records: list[dict]) -> str:
    """Markdown: one row per (dtype, D, mask, N, pass); TFLOP/s and peak MiB per implementation, our TFLOP/s over
    each of RATIO_TO's that ran (SDPA flash, cuDNN, FA4); a missing number is "—[i]", footnote i saying why."""
    impls = list(dict.fromkeys(r["impl"] for r in records))
    ratio_to = [p for p in RATIO_TO if p in impls]
    notes: dict[str, int] = {}
    head = ["dtype", "D", "causal", "N", "B x H", "pass"]
    head += [f"{_label(i)} {unit}" for i in impls for unit in ("TFLOP/s", "MiB")]
    head += [f"ours / {_label(p).removeprefix('SDPA ')}" for p in ratio_to]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (dtype, d, causal, n, batch, heads, mode), by_impl in _rows(records).items():
        cells = [dtype, str(d), "yes" if causal else "no", str(n), f"{batch} x {heads}", mode]
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or r["tflops"] is None:
                note = r["note"] if r is not None else f"{impl}: not run"
                cells += [f"—[{notes.setdefault(note, len(notes) + 1)}]", "—"]
            else:
                cells += [f"{r['tflops']:.1f}", f"{r['peak_mib']:,.0f}"]
        cells += [_fmt(_ratio(by_impl, p), ".2f") for p in ratio_to]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i}] {note}" for note, i in notes.items()]
    return "\n".join(lines)


def format_report(results: dict) -> str:
    """The table under a header naming the GPU, the versions, the timing method and the shapes."""
    m = results["meta"]
    return "\n".join([
        "# Attention: cupyflash vs its peers",
        "",
        f"GPU: **{m['gpu']}** ({m['sm']}) · torch {m['torch']} (CUDA {m['cuda']}) · cupy {m['cupy']} · {m['date']}",
        f"Timing: {m['timer']}. Shapes: batch·N = {m['tokens']} tokens, heads·head_dim = {m['hidden']}. "
        "TFLOP/s = 4·B·H·N²·D (÷2 causal), backward ×2.5, fwd+bwd ×3.5. MiB: peak memory above the inputs.",
        *(f"{why}." for why in m.get("skipped", [])),  # older JSON files have no "skipped"
        "",
        format_table(results["records"]),
        "",
    ])


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def plot_results(results: dict, path) -> None:
    """A PNG of `results` ({"meta", "records"}, as ``--json`` writes them): per pass, TFLOP/s and peak memory
    against N (log2 axes), one line per implementation and (dtype, head dim, mask)."""
    from .demo import require_matplotlib

    plt = require_matplotlib()
    records, meta = results["records"], results["meta"]
    passes = list(dict.fromkeys(r["pass"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    configs = list(dict.fromkeys(_config_name(r) for r in records))
    seqlens = sorted({r["n"] for r in records})
    fig, axes = plt.subplots(len(passes), 2, figsize=(12, 3.8 * len(passes)), squeeze=False)
    for (ax_tf, ax_mem), mode in zip(axes, passes):
        # Colour says the implementation, line style the config, so a peer's lines read as one family.
        for (i, impl), (j, config) in itertools.product(enumerate(impls), enumerate(configs)):
            points = sorted((r["n"], r["tflops"], r["peak_mib"]) for r in records
                            if r["pass"] == mode and r["impl"] == impl and _config_name(r) == config
                            and r["tflops"] is not None)
            if not points:
                continue
            ns, tflops, mib = zip(*points)
            style = dict(color=f"C{i}", linestyle=("-", "--", ":", "-.")[j % 4], marker="o", markersize=3,
                         label=_label(impl) + (f" {config}" if len(configs) > 1 else ""))
            ax_tf.plot(ns, tflops, **style)
            ax_mem.plot(ns, mib, **style)
        ax_tf.set_ylabel(f"{mode} TFLOP/s")
        ax_mem.set_ylabel(f"{mode} peak memory (MiB)")
        ax_mem.set_yscale("log")  # N x N peers grow as N², ours as N: one linear axis would flatten ours
        for ax in (ax_tf, ax_mem):
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [str(n) for n in seqlens])
            ax.set_xlabel("N (sequence length)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Attention on {meta['gpu']} · torch {meta['torch']} · batch·N = {meta['tokens']}, "
                 f"heads·D = {meta['hidden']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command ------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """The sweep, table, JSON and plot of `args`; exit code 0, or 1 when an implementation failed unexpectedly."""
    too_wide = [d for d in args.head_dims if d > args.hidden]
    if too_wide:
        raise CupyflashError(f"head dim {too_wide[0]} is wider than --hidden {args.hidden}, which leaves no "
                             f"heads; pass a larger --hidden or smaller --head-dims.")
    if args.plot:
        from .demo import require_matplotlib

        require_matplotlib()  # fail before minutes of measuring, not after
    gpu = _require_cuda()
    from .gpu_timing import median_timer

    timer_name, timer = median_timer(args.warmup_ms, args.rep_ms)
    peers, skipped = importable_peers(args.peers)
    for why in skipped:
        print(f"cupyflash bench: {why}", file=sys.stderr)
    t0 = time.time()
    records = measure(args, timer, peers)
    results = dict(meta=_meta(gpu, timer_name, args, time.time() - t0, skipped), records=records,
                   ratios=ratio_records(records))
    print(format_report(results))
    if args.json:
        write_json(results, args.json)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_results(results, args.plot)
    return 1 if any(r["error"] for r in records) else 0
