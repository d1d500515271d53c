"""The many spellings of one torch-level operation in a Dynamo FX graph, reduced to one question each.

Dynamo records what the user wrote: ``a @ b`` is ``operator.matmul``, ``a.matmul(b)`` a ``call_method``,
``nn.Softmax`` a ``call_module`` when it is not inlined, ``torch.einsum`` a ``call_function`` with an equation.
Every helper here takes a node and answers for all spellings, so the matcher reasons about meaning only.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

Number = (int, float)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_call(node: Any, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def meta(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (a FakeTensor, a SymInt, ...), or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def describe_value(x: fx.Node) -> str:
    """A run-time number (runtime_factor's factor) for a report: 'the (4, 1, 1) tensor l_temperature_', 'the
    symbolic number s0'."""
    value = meta(x)
    if isinstance(value, torch.Tensor):
        return f"the {tuple(value.shape)} tensor {x.name}" if value.dim() else f"the 0-dim tensor {x.name}"
    return f"the symbolic number {x.name}"


def describe(node: fx.Node) -> str:
    """Short name of what a node does, for skip reasons: ``torch.relu``, ``Tensor.mul``, ``operator.mul``."""
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", str(node.target))
        mod = {"_operator": "operator", "torch._C._nn": "torch.nn.functional",
               "torch._C._VariableFunctions": "torch"}.get(mod, mod)
        return f"{mod}.{name}" if mod else name
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    return f"{node.op} {node.target}"


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


# ---- softmax -------------------------------------------------------------------------------------

def softmax_input_and_dim(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[fx.Node, Any]]:
    """(input, dim) when the node is a softmax in any spelling (``dtype=`` is a cast, handled by the
    caller through the node's recorded dtype), else None."""
    if is_call(node, (F.softmax, torch.softmax, torch.Tensor.softmax), ("softmax",)):
        return node.args[0], arg(node, 1, "dim")
    mod = _module(gm, node)
    if isinstance(mod, torch.nn.Softmax):
        return node.args[0], mod.dim
    return None


# ---- dropout -------------------------------------------------------------------------------------

def dropout_state(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[fx.Node, bool]]:
    """(input, active) for a dropout in any spelling, else None. Inactive: eval mode or p == 0."""
    if is_call(node, (F.dropout,)):
        p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
    elif is_call(node, (torch.dropout,), ("dropout",)):
        p, training = arg(node, 1, "p"), arg(node, 2, "train")
    elif isinstance(_module(gm, node), torch.nn.Dropout):
        mod = _module(gm, node)
        p, training = mod.p, mod.training
    else:
        return None
    return node.args[0], not (training is False or p == 0)


# ---- casts and identities ------------------------------------------------------------------------

_CAST_METHODS = ("float", "half", "bfloat16", "double", "to", "type", "type_as", "contiguous", "clone")


def cast_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of a value-preserving op (dtype cast, contiguous, clone), else None.

    ``.to(...)``/``.type(...)`` count only when they change nothing but the dtype (a device move or a
    ``copy=``/``memory_format=`` argument is not a cast). Floating dtypes only: a cast to int would
    change the values.
    """
    if not is_call(node, (torch.clone,), _CAST_METHODS):
        return None
    if node.target in ("to", "type"):
        targets = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
        if len(targets) != 1 or set(node.kwargs) - {"dtype"}:
            return None
        target = targets[0]
        dtype = meta(target).dtype if isinstance(target, fx.Node) else target
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            return None
    if node.target in ("contiguous", "clone") and set(node.kwargs) - {"memory_format"}:
        return None
    out = meta(node)
    if not (isinstance(out, torch.Tensor) and out.dtype.is_floating_point):
        return None
    return node.args[0]


# ---- constants -----------------------------------------------------------------------------------

def const_value(x: Any) -> Optional[float]:
    """A compile-time number: a Python number, or a 0-dim tensor made in the graph from one
    (``torch.full([], c)``, ``torch.tensor(c)``, ``torch.scalar_tensor(c)``)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, Number):
        return float(x)
    if is_call(x, (torch.tensor, torch.scalar_tensor, torch.as_tensor)):
        return const_value(x.args[0]) if x.args else None
    if is_call(x, (torch.full,)):
        size = arg(x, 0, "size")
        if isinstance(size, (list, tuple)) and len(size) == 0:
            return const_value(arg(x, 1, "fill_value"))
    return None


def scalar_factor(node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """(tensor operand, factor) when the node multiplies or divides a tensor by a constant, else None."""
    if is_call(node, (operator.mul, operator.imul, torch.mul), ("mul", "__mul__", "__rmul__")):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        for tensor, c in ((a, b), (b, a)):
            value = const_value(c)
            if value is not None and isinstance(meta(tensor), torch.Tensor) and meta(tensor).dim() > 0:
                return tensor, value
        return None
    if is_call(node, (operator.truediv, operator.itruediv, torch.div, torch.true_divide),
               ("div", "true_divide", "__truediv__")):
        if node.kwargs.get("rounding_mode") is not None:
            return None
        value = const_value(node.args[1] if len(node.args) > 1 else node.kwargs.get("other"))
        if value is not None and value != 0 and isinstance(meta(node.args[0]), torch.Tensor):
            return node.args[0], 1.0 / value
    return None


def runtime_factor(node: fx.Node) -> Optional[tuple[fx.Node, Any, bool]]:
    """(tensor operand, factor, divides) when the node multiplies or divides a tensor by numbers known only at run
    time, one per row at most: a symbolic float (Dynamo lifts Python floats to graph inputs under ``dynamic=True``),
    a 0-dim tensor, or a tensor whose last dim is 1 (a learned per-head temperature, (H, 1, 1); a per-row factor,
    (..., N, 1)); else None."""
    def runtime_number(x):
        value = meta(x)
        if not isinstance(x, fx.Node) or const_value(x) is not None:
            return False
        if isinstance(value, (torch.SymFloat, torch.SymInt)):
            return True
        return isinstance(value, torch.Tensor) and (value.dim() == 0 or (value.dim() >= 2 and value.shape[-1] == 1))

    if is_call(node, (operator.mul, operator.imul, torch.mul), ("mul", "__mul__", "__rmul__")):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        for tensor, c in ((a, b), (b, a)):
            if runtime_number(c) and isinstance(meta(tensor), torch.Tensor) and meta(tensor).dim() > 0:
                return tensor, c, False
    elif is_call(node, (operator.truediv, operator.itruediv, torch.div, torch.true_divide),
                 ("div", "true_divide", "__truediv__")):
        c = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        if (node.kwargs.get("rounding_mode") is None and runtime_number(c)
                and isinstance(meta(node.args[0]), torch.Tensor)):
            return node.args[0], c, True
    return None


def additive_operands(node: fx.Node) -> Optional[tuple[Any, Any, float]]:
    """(a, b, sign) for ``a + b`` / ``a - b`` in any spelling (``alpha=`` unsupported), else None."""
    if node.kwargs.get("alpha", 1) != 1:
        return None
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if is_call(node, (operator.add, operator.iadd, torch.add), ("add", "add_", "__add__", "__radd__")):
        return node.args[0], other, 1.0
    if is_call(node, (operator.sub, operator.isub, torch.sub), ("sub", "sub_", "__sub__")):
        return node.args[0], other, -1.0
    return None


# ---- layout --------------------------------------------------------------------------------------

def perm_of(node: fx.Node) -> Optional[tuple[fx.Node, tuple[int, ...]]]:
    """(input, permutation) for transpose / permute / ``.mT`` / ``.T`` (2-D), else None."""
    if not isinstance(node, fx.Node):
        return None
    src = node.args[0] if node.args else None
    x = meta(src)
    if not isinstance(x, torch.Tensor):
        return None
    n = x.dim()
    if is_call(node, (torch.transpose,), ("transpose", "transpose_")) and node.target != "transpose_":
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        p = list(range(n))
        p[d0 % n], p[d1 % n] = p[d1 % n], p[d0 % n]
        return src, tuple(p)
    if is_call(node, (torch.permute,), ("permute",)):
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(arg(node, 1, "dims"), (list, tuple)) \
            else arg(node, 1, "dims")
        return src, tuple(int(d) % n for d in dims)
    if is_call(node, (getattr,)) and node.args[1] in ("mT", "T") and (node.args[1] == "mT" or n == 2):
        return src, tuple(range(n - 2)) + (n - 1, n - 2)
    if is_call(node, (torch.t,), ("t",)) and n == 2:
        return src, (1, 0)
    return None


def compose(inner: tuple[int, ...], outer: tuple[int, ...]) -> tuple[int, ...]:
    """Permutation of ``x.permute(inner).permute(outer)`` as one ``x.permute(...)``."""
    return tuple(inner[i] for i in outer)


def repeated_heads(node: Any) -> Optional[tuple[fx.Node, int]]:
    """(source, n) when a (B, H, N, D) node is its (B, H / n, N, D) source with each head repeated n times in
    place, head h reading source head h // n (the op's grouped-query order), as grouped-query attention's K/V
    copies are made: transformers' ``repeat_kv`` (``x[:, :, None].expand(B, KV, n, N, D).reshape(B, KV * n, N,
    D)``) or ``x.repeat_interleave(n, dim=1)``. ``x.repeat(1, n, 1, 1)`` (head h reads h % KV) is not one."""
    out = meta(node)
    if not (isinstance(out, torch.Tensor) and out.dim() == 4):
        return None
    if is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        src, n, dim = node.args[0], arg(node, 1, "repeats"), arg(node, 2, "dim")
        x = meta(src)
        if (isinstance(n, int) and not isinstance(n, bool) and n >= 1 and dim in (1, -3)
                and isinstance(x, torch.Tensor) and x.dim() == 4):
            return src, n
        return None
    if not is_call(node, (torch.reshape,), ("reshape", "view")):
        return None
    expanded = node.args[0]
    if not is_call(expanded, (), ("expand",)):
        return None
    unsqueezed = expanded.args[0]
    src = _unsqueeze_2_input(unsqueezed)
    e, x = meta(expanded), meta(src)
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and e.dim() == 5 and isinstance(e.shape[2], int)):
        return None
    b, kv, n, s, d = e.shape
    same = [(x.shape, (b, kv, s, d)), (out.shape, (b, kv * n, s, d))]
    if all(statically_known_true(p == q) for have, want in same for p, q in zip(have, want)):
        return src, n
    return None


def _unsqueeze_2_input(node: Any) -> Any:
    """The 4-D input of ``x.unsqueeze(2)`` / ``x[:, :, None]`` (a new dim 2 of size 1), else None."""
    if is_call(node, (torch.unsqueeze,), ("unsqueeze",)):
        return node.args[0] if arg(node, 1, "dim") in (2, -3) else None
    if is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple):
        every = slice(None, None, None)
        head, rest = node.args[1][:3], node.args[1][3:]
        if head == (every, every, None) and all(i == every or i is Ellipsis for i in rest):
            return node.args[0]
    return None


# ---- contractions (matmul family) ----------------------------------------------------------------

@dataclass
class Contraction:
    """out (batch..., M, N) = factor · left (batch..., M, K) · right_t (batch..., N, K)ᵀ + addend.

    ``left``/``right_t`` are (node, permutation or None): the operand is ``node.permute(perm)``; the right
    operand is kept with its contraction axis last so that for Q·Kᵀ it is K itself. ``out_perm`` maps the
    canonical (batch..., M, N) to the node's real output layout (einsum can write any order).
    """

    left: tuple[fx.Node, Optional[tuple[int, ...]]]
    right_t: tuple[fx.Node, Optional[tuple[int, ...]]]
    factor: float = 1.0
    addend: Optional[fx.Node] = None
    out_perm: Optional[tuple[int, ...]] = None


def _swap_last(n: int) -> tuple[int, ...]:
    return tuple(range(n - 2)) + (n - 1, n - 2)


def contraction(node: fx.Node) -> Optional[Contraction]:
    """Describe a batched matrix product (matmul, @, bmm, baddbmm, two-operand einsum), else None."""
    if is_call(node, (operator.matmul, operator.imatmul, torch.matmul, torch.bmm),
               ("matmul", "bmm", "__matmul__")):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("mat2")
        if not all(isinstance(meta(t), torch.Tensor) for t in (a, b)):
            return None
        if meta(a).dim() < 2 or meta(a).dim() != meta(b).dim():
            return None
        return Contraction((a, None), (b, _swap_last(meta(b).dim())))
    if is_call(node, (torch.baddbmm,), ("baddbmm",)):
        addend, a, b = node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2")
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if const_value(alpha) is None or beta not in (0, 1):
            return None
        # beta = 0 ignores the addend entirely (even NaN in an uninitialised `empty`); beta = 1 adds it.
        return Contraction((a, None), (b, (0, 2, 1)), const_value(alpha), addend if beta == 1 else None)
    if is_call(node, (torch.einsum,)):
        return _einsum(node)
    return None


def _einsum(node: fx.Node) -> Optional[Contraction]:
    """Two-operand einsum 'batch+m+k, batch+n+k -> batch+m+n' with letters in any order in each operand."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        eq, operands = node.args[0], list(node.args[1])
    else:
        eq, operands = node.args[0], list(node.args[1:])
    if not isinstance(eq, str) or len(operands) != 2 or "..." in eq or "->" not in eq:
        return None
    ins, out = eq.replace(" ", "").split("->")
    specs = ins.split(",")
    if len(specs) != 2 or any(len(set(s)) != len(s) for s in (*specs, out)):
        return None
    a, b = specs
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or len(out) < 2:
        return None
    k = contracted[0]
    m_letters = [c for c in a if c not in b and c in out]
    n_letters = [c for c in b if c not in a and c in out]
    batch = [c for c in out if c in a and c in b]
    if len(m_letters) != 1 or len(n_letters) != 1 or len(batch) + 2 != len(out):
        return None
    if set(a) != set(batch) | {m_letters[0], k} or set(b) != set(batch) | {n_letters[0], k}:
        return None
    canon = batch + [m_letters[0], n_letters[0]]
    left_perm = tuple(a.index(c) for c in batch + [m_letters[0], k])
    right_perm = tuple(b.index(c) for c in batch + [n_letters[0], k])
    out_perm = tuple(canon.index(c) for c in out)

    def identity_to_none(p):
        return None if p == tuple(range(len(p))) else p

    return Contraction((operands[0], identity_to_none(left_perm)), (operands[1], identity_to_none(right_perm)),
                       out_perm=identity_to_none(out_perm))
