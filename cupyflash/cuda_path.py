"""The CUDA path of both faces (the torch op, cupyflash/cuda_attention.py; CuPy arrays, cupyflash/cupy_api.py),
written once over the array adapter of cupyflash/array_ops.py: outputs allocated by the caller's library on q's
device, inputs made kernel-ready, the call's layout looked up in the plan cache (cupyflash/plan.py), the bias's tile
classes computed in the plan's tiles, and the plan launched on the library's current stream.

Inputs are checked before (cupyflash/validate.py, by the faces); `window` is the effective one
(validate.effective_window), `seed` one int64 element on q's device or None.
"""
from __future__ import annotations

import math

from . import jit, launch, params, plan
from .errors import require_gpu
from .validate import kernel_head_dim


def _ready(xp, a):
    """`a` itself if its last dim is contiguous and every (b, h, n) row starts 16-byte aligned (cp.async and TMA copy
    16 bytes), else a contiguous copy in a new allocation (a contiguous view at an odd offset stays unaligned
    through .contiguous() / ascontiguousarray, which return it as it is)."""
    strides = xp.strides(a)
    if strides[3] == 1 and launch.rows_aligned(xp.address(a), [s * a.itemsize for s in strides[:3]]):
        return a
    return xp.fresh_copy(a)


def broadcast_strides(xp, a) -> tuple:
    """A (B, H, Nq, Nk)-broadcastable array's strides, 0 along its size-1 dims, so it is never expanded."""
    return tuple(0 if n == 1 else s for n, s in zip(a.shape, xp.strides(a)))


def broadcast_buf(xp, a) -> params.Buf:
    return params.Buf(xp.address(a), broadcast_strides(xp, a))


def holding_alloc(xp, like, held: list):
    """launch.classify_tiles's allocator: arrays on `like`'s device, each appended to `held`. The launches keep only
    their addresses, and torch's and CuPy's pools hand a dropped array's memory to the next allocation on the
    stream, aliasing two buffers: the caller holds them until the kernels that use them are enqueued."""
    def alloc(shape, dtype: str, zeroed: bool):
        a = (xp.zeros if zeroed else xp.empty)(shape, dtype, like)
        held.append(a)
        return a, params.Buf(xp.address(a), tuple(xp.strides(a)))

    return alloc


def _kernel_bias(xp, attn_bias, dtype: str):
    """The bias as the plan takes it: q's dtype or fp32, or a boolean mask as it is (the plan says how the kernels
    read it: Plan.mask_form)."""
    if attn_bias is None or xp.is_bool(attn_bias):
        return attn_bias
    return attn_bias if xp.dtype_name(attn_bias) in (dtype, "float32") else xp.astype(attn_bias, "float32")


def _entry(xp, name: str, a) -> tuple:
    return name, tuple(xp.strides(a)), xp.address(a) % 16


def _classify(xp, bias, p: plan.Plan, window: bool, stream_ptr: int, device_id: int, held: list):
    """The bias's int8 tile classes in the plan's tiles (cupyflash/tile_classes.py), computed on the GPU; the
    workspaces go to `held`, alive until the attention is enqueued."""
    return launch.classify_tiles(dtype=p.layout.dtype, bias=params.Buf(xp.address(bias), p.layout.bias.strides),
                                 bias_shape=tuple(bias.shape), bias_f32=p.layout.bias.f32, br=p.tiles.Br,
                                 bc=p.tiles.Bc, window=window, alloc=holding_alloc(xp, bias, held),
                                 stream_ptr=stream_ptr, device_id=device_id)


def _plan(xp, kernel: str, q, k, bias, bufs: dict, scale: float, causal: bool, window: tuple, dropout_p: float,
          softcap: float, bias_grad: bool) -> plan.Plan:
    """The call's plan (bufs: name → array, in plan.FORWARD_BUFS / BACKWARD_BUFS order), from its layout."""
    device_id = xp.device_id(q)
    bias_layout = None
    if bias is not None:
        bias_layout = plan.BiasLayout(tuple(bias.shape), broadcast_strides(xp, bias), xp.dtype_name(bias) == "float32",
                                      bias_grad, xp.is_bool(bias))
    layout = plan.CallLayout(kernel, xp.dtype_name(q), tuple(q.shape), k.shape[2], k.shape[1],
                             tuple(_entry(xp, name, a) for name, a in bufs.items()), causal, scale, bias_layout,
                             window, dropout_p, softcap, require_gpu(device_id).compute_capability, device_id,
                             plan.sm90_enabled())
    return plan.plan_for(layout)


def _planned(xp, kernel: str, arrays: tuple, bias, options: tuple, build):
    """The plan of a call, from _KNOWN when a call with the same arrays' and kernel bias's layouts (shapes, strides,
    dtypes, device, addresses modulo 16) and options ran before with its arrays as they were; else
    `build(ready)` with the kernel-ready arrays → plan. Returns (plan, the kernel-ready arrays)."""
    key = (kernel, *map(xp.signature, arrays), None if bias is None else xp.signature(bias), options,
           plan.sm90_enabled())
    known = _KNOWN.get(key)
    if known is not None:
        return known, arrays
    ready = tuple(_ready(xp, a) for a in arrays)
    p = build(ready)
    if all(r is a for r, a in zip(ready, arrays)):
        if len(_KNOWN) >= 1024:
            _KNOWN.clear()
        _KNOWN[key] = p
    return p, ready


# Call key → Plan, for calls whose arrays the kernels took as they were (no copy): a model calls with the same few
# layouts again and again, and one lookup replaces the per-array readiness checks, the layout's construction and the
# plan cache's. The kernel bias is keyed as the kernels read it (a boolean mask after its conversion, whose layout
# follows from the mask's), and the outputs and workspaces are fresh allocations (aligned by the allocator, laid out
# as the options say: the forward's token_major is one of them), so these layouts and the options decide the plan.
_KNOWN: dict = {}


def _launch(xp, p: plan.Plan, q, bias, bufs: dict, causal: bool, window: tuple, seed, dbias=None) -> None:
    """Launches plan `p` with the call's arrays; with q's device current."""
    device_id = xp.device_id(q)
    stream_ptr = xp.stream_ptr(device_id)
    ptrs = {name: xp.address(a) for name, a in bufs.items()}
    held, add_keys, add_parts = [], _key_mask_ptrs(xp, p, q), _kv_part_ptrs(xp, p, q)
    if add_parts is not None:
        held.append(add_parts(ptrs))
    if add_keys is not None:
        held.append(add_keys(ptrs, bias))
    elif bias is not None:
        if p.mask_form == "bias":  # in the plan's layout: contiguous, 0 along broadcast dims
            bias = xp.contiguous(xp.mask_as_bias(bias, q))
            held.append(bias)
        classes = _classify(xp, bias, p, causal or window != (-1, -1), stream_ptr, device_id, held)
        held.append(classes)
        ptrs["bias"], ptrs["tile_classes"] = xp.address(bias), xp.address(classes)
    if dbias is not None:
        ptrs["dbias"] = xp.address(dbias)
    if seed is not None:
        ptrs["seed"] = xp.address(seed)
    launch.execute(p, ptrs, stream_ptr, device_id)


def _pad_head(xp, a, d: int):
    """`a` (B, H, N, D) zero-padded to head dim d: a new contiguous array (`a` itself at d)."""
    return a if a.shape[3] == d else xp.pad_end(a, 0, d - a.shape[3], 0.0)


def _kernel_head_dim(q, v) -> int:
    """The mma.sync kernels' head dim for q, k (q's head dim) and v: zero padding makes them one (exact: zero columns
    add nothing to q·k, and v's give output columns that are sliced off)."""
    return kernel_head_dim(max(q.shape[3], v.shape[3]))


def _as_is(xp, kernel: str, q, v) -> bool:
    """Whether pass `kernel` plans q, k, v at their own head dim: one the mma.sync kernels have, or one only the
    Hopper kernels have (plan.hopper_only) on a GPU and dtype they run (the plan may still decline the call's
    layout: plan.PADDED)."""
    d = q.shape[3]
    if d != v.shape[3]:
        return False
    if d == _kernel_head_dim(q, v):
        return True
    return plan.hopper_only(kernel, d) and _on_hopper(xp, q)


def _on_hopper(xp, q) -> bool:
    """Whether q's GPU and dtype are the Hopper kernels' (and CUPYFLASH_SM90 leaves them on)."""
    return (xp.dtype_name(q) in jit.SM90_DTYPES and plan.sm90_enabled()
            and require_gpu(xp.device_id(q)).compute_capability == 90)


def _padded_head_dim(xp, kernel: str, q, v, declined: bool) -> int:
    """The head dim a call of pass `kernel` runs zero-padded to: on Hopper the next one its kernels take as it is
    (d136 on 160 columns, not 256), else, or where a plan declined the call at its head dim (plan.PADDED), the next
    mma.sync one."""
    kernel_d = _kernel_head_dim(q, v)
    if declined or not _on_hopper(xp, q):
        return kernel_d
    return next((h for h in plan.hopper_only_dims(kernel) if max(q.shape[3], v.shape[3]) <= h < kernel_d), kernel_d)


def _out_allocator(xp, shape, dtype: str, like, token_major: bool):
    """New outputs (B, H, Nq, D): contiguous, or in (B, N, H, D) memory where the caller asked (token_major)."""
    return (xp.token_major_allocator if token_major else xp.allocator)(shape, dtype, like)


def _unpad_head(xp, a, d: int, new):
    """The first d columns of `a`'s head dim, copied once into `new()` (an allocator: the result's final layout)."""
    return xp.copy_into(new(), a[..., :d])


def forward(xp, q, k, v, attn_bias, scale: float, causal: bool, window=(-1, -1), dropout_p: float = 0.0, seed=None,
            softcap: float = 0.0, token_major: bool = False):
    """(out, lse): out (B, H, Nq, v's head dim), contiguous or with `token_major` in (B, N, H, D) memory
    (array_ops.token_major_strides); lse (B, H, Nq) fp32."""
    if q.shape[3] and not _as_is(xp, "fwd", q, v):
        return _padded_forward(xp, q, k, v, attn_bias, scale, causal, window, dropout_p, seed, softcap, token_major,
                               declined=False)
    with xp.on_device(q):
        out = _out_allocator(xp, q.shape, xp.dtype_name(q), q, token_major)()
        lse = xp.empty(q.shape[:-1], "float32", q)  # (B, H, Nq)
        if 0 in q.shape or 0 in k.shape:
            return out, lse
        window = tuple(window)
        bias = _kernel_bias(xp, attn_bias, xp.dtype_name(q))

        def build(ready):
            return _plan(xp, "fwd", ready[0], ready[1], bias, dict(zip("qkv", ready), out=out, lse=lse), scale,
                         causal, window, dropout_p, softcap, False)

        p, ready = _planned(xp, "fwd", (q, k, v), bias, (scale, causal, window, dropout_p, softcap, token_major),
                            build)
        if p.family == plan.PADDED:
            return _padded_forward(xp, q, k, v, attn_bias, scale, causal, window, dropout_p, seed, softcap,
                                   token_major)
        q, k, v = ready
        _launch(xp, p, q, bias, dict(q=q, k=k, v=v, out=out, lse=lse), causal, window, seed)
    return out, lse


def _padded_forward(xp, q, k, v, attn_bias, scale, causal, window, dropout_p, seed, softcap, token_major,
                    declined=True):
    """forward on q, k, v zero-padded to _padded_head_dim's head dim, out sliced back to v's."""
    kernel_d = _padded_head_dim(xp, "fwd", q, v, declined)
    out, lse = forward(xp, *(_pad_head(xp, a, kernel_d) for a in (q, k, v)), attn_bias, scale, causal, window,
                       dropout_p, seed, softcap)
    d_v = v.shape[3]
    return _unpad_head(xp, out, d_v, _out_allocator(xp, (*out.shape[:3], d_v), xp.dtype_name(out), out,
                                                     token_major)), lse


def _taken_as_is(xp, kernel: str, q, k, v) -> bool:
    """Whether pass `kernel` plans these arrays without head padding (and none is empty): what a plain runner needs
    (which then checks that its plan is not plan.PADDED)."""
    return 0 not in q.shape and 0 not in k.shape and _as_is(xp, kernel, q, v)


def _key_mask_ptrs(xp, p: plan.Plan, like):
    """For a plan with a key mask, `add(ptrs, keys)`: the mask's address and new meta rows' (the plan's first launch
    writes them) into `ptrs`; it returns the meta array, to hold until the kernels are enqueued. Else None."""
    if p.mask_form != "keys":
        return None
    new_meta, address = xp.allocator(p.key_meta_shape, "int32", like), xp.address

    def add(ptrs: dict, keys):
        meta = new_meta()
        ptrs["key_mask"], ptrs["key_meta"] = address(keys), address(meta)
        return meta

    return add


def _kv_part_ptrs(xp, p: plan.Plan, like):
    """For a backward plan that splits grouped-query heads (Plan.kv_part_shape), `add(ptrs)`: a new array for the
    split's copies, the addresses of its parts (plan.SPLIT_KV_BUFS) into `ptrs`; it returns the array, to hold until
    the kernels are enqueued. Else None."""
    if p.kv_part_shape is None:
        return None
    new_part, address = xp.allocator(p.kv_part_shape, xp.dtype_name(like), like), xp.address
    part_bytes = math.prod(p.kv_part_shape[1:]) * jit.ELEM_BYTES[xp.dtype_name(like)]

    def add(ptrs: dict):
        array = new_part()
        at = address(array)
        for i, name in enumerate(plan.SPLIT_KV_BUFS):
            ptrs[name] = at + i * part_bytes
        return array

    return add


def plain_forward_runner(xp, q, k, v, scale: float, causal: bool, window: tuple, softcap: float,
                         token_major: bool = False, keys=None):
    """For a forward with no dropout and no bias, or a boolean key mask `keys` its plan runs as the kernels' key
    mask, whose arrays the kernels take as they are (no head padding, no copy), `run(q, k, v, keys) -> (out, lse)`:
    its plan, launched on new outputs (out laid out as forward's), for later calls with the same call key
    (torch_op's, which its checks passed); else None."""
    window = tuple(window)
    if not _taken_as_is(xp, "fwd", q, k, v):
        return None
    # The call key fixes the shapes, dtype and device: each call allocates and launches with these bound.
    new_out = _out_allocator(xp, q.shape, xp.dtype_name(q), q, token_major)
    new_lse = xp.allocator(q.shape[:-1], "float32", q)
    out, lse = new_out(), new_lse()  # (B, H, Nq, D), (B, H, Nq): the plan's output layouts

    def build(ready):
        return _plan(xp, "fwd", ready[0], ready[1], keys, dict(zip("qkv", ready), out=out, lse=lse), scale, causal,
                     window, 0.0, softcap, False)

    p, ready = _planned(xp, "fwd", (q, k, v), keys, (scale, causal, window, 0.0, softcap, token_major), build)
    if (p.family == plan.PADDED or any(r is not a for r, a in zip(ready, (q, k, v)))
            or (keys is not None and p.mask_form != "keys")):
        return None
    address, device_id, add_keys = xp.address, xp.device_id(q), _key_mask_ptrs(xp, p, q)

    def run(q, k, v, keys=None):
        out, lse = new_out(), new_lse()
        ptrs = {"q": address(q), "k": address(k), "v": address(v), "out": address(out), "lse": address(lse)}
        meta = None if add_keys is None else add_keys(ptrs, keys)
        launch.execute(p, ptrs, xp.stream_ptr(device_id), device_id)
        del meta  # freed only now, after the kernels that write and read it are enqueued
        return out, lse

    return run


def _backward_workspace(xp, q):
    """The backward's fp32 workspace: dq_accum ((B, H, plan.dq_accum_rows(Nq), D), zeroed by the preprocess kernel,
    then summed) and d_vec ((B, H, Nq), D = rowsum(dO ∘ O)) in one allocation, as the kernels see only their addresses
    (one allocation less per call: 2 µs on the CPU stub). Returns (new, views, split): `new()` allocates one,
    `views(workspace)` gives (dq_accum, d_vec), and d_vec starts `split` floats in, 256 bytes aligned as an allocation
    of its own would be."""
    batch, heads, n_q, d = q.shape
    rows, accum_rows = batch * heads * n_q, batch * heads * plan.dq_accum_rows(n_q)
    split = -(-accum_rows * d // 64) * 64

    def views(workspace):
        return (workspace[:accum_rows * d].reshape(batch, heads, plan.dq_accum_rows(n_q), d),
                workspace[split:split + rows].reshape(batch, heads, n_q))

    return xp.allocator((split + rows,), "float32", q), views, split


def plain_backward_runner(xp, dout, q, k, v, out, lse, scale: float, causal: bool, window: tuple, softcap: float,
                          keys=None):
    """The backward's counterpart of plain_forward_runner: `run(dout, q, k, v, out, lse, keys) -> (dq, dk, dv)`, or
    None."""
    window = tuple(window)
    if not _taken_as_is(xp, "bwd", q, k, v) or xp.contiguous(lse) is not lse:
        return None
    # Outputs and workspace, new at each call, in the layouts the plan was made with (the call key fixes them).
    new_dq, new_dk, new_dv = (xp.grad_allocator(a) for a in (q, k, v))
    new_workspace, views, split = _backward_workspace(xp, q)
    dq_accum, d_vec = views(new_workspace())
    named = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, d_vec=d_vec, dq_accum=dq_accum, dq=new_dq(),
                 dk=new_dk(), dv=new_dv())  # BACKWARD_BUFS' order

    def build(ready):
        return _plan(xp, "bwd", ready[0], ready[1], keys, named, scale, causal, window, 0.0, softcap, False)

    options = (xp.signature(lse), scale, causal, window, 0.0, softcap, False, False)  # as backward's (no rebuild)
    p, ready = _planned(xp, "bwd", (q, k, v, out, dout), keys, options, build)
    if (p.family == plan.PADDED or any(r is not a for r, a in zip(ready, (q, k, v, out, dout)))
            or (keys is not None and p.mask_form != "keys")):
        return None
    address, device_id, add_keys = xp.address, xp.device_id(q), _key_mask_ptrs(xp, p, q)
    add_parts = _kv_part_ptrs(xp, p, q)

    def run(dout, q, k, v, out, lse, keys=None):
        dq, dk, dv = new_dq(), new_dk(), new_dv()
        workspace = new_workspace()  # held until the kernels are enqueued
        at = address(workspace)
        ptrs = {"q": address(q), "k": address(k), "v": address(v), "out": address(out), "dout": address(dout),
                "lse": address(lse), "d_vec": at + 4 * split, "dq_accum": at, "dq": address(dq), "dk": address(dk),
                "dv": address(dv)}
        meta = None if add_keys is None else add_keys(ptrs, keys)
        parts = None if add_parts is None else add_parts(ptrs)
        launch.execute(p, ptrs, xp.stream_ptr(device_id), device_id)
        del meta, parts  # as the forward's
        return dq, dk, dv

    return run


def backward(xp, dout, q, k, v, attn_bias, out, lse, scale: float, causal: bool, window=(-1, -1),
             dropout_p: float = 0.0, seed=None, bias_grad: bool = False, softcap: float = 0.0, dlse=None):
    """(dq, dk, dv, dbias): shaped like q, k, v, in the layouts of xp.grad_allocator; dbias shaped like attn_bias
    in its dtype, or None. `dlse`: the gradient reaching lse ((B, H, Nq) fp32), or None."""
    if q.shape[3] and not _as_is(xp, "bwd", q, v):
        return _padded_backward(xp, dout, q, k, v, attn_bias, out, lse, scale, causal, window, dropout_p, seed,
                                bias_grad, softcap, dlse, declined=False)
    with xp.on_device(q):
        dtype = xp.dtype_name(q)
        dq, dk, dv = (xp.grad_allocator(a)() for a in (q, k, v))  # as the op's fake
        # dBias is summed atomically over the bias's broadcast dims, in fp32.
        dbias = xp.zeros(attn_bias.shape, "float32", q) if bias_grad else None
        if 0 in q.shape or 0 in k.shape:
            zeros = tuple(xp.zeros(a.shape, dtype, q) for a in (q, k, v))
            return (*zeros, None if dbias is None else xp.astype(dbias, xp.dtype_name(attn_bias)))
        launch.require_backward(q.shape[3], dtype)  # before any work on the bias
        batch, heads, n_q, d = q.shape
        new_workspace, views, _ = _backward_workspace(xp, q)
        dq_accum, d_vec = views(new_workspace())
        # The rows' (hi, lo) pairs of the rebuild rule (plan.BIAS_BACKWARD_BUFS), with an added bias where it is on
        # (a boolean mask's 0 / -inf leave every row's LSE as the scores make it: nothing to rebuild).
        rebuild = attn_bias is not None and not xp.is_bool(attn_bias) and launch.lse_rebuild_enabled()
        row_lse = xp.empty((batch, heads, n_q, 2), "float32", q) if rebuild else None
        window = tuple(window)
        lse = xp.contiguous(lse)
        dlse = None if dlse is None else xp.contiguous(dlse)
        bias = _kernel_bias(xp, attn_bias, dtype)

        def bufs(q, k, v, out, dout) -> dict:
            named = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, d_vec=d_vec, dq_accum=dq_accum, dq=dq, dk=dk,
                         dv=dv)  # BACKWARD_BUFS' order
            if row_lse is not None:
                named["row_lse"] = row_lse
            if dlse is not None:
                named["dlse"] = dlse
            return named

        def build(ready):
            return _plan(xp, "bwd", ready[0], ready[1], bias, bufs(*ready), scale, causal, window, dropout_p, softcap,
                         bias_grad)

        options = (xp.signature(lse), scale, causal, window, dropout_p, softcap, bias_grad, rebuild,
                   None if dlse is None else xp.signature(dlse))
        p, ready = _planned(xp, "bwd", (q, k, v, out, dout), bias, options, build)
        if p.family == plan.PADDED:
            return _padded_backward(xp, dout, q, k, v, attn_bias, out, lse, scale, causal, window, dropout_p, seed,
                                    bias_grad, softcap, dlse)
        _launch(xp, p, ready[0], bias, bufs(*ready), causal, window, seed, dbias)
    return dq, dk, dv, None if dbias is None else xp.astype(dbias, xp.dtype_name(attn_bias))


def _padded_backward(xp, dout, q, k, v, attn_bias, out, lse, scale, causal, window, dropout_p, seed, bias_grad,
                     softcap, dlse, declined=True):
    """backward on the arrays zero-padded to _padded_head_dim's head dim, the gradients sliced back."""
    kernel_d = _padded_head_dim(xp, "bwd", q, v, declined)
    launch.require_backward(max(q.shape[3], v.shape[3]), xp.dtype_name(q))
    padded = (_pad_head(xp, a, kernel_d) for a in (dout, q, k, v))
    dq, dk, dv, dbias = backward(xp, *padded, attn_bias, _pad_head(xp, out, kernel_d), lse, scale, causal, window,
                                 dropout_p, seed, bias_grad, softcap, dlse)
    return (*(_unpad_head(xp, g, t.shape[3], xp.grad_allocator(t)) for g, t in ((dq, q), (dk, k), (dv, v))), dbias)
