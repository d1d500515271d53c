"""Every pattern Inductor's fuse_attention.py rewrites (_sfdp_pattern_1..27), through backend="cupyflash".

Patterns 15, 17 and 20 (DistilBERT) mask with -inf from an arbitrary padding mask: a sequence that is all
padding gives NaN rows in eager and 0 in the op, so the backend leaves them alone and says why.
"""
import pytest
import torch

from models import inductor_patterns as ip
from models.harness import assert_left_alone, compile_and_compare

B, H, N, D = 2, 2, 7, 8


def _qkv(layout, dtype=torch.float32):
    shape = {"bhnd": (B, H, N, D), "bnhd": (B, N, H, D), "3d": (B * H, N, D)}[layout]
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def _additive_mask():
    m = torch.zeros(B, 1, 1, N)
    m[1, ..., -2:] = torch.finfo(torch.float32).min
    return m


def _causal_bool():
    return torch.ones(N, N, dtype=torch.bool).tril()[None, None]


CASES = {
    1: ("bhnd", ()), 2: ("bhnd", ()), 3: ("bhnd", ()), 4: ("bhnd", ()),
    5: ("bhnd", (_additive_mask,)), 6: ("bhnd", (_additive_mask,)),
    11: ("bnhd", ()), 12: ("bnhd", ()), 13: ("3d", ()),
    14: ("bnhd", (_additive_mask,)), 16: ("bnhd", (_additive_mask,)),
    18: ("bnhd", (_causal_bool,)),
    21: ("bnhd", (_additive_mask,)), 22: ("bnhd", (_additive_mask,)), 23: ("bnhd", ()),
    24: ("bhnd", (_additive_mask,)),
    25: ("bnhd", (_additive_mask,)), 26: ("bnhd", (_additive_mask,)), 27: ("bnhd", ()),
}


@pytest.mark.parametrize("number", sorted(CASES))
def test_inductor_pattern_fused(number):
    torch.manual_seed(number)
    layout, extras = CASES[number]
    args = [*_qkv(layout), *(make() for make in extras)]
    compile_and_compare(getattr(ip, f"p{number}"), *args, expect=1, frozen=tuple(range(3, len(args))))


@pytest.mark.parametrize("number", [7, 8, 9, 10])
def test_inductor_fp16_patterns_fused(number):
    torch.manual_seed(number)
    compile_and_compare(getattr(ip, f"p{number}"), *_qkv("bnhd", torch.float16), expect=1, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("number", [15, 17, 20])
def test_distilbert_inf_padding_mask_fused(number):
    """A -inf key-padding mask: passed as the op's keep-mask, with eager's NaN for rows that would see no key
    (none here; those rows: test_compile_backend_fills)."""
    torch.manual_seed(number)
    pad = torch.ones(B, N)
    pad[1, -3:] = 0
    compile_and_compare(getattr(ip, f"p{number}"), *_qkv("bnhd"), pad, expect=1, frozen=(3,))


def test_gpt2_fill_of_input_mask_beside_bias_left_alone():
    """GPT-2's where(causal_mask, w, finfo.min) + attn_mask with the causal mask a graph input (not provable; as a
    registered buffer it is proven causal and fused): where the fill masked every key of a row, eager's gradient to
    q and k from that row is 0 and the op's bias would pass one, so the site is left alone."""
    torch.manual_seed(19)
    assert_left_alone(ip.p19, *_qkv("bhnd"), _causal_bool(), _additive_mask(), reason="beside another bias or mask")
