"""Routing ``F.scaled_dot_product_attention`` calls to ``torch.ops.cupyflash.flash_attn_fwd`` (option ``sdpa``).

Code that already calls SDPA (transformers' ``attn_implementation="sdpa"``, timm, nanoGPT's flash path) has no
softmax for the matcher to find. "route" takes every call the op computes exactly; "auto", the default, only those
that compile_backend/sdpa_rule.py finds faster on the op (a boolean mask proven to be causal and key padding, on
Hopper); "keep" none. A call is routed only where the op computes exactly what SDPA's reference (math) semantics
say; anything else is left alone with the reason:

- ``attn_mask``: a boolean mask (True = keep) or an additive float tensor, both as the op reads ``attn_bias``. A row
  whose every key is masked gives 0 and zero gradients in both (SDPA's math/CPU path since torch 2.5, the op always).
  A boolean mask is followed back to how it was built (compile_backend/masks.py, as the matcher's masks): proven a
  causal band, a window and per-key terms (transformers' causal and padding masks), the op gets its flags and the
  key terms as a (B, 1, 1, Nk) key mask, which the plain Hopper kernels read as such, and the dense mask's
  construction dies where nothing else reads it; else the mask goes to the op as it is.
- ``is_causal``: SDPA's causal triangle is aligned to the top-left corner, the op's to the bottom-right; they are
  the same mask only when Nq == Nk, which must be proven from the (possibly symbolic) shapes.
- ``scale``: a constant, or None for 1/sqrt(E) with E = q's head dim (a static size).
- ``dropout_p``: only a constant 0 (the op's Philox stream is not torch's, so active dropout would draw other masks).
- ``enable_gqa``: the op takes fewer K/V heads when they divide q's; without it the heads must be equal.
- whatever the op refuses (``why_unsupported`` on the fake values).
- what follows the call runs on the op's contiguous output (replayed on fake values where SDPA's output is not
  contiguous: a ``.view()`` may need SDPA's layout).
"""
from __future__ import annotations

import logging
import math
import operator
from typing import Any, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from cupyflash.array_ops import token_major_strides
from cupyflash.torch_op import why_unsupported
from cupyflash.validate import default_scale

from . import spellings as sp
from .masks import MaskAnalysis, StructureAnalysis, Unproven
from .matcher import Skip, band_flags, where
from .report import SiteRecord
from .rewrite import Emitter, erase_dead, key_mask, run_fake
from .sdpa_rule import why_keep

log = logging.getLogger("cupyflash.compile")

_OP = torch.ops.cupyflash.flash_attn_fwd.default
SDPA = torch.nn.functional.scaled_dot_product_attention  # the builtin torch._C._nn.scaled_dot_product_attention
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
ROUTED_NOTE = "routed from SDPA"
MODES = ("auto", "route", "keep")  # the first is the default


def _arguments(node: fx.Node) -> dict[str, Any]:
    bound = {**_DEFAULTS, **dict(zip(_PARAMS, node.args)), **node.kwargs}
    unknown = set(bound) - set(_PARAMS)
    if unknown:
        raise Skip(f"SDPA called with unknown argument(s) {sorted(unknown)}")
    return bound


def _constant(args: dict, name: str, kinds: tuple) -> Any:
    value = args[name]
    if isinstance(value, fx.Node) or not isinstance(value, kinds):
        raise Skip(f"SDPA's {name} is known only at run time ({value}); the op needs a constant")
    return value


def _scale(args: dict, q: torch.Tensor) -> float:
    scale = args["scale"]
    if scale is None:
        head_dim = q.shape[-1]
        if not isinstance(head_dim, int):
            raise Skip("SDPA's default scale 1/sqrt(E) with a dynamic head dim E")
        return default_scale(head_dim)
    scale = float(_constant(args, "scale", (int, float)))
    if not math.isfinite(scale):
        raise Skip(f"scale {scale} is not finite")
    return scale


def _causal(args: dict, q: torch.Tensor, k: torch.Tensor) -> bool:
    if not _constant(args, "is_causal", (bool,)):
        return False
    if args["attn_mask"] is not None:
        raise Skip("is_causal=True beside an attn_mask (SDPA refuses the pair)")
    if not statically_known_true(q.shape[-2] == k.shape[-2]):
        raise Skip(f"is_causal=True with Nq={q.shape[-2]}, Nk={k.shape[-2]} not proven equal: SDPA's causal mask is "
                   f"top-left aligned, the op's bottom-right; they agree only when Nq == Nk")
    return True


def _check_features(args: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    dropout_p = _constant(args, "dropout_p", (int, float))
    if dropout_p != 0:
        raise Skip(f"active dropout (dropout_p={dropout_p}): the op's dropout stream is not torch's")
    if (not _constant(args, "enable_gqa", (bool,)) and q.dim() == 4 and k.dim() == 4
            and not statically_known_true(q.shape[1] == k.shape[1])):
        raise Skip(f"k has {k.shape[1]} heads against q's {q.shape[1]} without enable_gqa (SDPA broadcasts them)")


def _layout_failure(node: fx.Node, want: torch.Tensor) -> Optional[str]:
    """Replays, on fake values, the ops after SDPA's output with the op's contiguous output in its place, as far as
    their strides differ from eager's (a transpose, movedim, clone or pointwise op passes SDPA's layout on); why
    the first that fails fails (a .view() that needs SDPA's layout), or None."""
    with want.fake_mode:
        replaced = {node: torch.empty(want.shape, dtype=want.dtype, device=want.device)}
    nodes = list(node.graph.nodes)
    for user in nodes[nodes.index(node) + 1:]:
        if user.op == "output" or not any(n in replaced for n in user.all_input_nodes):
            continue
        if user.op not in ("call_function", "call_method"):
            return f"{user.name} ({user.op}) takes it"
        name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__") and user.args[0] not in replaced:
            continue  # writes into another tensor (copy_, ...): not replayed, which would change its recorded value
        fargs, fkwargs = fx.node.map_arg((user.args, user.kwargs), lambda n: replaced.get(n, sp.meta(n)))
        try:
            value = run_fake(user.op, user.target, fargs, fkwargs)
        except Exception as err:  # what eager did not raise; whatever it is, the call stays SDPA's
            return f"{sp.describe(user)} ({user.name}) fails on it: {(str(err).splitlines() or [''])[0]}"
        if not _same_strides(value, sp.meta(user)):
            replaced[user] = value
    return None


def _same_strides(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(statically_known_true(x == y) for x, y in zip(a.stride(), b.stride())))


def _mask_form(causal: bool, window: tuple, mask: Optional[torch.Tensor]) -> str:
    parts = (["causal"] if causal else []) + (["window"] if window != (-1, -1) else [])
    if mask is not None:
        key_padding = (mask.dtype == torch.bool and mask.dim() == 4
                       and all(statically_known_true(d == 1) for d in mask.shape[1:3]))
        parts.append("key padding" if key_padding else "dense bias")
    return " + ".join(parts) or "none"


def _proven_mask(emit: Emitter, masks: MaskAnalysis, mask: fx.Node, q: torch.Tensor, k: torch.Tensor):
    """A boolean attn_mask (True = keep) as (causal, window, key mask node or None), proven equal to the op's band
    and the conjunction of its per-key terms; or the reason it is not (a str)."""
    nq, nk, frame = q.shape[-2], k.shape[-2], tuple(q.shape[:-2])
    try:
        keep = StructureAnalysis(masks, nq, nk, frame).keep(mask)
        causal, window = band_flags(keep, nq, nk)
    except Unproven as err:
        return str(err)
    return causal, window, key_mask(emit, [(term, frame) for term in keep.keys], frame)


def route(gm: fx.GraphModule, node: fx.Node, masks: Optional[MaskAnalysis] = None, auto: bool = False) -> dict:
    """Replace one SDPA call by the op; returns the report's details or raises Skip (graph left as it was).
    `masks`: the graph's MaskAnalysis, to prove a boolean mask's structure (None: masks go as they are); `auto`:
    only where sdpa_rule finds the op faster."""
    args = _arguments(node)
    q, k, v = (sp.meta(args[name]) for name in ("query", "key", "value"))
    scale = _scale(args, q)
    causal = _causal(args, q, k)
    _check_features(args, q, k, v)
    want = sp.meta(node)
    # The op returns SDPA's (B, N, H, D) memory (its flash and cuDNN backends') where asked, else contiguous.
    token_major = want.dim() == 4 and all(statically_known_true(x == y)
                                          for x, y in zip(want.stride(), token_major_strides(want.shape)))
    failure = None if token_major or statically_known_true(want.is_contiguous()) else _layout_failure(node, want)
    if failure is not None:
        raise Skip(f"the code after it needs the layout of SDPA's output (strides {tuple(want.stride())}), not the "
                   f"op's contiguous one: {failure}")
    emit = Emitter(gm.graph, node)
    notes, dense, window = [ROUTED_NOTE], None, (-1, -1)
    try:
        mask = args["attn_mask"]
        if masks is not None and mask is not None and sp.meta(mask).dtype == torch.bool and q.dim() == 4:
            proven = _proven_mask(emit, masks, mask, q, k)
            if isinstance(proven, str):
                notes.append(f"mask passed dense: {proven}")
            else:
                dense, (causal, window, mask) = mask, proven
                notes.append("mask proven")
        while mask is not None and sp.meta(mask).dim() < 4:  # SDPA broadcasts a 2-D/3-D mask; the op takes 4-D
            mask = emit.method("unsqueeze", mask, 0)
        fmask = None if mask is None else sp.meta(mask)
        reason = why_unsupported(q, k, v, fmask) or (why_keep(q, window, dense is not None) if auto else None)
        if reason is not None:
            raise Skip(reason)
        res = emit("call_function", _OP, args["query"], args["key"], args["value"], mask, scale, causal,
                   window_left=window[0], window_right=window[1], token_major_out=token_major)
        out = emit("call_function", operator.getitem, res, 0)
    except Skip:
        emit.discard()
        raise
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    if dense is not None:
        erase_dead(gm.graph, [dense])
    return {"scale": scale, "causal": causal, "has_bias": mask is not None, "softcap": 0.0, "window": window,
            "mask_form": _mask_form(causal, window, fmask), "token_major_out": token_major, "notes": tuple(notes)}


def route_sdpa(gm: fx.GraphModule, graph_index: int = 0, example_inputs=(), mode: str = "route") -> list[SiteRecord]:
    """Route the SDPA calls of a Dynamo graph that `mode` takes (MODES; "keep": none, no records); one record per
    call. `example_inputs`: the graph's, whose module buffers (a tril buffer) may prove a mask."""
    if mode == "keep":
        return []
    records, masks = [], MaskAnalysis(gm, example_inputs)
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]:
        name, loc = node.name, where(node)
        try:
            details = route(gm, node, masks, auto=mode == "auto")
        except Skip as err:
            records.append(SiteRecord(graph_index, name, loc, False, reason=f"SDPA call: {err}"))
            log.info("cupyflash: left SDPA at %s alone: %s", loc, err)
            continue
        records.append(SiteRecord(graph_index, name, loc, True, **details))
        log.info("cupyflash: routed SDPA at %s (%s)", loc, details)
    if any(r.fused for r in records):
        gm.graph.lint()
        gm.recompile()
    return records
