"""The backend on real ``transformers`` model code on the GPU: bf16, head dim 64, odd lengths, padding.

tests/test_transformers_models.py checks every family on the CPU path with tiny heads (head dim 8, no GPU kernel);
here a few families with GPU-sized heads run the CUDA kernels through the masks the backend proves (causal, sliding
window, key padding, soft-cap, attention sinks) and through the dense fallback. Each compiled bf16 CUDA model's
outputs and every parameter gradient are within the tolerance rule against the same model in fp64 on the CPU, bf16
eager on the GPU being the same-dtype PyTorch math, with no, right and left padding. The same holds for models written for SDPA
(``attn_implementation="sdpa"``) whose calls the backend routes (``options={"sdpa": "route"}``), masks proven.
"""
from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

import compile_backend
from reference import GRAD_FACTOR, OUT_FACTOR, assert_within_rule, rounding_floor, seed_from
from models.transformers_zoo import fp32_mask_fill

pytestmark = pytest.mark.gpu

VOCAB, BATCH, SEQ, PADDED = 128, 2, 97, 23
LLAMA = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
FAMILIES = {  # name: (config class, model class, fields)
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**LLAMA, "sliding_window": 40}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**LLAMA, "head_dim": 64, "sliding_window": 40,
                                                      "attn_logit_softcapping": 50.0}),
    # Attention sinks (out · σ(lse - sink) around the op, dlse in its backward), sliding and full layers. Every
    # token takes both experts: with a top-k choice, bf16 routes a few tokens differently from fp64 (a tie broken
    # otherwise), and the router's gradient then differs by O(1) whatever the attention (session 30, H100).
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {**LLAMA, "head_dim": 64, "sliding_window": 40,
                                                      "layer_types": ["sliding_attention", "full_attention"],
                                                      "num_local_experts": 2, "num_experts_per_tok": 2,
                                                      "experts_implementation": "batched_mm"}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4,
                                                   n_positions=256, pad_token_id=0)),
    "bert": ("BertConfig", "BertModel", dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=512, pad_token_id=0)),
}


def _build(name: str, attn: str = "eager") -> torch.nn.Module:
    import transformers

    config, model, fields = FAMILIES[name]
    torch.manual_seed(seed_from(name))
    made = getattr(transformers, config)(**fields, attn_implementation=attn)
    return getattr(transformers, model)(made).eval()


def _inputs(name: str, padding: str) -> dict:
    gen = torch.Generator().manual_seed(seed_from(name, padding))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padding == "right":
        mask[1, -PADDED:] = 0
    elif padding == "left":
        mask[1, :PADDED] = 0
    return {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen), "attention_mask": mask}


def _run(model, inputs, cotangents):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    key = "logits" if "logits" in out else "last_hidden_state"
    result = out[key]
    (result * cotangents.to(result.device, result.dtype)).sum().backward()
    module = getattr(model, "_orig_mod", model)
    return result, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def compiled():
    """((name, attention) -> (fp32 CPU model, bf16 CUDA eager model, compiled twin, sites fused)), built on first
    use; attention "sdpa": the model written for SDPA, its calls routed."""
    cache = {}

    def get(name, attn="eager"):
        if (name, attn) not in cache:
            torch._dynamo.reset()
            model = _build(name, attn)
            eager16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
            route = {"sdpa": "route"} if attn == "sdpa" else {}
            report = compile_backend.explain(copy.deepcopy(eager16), **_cuda(_inputs(name, "right")), options=route)
            before = counters["cupyflash"]["attention_fused"]
            twin = torch.compile(copy.deepcopy(eager16), backend="cupyflash", options={"inner": "eager", **route})
            cache[name, attn] = (model, eager16, twin, report, before)
        return cache[name, attn]
    return get


def _cuda(inputs: dict) -> dict:
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_outputs_and_gradients_within_rule(compiled, name, padding):
    _within_rule(*compiled(name), name, padding)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name,form", [("llama", "causal + key padding"), ("mistral", "causal + window + key padding"),
                                       ("bert", "key padding")])
def test_routed_sdpa_within_rule(compiled, name, form, padding):
    """Models written for SDPA, their calls routed with the masks proven (the plain kernels' key mask on Hopper)."""
    model, eager16, twin, report, before = compiled(name, "sdpa")
    assert [s.mask_form for s in report.fused] == [form] * 2, str(report)
    _within_rule(model, eager16, twin, report, before, name, padding)


def _within_rule(model, eager16, twin, report, before, name: str, padding: str) -> None:
    assert len(report.fused) == len(report.sites) == 2, str(report)
    inputs = _inputs(name, padding)
    fp32_out = model(**inputs)
    shape = (fp32_out["logits"] if "logits" in fp32_out else fp32_out["last_hidden_state"]).shape
    cot = torch.randn(shape, generator=torch.Generator().manual_seed(seed_from(name, padding, "cot")))
    with fp32_mask_fill():
        ref_out, ref_grads = _run(copy.deepcopy(model).double(), inputs, cot.double())
    same_out, same_grads = _run(eager16, _cuda(inputs), cot)
    ours_out, ours_grads = _run(twin, _cuda(inputs), cot)
    assert counters["cupyflash"]["attention_fused"] - before == 2, "every layer's site fused in one graph"
    what = f"{name} {padding} ({', '.join(s.mask_form for s in report.fused)})"
    assert_within_rule(ours_out.cpu(), ref_out, same_out.cpu(), OUT_FACTOR,
                       rounding_floor(ref_out, torch.bfloat16), f"{what}: out")
    assert ours_grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        floor = rounding_floor(ref, torch.bfloat16)
        if key.endswith("key.bias"):
            # Softmax ignores a per-query constant, so the key bias's exact gradient is 0 and its computed one is
            # Σ_j dk_j's rounding: FlashAttention's D = rowsum(dO∘O) from the 16-bit O (every kernel of ours, FA2
            # and FA3 alike) leaves Σ_j dS_ij at O's rounding, not 0. Its floor is the key weight's gradient's.
            floor = rounding_floor(ref_grads[key.replace("bias", "weight")], torch.bfloat16)
        assert_within_rule(ours_grads[key].cpu(), ref, same_grads[key].cpu(), GRAD_FACTOR, floor, f"{what}: d{key}")
