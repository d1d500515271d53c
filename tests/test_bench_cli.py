"""``cupyflash bench`` on the CPU: its flags, FLOP counts, table, JSON, plot, how a failing implementation is
recorded, and the one-sentence refusal without a GPU. The measuring itself runs on the GPU only."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert args.peers == ("sdpa-flash", "sdpa-cudnn")
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
    ("--peers", "xformers", "xformers not in flash,cudnn,math,naive"),
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
    records = bench.measure(args, fake_gpu)
    keys = [(r["dtype"], r["causal"], r["n"], r["batch"], r["impl"], r["pass"]) for r in records]
    assert len(keys) == 2 * 2 * 2 * 3 * 2 and len(set(keys)) == len(keys)  # dtypes x masks x N x impls x passes
    assert keys[:3] == [("bf16", False, 512, 32, "cupyflash", "fwd"), ("bf16", False, 512, 32, "cupyflash", "bwd"),
                        ("bf16", False, 512, 32, "sdpa-cudnn", "fwd")]
    assert {r["batch"] for r in records if r["n"] == 32768} == {1}
    assert "cupyflash bench: 24/24 in" in capsys.readouterr().err


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
