"""``cupyflash bench`` on the CPU: its flags, FLOP counts, table, JSON, plot, how a failing implementation is
recorded, and the one-sentence refusal without a GPU. The measuring itself runs on the GPU only."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cupyflash import bench, bench_impls, cli, gpu_timing
from cupyflash.bench_shapes import attention_flops, bench_shape

ROOT = Path(__file__).resolve().parents[1]


def _parse(*flags: str):
    return cli._parser().parse_args(["bench", *flags])


# ---- arguments ----------------------------------------------------------------------------------------------

def test_defaults():
    args = _parse()
    assert args.head_dims == (64, 128)
    assert args.dtypes == ("bf16", "fp16")
    assert args.causal == (False, True)
    assert args.seqlens == (512, 1024, 2048, 4096, 8192, 16384)
    assert (args.tokens, args.hidden) == (16384, 2048)
    assert args.passes == ("fwd", "bwd", "fwd+bwd")
    assert args.peers == ("sdpa-flash", "sdpa-cudnn", "fa4")
    assert args.json is None and args.plot is None


def test_flags_are_parsed_into_values():
    args = _parse("--head-dims", "32, 96", "--dtypes", "fp16", "--causal", "yes", "--seqlens", "128,4096",
                  "--tokens", "8192", "--hidden", "1024", "--passes", "fwd+bwd", "--peers", "math,naive,cudnn",
                  "--json", "r.json", "--plot", "r.png")
    assert args.head_dims == (32, 96) and args.dtypes == ("fp16",) and args.causal == (True,)
    assert args.seqlens == (128, 4096) and (args.tokens, args.hidden) == (8192, 1024)
    assert args.passes == ("fwd+bwd",) and args.peers == ("sdpa-math", "naive", "sdpa-cudnn")
    assert args.json == Path("r.json") and args.plot == Path("r.png")


@pytest.mark.parametrize("flag,value,words", [
    ("--dtypes", "bf16,fp8", "fp8 not in bf16,fp16"),
    ("--causal", "maybe", "maybe not in yes,no"),
    ("--passes", "fwd,back", "back not in fwd,bwd,fwd+bwd"),
    ("--peers", "xformers", "xformers not in flash,cudnn,fa4,math,naive"),
    ("--seqlens", "1024,0", "must be at least 1, got 0"),
    ("--head-dims", "", "expected a comma-separated list"),
    ("--head-dims", "64,x", "expected a whole number, got 'x'"),
    ("--tokens", "16k", "expected a whole number, got '16k'"),
    ("--warmup-ms", "nan", "must be a positive number of milliseconds, got nan"),
    ("--rep-ms", "-5", "must be a positive number of milliseconds, got -5"),
    ("--rep-ms", "fast", "expected milliseconds, got 'fast'"),
])
def test_bad_flags_are_refused_with_the_reason(capsys, flag, value, words):
    with pytest.raises(SystemExit) as info:
        _parse(flag, value)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


# ---- FLOPs and shapes ---------------------------------------------------------------------------------------

def test_flop_count():
    full = 4 * 2 * 16 * 1024 * 1024 * 128  # 4·B·H·Nq·Nk·D
    assert attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="fwd") == full
    assert attention_flops(2, 16, 1024, 1024, 128, causal=True, mode="fwd") == full / 2
    assert attention_flops(2, 16, 1024, 1024, 128, causal=False, mode="bwd") == 2.5 * full
    assert attention_flops(2, 16, 1024, 1024, 128, causal=True, mode="fwd+bwd") == 3.5 * full / 2
    assert attention_flops(1, 1, 3, 5, 8, causal=False, mode="fwd") == 4 * 3 * 5 * 8  # Nq != Nk


def test_shape_keeps_tokens_and_hidden():
    assert bench_shape(512, 64) == (32, 32, 512, 64)  # (B, H, N, D)
    assert bench_shape(16384, 128) == (1, 16, 16384, 128)
    assert bench_shape(32768, 64, tokens=16384) == (1, 32, 32768, 64)  # batch at least 1
    assert bench_shape(1024, 96, tokens=4096, hidden=1024) == (4, 10, 1024, 96)


# ---- records, table, JSON, plot -----------------------------------------------------------------------------

def _record(impl, n, mode, tflops, peak_mib, *, causal=False, note=None):
    batch, heads, _, _ = bench_shape(n, 64)
    flops = attention_flops(batch, heads, n, n, 64, causal, mode)
    return dict(dtype="bf16", head_dim=64, causal=causal, n=n, batch=batch, heads=heads, impl=impl,
                **{"pass": mode}, flops=flops, ms=None if tflops is None else flops / tflops / 1e9,
                tflops=tflops, peak_mib=peak_mib, note=note, error=False)


def _results():
    math_note = "sdpa-math materialises N x N scores; benchmarked only up to N = 4096"
    records = []
    for n in (1024, 8192):
        for mode in ("fwd", "bwd"):
            records += [_record("cupyflash", n, mode, 200.0, 8.0 * n / 1024),
                        _record("sdpa-flash", n, mode, 250.0, 8.0 * n / 1024),
                        _record("sdpa-cudnn", n, mode, 400.0, 16.0 * n / 1024),
                        _record("sdpa-math", n, mode, *((None, None) if n > 4096 else (50.0, 2048.0)),
                                note=math_note if n > 4096 else None)]
    meta = dict(gpu="NVIDIA H100 80GB HBM3", sm="sm_90", torch="2.11.0+cu130", cuda="13.0", cupy="14.2.0",
                timer="CUDA events", date="2026-01-01 00:00 UTC", tokens=16384, hidden=2048, seconds=1.0)
    return dict(meta=meta, records=records), math_note


def test_table_has_numbers_ratios_and_footnotes():
    results, math_note = _results()
    lines = bench.format_table(results["records"]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["dtype", "D", "causal", "N", "B x H", "pass",
                      "cupyflash TFLOP/s", "cupyflash MiB", "SDPA flash TFLOP/s", "SDPA flash MiB",
                      "SDPA cuDNN TFLOP/s", "SDPA cuDNN MiB", "SDPA math TFLOP/s", "SDPA math MiB",
                      "ours / flash", "ours / cuDNN"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:6]]
    assert rows[0] == ["bf16", "64", "no", "1024", "16 x 32", "fwd", "200.0", "8", "250.0", "8", "400.0", "16",
                       "50.0", "2,048", "0.80", "0.50"]
    assert rows[3][:6] == ["bf16", "64", "no", "8192", "2 x 32", "bwd"]
    assert rows[3][12:14] == ["—[1]", "—"]
    assert lines[-1] == f"[1] {math_note}"  # one footnote however many cells it explains


def test_table_without_flash_or_cudnn_has_no_ratio_column():
    lines = bench.format_table([_record("cupyflash", 1024, "fwd", 200.0, 8.0)]).splitlines()
    assert lines[0] == "| dtype | D | causal | N | B x H | pass | cupyflash TFLOP/s | cupyflash MiB |"


def test_report_names_the_gpu_and_the_versions():
    results, _ = _results()
    report = bench.format_report(results)
    assert "GPU: **NVIDIA H100 80GB HBM3** (sm_90) · torch 2.11.0+cu130 (CUDA 13.0) · cupy 14.2.0" in report
    assert bench.format_table(results["records"]) in report


def test_json_round_trip(tmp_path):
    results, _ = _results()
    path = tmp_path / "sub" / "bench.json"
    bench.write_json(results, path)
    assert bench.read_json(path) == results


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (the `plot` extra)")
    results, _ = _results()
    results["records"] += [_record("cupyflash", 1024, "fwd", 150.0, 4.0, causal=True)]  # a second config
    path = tmp_path / "bench.png"
    bench.plot_results(results, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---- a failing implementation is a footnote, not the end of the sweep ----------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """pass_fn and peak memory without a GPU: 3 MiB per call; the timer says 2 ms."""
    monkeypatch.setattr(bench_impls, "pass_fn", lambda impl, mode, *inputs: (lambda: None))
    monkeypatch.setattr(gpu_timing, "peak_memory_bytes", lambda fn: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return lambda fn: 2.0


BASE = dict(dtype="bf16", head_dim=64, causal=True, n=1024, batch=16, heads=32)


def test_measured_record(fake_gpu, monkeypatch):
    monkeypatch.setattr(bench_impls, "unavailable_reason", lambda *a: None)
    (record,) = bench._measure_impl("cupyflash", BASE, ("bwd",), (None,) * 4, fake_gpu)
    flops = attention_flops(16, 32, 1024, 1024, 64, True, "bwd")
    assert record == dict(BASE, impl="cupyflash", **{"pass": "bwd"}, flops=flops, ms=2.0,
                          tflops=flops / 2e-3 / 1e12, peak_mib=3.0, note=None, error=False)


@pytest.mark.parametrize("raised,note,error", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB"), "sdpa-math: out of GPU memory",
     False),
    (ValueError("bad strides\nmore detail"), "sdpa-math: ValueError: bad strides", True),
])
def test_failures_become_notes(fake_gpu, monkeypatch, raised, note, error):
    def fail(*args):
        raise raised

    monkeypatch.setattr(bench_impls, "unavailable_reason", fail)
    records = bench._measure_impl("sdpa-math", BASE, ("fwd", "bwd"), (None,) * 4, fake_gpu)
    assert [(r["pass"], r["tflops"], r["peak_mib"], r["note"], r["error"]) for r in records] == [
        ("fwd", None, None, note, error), ("bwd", None, None, note, error)]
    monkeypatch.setattr(bench_impls, "unavailable_reason", lambda *a: None)
    monkeypatch.setattr(gpu_timing, "peak_memory_bytes", fail)  # fails while timing, not while warming up
    (record,) = bench._measure_impl("sdpa-math", BASE, ("fwd",), (None,) * 4, fake_gpu)
    assert (record["tflops"], record["note"], record["error"]) == (None, note, error)


def test_sweep_covers_every_config_impl_and_pass(fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr(bench_impls, "unavailable_reason", lambda *a: None)
    monkeypatch.setattr(bench_impls, "make_inputs", lambda shape, dtype: (shape, dtype))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    args = _parse("--head-dims", "64", "--causal", "no,yes", "--seqlens", "512,32768", "--passes", "fwd,bwd",
                  "--peers", "cudnn,flash,cudnn")
    records = bench.measure(args, fake_gpu, bench.importable_peers(args.peers)[0])
    keys = [(r["dtype"], r["causal"], r["n"], r["batch"], r["impl"], r["pass"]) for r in records]
    assert len(keys) == 2 * 2 * 2 * 3 * 2 and len(set(keys)) == len(keys)  # dtypes x masks x N x impls x passes
    assert keys[:3] == [("bf16", False, 512, 32, "cupyflash", "fwd"), ("bf16", False, 512, 32, "cupyflash", "bwd"),
                        ("bf16", False, 512, 32, "sdpa-cudnn", "fwd")]
    assert {r["batch"] for r in records if r["n"] == 32768} == {1}
    assert "cupyflash bench: 24/24 in" in capsys.readouterr().err


# ---- FlashAttention-4: a peer where importable, never a dependency -----------------------------------------

@pytest.fixture
def no_fa4(monkeypatch):
    # `None` in sys.modules makes `import flash_attn.cute` raise ImportError, as where FA4 is not installed.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    bench_impls.not_importable.cache_clear()
    yield
    bench_impls.not_importable.cache_clear()


@pytest.fixture
def fake_fa4(monkeypatch):
    """A stand-in ``flash_attn.cute``: FA4's signature and (B, N, H, D) layout around torch's SDPA; its calls."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(dict(shapes=[tuple(t.shape) for t in (q, k, v)], softmax_scale=softmax_scale, causal=causal))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2), torch.zeros(q.shape[:3], dtype=torch.float32)  # (B, N, H, D), (B, H, N)

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    package = types.ModuleType("flash_attn")
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    bench_impls.not_importable.cache_clear()
    yield calls
    bench_impls.not_importable.cache_clear()


@pytest.mark.parametrize("causal", [False, True])
def test_fa4_gets_its_layout_and_matches_sdpa_forward_and_backward(fake_fa4, causal):
    batch, heads, n, d = 2, 3, 5, 8  # all different, so a wrong transpose changes the shapes FA4 sees
    q, k, v, dout = (torch.randn(batch, heads, n, d, dtype=torch.float64, requires_grad=i < 3) for i in range(4))
    assert bench_impls.unavailable_reason("fa4", q, k, v, dout, causal) is None
    fake_fa4.clear()
    out = bench_impls.IMPLS["fa4"].run(q, k, v, causal)
    (call,) = fake_fa4
    assert call == dict(shapes=[(batch, n, heads, d)] * 3, softmax_scale=pytest.approx(d ** -0.5), causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, N, D)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want)
    fwd_bwd = bench_impls.pass_fn("fa4", "fwd+bwd", q, k, v, dout, causal)()
    for got, want in zip(fwd_bwd, grads):
        torch.testing.assert_close(got, want)


def test_fa4_refusing_inputs_is_a_reason_and_other_errors_propagate(fake_fa4, monkeypatch):
    q, k, v, dout = (torch.randn(1, 2, 4, 8, requires_grad=i < 3) for i in range(4))

    def refuse(*args, **kwargs):  # how FA4 says no: an assert, e.g. on a head dim or GPU it does not support
        raise AssertionError("(head_dim, head_dim_v)=(8, 8) is not supported on SM90.")

    monkeypatch.setattr(sys.modules["flash_attn.cute"], "flash_attn_func", refuse)
    assert (bench_impls.unavailable_reason("fa4", q, k, v, dout, False)
            == "fa4 unavailable: (head_dim, head_dim_v)=(8, 8) is not supported on SM90.")

    def crash(*args, **kwargs):
        raise ValueError("a bug, not a limit")

    monkeypatch.setattr(sys.modules["flash_attn.cute"], "flash_attn_func", crash)
    with pytest.raises(ValueError, match="a bug, not a limit"):
        bench_impls.unavailable_reason("fa4", q, k, v, dout, False)


def test_fa4_not_importable_is_one_line_and_no_column(no_fa4):
    why = bench_impls.not_importable("fa4")
    assert re.fullmatch(r"FA4 skipped: flash_attn\.cute is not importable \(ModuleNotFoundError: [^\n]+\)", why)
    assert bench.importable_peers(("sdpa-flash", "fa4", "sdpa-flash")) == (("sdpa-flash",), [why])
    assert bench_impls.unavailable_reason("fa4", None, None, None, None, False) == why  # the suite's skip
    assert bench_impls.not_importable("sdpa-flash") is None


def _run_floor(monkeypatch, capsys, tmp_path, *flags):
    """benchmarks/floor.py --quick `flags` end to end on fake GPU parts: every pass of ours takes 2 ms, FA4's 1 ms and
    the others' 4 ms; (stdout, stderr, JSON)."""
    monkeypatch.setattr(bench, "_require_cuda", lambda: types.SimpleNamespace(name="NVIDIA H200", arch="sm_90"))
    monkeypatch.setattr(gpu_timing, "median_timer",
                        lambda *a: ("fake", lambda fn: {"cupyflash": 2.0, "fa4": 1.0}.get(fn(), 4.0)))
    monkeypatch.setattr(bench_impls, "make_inputs", lambda shape, dtype: (None,) * 4)
    monkeypatch.setattr(bench_impls, "unavailable_reason", lambda *a: None)
    monkeypatch.setattr(bench_impls, "pass_fn", lambda impl, *a: (lambda: impl))
    monkeypatch.setattr(gpu_timing, "peak_memory_bytes", lambda fn: 2**20)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    spec = importlib.util.spec_from_file_location("floor", ROOT / "benchmarks" / "floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    assert floor.main(["--quick", *flags, "--json", str(tmp_path / "floor.json")]) == 0
    out, err = capsys.readouterr()
    return out, err, bench.read_json(tmp_path / "floor.json")


def test_floor_has_fa4_columns_and_ratio_where_it_ran(fake_fa4, monkeypatch, capsys, tmp_path):
    out, err, results = _run_floor(monkeypatch, capsys, tmp_path)
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| dtype"))
    assert header.endswith("| FA4 TFLOP/s | FA4 MiB | ours / flash | ours / cuDNN | ours / FA4 |")
    rows = [line for line in lines if line.startswith("| bf16")]
    assert len(rows) == 2 * 2 * 3 * 2  # head dims x masks x N x passes
    assert all(row.endswith("| 2.00 | 2.00 | 0.50 |") for row in rows)
    assert "skipped" not in out + err
    by_peer = {}
    for r in results["ratios"]:
        by_peer.setdefault(r["peer"], set()).add(r["ours_over"])
    assert by_peer == {"sdpa-flash": {2.0}, "sdpa-cudnn": {2.0}, "fa4": {0.5}}
    assert len(results["ratios"]) == 3 * len(rows)
    assert results["meta"]["skipped"] == []


def test_floor_without_fa4_says_so_once(no_fa4, monkeypatch, capsys, tmp_path):
    out, err, results = _run_floor(monkeypatch, capsys, tmp_path, "--head-dims", "128")
    assert {r["head_dim"] for r in results["records"]} == {128}
    (why,) = results["meta"]["skipped"]
    assert why.startswith("FA4 skipped: flash_attn.cute is not importable")
    assert [line for line in err.splitlines() if "FA4" in line] == [f"cupyflash bench: {why}"]
    assert f"{why}." in out.splitlines()  # the report says it once, under the header
    assert "FA4 TFLOP/s" not in out and "ours / FA4" not in out
    assert {r["peer"] for r in results["ratios"]} == {"sdpa-flash", "sdpa-cudnn"}


# ---- the command without a GPU ------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: bench would run the sweep")
def test_bench_without_a_gpu_says_so_in_one_sentence_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "cupyflash", "bench", "--seqlens", "512"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=os.environ)
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert re.fullmatch(r"cupyflash: bench needs a CUDA GPU and torch \S+ sees none; run it on a machine with an "
                        r"NVIDIA GPU \(sm_80 or newer\)\.", line), line
