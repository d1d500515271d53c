"""options={"sdpa": "route"}: F.scaled_dot_product_attention calls routed to the op where it computes the same
(compile_backend/sdpa_sites.py), on functions and on real transformers models with attn_implementation="sdpa";
look-alikes left alone with their reason; the default ("auto") routes only the calls compile_backend/sdpa_rule.py
finds faster on the op; "keep" leaves every call to SDPA."""
from __future__ import annotations

import copy
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers loads: nothing here may reach the hub

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import compile_backend
from compile_backend import sdpa_rule, spellings as sp
from compile_backend.sdpa_sites import ROUTED_NOTE, SDPA
from models.harness import OP
from reference import seed_from

ROUTE = {"sdpa": "route", "inner": "aot_eager"}
ATOL = RTOL = 2e-5  # fp32 on the CPU, as models.harness.compile_and_compare; gradients 10x


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _leaves(args, grad):
    return [a.detach().clone().requires_grad_(grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def run_and_compare(fn, *args, options: dict, expect: int, grad: bool = True, params=(), dynamic=None) -> list:
    """``fn(*args)`` eagerly and through the backend with ``options``: outputs and the gradients of the floating
    inputs (and of ``params``) equal; ``expect`` calls routed (counter and op nodes). Returns the graphs."""
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def spy(gm, example_inputs):
        compiled = compile_backend.cupyflash_backend(gm, example_inputs, options=dict(options))
        graphs.append(gm)
        return compiled

    results = []
    for run in (fn, torch.compile(fn, backend=spy, dynamic=dynamic)):
        inputs = _leaves(args, grad)
        for p in params:
            p.grad = None
        out = run(*inputs)
        out = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        grads = []
        if grad:
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            grads = [a.grad for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
            # Unused parameters (BERT's pooler): None eagerly, zeros through AOTAutograd.
            grads += [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        results.append((out.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL * 10, rtol=RTOL * 10)
    assert counters["cupyflash"]["attention_fused"] == expect, dict(counters["cupyflash"])
    assert sum(n.target is OP for gm in graphs for n in gm.graph.nodes) == expect
    return graphs


def _qkv(b=2, h=4, n_q=9, n_k=9, d=16, h_kv=None, d_v=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h_kv = h_kv or h
    return (torch.randn(b, h, n_q, d, generator=gen), torch.randn(b, h_kv, n_k, d, generator=gen),
            torch.randn(b, h_kv, n_k, d_v or d, generator=gen))


def _key_padding(b=2, n_k=9, fully_masked_row=True):
    """(B, 1, 1, Nk) bool keep-mask: row 1 drops its last 3 keys; row 0 keeps none (rows that see no key)."""
    keep = torch.ones(b, 1, 1, n_k, dtype=torch.bool)
    keep[1, ..., -3:] = False
    if fully_masked_row:
        keep[0] = False
    return keep


def sdpa_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def sdpa_then_view(x):
    """x (B, N, H, D) seen as (B, H, N, D): SDPA returns the (B, N, H, D) layout, which the .view() relies on."""
    q = x.transpose(1, 2)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, q, q)
    return out.transpose(1, 2).view(x.shape[0], x.shape[1], -1)  # (B, N, H·D)


def sdpa_then_view_as(x):
    q = x.transpose(1, 2)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, q, q)
    return out.transpose(1, 2).view_as(x.flatten(2))  # (B, N, H·D), valid only in SDPA's output layout


def sdpa_then_movedim_view(x):
    q = x.transpose(1, 2)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, q, q)
    return out.movedim(1, 2)[:, 1:].view(x.shape[0], x.shape[1] - 1, -1)  # through two views of the output


def sdpa_then_scaled_view(x):
    q = x.transpose(1, 2)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, q, q)
    return (out.transpose(1, 2) * 2).view(x.shape[0], x.shape[1], -1)  # the product keeps SDPA's layout


def sdpa_seq_first_then_view(x):
    """x (N, B, H, D), as a sequence-first model keeps it: SDPA's output follows q's memory order, (N, B, H, D),
    which the .view() relies on; the op returns contiguous or (B, N, H, D) memory only."""
    q = x.permute(1, 2, 0, 3)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, q, q)
    return out.permute(2, 0, 1, 3).view(x.shape[0], x.shape[1], -1)  # (N, B, H·D)


def sdpa_then_contiguous_view(x):
    q = x.transpose(1, 2)  # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, q, q)
    return out.transpose(1, 2).contiguous().view(x.shape[0], x.shape[1], -1)  # (B, N, H·D), as nanoGPT


def _float_mask(n_q, n_k, shape_prefix=(2, 4)):
    bias = torch.randn(*shape_prefix, n_q, n_k, generator=torch.Generator().manual_seed(3))
    bias[..., 0, :] = -torch.inf  # a row that sees no key: SDPA's math path and the op both give 0
    return bias


CASES = {
    "key padding (bool, a row with every key masked)": (sdpa_mask, lambda: (*_qkv(), _key_padding()), "key padding"),
    "dense bool mask": (sdpa_mask, lambda: (*_qkv(n_q=5), torch.rand(2, 4, 5, 9) > 0.4), "dense bias"),
    "additive float mask": (sdpa_mask, lambda: (*_qkv(n_q=7), _float_mask(7, 9)), "dense bias"),
    "2-D additive mask": (sdpa_mask, lambda: (*_qkv(n_q=7), _float_mask(7, 9, ())), "dense bias"),
    "is_causal, Nq == Nk": (sdpa_causal, lambda: _qkv(), "causal"),
    "is_causal + enable_gqa": (sdpa_gqa, lambda: _qkv(h_kv=2), "causal"),
    "v's head dim other than q's": (sdpa_mask, lambda: (*_qkv(d_v=8), None), "none"),
    "transposed inputs, .contiguous().view()": (sdpa_then_contiguous_view, lambda: (torch.randn(2, 9, 4, 16),),
                                                "none"),
}


@pytest.mark.parametrize("case", CASES)
def test_routed_calls_equal_sdpa(case):
    fn, make, form = CASES[case]
    run_and_compare(fn, *make(), options=ROUTE, expect=1)
    report = compile_backend.explain(fn, *make(), options={"sdpa": "route"})
    (site,) = report.sites
    assert site.fused and site.mask_form == form and ROUTED_NOTE in site.notes, str(report)


def test_causal_with_dynamic_lengths_proven_equal():
    """Nq and Nk of one symbol (duck sizing): Nq == Nk is proven, so is_causal is routed for every length."""
    graphs = run_and_compare(sdpa_causal, *_qkv(n_q=11, n_k=11), options=ROUTE, expect=1, dynamic=True)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is OP]
    assert isinstance(op.meta["example_value"][0].shape[2], torch.SymInt)  # (out, lse): out's Nq is symbolic


def test_keep_leaves_every_call_to_sdpa():
    """options={"sdpa": "keep"}: no call is touched: counter 0, the SDPA node still in the graph, explain lists
    nothing."""
    graphs = run_and_compare(sdpa_mask, *_qkv(), _key_padding(), options={"sdpa": "keep", "inner": "aot_eager"},
                             expect=0)
    assert [n.target for gm in graphs for n in gm.graph.nodes].count(SDPA) == 1
    assert compile_backend.explain(sdpa_causal, *_qkv(), options={"sdpa": "keep"}).sites == []


def sdpa_decoder_mask(q, k, v, keep):
    """A decoder's mask with padding, as transformers passes SDPA: causal ∧ key padding, (B, 1, Nq, Nk)."""
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & keep)


def _auto_inputs(n=512, d=64, mask="keys", dtype=torch.bfloat16):
    q, k, v = (t.to(dtype) for t in _qkv(b=2, h=2, n_q=n, n_k=n, d=d))
    keep = _key_padding(n_k=n, fully_masked_row=False)
    return (q, k, v) if mask is None else (q, k, v, keep if mask == "keys" else torch.randn(2, 1, n, n).to(dtype))


# The default's rule on a Hopper GPU (its capability faked): (function, inputs, routed, the reason's words).
AUTO_CASES = {
    "causal + key padding, d64": (sdpa_decoder_mask, lambda: _auto_inputs(), True, None),
    "key padding, d128": (sdpa_mask, lambda: _auto_inputs(d=128), True, None),
    "key padding, fp16": (sdpa_mask, lambda: _auto_inputs(dtype=torch.float16), True, None),
    "causal flag": (sdpa_causal, lambda: _auto_inputs(mask=None), False, "as fast or faster"),
    "dense additive mask": (sdpa_mask, lambda: _auto_inputs(mask="dense"), False, "as fast or faster"),
    "head dim 96": (sdpa_decoder_mask, lambda: _auto_inputs(d=96), False, "head dim 96 not measured"),
    "N 256": (sdpa_decoder_mask, lambda: _auto_inputs(n=256), False, "shortest length measured"),
    "fp32": (sdpa_mask, lambda: _auto_inputs(dtype=torch.float32), False, "torch.float32 at head dim 64 not measured"),
}


@pytest.mark.parametrize("case", AUTO_CASES)
def test_default_routes_where_the_table_says(case, monkeypatch):
    monkeypatch.setattr(sdpa_rule, "_capability", lambda device: (9, 0))
    fn, make, routed, reason = AUTO_CASES[case]
    torch._dynamo.reset()  # static shapes, as a first compile sees them
    (site,) = compile_backend.explain(fn, *make()).sites
    assert site.fused == routed and (routed or reason in site.reason), str(site)


def sdpa_self_decoder_mask(x, keep):
    """Self-attention on one tensor (q, k and v share their length, as a model's do) with a decoder's mask."""
    causal = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(x, x, x, attn_mask=causal & keep)


def test_default_decides_a_dynamic_length_with_a_guard(monkeypatch):
    """A length that turned dynamic (Dynamo's second shape) is routed by a guard on Nq >= MIN_N: lengths above it
    run the routed graph, a shorter one compiles again and stays SDPA's."""
    monkeypatch.setattr(sdpa_rule, "_capability", lambda device: (9, 0))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sdpa_self_decoder_mask, backend="cupyflash", options={"inner": "aot_eager"})
    fused, graphs = [], []
    for n in (512, 600, 700, 300):
        x = torch.randn(2, 2, n, 64, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
        keep = _key_padding(n_k=n, fully_masked_row=False)
        got = compiled(x, keep)
        torch.testing.assert_close(got.float(), sdpa_self_decoder_mask(x, keep).float(), atol=2e-2, rtol=2e-2)
        fused.append(counters["cupyflash"]["attention_fused"])
        graphs.append(counters["stats"]["unique_graphs"])
    # 512 static, 600 the dynamic graph (routed, guarded), 700 reuses it, 300 a third graph left to SDPA
    assert (fused, graphs) == ([1, 2, 2, 2], [1, 2, 2, 3]), (fused, graphs)


@pytest.mark.parametrize("capability,reason", [(None, "(device cpu)"), ((8, 0), "sm_80")])
def test_default_keeps_sdpa_off_hopper(capability, reason, monkeypatch):
    monkeypatch.setattr(sdpa_rule, "_capability", lambda device: capability)
    torch._dynamo.reset()
    (site,) = compile_backend.explain(sdpa_decoder_mask, *_auto_inputs()).sites
    assert not site.fused and "only on Hopper's kernels" in site.reason and reason in site.reason, str(site)


def test_default_routed_call_runs_and_counts(monkeypatch):
    """Through torch.compile with the default options: the routed call is counted and gives SDPA's numbers (bf16
    against SDPA's bf16 math)."""
    monkeypatch.setattr(sdpa_rule, "_capability", lambda device: (9, 0))
    torch._dynamo.reset()
    counters.clear()
    inputs = _auto_inputs()
    got = torch.compile(sdpa_decoder_mask, backend="cupyflash", options={"inner": "aot_eager"})(*inputs)
    assert counters["cupyflash"]["attention_fused"] == 1
    torch.testing.assert_close(got.float(), sdpa_decoder_mask(*inputs).float(), atol=2e-2, rtol=2e-2)


def test_default_on_transformers_decoders(monkeypatch):
    """transformers' Llama written for SDPA (head dim 64, T 512, right padding): both calls routed by default, their
    mask proven causal + key padding; Mistral's sliding layers stay SDPA's (a window beside the key mask)."""
    transformers = pytest.importorskip("transformers")
    from models.transformers_zoo import padding_mask

    monkeypatch.setattr(sdpa_rule, "_capability", lambda device: (9, 0))
    ids = torch.randint(4, 96, (2, 512), generator=torch.Generator().manual_seed(seed_from("auto")))
    mask = padding_mask("right", length=512)
    for config, fields, want in (("LlamaConfig", {}, (True, "causal + key padding")),
                                 ("MistralConfig", {"sliding_window": 128}, (False, None))):
        torch.manual_seed(seed_from(config))
        made = getattr(transformers, config)(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                             max_position_embeddings=512, pad_token_id=0, **fields,
                                             attn_implementation="sdpa")
        model = transformers.AutoModel.from_config(made).to(torch.bfloat16).eval()
        torch._dynamo.reset()
        sites = compile_backend.explain(lambda i, m: model(input_ids=i, attention_mask=m), ids, mask).sites
        assert [(s.fused, s.mask_form) for s in sites] == [want] * 2, "\n".join(map(str, sites))
        assert want[0] or all("sliding window" in s.reason for s in sites)


LOOKALIKES = {
    "is_causal with Nq != Nk": (sdpa_causal, lambda: _qkv(n_q=4, n_k=9), "top-left aligned"),
    "active dropout": (sdpa_dropout, lambda: _qkv(), "active dropout (dropout_p=0.1)"),
    "a .view() reads SDPA's seq-first output layout": (sdpa_seq_first_then_view, lambda: (torch.randn(9, 2, 4, 16),),
                                                       "needs the layout of SDPA's output"),
}

# SDPA's output in (B, N, H, D) memory, which the code after it reads through .view(): the op returns that layout
# (token_major_out), so these calls are routed.
SDPA_LAYOUT_READERS = {
    "a .view() reads SDPA's output layout": sdpa_then_view,
    "a .view_as() reads SDPA's output layout": sdpa_then_view_as,
    "a .view() after movedim and slicing": sdpa_then_movedim_view,
    "a .view() after a pointwise op": sdpa_then_scaled_view,
}


@pytest.mark.parametrize("case", SDPA_LAYOUT_READERS)
def test_routed_with_sdpa_output_layout(case):
    fn = SDPA_LAYOUT_READERS[case]
    graphs = run_and_compare(fn, torch.randn(2, 9, 4, 16), options=ROUTE, expect=1)
    assert [n.kwargs["token_major_out"] for gm in graphs for n in gm.graph.nodes if n.target is OP] == [True]
    (site,) = compile_backend.explain(fn, torch.randn(2, 9, 4, 16), options={"sdpa": "route"}).sites
    assert site.fused and site.token_major_out


@pytest.mark.parametrize("case", LOOKALIKES)
def test_lookalikes_left_alone(case):
    fn, make, reason = LOOKALIKES[case]
    if fn is not sdpa_dropout:  # the dropout draws differ between two calls
        run_and_compare(fn, *make(), options=ROUTE, expect=0)
    report = compile_backend.explain(fn, *make(), options={"sdpa": "route"})
    (site,) = report.sites
    assert not site.fused and reason in site.reason, str(report)


def test_bad_sdpa_option_is_named():
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"options\['sdpa'\] is 'always'"):
        torch.compile(sdpa_causal, backend="cupyflash", options={"sdpa": "always"})(*_qkv())
    with pytest.raises(ValueError, match="explain takes only 'sdpa'"):
        compile_backend.explain(sdpa_causal, *_qkv(), options={"inner": "eager"})


# ---- real transformers models, attn_implementation="sdpa" ------------------------------------------------------

def _sdpa_model(config: str, model: str, **fields):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed_from(config))
    made = getattr(transformers, config)(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                         **fields, attn_implementation="sdpa")
    return getattr(transformers, model)(made).eval()


def _proven_key_masks(graphs, n_q: int) -> None:
    """Each routed call takes a (B or 1, 1, 1, Nk) key mask or none, and no (.., Nq, Nk) boolean mask is left in
    the graphs: the dense mask's construction died with the calls that read it."""
    ops = [n for gm in graphs for n in gm.graph.nodes if n.target is OP]
    assert ops and all(n.args[3] is None or tuple(sp.meta(n.args[3]).shape[1:3]) == (1, 1) for n in ops)
    dense = [n.name for gm in graphs for n in gm.graph.nodes if isinstance(sp.meta(n), torch.Tensor)
             and sp.meta(n).dtype == torch.bool and sp.meta(n).dim() >= 2 and sp.meta(n).shape[-2] == n_q]
    assert not dense, dense


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("family,form", [("llama", "causal + key padding"),
                                         ("mistral", "causal + window + key padding")])
def test_decoder_sdpa_routed_with_its_mask_proven(family, form, padding):
    """transformers' SDPA mask (causal ∧ padding, with Mistral's sliding window) followed back to how it was built:
    the op gets the causal flag, the window and a key mask; outputs and gradients equal SDPA's."""
    from models.transformers_zoo import specs

    config, model_cls, fields = {"llama": ("LlamaConfig", "LlamaModel", {}),
                                 "mistral": ("MistralConfig", "MistralModel", {"sliding_window": 4})}[family]
    model = _sdpa_model(config, model_cls, num_key_value_heads=2, **fields)
    inputs = specs()[family].inputs(torch.Generator().manual_seed(seed_from(family, padding)), padding)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask)

    graphs = run_and_compare(forward, inputs["input_ids"], inputs["attention_mask"], options=ROUTE, expect=2,
                             params=list(model.parameters()))
    _proven_key_masks(graphs, inputs["input_ids"].shape[1])
    report = compile_backend.explain(forward, inputs["input_ids"], inputs["attention_mask"], options={"sdpa": "route"})
    assert [(s.fused, s.mask_form) for s in report.sites] == [(True, form)] * 2, str(report)
    assert all("mask proven" in s.notes for s in report.sites)


def test_bert_sdpa_routed():
    from models.transformers_zoo import padding_mask

    model = _sdpa_model("BertConfig", "BertModel")
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(seed_from("bert")))
    mask = padding_mask("right")

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask)

    graphs = run_and_compare(forward, ids, mask, options=ROUTE, expect=2, params=list(model.parameters()))
    _proven_key_masks(graphs, ids.shape[1])
    report = compile_backend.explain(forward, ids, mask, options={"sdpa": "route"})
    assert [(s.fused, s.mask_form) for s in report.sites] == [(True, "key padding")] * 2, str(report)
    assert all(ROUTED_NOTE in s.notes and "mask proven" in s.notes for s in report.sites)


# ---- benchmarks/sdpa_routing.py (GPU only; its CLI and its rule are checked here) ------------------------------

def _routing_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sdpa_routing.py"
    spec = importlib.util.spec_from_file_location("sdpa_routing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_routing_benchmark_rule_and_cli(capsys):
    script = _routing_script()
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--seqlens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.parse_args(["--features", "alibi"])
    if not torch.cuda.is_available():
        assert script.main(["--quick"]) == 2
    rows = [script.Row(128, n, "key padding", "fwd", "efficient", 1.0, ours, 0.0) for n, ours in ((1024, 0.7),
                                                                                                   (8192, 0.9))]
    rows += [script.Row(128, n, "none", "fwd", "flash", 1.0, ours, 0.0) for n, ours in ((1024, 0.9), (8192, 1.2))]
    rule = "\n".join(script.suggested_rule(rows, margin=0.05))
    assert "| key padding | 128 | fwd | 0.70-0.90 | route |" in rule
    assert "| none | 128 | fwd | 0.90-1.20 | keep |" in rule


# How each family's SDPA calls reach the op, routed with their masks proven (a multiset over the model's calls).
_CAUSAL_PAD, _WINDOW_PAD = "causal + key padding", "causal + window + key padding"
SDPA_FORMS = {
    "qwen2": {_CAUSAL_PAD: 2}, "qwen3": {_CAUSAL_PAD: 2}, "phi3": {_CAUSAL_PAD: 2}, "mixtral": {_CAUSAL_PAD: 2},
    "deepseek_v3": {_CAUSAL_PAD: 2}, "modernbert": {"key padding": 1, "window + key padding": 1},
    "gpt2": {_CAUSAL_PAD: 2}, "gpt_neox": {_CAUSAL_PAD: 2}, "opt": {_CAUSAL_PAD: 2},
    "gemma2": {_CAUSAL_PAD: 1, _WINDOW_PAD: 1}, "gemma3": {_CAUSAL_PAD: 1, _WINDOW_PAD: 1},
    "whisper": {"none": 4, _CAUSAL_PAD: 2}, "clip": {_CAUSAL_PAD: 2, "none": 2},
    # T5 adds its mask to the learned position bias: a float mask, passed as it is
    "t5": {"dense bias": 6},
}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", sorted(SDPA_FORMS))
def test_transformers_sdpa_families_routed(name, padding):
    """The zoo's families switched to attn_implementation="sdpa": every call routed, its mask proven where it is a
    boolean one; outputs and every parameter gradient equal to SDPA's (fp32, CPU)."""
    from collections import Counter

    from models.transformers_zoo import specs

    spec = specs()[name]
    model = spec.build()
    model.set_attn_implementation("sdpa")
    inputs = spec.inputs(torch.Generator().manual_seed(seed_from(name, padding)), padding)
    torch._dynamo.reset()
    report = compile_backend.explain(model, **inputs, options={"sdpa": "route"})
    assert len(report.fused) == len(report.sites) == spec.sites, str(report)
    assert Counter(s.mask_form for s in report.fused) == Counter(SDPA_FORMS[name]), str(report)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="cupyflash", options={"sdpa": "route", "inner": "eager"})
    results = []
    for run, module in ((model, model), (compiled, twin)):
        out = run(**inputs)
        value = next(v for v in out.values() if isinstance(v, torch.Tensor))  # logits, CLIP's logits_per_image
        value.backward(torch.randn(value.shape, generator=torch.Generator().manual_seed(1)))
        results.append((value.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert got_grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, atol=ATOL * 10, rtol=RTOL * 10, msg=key)
