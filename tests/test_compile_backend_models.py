"""Attention as real model families write it is fused: counter, op in the graph, outputs and gradients
equal to eager (CPU, fp32: the op's CPU implementation is exact). Whole transformers models (Llama, GPT-2, BERT
and the rest, with padding and the KV cache) are in test_transformers_models.py."""
import pytest
import torch

from models.harness import compile_and_compare
from models.hf import Gemma2Attention, LlamaAttention, bert_extended_mask, llama_causal_mask, sliding_window_mask
from models.nanogpt import GPT, CausalSelfAttention
from models.others import BmmAttention, EinsumCrossAttention, TimmAttention, sdpa_reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("train", [False, True])
def test_nanogpt_attention(train):
    m = CausalSelfAttention(32, 2, block_size=16, dropout=0.0).train(train)
    compile_and_compare(m, torch.randn(2, 8, 32), expect=1)


def test_nanogpt_eval_with_dropout_configured():
    m = CausalSelfAttention(32, 2, block_size=16, dropout=0.1).eval()
    compile_and_compare(m, torch.randn(2, 8, 32), expect=1)


def test_nanogpt_whole_model_loss():
    m = GPT(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 64, (2, 12))
    compile_and_compare(m, idx, torch.randint(0, 64, (2, 12)), expect=2)


def test_llama_left_padding_fully_masked_rows_gradient():
    """Rows whose every key is masked with finfo.min attend uniformly in eager; the op does the same, and its
    LSE keeps log(l) for them (kernels_cu/scores.cuh), so the gradients match too."""
    m = LlamaAttention(hidden_size=64, num_heads=4, num_key_value_heads=2)
    pad = torch.ones(2, 7)
    pad[1, :2] = 0  # left padding: the first two queries of sequence 1 see no key at all
    compile_and_compare(m, torch.randn(2, 7, 64), llama_causal_mask(pad, torch.float32), expect=1, frozen=(1,))


@pytest.mark.parametrize("mask", ["causal", "padded", "sliding"])
@pytest.mark.parametrize("cap", [50.0, 0.5])
def test_gemma2_soft_capped_attention(cap, mask):
    """Gemma 2's eager attention (query_pre_attn_scalar scaling, grouped-query K/V, tanh logit soft-capping
    with its released cap 50 and with a cap small enough that tanh bends the scores): fused with the cap."""
    m = Gemma2Attention(hidden_size=64, num_heads=4, num_key_value_heads=2, query_pre_attn_scalar=24,
                        attn_logit_softcapping=cap)
    pad = torch.ones(2, 9)
    if mask == "padded":
        pad[1, -3:] = 0
    if mask == "sliding":
        attn_mask = sliding_window_mask(pad, 4, torch.float32)
    else:
        attn_mask = llama_causal_mask(pad, torch.float32)
    graphs = compile_and_compare(m, torch.randn(2, 9, 64), attn_mask, expect=1, frozen=(1,))
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.cupyflash.flash_attn_fwd.default]
    assert op.kwargs["softcap"] == cap and op.args[4] == pytest.approx(24 ** -0.5)


def test_timm_vit_attention():
    compile_and_compare(TimmAttention(dim=64, num_heads=4), torch.randn(2, 17, 64), expect=1)


def test_einsum_cross_attention():
    compile_and_compare(EinsumCrossAttention(), torch.randn(2, 6, 32), torch.randn(2, 11, 24), expect=1)


@pytest.mark.parametrize("form", ["bmm", "baddbmm"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_bmm_3d_attention(form, with_mask):
    m = BmmAttention(embed_dim=32, num_heads=2, form=form)
    x = torch.randn(2, 9, 32)
    args = (x,)
    if with_mask:
        pad = torch.ones(2, 9)
        pad[1, 5:] = 0
        args = (x, bert_extended_mask(pad, torch.float32))
    compile_and_compare(m, *args, expect=1, frozen=(1,))


@pytest.mark.parametrize("case", ["plain", "causal", "float_mask", "scale", "gqa"])
def test_sdpa_docs_reference(case):
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    kwargs = {}
    if case == "causal":
        kwargs = {"is_causal": True}
    elif case == "float_mask":
        kwargs = {"attn_mask": torch.randn(9, 9)}
    elif case == "scale":
        kwargs = {"scale": 0.3}
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kwargs = {"enable_gqa": True}

    def fn(q, k, v):
        return sdpa_reference(q, k, v, **kwargs)

    compile_and_compare(fn, q, k, v, expect=1)


class _ViewAfterAttention(torch.nn.Module):
    """Heads merged by a `.view` of the (B, H, T, D) output itself (legal only on contiguous memory), beside the
    usual transpose: the op must keep the matmul's contiguous layout here."""

    def forward(self, q, k, v):
        y = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v  # (B, H, T, D)
        b, h, t, d = y.shape
        return y.view(b * h, t, d) + y.transpose(1, 2).reshape(b * h, t, d)


def _token_major_flags(graphs) -> list:
    return [n.kwargs["token_major_out"] for gm in graphs for n in gm.graph.nodes
            if n.target is torch.ops.cupyflash.flash_attn_fwd.default]


@pytest.mark.parametrize("model,args,want", [
    (CausalSelfAttention(32, 2, block_size=16, dropout=0.0), (torch.randn(2, 8, 32),), [True]),  # .contiguous().view
    (TimmAttention(dim=64, num_heads=4), (torch.randn(2, 17, 64),), [True]),  # .transpose(1, 2).reshape
    (LlamaAttention(hidden_size=64, num_heads=4, num_key_value_heads=2),
     (torch.randn(2, 7, 64), llama_causal_mask(torch.ones(2, 7), torch.float32)), [True]),
    (BmmAttention(embed_dim=32, num_heads=2, form="bmm"), (torch.randn(2, 9, 32),), [False]),  # (B·H, T, D) frame
    (_ViewAfterAttention(), tuple(torch.randn(2, 4, 9, 16) for _ in range(3)), [False]),
], ids=["nanogpt", "timm", "llama", "bmm", "view-of-output"])
def test_out_in_token_major_memory_where_every_user_swaps_heads(model, args, want):
    """The op returns out in (B, N, H, D) memory (as SDPA's) only where every user of the site's output swaps heads
    and tokens first, so merging the heads copies nothing; any other use keeps the matmul's contiguous layout. Equal
    numbers and gradients either way (compile_and_compare); the report says which."""
    graphs = compile_and_compare(model, *args, expect=1, frozen=(1,) if isinstance(model, LlamaAttention) else ())
    assert _token_major_flags(graphs) == want
