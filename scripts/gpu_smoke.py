"""Quick correctness pass of the torch op on a GPU against an fp32 reference (the full suite is tests/)."""
import itertools
import sys

import torch

import cupyflash


def ref_attention(q, k, v, causal, scale):
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.float(), lse


def main():
    torch.manual_seed(0)
    bad = 0
    dims = [int(x) for x in sys.argv[1:]] or [64, 128]
    for d, dtype, causal, (n_q, n_k) in itertools.product(
            dims, [torch.bfloat16, torch.float16], [False, True], [(1, 1), (17, 17), (113, 203), (203, 113), (256, 256)]):
        q = torch.randn(2, 3, n_q, d, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 3, n_k, d, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, 3, n_k, d, device="cuda", dtype=dtype, requires_grad=True)
        scale = d ** -0.5
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, scale, causal)
        ref, ref_lse = ref_attention(q, k, v, causal, scale)
        g = torch.randn_like(out)
        err = (out.float() - ref).abs().max().item()
        fin = torch.isfinite(ref_lse)
        lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
        grads = [0.0, 0.0, 0.0]
        if d != 256:
            gq = torch.autograd.grad(out, (q, k, v), g)
            qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
            rf, _ = ref_attention(qf, kf, vf, causal, scale)
            gr = torch.autograd.grad(rf, (qf, kf, vf), g.float())
            grads = [(a.float() - b).abs().max().item() for a, b in zip(gq, gr)]
        ok = err < 2e-2 and lse_err < 1e-2 and max(grads) < 5e-2 * max(1, d / 64)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} d={d} {str(dtype)[6:]} causal={causal} {n_q}x{n_k}: out {err:.2e} lse "
              f"{lse_err:.2e} dq {grads[0]:.2e} dk {grads[1]:.2e} dv {grads[2]:.2e}", flush=True)
    print("SMOKE", "FAIL" if bad else "PASS", bad)


if __name__ == "__main__":
    main()
