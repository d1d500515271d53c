"""The table behind ``options={"sdpa": "route"}``: SDPA (its own backend choice) against the cupyflash op, one process.

    python benchmarks/sdpa_routing.py                       # writes benchmarks/results/sdpa-routing-<GPU>.md
    python benchmarks/sdpa_routing.py --quick               # d128, N 1024 and 8192 only (< 1 min)

For each feature a routed call can have (compile_backend/sdpa_sites.py) it times the call as the model makes it,
``F.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=..., enable_gqa=...)``, and the op call the
backend puts in its place, ``torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, scale, causal)``: bf16, head dims
64 and 128, N 512-8192 (batch x N = 16k tokens, heads x head dim = 2048), forward and forward+backward. Features:
no mask; is_causal; a boolean key-padding mask (B, 1, 1, Nk) that drops the last quarter of the keys of every
other sequence (transformers' padding, which sends SDPA to a mask-capable backend); causal + key padding, the
(B, 1, Nq, Nk) boolean mask a transformers decoder passes SDPA with padding (causal ∧ that key mask), which the
routed call gets proven as the causal flag and the (B, 1, 1, Nk) key mask; a dense additive (B, 1, Nq, Nk) bf16 mask;
grouped-query attention (4 query heads per K/V head, is_causal, enable_gqa). The markdown table gives
both medians, ours / SDPA, the backend SDPA chose and the largest difference of the outputs; below it, a suggested
rule: per (feature, head dim, pass), route when ours is at least ``--margin`` faster at every N measured.

GPU only: without a CUDA GPU it exits with status 2 and the reason. Timing: cupyflash.gpu_timing.median_timer
(CUDA events, L2 flushed, median).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FEATURES = ("none", "causal", "key padding", "causal + key padding", "dense additive", "gqa")
PASSES = ("fwd", "fwd+bwd")
GQA_GROUP = 4  # query heads per K/V head


@dataclass
class Row:
    head_dim: int
    n: int
    feature: str
    mode: str
    sdpa_backend: str
    sdpa_ms: float
    ours_ms: float
    max_diff: float  # max |ours - SDPA| of the forward outputs

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.sdpa_ms


def _inputs(feature: str, n: int, head_dim: int, tokens: int, hidden: int, device) -> tuple:
    """(q, k, v, SDPA kwargs, op's (mask, causal)) for one feature; q, k, v require grad."""
    import torch

    batch, heads = max(tokens // n, 1), hidden // head_dim
    kv_heads = heads // GQA_GROUP if feature == "gqa" else heads
    q = torch.randn(batch, heads, n, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    mask, causal = None, feature in ("causal", "gqa")
    if feature in ("key padding", "causal + key padding"):
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device)
        mask[::2, ..., 3 * n // 4:] = False
    elif feature == "dense additive":
        mask = torch.randn(batch, 1, n, n, device=device, dtype=torch.bfloat16)
    sdpa_kwargs = {"attn_mask": mask, "is_causal": causal, "enable_gqa": feature == "gqa"}
    if feature == "causal + key padding":  # SDPA: the decoder's 4-D mask; the op: what the proof makes of it
        tril = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        sdpa_kwargs["attn_mask"] = tril & mask  # (B, 1, N, N)
        return q, k, v, sdpa_kwargs, (mask, True)
    return q, k, v, sdpa_kwargs, (mask, causal)


def _sdpa_backend(q, k, v, kwargs) -> str:
    """The backend SDPA picks for these inputs (torch._fused_sdp_choice, what its dispatcher asks)."""
    import torch
    from torch.nn.attention import SDPBackend

    try:
        choice = torch._fused_sdp_choice(q, k, v, kwargs["attn_mask"], 0.0, kwargs["is_causal"],
                                         enable_gqa=kwargs["enable_gqa"])  # scale and enable_gqa: keyword-only
        return SDPBackend(choice).name.lower()
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return "?"


def measure(feature: str, n: int, head_dim: int, args, bench) -> list[Row]:
    import torch
    import torch.nn.functional as F

    import cupyflash.torch_op  # noqa: F401  (registers torch.ops.cupyflash)
    from cupyflash.validate import default_scale

    q, k, v, sdpa_kwargs, (mask, causal) = _inputs(feature, n, head_dim, args.tokens, args.hidden, "cuda")
    scale = default_scale(head_dim)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)

    def ours():
        return torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, scale, causal)[0]

    with torch.no_grad():
        max_diff = (ours().float() - sdpa().float()).abs().max().item()
    dout = torch.randn_like(q)
    backend = _sdpa_backend(q, k, v, sdpa_kwargs)
    rows = []
    for mode in args.passes:
        times = []
        for fn in (sdpa, ours):
            if mode == "fwd":
                with torch.no_grad():
                    times.append(bench(fn))
            else:
                times.append(bench(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout)))
        rows.append(Row(head_dim, n, feature, mode, backend, times[0], times[1], max_diff))
    del q, k, v, mask
    torch.cuda.empty_cache()
    return rows


def suggested_rule(rows: list[Row], margin: float) -> list[str]:
    """Per (feature, head dim, pass): route when ours / SDPA <= 1 - margin at every N, keep otherwise."""
    lines = [f"Suggested rule (route where ours / SDPA <= {1 - margin:.2f} at every N measured):", "",
             "| feature | D | pass | ours / SDPA (min-max over N) | suggestion |", "|---|---|---|---|---|"]
    keys = sorted({(r.feature, r.head_dim, r.mode) for r in rows}, key=lambda t: (FEATURES.index(t[0]), t[1], t[2]))
    for feature, d, mode in keys:
        ratios = [r.ratio for r in rows if (r.feature, r.head_dim, r.mode) == (feature, d, mode)]
        verdict = "route" if max(ratios) <= 1 - margin else "keep"
        lines.append(f"| {feature} | {d} | {mode} | {min(ratios):.2f}-{max(ratios):.2f} | {verdict} |")
    return lines


def markdown(meta: dict, rows: list[Row], margin: float) -> str:
    out = [f"# SDPA vs the cupyflash op, per routed-call feature ({meta['gpu']})", "",
           f"torch {meta['torch']} · {meta['timer']} · bf16 · batch x N = {meta['tokens']} tokens, heads x D = "
           f"{meta['hidden']} · command: `{meta['command']}`", "",
           "| D | N | feature | pass | SDPA backend | SDPA ms | ours ms | ours / SDPA | max abs diff |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r.head_dim} | {r.n} | {r.feature} | {r.mode} | {r.sdpa_backend} | {r.sdpa_ms:.3f} | "
            f"{r.ours_ms:.3f} | {r.ratio:.2f} | {r.max_diff:.2e} |" for r in rows]
    return "\n".join(out + [""] + suggested_rule(rows, margin)) + "\n"


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--head-dims", type=_csv(int), default=[64, 128])
    ap.add_argument("--seqlens", type=_csv(int), default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--features", type=_csv(str), default=list(FEATURES), help=f"of {', '.join(FEATURES)}")
    ap.add_argument("--passes", type=_csv(str), default=list(PASSES), help=f"of {', '.join(PASSES)}")
    ap.add_argument("--tokens", type=int, default=16384, help="batch x N")
    ap.add_argument("--hidden", type=int, default=2048, help="heads x head dim")
    ap.add_argument("--margin", type=float, default=0.05, help="how much faster ours must be to route (0.05: 5%%)")
    ap.add_argument("--quick", action="store_true", help="head dim 128, N 1024 and 8192")
    ap.add_argument("--out", type=Path, help="markdown path (default results/sdpa-routing-<GPU>.md); JSON beside it")
    args = ap.parse_args(argv)
    for name, known in (("features", FEATURES), ("passes", PASSES)):
        bad = [x for x in getattr(args, name) if x not in known]
        if bad:
            ap.error(f"--{name}: unknown {bad}; expected some of {', '.join(known)}")
    if args.quick:
        args.head_dims, args.seqlens = [128], [1024, 8192]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from cupyflash.errors import gpu_missing

    if gpu_missing("sdpa_routing.py"):
        return 2
    import torch

    from cupyflash.gpu_timing import median_timer

    timer, bench = median_timer()
    gpu = torch.cuda.get_device_name()
    rows = []
    for d in args.head_dims:
        for n in args.seqlens:
            for feature in args.features:
                rows += measure(feature, n, d, args, bench)
                for r in rows[-len(args.passes):]:
                    print(f"D={d} N={n} {feature} {r.mode}: SDPA ({r.sdpa_backend}) {r.sdpa_ms:.3f} ms, "
                          f"ours {r.ours_ms:.3f} ms ({r.ratio:.2f}x)", file=sys.stderr)
    meta = {"gpu": gpu, "torch": torch.__version__, "timer": timer, "tokens": args.tokens, "hidden": args.hidden,
            "command": " ".join(["python benchmarks/sdpa_routing.py", *(argv if argv is not None else sys.argv[1:])])}
    out = args.out or RESULTS / f"sdpa-routing-{gpu.replace(' ', '_')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(meta, rows, args.margin))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
