"""The torch face: ``cupyflash::flash_attn_fwd`` / ``cupyflash::flash_attn_bwd`` custom ops with fake
(meta) implementations and autograd, usable in eager, under ``torch.compile`` and in CUDA graphs.

CUDA tensors run the kernels (compiled by CuPy, launched through the driver: cupyflash/driver.py) on torch's current
stream with outputs allocated by torch; CPU tensors run the exact CPU path in ``cpu_attention`` (same semantics:
torch's CPU attention kernels where their results are ours, a chunked online softmax otherwise).
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Optional

import torch
from torch.autograd import forward_ad

from . import cpu_attention
from . import unseen_rows as unseen
from .array_ops import token_major_strides
from .tiles import no_backward_why
from .validate import (GPU_DTYPES, GPU_HEAD_DIMS, TF32_HOW, TensorInfo, check_attention_inputs,
                       check_backward_inputs, check_bias_grad, check_causal, check_real, check_scale, check_softcap,
                       check_window, default_scale, effective_window, is_empty, kernel_head_dim)

log = logging.getLogger(__name__)


def tf32_allowed() -> bool:
    """Whether torch's settings let fp32 matmuls round to TF32, which the fp32 CUDA kernels do.

    The fp32_precision API (torch >= 2.9) reflects the legacy flags too; its "none" means no choice was made
    through it, so the legacy flags decide. Reading a legacy flag raises once the new API has been used, hence
    this order. https://pytorch.org/docs/main/notes/cuda.html#tensorfloat-32-tf32-on-ampere-and-later-devices
    """
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision != "none":
        return precision == "tf32"
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


def _layout(t: Optional[torch.Tensor]) -> Optional[tuple]:
    """What the input checks read of a tensor: (shape, strides, dtype, device)."""
    return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)


def _info(name: str, layout: tuple) -> TensorInfo:
    shape, strides, dtype, device = layout
    return TensorInfo(name, shape, strides, str(dtype).removeprefix("torch."), str(device))


def _check_layouts(q, k, v, bias, tf32: bool) -> None:
    """check_attention_inputs on _layout()s of q, k, v and the bias (or None)."""
    check_attention_inputs(_info("q", q), _info("k", k), _info("v", v),
                           None if bias is None else _info("attn_bias", bias), on_gpu=q[3].type == "cuda",
                           tf32_allowed=tf32)


# Every call checks its inputs, and a model calls with the same few layouts again and again: 16 µs of an H100 host's
# ~125 per forward, a dict lookup once seen. Only passing checks are cached (lru_cache keeps no exceptions).
_check_layouts_cached = functools.lru_cache(maxsize=1024)(_check_layouts)


def _check_tensors(q, k, v, attn_bias) -> None:
    layouts = [_layout(t) for t in (q, k, v, attn_bias)]
    tf32 = q.device.type == "cuda" and q.dtype == torch.float32 and tf32_allowed()
    # Plain tensors only: fake tensors' sizes may be symbolic, which do not hash; and not in code Dynamo traces
    # (flash_attention's dropout_p = 1 path), which would trace through the cache.
    plain = all(type(t) is torch.Tensor for t in (q, k, v, attn_bias) if t is not None)
    (_check_layouts_cached if plain and not torch.compiler.is_compiling() else _check_layouts)(*layouts, tf32)


def _check(q, k, v, attn_bias, window=(-1, -1), dropout_p=0.0, dropout_seed=None, softcap=0.0, scale=1.0):
    _check_tensors(q, k, v, attn_bias)
    check_scale(scale)
    for name, w in zip(("window_left", "window_right"), window):
        if w < -1:
            raise ValueError(f"{name} is {w}; expected a number of keys >= 0, or -1 for unbounded")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p is {dropout_p}; expected 0 <= dropout_p < 1 (cupyflash.flash_attention takes "
                         f"1, which drops every probability, and returns zeros, as SDPA)")
    if dropout_p > 0 and dropout_seed is None:
        raise ValueError(f"dropout_seed is None but dropout_p is {dropout_p}; expected a one-element int64 tensor")
    # The kernels read the seed from device memory (so a CUDA graph replays a fresh draw), hence q's device.
    if dropout_seed is not None and (dropout_seed.dtype != torch.int64 or dropout_seed.numel() != 1
                                     or dropout_seed.device != q.device):
        raise ValueError(f"dropout_seed has shape {tuple(dropout_seed.shape)}, dtype {dropout_seed.dtype} and is on "
                         f"{dropout_seed.device}; expected one int64 element on q's device ({q.device})")
    check_softcap(softcap)


def why_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_bias: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if the op can take these inputs (real or fake tensors), else a one-line reason."""
    if q.device.type == "cuda":
        dtype = str(q.dtype).removeprefix("torch.")
        if dtype not in GPU_DTYPES:
            return f"dtype {dtype} on CUDA: the kernels take {', '.join(GPU_DTYPES)}"
        if dtype == "float32" and not tf32_allowed():
            return (f"float32 on CUDA runs on TF32 tensor cores, which torch's settings do not allow "
                    f"(fusing would lower the precision the model asked for); {TF32_HOW}")
        head_dim = max(q.shape[-1], v.shape[-1])
        kernel_d = kernel_head_dim(head_dim)
        if kernel_d is None:
            return f"head_dim {head_dim} on CUDA: the kernels support head dims up to {GPU_HEAD_DIMS[-1]}"
        why = no_backward_why(dtype, head_dim, kernel_d)
        if why is not None and any(t.requires_grad for t in (q, k, v)):
            return f"gradients on CUDA: {why}"
    elif q.device.type != "cpu":
        return f"device {q.device.type}: only cuda and cpu are supported"
    try:
        _check(q, k, v, attn_bias)
    except (ValueError, TypeError) as err:
        return str(err)
    return None


@torch.library.custom_op("cupyflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor],
                   scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
                   dropout_p: float = 0.0, dropout_seed: Optional[torch.Tensor] = None, softcap: float = 0.0,
                   token_major_out: bool = False, unseen_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, H, Nq, D), lse (B, H, Nq) fp32), both contiguous whatever the strides of q, k, v (as
    a matmul's output would be); with ``token_major_out`` out's memory is (B, Nq, H, D), as SDPA's
    (array_ops.token_major_strides): ``out.transpose(1, 2)`` is then contiguous. ``dropout_seed``: one int64
    element on q's device, read by the kernels on the device (never synchronised to the host). Semantics:
    cupyflash/cpu_attention.py; ``unseen_rows`` (cupyflash/unseen_rows.py): 0, a row that sees no key is 0 (lse
    +inf); 1 or 2, it is eager's row under a finite mask fill, uniform over all keys (lse still +inf), with the
    gradients of a fill that replaced the scores (1) or was added to them (2)."""
    return _forward(q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed, softcap,
                    token_major_out, unseen_rows)


def _forward(q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed, softcap,
             token_major_out=False, unseen_rows=0):
    """flash_attn_fwd's body, which flash_attention runs too (in _EagerAttention with gradients)."""
    out, lse = _attention_forward(q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p,
                                  dropout_seed, softcap, token_major_out)
    if unseen_rows:
        unseen.check_mode(unseen_rows, dropout_p)
        unseen.fill(out, lse, v, unseen_rows)
    return out, lse


def _attention_forward(q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed, softcap,
                       token_major_out):
    """The attention's out and lse (rows without keys 0, lse +inf)."""
    key = None
    if dropout_p == 0.0 and dropout_seed is None and (attn_bias is None or _key_mask_like(attn_bias)):
        key = _plain_key((q, k, v, attn_bias), (scale, causal, window_left, window_right, softcap, token_major_out))
        run = _PLAIN_FORWARDS.get(key)
        if run is not None:
            return run(q, k, v, attn_bias)
    _check(q, k, v, attn_bias, (window_left, window_right), dropout_p, dropout_seed, softcap, scale)
    result = _checked_forward(q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed,
                              softcap, token_major_out)
    if key is not None and key not in _PLAIN_FORWARDS:
        window = effective_window((window_left, window_right), q.shape[2], k.shape[2])
        _remember(_PLAIN_FORWARDS, key, lambda: _impl(q).plain_forward_runner(q, k, v, scale, causal, window, softcap,
                                                                              token_major_out, attn_bias))
    return result


# Plain calls (no dropout, no bias or a boolean key mask) by call key: a call whose inputs' layouts, addresses modulo
# 16 and options passed the checks and planned before runs its plan at once (cuda_path.plain_forward_runner,
# plain_backward_runner), without the checks, the layout and the path's decisions again: what Inductor's generated
# code calls, layer after layer. None: such calls take the whole path (head padding, copies, a mask the plan takes as
# an added bias).
_PLAIN_FORWARDS: dict = {}
_PLAIN_BACKWARDS: dict = {}


def _key_mask_like(attn_bias) -> bool:
    """Whether attn_bias is a 4-D boolean mask: the plan may run it as the kernels' key mask (plan.plan_for decides;
    a runner is made only where it does), so its calls may have a runner."""
    return attn_bias.dtype == torch.bool and attn_bias.dim() == 4


def _plain_key(tensors: tuple, options: tuple):
    """The call key of a plain call on the CUDA path (None for anything else): what the checks and the plan read of
    `tensors` (q first; a None key mask last), the options, and the settings they depend on. Loops and a list, not
    generators: this runs at every call, and a generator's frame costs 1-2 µs here."""
    if tensors[-1] is None:
        tensors = tensors[:-1]
    for t in tensors:
        if type(t) is not torch.Tensor:
            return None
    q = tensors[0]
    impl = _impl(q)
    if impl is cpu_attention or torch.compiler.is_compiling():
        return None
    return (*[(t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) for t in tensors], options,
            q.dtype == torch.float32 and tf32_allowed(), impl.sm90_enabled())


def _remember(runners: dict, key, make) -> None:
    if len(runners) >= 1024:
        runners.clear()
    runners[key] = make()


def _checked_forward(q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed, softcap,
                     token_major_out):
    """The forward on inputs already checked (_forward's after _check)."""
    window = effective_window((window_left, window_right), q.shape[2], k.shape[2])
    if is_empty(q.shape, k.shape):
        return _empty_forward(q, k, v, attn_bias, scale, causal, window, softcap, token_major_out)
    impl = _impl(q)
    if impl is cpu_attention:
        out, lse = impl.forward(q, k, v, attn_bias, scale, causal, window, dropout_p, dropout_seed, softcap=softcap)
        return (_token_major(out) if token_major_out else out), lse
    return impl.forward(q, k, v, attn_bias, scale, causal, window, dropout_p, dropout_seed, softcap=softcap,
                        token_major=token_major_out)


def _new_out(q, v, token_major: bool) -> torch.Tensor:
    """A new output (B, H, Nq, Dv) as the fake and the CUDA path lay it out: contiguous, or (B, Nq, H, Dv) memory."""
    shape = _out_shape(q, v)
    return _token_major_empty(shape, q) if token_major else q.new_empty(shape)


def _empty_forward(q, k, v, attn_bias, scale, causal, window, softcap, token_major_out):
    """SDPA's result where a dim is 0, with nothing launched: out and lse are empty, or with no key (Nk = 0) out is
    0 and lse +inf (the op's convention for a row that sees no key). With head_dim 0 and keys, out is empty and the
    logits are the bias and masks alone, as with one zero column in q and k: lse is computed so (exact whatever
    the device, by the device-agnostic CPU implementation; dropout acts after the LSE, so it is left out)."""
    out = _new_out(q, v, token_major_out)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    if k.shape[2] == 0:
        return out.zero_(), lse.fill_(math.inf)
    q1, k1, v1 = (torch.nn.functional.pad(t, (0, 1)) for t in (q, k, v))  # (B, H, N, 1) zeros
    return out, cpu_attention.forward(q1, k1, v1, attn_bias, scale, causal, window, softcap=softcap)[1]


def _out_shape(q, v) -> tuple:
    return (*q.shape[:-1], v.shape[-1])  # (B, H, Nq, Dv)


def _impl(q: torch.Tensor):
    return _cuda_attention() if q.device.type == "cuda" else cpu_attention


@functools.cache
def _cuda_attention():
    """The CUDA implementation, imported at the first CUDA call (with the CUDA path's modules); an import
    statement at every call costs 0.6 µs."""
    from . import cuda_attention

    return cuda_attention


@flash_attn_fwd.register_fake
def _(q, k, v, attn_bias, scale, causal, window_left=-1, window_right=-1, dropout_p=0.0, dropout_seed=None,
      softcap=0.0, token_major_out=False, unseen_rows=0):
    # Checked here too: a meta tensor among real ones dispatches the call here, not to the op's body.
    _check(q, k, v, attn_bias, (window_left, window_right), dropout_p, dropout_seed, softcap, scale)
    unseen.check_mode(unseen_rows, dropout_p)
    return _new_out(q, v, token_major_out), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("cupyflash::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, scale: float,
                   causal: bool, window_left: int = -1, window_right: int = -1, dropout_p: float = 0.0,
                   dropout_seed: Optional[torch.Tensor] = None, bias_grad: bool = False, softcap: float = 0.0,
                   unseen_rows: int = 0, dlse: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dbias) shaped like q, k, v and attn_bias (dbias contiguous, empty unless bias_grad);
    dq, dk, dv (B, H, N, D) tensors whose memory is (B, N, H, D) (array_ops.token_major_strides). ``unseen_rows``:
    the forward's. ``dlse``: the gradient reaching lse ((B, H, Nq) fp32), or None; a row that saw no key (lse
    +inf) takes none of it."""
    return _backward(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left, window_right, dropout_p,
                     dropout_seed, bias_grad, softcap, unseen_rows, dlse)


def _backward(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left, window_right, dropout_p, dropout_seed,
              bias_grad, softcap, unseen_rows=0, dlse=None):
    """flash_attn_bwd's body, which _EagerAttention's backward runs too."""
    dq, dk, dv, dbias = _attention_backward(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left,
                                            window_right, dropout_p, dropout_seed, bias_grad, softcap, dlse)
    if unseen_rows:
        unseen.check_mode(unseen_rows, dropout_p)
        unseen.backward(dq, dk, dv, dout, q, k, v, lse, scale, unseen_rows)
    return dq, dk, dv, dbias


def _attention_backward(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left, window_right, dropout_p,
                        dropout_seed, bias_grad, softcap, dlse=None):
    """The attention's gradients (rows without keys add nothing)."""
    key = None
    if (dropout_p == 0.0 and dropout_seed is None and not bias_grad and dlse is None
            and (attn_bias is None or _key_mask_like(attn_bias))):
        key = _plain_key((q, k, v, dout, out, lse, attn_bias), (scale, causal, window_left, window_right, softcap))
        run = _PLAIN_BACKWARDS.get(key)
        if run is not None:
            return (*run(dout, q, k, v, out, lse, attn_bias), q.new_empty(0))
    _check_backward(dout, q, k, v, attn_bias, out, lse, scale, window_left, window_right, dropout_p, dropout_seed,
                    bias_grad, softcap, dlse)
    result = _backward_pass(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left, window_right, dropout_p,
                            dropout_seed, bias_grad, softcap, dlse)
    if key is not None and key not in _PLAIN_BACKWARDS:
        window = effective_window((window_left, window_right), q.shape[2], k.shape[2])
        _remember(_PLAIN_BACKWARDS, key,
                  lambda: _impl(q).plain_backward_runner(dout, q, k, v, out, lse, scale, causal, window, softcap,
                                                         attn_bias))
    return result


def _backward_pass(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left, window_right, dropout_p,
                   dropout_seed, bias_grad, softcap, dlse=None):
    """The backward on inputs already checked."""
    if is_empty(q.shape, k.shape):
        # No query, key or feature: dq, dk, dv have no element or nothing to sum, and dBias = P ∘ (dO Vᵀ - D) is
        # 0 since head_dim 0 makes dO Vᵀ and D = rowsum(dO ∘ O) sums of nothing.
        dbias = attn_bias.new_zeros(attn_bias.shape) if bias_grad else q.new_empty(0)
        return (*(_token_major_empty(t.shape, t).zero_() for t in (q, k, v)), dbias)
    window = effective_window((window_left, window_right), q.shape[2], k.shape[2])
    dq, dk, dv, dbias = _impl(q).backward(dout, q, k, v, attn_bias, out, lse, scale, causal, window, dropout_p,
                                          dropout_seed, bias_grad, softcap=softcap, dlse=dlse)
    dq, dk, dv = (_token_major(g) for g in (dq, dk, dv))
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


def _token_major_empty(shape, like: torch.Tensor) -> torch.Tensor:
    """A new (B, H, N, D) tensor in (B, N, H, D) memory (array_ops.token_major_strides) with `like`'s dtype and
    device: the layout of the gradients, and of out with token_major_out, in the fakes and the CUDA path
    (array_ops.TorchOps.token_major_allocator)."""
    return torch.empty_strided(shape, token_major_strides(shape), dtype=like.dtype, device=like.device)


def _token_major(a: torch.Tensor) -> torch.Tensor:
    """`a` in (B, N, H, D) memory: itself where the path allocated it so (the CUDA path), else a copy (the CPU
    path's contiguous results)."""
    return a if a.stride() == token_major_strides(a.shape) else _token_major_empty(a.shape, a).copy_(a)


def _check_backward(dout, q, k, v, attn_bias, out, lse, scale, window_left, window_right, dropout_p, dropout_seed,
                    bias_grad, softcap, dlse=None):
    """The forward's checks and the backward's own. The op's backward under autograd or Inductor gets what its
    forward checked: a call whose layouts and arguments passed before is a dict lookup (only passing checks are
    cached), while a user's direct call with anything new runs every check, with the same messages."""
    tensors = (dout, q, k, v, attn_bias, out, lse, dropout_seed, dlse)
    if all(type(t) is torch.Tensor for t in tensors if t is not None) and not torch.compiler.is_compiling():
        key = (*(_layout(t) for t in tensors), scale, window_left, window_right, dropout_p, bias_grad, softcap,
               q.device.type == "cuda" and q.dtype == torch.float32 and tf32_allowed())
        if key in _BACKWARD_CHECKED:
            return
        _check_backward_uncached(dout, q, k, v, attn_bias, out, lse, scale, window_left, window_right, dropout_p,
                                 dropout_seed, bias_grad, softcap, dlse)
        if len(_BACKWARD_CHECKED) >= 1024:
            _BACKWARD_CHECKED.clear()
        _BACKWARD_CHECKED.add(key)
        return
    _check_backward_uncached(dout, q, k, v, attn_bias, out, lse, scale, window_left, window_right, dropout_p,
                             dropout_seed, bias_grad, softcap, dlse)


_BACKWARD_CHECKED = set()  # _check_backward's keys that passed


def _check_backward_uncached(dout, q, k, v, attn_bias, out, lse, scale, window_left, window_right, dropout_p,
                             dropout_seed, bias_grad, softcap, dlse):
    _check(q, k, v, attn_bias, (window_left, window_right), dropout_p, dropout_seed, softcap, scale)
    check_backward_inputs(*(_info(name, _layout(t)) for name, t in (("q", q), ("v", v), ("dout", dout),
                                                                       ("out", out), ("lse", lse))),
                          dlse=None if dlse is None else _info("dlse", _layout(dlse)))
    check_bias_grad(None if attn_bias is None else str(attn_bias.dtype).removeprefix("torch."), bias_grad)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, attn_bias, out, lse, scale, causal, window_left=-1, window_right=-1, dropout_p=0.0,
      dropout_seed=None, bias_grad=False, softcap=0.0, unseen_rows=0, dlse=None):
    # Checked here too: a meta tensor among real ones dispatches the call here, not to the op's body.
    _check_backward(dout, q, k, v, attn_bias, out, lse, scale, window_left, window_right, dropout_p, dropout_seed,
                    bias_grad, softcap, dlse)
    unseen.check_mode(unseen_rows, dropout_p)
    dbias = attn_bias.new_empty(attn_bias.shape) if bias_grad else q.new_empty(0)
    return (*(_token_major_empty(t.shape, t) for t in (q, k, v)), dbias)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_bias, scale, causal, window_left, window_right, dropout_p, dropout_seed, softcap = inputs[:11]
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_bias, out, lse, dropout_seed)
    # An output no loss reads gets None, not a zero tensor (an allocation and a memset launch at each backward, ~20
    # µs of the engine thread's time on an H100's host): lse's gradient is rarely there, out's nearly always.
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.causal, ctx.window, ctx.dropout_p = scale, causal, (window_left, window_right), dropout_p
    ctx.softcap = softcap
    ctx.unseen_rows = inputs[12] if len(inputs) > 12 else 0


def _gradients(ctx, dout, dlse, backward_pass):
    """The input gradients from the saved context and the gradients reaching out and lse (None where no loss reads
    them), the backward run by `backward_pass` (flash_attn_bwd's signature): the op's own under autograd, or its
    body (_backward) in _EagerAttention."""
    if dout is None and dlse is None:
        return (None,) * len(ctx.needs_input_grad)
    q, k, v, attn_bias, out, lse, dropout_seed = ctx.saved_tensors
    bias_grad = attn_bias is not None and ctx.needs_input_grad[3]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = backward_pass(dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, attn_bias,
                                      out, lse, ctx.scale, ctx.causal, *ctx.window, ctx.dropout_p, dropout_seed,
                                      bias_grad, ctx.softcap, ctx.unseen_rows, dlse)
    return dq, dk, dv, dbias if bias_grad else None, *[None] * (len(ctx.needs_input_grad) - 4)


def _op_backward(ctx, dout, dlse):
    return _gradients(ctx, dout, dlse, flash_attn_bwd)


flash_attn_fwd.register_autograd(_op_backward, setup_context=_setup_context)


def _refuse_tangents(op_name: str, args) -> None:
    """The ops have no forward-AD formula; torch's generic custom-op kernel would run them and drop the tangent."""
    for a in args:
        if isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None:
            raise NotImplementedError(
                f"cupyflash.{op_name}: forward-mode AD (a dual tensor from torch.autograd.forward_ad) is not "
                "supported; use reverse mode (backward/autograd.grad)")


def _direct_autograd(op_def) -> None:
    """Replaces the custom op's Autograd kernel by one that runs the op's body at once when no gradient is recorded
    and nothing but the device's kernel would run below autograd (no mode, no subclass, no functionalization:
    Inductor's compiled code calling the op at run time). torch's generic kernel it wraps (taken for everything
    else) goes through Python twice more (a redispatch, then the backend wrapper): 25–50 µs per call on the CPU
    that profiled it, as much as the op's own body (benchmarks/host_overhead.py). These are torch internals: where
    one is missing, torch's own kernel stays."""
    try:
        op = op_def._opoverload
        generic = torch._library.autograd.make_autograd_impl(op, op_def)
        body = op_def._init_fn
        after_autograd, inplace_or_view = torch._C._after_autograd_keyset, torch._C.DispatchKey.ADInplaceOrView
        devices = (torch._C.DispatchKey.CUDA, torch._C.DispatchKey.CPU)
        raw_repr = torch._C.DispatchKeySet.raw_repr
    except AttributeError as err:
        log.debug("the ops keep torch's generic Autograd kernel: %s", err)
        return

    def device_next(keyset) -> bool:
        """Whether the device's kernel is all that would run below autograd."""
        return (keyset & after_autograd).remove(inplace_or_view).highestPriorityTypeId() in devices

    # The answer by the keyset's bits: a pure function of them, and the three calls above that build key sets cost
    # 3 µs per call on the CPU stub, a dict lookup 0.3. A call sees one of a few keysets (the tensors' device keys
    # and the thread's modes).
    decided = {}

    def records(args) -> bool:
        """Whether autograd records this call. isinstance, not type(): an nn.Parameter records gradients too (the
        keyset test rejects subclasses that dispatch in Python). A loop: a generator costs a frame per argument."""
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return True
        return False

    def kernel(keyset, *args, **kwargs):
        if forward_ad._current_level >= 0:
            _refuse_tangents(op_def._name, args)
        if not records(args):
            bits = raw_repr(keyset)
            plain = decided.get(bits)
            if plain is None:
                plain = decided[bits] = device_next(keyset)
            if plain:
                return body(*args, **kwargs)
        return generic(keyset, *args, **kwargs)

    # custom_op registered its Autograd kernel through this same Library; torch before 2.13 refuses a second
    # Python kernel for one key unless the key is first dropped from torch.library's registry of them.
    getattr(torch.library, "_impls", set()).discard(f"{op_def._lib.ns}/{op_def._name}/Autograd")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel": intended
            op_def._lib.impl(op_def._name, kernel, "Autograd", with_keyset=True)
    except RuntimeError as err:
        log.debug("the ops keep torch's generic Autograd kernel: %s", err)


_direct_autograd(flash_attn_fwd)
_direct_autograd(flash_attn_bwd)


class _EagerAttention(torch.autograd.Function):
    """The op's forward and backward outside torch.compile, without the custom-op dispatcher: its Python layers
    cost ~0.3 ms per call with gradients on an H100's host (benchmarks/results/host-overhead-NVIDIA_H100_80GB_HBM3.log),
    as long as a whole N = 1024 forward. Same checks, same implementations, same saved tensors as the op."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _forward(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _gradients(ctx, dout, dlse, _backward)


class _Dropped(torch.autograd.Function):
    """dropout_p = 1 drops every probability: out and every gradient are 0, as SDPA's, with nothing launched."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias):
        ctx.save_for_backward(q, k, v, attn_bias)
        return q.new_zeros(_out_shape(q, v))  # (B, H, Nq, Dv)

    @staticmethod
    def backward(ctx, dout):
        return tuple(t.new_zeros(t.shape) if needed else None
                     for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad))


def _sdpa_shapes(q, k, v, attn_bias):
    """SDPA's broadcasting as views of the op's 4-D shapes (never copies; autograd sums the gradients of expanded
    dims back): a 2-D (Nq, Nk) or 3-D (H, Nq, Nk) attn_bias gains leading dims of 1, a batch of 1 among q, k, v
    is expanded to the others', and q with one head to k and v's heads. Anything else is left to the checks."""
    if attn_bias is not None and attn_bias.dim() in (2, 3):
        attn_bias = attn_bias[(None,) * (4 - attn_bias.dim())]  # (1, [1,] ..., Nq, Nk)
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return q, k, v, attn_bias
    if not qs[0] == ks[0] == vs[0]:
        batch = {qs[0], ks[0], vs[0]} - {1}
        if len(batch) == 1:
            n = batch.pop()
            q, k, v = (t.expand(n, -1, -1, -1) if t.shape[0] == 1 else t for t in (q, k, v))
    if qs[1] == 1 and ks[1] == vs[1] > 1:
        q = q.expand(-1, ks[1], -1, -1)
    return q, k, v, attn_bias


def _require_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) and not (name == "attn_bias" and t is None):
            kind = type(t).__name__ if type(t).__module__ == "builtins" else f"{type(t).__module__}.{type(t).__name__}"
            raise TypeError(f"{name} is a {kind}; expected a torch.Tensor"
                            + (" or None" if name == "attn_bias" else " (batch, heads, seqlen, head_dim)"))


def _scalar(name: str, x, expected: str) -> float:
    """A Python float from a real number, a one-element real tensor (SDPA takes both) or a symbolic number of
    torch.compile's dynamic shapes."""
    if type(x) is float:
        return x
    if isinstance(x, (torch.SymInt, torch.SymFloat)) or (
            isinstance(x, torch.Tensor) and x.numel() == 1 and not (x.is_complex() or x.dtype == torch.bool)):
        return float(x)
    return check_real(name, x, expected)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                    *, scale: Optional[float] = None, causal: bool = False, window: Optional[tuple] = (-1, -1),
                    dropout_p: float = 0.0, softcap: float = 0.0, return_lse: bool = False):
    """dropout(softmax(scale · q kᵀ + attn_bias)) v for (B, H, N, D) tensors, differentiable in q, k, v and a
    floating attn_bias. Accepts what SDPA accepts where the kernels can (docs/API.md). With ``return_lse``, (out,
    lse): lse (B, H, Nq) fp32 the rows' natural-log log-sum-exp of the logits (+inf for a row that sees no key),
    differentiable too (attention sinks, merging attention over key blocks).

    ``attn_bias``: additive (floating) or boolean (True = keep, as SDPA), 2-D (Nq, Nk), 3-D (H, Nq, Nk) or 4-D,
    broadcastable to (B, H, Nq, Nk) by size-1 dims. k and v may have fewer heads than q (grouped-query attention);
    a batch of 1 in q, k or v broadcasts against the others. ``scale`` defaults to 1/sqrt(head_dim); ``causal``
    and ``window`` = (left, right) keys around the diagonal (-1: unbounded; None: no window) are aligned to the
    bottom-right corner. ``softcap`` > 0 caps the logits before the bias is added: softcap · tanh(scale · q kᵀ /
    softcap) (Gemma 2; FlashAttention-2's ``softcap``). ``dropout_p`` in [0, 1] draws its seed from torch's
    generator of q's device, so ``torch.manual_seed`` reproduces a run; 1 gives zeros, as SDPA.
    """
    _require_tensors(q=q, k=k, v=v, attn_bias=attn_bias)
    if not isinstance(causal, torch.SymBool):
        check_causal(causal)
    window = check_window(window)
    dropout_p = _scalar("dropout_p", dropout_p, "a float, 0 <= dropout_p <= 1")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p is {dropout_p}; expected 0 <= dropout_p <= 1")
    softcap = _scalar("softcap", softcap, "a float (0 for none)")
    scale = _scalar("scale", default_scale(q.shape[-1]) if scale is None else scale,
                    "a float, or None for 1/sqrt(head_dim)")
    q, k, v, attn_bias = _sdpa_shapes(q, k, v, attn_bias)
    if dropout_p == 1.0:
        if return_lse:
            raise ValueError("return_lse=True with dropout_p=1: every probability is dropped, so out is 0 and the "
                             "kernels are not run; pass dropout_p < 1")
        # The scalars were checked above, and scale and softcap leave the zeros as they are (the op's value checks
        # call math.isfinite, which Dynamo does not trace).
        _check_tensors(q, k, v, attn_bias)
        return _Dropped.apply(q, k, v, attn_bias)
    # Drawn on q's device and never read back on the host: a CUDA RNG op in a captured CUDA graph draws a
    # fresh value at each replay, where a Python int would be baked into the graph.
    seed = torch.randint(0, 2 ** 62, (), dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    args = (q, k, v, attn_bias, scale, causal, *window, dropout_p, seed, softcap)
    # The op itself where graphs are captured (torch.compile) or tensors are not plain (fake, subclasses).
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in (q, k, v)):
        result = flash_attn_fwd(*args)
    else:
        if forward_ad._current_level >= 0:
            _refuse_tangents("flash_attention", (q, k, v, attn_bias))
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                             or (attn_bias is not None and attn_bias.requires_grad))):
            result = _forward(*args)  # nothing to record: the op's body (a plain call runs its plan at once)
        else:
            result = _EagerAttention.apply(*args)
    return result if return_lse else result[0]
