"""The op's ``unseen_rows`` (cupyflash/unseen_rows.py) on the CPU: rows that see no key (left padding under a causal
mask, Nq > Nk) get eager's uniform row under a finite fill, with the gradients of a fill that replaced the scores
(UNIFORM) or was added to them (UNIFORM_SCORES), grouped-query heads included; the CUDA path's launches as planned
(order, grids, parameter struct) without a GPU. tests/test_gpu_unseen_rows.py runs the kernels."""
from __future__ import annotations

import pytest
import torch

import cupyflash.torch_op  # noqa: F401  (registers torch.ops.cupyflash.*)
from cupyflash import jit, params
from cupyflash import unseen_rows as unseen
from cupyflash.unseen_rows import UNIFORM, UNIFORM_SCORES

FWD, BWD = torch.ops.cupyflash.flash_attn_fwd, torch.ops.cupyflash.flash_attn_bwd


def left_padded_keep(lengths: list, n_q: int, n_k: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(key keep (B, 1, 1, Nk), eager's keep (B, 1, Nq, Nk)): batch row b keeps its last lengths[b] keys, under a
    causal mask aligned bottom-right (as the op's)."""
    keys = torch.zeros(len(lengths), n_k, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        keys[b, n_k - n:] = True
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)
    return keys[:, None, None, :], causal & keys[:, None, None, :]


def eager(q, k, v, keep, scale: float, mode: int) -> torch.Tensor:
    """transformers' eager attention with a finfo.min mask: added to the scores (UNIFORM_SCORES) or filled in
    (UNIFORM); softmax in fp32 (fp64 for fp64), probabilities in q's dtype."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    fill = torch.finfo(scores.dtype).min
    if mode == UNIFORM_SCORES:
        scores = scores + torch.where(keep, torch.zeros((), dtype=scores.dtype, device=q.device), fill)
    else:
        scores = scores.masked_fill(~keep, fill)
    probs = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), -1).to(q.dtype)
    return probs @ v


@pytest.mark.parametrize("mode", [UNIFORM, UNIFORM_SCORES], ids=["replaced", "added"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("n_q, n_k", [(6, 6), (9, 5), (5, 11)])
def test_op_gives_eager_rows_in_fp64(mode, kv_heads, n_q, n_k):
    torch.manual_seed(n_q * 100 + n_k + kv_heads)
    q = torch.randn(3, 4, n_q, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(3, kv_heads, n_k, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keys, keep = left_padded_keep([n_k, 2, 1], n_q, n_k)
    scale = 0.37
    out, lse = FWD(q, k, v, keys, scale, True, unseen_rows=mode)
    unseen_count = int(torch.isposinf(lse).sum())
    assert unseen_count > 0 and unseen_count == int((~keep.any(-1)).sum()) * 4
    want = eager(q, k, v, keep, scale, mode)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    dout = torch.randn_like(want)
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0, msg=lambda m: f"d{name}: {m}")  # the LSE is fp32


def test_rows_that_see_keys_are_the_ops_own():
    """Without rows that see no key, unseen_rows changes nothing, bit for bit."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, requires_grad=True) for _ in range(3))
    keys, _ = left_padded_keep([7, 3], 7, 7)
    keys = keys.flip(-1)  # right padding: under a causal mask every row keeps key 0
    base = FWD(q, k, v, keys, 0.3, True)
    for mode in (UNIFORM, UNIFORM_SCORES):
        out, lse = FWD(q, k, v, keys, 0.3, True, unseen_rows=mode)
        assert torch.equal(out, base[0]) and torch.equal(lse, base[1])
        dout = torch.randn_like(out)
        grads = BWD(dout, q, k, v, keys, out, lse, 0.3, True, unseen_rows=mode)
        assert all(torch.equal(a, b) for a, b in zip(grads[:3], BWD(dout, q, k, v, keys, out, lse, 0.3, True)[:3]))


@pytest.mark.parametrize("mode, dropout_p, message", [(3, 0.0, "unseen_rows is 3"),
                                                       (UNIFORM, 0.1, "with dropout_p 0.1")])
def test_mode_is_checked(mode, dropout_p, message):
    q = torch.randn(1, 2, 4, 8)
    seed = torch.zeros((), dtype=torch.int64) if dropout_p else None
    with pytest.raises(ValueError, match=message):
        FWD(q, q, q, None, 0.3, True, dropout_p=dropout_p, dropout_seed=seed, unseen_rows=mode)
    with pytest.raises(ValueError, match=message):
        FWD(q.to("meta"), q.to("meta"), q.to("meta"), None, 0.3, True, dropout_p=dropout_p,
            dropout_seed=None if seed is None else seed.to("meta"), unseen_rows=mode)


LLAMA = (4, 16, 2048, 128)  # the Llama step's layer: B, H, N, D with 4 K/V heads
TENSORS = {"fwd": ("out", "v", "lse"), "bwd": ("q", "k", "v", "dout", "dq", "dk", "dv", "lse")}  # what each reads


def _steps(kernel: str, mode: int):
    strides = tuple((name, (16 * 2048 * 128, 128, 16 * 128, 1) if name != "lse" else (16 * 2048, 2048, 1))
                    for name in TENSORS[kernel])
    shape = LLAMA if kernel == "bwd" else LLAMA[:3] + (0,)
    return unseen._steps(kernel, mode, "bfloat16", shape, 4, 2048, 128, strides, 0.088)


@pytest.mark.parametrize("kernel, mode, order", [
    ("fwd", UNIFORM, ("unseen_flags", "unseen_key_sums", "unseen_fill")),
    ("fwd", UNIFORM_SCORES, ("unseen_flags", "unseen_key_sums", "unseen_fill")),
    ("bwd", UNIFORM, ("unseen_flags", "unseen_sums", "unseen_kv")),
    ("bwd", UNIFORM_SCORES, ("unseen_flags", "unseen_sums", "unseen_key_sums", "unseen_kv", "unseen_dq"))])
def test_planned_launches(kernel, mode, order):
    """Each pass's kernels in dependency order (flags; row sums and key sums; then what reads them), grids over the
    Llama layer's rows and keys, one struct for all, and the workspace's size per (batch, K/V head)."""
    steps, ws_floats = _steps(kernel, mode)
    assert tuple(s.variant.kernel for s in steps) == order
    assert all(s.variant.kernel in jit.UNSEEN_KERNELS and s.block == (unseen.THREADS,) for s in steps)
    grids = {s.variant.kernel: s.grid for s in steps}
    assert grids["unseen_flags"] == (4 * 2048 // unseen.FLAG_ROWS, 4, 4)  # the K/V head's 4 query heads' rows
    rows_per_block = {"unseen_fill": unseen.ROWS_PER_BLOCK, "unseen_dq": unseen.ROWS_PER_BLOCK,
                      "unseen_sums": unseen.SUM_ROWS}
    for name, grid in grids.items():
        if name in rows_per_block:
            assert grid == (2048 // rows_per_block[name], 16, 4), name
        elif name == "unseen_kv":
            assert grid == (2048 // unseen.KV_KEYS, 4, 4), name
        elif name != "unseen_flags":
            assert grid == (2048 // unseen.KEYS_PER_BLOCK, 4, 4), name
    values = steps[0].packed.values
    assert steps[0].packed.struct is params.UNSEEN_ROWS
    # the forward's key sums need v̄ alone: mode 1 in its struct whatever the op's mode
    assert values["mode"] == (mode if kernel == "bwd" else UNIFORM)
    per = 4 + 2 * 128 + ((128 + 2 * 128 * 128) if (kernel, mode) == ("bwd", UNIFORM_SCORES) else 0)
    assert values["ws_per"] == per and ws_floats == 4 * 4 * per
    assert (values["H"], values["Hkv"], values["Nq"], values["Nk"], values["Dv"]) == (16, 4, 2048, 2048, 128)
    slots = {slot.name for _, slot in steps[0].packed.slots}
    assert slots == {*TENSORS[kernel], "ws"}


def test_launch_fills_one_struct_for_the_pass(monkeypatch):
    """The CUDA path's host side with the driver stubbed: each kernel of the pass launched in order on torch's
    stream with its grid, all from one parameter struct holding the call's addresses (the workspace's included)."""
    import contextlib
    import struct

    from cupyflash import driver, launch

    launched = []
    monkeypatch.setattr(launch, "_device", lambda device_id: contextlib.nullcontext())
    monkeypatch.setattr(launch, "_function", lambda variant, device_id: (None, variant.kernel))
    monkeypatch.setattr(driver, "launch", lambda fn, dims, shared, stream, params: launched.append(
        (fn, dims, stream, bytes(params.bytes))))
    monkeypatch.setattr(unseen._TORCH, "stream_ptr", lambda device_id: 1234)
    q, dout, dq = (torch.randn(2, 4, 33, 16) for _ in range(3))
    k, v, dk, dv = (torch.randn(2, 2, 40, 16) for _ in range(4))
    lse = torch.zeros(2, 4, 33)
    bufs = dict(q=q, k=k, v=v, dout=dout, dq=dq, dk=dk, dv=dv, lse=lse)
    unseen._launch("bwd", UNIFORM_SCORES, bufs, q.shape, v, 0.3)
    steps, _ = unseen._steps("bwd", UNIFORM_SCORES, "float32", tuple(q.shape), 2, 40, 16,
                             tuple((n, t.stride()) for n, t in bufs.items()), 0.3)
    assert [fn for fn, *_ in launched] == [s.variant.kernel for s in steps]
    assert [dims for _, dims, *_ in launched] == [s.dims for s in steps]
    assert {stream for *_, stream, _ in launched} == {1234}
    assert len({raw for *_, raw in launched}) == 1  # one struct, the same bytes for every launch
    raw = launched[0][3]
    offsets = params.UNSEEN_ROWS.offsets
    for name, t in bufs.items():
        assert struct.unpack_from("<Q", raw, offsets[name])[0] == t.data_ptr(), name
    assert struct.unpack_from("<Q", raw, offsets["ws"])[0] != 0
