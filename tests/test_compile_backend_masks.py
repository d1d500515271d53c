"""Masks proven from the graph: real transformers 5.17 model code (tiny random configs, eager attention) is fused
with causal / window flags and a small (B, 1, 1, Nk) key-padding mask instead of the dense (B, 1, Nq, Nk) bias;
rows that see no key (left padding) get eager's values and gradients; q/k up-casts (GPT-2, GPT-J) are fused on
the 16-bit tensors; masks that are no band are left as a dense bias, with the reason."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import compile_backend  # noqa: E402
from cupyflash.unseen_rows import UNIFORM_SCORES  # noqa: E402
from models.harness import compile_and_compare  # noqa: E402
from reference import assert_within_rule, rounding_floor  # noqa: E402

OP = torch.ops.cupyflash.flash_attn_fwd.default
B, T, VOCAB = 2, 9, 64
WINDOW = 4
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, head_dim=8)


def _config(name, layers):
    if name == "llama":
        return transformers.LlamaConfig(**_SMALL, num_hidden_layers=layers), transformers.LlamaForCausalLM
    if name == "qwen2":
        return transformers.Qwen2Config(**_SMALL, num_hidden_layers=layers), transformers.Qwen2ForCausalLM
    if name == "mistral":
        return transformers.MistralConfig(**_SMALL, num_hidden_layers=layers, sliding_window=WINDOW), transformers.MistralForCausalLM
    if name == "gemma2":
        return (transformers.Gemma2Config(**_SMALL, num_hidden_layers=layers, sliding_window=WINDOW,
                                         query_pre_attn_scalar=8),
                transformers.Gemma2ForCausalLM)
    if name == "gpt2":
        return (transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                        reorder_and_upcast_attn=True, attn_pdrop=0.0, resid_pdrop=0.0,
                                        embd_pdrop=0.0), transformers.GPT2LMHeadModel)
    if name == "gptj":
        return (transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                        rotary_dim=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
                transformers.GPTJForCausalLM)
    raise ValueError(name)


class Logits(torch.nn.Module):
    """The model's logits only (the harness compares tensors, not ModelOutput)."""

    def __init__(self, model, use_cache):
        super().__init__()
        self.model, self.use_cache = model, use_cache

    def forward(self, ids, attention_mask=None):
        return self.model(ids, attention_mask=attention_mask, use_cache=self.use_cache).logits


def _model(name, dtype=torch.float32, layers=1, use_cache=True):
    """use_cache=False without an attention mask makes masking_utils add its packed-sequence term, built from
    position ids (an arange in the graph when none are given)."""
    torch.manual_seed(0)
    config, cls = _config(name, layers)
    config._attn_implementation = "eager"
    return Logits(cls(config).to(dtype), use_cache)


def _inputs(padding):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T))
    if padding == "none":
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[1, :3] = 0  # the first three queries of sequence 1 see no key under the causal mask
    else:
        mask[1, -3:] = 0
    return ids, mask


def _report(model, ids, mask):
    torch._dynamo.reset()
    report = compile_backend.explain(model, ids, mask)
    assert report.sites and not report.skipped, str(report)
    return report


def _dense_mask_ops(graphs):
    """torch.where nodes filling with a finite minimum: transformers' eager mask (B, 1, Nq, Nk)."""
    return [n for gm in graphs for n in gm.graph.nodes
            if n.target is torch.where and any(isinstance(a, float) and a < -1e30 for a in n.args)]


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_llama_causal_and_key_padding(padding):
    """Two layers share one mask: its dense construction dies once the last site stops reading it."""
    model = _model("llama", layers=2, use_cache=padding != "none")
    ids, mask = _inputs(padding)
    report = _report(model, ids, mask)
    want = "causal" if padding == "none" else "causal + key padding"
    assert [s.mask_form for s in report.sites] == [want, want], str(report)
    assert all(s.causal and s.window == (-1, -1) for s in report.sites)
    if padding != "left":
        return  # the numbers: left padding has rows with no key, the hardest case
    graphs = compile_and_compare(model, ids, mask, expect=2, atol=1e-5, rtol=1e-5)
    assert not _dense_mask_ops(graphs), "the dense mask's construction should be dead and erased"
    (bias,) = {op.args[3] for gm in graphs for op in gm.graph.nodes if op.target is OP}
    value = bias.meta["example_value"]
    assert value.dtype == torch.bool and tuple(value.shape) == (B, 1, 1, T), value


def test_llama_left_padding_under_inductor():
    """The rows without a key as Inductor compiles them (the other tests run aot_eager): the op's unseen_rows in
    Inductor's forward and backward graphs, gradients as eager's."""
    model = _model("llama", layers=2)
    ids, mask = _inputs("left")
    compile_and_compare(model, ids, mask, expect=2, inner="inductor", atol=1e-5, rtol=1e-5)


def test_mistral_sliding_window_with_left_padding():
    """masking_utils keeps kv_idx > q_idx - sliding_window: W keys up to the diagonal, the op's window_left W - 1."""
    model = _model("mistral")
    ids, mask = _inputs("left")
    report = _report(model, ids, mask)
    assert [(s.mask_form, s.window) for s in report.sites] == [("causal + window + key padding", (WINDOW - 1, -1))]
    compile_and_compare(model, ids, mask, expect=1, atol=1e-5, rtol=1e-5)


def test_gemma2_soft_cap_and_window():
    """Gemma 2 alternates sliding and full layers; with a soft-cap the flags hold without padding. With padding,
    a row that sees no key would need eager's gradient through tanh' of every score: dense, with the reason."""
    model = _model("gemma2", layers=2)
    ids, _ = _inputs("none")
    report = _report(model, ids, None)
    assert sorted((s.mask_form, s.window) for s in report.sites) == [("causal", (-1, -1)),
                                                                      ("causal + window", (WINDOW - 1, -1))]
    assert all(s.softcap for s in report.sites)
    compile_and_compare(model, ids, None, expect=2, atol=1e-5, rtol=1e-5)
    ids, mask = _inputs("left")
    report = _report(model, ids, mask)
    assert all(s.mask_form == "dense bias" and any("soft-capped" in n for n in s.notes) for s in report.sites)


class Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attention_mask):
        return self.model(ids, attention_mask=attention_mask).last_hidden_state


def test_bert_key_padding_without_band():
    """The bidirectional mask (q_idx >= 0 and the padding term) is key padding alone; a fully padded row cannot
    occur here but the backend cannot know, so the exact uniform-row selection is in the graph too."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    model = Hidden(transformers.BertModel(config))
    ids, mask = _inputs("right")
    (site,) = _report(model, ids, mask).sites
    assert site.mask_form == "key padding" and not site.causal and site.window == (-1, -1), str(site)
    compile_and_compare(model, ids, mask, expect=1, atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, ids, mask, seed):
    model.zero_grad(set_to_none=True)
    logits = model(ids, mask)
    (logits.float() * seed).sum().backward()
    return [logits.detach()] + [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "gptj"])
def test_bf16_left_padding_within_the_rule(name):
    """bf16, left padding (rows with no key): logits and every parameter gradient against an fp32 copy, within
    2x (3x for gradients) eager bf16's own error plus a rounding floor. GPT-2 (reorder_and_upcast_attn) and
    GPT-J cast q and k to fp32 with v in bf16: fused on the bf16 tensors."""
    model = _model(name, torch.bfloat16)
    ids, mask = _inputs("left")
    report = _report(model, ids, mask)
    assert all(s.mask_form == "causal + key padding" for s in report.sites), str(report)
    reference = copy.deepcopy(model).float()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="cupyflash", options={"inner": "aot_eager"})
    seed = torch.randn(B, T, VOCAB)
    ref = _loss_and_grads(reference, ids, mask, seed)
    eager = _loss_and_grads(model, ids, mask, seed)
    ours = _loss_and_grads(compiled, ids, mask, seed)
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    for i, (o, r, e, what) in enumerate(zip(ours, ref, eager, names)):
        assert_within_rule(o, r, e, 2.0 if i == 0 else 3.0, rounding_floor(r, torch.bfloat16), what)


def _uniform_rows_case(kv_heads, n_k, dtype, seed=0):
    """q (2, 4, 6, D) and k, v (2, kv_heads, n_k, D) in ``dtype``; sequence 1 left-padded so its first 4 rows see
    no key under a causal mask: eager's output (fp64 math on the given values, the fill added) and the op's with
    unseen_rows = UNIFORM_SCORES."""
    torch.manual_seed(seed)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64).to(dtype).requires_grad_()
    k, v = (torch.randn(2, kv_heads, n_k, 8, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    pad = torch.ones(2, n_k, dtype=torch.bool)
    pad[1, :n_k - 2] = False
    scale = 0.37

    def eager(q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        keep = torch.ones(6, n_k, dtype=torch.bool).tril(n_k - 6) & pad[:, None, None, :]
        bias = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), torch.finfo(q.dtype).min)
        scores = (q @ k.transpose(-1, -2) * scale + bias).to(torch.promote_types(q.dtype, torch.float32))
        return torch.softmax(scores, -1).to(q.dtype) @ v  # as transformers' eager_attention_forward

    out, lse = OP(q, k, v, pad[:, None, None, :], scale, True, unseen_rows=UNIFORM_SCORES)
    assert torch.isposinf(lse).all(1).tolist() == [[False] * 6, [True] * 4 + [False] * 2]
    return (q, k, v), eager, out


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA 2", "MQA"])
def test_unseen_rows_match_eager_in_fp64(kv_heads):
    """The op's unseen_rows (cupyflash/unseen_rows.py) on the CPU path: with eager's finite fill added, a row with
    no key is uniform over all Nk keys, with eager's q/k/v gradients, grouped-query heads included."""
    inputs, eager, got = _uniform_rows_case(kv_heads, 6, torch.float64)
    want = eager(*inputs)
    dout = torch.randn_like(want)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for g, w in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)  # the op keeps its LSE in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_k", [6, 3000])
def test_unseen_rows_in_16_bit_within_the_rule(dtype, n_k):
    """The op's unseen rows in 16-bit: output and q/k/v gradients within the rule against fp64 math, beside eager's
    own error in that dtype; at Nk = 3000 too, where Kᵀ V summed unscaled leaves fp16's range."""
    inputs, eager, got = _uniform_rows_case(2, n_k, dtype, seed=1)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = eager(*ref_inputs)
    want = eager(*inputs)
    dout = torch.randn_like(ref) * 30
    floor = rounding_floor(ref, dtype)
    assert_within_rule(got, ref, want, 2.0, floor, "out")
    grads = zip(torch.autograd.grad(got, inputs, dout.to(dtype)), torch.autograd.grad(ref, ref_inputs, dout),
                torch.autograd.grad(want, inputs, dout.to(dtype)), "qkv")
    for g, r, e, name in grads:
        assert_within_rule(g, r, e, 3.0, rounding_floor(r, dtype), f"d{name}")


def _positions(q, k):
    """Query positions i, (1, 1, Nq, 1), and key positions j, (1, 1, 1, Nk), as masking_utils builds its masks."""
    i = torch.arange(q.shape[-2])[None, None, :, None]
    j = torch.arange(k.shape[-2])[None, None, None, :]
    return i, j


def filled_causal_padding(q, k, v, pad):
    """masked_fill replaces the scores of masked keys: a row with no key is uniform and passes no gradient to q
    or k (eager's rows of the first, left-padded, queries)."""
    i, j = _positions(q, k)
    keep = (j <= i + (k.shape[-2] - q.shape[-2])) & pad[:, None, None, :]
    return _scores(q, k).masked_fill(~keep, torch.finfo(torch.float32).min).softmax(-1) @ v


def test_masked_fill_rows_with_no_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :5] = False  # rows 0-2 of sequence 1 see no key
    torch._dynamo.reset()
    (site,) = compile_backend.explain(filled_causal_padding, q, k, v, pad).sites
    assert site.fused and site.mask_form == "causal + key padding", str(site)
    compile_and_compare(filled_causal_padding, q, k, v, pad, expect=1, frozen=(3,))


def _scores(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def strided_mask(q, k, v):
    """kv <= 2·q, built with aranges as masking_utils builds its masks: not a band."""
    i, j = _positions(q, k)
    bias = torch.where(j <= 2 * i, torch.tensor(0.0), torch.finfo(torch.float32).min)
    return (_scores(q, k) + bias).softmax(-1) @ v


def runtime_offset(q, k, v, cache_position):
    """The query positions come from a graph input (generate()'s cache_position): runtime data, no proof."""
    j = torch.arange(k.shape[-2])[None, None, None, :]
    bias = torch.where(j <= cache_position[None, None, :, None], torch.tensor(0.0), torch.finfo(torch.float32).min)
    return (_scores(q, k) + bias).softmax(-1) @ v


@pytest.mark.parametrize("fn,extra,reason", [
    (strided_mask, (), "builds an index tensor the backend does not follow"),
    (runtime_offset, (torch.arange(3, 9),), "is a graph input"),
])
def test_lookalike_masks_stay_dense(fn, extra, reason):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    torch._dynamo.reset()
    (site,) = compile_backend.explain(fn, q, k, v, *extra).sites
    assert site.fused and site.mask_form == "dense bias" and not site.causal, str(site)
    assert any(reason in n for n in site.notes), site.notes
    compile_and_compare(fn, q, k, v, *extra, expect=1)


def distance_within(q, k, v):
    """masking_utils' bidirectional sliding window (ModernBERT's local layers): abs(q_idx - kv_idx) <= 2."""
    i, j = _positions(q, k)
    bias = torch.where(abs(i - j) <= 2, torch.tensor(0.0), torch.finfo(torch.float32).min)
    return (_scores(q, k) + bias).softmax(-1) @ v


def distance_not_beyond(q, k, v):
    """The same band as a fill of the keys beyond it: masked_fill(~((j - i).abs() < 3))."""
    i, j = _positions(q, k)
    return _scores(q, k).masked_fill(~(3 > (j - i).abs()), float("-inf")).softmax(-1) @ v


def distance_beyond(q, k, v):
    """Look-alike: only keys more than 1 away (a union of two bands, not a window)."""
    i, j = _positions(q, k)
    bias = torch.where(abs(i - j) > 1, torch.tensor(0.0), torch.finfo(torch.float32).min)
    return (_scores(q, k) + bias).softmax(-1) @ v


def distance_against_distance(q, k, v):
    """Look-alike: |i - j| <= |i - 2|, a distance on both sides."""
    i, j = _positions(q, k)
    bias = torch.where(abs(i - j) <= abs(i - 2), torch.tensor(0.0), torch.finfo(torch.float32).min)
    return (_scores(q, k) + bias).softmax(-1) @ v


@pytest.mark.parametrize("fn,window", [(distance_within, (2, 2)), (distance_not_beyond, (2, 2))])
def test_a_distance_bound_is_a_bidirectional_window(fn, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    torch._dynamo.reset()
    (site,) = compile_backend.explain(fn, q, k, v).sites
    assert site.fused and site.mask_form == "window" and not site.causal and site.window == window, str(site)
    compile_and_compare(fn, q, k, v, expect=1)


@pytest.mark.parametrize("fn,reason", [(distance_beyond, "a union of two bands"),
                                       (distance_against_distance, "a distance on both sides")])
def test_distance_lookalikes_stay_dense(fn, reason):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    torch._dynamo.reset()
    (site,) = compile_backend.explain(fn, q, k, v).sites
    assert site.fused and site.mask_form == "dense bias" and not site.causal, str(site)
    assert any(reason in n for n in site.notes), site.notes
    compile_and_compare(fn, q, k, v, expect=1)


def inverted_integer_mask(q, k, v):
    """~ of an integer 0/1 triangle is -1 / -2, both true: every key is masked (not the upper triangle)."""
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.long).tril()
    return _scores(q, k).masked_fill((~keep).bool(), torch.finfo(torch.float32).min).softmax(-1) @ v


def test_invert_of_an_integer_mask_is_not_a_negation():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    torch._dynamo.reset()
    (site,) = compile_backend.explain(inverted_integer_mask, q, k, v).sites
    assert not site.causal and site.mask_form != "causal", str(site)
    compile_and_compare(inverted_integer_mask, q, k, v, expect=1)


def causal_tril_of_lengths(q, k, v):
    """tril(Nk - Nq): once the lengths are dynamic, the diagonal is a graph node holding a SymInt."""
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2])
    return _scores(q, k).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def causal_triu_of_lengths(q, k, v):
    masked = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(k.shape[-2] - q.shape[-2] + 1)
    return _scores(q, k).masked_fill(masked, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("fn", [causal_tril_of_lengths, causal_triu_of_lengths])
def test_triangle_with_a_diagonal_from_dynamic_lengths(fn):
    """The static graph proves the causal band; the dynamic one (second call) must not crash the backend, and with
    Nq > Nk possible for some lengths it keeps the -inf mask as a keep-mask (eager's NaN rows) instead."""
    def qkv(n_q, n_k):
        return torch.randn(2, 2, n_q, 8), torch.randn(2, 2, n_k, 8), torch.randn(2, 2, n_k, 8)

    torch.manual_seed(0)
    graphs = compile_and_compare(fn, *qkv(5, 7), expect=2, calls=[qkv(6, 9), qkv(3, 11)])
    causal = [n.args[5] for gm in graphs for n in gm.graph.nodes if n.target is OP]
    assert causal == [True, False]
