"""benchmarks/e2e_step.py on the CPU (fp32, tiny GPT; aot_eager stands in for Inductor): every variant's model
computes the naive model's loss, gradients and AdamW step, so the hand-rewritten SDPA model is the naive one;
the script runs end to end, writes its table and JSON, and merges a later run's rows.
The CUDA-graph variants need a GPU (tests/test_gpu_cudagraphs.py covers that loop)."""
import json

import pytest
import torch
from torch._dynamo.utils import counters

from benchmark_scripts import e2e_step
TINY = dict(vocab=64, d_model=32, heads=2, dtype=torch.float32)
TINY_FLAGS = ["--device", "cpu", "--compiler", "aot_eager", "--d-model", "32", "--heads", "2", "--vocab", "64",
              "--dtype", "float32", "--quick"]


def test_every_variant_trains_as_the_naive_model():
    T, batch_size, layers = 16, 2, 2
    models = e2e_step.build_models(T=T, layers=layers, **TINY)
    assert not any(name.endswith("attn.bias") for name, _ in models["sdpa"].named_buffers())
    batch = e2e_step.make_batch(TINY["vocab"], T, batch_size, torch.device("cpu"))
    results = {}
    for name, variant in e2e_step.VARIANTS.items():
        if variant.graphs:
            continue
        torch._dynamo.reset()
        counters.clear()
        model, step = e2e_step.train_step(variant, models[variant.attention], batch, torch.device("cpu"), "aot_eager")
        loss = step().item()
        results[name] = (loss, {n: p.grad.clone() for n, p in model.named_parameters()},
                         {n: p.detach().clone() for n, p in model.named_parameters()})
        if variant.backend == "cupyflash":
            assert counters["cupyflash"]["attention_fused"] == layers
    assert set(results) == {"eager-naive", "inductor-naive", "eager-sdpa", "inductor-sdpa", "cupyflash"}
    ref_loss, ref_grads, ref_params = results.pop("eager-naive")
    for name, (loss, grads, params) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        for key in ref_grads:
            torch.testing.assert_close(grads[key], ref_grads[key], atol=1e-5, rtol=1e-4, msg=f"{name}: grad {key}")
            torch.testing.assert_close(params[key], ref_params[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_graph_variants_refuse_a_compiler_other_than_inductor():
    with pytest.raises(ValueError, match="CUDA graphs need Inductor"):
        e2e_step.VARIANTS["cupyflash-graphs"].compile(torch.nn.Linear(2, 2), "aot_eager")


def test_script_writes_and_merges_its_table(tmp_path):
    out = tmp_path / "e2e_step.md"
    assert e2e_step.main([*TINY_FLAGS, "--out", str(out), "--shapes", "16x2x2", "--variants", "eager-naive",
                          "cupyflash"]) == 0
    assert e2e_step.main([*TINY_FLAGS, "--out", str(out), "--merge", "--shapes", "8x2x1", "--variants",
                          "eager-sdpa"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["T"], r["variant"]) for r in rows] == [(8, "eager-sdpa"), (16, "eager-naive"), (16, "cupyflash")]
    assert [r["fused"] for r in rows] == [None, None, 2]
    assert all(r["ms"] > 0 and len(r["step_ms"]) == 3 and not r["note"] for r in rows)
    text = out.read_text()
    assert "| 16, 2, 2 | eager-naive |" in text and "| 8, 2, 1 | eager-sdpa |" in text


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        e2e_step.parse_args(["--variants", "eager-naive", "flash"])
    assert "invalid choice: 'flash'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        e2e_step.parse_args(["--shapes", "512x8"])
    assert "TxBATCHxLAYERS" in capsys.readouterr().err


def test_interleaved_steps_give_each_variant_its_row(tmp_path, monkeypatch):
    """--interleave: every variant of a shape is built and warmed up first, then their timed steps alternate, the
    order rotating each round; each row still has its own loss, fused sites and steps, and the table says how they
    were taken."""
    order, real = [], e2e_step.train_step

    def recording(variant, *args, **kwargs):
        model, step = real(variant, *args, **kwargs)
        return model, lambda: order.append(variant.name[0]) or step()

    monkeypatch.setattr(e2e_step, "train_step", recording)
    out = tmp_path / "e2e_step.md"
    assert e2e_step.main([*TINY_FLAGS, "--out", str(out), "--shapes", "16x2x2", "--interleave", "--variants",
                          "eager-naive", "cupyflash", "inductor-naive"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager-naive", "cupyflash", "inductor-naive"]
    assert [r["fused"] for r in rows] == [None, 2, None]
    assert all(r["ms"] > 0 and len(r["step_ms"]) == 3 and not r["note"] for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5) == pytest.approx(rows[2]["loss"], rel=1e-5)
    assert "steps of the variants in turns" in out.read_text()
    assert "".join(order) == "eeccii" + "eci" + "cie" + "iec"  # --quick: 2 warm-up steps each, then 3 rounds


def test_interleaved_run_notes_a_variant_failing_mid_run(tmp_path, monkeypatch):
    """A variant whose step raises during the timed turns gets the error as its note and drops out; the others
    finish their steps."""
    real, calls = e2e_step.train_step, {"n": 0}

    def failing(variant, *args, **kwargs):
        model, step = real(variant, *args, **kwargs)
        if variant.name != "cupyflash":
            return model, step

        def step_that_fails():
            calls["n"] += 1
            if calls["n"] > 3:  # after its 2 warm-up steps and 1 timed one
                raise RuntimeError("lost the device")
            return step()
        return model, step_that_fails

    monkeypatch.setattr(e2e_step, "train_step", failing)
    out = tmp_path / "e2e_step.md"
    assert e2e_step.main([*TINY_FLAGS, "--out", str(out), "--shapes", "16x2x1", "--interleave", "--variants",
                          "eager-naive", "cupyflash"]) == 1
    naive, ours = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(naive["step_ms"]) == 3 and naive["ms"] > 0 and not naive["note"]
    assert ours["ms"] is None and len(ours["step_ms"]) == 1 and ours["note"] == "RuntimeError: lost the device"
