"""Ring attention's passes on one rank (Liu et al., "Ring Attention with Blockwise Transformers", 2023): the K/V
shards travel around the ring of a torch.distributed group while each rank runs the fused op on the block in hand.

Forward: at step t rank r holds the K/V shard of rank r - t; it posts the send of that shard to r + 1 and the
receive of the next one from r - 1 (``batch_isend_irecv``: NCCL runs them on its own stream, gloo on its
threads), computes its blocks meanwhile, and merges each block's (out, lse) into fp32 accumulators.
Backward: the same trip, each block recomputed by the op's backward with the *global* out and lse (P = exp(S -
lse) is then the block's part of the full softmax, and D = rowsum(dO ∘ O) the global one); dQ accumulates
locally, while dK/dV accumulators (fp32) travel one step behind their K/V shard and arrive home after P passes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import torch_op  # noqa: F401  (registers torch.ops.cupyflash.flash_attn_fwd / flash_attn_bwd)
from .sequence_shards import step_blocks

# gloo matches a receive to a send by (peer, tag): K/V shards and dK/dV accumulators are in flight together.
_KV_TAG, _DKV_TAG = 0, 1


class _InFlight:
    """A tensor being received; wait() returns it once the pass (send and receive) has completed."""

    def __init__(self, works, tensor: torch.Tensor):
        self._works, self._tensor = works, tensor

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()  # on CUDA: the current stream waits for NCCL's; the host does not block
        return self._tensor


class _Ring:
    """This rank's neighbours in `group`: pass_on sends to the next rank and receives from the previous one."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = group.size(), group.rank()
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def pass_on(self, t: torch.Tensor, tag: int) -> _InFlight:
        if self.size == 1:
            return _InFlight((), t)
        incoming = torch.empty_like(t)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self._next, self.group, tag),
                                        dist.P2POp(dist.irecv, incoming, self._prev, self.group, tag)])
        return _InFlight(works, incoming)

    def kv_rank(self, step: int) -> int:
        """Whose K/V shard this rank holds at `step`."""
        return (self.rank - step) % self.size


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """(out, lse) ← the attention over both key sets, in place (out (B, H, n, D), lse (B, H, n) accumulators).

    lse starts at -inf (no key yet: weight exp(-inf) = 0); a block's lse is finite, as every block row sees a key
    (its own in a diagonal block, all of them in a full one), so no -inf - -inf arises."""
    lse_new = torch.logaddexp(lse, lse_b)
    # Two passes over out (addcmul reads out_b in its own dtype, no fp32 copy of it): the merge is memory-bound,
    # and at short shards per GPU its time is no longer small beside the block's.
    out.mul_(torch.exp(lse - lse_new).unsqueeze(-1)).addcmul_(out_b, torch.exp(lse_b - lse_new).unsqueeze(-1))
    lse.copy_(lse_new)


def forward(q, k, v, scale: float, causal: bool, softcap: float, layout: str, group: dist.ProcessGroup):
    """(out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32) of this rank's queries over the whole sequence."""
    ring = _Ring(group)
    acc = _acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, Nq, D)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # (B, H, Nq)
    kv = torch.stack((k, v))  # (2, B, Hkv, Nk, D): one message a step
    for step in range(ring.size):
        incoming = ring.pass_on(kv, _KV_TAG) if step + 1 < ring.size else None
        for b in step_blocks(ring.rank, ring.kv_rank(step), ring.size, layout, causal, q.shape[2], k.shape[2]):
            out_b, lse_b = torch.ops.cupyflash.flash_attn_fwd(
                q[:, :, b.rows], kv[0, :, :, b.keys], kv[1, :, :, b.keys], None, scale, b.causal, softcap=softcap)
            _merge(out[:, :, b.rows], lse[:, :, b.rows], out_b, lse_b)
        if incoming is not None:
            kv = incoming.wait()
    return out.to(q.dtype), lse.to(torch.float32)


def backward(dout, q, k, v, out, lse, scale: float, causal: bool, softcap: float, layout: str,
             group: dist.ProcessGroup):
    """(dq, dk, dv) of this rank's shards, from its dout and the forward's (global) out and lse."""
    ring = _Ring(group)
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, H, Nq, D)
    kv = torch.stack((k, v))  # (2, B, Hkv, Nk, D)
    dkv_incoming = None  # the dK/dV accumulator of the K/V shard in hand, from the previous rank
    for step in range(ring.size):
        incoming = ring.pass_on(kv, _KV_TAG) if step + 1 < ring.size else None
        grads = []
        for b in step_blocks(ring.rank, ring.kv_rank(step), ring.size, layout, causal, q.shape[2], k.shape[2]):
            dq_b, dk_b, dv_b, _ = torch.ops.cupyflash.flash_attn_bwd(
                dout[:, :, b.rows], q[:, :, b.rows], kv[0, :, :, b.keys], kv[1, :, :, b.keys], None,
                out[:, :, b.rows], lse[:, :, b.rows], scale, b.causal, softcap=softcap)
            dq[:, :, b.rows] += dq_b
            grads.append((b.keys, dk_b, dv_b))
        # Waited for only now, after this step's kernels were queued: its pass overlapped them.
        dkv = dkv_incoming.wait() if dkv_incoming is not None else torch.zeros(kv.shape, dtype=acc, device=q.device)
        for keys, dk_b, dv_b in grads:
            dkv[0, :, :, keys] += dk_b
            dkv[1, :, :, keys] += dv_b
        dkv_incoming = ring.pass_on(dkv, _DKV_TAG)  # the last pass brings each rank its own dK/dV
        if incoming is not None:
            kv = incoming.wait()
    dkv = dkv_incoming.wait()
    # Copies: the op's outputs may not alias one another.
    return dq.to(q.dtype), dkv[0].to(k.dtype, copy=True), dkv[1].to(v.dtype, copy=True)


def lse_shape(q_shape, world_size: int) -> tuple:
    """The forward's lse: (B, H, Nq_local), this rank's queries."""
    return tuple(q_shape[:-1])
