"""Replacing matched sites in the FX graph with ``torch.ops.cupyflash.flash_attn_fwd``.

New nodes get fake values (``example_value``) as they are made, so the op's own check
(``why_unsupported``) runs on exactly the tensors it would receive, shapes symbolic or not; if it refuses,
the new nodes are removed again and the site stays as written. A mask proven a band and per-key terms becomes
the op's causal/window flags and a (B, 1, 1, Nk) boolean attn_bias, the op giving eager's uniform rows for rows
that may see no key (its ``unseen_rows``); the dense mask's construction is erased once nothing reads it.
Any other mask that eager fills with -inf or a large negative value becomes a boolean keep-mask, with eager's
rows: uniform by the op too, or NaN selected where the op's lse says the row saw no key (``rows.nan_rows``);
an added float bias gets eager's NaN rows the same way where it holds -inf at every key of a row.
"""
from __future__ import annotations

import logging
import math
import operator
from typing import Any, Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor

from cupyflash import unseen_rows as unseen
from cupyflash.torch_op import why_unsupported

from . import spellings as sp
from .masks import equal, node_of
from .matcher import Matcher, Site, Skip, where
from .report import SiteRecord
from .rows import lse_unseen, nan_rows

log = logging.getLogger("cupyflash.compile")

_OP = torch.ops.cupyflash.flash_attn_fwd.default


def run_fake(op: str, target: Any, fargs: tuple, fkwargs: dict) -> Any:
    """A call_function / call_method on fake values, in the mode they were recorded in (detect_fake_mode would
    prefer the backend's own, newer one)."""
    flat = torch.utils._pytree.tree_leaves((fargs, fkwargs))
    fake_mode = next(a.fake_mode for a in flat if isinstance(a, FakeTensor))
    with fake_mode:
        if op == "call_method":
            return getattr(fargs[0], target)(*fargs[1:], **fkwargs)
        return target(*fargs, **fkwargs)


class Emitter:
    """Makes nodes before ``anchor``, each with its fake value, and can take them all back."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.anchor = graph, anchor
        self.made: list[fx.Node] = []

    def __call__(self, op: str, target: Any, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, args, kwargs)
        self.made.append(node)
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        node.meta["example_value"] = run_fake(op, target, *fx.node.map_arg((args, kwargs), sp.meta))
        return node

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self("call_method", name, *args, **kwargs)

    def discard(self) -> None:
        for node in reversed(self.made):
            self.graph.erase_node(node)
        self.made.clear()


def _static_int(d: Any) -> Optional[int]:
    return d if isinstance(d, int) else None


def to_layout(emit: Emitter, t: fx.Node, src: tuple, dst: tuple, full: bool) -> fx.Node:
    """Move a (batch..., X, Y) tensor whose batch dims broadcast to ``src`` into batch dims ``dst``
    (same elements, regrouped), e.g. (B·H, N, D) -> (1, B·H, N, D) or (B, H, 1, Nk) -> (1, B·H, 1, Nk).
    ``full`` widens broadcast dims (the op needs q, k, v with equal batch and heads); a bias keeps them."""
    while sp.meta(t).dim() < len(src) + 2:
        t = emit.method("unsqueeze", t, 0)
    have = tuple(sp.meta(t).shape[:-2])
    same = len(src) == len(dst) and all(equal(a, b) for a, b in zip(src, dst))
    if not full and all(equal(d, 1) for d in have):
        while sp.meta(t).dim() < len(dst) + 2:
            t = emit.method("unsqueeze", t, 0)
        while sp.meta(t).dim() > len(dst) + 2:
            t = emit.method("squeeze", t, 0)
        return t
    if full or not same:
        widen = [-1 if equal(h, s) else s for h, s in zip(have, src)]
        if any(w != -1 for w in widen):
            if not all(isinstance(w, int) for w in widen):
                raise Skip("a broadcast batch/head dim of dynamic size")
            t = emit.method("expand", t, *widen, -1, -1)
    if same:
        return t
    if len(src) == 0:
        t = emit.method("unsqueeze", t, 0)
    elif len(src) > 1:
        t = emit.method("flatten", t, 0, len(src) - 1)
    if len(dst) == 0:
        return emit.method("squeeze", t, 0)
    if len(dst) >= 2:
        dynamic = [i for i, d in enumerate(dst) if _static_int(d) is None]
        if len(dynamic) > 1:
            raise Skip("regrouping batch dims where more than one of them is dynamic")
        sizes = tuple(-1 if i in dynamic else d for i, d in enumerate(dst))
        if not dynamic:
            sizes = (-1, *sizes[1:])
        t = emit.method("unflatten", t, 0, sizes)
    return t


def _op_frame(qk_frame: tuple) -> tuple:
    """The op's (B, H): the scores' own batch dims when there are two, (1, B·H) / (1, 1) for fewer, and the leading
    ones merged into B for more (Twins' and Hiera's (B, groups, heads))."""
    if len(qk_frame) > 2:
        return (math.prod(qk_frame[:-1]), qk_frame[-1])
    return qk_frame if len(qk_frame) == 2 else (1, qk_frame[0]) if len(qk_frame) == 1 else (1, 1)


def _operand(emit: Emitter, operand, src: tuple, dst: tuple) -> fx.Node:
    t = operand.node if operand.perm is None else emit.method("permute", operand.node, *operand.perm)
    # No copy: the op takes any strides but a contiguous last dim (it copies that case itself), and its
    # outputs are contiguous, as the matmul it replaces.
    return to_layout(emit, t, src, dst, full=True)


def _mask_node(emit: Emitter, mask, negate: bool) -> fx.Node:
    """`mask` (a node or ``Not`` of one) as a graph node, negated when `negate`; logical_not only where needed."""
    node, negated = node_of(mask)
    return emit("call_function", torch.logical_not, node) if negated != negate else node


def key_mask(emit: Emitter, terms, dst: tuple) -> Optional[fx.Node]:
    """Per-key terms ((term, its frame) pairs: a matcher site's, a proven SDPA mask's) as one boolean (B or 1, 1, 1,
    Nk) mask in frame `dst`, True = keep; None without terms."""
    keep = None
    for term, frame in terms:
        term = to_layout(emit, _mask_node(emit, term, negate=False), frame, dst, full=False)
        keep = term if keep is None else emit("call_function", torch.logical_and, keep, term)
    return keep


def _bias(emit: Emitter, site: Site, dst: tuple) -> tuple[Optional[fx.Node], float, float]:
    """Emit attn_bias from the kept mask/bias steps, in program order; returns (bias, final scale, softcap).
    A key mask comes alone (matcher: no other bias beside it), as the op's boolean attn_bias, which a positive
    scale leaves as it is."""
    bias, scale, softcap = None, site.scale, 0.0
    for step in site.steps:
        if step.kind == "scale":
            scale *= step.factor
            # h · cap · tanh(scale · x / cap) = (h · cap) · tanh((h · scale) · x / (h · cap)) for h > 0.
            softcap *= step.factor
            if bias is not None:
                bias = emit("call_function", torch.mul, bias, step.factor)
        elif step.kind == "softcap":  # the matcher lets no bias or mask before it
            softcap = step.value
        elif step.kind == "qscale":  # folded into q (_scaled_q)
            continue
        else:  # "add" (a fill is a band, a key mask or a keep-mask: matcher)
            b = to_layout(emit, step.tensor, step.frame, dst, full=False)
            if not sp.meta(b).is_floating_point():
                # Eager adds a boolean/integer tensor as numbers (True = 1); the op would read a boolean one as a
                # keep-mask and refuses integers.
                b = emit.method("float", b)
            if step.sign < 0:
                b = emit("call_function", torch.neg, b)
            bias = b if bias is None else emit("call_function", torch.add, bias, b)
    if site.key_terms:
        bias = key_mask(emit, site.key_terms, dst)
    elif site.keep_mask is not None:  # alone too (matcher)
        mask, frame = site.keep_mask
        bias = to_layout(emit, _mask_node(emit, mask, negate=True), frame, dst, full=False)
    return bias, scale, softcap


def fuse(gm: fx.GraphModule, site: Site) -> dict:
    """Replace one site; returns details for the report or raises Skip (graph left as it was)."""
    emit = Emitter(gm.graph, site.pv)
    try:
        dst = _op_frame(site.qk_frame)
        q = _scaled_q(emit, _operand(emit, site.q, site.qk_frame, dst), site, dst)
        k = _operand(emit, site.k, site.qk_frame, dst)
        v = _operand(emit, site.v, site.pv_frame, dst)
        k, v, kv_heads = _grouped_kv(k, v)
        bias, scale, softcap = _bias(emit, site, dst)
        fq, fk, fv = (sp.meta(n) for n in (q, k, v))
        # fp32 on CUDA is refused here unless torch allows TF32 (torch_op.tf32_allowed), as for its own matmuls.
        reason = why_unsupported(fq, fk, fv, None if bias is None else sp.meta(bias))
        if reason is not None:
            raise Skip(reason)
        if not math.isfinite(scale):
            raise Skip(f"scale {scale} is not finite")
        left, right = site.window
        token_major = dst == site.pv_frame and site.pv_out_perm is None and _heads_swapped_by_every_user(site.pv)
        res = emit("call_function", _OP, q, k, v, bias, float(scale), bool(site.causal), window_left=left,
                   window_right=right, softcap=float(softcap), token_major_out=token_major,
                   unseen_rows=_unseen_mode(site))
        out = emit("call_function", operator.getitem, res, 0)
        if site.sink is not None:
            out = _with_sinks(emit, out, emit("call_function", operator.getitem, res, 1), site.sink, dst)
        elif site.nan_rows:
            rows = emit("call_function", lse_unseen, emit("call_function", operator.getitem, res, 1))
            out = emit("call_function", nan_rows, out, q, k, v, rows, site.unseen == "add")
        elif site.unseen is None and bias is not None and sp.meta(bias).is_floating_point():
            # An added bias may hold -inf at every key of a row: NaN in eager, lse = +inf in the op.
            rows = emit("call_function", lse_unseen, emit("call_function", operator.getitem, res, 1))
            out = emit("call_function", nan_rows, out, q, k, v, rows, True, bias)
        out = to_layout(emit, out, dst, site.pv_frame, full=False)
        if site.pv_out_perm is not None:
            out = emit.method("permute", out, *site.pv_out_perm)
        want = sp.meta(site.pv).dtype
        if sp.meta(out).dtype != want:
            out = emit.method("to", out, want)
    except Skip:
        emit.discard()
        raise
    site.pv.replace_all_uses_with(out)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(set(site.erase), key=order.__getitem__, reverse=True):
        if not node.users:
            gm.graph.erase_node(node)
    erase_dead(gm.graph, site.dense_masks + ([site.k.node, site.v.node] if kv_heads else []))
    return {"scale": float(scale), "causal": bool(site.causal), "has_bias": bias is not None, "kv_heads": kv_heads,
            "softcap": float(softcap), "window": tuple(site.window), "mask_form": _mask_form(site, bias),
            "token_major_out": token_major}


def _scaled_q(emit: Emitter, q: fx.Node, site: Site, dst: tuple) -> fx.Node:
    """q times the site's factors known only at run time (steps "qscale": a learned per-head temperature, XCiT's;
    Swin V2's logit scale; a symbolic float), as (q · t) kᵀ = (q kᵀ) · t for t one number per row at most; in q's
    dtype, the factor's gradient through the product."""
    dtype = sp.meta(q).dtype
    for step in site.steps:
        if step.kind != "qscale":
            continue
        factor = step.tensor
        if isinstance(sp.meta(factor), torch.Tensor) and sp.meta(factor).dim() > 0:
            factor = to_layout(emit, factor, step.frame, dst, full=False)  # (B or 1, H or 1, Nq or 1, 1)
        q = emit("call_function", torch.mul if step.sign > 0 else torch.div, q, factor)
        if sp.meta(q).dtype != dtype:
            q = emit.method("to", q, dtype)
    return q


def _with_sinks(emit: Emitter, out: fx.Node, lse: fx.Node, sink: tuple, dst: tuple) -> fx.Node:
    """out · σ(lse - sink): the keys' share of a softmax whose denominator also holds the sink logits (their
    logsumexp where there are several), in fp32. A row that sees no key is 0 with lse = +inf, as eager's, whose sink
    then takes the whole row: so sites with sinks keep the op's rows (no uniform or NaN rows)."""
    node, frame = sink
    logits = to_layout(emit, node, frame, dst, full=False)  # (B or 1, H or 1, Nq or 1, w)
    logits = emit.method("float", logits)
    if not equal(sp.meta(logits).shape[-1], 1):
        logits = emit("call_function", torch.logsumexp, logits, -1, keepdim=True)
    gap = emit("call_function", torch.sub, emit.method("unsqueeze", lse, -1), logits)  # (B, H, Nq, 1)
    return emit("call_function", torch.mul, out, emit("call_function", torch.sigmoid, gap))


def _unseen_mode(site: Site) -> int:
    """The op's unseen_rows for a site whose rows may see no key under a finite fill (cupyflash/unseen_rows.py):
    eager's uniform row, with the scores' gradient where the fill was added to them; 0 for any other site (a -inf
    fill's NaN rows are nan_rows'; beside sinks eager's rows are 0, the op's own)."""
    if site.unseen is None or site.nan_rows or site.sink is not None:
        return 0
    return unseen.UNIFORM_SCORES if site.unseen == "add" else unseen.UNIFORM


def _heads_swapped_by_every_user(pv: fx.Node) -> bool:
    """Whether every user of the site's (B, H, Nq, D) output swaps heads and tokens (`.transpose(1, 2)`,
    `.permute(0, 2, 1, 3)`), as models do before merging the heads (nanoGPT, transformers, timm): the op then
    returns out in (B, Nq, H, D) memory (token_major_out), so each of those is contiguous and the `.contiguous()` or
    `.reshape` after it copies nothing. Any other user (a `.view` among them) keeps the matmul's contiguous out."""
    for user in pv.users:
        swap = sp.perm_of(user)
        if swap is None or swap[0] is not pv or swap[1] != (0, 2, 1, 3):
            return False
    return bool(pv.users)


def _grouped_kv(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, Optional[int]]:
    """K and V as the op takes grouped-query attention: their sources with H / n heads where both are the same
    n-fold head repeat (spellings.repeated_heads), with the number of K/V heads; else as they are, and None. The
    repeated copies (n times K and V, made in the forward, saved for the backward and summed back over the
    group there) then die with the site."""
    rk, rv = sp.repeated_heads(k), sp.repeated_heads(v)
    if rk is None or rv is None or rk[1] != rv[1]:
        return k, v, None
    heads = sp.meta(rk[0]).shape[1]
    if not isinstance(heads, int) or not equal(heads, sp.meta(rv[0]).shape[1]):
        return k, v, None
    return rk[0], rv[0], heads


def _mask_form(site: Site, bias: Optional[fx.Node]) -> str:
    parts = (["causal"] if site.causal else []) + (["window"] if site.window != (-1, -1) else [])
    if site.key_terms:
        parts.append("key padding")
    elif site.keep_mask is not None and site.sink is not None:
        parts.append("mask")  # rows without a key: 0, as eager's beside sinks
    elif site.keep_mask is not None:
        parts.append(f"mask ({'NaN' if site.nan_rows else 'uniform'} rows as eager)")
    elif bias is not None:
        parts.append("dense bias")
    return " + ".join(parts) or "none"


def erase_dead(graph: fx.Graph, roots: list[fx.Node]) -> None:
    """Erase the dense masks the op no longer reads, and what built only them: nodes without users, never
    placeholders, impure calls or in-place methods. Sites sharing a mask keep it until the last is fused."""
    stack, erased = list(roots), set()
    while stack:
        node = stack.pop()
        if (node in erased or node.users or node.op not in ("call_function", "call_method") or node.is_impure()
                or (node.op == "call_method" and node.target.endswith("_"))):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


def rewrite_graph(gm: fx.GraphModule, example_inputs, graph_index: int = 0) -> list[SiteRecord]:
    """Fuse every attention site of a Dynamo graph in place; one record per site found."""
    matcher = Matcher(gm, example_inputs)
    records = []
    softmaxes = [n for n in gm.graph.nodes if sp.softmax_input_and_dim(gm, n) is not None]
    for node in softmaxes:
        name, loc = node.name, where(node)
        try:
            site = matcher.match(node)
            if site is None:
                continue
            details = fuse(gm, site)
        except Skip as err:
            records.append(SiteRecord(graph_index, name, loc, False, reason=str(err)))
            log.info("cupyflash: left attention at %s alone: %s", loc, err)
            continue
        records.append(SiteRecord(graph_index, name, loc, True, notes=tuple(site.notes), **details))
        log.info("cupyflash: fused attention at %s (%s)", loc, details)
    if any(r.fused for r in records):
        gm.graph.lint()
        gm.recompile()
    return records
