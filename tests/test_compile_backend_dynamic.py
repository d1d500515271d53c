"""Variable sequence lengths (a training loop's padded batches): after the second length Dynamo compiles one
graph with a symbolic length, and the rewrite must keep it symbolic. A rewrite that specializes it (a guard on the
length added while the backend traces its replacement) recompiles at every new length until Dynamo's recompile
limit sends the model back to eager."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

import compile_backend  # noqa: F401  (registers the backend)
from reference import GRAD_FACTOR, OUT_FACTOR, assert_within_rule, rounding_floor, seed_from
from models.transformers_zoo import fp32_mask_fill

LENGTHS = (12, 16, 20, 27)


def _llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(seed_from("dynamic llama"))
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("padding", ["right", "left"])
def test_one_dynamic_graph_serves_every_length(padding):
    torch._dynamo.reset()
    model = _llama()
    fp64 = _llama().double()
    compiled = torch.compile(model, backend="cupyflash")
    fused, before = [], counters["cupyflash"]["attention_fused"]
    for n in LENGTHS:
        gen = torch.Generator().manual_seed(seed_from("dynamic", padding, n))
        ids = torch.randint(3, 96, (2, n), generator=gen)
        mask = torch.ones_like(ids)
        if padding == "right":
            mask[1, -5:] = 0
        else:
            mask[1, :5] = 0
        with torch.no_grad():
            ours = compiled(input_ids=ids, attention_mask=mask).logits
            with fp32_mask_fill():  # fp64's finfo.min would be -inf in the fp32 softmax: NaN rows
                ref = fp64(input_ids=ids, attention_mask=mask).logits
            same = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()  # padded positions' logits are the model's business, not the comparison's
        assert_within_rule(ours[real], ref[real], same[real], OUT_FACTOR, rounding_floor(ref, torch.float32),
                           f"N = {n} {padding}")
        fused.append(counters["cupyflash"]["attention_fused"] - before)
    # The first length compiles statically, the second dynamically; later lengths reuse the dynamic graph.
    assert fused[0] == 2 and fused[1] == 4 and fused[-1] == 4, fused


def test_training_at_every_length_uses_the_dynamic_graph():
    """Loss and backward at each length (left padding): every parameter's gradient within the rule against fp64,
    with the backward of the one dynamic graph."""
    torch._dynamo.reset()
    model, fp64 = _llama().train(), _llama().double().train()
    compiled = torch.compile(_llama().train(), backend="cupyflash")
    before = counters["cupyflash"]["attention_fused"]
    for n in LENGTHS:
        gen = torch.Generator().manual_seed(seed_from("dynamic training", n))
        ids = torch.randint(3, 96, (2, n), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        grads = []
        for m in (compiled, fp64, model):
            m.zero_grad(set_to_none=True)
            with fp32_mask_fill():
                m(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            grads.append(dict(getattr(m, "_orig_mod", m).named_parameters()))
        for name, p in grads[1].items():
            assert_within_rule(grads[0][name].grad, p.grad, grads[2][name].grad, GRAD_FACTOR,
                               rounding_floor(p.grad, torch.float32), f"N = {n}: d{name}")
    assert counters["cupyflash"]["attention_fused"] - before == 4
