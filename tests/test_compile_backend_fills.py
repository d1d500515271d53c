"""Masks written the common way (``masked_fill(~keep, -inf)``, ``masked_fill(mask == 0, -1e9)``, ``where``, an added
-inf mask) are fused as the op's boolean keep-mask with eager's numbers, rows that see no key included: NaN there
for -inf (and eager's NaN gradients), uniform over all keys for a finite fill (and no gradient to q, k)."""
import math

import pytest
import torch
from torch._dynamo.utils import counters

import compile_backend
from models.harness import assert_left_alone, skipped_reasons
from reference import assert_within_rule, rounding_floor

B, H, N, D = 2, 2, 6, 8
INF = float("-inf")


def _scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(D)


def fill_inf(q, k, v, keep):
    return _scores(q, k).masked_fill(~keep, INF).softmax(dim=-1) @ v


def where_inf(q, k, v, keep):
    return torch.where(keep, _scores(q, k), INF).softmax(dim=-1) @ v


def add_inf(q, k, v, keep):  # an additive mask holding -inf: gradients reach q and k through it
    return (_scores(q, k) + torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, INF)).softmax(dim=-1) @ v


def fill_1e9(q, k, v, keep):  # the Annotated Transformer
    return _scores(q, k).masked_fill(keep == 0, -1e9).softmax(dim=-1) @ v


def where_1e4(q, k, v, keep):
    return torch.where(keep, _scores(q, k), -1e4).softmax(dim=-1) @ v


def fill_finfo_min(q, k, v, keep):
    return _scores(q, k).masked_fill(~keep, torch.finfo(q.dtype).min).softmax(dim=-1) @ v


NAN, UNIFORM = "mask (NaN rows as eager)", "mask (uniform rows as eager)"
SPELLINGS = [(fill_inf, NAN), (where_inf, NAN), (add_inf, NAN), (fill_1e9, UNIFORM), (where_1e4, UNIFORM),
             (fill_finfo_min, UNIFORM)]


def _keep(unseen_rows: bool) -> torch.Tensor:
    """A random (B, 1, N, N) keep-mask; every row keeps a key, or rows 1 and 4 of batch 0 and row 2 of batch 1 none."""
    keep = torch.rand(B, 1, N, N) > 0.5
    keep[..., 0] |= ~keep.any(-1)
    if unseen_rows:
        keep[0, :, 1] = keep[0, :, 4] = keep[1, :, 2] = False
    return keep


def _run(fn, args, keep):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    return [fn(*leaves, keep), *leaves]


def _check(name, ours, eager, ref, dtype, factor):
    nan = eager.isnan()
    assert torch.equal(ours.isnan(), nan), f"{name}: NaN at {ours.isnan().nonzero().tolist()}, eager at " \
                                           f"{nan.nonzero().tolist()}"
    assert torch.equal(ref.isnan(), nan), f"{name}: eager's NaN pattern differs in fp64"
    ours, eager, ref = (t.masked_fill(nan, 0.0) for t in (ours, eager, ref))
    assert_within_rule(ours, ref, eager, factor, rounding_floor(ref, dtype), name)


def compare_with_eager(fn, keep, dtype):
    """Outputs and q/k/v gradients of the fused site against eager (same dtype) and an fp64 reference."""
    torch.manual_seed(1)
    qkv = [torch.randn(B, H, N, D, dtype=dtype) for _ in range(3)]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend="cupyflash", options={"inner": "aot_eager"})
    ours, eager, ref = _run(compiled, qkv, keep), _run(fn, qkv, keep), _run(fn, [t.double() for t in qkv], keep)
    assert counters["cupyflash"]["attention_fused"] == 1
    dout = torch.randn_like(ours[0])
    for run in (ours, eager, ref):
        run[0].backward(dout.to(run[0].dtype))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        get = (lambda r: r[0].detach()) if i == 0 else (lambda r, i=i: r[i].grad)
        _check(name, get(ours), get(eager), get(ref), dtype, 2 if i == 0 else 3)
    return eager[0]


@pytest.mark.parametrize("unseen_rows", [True, False], ids=["rows without key", "every row keeps a key"])
@pytest.mark.parametrize("fn,form", SPELLINGS, ids=[f.__name__ for f, _ in SPELLINGS])
def test_fill_fused_with_eager_numbers_fp32(fn, form, unseen_rows):
    torch.manual_seed(0)
    out = compare_with_eager(fn, _keep(unseen_rows), torch.float32)
    assert out.isnan().any().item() is (unseen_rows and form == NAN)


@pytest.mark.parametrize("fn", [fill_inf, add_inf, fill_1e9], ids=lambda f: f.__name__)
def test_fill_fused_with_eager_numbers_bf16(fn):
    torch.manual_seed(0)
    compare_with_eager(fn, _keep(True), torch.bfloat16)


@pytest.mark.parametrize("fn,form", SPELLINGS, ids=[f.__name__ for f, _ in SPELLINGS])
def test_fill_form_reported(fn, form):
    torch._dynamo.reset()
    torch.manual_seed(0)
    report = compile_backend.explain(fn, *(torch.randn(B, H, N, D) for _ in range(3)), _keep(True))
    (site,) = report.fused
    assert site.mask_form == form and site.has_bias


def test_proven_causal_inf_mask_stays_flags():
    """A -inf causal mask with Nq <= Nk leaves no row without a key: causal flag, no keep-mask, no row selection."""
    def causal_inf(q, k, v):
        keep = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(k.size(-2) - q.size(-2))
        return _scores(q, k).masked_fill(~keep, INF).softmax(dim=-1) @ v

    torch._dynamo.reset()
    report = compile_backend.explain(causal_inf, *(torch.randn(B, H, n, D) for n in (4, 6, 6)))
    (site,) = report.fused
    assert (site.mask_form, site.has_bias, site.causal) == ("causal", False, True)


def causal_padded_1e9(q, k, v, pad):
    keep = torch.ones(N, N, dtype=torch.bool).tril() & pad[:, None, None, :]  # (B, 1, N, N)
    return _scores(q, k).masked_fill(~keep, -1e9).softmax(dim=-1) @ v


def test_proven_causal_padding_fill_keeps_flags_with_uniform_rows():
    """Causal + key padding filled with -1e9: flags and the key mask; left-padded rows see no key and are eager's
    uniform rows, with no gradient to q and k (the fill replaced their scores)."""
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[0, :2] = pad[1, :4] = False
    compare_with_eager(causal_padded_1e9, pad, torch.float32)
    torch._dynamo.reset()
    (site,) = compile_backend.explain(causal_padded_1e9, *(torch.randn(B, H, N, D) for _ in range(3)), pad).fused
    assert site.mask_form == "causal + key padding"


def fill_positive(q, k, v, keep):
    return _scores(q, k).masked_fill(~keep, 5.0).softmax(dim=-1) @ v


def fill_above_threshold(q, k, v, keep):  # exp(-100 - max) is not 0 in fp32 when scores are near -100
    return _scores(q, k).masked_fill(~keep, -100.0).softmax(dim=-1) @ v


def fill_nan(q, k, v, keep):
    return _scores(q, k).masked_fill(~keep, float("nan")).softmax(dim=-1) @ v


def inf_beside_bias(q, k, v, keep):
    return (_scores(q, k) + torch.ones(N, N).triu()).masked_fill(~keep, INF).softmax(dim=-1) @ v


def finfo_min_beside_bias(q, k, v, keep):  # eager's fill takes the gradient of rows without a key away
    return (_scores(q, k) + torch.ones(N, N).triu()).masked_fill(~keep, torch.finfo(q.dtype).min).softmax(-1) @ v


LEFT_ALONE = [(fill_positive, "not a constant negative number"), (fill_above_threshold, "exactly 0 in fp32 only for fills at or below -10000"),
              (inf_beside_bias, "beside another bias or mask"),
              (finfo_min_beside_bias, "beside another bias or mask")]


@pytest.mark.parametrize("fn,reason", LEFT_ALONE, ids=[f.__name__ for f, _ in LEFT_ALONE])
def test_fill_lookalikes_left_alone(fn, reason):
    torch.manual_seed(0)
    assert_left_alone(fn, *(torch.randn(B, H, N, D) for _ in range(3)), _keep(False), reason=reason)


def test_nan_fill_left_alone():  # eager's output is NaN wherever a key is masked: the harness cannot compare it
    torch.manual_seed(0)
    reasons = skipped_reasons(fill_nan, *(torch.randn(B, H, N, D) for _ in range(3)), _keep(False))
    assert reasons == ["a mask fill value that is not a constant negative number"]


def added_bias(q, k, v, bias):
    return (_scores(q, k) + bias).softmax(dim=-1) @ v


@pytest.mark.parametrize("learned", [False, True], ids=["input bias", "learned bias"])
def test_opaque_bias_with_inf_rows_gives_eager_nan(learned):
    """A float bias from outside the graph holding -inf at every key of some rows: eager's NaN there (dq of those
    rows, dk, dv and the bias's gradient NaN), the op's lse +inf; the rows are selected as for a -inf mask."""
    torch.manual_seed(2)
    qkv = [torch.randn(B, H, N, D) for _ in range(3)]
    bias = torch.randn(1, H, N, N).masked_fill(~_keep(True)[:1], INF)  # rows 1 and 4 all -inf
    ours, eager = ([t.clone().requires_grad_() for t in (*qkv, bias)] for _ in range(2))
    for run in (ours, eager):
        run[3].requires_grad_(learned)
    torch._dynamo.reset()
    counters.clear()
    out_c = torch.compile(added_bias, backend="cupyflash", options={"inner": "aot_eager"})(*ours)
    out_e = added_bias(*eager)
    assert counters["cupyflash"]["attention_fused"] == 1
    dout = torch.randn_like(out_e)
    out_c.backward(dout)
    out_e.backward(dout)
    pairs = [("out", out_c.detach(), out_e.detach())] + [
        (name, c.grad, e.grad) for name, c, e in zip(("dq", "dk", "dv", "dbias"), ours, eager) if e.requires_grad]
    assert len(pairs) == (5 if learned else 4) and out_e.isnan().any()
    for name, c, e in pairs:
        assert torch.equal(c.isnan(), e.isnan()), name
        torch.testing.assert_close(c.nan_to_num(), e.nan_to_num(), atol=2e-5, rtol=2e-5)
