"""Backward (and, with --forward, forward) tile-shape sweep on one GPU: correctness + TFLOP/s vs torch SDPA flash.

    python benchmarks/tile_sweep.py                 # backward candidates, N in {1024, 4096, 16384}, causal F/T
    python benchmarks/tile_sweep.py --quick         # N = 4096 only
    python benchmarks/tile_sweep.py --forward       # forward candidates too
    python benchmarks/tile_sweep.py --dims 96       # only head dim 96 (comma list)
    python benchmarks/tile_sweep.py --cand bwd,96,64,128,8 --cand fwd,96,128,64,8,1   # extra / ad-hoc candidates
    python benchmarks/tile_sweep.py --list          # print the plan, run nothing

Every candidate runs in a fresh subprocess that patches ``cupyflash.tiles.BACKWARD[d]`` (or ``FORWARD[d]``) before
the first kernel is built (jit._raw_module caches one RawModule per (pass, dtype, d) for the process). Inside the
subprocess:
  * only the plain variants (mods=False: non-causal and causal) are put in each RawModule, which halves NVRTC time;
  * a comment naming the candidate is appended to the source of the patched pass's module, so CuPy's on-disk
    cache key differs per candidate whatever CuPy version is installed;
  * (a) correctness, bf16 B=2 H=4 N=1000, causal F/T: out, dq, dk, dv against fp32 SDPA (math backend) on .float()
    inputs, max|err| / max|ref| <= 2e-2 -> PASS;
  * (b) timing, bf16, B*N = 16384 tokens, H*D = 2048 (H = 2048 // D): ours and SDPA FLASH_ATTENTION in the same
    process, median of cupyflash.gpu_timing.median_timer (triton do_bench, warmup 25 ms, rep 100 ms, L2 flushed,
    or the repo's own CUDA-event loop when triton is missing). Backward = torch.autograd.grad(out, (q, k, v), dout,
    retain_graph=True) after one forward. FLOPs: fwd 4*B*H*N^2*D (half if causal), bwd 2.5x fwd.
Before the timed runs all candidates' modules are compiled in parallel (CuPy's disk cache), so each timed
subprocess only loads cubins. The parent prints one table at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (pass, head_dim, (Br, Bc, warps, m_tiles[, fuse_sdp])); None = the current table entry (the baseline, read at run
# time, with its own fuse_sdp; listed shapes run without it unless a fifth element says 1). Registers and spills are
# NVRTC's (bf16, sm_90 / sm_80), noted when each was added; runs: benchmarks/results/tile-sweep-NVIDIA_H200.log (bwd
# d96) and tile-sweep-NVIDIA_H100_80GB_HBM3.log (all, before fuse_sdp).
BWD_CANDIDATES = [
    ("bwd", 96, None),              # the table: (64, 128, 8), 250 regs, 0 spills (all variants, both archs), 97 KB smem
    ("bwd", 96, (32, 64, 4, 1)),    # the table until 2026-11-22: 224 regs sm_90, no spills
    ("bwd", 96, (48, 96, 6, 1)),    # 240 regs, 0 spills (all variants, both archs), 69 KB
    ("bwd", 96, (32, 96, 6, 1)),    # 219 regs, 0 spills (all variants, both archs), 60 KB
    ("bwd", 96, (64, 64, 4, 1)),    # 254 regs, 0 spills plain sm_90; mods+dropout spills 40 B sm_90, sm_80 spills
    ("bwd", 96, (16, 32, 2, 1)),    # 211 regs, 0 spills, 21 KB
    ("bwd", 32, None),              # the table: (64, 64, 4, fused) 195 regs
    ("bwd", 32, (64, 128, 8, 1)),   # the table until session 6: 0.77-0.86x of SDPA flash on an H100
    ("bwd", 32, (64, 128, 8, 1, 1)),  # 182 regs, 0 spills
    ("bwd", 64, None),              # the table: (64, 128, 8, fused) 228 regs
    ("bwd", 64, (32, 128, 8, 1)),   # 162 regs, 0 spills
    ("bwd", 64, (64, 64, 4, 1)),    # 222 regs, 0 spills
    ("bwd", 128, None),             # the table: (32, 128, 8, fused) 251 regs
    ("bwd", 128, (16, 128, 8, 1)),  # 230 regs, 0 spills
    ("bwd", 128, (32, 64, 4, 1)),   # 255 regs, 0 spills (at the limit)
]
FWD_CANDIDATES = [  # behind --forward
    ("fwd", 96, None),              # today: (128, 32, 4, 2)  226 regs
    ("fwd", 96, (128, 64, 8, 1)),   # 173 regs, 0 spills
    ("fwd", 96, (128, 32, 8, 1)),   # 144 regs, 0 spills
    ("fwd", 96, (64, 64, 4, 1)),    # 198 regs, 0 spills
    ("fwd", 128, None),             # today: (64, 64, 4, 1) 237 regs; plain: (128, 32, 4, 2, fresh offsets)
    ("fwd", 128, (128, 64, 8, 1)),  # 204 regs, 0 spills
    ("fwd", 128, (128, 32, 8, 1)),  # 165 regs, 0 spills
]

DTYPE = "bfloat16"
TOKENS, MODEL_DIM = 16384, 2048
TOL = 2e-2


# ------------------------------------------------------------------------------------------------ child side

def _patch(kind: str, d: int, shape):
    """Patch the tile table (before any module is built), keep only plain variants, tag the source."""
    from cupyflash import jit, tiles

    table = tiles.FORWARD if kind == "fwd" else tiles.BACKWARD
    if shape is not None:
        table[d] = tiles.Tiles(*shape)
        if kind == "fwd":  # the candidate runs for the plain variants too
            tiles.FORWARD_PLAIN.pop(d, None)
    t = table[d]  # the baseline of a head dim in FORWARD_PLAIN runs that entry for its plain (non-causal) rows
    tag = f"{kind} d{d} Br={t.Br} Bc={t.Bc} warps={t.warps} m_tiles={t.m_tiles}"

    # _raw_module(key) calls module_variants(key) and then source_for(): remember the key to tag only the module
    # of the patched pass (the other pass's module stays shared between candidates in CuPy's disk cache).
    orig_variants, orig_source, state = jit.module_variants, jit.source_for, {}

    def module_variants(key):
        state["key"] = key
        return [v for v in orig_variants(key) if not v.mods]

    def source_for(variant=None):
        own = state.get("key", (None,))[0] == kind
        return orig_source(variant) + (f"\n// tile_sweep candidate: {tag}\n" if own else "")

    jit.module_variants, jit.source_for = module_variants, source_for
    return t


def child_compile(kind: str, d: int, shape, both: bool) -> dict:
    """Build this candidate's RawModule (and with `both` the other pass's, shared by the candidates of this pass
    and head dim) to fill CuPy's disk cache; no torch."""
    t0 = time.time()
    _patch(kind, d, shape)
    from cupyflash import jit

    passes = ("fwd", "bwd") if both else (kind,)
    for p in passes:
        jit._raw_module((p, DTYPE, d), 0)
    return {"compile_s": round(time.time() - t0, 1)}


def child_run(kind: str, d: int, shape, seqlens: list[int]) -> None:
    t = _patch(kind, d, shape)
    from cupyflash import launch

    # The candidates are mma.sync tiles: on Hopper the d64/d128 16-bit calls would otherwise run the sm_90a kernels.
    os.environ[launch.SM90_ENV] = "0"
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cupyflash
    from cupyflash.gpu_timing import median_timer

    def emit(**row):
        print("RESULT " + json.dumps(row), flush=True)

    emit(kind="tiles", Br=t.Br, Bc=t.Bc, warps=t.warps, m_tiles=t.m_tiles, gpu=torch.cuda.get_device_name())

    # (a) correctness
    dev, dt = "cuda", torch.bfloat16
    for causal in (False, True):
        try:
            torch.manual_seed(0)
            q, k, v = (torch.randn(2, 4, 1000, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
            t0 = time.time()
            out = cupyflash.flash_attention(q, k, v, causal=causal)
            dout = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
            first_s = time.time() - t0
            qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
            ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
            errs = {}
            for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
                a = a.float()
                errs[name] = float("inf") if not torch.isfinite(a).all() else \
                    float((a - r).abs().max() / r.abs().max().clamp_min(1e-12))
            ok = all(e <= TOL for e in errs.values())
            emit(kind="check", causal=causal, ok=ok, errs=errs, first_call_s=round(first_s, 1))
        except Exception as err:  # noqa: BLE001 - report and go on
            emit(kind="check", causal=causal, ok=False, errs={}, error=f"{type(err).__name__}: {err}"[:300])

    # (b) timing
    method, bench = median_timer(25.0, 100.0)
    heads = MODEL_DIM // d
    for n in seqlens:
        batch = max(1, TOKENS // n)
        for causal in (False, True):
            row = dict(kind="time", causal=causal, N=n, B=batch, H=heads, method=method)
            flops = 4 * batch * heads * n * n * d / (2 if causal else 1) * (2.5 if kind == "bwd" else 1.0)
            torch.manual_seed(1)
            q, k, v = (torch.randn(batch, heads, n, d, device=dev, dtype=dt, requires_grad=(kind == "bwd"))
                       for _ in range(3))
            for who in ("ours", "sdpa"):
                try:
                    if who == "ours":
                        def fwd():
                            return cupyflash.flash_attention(q, k, v, causal=causal)
                        ctx = torch.enable_grad()
                    else:
                        def fwd():
                            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
                    with ctx:
                        if kind == "bwd":
                            out = fwd()
                            dout = torch.randn_like(out)
                            ms = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
                            del out, dout
                        else:
                            with torch.no_grad():
                                ms = bench(fwd)
                    row[f"{who}_ms"] = ms
                    row[f"{who}_tflops"] = flops / (ms * 1e-3) / 1e12
                except Exception as err:  # noqa: BLE001
                    row[f"{who}_ms"] = row[f"{who}_tflops"] = None
                    row[f"{who}_error"] = f"{type(err).__name__}: {err}"[:200]
            emit(**row)
            del q, k, v
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ parent side

def _label(kind, d, shape):
    from cupyflash import tiles

    table = tiles.FORWARD if kind == "fwd" else tiles.BACKWARD
    t = tiles.Tiles(*shape) if shape is not None else table[d]
    base = " (table)" if t == table.get(d) else ""
    plain = tiles.FORWARD_PLAIN.get(d) if kind == "fwd" and shape is None else None
    if plain is not None:  # the baseline's non-causal rows run this entry, not table[d]
        base = f" (table; non-causal: {plain.Br}/{plain.Bc}/{plain.warps}wx{plain.m_tiles}, fresh offsets)"
    mt = f"x{t.m_tiles}" if kind == "fwd" else ("+fused" if t.fuse_sdp else "")
    return f"{kind} d{d} {t.Br}/{t.Bc}/{t.warps}w{mt}{base}", t


def _child_cmd(kind, d, shape, extra):
    spec = "none" if shape is None else ",".join(str(int(x)) for x in shape)  # fuse_sdp as 0/1
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(d), spec, *extra]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 4096 only")
    ap.add_argument("--forward", action="store_true", help="also the forward candidates")
    ap.add_argument("--no-backward", action="store_true", help="skip the backward candidates")
    ap.add_argument("--dims", default="", help="only these head dims, e.g. 96 or 64,128")
    ap.add_argument("--cand", action="append", default=[],
                    help="extra candidate pass,d,Br,Bc,warps[,m_tiles[,fuse_sdp 0/1]], e.g. bwd,96,64,128,8 or bwd,96,64,128,8,1,1")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per timed subprocess")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 2), help="parallel compiles")
    ap.add_argument("--no-precompile", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the candidates and exit")
    ap.add_argument("--json", help="also write all raw result rows here")
    ap.add_argument("--child", nargs=3, metavar=("PASS", "D", "SHAPE"), help=argparse.SUPPRESS)
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--both", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seqlens", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, d, spec = args.child[0], int(args.child[1]), args.child[2]
        shape = None if spec == "none" else tuple(int(x) for x in spec.split(","))
        shape = shape if shape is None or len(shape) < 5 else shape[:4] + (bool(shape[4]),)
        if args.compile_only:
            print("RESULT " + json.dumps(child_compile(kind, d, shape, args.both)), flush=True)
        else:
            child_run(kind, d, shape, [int(x) for x in args.seqlens.split(",")])
        return

    cands = [] if args.no_backward else list(BWD_CANDIDATES)
    if args.forward:
        cands += FWD_CANDIDATES
    for c in args.cand:
        p = c.split(",")
        shape = tuple(int(x) for x in p[2:6]) + ((1,) if len(p) == 5 else ()) + tuple(bool(int(x)) for x in p[6:7])
        cands.append((p[0], int(p[1]), shape))
    if args.dims:
        dims = {int(x) for x in args.dims.split(",")}
        cands = [c for c in cands if c[1] in dims]
    # drop duplicates (a hard-coded shape equal to the current table entry)
    seen, plan = set(), []
    for kind, d, shape in cands:
        label, t = _label(kind, d, shape)
        if (kind, d, t) not in seen:
            seen.add((kind, d, t))
            plan.append((kind, d, shape, label))
    seqlens = [4096] if args.quick else [1024, 4096, 16384]
    print(f"{len(plan)} candidates, N in {seqlens}, causal False/True, bf16, {TOKENS} tokens, H*D = {MODEL_DIM}")
    for p in plan:
        print("  ", p[3])
    if args.list:
        return

    t_start = time.time()
    if not args.no_precompile:
        firsts = {}  # the first candidate of each (pass, d) also compiles the other pass's (untagged) module
        for kind, d, shape, label in plan:
            firsts.setdefault((kind, d), label)

        def compile_one(p):
            kind, d, shape, label = p
            flags = ["--compile-only"] + (["--both"] if firsts[(kind, d)] == label else [])
            try:
                r = subprocess.run(_child_cmd(kind, d, shape, flags), capture_output=True, text=True,
                                   timeout=300, cwd=REPO)
                return label, r.returncode, (r.stdout + r.stderr).strip().splitlines()[-1:]
            except subprocess.TimeoutExpired:
                return label, "timeout", []

        print(f"compiling {len(plan)} candidates, {args.jobs} at a time ...", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for label, rc, tail in pool.map(compile_one, plan):
                print(f"   {label}: rc={rc} {tail[0] if tail else ''}", flush=True)
        print(f"compiled in {time.time() - t_start:.0f} s", flush=True)

    results = []  # (label, kind, rows)
    for kind, d, shape, label in plan:
        t0 = time.time()
        rows, note = [], ""
        try:
            r = subprocess.run(_child_cmd(kind, d, shape, ["--seqlens", ",".join(map(str, seqlens))]),
                               capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
            out = r.stdout
            if r.returncode != 0:
                note = f"rc={r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-3:])
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            note = f"TIMEOUT after {args.timeout} s"
        rows = [json.loads(ln[7:]) for ln in out.splitlines() if ln.startswith("RESULT ")]
        checks = {r["causal"]: r for r in rows if r["kind"] == "check"}
        chk = " ".join(f"{'causal' if c else 'full'}:{'PASS' if r['ok'] else 'FAIL'}"
                       + (f"({max(r['errs'].values()):.1e})" if r.get("errs") else f"({r.get('error', '')})")
                       for c, r in sorted(checks.items()))
        print(f"[{time.time() - t_start:5.0f} s] {label}: {time.time() - t0:.0f} s, {chk} {note}", flush=True)
        for r in rows:
            if r["kind"] == "time":
                o, s = r.get("ours_tflops"), r.get("sdpa_tflops")
                print(f"      causal={r['causal']!s:<5} N={r['N']:<6} ours {o or 0:6.1f}  sdpa {s or 0:6.1f} TFLOP/s"
                      + (f"  ratio {o / s:.2f}" if o and s else "")
                      + "".join(f"  {k}: {r[k]}" for k in ("ours_error", "sdpa_error") if k in r), flush=True)
        results.append((label, kind, rows, note))

    if args.json:
        Path(args.json).write_text(json.dumps([{"label": lb, "kind": k, "rows": rw, "note": nt}
                                               for lb, k, rw, nt in results], indent=1))

    gpu = next((r["gpu"] for _, _, rows, _ in results for r in rows if r["kind"] == "tiles"), "?")
    print(f"\n=== tile sweep on {gpu}, bf16, {TOKENS} tokens, H*D = {MODEL_DIM}, "
          f"{time.time() - t_start:.0f} s total ===")
    hdr = f"{'candidate':<34} {'causal':<6} {'N':>6} {'ours TF/s':>9} {'SDPA TF/s':>9} {'ratio':>6}  check"
    print(hdr)
    print("-" * len(hdr))
    for label, kind, rows, note in results:
        checks = {r["causal"]: r for r in rows if r["kind"] == "check"}
        times = [r for r in rows if r["kind"] == "time"]
        ratios = []
        if not times:
            print(f"{label:<34} {'-':<6} {'-':>6} {'-':>9} {'-':>9} {'-':>6}  {note or 'no timings'}")
        for r in times:
            chk = checks.get(r["causal"])
            c = "PASS" if chk and chk["ok"] else "FAIL" if chk else "?"
            o, s = r.get("ours_tflops"), r.get("sdpa_tflops")
            ratio = o / s if o and s else None
            if ratio:
                ratios.append(ratio)
            print(f"{label:<34} {str(r['causal']):<6} {r['N']:>6} {o or float('nan'):9.1f} "
                  f"{s or float('nan'):9.1f} {ratio or float('nan'):6.2f}  {c}")
        if ratios:
            gm = 1.0
            for x in ratios:
                gm *= x
            print(f"{'':<34} {'geomean ratio':>23} {gm ** (1 / len(ratios)):17.2f}"
                  + (f"  ({note})" if note else ""))
    return


if __name__ == "__main__":
    main()
