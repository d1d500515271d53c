"""Finding softmax-attention sites by meaning.

Every softmax is a candidate. From it we walk backwards through the ops that may sit between Q·Kᵀ and
the softmax (casts, scaling by a constant, additive biases, boolean fills, batch-regrouping views, a
soft-cap ``cap · tanh(s / cap)``) to a matrix product, and forwards through the ops that may sit between
the softmax and P·V (casts, inactive dropout, views) to a matrix product whose left operand is the
probabilities. Spellings are normalised by ``spellings``; masks are understood by ``masks``. The result
is a ``Site`` (what to emit) or a ``Skip`` with the reason the site is left alone. Anything not listed
between the two products is a reason to leave the site alone: the rewrite must never change what the
model computes.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import spellings as sp
from .masks import Keep, MaskAnalysis, Not, StructureAnalysis, Unproven, equal, node_of

# An added mask value at or below this is exact as the op's bias: scale·S + v rounds to v in fp32 for any score
# below 1e22, so a row with every key masked is uniform in eager, as the op makes it (MASKED_LOGIT), gradients too.
EXACT_FILL = -1e30
# A fill value c at or below this gives masked keys exactly zero weight in a row that keeps a key: softmax
# computes exp(c - m) in fp32 (bf16 scores too), m the row's largest score, and that rounds to 0 once c - m < -104
# (the smallest subnormal is e^-103.3), i.e. whenever some visible score exceeds c + 104 (-9896 for c = -1e4; the
# scores of real models are far above). A row that keeps no key has every score c: eager's softmax is uniform there.
NEGLIGIBLE_FILL = -1e4


class Skip(Exception):
    """The site is attention, but the backend leaves it alone (the message says why)."""


class NotScores(Exception):
    """The softmax input does not come from a matrix product through allowed ops."""


@dataclass
class Operand:
    """``node.permute(perm)`` (perm None: the node itself); batch dims then (..., N, D)."""

    node: fx.Node
    perm: Optional[tuple[int, ...]] = None

    def shape(self) -> tuple:
        s = tuple(sp.meta(self.node).shape)
        return s if self.perm is None else tuple(s[p] for p in self.perm)


@dataclass
class Step:
    """One op between Q·Kᵀ and the softmax, in program order, on scores with batch dims ``frame``.

    kind "scale": multiply by ``factor``; "add": add ``sign`` · ``tensor``; "fill": set the scores where
    ``tensor`` (a boolean mask) is true to ``value``; "softcap": replace the scores s by value · tanh(s / value);
    "qscale": multiply (``sign`` 1) or divide (-1) by ``tensor``, numbers known at run time, one per row at most
    (spellings.runtime_factor), which the rewrite folds into q.
    """

    kind: str
    frame: tuple
    factor: float = 1.0
    tensor: Any = None
    sign: float = 1.0
    value: float = 0.0


@dataclass
class Site:
    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: Operand
    k: Operand
    v: Operand
    scale: float
    causal: bool
    steps: list[Step]
    qk_frame: tuple
    pv_frame: tuple
    pv_out_perm: Optional[tuple[int, ...]]
    erase: list[fx.Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    window: tuple = (-1, -1)  # (left, right) keys around the bottom-right diagonal, -1: unbounded
    key_terms: list = field(default_factory=list)  # (node or Not, frame): per-key boolean terms, True = keep
    # Rows that may see no key after the key terms: None, or how eager's scores reach its mask ("add": the
    # mask is added, so gradients flow through the scores of such rows; "fill": the scores are replaced).
    unseen: Optional[str] = None
    # (mask or Not, frame) of a mask (True = masked) that is no band: the op takes its negation as a boolean
    # keep-mask, and the rows that see no key (lse = +inf) get eager's values: NaN for a -inf mask (nan_rows),
    # else uniform over all keys.
    keep_mask: Optional[tuple] = None
    nan_rows: bool = False
    dense_masks: list = field(default_factory=list)  # mask nodes the op no longer reads (dead if unused)
    # (sink logits node, its frame): extra logits concatenated beside the keys inside the softmax and sliced off
    # after it (GPT-OSS's attention sinks), (..., Nq or 1, w); None for none.
    sink: Optional[tuple] = None


def where(node: fx.Node) -> str:
    """The user's source line of a node (Dynamo records the stack): 'file, line N, in fn: code'."""
    trace = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    at = max((i for i, line in enumerate(trace) if line.strip().startswith("File ")), default=None)
    if at is None:
        return node.name
    loc = trace[at].strip().removeprefix("File ").replace('"', "")
    code = trace[at + 1].strip() if at + 1 < len(trace) else ""
    return f"{loc}: {code}" if code else loc


class Matcher:
    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.masks = MaskAnalysis(gm, example_inputs)

    def match(self, softmax: fx.Node) -> Optional[Site]:
        """A Site to fuse, None when the softmax is not attention, or raises Skip with the reason."""
        found = sp.softmax_input_and_dim(self.gm, softmax)
        if found is None:
            return None
        x, dim = found
        sink = self._sink_split(x, dim)
        shifted = []
        if sink is not None:
            x, sink_logits, shifted = sink
        pv, pv_reason = self._walk_probs(softmax, None if sink is None else x)
        try:
            steps, chain, qk = self._walk_scores(x)
        except NotScores as err:
            if pv is None:
                return None
            raise Skip(f"the softmax input is not Q·Kᵀ: {err}") from None
        except Skip:
            if pv is None:  # the scores are Q·Kᵀ, so say first what is missing after the softmax
                raise Skip(pv_reason) from None
            raise
        if pv is None:
            raise Skip(pv_reason)
        scores = sp.meta(x)
        if dim is None or not isinstance(dim, int) or dim % scores.dim() != scores.dim() - 1:
            raise Skip(f"softmax over dim {dim}, not the key axis (the last)")
        # `mask.expand_as(scores)` (DistilBERT) reads only the scores' shape; the fill broadcasts the mask
        # anyway, so the unexpanded mask is used and the expand_as goes with the site.
        shape_reads = []
        for step in steps:
            if step.kind == "fill" and sp.is_call(step.tensor, (), ("expand_as",)) and step.tensor.args[1] in chain:
                shape_reads.append(step.tensor)
                step.tensor = step.tensor.args[0]
        for node in chain:
            if len([u for u in node.users if u not in shape_reads]) != 1:
                raise Skip(f"the scores ({node.name}) have other users besides the softmax")
        site = self._site(softmax, qk, pv, steps, chain + shape_reads + shifted)
        if sink is not None:
            site.sink = (sink_logits, _frame(shifted[-1]))
            site.notes.append("attention sinks: out · σ(lse - sink) (the sink logits' share of the denominator)")
        return site

    def _sink_split(self, x: Any, dim: Any) -> Optional[tuple[fx.Node, Any, list[fx.Node]]]:
        """For a softmax over ``cat([scores, sinks], -1)`` less a per-row shift or not (GPT-OSS subtracts the row
        max), the scores Q·Kᵀ: (scores, sinks, the nodes from the softmax input to the cat, the cat last); else None.
        softmax([s, t])[..., :Nk] = softmax(s) · σ(lse(s) - lse(t)): attention with its out scaled per row."""
        walked = []
        if (added := sp.additive_operands(x)) is not None and added[2] < 0:
            shift = sp.meta(added[1])
            if isinstance(shift, torch.Tensor) and shift.dim() > 0 and not equal(shift.shape[-1], 1):
                return None  # not one number per row: not shift-invariant
            walked += [x] + _shift_nodes(added[1])
            x = added[0]
        if not sp.is_call(x, (torch.cat, torch.concat, torch.concatenate), ("cat",)) or not isinstance(dim, int):
            return None
        parts, cat_dim = sp.arg(x, 0, "tensors"), sp.arg(x, 1, "dim", 0)
        n = sp.meta(x).dim()
        if (not isinstance(parts, (list, tuple)) or len(parts) != 2 or not isinstance(cat_dim, int)
                or cat_dim % n != n - 1 or dim % n != n - 1 or not isinstance(parts[0], fx.Node)):
            return None
        try:
            self._walk_scores(parts[0])
        except (NotScores, Skip):
            return None
        return parts[0], parts[1], walked + [x]

    # ---- the two walks -------------------------------------------------------------------------

    def _walk_scores(self, node: Any) -> tuple[list[Step], list[fx.Node], fx.Node]:
        """Backwards from the softmax input to Q·Kᵀ; steps come back in program order."""
        steps: list[Step] = []
        chain: list[fx.Node] = []
        while True:
            if not isinstance(node, fx.Node):
                raise NotScores("a constant")
            chain.append(node)
            frame = _frame(node)
            if sp.contraction(node) is not None:
                steps.reverse()
                return steps, chain, node
            if (src := sp.cast_input(node)) is not None or (src := _regroup_input(node)) is not None:
                node = src
                continue
            if (scaled := sp.scalar_factor(node)) is not None:
                node, factor = scaled
                steps.append(Step("scale", _frame(node), factor=factor))
                continue
            if (added := sp.additive_operands(node)) is not None:
                a, b, sign = added
                # The scores are the operand that leads to a matrix product; the other is the bias.
                for scores, bias, s in ((a, b, sign), (b, a, 1.0)):
                    if s != sign and sign < 0:
                        continue  # `bias - scores` negates the scores: not attention
                    try:
                        inner_steps, inner_chain, qk = self._walk_scores(scores)
                    except NotScores:
                        continue
                    if sp.const_value(bias) is None:
                        steps.append(Step("add", _frame(scores), tensor=bias, sign=s))
                    # else: adding a number shifts every score of a row alike; softmax is shift-invariant
                    steps.reverse()
                    return inner_steps + steps, chain + inner_chain, qk
                raise NotScores(f"neither operand of {sp.describe(node)} is a matrix product")
            if sp.is_call(node, (torch.tanh, torch.nn.functional.tanh), ("tanh",)):
                cap, node = self._softcap(node, chain)
                steps[-1] = Step("softcap", frame, value=cap)  # the "× cap" step just walked
                continue
            if sp.is_call(node, (torch.masked_fill,), ("masked_fill",)):
                steps.append(Step("fill", frame, tensor=sp.arg(node, 1, "mask"),
                                  value=_fill_value(sp.arg(node, 2, "value"))))
                node = node.args[0]
                continue
            if sp.is_call(node, (torch.where,)) and len(node.args) == 3:
                cond, a, b = node.args
                if isinstance(sp.meta(a), torch.Tensor) and sp.meta(a).dim() > 0 and sp.const_value(a) is None:
                    steps.append(Step("fill", frame, tensor=Not(cond), value=_fill_value(b)))
                    node = a
                else:
                    steps.append(Step("fill", frame, tensor=cond, value=_fill_value(a)))
                    node = b
                continue
            if (scaled := sp.runtime_factor(node)) is not None:
                node, factor, divides = scaled
                steps.append(Step("qscale", _frame(node), tensor=factor, sign=-1.0 if divides else 1.0))
                continue
            raise NotScores(f"{sp.describe(node)} ({node.name})")

    def _softcap(self, tanh: fx.Node, chain: list[fx.Node]) -> tuple[float, fx.Node]:
        """For ``cap · tanh(s / cap)`` (Gemma 2, FlashAttention-2's softcap; the multiplication was walked just
        before ``tanh``): (cap, s), with the division added to ``chain``; else Skip, if ``tanh`` is on Q·Kᵀ."""
        after = sp.scalar_factor(chain[-2]) if len(chain) > 1 else None
        before = sp.scalar_factor(tanh.args[0]) if isinstance(tanh.args[0], fx.Node) else None
        runtime = [sp.runtime_factor(n) for n in (chain[-2] if len(chain) > 1 else None, tanh.args[0])
                   if isinstance(n, fx.Node)]
        if any(r is not None for r in runtime):
            reason = ("a soft-cap known only at run time (a tensor, or a float Dynamo made symbolic as under "
                      "dynamic=True; torch._dynamo.config.specialize_float = True keeps such floats constant)")
        elif after is None or after[0] is not tanh or before is None:
            reason = "tanh on the scores without a division by a constant cap before it and a multiplication after"
        # One cap on both sides (1/c rounds, so up to double rounding); c < 0 gives the same as |c| (tanh is odd).
        elif not math.isclose(before[1] * after[1], 1.0, rel_tol=1e-12):
            reason = (f"tanh on the scores between × {before[1]:.6g} and × {after[1]:.6g}, not a division and a "
                      f"multiplication by one cap")
        else:
            chain.append(tanh.args[0])
            return abs(after[1]), before[0]
        self._walk_scores(tanh.args[0])  # NotScores unless the tanh is on Q·Kᵀ: then it is not our business
        raise Skip(f"{reason}: the kernel applies only the soft-cap cap · tanh(s / cap)")

    def _walk_probs(self, softmax: fx.Node, sink_scores: Optional[fx.Node] = None
                    ) -> tuple[Optional[tuple[fx.Node, sp.Contraction, list]], str]:
        """Forwards from the softmax to P·V: ((pv node, contraction, chain), "") or (None, reason). With
        ``sink_scores`` (the scores beside sink logits) the first step must slice the keys' columns off."""
        node, chain = softmax, [softmax]
        if sink_scores is not None:
            users = list(softmax.users)
            if len(users) != 1 or not _keys_sliced(users[0], softmax, sp.meta(sink_scores).shape[-1]):
                return None, "the softmax over the keys and sink logits is not sliced back to the keys alone"
            node = users[0]
            chain.append(node)
        while True:
            users = list(node.users)
            if any(u.op == "output" for u in users):
                return None, "the attention probabilities leave the graph (returned, e.g. output_attentions)"
            if len(users) != 1:
                return None, f"the attention probabilities ({node.name}) have {len(users)} users"
            user = users[0]
            dropout = sp.dropout_state(self.gm, user)
            if dropout is not None:
                if dropout[1]:
                    return None, "dropout is not in the kernel yet (active dropout on the probabilities)"
            elif sp.cast_input(user) is not node and _regroup_input(user) is not node:
                if (flipped := _probs_on_right(user, node)) is not None:
                    return (flipped[0], flipped[1], chain + [user]), ""
                c = sp.contraction(user)
                if c is None:
                    return None, f"{sp.describe(user)} ({user.name}) sits between the softmax and P·V"
                if c.left != (node, None) or c.addend is not None or c.factor != 1.0:
                    return None, f"the probabilities are not the plain left operand of {sp.describe(user)}"
                return (user, c, chain), ""
            chain.append(user)
            node = user

    # ---- from walks to a site ------------------------------------------------------------------

    def _site(self, softmax, qk, pv_found, steps, chain) -> Site:
        pv, pv_c, probs_chain = pv_found
        c = sp.contraction(qk)
        if c.out_perm is not None:
            raise Skip("the scores are written with the key axis not last")
        erase = [pv, *probs_chain, *chain]
        q, fq = self._strip(Operand(*c.left), erase)
        k, fk = self._strip(Operand(*c.right_t), erase)
        qk_frame = _frame(qk)
        if c.addend is not None:
            steps = [Step("add", qk_frame, tensor=c.addend)] + steps
        scale = c.factor * fq * fk
        vc = pv_c.right_t
        v = Operand(vc[0], _identity_to_none(sp.compose(vc[1] or tuple(range(sp.meta(vc[0]).dim())),
                                                          _swap_last(sp.meta(vc[0]).dim()))))
        q, k = _without_upcasts(q, k, sp.meta(v.node).dtype, erase)
        site = Site(softmax, qk, pv, q, k, v, scale, False, [], qk_frame, _frame(pv_c.left[0]), pv_c.out_perm,
                    erase)
        site.steps = self._masks(site, steps, qk)
        return site

    def _strip(self, operand: Operand, erase: list) -> tuple[Operand, float]:
        """Fold constant factors and transposes applied to an operand only for this product."""
        node, perm, factor = operand.node, operand.perm, 1.0
        n = sp.meta(node).dim()
        perm = perm or tuple(range(n))
        while isinstance(node, fx.Node) and len(node.users) == 1:
            if (scaled := sp.scalar_factor(node)) is not None and sp.meta(scaled[0]).shape == sp.meta(node).shape:
                erase.append(node)
                node, f = scaled
                factor *= f
            elif (permuted := sp.perm_of(node)) is not None:
                erase.append(node)
                node, inner = permuted
                perm = sp.compose(inner, perm)
            else:
                break
        return Operand(node, _identity_to_none(perm)), factor

    def _masks(self, site: Site, steps: list[Step], qk: fx.Node) -> list[Step]:
        """Decide causal / window / key padding / bias for every mask; the steps that stay go into attn_bias."""
        kept: list[Step] = []
        masked = added = capped = False
        nq, nk = sp.meta(qk).shape[-2:]
        alone = sum(1 for step in steps if step.kind in ("add", "fill")) == 1
        for at, step in enumerate(steps):
            if step.kind == "softcap":
                if capped:
                    raise Skip("two soft-caps on the scores: the kernel applies one")
                if added:
                    raise Skip("a bias or mask inside the soft-cap's tanh: the kernel adds them after the cap")
                capped = True
                kept.append(step)
                continue
            if step.kind == "qscale":
                if added or capped:
                    raise Skip("the scores are scaled by numbers known only at run time after a bias, mask or "
                               "soft-cap: the op folds such a factor into q, which would leave those unscaled")
                site.notes.append(f"q scaled by {sp.describe_value(step.tensor)}, known at run time")
                kept.append(step)
                continue
            if step.kind == "scale":
                if masked and step.factor <= 0:
                    raise Skip("a non-positive scale after a mask would make masked keys the largest")
                if capped and step.factor <= 0:
                    raise Skip("a non-positive scale after the soft-cap")
                kept.append(step)
                continue
            added = True
            if step.kind == "add":
                fill = self.masks.fill(step.tensor, before=site.softmax)
                if fill is None or step.sign < 0:
                    kept.append(step)  # an opaque additive bias: the op adds it exactly as eager does
                    continue
                mask, value = fill.mask, fill.value
            else:
                mask, value = step.tensor, step.value
                if value is None or math.isnan(value) or value > 0:
                    raise Skip("a mask fill value that is not a constant negative number")
            masked = True
            # A positive scale after the mask scales the fill too.
            value *= math.prod(s.factor for s in steps[at + 1:] if s.kind == "scale" and s.factor > 0)
            if value <= NEGLIGIBLE_FILL and self._structured(site, step, mask, value, (nq, nk), capped, alone):
                continue
            if self._keep_mask(site, step, mask, value, alone):
                continue
            if step.kind == "fill":
                raise Skip(f"masked_fill/where replaces scores with {value:g} (after later scales), leaving masked "
                           f"keys a weight exp({value:g} - max score), exactly 0 in fp32 only for fills at or below "
                           f"{NEGLIGIBLE_FILL:g}")
            kept.append(step)
        return kept

    def _keep_mask(self, site: Site, step: Step, mask: Any, value: float, alone: bool) -> bool:
        """Put a mask that is no band on the site as the op's boolean keep-mask when eager's numbers follow from
        it: a -inf mask (added or filled), or a fill at or below NEGLIGIBLE_FILL (``value``: after later scales).
        In a row that keeps a key, eager's masked keys then weigh exactly 0, as in the op; a row that keeps none is
        NaN (-inf) or uniform over all keys (a fill replaced every score) in eager, and the rewrite selects that
        row where the op's lse is +inf. False for a finite additive mask (kept as a bias, exact for EXACT_FILL)."""
        if not (value == -math.inf or (step.kind == "fill" and value <= NEGLIGIBLE_FILL)):
            return False
        if not alone:
            # Even finfo.min, exact as a bias, is not here: eager's fill takes the scores' gradient away in a row
            # with no visible key, while the op's bias would pass it on.
            raise Skip(f"a mask filled with {value:g} beside another bias or mask: the op takes one mask, and in "
                       f"rows with no visible key eager's values and gradients would depend on both")
        site.keep_mask = (mask, step.frame)
        site.unseen = step.kind
        site.nan_rows = value == -math.inf
        site.notes.append(f"mask passed as a keep-mask (masked with {value:g})")
        return True

    def _structured(self, site: Site, step: Step, mask: Any, value: float, shape: tuple, capped: bool,
                    alone: bool) -> bool:
        """Prove the mask (true = masked) a band and per-key terms and put it on the site as flags; False (with
        the reason in the notes) when it cannot be, and the mask stays a dense bias."""
        nq, nk = shape
        try:
            if site.causal or site.window != (-1, -1) or site.key_terms:
                raise Unproven("a second mask on the scores: the op takes one band and one key mask")
            keep = StructureAnalysis(self.masks, nq, nk, step.frame).keep(mask, negated=True)
            causal, window = band_flags(keep, nq, nk)
            unseen = bool(keep.keys) or not _rows_see_a_key(keep, nq, nk)
            if unseen:
                # Eager gives such a row softmax over equal scores: uniform over all Nk keys (finite fill),
                # or NaN (-inf). The op gives eager's uniform row when asked (its unseen_rows: rewrite._unseen_mode).
                if value == -math.inf:
                    raise Unproven("a -inf mask where a row may see no key (eager gives NaN there)")
                if step.kind == "add" and value > EXACT_FILL:
                    raise Unproven(f"an added mask of {value:g} where a row may see no key: eager's softmax "
                                   f"there depends on the scores")
                if capped and step.kind == "add":
                    raise Unproven("a soft-capped site where a row may see no key: eager's gradient there goes "
                                   "through tanh' of every score, which has no small exact form")
                if not alone:
                    raise Unproven("another bias or mask on the scores beside a key mask")
        except Unproven as err:
            site.notes.append(f"no band or key padding: {err}")
            return False
        site.causal, site.window = causal, window
        site.key_terms = [(term, step.frame) for term in keep.keys]
        site.unseen = step.kind if unseen else None  # "add" or "fill"
        site.dense_masks.append(node_of(step.tensor)[0])
        site.notes.append(f"mask proven (masked with {value:g})")
        return True


def _static_int(x: Any) -> int:
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt) and x.node.expr.is_number:
        return int(x.node.expr)
    raise Unproven(f"a band edge {x} that depends on the sequence lengths (the op takes a fixed window)")


def band_flags(keep: Keep, nq, nk) -> tuple[bool, tuple[int, int]]:
    """(causal, (window_left, window_right)) of the op for keep's band lo <= j - i <= hi: the op keeps
    i + d - left <= j <= i + d + right with d = Nk - Nq (bottom-right aligned)."""
    diag = nk - nq
    right = None if keep.hi is None else _static_int(keep.hi - diag)
    left = None if keep.lo is None else _static_int(diag - keep.lo)
    for name, edge in (("right", right), ("left", left)):
        if edge is not None and edge < 0:
            raise Unproven(f"a band whose {name} edge is {-edge} key(s) beyond the bottom-right diagonal "
                           f"(the op's window keeps the diagonal)")
    return right == 0, (-1 if left is None else left, -1 if right in (None, 0) else right)


def _rows_see_a_key(keep: Keep, nq, nk) -> bool:
    """Every query row keeps a key under the band alone (row i keeps j in [i + lo, i + hi] ∩ [0, Nk))."""
    ok = [nq >= 1, nk >= 1]
    if keep.hi is not None:
        ok.append(keep.hi >= 0)  # row 0 reaches key 0
    if keep.lo is not None:
        ok.append(keep.lo <= nk - nq)  # the last row starts at or before the last key
    if keep.lo is not None and keep.hi is not None:
        ok.append(keep.lo <= keep.hi)
    return all(bool(statically_known_true(c)) if not isinstance(c, bool) else c for c in ok)


def _upcast_source(operand: Operand, low: torch.dtype, walked: list) -> Optional[Operand]:
    """The 16-bit tensor under ``operand`` when it is ``x.float()`` / ``x.to(float32)`` of an x of dtype ``low``,
    used only here (through transposes, which move the same elements); else None. ``walked`` gets the nodes
    passed, which die with the site."""
    node, perm = operand.node, operand.perm or tuple(range(sp.meta(operand.node).dim()))
    while len(node.users) == 1 and (permuted := sp.perm_of(node)) is not None:
        walked.append(node)
        node, inner = permuted
        perm = sp.compose(inner, perm)
    src = sp.cast_input(node) if len(node.users) == 1 else None
    if (src is None or sp.meta(node).dtype != torch.float32 or not isinstance(sp.meta(src), torch.Tensor)
            or sp.meta(src).dtype != low or sp.is_call(node, (torch.clone,), ("contiguous", "clone"))):
        return None
    walked.append(node)
    return Operand(src, _identity_to_none(perm))


def _without_upcasts(q: Operand, k: Operand, v_dtype: torch.dtype, erase: list) -> tuple[Operand, Operand]:
    """GPT-2's ``reorder_and_upcast_attn`` and GPT-J cast q and k from 16 bits to fp32 while v stays 16-bit: the
    cast is exact and the kernels accumulate Q·Kᵀ in fp32, so the op takes q and k before the casts."""
    if v_dtype not in (torch.float16, torch.bfloat16):
        return q, k
    walked: list = []
    q16, k16 = _upcast_source(q, v_dtype, walked), _upcast_source(k, v_dtype, walked)
    if q16 is None or k16 is None:
        return q, k
    erase.extend(walked)
    return q16, k16


def _probs_on_right(user: fx.Node, probs: fx.Node) -> Optional[tuple[fx.Node, sp.Contraction]]:
    """For ``X @ probs.transpose(-2, -1)`` (EfficientViT's ``v @ attnᵀ``, X (..., D, Nk)): (that product, the
    contraction as P · Xᵀ with its out transposed back), ``user`` being the transpose; else None."""
    n = sp.meta(probs).dim()
    if sp.perm_of(user) != (probs, _swap_last(n)) or len(user.users) != 1:
        return None
    pv = next(iter(user.users))
    c = sp.contraction(pv)
    if (c is None or c.right_t != (user, _swap_last(n)) or c.addend is not None or c.factor != 1.0
            or c.out_perm is not None):
        return None
    return pv, sp.Contraction((probs, None), c.left, out_perm=_swap_last(n))


def _shift_nodes(shift: Any) -> list[fx.Node]:
    """The nodes of a row shift ``x.max(-1, keepdim=True).values`` / ``amax`` (they die with the site)."""
    if not isinstance(shift, fx.Node):
        return []
    if shift.op == "call_function" and shift.target is operator.getitem and isinstance(shift.args[0], fx.Node):
        return [shift.args[0], shift]
    return [shift]


def _keys_sliced(node: fx.Node, src: fx.Node, n_k: Any) -> bool:
    """Whether ``node`` is ``src[..., :n_k]`` (``:-w`` for w sink columns, or every leading dim written out)."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[0] is not src:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    n = sp.meta(src).dim()
    if index and index[0] is Ellipsis:
        lead = index[1:-1]
    else:
        lead = index[:-1]
        if len(index) != n:
            return False
    last = index[-1] if index else None
    if any(i != slice(None) for i in lead) or not isinstance(last, slice) or last.step not in (None, 1):
        return False
    if last.start not in (None, 0):
        return False
    width = sp.meta(src).shape[-1]
    stop = last.stop
    return stop is not None and (equal(stop, n_k) or (isinstance(stop, int) and stop < 0
                                                       and equal(width + stop, n_k)))


def _frame(node: fx.Node) -> tuple:
    """Batch dims of a (batch..., rows, cols) tensor node."""
    return tuple(sp.meta(node).shape[:-2])


def _fill_value(x: Any) -> Optional[float]:
    return sp.const_value(x)


def _regroup_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of a view/reshape that only regroups batch dims (the last two dims and the element
    order stay), as in the (B·H, N, N) <-> (B, H, N, N) dance around a mask; else None."""
    if not sp.is_call(node, (torch.reshape,), ("view", "reshape")):
        return None
    src, out = sp.meta(node.args[0]), sp.meta(node)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)) or min(src.dim(), out.dim()) < 2:
        return None
    if not (equal(src.shape[-1], out.shape[-1]) and equal(src.shape[-2], out.shape[-2])):
        return None
    return node.args[0] if equal(math.prod(src.shape[:-2]), math.prod(out.shape[:-2])) else None


def _swap_last(n: int) -> tuple[int, ...]:
    return tuple(range(n - 2)) + (n - 1, n - 2)


def _identity_to_none(perm: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    return None if perm == tuple(range(len(perm))) else perm
