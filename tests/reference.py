"""Reference attention and the tolerance rule every GPU check uses.

- ``attention_ref``: naive softmax(scale · Q Kᵀ + bias) V with the kernels' semantics (cupyflash/cpu_attention.py:
  causal mask and window aligned to the bottom-right corner, bias <= -1e30 masks its key, boolean masks,
  grouped-query K/V, a given dropout keep mask; rows that see no key give out = 0 and lse = +inf), returning
  out, lse and, through autograd, dq, dk, dv (and dbias). With ``compute_dtype=torch.float32`` (or float64)
  it is a reference; with the inputs' own fp16/bf16 dtype it is "the same-dtype PyTorch math" the rule
  measures against.
- ``semantics_ref``: the op's own exact implementation (``cupyflash.cpu_attention``) run in fp32 on the
  inputs' device: the fp32 reference of the feature tests (bias, windows, grouped-query, dropout).
- ``assert_within_rule``: FlashAttention's test rule (tests/test_flash_attn.py in Dao-AILab/flash-attention:
  ``(out - out_ref).abs().max() <= 2 * (out_pt - out_ref).abs().max()``): our error against the fp32
  reference may be at most ``factor`` × the error of the same-dtype PyTorch math, plus a rounding floor.
- ``poison_cuda_allocator``: makes the op's fresh torch allocations land on NaN-filled memory, so an output
  element the kernel forgets to write shows up as NaN instead of a lucky zero.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from cupyflash.cpu_attention import MASKED_BIAS, MASKED_LOGIT, backward as _semantics_bwd, forward as _semantics_fwd
from cupyflash.params import keep_probability

OUT_FACTOR = 2  # out and lse
GRAD_FACTOR = 3  # dq, dk, dv: the backward rounds more often (P, dS in fp16/bf16), FlashAttention allows 3x
# Absolute part of the floor: fp32 accumulation noise where the exact value cancels to ~0 (e.g. dq for
# Nk = 1: dS = P (dP - D) is exactly 0 in the fp16 math, ~1e-7 in any fp32 accumulation order).
ABS_FLOOR = 1e-5


@dataclass
class AttentionResult:
    out: torch.Tensor  # (B, H, Nq, D)
    lse: torch.Tensor  # (B, H, Nq), natural log, +inf for rows that see no key
    dq: Optional[torch.Tensor] = None
    dk: Optional[torch.Tensor] = None
    dv: Optional[torch.Tensor] = None
    dbias: Optional[torch.Tensor] = None  # shaped like the bias, when its gradient was asked for


def seed_from(*params) -> int:
    """A stable seed from test parameters (str() of each), so every case draws its own inputs."""
    return zlib.crc32(repr(params).encode())


def causal_keep_mask(n_q: int, n_k: int, device) -> torch.Tensor:
    """(Nq, Nk) bool: query i sees key j iff j <= i + Nk - Nq (bottom-right aligned)."""
    rows = torch.arange(n_q, device=device).unsqueeze(1)  # (Nq, 1)
    cols = torch.arange(n_k, device=device).unsqueeze(0)  # (1, Nk)
    return cols <= rows + (n_k - n_q)


def visible_mask(n_q: int, n_k: int, causal: bool, window, device) -> torch.Tensor:
    """(Nq, Nk) bool: query i sees key j iff i + diag - left <= j <= i + diag + right, diag = Nk - Nq; causal
    clips right to 0; -1 is unbounded."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    rows = torch.arange(n_q, device=device).unsqueeze(1)  # (Nq, 1)
    cols = torch.arange(n_k, device=device).unsqueeze(0)  # (1, Nk)
    offset = cols - rows - (n_k - n_q)  # (Nq, Nk): key's distance right of the diagonal
    keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= offset <= right
    if left >= 0:
        keep &= offset >= -left
    return keep


@contextlib.contextmanager
def _no_tf32():
    """fp32 matmuls on Ampere+ may run as TF32 (10-bit mantissa) when a global flag is on; the reference
    must be true fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def attention_ref(q, k, v, dout=None, *, scale: float, causal: bool, compute_dtype=torch.float32,
                  bias=None, window=(-1, -1), dropout_keep=None, dropout_p: float = 0.0,
                  bias_grad: bool = False, softcap: float = 0.0) -> AttentionResult:
    """Naive attention in ``compute_dtype`` on q's device; gradients w.r.t. q, k, v (and a floating ``bias``
    when ``bias_grad``) when ``dout`` is given.

    ``softcap`` > 0 caps the scores before the bias: softcap · tanh(scale · Q Kᵀ / softcap) (autograd gives the
    cap's derivative).

    ``bias``: additive (any float dtype; values <= -1e30 mask their key as in cpu_attention: -inf gets weight 0,
    others become MASKED_LOGIT, whose gradient still flows as in eager softmax where finfo.min absorbs the
    score) or boolean (True = keep), broadcastable to (B, H, Nq, Nk). k and v may have fewer heads than q.
    ``dropout_keep``: bool (B, H, Nq, Nk); kept probabilities are scaled by 1 / keep_probability(``dropout_p``)
    (1 - p to a multiple of 1/256).
    Results stay in ``compute_dtype`` (the fp32 reference is not rounded back to fp16/bf16).
    """
    with _no_tf32(), torch.enable_grad():
        grad = dout is not None
        qc, kc, vc = (t.detach().to(compute_dtype).requires_grad_(grad) for t in (q, k, v))
        n_q, n_k = q.shape[-2], k.shape[-2]
        group = q.shape[1] // k.shape[1]
        kw, vw = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (kc, vc))  # (B, H, Nk, D)
        # lse from the (rounded) scores in at least fp32, as the kernels keep it
        lse_dtype = torch.promote_types(compute_dtype, torch.float32)
        s = torch.matmul(qc * scale, kw.transpose(-1, -2))  # (B, H, Nq, Nk)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        visible = visible_mask(n_q, n_k, causal, window, q.device)  # (Nq, Nk), broadcast below
        bias_leaf, soft = None, None
        if bias is not None and bias.dtype == torch.bool:
            visible = visible & bias
        elif bias is not None:
            bias_leaf = bias.detach().clone().requires_grad_(grad and bias_grad)
            hard = bias_leaf == float("-inf")
            soft = (bias_leaf <= MASKED_BIAS) & ~hard  # e.g. finfo.min: the logit becomes MASKED_LOGIT
            b0 = bias_leaf.masked_fill(hard, 0.0)
            # Masked entries add 0 here (their value is replaced below) but pass their gradient on, as eager's
            # s + finfo.min does; converting before this would turn finfo.min(fp32) into -inf in fp16.
            b0 = torch.where(soft, b0 - b0.detach(), b0)
            s = s + b0.to(compute_dtype)
            s = torch.where(soft, MASKED_LOGIT + (s - s.detach()), s)
            visible = visible & ~hard
        has_key = visible.any(dim=-1, keepdim=True)  # (..., Nq, 1)
        # Rows without any key keep finite scores (masking all of them to -inf would make softmax and its
        # backward NaN); their probabilities are zeroed below instead.
        s = s.masked_fill(~visible & has_key, float("-inf"))
        p = torch.softmax(s, dim=-1) * has_key.to(compute_dtype)
        s_lse = s.detach().to(lse_dtype)
        if soft is not None:
            s_lse = s_lse.masked_fill(soft, MASKED_LOGIT)  # the exact constant, not its fp16/bf16 rounding
        lse = torch.logsumexp(s_lse.masked_fill(~visible, float("-inf")), dim=-1)  # (B, H, Nq)
        lse = lse.masked_fill(~has_key.squeeze(-1), float("inf"))
        if dropout_keep is not None:
            p = p * (dropout_keep.to(device=q.device, dtype=compute_dtype) / keep_probability(dropout_p))
        out = torch.matmul(p, vw)  # (B, H, Nq, D)
        result = AttentionResult(out.detach(), lse)
        if grad:
            wrt = (qc, kc, vc) + ((bias_leaf,) if bias_leaf is not None and bias_grad else ())
            grads = torch.autograd.grad(out, wrt, dout.to(compute_dtype))
            result.dq, result.dk, result.dv = grads[:3]
            result.dbias = grads[3] if len(grads) > 3 else None
    return result


def semantics_ref(q, k, v, dout=None, *, scale: float, causal: bool, bias=None, window=(-1, -1),
                  dropout_p: float = 0.0, seed: int = 0, bias_grad: bool = False,
                  softcap: float = 0.0) -> AttentionResult:
    """``cupyflash.cpu_attention`` (the op's semantics) on fp32 copies of the inputs, on their device, with true
    fp32 matmuls: out, lse and, when ``dout`` is given, dq, dk, dv (and dbias in fp32 when ``bias_grad``)."""
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    b32 = None if bias is None else bias.detach() if bias.dtype == torch.bool else bias.detach().float()
    with _no_tf32():
        out, lse = _semantics_fwd(q32, k32, v32, b32, scale, causal, tuple(window), dropout_p, seed, softcap=softcap)
        result = AttentionResult(out, lse)
        if dout is not None:
            result.dq, result.dk, result.dv, result.dbias = _semantics_bwd(
                dout.detach().float(), q32, k32, v32, b32, out, lse, scale, causal, tuple(window), dropout_p, seed,
                bias_grad, softcap=softcap)
    return result


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """One unit in the last place of ``dtype`` at the tensor's largest magnitude, plus ``ABS_FLOOR``.

    Storing a result in fp16/bf16 alone costs up to half an ulp, and two correct computations may round to
    neighbouring values; the same-dtype PyTorch error can be ~0 by luck (e.g. Nk = 1, where out = v exactly),
    so without this floor the rule would demand bit-exactness there.
    """
    finite = ref[torch.isfinite(ref)]
    top = finite.abs().max().item() if finite.numel() else 0.0
    return torch.finfo(dtype).eps * top + ABS_FLOOR


def assert_within_rule(ours: torch.Tensor, ref_fp32: torch.Tensor, same_dtype_torch: torch.Tensor, factor: float,
                       floor: float, name: str) -> None:
    """max|ours - ref| <= factor · max|same_dtype_torch - ref| + floor, with identical non-finite entries.

    Non-finite reference entries (lse = +inf for rows that see no key) must be matched exactly by ours;
    NaN in ours fails. Errors are measured in fp64 on the finite entries.
    """
    assert ours.shape == ref_fp32.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref_fp32.shape)}"
    assert not torch.isnan(ours).any(), (f"{name}: {int(torch.isnan(ours).sum())} NaN of {ours.numel()} "
                                         f"(unwritten output? first at {_first_index(torch.isnan(ours))})")
    o, r, p = (t.detach().to(torch.float64) for t in (ours, ref_fp32, same_dtype_torch))
    ref_finite = torch.isfinite(r)
    wrong_nonfinite = (torch.isfinite(o) != ref_finite) | (~ref_finite & (o != r))
    assert not wrong_nonfinite.any(), (
        f"{name}: {int(wrong_nonfinite.sum())} entries differ in finiteness from the reference; first at "
        f"{_first_index(wrong_nonfinite)}: ours {o[wrong_nonfinite][0].item()}, ref {r[wrong_nonfinite][0].item()}")
    if not ref_finite.any():
        return
    err = (o - r).abs().masked_fill(~ref_finite, 0.0)
    pt_err = (p - r).abs().masked_fill(~ref_finite, 0.0).nan_to_num(0.0).max().item()
    bound = factor * pt_err + floor
    worst = err.max().item()
    if worst > bound:
        at = _first_index(err == worst)
        raise AssertionError(
            f"{name}: max|ours - ref| = {worst:.3e} > {factor} x max|torch same-dtype - ref| ({pt_err:.3e}) "
            f"+ floor {floor:.2e} = {bound:.3e}; worst at {at}: ours {o[at].item():.6g}, ref {r[at].item():.6g}; "
            f"{int((err > bound).sum())} of {err.numel()} entries out of bound")


def assert_close_ulps(ours: torch.Tensor, other: torch.Tensor, name: str, ulps: int = 2) -> None:
    """Two runs of our kernels agree to a few ulps of their dtype (the backward may accumulate dq with
    atomics, so the order of fp32 additions, and hence the last bit after rounding, can differ)."""
    assert ours.shape == other.shape and ours.dtype == other.dtype, (
        f"{name}: {tuple(ours.shape)} {ours.dtype} vs {tuple(other.shape)} {other.dtype}")
    a, b = ours.detach().double(), other.detach().double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), f"{name}: non-finite entries differ"
    finite = torch.isfinite(b)
    eps = torch.finfo(ours.dtype).eps
    tol = ulps * eps * (b[finite].abs().max().item() if finite.any() else 0.0) + ABS_FLOOR
    worst = (a - b).abs()[finite].max().item() if finite.any() else 0.0
    assert worst <= tol, f"{name}: max difference {worst:.3e} > {ulps} ulp bound {tol:.3e}"


def assert_dropout_runs_agree(runs) -> None:
    """`runs`: (out, lse, dq, dk, dv, dbias) of three runs with dropout seeds a, a and b. Same seed: identical out,
    lse, dK and dV bits (dK/dV are written once per block), dQ and dBias equal up to the order of their fp32
    atomics; another seed changes nearly every output element but not the lse (dropout acts after the softmax)."""
    (out1, lse1, dq1, dk1, dv1, db1), (out2, lse2, dq2, dk2, dv2, db2), (out3, lse3, *_) = runs
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    assert torch.equal(dk1, dk2) and torch.equal(dv1, dv2)
    assert_close_ulps(dq1, dq2, "dq, same seed")
    assert_close_ulps(db1, db2, "dbias, same seed")
    assert torch.equal(lse3, lse1), "dropout acts after the softmax: the lse does not depend on the seed"
    changed = (out3 != out1).float().mean().item()
    assert changed > 0.9, f"another seed changed only {changed:.1%} of the outputs"


def poison_cuda_allocator(*byte_sizes: int) -> None:
    """Fill the memory the op's next allocations will get with NaN (all bits 1: NaN in fp16, bf16 and fp32).

    torch allocates the op's outputs, so they cannot be pre-filled; instead this returns every cached free
    block to the driver (``empty_cache``), then allocates one block per expected size, in the order the op
    allocates (outputs first, then workspaces), fills them with 0xFF and frees them. The caching allocator is
    best-fit within a stream's pool, so the op's same-size requests, made in the same order, get exactly these
    blocks back (``test_poison_reaches_fresh_allocations`` checks that on the device). Call it on the stream
    the op will run on: pools are per stream.
    """
    torch.cuda.empty_cache()
    blocks = [torch.empty(max(int(n), 1), dtype=torch.uint8, device="cuda").fill_(0xFF) for n in byte_sizes]
    del blocks


def nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _first_index(mask: torch.Tensor) -> tuple:
    idx = mask.nonzero()
    return tuple(idx[0].tolist()) if idx.numel() else ()


def draw_inputs(batch, h_q, h_kv, n_q, n_k, head_dim, dtype, layout, seed, qk_scale=1.0):
    """q, dout (B, Hq, Nq, D) and k, v (B, Hkv, Nk, D) as CUDA torch tensors; ``transposed``: views of (B, N, H, D)
    tensors. ``qk_scale`` widens the scores (soft-capping saturates only on large ones)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def draw(heads, n, factor=1.0):
        if layout == "contiguous":
            t = torch.randn(batch, heads, n, head_dim, generator=gen, device="cuda", dtype=dtype)
        else:
            assert layout == "transposed", layout
            t = torch.randn(batch, n, heads, head_dim, generator=gen, device="cuda", dtype=dtype).transpose(1, 2)
        return t.mul_(factor) if factor != 1.0 else t

    return draw(h_q, n_q, qk_scale), draw(h_kv, n_k, qk_scale), draw(h_kv, n_k), draw(h_q, n_q)
