"""Where cpu_attention.route sends a call (torch's CPU flash kernels, as a cpu_torch_kernels.Plan, or the exact
chunked path), and that the two paths agree on every case sent to torch's kernels: out, lse (+inf rows
included), dq, dk, dv, and each backward given the other forward's (out, lse)."""
from __future__ import annotations

import pytest
import torch

from cupyflash import cpu_attention, cpu_torch_kernels
from cupyflash.cpu_torch_kernels import Plan
from reference import seed_from
from test_cpu_masked_rows import padded_causal_bias

B, HQ, D = 2, 4, 16


def _bias(kind: str, n_q: int, n_k: int, gen, dtype=torch.float64):
    """A bias of a kind, with rows whose keys are all masked where the kind has -inf/False."""
    if kind == "none":
        return None
    if kind == "bool":  # (B, 1, Nq, Nk): a quarter of the keys masked, row 1 without any key
        mask = torch.rand(B, 1, n_q, n_k, generator=gen) > 0.25
        mask[:, :, min(1, n_q - 1)] = False
        return mask
    if kind == "additive":  # (B, HQ, Nq, Nk) with -inf: row 0 without any key, rows 2 and -1 without their first
        bias = torch.randn(B, HQ, n_q, n_k, generator=gen, dtype=dtype)
        bias[:, :, 0] = float("-inf")
        bias[:, :, -1, : n_k // 2] = float("-inf")
        bias[:, :, min(2, n_q - 1), : 2 * n_k // 3] = float("-inf")  # decode: no key in the non-causal piece
        bias[:, 1, :, n_k // 3] = float("-inf")
        return bias
    if kind == "keys":  # (B, 1, 1, Nk) padding-style -inf on the first keys of batch 1
        bias = torch.randn(B, 1, 1, n_k, generator=gen, dtype=dtype)
        bias[1, :, :, : n_k // 2] = float("-inf")
        return bias
    if kind == "rows":  # (1, HQ, Nq, 1)
        return torch.randn(1, HQ, n_q, 1, generator=gen, dtype=dtype)
    if kind == "finfo.min":  # key 0 masked to MASKED_LOGIT: under causal, row 0 sees only it (uniform)
        bias = torch.randn(B, 1, n_q, n_k, generator=gen, dtype=dtype)
        bias[..., 0] = torch.finfo(dtype).min
        return bias
    if kind == "left-padding":  # transformers' causal mask with left padding: rows that see only finfo.min
        return padded_causal_bias((n_k - 3, n_k), n_k, dtype)[..., -n_q:, :]
    if kind == "long-left-padding":  # batch 0 has 6 real keys: its rows before those see only finfo.min
        return padded_causal_bias((6, n_k), n_k, dtype)[..., -n_q:, :]
    if kind == "all-finfo.min":  # every row sees only finfo.min keys: uniform attention everywhere
        return torch.full((1, 1, n_q, n_k), torch.finfo(dtype).min, dtype=dtype)
    if kind == "old-keys":  # (B, 1, 1, Nk) finfo.min on every key before the queries' own (decode)
        bias = torch.zeros(B, 1, 1, n_k, dtype=dtype)
        bias[..., : n_k - n_q] = torch.finfo(dtype).min
        return bias
    if kind == "right-padding":  # (B, 1, 1, Nk) finfo.min on batch 1's last keys
        bias = torch.zeros(B, 1, 1, n_k, dtype=dtype)
        bias[1, ..., n_k - 5:] = torch.finfo(dtype).min
        return bias
    raise ValueError(kind)


# (id, dict of the call, expected route: a Plan, or None for the chunked path)
CASES = [
    ("plain", dict(), Plan(0, ((0, 17, False),))),
    ("causal-square", dict(causal=True), Plan(0, ((0, 17, True),))),
    ("causal-decode", dict(causal=True, n_q=5, n_k=23), Plan(0, ((0, 18, False), (18, 23, True)))),
    ("causal-nq>nk", dict(causal=True, n_q=23, n_k=9), Plan(14, ((0, 9, True),))),
    ("right-window", dict(window=(-1, 3)), Plan(0, ((0, 3, False), (3, 17, True)))),
    ("right-window-nq>nk", dict(window=(-1, 2), n_q=23, n_k=9), Plan(12, ((0, 9, True),))),
    ("right-window-all", dict(window=(-1, 40)), Plan(0, ((0, 17, False),))),
    ("causal-right-window", dict(causal=True, window=(-1, 5)), Plan(0, ((0, 17, True),))),
    ("left-window-covers-all", dict(causal=True, window=(16, -1)), Plan(0, ((0, 17, True),))),
    ("gqa", dict(h_kv=2, causal=True), Plan(0, ((0, 17, True),))),
    ("bool", dict(bias="bool", causal=True), Plan(0, ((0, 17, True),))),
    ("additive", dict(bias="additive"), Plan(0, ((0, 17, False),))),
    ("additive-causal-decode", dict(bias="additive", causal=True, n_q=9, n_k=23),
     Plan(0, ((0, 14, False), (14, 23, True)))),
    ("keys-causal-nq>nk", dict(bias="keys", causal=True, n_q=23, n_k=9, h_kv=1), Plan(14, ((0, 9, True),))),
    ("rows-bias", dict(bias="rows", causal=True), Plan(0, ((0, 17, True),))),
    ("fp32", dict(dtype=torch.float32, causal=True, bias="keys"), Plan(0, ((0, 17, True),))),
    ("finfo.min-key", dict(bias="finfo.min"), Plan(0, ((0, 17, False),))),
    ("finfo.min-row-sees-only-it", dict(bias="finfo.min", causal=True), Plan(0, ((0, 17, True),))),
    ("bf16-finfo.min-row-sees-only-it", dict(bias="finfo.min", causal=True, bias_dtype=torch.bfloat16),
     Plan(0, ((0, 17, True),))),
    ("finfo.min-causal-nq>nk", dict(bias="finfo.min", causal=True, n_q=23, n_k=9), Plan(14, ((0, 9, True),))),
    ("left-padding", dict(bias="left-padding"), Plan(0, ((0, 17, False),))),
    ("left-padding-fp32-gqa", dict(bias="left-padding", dtype=torch.float32, h_kv=2), Plan(0, ((0, 17, False),))),
    ("left-padding-causal-decode", dict(bias="long-left-padding", causal=True, n_q=9, n_k=23),
     Plan(0, ((0, 14, False), (14, 23, True)))),
    ("right-padding-causal", dict(bias="right-padding", causal=True), Plan(0, ((0, 17, True),))),
    ("finfo.min-whole-first-piece", dict(bias="old-keys", causal=True, n_q=5, n_k=23),
     Plan(0, ((0, 18, False), (18, 23, True)))),
    ("right-padding-decode-fp32", dict(bias="right-padding", causal=True, n_q=3, n_k=23, dtype=torch.float32),
     Plan(0, ((0, 20, False), (20, 23, True)))),
    ("bf16", dict(dtype=torch.bfloat16, causal=True), Plan(0, ((0, 17, True),))),
    ("fp16", dict(dtype=torch.float16), Plan(0, ((0, 17, False),))),
    # to the chunked path
    ("left-window", dict(window=(4, -1)), None),
    ("sliding-window", dict(causal=True, window=(4, 0)), None),
    ("dropout", dict(dropout_p=0.1), None),
    ("softcap", dict(softcap=5.0), None),
    ("bias-grad", dict(bias="additive", bias_grad=True), None),
    ("all-finfo.min", dict(bias="all-finfo.min"), None),
    ("empty-keys", dict(n_k=0), None),
    ("empty-queries", dict(n_q=0), None),
    ("not-cpu", dict(device="meta"), None),
]
TORCH_CASES = [c for c in CASES if c[2] is not None]


def _call(case: dict):
    """(q, k, v, dout, bias, route kwargs) for a case."""
    n_q, n_k, h_kv = case.get("n_q", 17), case.get("n_k", 17), case.get("h_kv", HQ)
    dtype, device = case.get("dtype", torch.float64), case.get("device", "cpu")
    gen = torch.Generator().manual_seed(seed_from("dispatch", sorted(case.items(), key=str)))
    q, dout = (torch.randn(B, HQ, n_q, D, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, h_kv, n_k, D, generator=gen).to(dtype) for _ in range(2))
    bias = _bias(case.get("bias", "none"), n_q, n_k, gen, case.get("bias_dtype", dtype))
    if bias is not None and bias.dtype != torch.bool and dtype in (torch.float16, torch.bfloat16):
        bias = bias.to(torch.float32)
    kwargs = dict(causal=case.get("causal", False), window=case.get("window", (-1, -1)),
                  dropout_p=case.get("dropout_p", 0.0), softcap=case.get("softcap", 0.0))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(dout), to(bias), kwargs


# rows masked only by finfo.min (uniform attention) that route leaves to the chunked path beside torch's kernels
HYBRID = {"finfo.min-row-sees-only-it", "bf16-finfo.min-row-sees-only-it", "finfo.min-causal-nq>nk", "left-padding",
          "left-padding-fp32-gqa", "left-padding-causal-decode"}


@pytest.mark.parametrize("name,case,expected", CASES, ids=[c[0] for c in CASES])
def test_route_table(name, case, expected):
    q, k, _, _, bias, kw = _call(case)
    plan = cpu_attention.route(q, k, bias, bias_grad=case.get("bias_grad", False), **kw)
    assert plan == expected
    assert (plan is not None and plan.chunked_rows is not None) == (name in HYBRID)


def test_route_backward_of_rebuilt_rows_is_chunked():
    """A backward whose lse has rows under the rebuild rule goes to the chunked path, whatever the forward did."""
    q, k, _, _, bias, kw = _call(dict(causal=True))
    lse = torch.zeros(q.shape[:-1])
    assert cpu_attention.route(q, k, bias, lse=lse, **kw) is not None
    lse[1, 2, 3] = cpu_attention.MASKED_LOGIT + 2.0
    assert cpu_attention.route(q, k, bias, lse=lse, **kw) is None


def test_forward_falls_back_when_torch_lse_is_under_the_rebuild_rule(monkeypatch):
    """Rows whose real logits are all below MASKED_LOGIT: ours gives the finfo.min key the weight (its logit,
    MASKED_LOGIT, is the row's largest), torch's kernel none. The forward sees the lse under the rebuild rule and
    recomputes on the chunked path."""
    n = 9
    q = torch.full((1, 1, n, 1), -3000.0, dtype=torch.float64)
    k, v = torch.ones(1, 1, n, 1, dtype=torch.float64), torch.arange(n, dtype=torch.float64).view(1, 1, n, 1)
    bias = torch.zeros(1, 1, 1, n, dtype=torch.float64)
    bias[..., 0] = torch.finfo(torch.float32).min
    assert cpu_attention.route(q, k, bias, False, (-1, -1), 0.0, 0.0) is not None
    out, lse = cpu_attention.forward(q, k, v, bias, 1.0, False)
    with monkeypatch.context() as m:
        _chunked(m)
        want = cpu_attention.forward(q, k, v, bias, 1.0, False)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert (out < 1e-6).all(), "key 0 (v = 0) takes all the weight"


def _chunked(monkeypatch):
    monkeypatch.setattr(cpu_attention, "route", lambda *args, **kwargs: None)


def _tolerance(dtype, magnitude=1.0):
    """Both paths compute in fp32 (fp64 for fp64) in another order; fp16/bf16 results then round to 2 ulps."""
    if dtype == torch.float64:
        return dict(atol=1e-11, rtol=1e-11)
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5)
    eps = torch.finfo(dtype).eps
    return dict(atol=2 * eps * magnitude, rtol=2 * eps)


@pytest.mark.parametrize("case,plan", [c[1:] for c in TORCH_CASES], ids=[c[0] for c in TORCH_CASES])
def test_torch_kernels_agree_with_chunked_path(case, plan, monkeypatch):
    """out, lse, dq, dk, dv of the torch-kernel path equal the chunked path's (computed in the same dtype), and
    each backward takes the other forward's (out, lse)."""
    q, k, v, dout, bias, kw = _call(case)
    scale, causal, window = 0.3, kw["causal"], kw["window"]
    used = []
    monkeypatch.setattr(cpu_torch_kernels, "forward",
                        lambda *a, _f=cpu_torch_kernels.forward: used.append(a[-1]) or _f(*a))
    out_t, lse_t = cpu_attention.forward(q, k, v, bias, scale, causal, window)
    assert used == [plan], "the torch-kernel path must have run, with the routed plan"
    grads_t = cpu_attention.backward(dout, q, k, v, bias, out_t, lse_t, scale, causal, window)
    with monkeypatch.context() as m:
        _chunked(m)
        out_c, lse_c = cpu_attention.forward(q, k, v, bias, scale, causal, window)
        grads_c = cpu_attention.backward(dout, q, k, v, bias, out_c, lse_c, scale, causal, window)
        grads_ct = cpu_attention.backward(dout, q, k, v, bias, out_t, lse_t, scale, causal, window)
    grads_tc = cpu_attention.backward(dout, q, k, v, bias, out_c, lse_c, scale, causal, window)
    assert out_t.dtype == q.dtype and out_t.is_contiguous() and lse_t.dtype == torch.float32
    assert torch.equal(torch.isinf(lse_t), torch.isinf(lse_c)) and (lse_t[torch.isinf(lse_t)] > 0).all()
    torch.testing.assert_close(out_t, out_c, **_tolerance(q.dtype, out_c.abs().max()))
    torch.testing.assert_close(lse_t, lse_c, **_tolerance(torch.float32))
    for name, *grads in zip(("dq", "dk", "dv", "dbias"), grads_t, grads_c, grads_ct, grads_tc):
        if name == "dbias":
            assert all(g is None for g in grads)
            continue
        assert all(g.is_contiguous() and g.dtype == q.dtype for g in grads), name
        tol = _tolerance(q.dtype, grads[1].abs().max())
        for g in grads[1:]:
            torch.testing.assert_close(grads[0], g, **tol, msg=lambda msg: f"{name}: {msg}")
