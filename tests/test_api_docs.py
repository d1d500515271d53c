"""docs/API.md against the code: the names it promises exist, the conventions it states hold (bottom-right windows,
the log-sum-exp, rows with every key masked, an lse without gradient), and its lists (ops' signatures, SiteRecord
fields, environment variables, CLI flags) are the code's own. On the CPU, in fp64."""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cupyflash
from compile_backend import SiteRecord
from cupyflash import cli, cpu_attention

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "API.md").read_text()


def _section(title: str) -> str:
    return DOC.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_dir_lists_the_lazy_names_without_importing_torch():
    code = ("import sys, cupyflash; names = dir(cupyflash); assert 'torch' not in sys.modules; "
            "print(' '.join(names))")
    listed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.split()
    lazy = ("flash_attention", "flash_attn_fwd", "flash_attn_bwd", "why_unsupported")
    assert set(lazy) <= set(listed)
    for name in lazy:
        assert callable(getattr(cupyflash, name))


def _explicit_mask(n_q: int, n_k: int, left: int, right: int) -> torch.Tensor:
    """The doc's rule: row i sees key j iff i + diag - left <= j <= i + diag + right, diag = Nk - Nq, -1 unbounded."""
    i = torch.arange(n_q).unsqueeze(1)
    j = torch.arange(n_k).unsqueeze(0)
    diag = n_k - n_q
    keep = torch.ones(n_q, n_k, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i + diag - left
    if right >= 0:
        keep &= j <= i + diag + right
    return keep


@pytest.mark.parametrize("n_q,n_k", [(6, 6), (3, 8), (8, 3)])
@pytest.mark.parametrize("window,causal", [((1, 0), False), ((2, 1), False), ((-1, 2), False), ((0, -1), False),
                                           ((-1, -1), True), ((2, 3), True)])
def test_window_and_causal_are_bottom_right_inclusive_and_lse_is_the_natural_logsumexp(n_q, n_k, window, causal):
    torch.manual_seed(0)
    q = torch.randn(2, 2, n_q, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, n_k, 8, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(1, 2, n_q, n_k, dtype=torch.float64)
    scale = 0.3
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, scale, causal, *window)
    left, right = window
    keep = _explicit_mask(n_q, n_k, left, 0 if causal else right)  # causal sets right = 0
    logits = (scale * q @ k.transpose(-1, -2) + bias).masked_fill(~keep, float("-inf"))
    sees = keep.any(dim=-1)  # (Nq,)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, n_q)
    torch.testing.assert_close(lse[..., sees], torch.logsumexp(logits, -1)[..., sees].float())
    torch.testing.assert_close(out[..., sees, :], (torch.softmax(logits, -1) @ v)[..., sees, :])
    # A row that sees no key: out 0, lse +inf.
    assert bool((out[..., ~sees, :] == 0).all()) and bool((lse[..., ~sees] == float("inf")).all())
    assert torch.equal(out, cupyflash.flash_attention(q, k, v, bias, scale=scale, causal=causal, window=window))


def test_lse_includes_the_softcap_and_is_float32_for_bfloat16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.bfloat16) for _ in range(3))
    _, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.25, False, softcap=2.0)
    logits = 2.0 * torch.tanh(0.25 * q.double() @ k.double().transpose(-1, -2) / 2.0)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["routed", "chunked"])
def test_rows_with_every_key_masked(path, monkeypatch):
    """Rows that see no key (causal with Nq > Nk, a mask with no True, -inf everywhere): out 0, lse +inf, zero
    gradients. Rows masked only by finite biases <= -1e30: uniform over those keys, lse = -4096 ln 2 + ln n."""
    if path == "chunked":
        monkeypatch.setattr(cpu_attention, "route", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    n_q, n_k = 6, 4  # causal: row i sees keys j <= i - 2, so rows 0 and 1 see none
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64, requires_grad=True) for n in (n_q, n_k, n_k))
    finfo_min = torch.finfo(torch.float32).min
    bias = torch.randn(1, 2, n_q, n_k, dtype=torch.float64)
    bias[..., 2, :] = float("-inf")  # sees key 0 only, masked by -inf
    bias[..., 3, :] = finfo_min  # sees keys 0..1, both masked by finfo.min
    bias[..., 4, :2], bias[..., 4, 2:] = finfo_min, float("-inf")  # sees 0..2: two finfo.min, one -inf
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, 0.3, True)
    no_key = [0, 1, 2]
    assert bool((out[..., no_key, :] == 0).all()) and bool((lse[..., no_key] == math.inf).all())
    masked_logit = -4096 * math.log(2)
    for row, n in ((3, 2), (4, 2)):
        torch.testing.assert_close(out[..., row, :], v[..., :n, :].mean(-2))
        torch.testing.assert_close(lse[..., row], torch.full((1, 2), masked_logit + math.log(n), dtype=torch.float32))
    q_grad, = torch.autograd.grad(out, q, torch.randn_like(out))
    assert bool((q_grad[..., no_key, :] == 0).all())
    bool_mask = torch.ones(n_q, n_k, dtype=torch.bool)
    bool_mask[5] = False
    assert bool((cupyflash.flash_attention(q, k, v, bool_mask)[..., 5, :] == 0).all())


def test_lse_is_differentiable():
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, 0.3, False)
    assert out.requires_grad and lse.requires_grad
    ours = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    s = 0.3 * q @ k.transpose(-1, -2)
    ref = torch.autograd.grad((torch.softmax(s, -1) @ v).sum() + torch.logsumexp(s, -1).sum(), (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def test_op_signatures_are_the_registered_schemas():
    text = " ".join(block for block in _code_blocks(_section("The torch ops and the log-sum-exp"))
                    if block.startswith("cupyflash::"))
    documented = {m.group(1): m.group(0) for m in re.finditer(r"cupyflash::(\w+)\(.*?\) -> \([^)]*\)",
                                                                 re.sub(r"\s+", " ", text))}
    for name in ("flash_attn_fwd", "flash_attn_bwd"):
        assert documented[name] == str(getattr(torch.ops.cupyflash, name).default._schema)


def test_siterecord_fields_are_all_documented():
    table = _section("The `torch.compile` backend").split("`compile_backend.SiteRecord` fields:", 1)[1]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert documented == [f.name for f in dataclasses.fields(SiteRecord)]


def test_environment_variables_are_the_ones_the_code_reads():
    documented = set(re.findall(r"^\| `([A-Z_0-9]+)` \|", _section("Environment variables"), re.M))
    source = "\n".join(p.read_text() for p in (ROOT / "cupyflash").glob("*.py"))
    read = set(re.findall(r"\"(CUPYFLASH_[A-Z_0-9]+|CUPY_CACHE_DIR)\"", source))
    assert documented == read


def test_cli_flags_in_the_doc_exist():
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.choices and "doctor" in a.choices).choices
    flags = {s for p in (parser, *sub.values()) for a in p._actions for s in a.option_strings}
    text = _section("The command line").replace("python -m cupyflash", "")
    documented = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", text))
    assert documented <= flags, documented - flags
    assert set(re.findall(r"`cupyflash ([a-z]+)", _section("The command line"))) == set(sub)
