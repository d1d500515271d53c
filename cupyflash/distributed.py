"""Context-parallel attention: a sequence too long for one device, sharded across the ranks of a torch.distributed
process group (NCCL on GPUs, gloo on CPUs), attended to with the fused op.

- ``context_parallel_attention(q, k, v, group=..., causal=..., method=...)``: each rank passes its (B, H, N_local,
  D) shards and gets its shard of the output; differentiable in q, k, v. Methods: ``"ring"`` (``cupyflash.ring``:
  K/V shards travel around the ring, any head counts) and ``"all_to_all"`` (``cupyflash.all_to_all``, DeepSpeed-
  Ulysses: heads and sequence traded by all-to-alls; the heads of q and k/v must split over the ranks). Under
  ``torch.compile`` each is one custom op (``torch.ops.cupyflash.ring_attn_fwd`` / ``all_to_all_attn_fwd``, with
  fake implementations and autograd), so Dynamo traces through it without a graph break.
- ``ContextParallelAttention``: the same as an ``nn.Module`` a model's attention can call.
- ``shard_sequence`` / ``unshard_sequence`` / ``gather_sequence``: the layouts (``cupyflash.sequence_shards``).

Every rank must pass shards of the same shapes, as ``shard_sequence`` makes them (receives are sized from the
local shard; ``check_shards`` verifies it once). Refused: a bias or mask tensor, dropout, sliding windows.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from . import all_to_all, ring
from .sequence_shards import LAYOUTS, check_layout, check_shards, gather_sequence, shard_sequence, unshard_sequence
from .torch_op import why_unsupported

__all__ = ["context_parallel_attention", "ContextParallelAttention", "shard_sequence", "unshard_sequence",
           "gather_sequence", "check_shards"]

Group = Union[dist.ProcessGroup, str, None]


def group_name(group: Group) -> str:
    """The registered name of `group` (None: the default group), which the custom ops take."""
    if isinstance(group, str):
        return group
    return (group or dist.distributed_c10d._get_default_group()).group_name


def _resolve(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def _check(method: str, q, k, v, world_size: int, layout: str, causal: bool) -> None:
    reason = why_unsupported(q, k, v)
    if reason is not None:
        raise ValueError(f"context-parallel attention: {reason}")
    check_layout(layout)
    if method == "all_to_all":
        for name, t in (("q", q), ("k", k)):
            if t.shape[1] % world_size:
                raise ValueError(f"{name} dim 1 (heads) is {t.shape[1]}: method='all_to_all' splits the heads over "
                                 f"{world_size} ranks, so it must be a multiple of {world_size}; method='ring' takes "
                                 f"any")
    if not causal or world_size == 1:
        return
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal context-parallel attention is self-attention over one sharded sequence: q dim 2 "
                         f"(local seqlen) is {q.shape[2]} but k's is {k.shape[2]}; expected equal shards")
    per_rank = LAYOUTS[layout]
    if q.shape[2] % per_rank:
        raise ValueError(f"q dim 2 (local seqlen) is {q.shape[2]}: the {layout} layout holds {per_rank} equal chunks "
                         f"per rank, so it must be a multiple of {per_rank} (shard_sequence makes such shards from a "
                         f"sequence that is a multiple of {per_rank * world_size})")


def _define_ops(method: str, module) -> None:
    """cupyflash::{method}_attn_fwd / _bwd over module.forward / module.backward, with fakes and autograd. The
    forward returns (out, lse): lse as the module keeps it for its backward, which takes it back."""
    fwd_name, bwd_name = f"cupyflash::{method}_attn_fwd", f"cupyflash::{method}_attn_bwd"

    @torch.library.custom_op(fwd_name, mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, softcap: float,
            layout: str, group_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = _resolve(group_name)
        _check(method, q, k, v, group.size(), layout, causal)
        return module.forward(q, k, v, scale, causal, softcap, layout, group)

    @fwd.register_fake
    def _(q, k, v, scale, causal, softcap, layout, group_name):
        world_size = _resolve(group_name).size()
        _check(method, q, k, v, world_size, layout, causal)
        return q.new_empty(q.shape), q.new_empty(module.lse_shape(q.shape, world_size), dtype=torch.float32)

    @torch.library.custom_op(bwd_name, mutates_args=())
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, scale: float, causal: bool, softcap: float, layout: str,
            group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return module.backward(dout, q, k, v, out, lse, scale, causal, softcap, layout, _resolve(group_name))

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, scale, causal, softcap, layout, group_name):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, *ctx.options = inputs  # scale, causal, softcap, layout, group_name
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)

    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(dout.contiguous(), q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    METHODS[method] = fwd


METHODS = {}  # method: its forward op
_define_ops("ring", ring)
_define_ops("all_to_all", all_to_all)


def _refuse(attn_bias, window, dropout_p) -> None:
    if attn_bias is not None:
        raise ValueError("context-parallel attention takes no attn_bias: a bias or mask tensor would have to be "
                         "sharded along both sequence dims; use causal=True for a causal mask")
    if tuple(window) != (-1, -1):
        raise ValueError(f"context-parallel attention takes no sliding window (got window={tuple(window)}); expected "
                         f"(-1, -1)")
    if dropout_p != 0.0:
        raise ValueError(f"context-parallel attention takes no dropout (got dropout_p={dropout_p}); expected 0.0")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method is {method!r}; expected one of {', '.join(map(repr, METHODS))}")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               attn_bias: Optional[torch.Tensor] = None, *, group: Group = None,
                               scale: Optional[float] = None, causal: bool = False, layout: str = "zigzag",
                               method: str = "ring", window: tuple = (-1, -1), dropout_p: float = 0.0,
                               softcap: float = 0.0) -> torch.Tensor:
    """softmax(scale · q kᵀ) v over a sequence sharded across `group` (a ProcessGroup, its name, or None for the
    default group): each rank passes its shards q (B, H, N_local, D), k and v (B, H_kv, N_local', D; H_kv may
    divide H: grouped-query) and gets its (B, H, N_local, D) shard of the output.

    ``layout`` says which positions each rank holds (``cupyflash.sequence_shards``); it matters only with
    ``causal``, which masks by global position (each rank then needs N_local = N_local', a multiple of the chunks
    the layout gives a rank). ``method``: "ring" or "all_to_all" (module docstring). ``softcap`` as in
    ``cupyflash.flash_attention``. A group of one rank computes exactly the plain op.
    ``attn_bias``, ``window`` and ``dropout_p`` are refused unless left at their defaults.
    """
    _refuse(attn_bias, window, dropout_p)
    _check_method(method)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return METHODS[method](q, k, v, float(scale), bool(causal), float(softcap), layout, group_name(group))[0]


class ContextParallelAttention(torch.nn.Module):
    """Context-parallel attention as a layer: ``forward(q, k, v)`` on this rank's (B, H, N_local, D) shards.

    The group is resolved to its name when the layer is built (so build it after ``init_process_group``), and
    ``torch.compile`` sees a constant."""

    def __init__(self, group: Group = None, *, causal: bool = False, scale: Optional[float] = None,
                 layout: str = "zigzag", method: str = "ring", softcap: float = 0.0):
        super().__init__()
        check_layout(layout)
        _check_method(method)
        self.group_name = group_name(group)
        self.causal, self.scale, self.layout, self.method, self.softcap = causal, scale, layout, method, softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return context_parallel_attention(q, k, v, group=self.group_name, scale=self.scale, causal=self.causal,
                                          layout=self.layout, method=self.method, softcap=self.softcap)

    def extra_repr(self) -> str:
        return f"group={self.group_name!r}, method={self.method!r}, causal={self.causal}, layout={self.layout!r}"
