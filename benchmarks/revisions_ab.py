"""Revisions of cupyflash timed in turns on one GPU: each revision's package and kernels exported to a directory of
its own, each case run by every revision in its own process, round after round, so that clock and thermal drift fall
on all of them alike; then the median ms per case and each revision's ratio to the first.

    # where git is (the GPU machine gets a copy of the work tree without .git): trees into an ignored directory
    python benchmarks/revisions_ab.py export .ab main my-branch tall=abc1234
    # on the GPU machine (the device call carries .ab)
    python benchmarks/revisions_ab.py run .ab --cases mods --rounds 2 --out benchmarks/results/x-ab-GPU.md

A revision's process imports its own tree (its directory first on sys.path, as `cd base && python ...` did by hand)
and times the cases with this script's list and its own `cupyflash.gpu_timing.median_timer`, through
`cupyflash.flash_attention` only. `--tests` runs pytest selections in every tree after the first round (each
stopped after `--tests-s`); the table is written after every round, so a call stopped at its limit brings back the
rounds it ran.
"""
from __future__ import annotations

import argparse
import io
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

EXPORTED = ("cupyflash", "kernels_cu", "pyproject.toml", "tests")

# Case sets: (label, dtype, head dim, N, keyword arguments of flash_attention, passes). B·N = 16k tokens and
# H·D = 2048, as `cupyflash bench`. Masks are built in the worker: "causal_bias" is a (1, 1, N, N) additive mask of
# the causal pattern in the call's dtype, "causal_mask" the same as a boolean tensor; "padding_bias" a (B, 1, 1, N)
# additive mask hiding the last quarter of the keys from every other batch row, "padding_mask" the same as booleans.
_MODS = ("causal_bias", "causal_mask", "padding_bias", "padding_mask")
CASES = {
    "plain": [(f"d{d} N{n} {name}", "bf16", d, n, kw, "fwd,bwd")
              for d in (64, 128) for n in (2048, 8192)
              for name, kw in (("plain", {}), ("causal", {"causal": True}))],
    "mods": [(f"{dt} d{d} N{n} {name}", dt, d, n, kw, passes)
             for dt, d, n in (("bf16", 128, 8192), ("bf16", 64, 8192), ("fp16", 128, 8192), ("bf16", 64, 2048))
             for name, kw, passes in (
                 ("plain", {}, "fwd,bwd"), ("causal flag", {"causal": True}, "fwd,bwd"),
                 ("dense causal", {"attn_bias": "causal_bias"}, "fwd,bwd"),
                 ("dense causal bool", {"attn_bias": "causal_mask"}, "fwd,bwd"),
                 ("padding bias", {"attn_bias": "padding_bias"}, "fwd,bwd"),
                 ("padding bool", {"attn_bias": "padding_mask"}, "fwd,bwd"),
                 ("softcap30", {"softcap": 30.0}, "fwd"),
                 ("softcap30 causal", {"softcap": 30.0, "causal": True}, "fwd"),
                 ("dropout0.1", {"dropout_p": 0.1}, "fwd,bwd"),
                 ("dropout0.1 causal", {"dropout_p": 0.1, "causal": True}, "fwd"))],
}


def export(directory: Path, revisions: list[str]) -> list[tuple[str, str]]:
    """Each `NAME=REV` (or `REV`, named after it) into directory/NAME, from `git archive`; returns (name, commit)."""
    done = []
    for spec in revisions:
        name, _, rev = spec.rpartition("=")
        name = name or rev.replace("/", "-")
        commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                                capture_output=True, text=True).stdout.strip()
        tree = directory / name
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, *EXPORTED], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            try:
                tar.extractall(tree, filter="data")
            except TypeError:  # Python before 3.11.4: no filters (git archive's members are plain files anyway)
                tar.extractall(tree)
        (tree / "REVISION").write_text(f"{rev} {commit}\n")
        done.append((name, commit))
    return done


def trees(directory: Path, names: str | None) -> list[str]:
    """The exported trees to run, in the order given (else as exported: by REVISION's time, oldest first)."""
    if names:
        return names.split(",")
    found = [p.parent for p in directory.glob("*/REVISION")]
    return [p.name for p in sorted(found, key=lambda p: (p / "REVISION").stat().st_mtime)]


PREWARM = Path(__file__).resolve().parents[1] / "scripts" / "prewarm.py"


def _tree_env(directory: Path, name: str) -> dict:
    """The environment of a process that imports tree `name`'s cupyflash (its directory first on the path, before an
    installed cupyflash)."""
    tree = (directory / name).resolve()
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(tree), os.environ.get("PYTHONPATH")))))


def _worker(directory: Path, name: str, *args: str, script: Path = Path(__file__)) -> subprocess.Popen:
    """`script` (this one's worker by default) with `args`, in tree `name`'s process."""
    return subprocess.Popen([sys.executable, str(script.resolve()), *args], cwd=(directory / name).resolve(),
                            env=_tree_env(directory, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _in_tree(directory: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """_worker's process, waited for."""
    proc = _worker(directory, name, *args)
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def parse_times(stdout: str) -> dict[str, float]:
    """The worker's `TIME<TAB>case / pass<TAB>ms` lines."""
    times = {}
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == "TIME":
            times[parts[1]] = float(parts[2])
    return times


def table(names: list[str], runs: dict[str, list[dict[str, float]]]) -> str:
    """Markdown: per case, each tree's median ms over the rounds, and after the first tree its ratio to the first."""
    cases = list(dict.fromkeys(c for name in names for r in runs[name] for c in r))
    head = "| case | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = []
    for case in cases:
        medians = []
        for name in names:
            values = [r[case] for r in runs[name] if case in r]
            medians.append(statistics.median(values) if values else None)
        cells = []
        for i, m in enumerate(medians):
            if m is None:
                cells.append("–")
            elif i == 0 or medians[0] is None:
                cells.append(f"{m:.3f}")
            else:
                cells.append(f"{m:.3f} ({m / medians[0]:.3f}x)")
        rows.append(f"| {case} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def tests_for(name: str, tests: list[str]) -> list[str]:
    """The pytest selections for tree `name`: each `NAME=SELECTION` of it, and each SELECTION without a name."""
    chosen = []
    for spec in tests:
        head, eq, rest = spec.partition("=")
        if eq and " " not in head and not head.startswith("-"):
            if head == name:
                chosen.append(rest)
        else:
            chosen.append(spec)
    return chosen


def _fa4_attention():
    """FlashAttention-4's function behind flash_attention's signature for the cases it has (causal, soft-cap): q, k, v
    (B, H, N, D) views of its (B, N, H, D) memory (the worker makes them so)."""
    from flash_attn.cute import flash_attn_func

    def attention(q, k, v, causal=False, softcap=None):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return flash_attn_func(q, k, v, causal=causal, softcap=softcap or 0.0)[0].transpose(1, 2)

    return attention


def chosen_cases(case_set: str, match: str | None) -> list[tuple]:
    """The cases of `case_set` whose labels hold one of the comma-separated `match` strings (all without)."""
    parts = [m for m in (match or "").split(",") if m]
    return [c for c in CASES[case_set] if not parts or any(m in c[0] for m in parts)]


def _worker_cases(case_set: str, match: str | None = None, fa4: bool = False) -> int:
    """In a tree's process: time `case_set`, one TIME line per case and pass; with `fa4`, FlashAttention-4 instead
    of cupyflash, on the cases without a bias or dropout."""
    import torch

    import cupyflash
    from cupyflash.bench_shapes import bench_shape
    from cupyflash.gpu_timing import median_timer

    _, bench = median_timer(25, 150)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    attention = _fa4_attention() if fa4 else cupyflash.flash_attention
    print(f"DEVICE\t{torch.cuda.get_device_name()}\t{'fa4' if fa4 else cupyflash.__file__}", flush=True)
    made = {}
    for label, dt, d, n, kw, passes in chosen_cases(case_set, match):
        if fa4 and not set(kw) <= {"causal", "softcap"}:
            continue
        dtype = dtypes[dt]
        if made.get("key") != (dt, d, n):
            made.clear()
            torch.cuda.empty_cache()
            b, h, _, _ = bench_shape(n, d)
            # (B, H, N, D); FA4's (B, N, H, D) memory seen as (B, H, N, D)
            qkv = [(torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2) if fa4 else
                    torch.randn(b, h, n, d, device="cuda", dtype=dtype)).requires_grad_() for _ in range(3)]
            causal = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
            keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
            keep[::2, ..., 3 * n // 4:] = False
            made.update(key=(dt, d, n), qkv=qkv, causal_mask=causal, padding_mask=keep,
                        causal_bias=torch.zeros(1, 1, n, n, dtype=dtype, device="cuda").masked_fill(~causal,
                                                                                                   -torch.inf),
                        padding_bias=torch.zeros(b, 1, 1, n, dtype=dtype, device="cuda").masked_fill(~keep,
                                                                                                    -torch.inf))
        kwargs = {k: made[v] if isinstance(v, str) and v in _MODS else v for k, v in kw.items()}
        q, k, v = made["qkv"]
        if "fwd" in passes.split(","):
            with torch.no_grad():
                ms = bench(lambda: attention(q, k, v, **kwargs))
            print(f"TIME\t{label} / fwd\t{ms:.4f}", flush=True)
        if "bwd" in passes.split(","):
            out = attention(q, k, v, **kwargs)
            dout = torch.randn_like(out)
            ms = bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
            print(f"TIME\t{label} / bwd\t{ms:.4f}", flush=True)
            del out, dout
    return 0


def imported_from(directory: Path, name: str) -> Path:
    """Where a process of tree `name` imports cupyflash from (the A/B times nothing if every tree's process imports
    one installed copy)."""
    done = _in_tree(directory, name, "_where")
    if done.returncode:
        raise RuntimeError(f"{name}: cupyflash does not import: {done.stderr[-2000:]}")
    return Path(done.stdout.strip())


def run(directory: Path, names: list[str], case_set: str, rounds: int, warm: list[str], tests: list[str],
        out: Path | None, budget_s: float, fa4: bool = False, match: str = "", tests_s: float = 240.0) -> int:
    """Every tree of `names` (and with `fa4` FlashAttention-4, timed from the first tree's process) on the cases, in
    turns; prints and writes the table."""
    start = time.monotonic()
    for name in names:
        where = imported_from(directory, name)
        if (directory / name).resolve() not in where.parents:
            raise RuntimeError(f"{name}: its process imports cupyflash from {where}, not from its tree")
    for proc in [_worker(directory, name, *warm, script=PREWARM) for name in names]:  # the trees' compiles at once
        stdout, stderr = proc.communicate()
        print(stdout.strip() if proc.returncode == 0 else f"warm failed: {stderr[-2000:]}", flush=True)
    columns = [*names, "fa4"] if fa4 else list(names)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in columns}
    device = ""
    revisions = {name: (directory / name / "REVISION").read_text().split() for name in names}

    def report() -> str:
        return (f"# {case_set} cases{f' matching {match!r}' if match else ''}, {device}, in turns "
                f"({len(runs[columns[0]])} of {rounds} rounds), median ms\n\n"
                + "".join(f"- {name}: {rev} {commit[:12]}\n" for name, (rev, commit) in revisions.items())
                + ("- fa4: FlashAttention-4 (cases without a bias or dropout)\n" if fa4 else "")
                + "\n" + table(columns, runs))

    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    for r in range(rounds):
        if r and time.monotonic() - start > budget_s:
            print(f"round {r + 1} skipped: past the {budget_s:.0f} s budget", flush=True)
            break
        for name in columns:
            done = (_in_tree(directory, names[0], "_cases", case_set, match, "fa4") if name == "fa4" else
                    _in_tree(directory, name, "_cases", case_set, match))
            if done.returncode:
                print(f"{name}: worker failed ({done.returncode}):\n{done.stderr[-3000:]}", flush=True)
            runs[name].append(parse_times(done.stdout))
            device = device or next((line.split("\t")[1] for line in done.stdout.splitlines()
                                     if line.startswith("DEVICE\t")), "")
        print(f"round {r + 1} done at {time.monotonic() - start:.0f} s", flush=True)
        if out is not None:  # after every round: a call stopped at its time limit still brings back the rounds it ran
            out.write_text(report())
        if r == 0:
            _run_tests(directory, names, tests, tests_s)
    print(report(), flush=True)
    return 0


def _run_tests(directory: Path, names: list[str], tests: list[str], tests_s: float) -> None:
    """Each tree's pytest selections (tests_for) in its own process, each stopped after `tests_s`; prints the
    outcome, and the output where a selection failed or was stopped."""
    for name in names:
        for selection in tests_for(name, tests):
            try:
                done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
                                       *shlex.split(selection)], cwd=(directory / name).resolve(),
                                      env=_tree_env(directory, name), capture_output=True, text=True, timeout=tests_s)
            except subprocess.TimeoutExpired as stopped:  # its output is bytes whatever text= says
                print(f"tests {name} [{selection}]: stopped after {tests_s:.0f} s\n"
                      f"{(stopped.stdout or b'').decode(errors='replace')[-4000:]}", flush=True)
                continue
            print(f"tests {name} [{selection}]: {done.stdout.strip().splitlines()[-1:]}", flush=True)
            if done.returncode:
                print(done.stdout[-4000:], flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_cases"]:  # _cases SET MATCH [fa4]
        return _worker_cases(argv[1], argv[2], fa4=argv[3:] == ["fa4"])
    if argv[:1] == ["_where"]:
        import cupyflash

        print(Path(cupyflash.__file__).resolve())
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="trees of git revisions (NAME=REV or REV) into DIR")
    ex.add_argument("directory", type=Path)
    ex.add_argument("revisions", nargs="+")
    rn = sub.add_parser("run", help="time the exported trees in turns (on a GPU)")
    rn.add_argument("directory", type=Path)
    rn.add_argument("--names", help="comma-separated trees, the first the baseline (default: all, as exported)")
    rn.add_argument("--cases", choices=tuple(CASES), default="plain")
    rn.add_argument("--match", default="", help="only the cases whose labels hold one of these comma-separated "
                                                "strings")
    rn.add_argument("--rounds", type=int, default=2)
    rn.add_argument("--warm", default="sm90 bfloat16",
                    help="scripts/prewarm.py's module-key filters, compiled first (default: 'sm90 bfloat16')")
    rn.add_argument("--tests", action="append", default=[],
                    help="a pytest selection run after the first round in every tree, or as NAME=SELECTION in that "
                         "one (repeatable)")
    rn.add_argument("--tests-s", type=float, default=240.0, help="seconds each pytest selection may run")
    rn.add_argument("--fa4", action="store_true", help="FlashAttention-4 as a column too (importable: "
                                                        "../shared/fa4/README.md)")
    rn.add_argument("--out", type=Path)
    rn.add_argument("--budget-s", type=float, default=420.0, help="no round starts after this many seconds")
    args = parser.parse_args(argv)
    if args.command == "export":
        for name, commit in export(args.directory, args.revisions):
            print(f"{name}: {commit}")
        return 0
    from cupyflash.errors import gpu_missing

    if gpu_missing("revisions_ab.py run"):
        return 2
    return run(args.directory, trees(args.directory, args.names), args.cases, args.rounds, args.warm.split(),
               args.tests, args.out, args.budget_s, args.fa4, args.match, args.tests_s)


if __name__ == "__main__":
    sys.exit(main())
