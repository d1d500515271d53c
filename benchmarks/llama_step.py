"""A real transformers Llama training step: the cupyflash backend on the eager attention code against what a user
already has (``attn_implementation="sdpa"``, eager and under Inductor), one process, the same weights and batch.

The model is transformers' own LlamaForCausalLM from a config built here (no download): bf16, hidden 2048,
16 query heads and 4 key/value heads of head dim 128 (grouped-query), 4 layers, vocab 32000. The batch has
right padding on every other row (a quarter of its tokens), as a padded fine-tuning batch has, so the eager
code builds its 4-D mask and SDPA gets a mask tensor. One step: forward, loss over real tokens, backward, AdamW.

    python benchmarks/llama_step.py                         # T 2048 x batch 4; writes benchmarks/results/llama-step-<GPU>.md
    python benchmarks/llama_step.py --seq 4096 --batch 2 --no-padding
    python benchmarks/llama_step.py --padding-side left        # rows that see no key: eager's uniform rows
    python benchmarks/llama_step.py --variants inductor-sdpa cupyflash --profile out/   # + kernels per step side by side

Variants: eager-sdpa, inductor-sdpa (the bar: issue 14 asks for <= 0.9x its step time), eager-eager (naive
attention), cupyflash (the eager attention code compiled with backend="cupyflash"), cupyflash-routed-sdpa (the
model written for SDPA compiled with backend="cupyflash", options={"sdpa": "route"}: its calls routed to the op,
their masks proven). Median step time from CUDA
events after warm-up, peak memory, the first step's loss and the backend's mask form per site.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from cupyflash.errors import gpu_missing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_train_step import step_timer  # noqa: E402
from e2e_profile import kernel_stats, report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("eager-sdpa", "inductor-sdpa", "eager-eager", "cupyflash", "cupyflash-routed-sdpa")


def build(args, attn: str) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq,
                                      attn_implementation=attn, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()


def batch(args) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    if args.padding:  # every other row half padding: a quarter of the tokens
        mask[1::2, (-args.seq // 2 if args.padding_side == "right" else 0):][:, :args.seq // 2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.cuda() for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}


def run(name: str, base_sd: dict, args, inputs: dict) -> dict:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    model = build(args, "sdpa" if name.endswith("sdpa") else "eager")
    model.load_state_dict(base_sd)
    route = {"sdpa": "route"} if name == "cupyflash-routed-sdpa" else {}
    if name == "inductor-sdpa":
        model = torch.compile(model)
    elif name.startswith("cupyflash"):
        model = torch.compile(model, backend="cupyflash", options=route or None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    losses = []

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    timed = step_timer(torch.device("cuda"))
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    times = [timed(step) for _ in range(args.steps)]
    row = {"variant": name, "ms": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
           "loss0": losses[0].item(), "fused": counters["cupyflash"]["attention_fused"]}
    if args.profile:
        row["profile"] = profile_steps(name, step, args.steps, args.profile)
        row["profile"].update(variant=name, wall_ms=row["ms"], host_ms=float("nan"))
    if name.startswith("cupyflash"):
        import compile_backend
        plain = build(args, "sdpa" if route else "eager")
        plain.load_state_dict(base_sd)
        row["forms"] = sorted({s.mask_form for s in compile_backend.explain(plain, **inputs, options=route).fused})
        del plain
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def profile_steps(name: str, step, steps: int, out: Path) -> dict:
    """``steps`` steps under torch.profiler: GPU busy time and every kernel's count and µs per step."""
    from torch.profiler import ProfilerActivity, profile
    out.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    trace = out / f"llama-{name}.trace.json"
    prof.export_chrome_trace(str(trace))
    stats = kernel_stats(trace, steps)
    trace.unlink()  # hundreds of MB; the report keeps what it says
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--no-padding", dest="padding", action="store_false")
    p.add_argument("--padding-side", choices=("right", "left"), default="right",
                   help="left: the padded rows' first queries see no key under the causal mask (eager's uniform rows)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", type=Path, help="also profile each variant's steps; the kernels side by side go to "
                   "PROFILE/llama-profile-<T>x<batch>x<layers>.md")
    args = p.parse_args(argv)
    if gpu_missing("llama_step.py"):
        return 2
    gpu = torch.cuda.get_device_name()
    inputs = batch(args)
    base_sd = copy.deepcopy(build(args, "eager").state_dict())
    rows = []
    for name in args.variants:
        try:
            rows.append(run(name, base_sd, args, inputs))
        except Exception as e:  # one variant's failure is a row of the table, not the end of the run
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
        print({k: v for k, v in rows[-1].items() if k != "profile"}, flush=True)
    bar = next((r["ms"] for r in rows if r["variant"] == "inductor-sdpa" and "ms" in r), None)
    lines = [f"# transformers Llama training step on {gpu}",
             "", f"torch {torch.__version__}; bf16; T {args.seq} x batch {args.batch}, hidden {args.hidden}, "
             f"{args.heads} heads / {args.kv_heads} kv heads (head dim {args.hidden // args.heads}), {args.layers} layers; "
             f"{args.padding_side + ' padding on every other row' if args.padding else 'no padding'}; median of {args.steps} "
             "steps.",
             "", "| variant | step ms | / inductor-sdpa | peak GiB | first loss | fused sites | mask forms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['ms'] / bar:.2f}" if bar else "–"
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {ratio} | {r['peak_gib']:.2f} | {r['loss0']:.4f} | "
                     f"{r['fused']} | {', '.join(r.get('forms', []))} |")
    text = "\n".join(lines) + "\n"
    print(text)
    profiled = [r["profile"] for r in rows if "profile" in r]
    if profiled:
        shape = (args.seq, args.batch, args.layers)
        kernels = report(profiled, shape, top=40, model="transformers Llama")
        (args.profile / f"llama-profile-{'x'.join(map(str, shape))}.md").write_text(kernels)
        print(kernels)
    out = args.out or RESULTS / f"llama-step-{gpu.replace(' ', '_')}.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
