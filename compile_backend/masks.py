"""What a mask means: proving a boolean/0-1 mask is the causal triangle, and seeing a bias as a fill.

A triangle is described as ``Tri(off, inverted)``: the set {(i, j): j <= i + off} over the last two dims
(its complement when inverted), the same for every leading index. The cupyflash op's causal mask is
bottom-right aligned, i.e. keep = Tri(Nk - Nq). We follow the triangle through the ops real code uses
to build and cut it (``ones().tril()``, ``triu``, a registered ``tril`` buffer, slicing ``[:, :, a:b, :c]``,
``== 0``, ``~``, ``.bool()``, views that add leading 1s) and compare the offset symbolically, so the proof
holds for every length when the sequence axis is dynamic.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .spellings import arg, cast_input, const_value, is_call, meta


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
            diag = arg(node, 1, "diagonal", 0)
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
        if is_call(node, (torch.logical_not, operator.invert, torch.bitwise_not), ("logical_not", "bitwise_not")):
            return node.args[0], True
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
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) > 1:
            return None
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (x.dim() - consumed) + index[at + 1:]
        else:
            index = index + (slice(None),) * (x.dim() - consumed)
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


class Not:
    """A mask that is the negation of a graph node (made in the graph only if the site is fused)."""

    def __init__(self, node: fx.Node):
        self.node = node


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
