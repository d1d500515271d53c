"""What a mask means: proving a mask is a band around the diagonal and per-key terms, and seeing a bias as a fill.

A triangle is described as ``Tri(off, inverted)``: the set {(i, j): j <= i + off} over the last two dims
(its complement when inverted), the same for every leading index. The cupyflash op's causal mask is
bottom-right aligned, i.e. keep = Tri(Nk - Nq). We follow the triangle through the ops real code uses
to build and cut it (``ones().tril()``, ``triu``, a registered ``tril`` buffer, slicing ``[:, :, a:b, :c]``,
``== 0``, ``~``, ``.bool()``, views that add leading 1s) and compare the offset symbolically, so the proof
holds for every length when the sequence axis is dynamic.

``Keep`` generalises the triangle to what ``transformers.masking_utils`` builds: index tensors made in the
graph (``arange(n) + offset``, indexed with ``None`` to a broadcast axis) compared with each other give a band
lo <= j - i <= hi (causal, sliding windows; a distance ``abs(q_idx - kv_idx) <= w`` bounded above, the
bidirectional window of ModernBERT's local layers, both edges); ``&`` joins terms; a boolean term broadcast over heads and
queries, (B or 1, 1, 1, Nk) such as ``attention_mask[batch_idx, kv_idx]``, is a per-key term passed to the op
as it is (its values are runtime data, never read here). Terms that are constant by the same index arithmetic
are dropped: a bound on one index that holds at its extreme (BERT's ``q_idx >= 0``), and the packed-sequence
term of position ids that are an arange (``diff`` / ``cumsum`` / ``==``). Index tensors that are graph inputs
(``cache_position``, user ``position_ids``) are runtime data: the proof fails there, as for anything else the
walk does not know, and the reason names the node. vmap-built masks (``use_vmap=True``) are not followed yet.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .spellings import arg, cast_input, const_value, describe, is_call, meta


@dataclass(frozen=True)
class Tri:
    off: Any  # int or SymInt
    inverted: bool = False

    def flipped(self) -> "Tri":
        return Tri(self.off, not self.inverted)


@dataclass(frozen=True)
class Fill:
    """``where(mask, value, 0)`` (mask true = filled) written as a bias."""

    mask: "fx.Node | Not"
    value: float


def equal(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b))


@dataclass(frozen=True)
class Not:
    """A mask that is the negation of a graph node (made in the graph only if the site is fused)."""

    node: fx.Node


def node_of(mask: "fx.Node | Not") -> tuple[fx.Node, bool]:
    """(graph node, negated) of a mask that is a node or ``Not`` of one."""
    return (mask.node, True) if isinstance(mask, Not) else (mask, False)


_NOT = ((operator.invert, torch.logical_not, torch.bitwise_not), ("logical_not", "bitwise_not", "__invert__"))


def negated_input(node: Any) -> Optional[fx.Node]:
    """x of a node that is the logical negation of x: ``logical_not(x)``, or ``~x`` / ``bitwise_not(x)`` of a
    boolean x (None otherwise: of an integer 0/1 tensor they give -1 and -2, both true)."""
    if not is_call(node, *_NOT):
        return None
    x = node.args[0]
    if node.target in (torch.logical_not, "logical_not"):
        return x
    value = meta(x)
    return x if isinstance(value, torch.Tensor) and value.dtype == torch.bool else None


class MaskAnalysis:
    """Knows the real values of the module buffers of one graph (Dynamo lifts them to graph inputs)."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.buffers: dict[fx.Node, torch.Tensor] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            source = getattr(node.meta.get("grapharg"), "source", None)
            # Only registered buffers: parameters and user inputs change from call to call, and Dynamo
            # does not guard on tensor values. A tril buffer (nanoGPT's `bias`) is never written after
            # __init__; its contents are taken as proof of the mask for the life of this graph.
            if isinstance(value, torch.Tensor) and "_buffers" in str(source):
                self.buffers[node] = value

    # ---- triangles ----------------------------------------------------------------------------

    def tri(self, node: Any) -> Optional[Tri]:
        """The triangle a 0/1 or boolean tensor node holds, or None when it cannot be proven."""
        if isinstance(node, Not):
            t = self.tri(node.node)
            return None if t is None else t.flipped()
        if not isinstance(node, fx.Node):
            return None
        if node in self.buffers or node.op == "get_attr":
            value = self.buffers.get(node)
            if value is None:
                value = getattr(self.gm, node.target, None)
            return _tri_of_value(value) if isinstance(value, torch.Tensor) else None
        if is_call(node, (torch.tril, torch.triu), ("tril", "triu")):
            if not self._all_ones(node.args[0]):
                return None
            diag = meta(arg(node, 1, "diagonal", 0))  # a SymInt when computed from dynamic lengths (Nk - Nq)
            lower = node.target in (torch.tril, "tril")
            # triu(d) keeps j >= i + d, the complement of j <= i + d - 1.
            return Tri(diag) if lower else Tri(diag - 1, inverted=True)
        inner = self._same_truth(node)
        if inner is not None:
            src, flip = inner
            t = self.tri(src)
            return None if t is None else (t.flipped() if flip else t)
        if is_call(node, (operator.getitem,)):
            return self._sliced(node)
        return None

    def _all_ones(self, node: Any) -> bool:
        if is_call(node, (torch.ones, torch.ones_like), ("new_ones",)):
            return True
        if is_call(node, (torch.full,), ("new_full",)):
            return const_value(arg(node, 1, "fill_value")) == 1.0 or arg(node, 1, "fill_value") is True
        src = cast_input(node) if isinstance(node, fx.Node) else None
        return src is not None and self._all_ones(src)

    def _same_truth(self, node: fx.Node) -> Optional[tuple[fx.Node, bool]]:
        """(input, flipped) when the node keeps (or exactly flips) a 0/1 mask's truth and its triangle:
        comparisons with 0/1, negation, bool/float casts, leading-dim views."""
        src = negated_input(node)
        if src is not None:
            return src, True
        comparisons = {operator.eq: True, torch.eq: True, "eq": True, "__eq__": True,
                       operator.ne: False, torch.ne: False, "ne": False, "__ne__": False}
        if is_call(node, tuple(k for k in comparisons if not isinstance(k, str)),
                   tuple(k for k in comparisons if isinstance(k, str))):
            value = node.args[1]
            c = 1.0 if value is True else 0.0 if value is False else const_value(value)
            if c not in (0.0, 1.0):
                return None
            # (x == 0) and (x != 1) flip the truth of a 0/1 tensor; (x == 1) and (x != 0) keep it.
            return node.args[0], comparisons[node.target] == (c == 0.0)
        if is_call(node, (operator.gt,), ("gt", "__gt__")) and const_value(node.args[1]) == 0.0:
            return node.args[0], False
        if is_call(node, (), ("bool",)) or cast_input(node) is not None:
            return node.args[0], False
        if is_call(node, (), ("to",)) and (node.args[1:] == (torch.bool,) or node.kwargs == {"dtype": torch.bool}):
            return node.args[0], False
        if is_call(node, (torch.reshape, torch.unsqueeze), ("view", "reshape", "unsqueeze", "expand", "expand_as")):
            src, out = meta(node.args[0]), meta(node)
            if (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() >= 2
                    and all(equal(d, 1) for d in src.shape[:-2])
                    and equal(src.shape[-1], out.shape[-1]) and equal(src.shape[-2], out.shape[-2])):
                return node.args[0], False
        return None

    def _sliced(self, node: fx.Node) -> Optional[Tri]:
        """``x[..., a:b, c:d]`` (leading dims of size 1 indexed by ``:``, ``None`` or ``0``): row start a
        moves the diagonal by +a, column start c by -c."""
        src, index = node.args
        x = meta(src)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not all(equal(d, 1) for d in x.shape[:-2]):
            return None
        index = explicit_index(index, x.dim())
        if index is None:
            return None
        dims = [i for i in index if i is not None]
        if len(dims) != x.dim() or index[-1] is None or index[-2] is None:
            return None  # a new axis after the matrix dims would move them
        starts = []
        for i in dims[-2:]:
            if not isinstance(i, slice) or i.step not in (None, 1):
                return None
            start = 0 if i.start is None else meta(i.start)
            if not statically_known_true(start >= 0):
                return None
            starts.append(start)
        if not all(isinstance(i, slice) or i == 0 for i in dims[:-2]):
            return None
        t = self.tri(src)
        return None if t is None else Tri(t.off + starts[0] - starts[1], t.inverted)

    # ---- fills ---------------------------------------------------------------------------------

    def fill(self, node: Any, before: fx.Node) -> Optional[Fill]:
        """See an additive bias as ``where(mask, value, 0)``: ``where(m, v, 0)``, ``where(m, 0, v)``,
        ``zeros(...).masked_fill(m, v)``, or a ``zeros`` tensor filled in place by ``masked_fill_``
        before ``before`` (the SDPA docs' reference implementation)."""
        if not isinstance(node, fx.Node):
            return None
        if is_call(node, (torch.where,)) and len(node.args) == 3:
            cond, a, b = node.args
            va, vb = const_value(a), const_value(b)
            if vb == 0.0 and va is not None:
                return Fill(cond, va)
            if va == 0.0 and vb is not None:
                return Fill(Not(cond), vb)
            return None
        if is_call(node, (torch.masked_fill,), ("masked_fill",)) and self._all_zeros(node.args[0]):
            value = const_value(arg(node, 2, "value"))
            return None if value is None else Fill(node.args[1], value)
        if self._all_zeros(node):
            writes = [u for u in node.users if u.op != "output" and _before(u, before) and u is not before]
            if len(writes) == 1 and is_call(writes[0], (), ("masked_fill_",)) and writes[0].args[0] is node:
                value = const_value(arg(writes[0], 2, "value"))
                return None if value is None else Fill(writes[0].args[1], value)
        return None

    @staticmethod
    def _all_zeros(node: Any) -> bool:
        if is_call(node, (torch.zeros, torch.zeros_like), ("new_zeros",)):
            return True
        return is_call(node, (torch.full,), ("new_full",)) and const_value(arg(node, 1, "fill_value")) == 0.0


# ---- band and per-key structure --------------------------------------------------------------------

class Unproven(Exception):
    """The mask is not a band and per-key terms (the message says which node stopped the proof)."""


@dataclass(frozen=True)
class Affine:
    """An integer index tensor: ``const`` + Σ c · (position along dim d), dims d counted from the right (-1:
    the key axis of the scores, -2: the query axis). Dims of size 1 carry no coefficient (their position is 0)."""

    coef: tuple  # ((d, c), ...), sorted by d, c != 0
    const: Any

    def __add__(self, other: "Affine") -> "Affine":
        c = dict(self.coef)
        for d, x in other.coef:
            c[d] = c.get(d, 0) + x
        return Affine(tuple(sorted((d, x) for d, x in c.items() if x != 0)), self.const + other.const)

    def __neg__(self) -> "Affine":
        return Affine(tuple((d, -x) for d, x in self.coef), -self.const)


@dataclass(frozen=True)
class Keep:
    """Keep (query i, key j) iff lo <= j - i <= hi (None: unbounded) and every per-key term is true (a boolean
    node, or ``Not`` of one, broadcast over heads and queries)."""

    lo: Any = None
    hi: Any = None
    keys: tuple = ()

    def __and__(self, other: "Keep") -> "Keep":
        return Keep(_bound(self.lo, other.lo, max), _bound(self.hi, other.hi, min), self.keys + other.keys)


def _bound(a, b, pick):
    if a is None or b is None:
        return b if a is None else a
    if statically_known_true(a <= b):
        return b if pick is max else a
    if statically_known_true(b <= a):
        return a if pick is max else b
    raise Unproven(f"two band limits {a} and {b} that cannot be ordered for every length")


_AND = ((operator.and_, torch.logical_and, torch.bitwise_and), ("logical_and", "bitwise_and", "__and__"))
_OR = ((operator.or_, torch.logical_or, torch.bitwise_or), ("logical_or", "bitwise_or", "__or__"))
# What each comparison says of a - b (for comparisons of index tensors that differ by a constant).
_TRUTH = {operator.eq: operator.eq, torch.eq: operator.eq, "eq": operator.eq, "__eq__": operator.eq,
          operator.ne: operator.ne, torch.ne: operator.ne, "ne": operator.ne, "__ne__": operator.ne,
          operator.le: operator.le, torch.le: operator.le, "le": operator.le, "__le__": operator.le,
          operator.lt: operator.lt, torch.lt: operator.lt, "lt": operator.lt, "__lt__": operator.lt,
          operator.ge: operator.ge, torch.ge: operator.ge, "ge": operator.ge, "__ge__": operator.ge,
          operator.gt: operator.gt, torch.gt: operator.gt, "gt": operator.gt, "__gt__": operator.gt}
# e <= 0 for each order comparison a OP b, written as e = sign · (a - b) + shift.
_ORDER = {operator.le: (1, 0), operator.lt: (1, 1), operator.ge: (-1, 0), operator.gt: (-1, 1)}
_COMPARE = {spelling: _ORDER[meaning] for spelling, meaning in _TRUTH.items() if meaning in _ORDER}


def _abs_input(node: Any) -> Optional[fx.Node]:
    """x of ``abs(x)`` / ``x.abs()`` (None otherwise)."""
    if is_call(node, (operator.abs, torch.abs), ("abs", "__abs__")):
        return node.args[0]
    return None


def _spelled(table: dict) -> tuple[tuple, tuple]:
    """(functions, methods) of a table keyed by spellings, for ``is_call``."""
    return tuple(k for k in table if not isinstance(k, str)), tuple(k for k in table if isinstance(k, str))


class StructureAnalysis:
    """Proves a keep-mask node equal to a ``Keep`` for scores of (Nq, Nk) with batch dims ``frame``."""

    def __init__(self, masks: "MaskAnalysis", nq, nk, frame: tuple):
        self.masks, self.nq, self.nk, self.frame = masks, nq, nk, frame

    def keep(self, node: Any, negated: bool = False) -> Keep:
        if isinstance(node, Not):
            return self.keep(node.node, not negated)
        if not isinstance(node, fx.Node) or not isinstance(meta(node), torch.Tensor):
            raise Unproven(f"a mask that is not a tensor ({node!r})")
        if self._all_true(node):
            if negated:
                raise Unproven(f"a mask that hides every key ({node.name})")
            return Keep()
        value = meta(node)
        if value.dtype == torch.bool and self._per_key(value):
            return Keep(keys=(Not(node) if negated else node,))
        tri = self._triangle(node)
        if tri is not None:
            # Tri(off): keep j - i <= off; inverted: keep j - i >= off + 1.
            kept_below = tri.inverted == negated
            return Keep(hi=tri.off) if kept_below else Keep(lo=tri.off + 1)
        src = negated_input(node)
        if src is not None:
            return self.keep(src, not negated)
        if is_call(node, *(_OR if negated else _AND)):
            return self.keep(node.args[0], negated) & self.keep(node.args[1], negated)
        if is_call(node, *(_AND if negated else _OR)):
            raise Unproven(f"a union of masks ({node.name}): the op takes one band and per-key terms")
        if is_call(node, *_spelled(_COMPARE)):
            return self._compare(node, negated)
        src = self._same_bool(node)
        if src is not None:
            return self.keep(src, negated)
        if is_call(node, *_spelled(_TRUTH)):
            # e.g. the packed-sequence term seq[b, q_idx] == seq[b, kv_idx] of position ids that are an arange
            if (self.index(node).const != 0) != negated:
                return Keep()
            raise Unproven(f"a mask that hides every key ({node.name})")
        raise Unproven(f"{describe(node)} ({node.name}) in the mask is not a band or per-key term")

    # ---- terms ---------------------------------------------------------------------------------

    def _per_key(self, value: torch.Tensor) -> bool:
        """Broadcast over heads and queries: (B or 1, 1, 1, Nk) in the scores' frame (B, H, Nq, Nk)."""
        shape = tuple(value.shape)
        n = len(self.frame) + 2
        if len(shape) > n:
            return False
        shape = (1,) * (n - len(shape)) + shape
        batch_ok = [equal(d, 1) or (i == 0 and len(self.frame) == 2) for i, d in enumerate(shape[:-2])]
        return all(batch_ok) and equal(shape[-2], 1)

    def _triangle(self, node: fx.Node) -> Optional[Tri]:
        """A triangle proven by ``MaskAnalysis.tri`` (tril/triu, a tril buffer), on a full (Nq, Nk) matrix."""
        shape = meta(node).shape
        if len(shape) < 2 or not (equal(shape[-2], self.nq) and equal(shape[-1], self.nk)):
            return None
        return self.masks.tri(node)

    @staticmethod
    def _all_true(node: fx.Node) -> bool:
        if meta(node).dtype != torch.bool:
            return False
        if is_call(node, (torch.ones, torch.ones_like), ("new_ones",)):
            return True
        return is_call(node, (torch.full,), ("new_full",)) and arg(node, 1, "fill_value") is True

    def _same_bool(self, node: fx.Node) -> Optional[fx.Node]:
        """The input of an op that keeps a boolean tensor's values and broadcast positions: a device move,
        ``.bool()`` / ``.to(bool)`` of a boolean, ``expand`` / ``expand_as`` / ``broadcast_to``."""
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or not isinstance(meta(src), torch.Tensor) or meta(src).dtype != torch.bool:
            return None
        if meta(node).dtype != torch.bool:
            return None
        if is_call(node, (), ("to", "bool", "cpu", "cuda")):
            return src
        if is_call(node, (torch.broadcast_to,), ("expand", "expand_as", "broadcast_to")):
            return src
        return None

    def _compare(self, node: fx.Node, negated: bool) -> Keep:
        sign, shift = _COMPARE[node.target]
        # One side may be the distance |x| of an index expression x (a bidirectional sliding window,
        # transformers' ``abs(q_idx - kv_idx) <= w``): the comparison is then s·|x| + e <= 0 with e affine.
        left, right = node.args[:2]
        distances = _abs_input(left), _abs_input(right)
        if None not in distances:
            raise Unproven(f"the comparison {node.name} has a distance on both sides")
        x = distances[0] if distances[0] is not None else distances[1]
        # The distance's side counts as 0 in e; s is its sign in s·|x| + e <= 0.
        a = Affine((), 0) if distances[0] is not None else self.index(left)
        b = Affine((), 0) if distances[1] is not None else self.index(right)
        s = 0 if x is None else sign if distances[0] is not None else -sign
        e = (a + -b) if sign > 0 else (b + -a)
        e = Affine(e.coef, e.const + shift)  # the comparison is s·|x| + e <= 0
        if negated:  # not (s·|x| + e <= 0)  <=>  -s·|x| - e + 1 <= 0
            e, s = Affine((-e).coef, -e.const + 1), -s
        if s == 0:
            return self._band(node, e)
        if s < 0:  # |x| >= e: outside a band on both sides
            raise Unproven(f"the comparison {node.name} keeps keys far from the diagonal: a union of two bands")
        d = self.index(x)
        return self._band(node, d + e) & self._band(node, -d + e)  # |d| <= -e  <=>  d + e <= 0 and -d + e <= 0

    def _band(self, node: fx.Node, e: Affine) -> Keep:
        """The keep-set of e <= 0 for an affine e of the query and key positions (node: the comparison)."""
        c = dict(e.coef)
        if set(c) - {-1, -2}:
            raise Unproven(f"the comparison {node.name} involves batch or head indices")
        alpha, beta = c.get(-2, 0), c.get(-1, 0)
        # A bound on one index alone holds everywhere if it holds at that index's extreme (BERT's q_idx >= 0).
        if alpha == 0 or beta == 0:
            slope, n = (beta, self.nk) if alpha == 0 else (alpha, self.nq)
            if statically_known_true(e.const + max(slope, 0) * (n - 1) <= 0):
                return Keep()
        # On an axis of size 1 the position is always 0: its coefficient may be anything.
        if alpha == 0 and equal(self.nq, 1):
            alpha = -beta
        if beta == 0 and equal(self.nk, 1):
            beta = -alpha
        if (alpha, beta) == (-1, 1):  # j - i + const <= 0
            return Keep(hi=-e.const)
        if (alpha, beta) == (1, -1):  # i - j + const <= 0
            return Keep(lo=e.const)
        raise Unproven(f"the comparison {node.name} is not of the form j - i <= c (i: query, j: key index)")

    # ---- index tensors -------------------------------------------------------------------------

    def index(self, x: Any) -> Affine:
        if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
            return Affine((), x)
        value = meta(x)
        if isinstance(x, fx.Node) and isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            return Affine((), value)
        if not isinstance(x, fx.Node) or not isinstance(value, torch.Tensor) or value.dtype.is_floating_point:
            raise Unproven(f"{x!r} is not an integer index tensor")
        return self._normalised(x, self._index(x))

    def _index(self, node: fx.Node) -> Affine:
        if node.op == "placeholder":
            raise Unproven(f"the index tensor {node.name} is a graph input (runtime data, such as generate()'s "
                           f"cache_position)")
        if is_call(node, (torch.arange,)):
            args = node.args
            step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
            start = args[0] if len(args) > 1 else node.kwargs.get("start", 0)
            if step != 1:
                raise Unproven(f"arange with step {step} ({node.name})")
            return Affine(((-1, 1),), meta(start))
        if is_call(node, (operator.add, torch.add), ("add", "__add__", "__radd__")) and not node.kwargs:
            return self.index(node.args[0]) + self.index(node.args[1])
        if is_call(node, (operator.sub, torch.sub), ("sub", "__sub__")) and not node.kwargs:
            return self.index(node.args[0]) + -self.index(node.args[1])
        if is_call(node, (operator.neg, torch.neg), ("neg", "__neg__")):
            return -self.index(node.args[0])
        if is_call(node, (), ("to", "long", "int", "cpu", "cuda")) and not meta(node.args[0]).dtype.is_floating_point:
            return self.index(node.args[0])
        if is_call(node, (torch.broadcast_to,), ("expand", "expand_as", "broadcast_to")):
            return self.index(node.args[0])
        if is_call(node, *_spelled(_TRUTH)):
            d = self.index(node.args[0]) + -self.index(node.args[1])
            if d.coef or not isinstance(d.const, int):
                raise Unproven(f"the comparison {node.name} is used as a number but is not constant")
            return Affine((), int(_TRUTH[node.target](d.const, 0)))
        if is_call(node, (torch.cumsum,), ("cumsum",)):
            a = self.index(node.args[0])
            if a.coef or a.const != 0:
                raise Unproven(f"cumsum of a non-zero index tensor ({node.name})")
            return a
        if is_call(node, (torch.diff,)):
            return self._diff(node)
        if is_call(node, (operator.getitem,)):
            return self._reindexed(node)
        if is_call(node, (torch.unsqueeze,), ("unsqueeze",)):
            n_out = meta(node).dim()
            d = arg(node, 1, "dim") % n_out
            return _moved(self.index(node.args[0]), [k if k < d else k + 1 for k in range(n_out - 1)], n_out)
        raise Unproven(f"{describe(node)} ({node.name}) builds an index tensor the backend does not follow")

    def _diff(self, node: fx.Node) -> Affine:
        """``torch.diff(x, prepend=x[..., :1] - c, dim=-1)`` of x with slope c along the last dim: c everywhere
        (find_packed_sequence_indices on position ids that are an arange)."""
        x, prepend, dim = node.args[0], node.kwargs.get("prepend"), arg(node, 2, "dim", node.kwargs.get("dim", -1))
        n = meta(x).dim()
        slope = dict(self.index(x).coef).get(-1, 0)
        first = None
        if dim % n == n - 1 and len(node.args) == 1 and set(node.kwargs) <= {"prepend", "dim"} \
                and is_call(prepend, (operator.sub,), ("sub", "__sub__")):
            head, c = prepend.args
            if is_call(head, (operator.getitem,)) and head.args[0] is x and isinstance(head.args[1], tuple) \
                    and head.args[1][-1] == slice(None, 1, None) \
                    and all(i == slice(None) or i is Ellipsis for i in head.args[1][:-1]):
                first = const_value(c)
        if first is None or first != slope:
            raise Unproven(f"torch.diff ({node.name}) of an index tensor that is not an arange along the last dim")
        return Affine((), slope)

    def _reindexed(self, node: fx.Node) -> Affine:
        """``x[None, :, ...]``: only new axes and full slices move positions. Any index of a constant is it."""
        src, index = node.args
        a = self.index(src)
        if not a.coef:
            return a
        index = explicit_index(index, meta(src).dim())
        if index is None:
            raise Unproven(f"an index with two ellipses ({node.name})")
        out_of_in, out = [], 0
        for i in index:
            if i is None:
                out += 1
            elif i == slice(None):
                out_of_in.append(out)
                out += 1
            else:
                raise Unproven(f"indexing an index tensor with {i!r} ({node.name})")
        return _moved(a, out_of_in, out)

    @staticmethod
    def _normalised(node: fx.Node, a: Affine) -> Affine:
        shape = meta(node).shape
        return Affine(tuple((d, c) for d, c in a.coef if -d <= len(shape) and not equal(shape[d], 1)), a.const)


def _moved(a: Affine, out_of_in: list, n_out: int) -> Affine:
    """Index ``a`` after its tensor's dim k moved to position out_of_in[k] of n_out dims."""
    n_in = len(out_of_in)
    return Affine(tuple(sorted((out_of_in[d + n_in] - n_out, c) for d, c in a.coef)), a.const)


def explicit_index(index: Any, n: int) -> Optional[tuple]:
    """A getitem index on an n-dim tensor as a tuple with the ellipsis spelled out as full slices (None for
    two ellipses)."""
    index = index if isinstance(index, tuple) else (index,)
    if sum(i is Ellipsis for i in index) > 1:
        return None
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    at = index.index(Ellipsis) if Ellipsis in index else len(index)
    return index[:at] + (slice(None),) * (n - consumed) + index[at + 1:]


def _before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def _tri_of_value(value: torch.Tensor) -> Optional[Tri]:
    """The triangle held by a concrete 0/1 tensor whose leading dims are all 1, or None."""
    if value.dim() < 2 or any(d != 1 for d in value.shape[:-2]) or value.is_meta:
        return None
    m = value.reshape(value.shape[-2:])
    if not bool(((m == 0) | (m == 1)).all()):
        return None
    keep = m != 0
    rows, cols = keep.shape
    diag = int(keep[0].sum()) - 1  # row 0 keeps j <= diag
    want = torch.ones(rows, cols, dtype=torch.bool, device=m.device).tril(diag)
    return Tri(diag) if bool((keep == want).all()) else None
