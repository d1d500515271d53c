"""benchmarks/e2e_step.py for the tests: its GPT variants (naive and hand-rewritten SDPA attention) and training
step. It imports its sibling gpt_train_step, so benchmarks/ goes on sys.path (last: nothing there shadows)."""
import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCH not in sys.path:
    sys.path.append(BENCH)

import e2e_step  # noqa: E402

__all__ = ["e2e_step"]
