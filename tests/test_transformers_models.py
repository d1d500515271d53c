"""The backend on real ``transformers`` model code (tiny random configs, eager attention, CPU, fp32).

For every family of issue 14: every attention layer is one fused site (``explain`` and the fused counter agree);
the compiled model's outputs and every parameter's gradient are within the tolerance rule against the same model
in fp64 (eager fp32 being "the same-dtype PyTorch math"), with no padding, right padding and left padding (one
compiled graph serves all three); ``generate()`` with the KV cache picks eager's tokens, its step logits within
the rule too. How each site reaches the op (causal / window / key padding / dense bias) is checked against
EXPECTED_FORM.
"""
from __future__ import annotations

import copy
import os
from collections import Counter

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers loads: nothing here may reach the hub

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("transformers")

import compile_backend
from models.transformers_zoo import PADDINGS, fp32_mask_fill, specs, upcast_qk_specs
from reference import GRAD_FACTOR, OUT_FACTOR, assert_within_rule, rounding_floor, seed_from

SPECS = specs()
# The op's exact CPU path is what runs here; "eager" as inner compiler keeps compile time low (the rewrite and
# the op's autograd are the same as under aot_eager or Inductor).
OPTIONS = {"inner": "eager"}
NEW_TOKENS = 4

# Sites the backend leaves alone today, by family: the reasons explain() must give (none at the moment in fp32).
EXPECTED_SKIPS: dict[str, list[str]] = {}

# How each site should reach the op once the mask graph is proven (issue 14, item 1): a multiset of forms over
# the model's sites. A form joins its parts with "+": causal, window (sliding), key_padding (per-batch valid keys
# from attention_mask), bias (a dense additive tensor that is not a mask); "none" is no mask at all.
_CAUSAL_PAD = "causal+key_padding"
_WINDOW_PAD = "causal+window+key_padding"
EXPECTED_FORM: dict[str, Counter] = {
    "llama": Counter({_CAUSAL_PAD: 2}),
    "mistral": Counter({_WINDOW_PAD: 2}),
    "qwen2": Counter({_CAUSAL_PAD: 2}),
    "qwen3": Counter({_CAUSAL_PAD: 2}),
    # Soft-cap beside padding stays dense: on rows that see no key, eager's gradient goes through tanh' of every
    # score, which the op's uniform rows (cupyflash/unseen_rows.py) have no small exact form for.
    "gemma2": Counter({"bias": 2}),
    "gemma3": Counter({_WINDOW_PAD: 1, _CAUSAL_PAD: 1}),
    "phi3": Counter({_CAUSAL_PAD: 2}),
    "gpt2": Counter({_CAUSAL_PAD: 2}),
    "gptj": Counter({_CAUSAL_PAD: 2}),
    "gpt_neox": Counter({_CAUSAL_PAD: 2}),
    "opt": Counter({_CAUSAL_PAD: 2}),
    "falcon": Counter({_CAUSAL_PAD: 2}),
    "mixtral": Counter({_CAUSAL_PAD: 2}),
    "deepseek_v3": Counter({_CAUSAL_PAD: 2}),
    "gpt_oss": Counter({_WINDOW_PAD: 1, _CAUSAL_PAD: 1}),  # with sinks: out · σ(lse - sink)
    "bert": Counter({"key_padding": 2}),
    "modernbert": Counter({"key_padding": 1, "window+key_padding": 1}),
    # T5 adds its mask to the learned relative-position bias before the scores see either, so every site (encoder
    # self, decoder self, cross) is one dense bias: a key mask beside another bias is not split out.
    "t5": Counter({"bias": 6}),
    # Whisper's encoder and cross-attention take no mask; the decoder's self-attention its tokens' padding.
    "whisper": Counter({"none": 4, _CAUSAL_PAD: 2}),
    "vit": Counter({"none": 2}),
    "clip": Counter({_CAUSAL_PAD: 2, "none": 2}),  # text tower, vision tower
}


def _form(record) -> str | None:
    """The site's mask form as "+"-joined parts in a fixed order, from ``SiteRecord.mask_form`` (a string or a
    collection of parts) where the backend gives one."""
    parts = [p.strip().replace(" ", "_") for p in record.mask_form.split("+")]
    return "+".join(sorted("bias" if p == "dense_bias" else p for p in parts))


def _canonical(forms: Counter) -> Counter:
    return Counter({"+".join(sorted(form.split("+"))): n for form, n in forms.items()})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add synchronisation, and on a shared 2-core machine their spinning
    makes every op ~100x slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Family:
    """One family's fp32 model; its fp64 copy, its compiled twin and its explain() report are made on first use
    and kept, so all the family's checks share one compile."""

    def __init__(self, name: str):
        self.name, self.spec = name, SPECS[name]
        # Dynamo compiles nn.Module.__call__, one code object for every model: without a reset, families would
        # share its recompile limit (8) and its record of which dims changed (dynamic shapes).
        torch._dynamo.reset()
        torch.manual_seed(seed_from(name))
        self.model = self.spec.build()
        self._report = self._compiled = self._fp64 = None

    def inputs(self, padding: str, purpose: str = "forward") -> dict:
        return self.spec.inputs(torch.Generator().manual_seed(seed_from(self.name, padding, purpose)), padding)

    @property
    def report(self) -> compile_backend.Report:
        if self._report is None:
            self._report = compile_backend.explain(copy.deepcopy(self.model), **self.inputs("right"))
        return self._report

    @property
    def fp64(self) -> torch.nn.Module:
        if self._fp64 is None:
            self._fp64 = copy.deepcopy(self.model).double()
        return self._fp64

    def compiled(self) -> torch.nn.Module:
        """The compiled twin, called once (no padding) so its graph exists; every padding reuses that graph."""
        if self._compiled is None:
            before = counters["cupyflash"]["attention_fused"]
            self._compiled = torch.compile(copy.deepcopy(self.model), backend="cupyflash", options=OPTIONS)
            self._compiled(**self.inputs("none"))
            fused = counters["cupyflash"]["attention_fused"] - before
            assert fused == self.spec.sites, (f"{self.name}: {fused} sites fused, the model has "
                                              f"{self.spec.sites} attention layers; {self.report}")
        return self._compiled

    def run_compiled(self, run):
        """``run(compiled twin)``, asserting it reused the graph compiled for no padding (a recompile would fuse
        the sites again and bump the counter)."""
        compiled = self.compiled()
        before = counters["cupyflash"]["attention_fused"]
        result = run(compiled)
        assert counters["cupyflash"]["attention_fused"] == before, f"{self.name}: the inputs recompiled the model"
        return result


def _tensors(output) -> dict[str, torch.Tensor]:
    """The model output's top-level tensors (logits, hidden states, embeddings), by name."""
    return {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}


def _to_fp64(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def _run(model, inputs, cotangents=None):
    """Outputs, and with ``cotangents`` the parameters' gradients of sum(output · cotangent)."""
    model.zero_grad(set_to_none=True)
    outs = _tensors(model(**inputs))
    grads = {}
    if cotangents is not None:
        loss = sum((outs[k] * cotangents[k].to(outs[k].dtype)).sum() for k in outs)
        loss.backward()
        module = getattr(model, "_orig_mod", model)  # under torch.compile, the user's module
        grads = {n: p.grad for n, p in module.named_parameters()}
    return outs, grads


def _zero_at_padding(cotangents: dict, inputs: dict) -> dict:
    """Cotangents zeroed at padded positions: for every per-token output (B, N, ...), the padding mask of the
    inputs that is (B, N)."""
    masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
    out = {}
    for key, cot in cotangents.items():
        mask = next((m for m in masks if cot.shape[:2] == m.shape), None)
        out[key] = cot if mask is None else cot * mask.reshape(*mask.shape, *([1] * (cot.dim() - 2)))
    return out


def _run_fp64(family: Family, inputs: dict, cotangents=None):
    with fp32_mask_fill():
        outs, grads = _run(family.fp64, _to_fp64(inputs), cotangents)
    assert all(torch.isfinite(t).all() for t in outs.values()), f"{family.name}: fp64 eager is not finite"
    return outs, grads


def _assert_all_within_rule(ours: dict, ref: dict, same_dtype: dict, factor: float, what: str):
    assert ours.keys() == ref.keys(), (sorted(ours), sorted(ref))
    for key, r in ref.items():
        if r is None:
            assert ours[key] is None, f"{what} {key}: ours is not None, eager's is"
            continue
        assert_within_rule(ours[key], r, same_dtype[key], factor, rounding_floor(r, torch.float32), f"{what} {key}")


def _check_gradients(family: Family, padding: str, real_tokens_only: bool):
    """Every parameter's gradient of sum(outputs · random cotangents) within the rule."""
    inputs = family.inputs(padding)
    gen = torch.Generator().manual_seed(seed_from(family.name, padding, "cotangent"))
    cotangents = {k: torch.randn(v.shape, generator=gen) for k, v in _run(family.model, inputs)[0].items()}
    if real_tokens_only:
        cotangents = _zero_at_padding(cotangents, inputs)
    _, fp64 = _run_fp64(family, inputs, cotangents)
    _, fp32 = _run(family.model, inputs, cotangents)
    _, ours = family.run_compiled(lambda compiled: _run(compiled, inputs, cotangents))
    _assert_all_within_rule(ours, fp64, fp32, GRAD_FACTOR, f"{family.name} {padding}: d")


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


class FamilyChecks:
    """The checks of one family (``name``); a subclass per family below, so pytest runs a family's checks
    together and compiles it once."""

    name: str

    @pytest.fixture(scope="class")
    def family(self) -> Family:
        return Family(self.name)

    def test_every_attention_layer_is_one_fused_site(self, family):
        report = family.report
        assert len(report.sites) == family.spec.sites, str(report)
        assert [s.reason for s in report.skipped] == EXPECTED_SKIPS.get(family.name, []), str(report)
        family.compiled()  # the counter of a real compile agrees (asserted there)

    def test_site_mask_forms(self, family):
        forms = Counter(_form(s) for s in family.report.fused)
        assert forms == _canonical(EXPECTED_FORM[family.name]), str(family.report)

    def test_outputs_within_rule(self, family, padding):
        inputs = family.inputs(padding)
        fp64, _ = _run_fp64(family, inputs)
        fp32, _ = _run(family.model, inputs)
        # With grad enabled, as the twin was compiled: grad mode is part of Dynamo's guards.
        ours, _ = family.run_compiled(lambda compiled: _run(compiled, inputs))
        _assert_all_within_rule(ours, fp64, fp32, OUT_FACTOR, f"{family.name} {padding}:")

    def test_parameter_gradients_within_rule(self, family, padding):
        _check_gradients(family, padding, real_tokens_only=False)

    def test_real_token_gradients_within_rule(self, family, padding):
        """The loss of real tokens only, as training masks padding out of it: no gradient reaches the rows that
        see no key, so this checks the real tokens apart from the uniform rows' gradients."""
        _check_gradients(family, padding, real_tokens_only=True)

    def test_generate_with_kv_cache(self, family):
        """Greedy generation from left-padded prompts (row 1; Whisper's audio has no padding mask): the prefill,
        then steps of one query against the cache. The compiled model picks eager's tokens and its logits at
        every step are within the rule."""
        inputs = {k: v for k, v in family.inputs("left", "generate").items() if not k.startswith("decoder_")}
        fused, graphs = counters["cupyflash"]["attention_fused"], counters["stats"]["unique_graphs"]
        twin = copy.deepcopy(family.model)
        twin.compile(backend="cupyflash", options=OPTIONS)
        with fp32_mask_fill():
            fp64 = _generate(family.fp64, _to_fp64(inputs))
        fp32 = _generate(family.model, inputs)
        ours = _generate(twin, inputs)
        assert torch.equal(ours.sequences, fp32.sequences), (ours.sequences, fp32.sequences)
        assert torch.equal(fp64.sequences, fp32.sequences), "fp64 picks other tokens: its logits compare to nothing"
        _assert_all_within_rule(dict(enumerate(ours.scores)), dict(enumerate(fp64.scores)),
                                dict(enumerate(fp32.scores)), OUT_FACTOR, f"{family.name}: step")
        # The prefill and at least one graph of one-query steps were compiled, each with all its sites fused.
        fused = counters["cupyflash"]["attention_fused"] - fused
        graphs = counters["stats"]["unique_graphs"] - graphs
        assert graphs >= 2 and fused == graphs * family.spec.step_sites, f"{fused} sites fused in {graphs} graphs"


def pytest_generate_tests(metafunc):
    if "padding" not in metafunc.fixturenames:
        return
    spec = SPECS[metafunc.cls.name]
    paddings = PADDINGS if spec.padding else ("none",)
    if metafunc.function.__name__ == "test_real_token_gradients_within_rule":
        paddings = tuple(p for p in paddings if p != "none")  # without padding it is the test above
    metafunc.parametrize("padding", paddings)


for _name, _spec in SPECS.items():
    _checks = {"name": _name}
    if not _spec.generates:
        _checks["test_generate_with_kv_cache"] = None  # an encoder: nothing to generate
    if not _spec.padding:
        _checks["test_real_token_gradients_within_rule"] = None  # no padding: every token is real
    globals()[f"Test_{_name}"] = type(f"Test_{_name}", (FamilyChecks,), _checks)


@pytest.mark.parametrize("name", list(upcast_qk_specs()))
def test_bf16_sites_that_upcast_q_and_k_are_fused(name):
    """In bf16 these models cast q and k to fp32 and keep v in bf16 (issue 14, item 4): the casts are exact, so the
    sites run on the 16-bit tensors, proven causal with key padding. Their numbers against eager (left padding,
    the tolerance rule): tests/test_compile_backend_masks.py."""
    torch._dynamo.reset()
    spec = upcast_qk_specs()[name]
    torch.manual_seed(seed_from(name))
    model = spec.build().to(torch.bfloat16)
    report = compile_backend.explain(model, **spec.inputs(torch.Generator().manual_seed(seed_from(name)), "right"))
    assert len(report.fused) == len(report.sites) == spec.sites, str(report)
    assert {s.mask_form for s in report.fused} == {"causal + key padding"}, str(report)
