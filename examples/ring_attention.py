"""Causal self-attention over one long sequence split across processes (context parallelism, ring attention).

    torchrun --nproc-per-node 2 examples/ring_attention.py          # GPUs with NCCL if any, else CPUs with gloo
    torchrun --nproc-per-node 8 examples/ring_attention.py --seqlen 262144 --method all_to_all

Each rank holds its zigzag shard of the token embeddings (and their positions, for rotary embeddings), projects it
to q, k, v and calls the ContextParallelAttention layer (ring attention by default); the loss's backward runs the
ring backwards. Rank 0 then checks the gathered output and the projection's gradient against one process attending
to the whole sequence.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import cupyflash
from cupyflash.distributed import ContextParallelAttention, check_shards, gather_sequence, shard_sequence


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=None, help="total tokens (default: 16384 on GPUs, 1024 on CPUs)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--method", choices=("ring", "all_to_all"), default="ring",
                        help="all_to_all needs the heads to be a multiple of the ranks")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # NCCL's point-to-point ops need it set
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = args.seqlen or (16384 if cuda else 1024)
    d_model = args.heads * args.head_dim

    torch.manual_seed(0)  # the same weights and inputs on every rank
    proj = torch.nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)
    x = torch.randn(1, n, d_model, device=device, dtype=dtype)  # (B, N, d_model): the full sequence
    attention = ContextParallelAttention(causal=True, method=args.method)  # the default group: every rank

    x_local = shard_sequence(x, rank, world, dim=1)  # (B, N / P, d_model): chunks r and 2P-1-r
    # Rotary embeddings take the local tokens' positions: shard_sequence(torch.arange(n), rank, world, dim=0).
    q, k, v = proj(x_local).unflatten(-1, (3, args.heads, args.head_dim)).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N/P, D)
    check_shards(q=q, k=k, v=v)  # once: every rank's shards must have the same shapes
    start = time.perf_counter()
    out = attention(q, k, v)  # (B, H, N / P, D): this rank's queries over all N keys
    out.square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    full_out = gather_sequence(out.detach(), dim=2)  # (B, H, N, D)
    grad = proj.weight.grad.clone()
    dist.all_reduce(grad)  # every rank's share of the weight's gradient
    if rank == 0:
        proj.zero_grad()
        q, k, v = proj(x).unflatten(-1, (3, args.heads, args.head_dim)).permute(2, 0, 3, 1, 4)
        ref = cupyflash.flash_attention(q, k, v, causal=True)
        # The loss is a mean over each rank's shard: P equal shards, so the sum of P shard means is P × the mean.
        (ref.square().mean() * world).backward()
        out_err, grad_err = (full_out - ref).abs().max().item(), (grad - proj.weight.grad).abs().max().item()
        print(f"{args.method}: {world} ranks, {n} tokens ({n // world} per rank, {str(dtype)[6:]} on {device}): "
              f"first forward+backward {elapsed * 1e3:.1f} ms (on a GPU it compiles the kernels); "
              f"max |out - single process| = {out_err:.2e}, "
              f"max |dW - single process| = {grad_err:.2e} "
              f"(max |dW| {proj.weight.grad.abs().max().item():.2e})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
