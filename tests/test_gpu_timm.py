"""The backend on real ``timm`` model code on the GPU (timm's naive attention, ``set_fused_attn(False)``): ViT (no
mask), Swin (windows with a learned relative-position bias and the shifted windows' -100 mask, head dim 32), BEiT (a
learned relative-position bias, its gradient through the op), Swin V2 (a learned scale per head, folded into q),
Twins (scores with three batch dims), bf16.

Every attention site is fused; the compiled bf16 CUDA model's output and every parameter gradient are within the
tolerance rule against the same model in fp64 on the CPU, bf16 eager on the GPU being the same-dtype PyTorch math.
timm needs torchvision, whose CPU wheel CI cannot install, so this file runs where both are (the GPU machines).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

timm = pytest.importorskip("timm")

import compile_backend
from reference import GRAD_FACTOR, OUT_FACTOR, assert_within_rule, rounding_floor, seed_from

pytestmark = pytest.mark.gpu

BATCH = 2
MODELS = {  # name: (the mask form of every site, sites)
    "vit_tiny_patch16_224": ("none", 12),
    "swin_tiny_patch4_window7_224": ("dense bias", 12),
    "beit_base_patch16_224": ("dense bias", 12),
    # Q·Kᵀ scaled by a learned per-head factor, folded into q: Swin V2's logit scale (and its bias). XCiT's
    # temperature fuses too, but its class attention (one query over 197 keys) has a q gradient 4x bf16 eager's
    # error on the CPU path's bf16 run, over the rule's 3x: D = rowsum(dO ∘ O) from the 16-bit O, as FlashAttention's
    # and cuDNN's backwards take it, shifts every dS of that one row alike (session 30; not run on a GPU)
    "swinv2_cr_tiny_ns_224": ("dense bias", 12),
    # (B, groups, heads, N, N) scores, the leading dims merged
    "twins_svt_small": ("none", 18),
}


def _build(name: str) -> torch.nn.Module:
    timm.layers.set_fused_attn(False)  # the naive softmax(q kᵀ) v the backend looks for (read at construction)
    try:
        torch.manual_seed(seed_from(name))
        return timm.create_model(name, pretrained=False).eval()
    finally:
        timm.layers.set_fused_attn(True)


def _run(model, images, cot):
    model.zero_grad(set_to_none=True)
    out = model(images)
    (out * cot.to(out.device, out.dtype)).sum().backward()
    module = getattr(model, "_orig_mod", model)
    return out, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_model_fused_within_rule(name):
    form, sites = MODELS[name]
    torch._dynamo.reset()
    model = _build(name)
    gen = torch.Generator().manual_seed(seed_from(name, "images"))
    images = torch.randn(BATCH, *model.pretrained_cfg["input_size"], generator=gen)
    eager16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
    report = compile_backend.explain(copy.deepcopy(eager16), images.cuda().bfloat16())
    assert len(report.fused) == len(report.sites) == sites, str(report)
    assert {s.mask_form for s in report.fused} == {form}, str(report)
    before = counters["cupyflash"]["attention_fused"]
    twin = torch.compile(copy.deepcopy(eager16), backend="cupyflash", options={"inner": "eager"})
    cot = torch.randn(BATCH, model.num_classes, generator=gen)
    ref_out, ref_grads = _run(copy.deepcopy(model).double(), images.double(), cot.double())
    same_out, same_grads = _run(eager16, images.cuda().bfloat16(), cot)
    ours_out, ours_grads = _run(twin, images.cuda().bfloat16(), cot)
    assert counters["cupyflash"]["attention_fused"] - before == sites
    assert_within_rule(ours_out.cpu(), ref_out, same_out.cpu(), OUT_FACTOR, rounding_floor(ref_out, torch.bfloat16),
                       f"{name}: out")
    assert ours_grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        assert_within_rule(ours_grads[key].cpu(), ref, same_grads[key].cpu(), GRAD_FACTOR,
                           rounding_floor(ref, torch.bfloat16), f"{name}: d{key}")
