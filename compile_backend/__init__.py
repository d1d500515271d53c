"""``torch.compile(model, backend="cupyflash")``: fuse naive softmax attention into the cupyflash op.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so no import is needed.
The backend rewrites each Dynamo FX graph (``matcher`` finds sites by meaning, ``rewrite`` swaps in
``torch.ops.cupyflash.flash_attn_fwd``) and hands the graph to an inner compiler:

    torch.compile(model, backend="cupyflash")                                  # Inductor
    torch.compile(model, backend="cupyflash", mode="reduce-overhead")          # Inductor + CUDA graphs
    torch.compile(model, backend="cupyflash", options={"inner": "aot_eager"})  # or "eager"
    torch.compile(model, backend="cupyflash", options={"mode": "max-autotune", "inner": "inductor",
                                                       "epilogue_fusion": False})

torch.compile passes ``mode`` only when it is not "default" and ``options`` only when non-empty, and it
refuses both together; so ``options`` may also carry ``"mode"``. ``F.scaled_dot_product_attention`` calls go to the
op where a same-run benchmark found it faster (``options={"sdpa": "auto"}``, the default: a boolean mask proven to be
causal and key padding, on Hopper; ``sdpa_rule``), or wherever it computes the same (``"route"``), or stay SDPA's
(``"keep"``). Other option keys are Inductor config settings, as for ``backend="inductor"``.

Every fused site of a graph that compiled bumps ``torch._dynamo.utils.counters["cupyflash"]["attention_fused"]``;
every site is logged under ``cupyflash.compile``; ``explain(model, *args)`` returns a report of all sites.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

from .report import Report, SiteRecord
from .rewrite import rewrite_graph
from .sdpa_sites import MODES as SDPA_MODES, route_sdpa

__all__ = ["cupyflash_backend", "explain", "Report", "SiteRecord"]

INNER_COMPILERS = ("inductor", "aot_eager", "eager")

_graph_index = itertools.count()


def _inductor_patches(mode: Optional[str], options: dict[str, Any]) -> dict[str, Any]:
    from torch._inductor import config, list_mode_options

    patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    known = config.get_config_copy()
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"backend='cupyflash': unknown option {key!r}; options are 'inner' "
                             f"({', '.join(INNER_COMPILERS)}), 'mode', 'sdpa' ({', '.join(SDPA_MODES)}), or an "
                             f"Inductor config name")
        patches[name] = value
    return patches


def _sdpa_mode(options: dict[str, Any]) -> str:
    """Pops the "sdpa" option: one of SDPA_MODES, the first by default."""
    sdpa = options.pop("sdpa", SDPA_MODES[0])
    if sdpa not in SDPA_MODES:
        raise ValueError(f"backend='cupyflash': options['sdpa'] is {sdpa!r}; expected one of {SDPA_MODES}")
    return sdpa


def _rewrite(gm: torch.fx.GraphModule, example_inputs, graph_index: int, sdpa: str) -> list[SiteRecord]:
    records = rewrite_graph(gm, example_inputs, graph_index=graph_index)
    return records + route_sdpa(gm, graph_index, example_inputs, sdpa)


def cupyflash_backend(gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                      options: Optional[dict[str, Any]] = None):
    """The Dynamo backend: fuse attention sites, then compile with the inner compiler."""
    options = dict(options or {})
    sdpa = _sdpa_mode(options)
    inner = options.pop("inner", "inductor")
    mode = options.pop("mode", mode)
    if inner not in INNER_COMPILERS:
        raise ValueError(f"backend='cupyflash': options['inner'] is {inner!r}; expected one of {INNER_COMPILERS}")
    if inner != "inductor" and (options or (mode and mode != "default")):
        raise ValueError(f"backend='cupyflash': mode/options {sorted(options) or [mode]} apply to Inductor, "
                         f"not to inner={inner!r}")
    records = _rewrite(gm, example_inputs, next(_graph_index), sdpa)
    compiled = _inner_compile(gm, example_inputs, inner, mode, options)
    # Counted only once the inner compiler has returned: Dynamo runs a graph it rejects some other way, without
    # these sites fused (split at a graph break and traced again, or eagerly under suppress_errors). AOTAutograd
    # compiles the backward at the first backward call; a failure there raises to the caller, nothing runs unfused.
    counters["cupyflash"]["attention_fused"] += sum(r.fused for r in records)
    return compiled


def _inner_compile(gm: torch.fx.GraphModule, example_inputs, inner: str, mode: Optional[str],
                   options: dict[str, Any]):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=_inductor_patches(mode, options))


def explain(model, *args, options: Optional[dict[str, Any]] = None, **kwargs) -> Report:
    """Run ``model(*args, **kwargs)`` once through Dynamo and report every softmax-attention site:
    fused (with scale, causal, bias) or left alone (with the reason). Counters are not touched.
    ``options``: the backend's own rewrite options: ``{"sdpa": ...}`` as the backend takes it (SDPA calls are
    reported unless it is "keep")."""
    options = dict(options or {})
    sdpa = _sdpa_mode(options)
    if options:
        raise ValueError(f"explain: unknown option(s) {sorted(options)}; explain takes only 'sdpa'")
    report = Report()
    index = itertools.count()

    def recorder(gm, example_inputs):
        report.sites.extend(_rewrite(gm, example_inputs, next(index), sdpa))
        return gm.forward

    torch.compile(model, backend=recorder)(*args, **kwargs)
    return report
