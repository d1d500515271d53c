"""benchmarks/host_profile.py on the CPU: its arguments parse, it says why it cannot run without a GPU, and its
profile analysis and summary work on a profiled CPU function (the GPU counts are then zero)."""
import pytest
import torch

from benchmark_scripts import host_profile


def test_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        host_profile.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--no-stack" in capsys.readouterr().out
    args = host_profile.parse_args(["--pieces", "op", "sdpa", "--features", "gqa", "--no-stack"])
    assert (args.pieces, args.features, args.passes, args.stack) == (["op", "sdpa"], ["gqa"], host_profile.PASSES,
                                                                     False)
    with pytest.raises(SystemExit):
        host_profile.parse_args(["--pieces", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_no_gpu_exits_with_the_reason(capsys):
    assert host_profile.main([]) == 2
    assert capsys.readouterr().err.startswith("host_profile.py needs a CUDA GPU: ")


def test_profile_analysis_and_summary(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    a = torch.randn(32, 32, requires_grad=True)
    per_call, table = host_profile.profile(lambda: torch.autograd.grad((a @ a).softmax(-1).sum(), a), 3, False,
                                           tmp_path / "t.trace.json")
    assert (tmp_path / "t.trace.json").stat().st_size > 0 and "aten::mm" in table
    assert per_call["launches"] == per_call["syncs"] == per_call["gpu_ops"] == 0
    assert "aten::mm" in dict(per_call["top_self_cpu_us"])
    meta = dict(gpu="cpu", torch=torch.__version__, cuda=None, seq=128, head_dim=64, dtype="bfloat16", calls=3, reps=3)
    text = host_profile.summary_markdown(meta, [
        {"piece": "op", "feature": "plain", "pass": "fwd+bwd", "host_us": 12.5, "profile": per_call},
        {"piece": "sdpa", "feature": "gqa", "pass": "fwd", "error": "RuntimeError: no kernel"}])
    assert "| op | plain | fwd+bwd | 12.5 | 0 | 0 |" in text and "| sdpa | gqa | fwd | – |" in text
