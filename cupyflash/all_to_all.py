"""All-to-all context parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023) on one rank: an all-to-all trades this
rank's sequence shard of every head for the whole sequence of H/P heads, the plain op attends, and a second
all-to-all trades the output back. Each rank moves O(N·H·D / P) elements a pass whatever P (the ring moves the
whole K/V), but the heads of q and of k/v must both split over the ranks.

Causal attention needs the sequence in global order, so the gathered shards are reordered by the layout's chunks
(``unshard_sequence``) and split back the same way; without a mask the order of the keys does not matter and the
shards are simply concatenated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import torch_op  # noqa: F401  (registers torch.ops.cupyflash.flash_attn_fwd / flash_attn_bwd)
from .sequence_shards import shard_sequence, unshard_sequence


class _Exchange:
    """All-to-alls on `group`, with the sequence order they keep: the layout's under a causal mask."""

    def __init__(self, group: dist.ProcessGroup, layout: str, causal: bool):
        self.group, self.size = group, group.size()
        self.layout = layout if causal else "contiguous"

    def _swap(self, send: torch.Tensor) -> torch.Tensor:
        """recv[i] ← rank i's send[this rank], along dim 0 (length P)."""
        if self.size == 1:
            return send
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(S, B, H, n, D) sequence shards of S stacked tensors -> (S, B, H/P, P·n, D), this rank's heads."""
        s, b, h, n, d = x.shape
        send = x.reshape(s, b, self.size, h // self.size, n, d)  # (S, B, P, H/P, n, D)
        send = send.permute(2, 0, 1, 3, 4, 5).contiguous()  # (P, S, B, H/P, n, D): part i goes to rank i
        return unshard_sequence(self._swap(send).unbind(0), layout=self.layout, dim=3)

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """to_heads' inverse: (S, B, H/P, N, D) -> (S, B, H, N/P, D)."""
        send = torch.stack([shard_sequence(y, r, self.size, layout=self.layout, dim=3, name="the heads' sequence")
                            for r in range(self.size)])  # (P, S, B, H/P, N/P, D)
        return self._swap(send).permute(1, 2, 0, 3, 4, 5).flatten(2, 3)  # (S, B, H, N/P, D)


def forward(q, k, v, scale: float, causal: bool, softcap: float, layout: str, group: dist.ProcessGroup):
    """(out (B, H, Nq_local, D) in q's dtype, lse (B, H/P, Nq) fp32: the whole sequence of this rank's heads)."""
    ex = _Exchange(group, layout, causal)
    q_h, = ex.to_heads(q.unsqueeze(0))  # (B, H/P, Nq, D)
    k_h, v_h = ex.to_heads(torch.stack((k, v)))  # (B, Hkv/P, Nk, D)
    out_h, lse_h = torch.ops.cupyflash.flash_attn_fwd(q_h, k_h, v_h, None, scale, causal, softcap=softcap)
    return ex.to_sequence(out_h.unsqueeze(0))[0], lse_h


def backward(dout, q, k, v, out, lse_h, scale: float, causal: bool, softcap: float, layout: str,
             group: dist.ProcessGroup):
    """(dq, dk, dv) of this rank's shards; q, k, v and out are exchanged again rather than kept by the forward."""
    ex = _Exchange(group, layout, causal)
    q_h, out_h, dout_h = ex.to_heads(torch.stack((q, out, dout)))
    k_h, v_h = ex.to_heads(torch.stack((k, v)))
    dq_h, dk_h, dv_h, _ = torch.ops.cupyflash.flash_attn_bwd(dout_h, q_h, k_h, v_h, None, out_h, lse_h, scale, causal,
                                                              softcap=softcap)
    dk, dv = ex.to_sequence(torch.stack((dk_h, dv_h)))
    return ex.to_sequence(dq_h.unsqueeze(0))[0], dk.clone(), dv.clone()  # clones: outputs may not alias


def lse_shape(q_shape, world_size: int) -> tuple:
    """The forward's lse: (B, H/P, Nq), the whole sequence of this rank's heads."""
    batch, heads, n_local, _ = q_shape
    return batch, heads // world_size, n_local * world_size
