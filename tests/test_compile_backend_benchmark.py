"""benchmarks/gpt_train_step.py runs end to end on the CPU with tiny flags (a smoke test; no timings)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpt_train_step.py"


def test_gpt_train_step_smoke():
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--layers", "2", "--d-model", "32", "--heads", "2",
           "--seq", "16", "--batch", "2", "--vocab", "64", "--dtype", "float32", "--steps", "2", "--warmup", "1",
           "--inner", "aot_eager"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"eager", "torch.compile", "cupyflash"}, res.stdout
    assert rows["cupyflash"][3] == "2", res.stdout  # both layers' attention fused
