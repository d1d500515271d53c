"""The benchmark scripts the tests import: benchmarks/ is not a package, and e2e_step imports its sibling
gpt_train_step, so benchmarks/ goes on sys.path (last: nothing there shadows a module already importable)."""
import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCH not in sys.path:
    sys.path.append(BENCH)

import e2e_profile  # noqa: E402
import e2e_step  # noqa: E402
import host_overhead  # noqa: E402
import host_profile  # noqa: E402
import revisions_ab  # noqa: E402

__all__ = ["e2e_profile", "e2e_step", "host_overhead", "host_profile", "revisions_ab"]
