"""benchmarks/e2e_profile.py's trace arithmetic (CPU): GPU busy time is the union of kernel intervals, per step;
the attention ops' host time counts their outer calls only."""
import json

from benchmark_scripts import e2e_profile


def test_kernel_stats_take_the_union_of_kernel_intervals(tmp_path):
    events = [{"cat": "kernel", "name": "a", "ts": 0, "dur": 10},
              {"cat": "kernel", "name": "b", "ts": 5, "dur": 10},   # overlaps a: busy 0-15
              {"cat": "kernel", "name": "a", "ts": 20, "dur": 4},   # busy 20-24
              {"cat": "kernel", "name": "c", "ts": 21, "dur": 1},   # inside the previous one
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
              {"cat": "cpu_op", "name": "cupyflash::flash_attn_bwd", "ts": 30, "dur": 50},
              {"cat": "cpu_op", "name": "cupyflash::flash_attn_bwd", "ts": 90, "dur": 70},
              {"cat": "cpu_op", "name": "aten::_scaled_dot_product_cudnn_attention", "ts": 0, "dur": 20},
              {"cat": "cpu_op", "name": "aten::_cudnn_attention_forward", "ts": 1, "dur": 15}]  # inside the last
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    stats = e2e_profile.kernel_stats(trace, steps=2)
    assert stats["busy_us"] == 19 / 2 and stats["kernels"] == 4 / 2
    assert stats["by_name"] == {"a": [1.0, 7.0], "b": [0.5, 5.0], "c": [0.5, 0.5]}
    assert stats["attention_host"] == {"cupyflash::flash_attn_bwd": [1.0, 60.0],
                                       "aten::_scaled_dot_product_cudnn_attention": [0.5, 20.0]}


def test_report_lists_the_attention_ops_host_time(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stub GPU")
    row = dict(variant="cupyflash", wall_ms=10.0, busy_us=8000.0, host_ms=9.0, kernels=474, by_name={"k": [1, 5.0]},
               attention_host={"cupyflash::flash_attn_bwd": [12.0, 60.0]})
    text = e2e_profile.report([row], (512, 8, 12), top=5)
    assert "| cupyflash | 10.00 | 8.00 | 0.80 | 9.00 | 474 |" in text
    assert "| cupyflash | `cupyflash::flash_attn_bwd` | 12 | 60.0 |" in text
