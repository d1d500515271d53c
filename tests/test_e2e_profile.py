"""benchmarks/e2e_profile.py's trace arithmetic (CPU): GPU busy time is the union of kernel intervals, per step."""
import json

from benchmark_scripts import e2e_profile


def test_kernel_stats_take_the_union_of_kernel_intervals(tmp_path):
    events = [{"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
              {"cat": "kernel", "name": "b", "ts": 5, "dur": 10},   # overlaps a: busy 0-15
              {"cat": "kernel", "name": "a", "ts": 20, "dur": 4},   # busy 20-24
              {"cat": "kernel", "name": "c", "ts": 21, "dur": 1},   # inside the previous one
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    stats = e2e_profile.kernel_stats(trace, steps=2)
    assert stats["busy_us"] == 19 / 2 and stats["kernels"] == 4 / 2
    assert stats["by_name"] == {"a": [1.0, 7.0], "b": [0.5, 5.0], "c": [0.5, 0.5]}
