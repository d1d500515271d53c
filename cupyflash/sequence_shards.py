"""How a sequence is split over the ranks of a context-parallel group, and which (query, key) blocks each ring
step computes.

Layouts, for P ranks:
- ``"zigzag"`` (load-balanced; ring-flash-attention's zigzag, Megatron's head-tail): the sequence is cut into 2P
  equal chunks and rank r holds chunks r and 2P-1-r, so under a causal mask every rank does the same work at
  every ring step;
- ``"contiguous"``: P chunks, rank r holds chunk r (under a causal mask rank P-1 then does P times rank 0's work).

A single rank holds the whole sequence in order whatever the layout, with no constraint on its length.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

LAYOUTS = {"zigzag": 2, "contiguous": 1}  # layout: chunks each rank holds


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout is {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")


def chunks_of(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices rank `rank` holds, in the order it holds them (ascending)."""
    check_layout(layout)
    return (rank, 2 * world_size - 1 - rank) if layout == "zigzag" else (rank,)


def _chunk_len(n: int, world_size: int, layout: str, name: str, dim: int) -> int:
    n_chunks = LAYOUTS[layout] * world_size
    if n % n_chunks:
        raise ValueError(f"{name} dim {dim} (sequence) has {n} entries: {layout} sharding over {world_size} ranks cuts "
                         f"it into {n_chunks} equal chunks, so it must be a multiple of {n_chunks} (pad the sequence)")
    return n // n_chunks


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, *, layout: str = "zigzag", dim: int = 2,
                   name: str = "x") -> torch.Tensor:
    """The part of the full tensor `x` that rank `rank` holds: its chunks along `dim` (2 for (B, H, N, D)),
    concatenated in ascending order. Position ids for rotary embeddings: ``shard_sequence(torch.arange(N), rank,
    world_size, layout=layout, dim=0)``."""
    check_layout(layout)
    if world_size == 1:
        return x
    c = _chunk_len(x.shape[dim], world_size, layout, name, dim)
    return torch.cat([x.narrow(dim, i * c, c) for i in chunks_of(rank, world_size, layout)], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], *, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's shard (`shards[r]` from rank r): shard_sequence's inverse."""
    world_size = len(shards)
    if world_size == 1:
        return shards[0]
    per_rank = LAYOUTS[layout]
    chunks = [None] * (per_rank * world_size)
    for rank, shard in enumerate(shards):
        for i, chunk in zip(chunks_of(rank, world_size, layout), shard.chunk(per_rank, dim=dim)):
            chunks[i] = chunk
    return torch.cat(chunks, dim=dim)


def gather_sequence(local: torch.Tensor, group: Optional["torch.distributed.ProcessGroup"] = None, *,
                    layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full tensor on every rank, from each rank's shard (an all-gather; not differentiable)."""
    import torch.distributed as dist

    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, local.contiguous(), group=group)
    return unshard_sequence(shards, layout=layout, dim=dim)


def check_shards(group: Optional["torch.distributed.ProcessGroup"] = None, **tensors: torch.Tensor) -> None:
    """Raises ValueError on every rank unless each named tensor has the same shape on every rank of `group`.

    Context-parallel attention sizes what it receives from the local shards and cannot see another rank's; a
    mismatch makes gloo abort and NCCL's behaviour undefined. One all-gather of the shapes, and a host sync: call
    it once where the shards are made, not at every layer."""
    import torch.distributed as dist

    max_dims = 8
    mine = torch.full((len(tensors), max_dims), -1, dtype=torch.int64)  # shapes padded: every rank sends as much
    for i, t in enumerate(tensors.values()):
        mine[i, :t.dim()] = torch.tensor(t.shape)
    device = next(iter(tensors.values())).device  # NCCL gathers on the GPU
    gathered = [torch.empty_like(mine, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine.to(device), group=group)
    for rank, theirs in enumerate(t.cpu() for t in gathered):
        for i, name in enumerate(tensors):
            if not torch.equal(theirs[i], mine[i]):
                shape = tuple(d for d in theirs[i].tolist() if d >= 0)
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)} on rank "
                                 f"{dist.get_rank(group)} but {shape} on rank {rank}: context-parallel attention "
                                 f"needs every rank's shards to have the same shape (shard_sequence makes them so)")


@dataclass(frozen=True)
class Block:
    """Local query rows against local keys of the K/V block in hand; `causal`: a diagonal block (query chunk i
    against key chunk i, equal lengths), else every query sees every key."""

    rows: slice
    keys: slice
    causal: bool


@functools.lru_cache(maxsize=4096)
def step_blocks(rank: int, kv_rank: int, world_size: int, layout: str, causal: bool, n_q: int,
                n_k: int) -> tuple[Block, ...]:
    """The blocks rank `rank` computes with the K/V shard of rank `kv_rank` (lengths n_q, n_k local; causal needs
    n_q == n_k): empty (query chunk, key chunk) pairs are skipped and neighbouring ones share one call."""
    everything = Block(slice(0, n_q), slice(0, n_k), causal)
    if not causal or kv_rank == rank:
        # Causal with its own shard (always so on one rank): both hold the same chunks in ascending order, so local
        # causal order is global causal order (key chunk j is full for query chunk i > j, diagonal for i = j, empty
        # for i < j).
        return (everything,)
    c = n_q // LAYOUTS[layout]
    q_chunks, k_chunks = chunks_of(rank, world_size, layout), chunks_of(kv_rank, world_size, layout)
    # Disjoint chunk sets: query chunk i sees all of key chunks j < i, which are a prefix of the ascending k_chunks;
    # consecutive query chunks with the same prefix make one block.
    blocks: list[Block] = []
    for i, chunk in enumerate(q_chunks):
        n_seen = sum(j < chunk for j in k_chunks)
        if n_seen == 0:
            continue
        keys = slice(0, n_seen * c)
        if blocks and blocks[-1].keys == keys:
            blocks[-1] = Block(slice(blocks[-1].rows.start, (i + 1) * c), keys, False)
        else:
            blocks.append(Block(slice(i * c, (i + 1) * c), keys, False))
    return tuple(blocks)
