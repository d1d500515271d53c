"""Head dims the Hopper kernels run as they are where mma.sync pads them (80, 160, 192: tiles.FORWARD_SM90's note),
d96, whose O = P V and dK, dV GEMMs compute its own 96 columns (wgmma.cuh head_cols), and the wide backward above 128
(flash_bwd_sm90_wide.cuh: 160, 192, 256): the op against the fp32 reference with the tolerance rule, over odd
lengths, Nq != Nk, grouped-query heads, transposed views and every score mod, each call checked to run on the Hopper
kernels (no "on mma.sync" in the launch log; above 128 the backward with dropout does) at its own head dim."""
from __future__ import annotations

import pytest
import torch

from cupyflash import cuda_path, plan, tiles
from cupyflash.validate import kernel_head_dim
from reference import draw_inputs, seed_from
from test_gpu_features import _dropout_seed, _is_hopper, check_features, draw_bias, padding_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _is_hopper(), reason="the Hopper kernels run on sm_90 only")]

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def _on_mma_sync(caplog) -> list:
    return [r.getMessage() for r in caplog.records if "on mma.sync" in r.getMessage()]


def _check(caplog, head_dim, q, k, v, dout, bias=None, runs_at=None, **features):
    """check_features, then where each pass ran: the forward on the Hopper kernels at `runs_at` (by default
    head_dim), the backward on mma.sync only where its Hopper tiles there decline the call's dropout
    (tiles.Sm90Tiles.dropout)."""
    cuda_path._KNOWN.clear()
    caplog.clear()
    with caplog.at_level("DEBUG", logger="cupyflash.launch"):
        check_features(q, k, v, dout, bias, **features)
    fallbacks = _on_mma_sync(caplog)
    runs_at = head_dim if runs_at is None else runs_at
    if features.get("dropout_p", 0.0) > 0 and not tiles.BACKWARD_SM90[runs_at].dropout:
        # The declined backward goes to mma.sync's next head dim, and the reason names it there (d160's: 256)
        at = kernel_head_dim(runs_at)
        assert fallbacks and all(m.startswith("backward on mma.sync: ") and f"at head_dim {at}:" in m
                                 for m in fallbacks), fallbacks
    else:
        assert fallbacks == [], fallbacks
    forwards = [p for p in cuda_path._KNOWN.values() if p.layout.kernel == "fwd" and p.family != plan.PADDED]
    assert forwards and all(p.family == plan.HOPPER and p.variant.head_dim == runs_at for p in forwards)


@pytest.mark.parametrize("head_dim,runs_at", [(72, 80), (136, 160), (176, 192)])
def test_head_dims_between_run_padded_to_the_next_hopper_one(caplog, head_dim, runs_at):
    """cuda_path._padded_head_dim: d136 runs on the Hopper kernels' 160 columns (both passes), not on mma.sync's 256."""
    seed = seed_from("hopper head dims between", head_dim)
    q, k, v, dout = draw_inputs(2, 4, 2, 113, 203, head_dim, BF16, "transposed", seed)
    _check(caplog, head_dim, q, k, v, dout, runs_at=runs_at, causal=True)


LENGTHS = ((1, 1), (17, 17), (113, 203), (203, 113), (1023, 1024))


def _sweep():
    cases = []
    for i, (d, (n_q, n_k), causal) in enumerate((d, nl, c) for d in (80, 96, 160, 192, 256) for nl in LENGTHS
                                                 for c in (False, True)):
        dtype, layout = (FP16, "contiguous") if i % 2 else (BF16, "transposed")
        h_q, h_kv = ((3, 3), (4, 2), (4, 1))[i % 3]
        cases.append(pytest.param(d, dtype, layout, n_q, n_k, causal, h_q, h_kv,
                                  id=f"d{d}-{'fp16' if dtype == FP16 else 'bf16'}-{layout}-{n_q}x{n_k}-"
                                     f"{'causal' if causal else 'full'}-{h_q}/{h_kv}"))
    return cases


@pytest.mark.parametrize("head_dim,dtype,layout,n_q,n_k,causal,h_q,h_kv", _sweep())
def test_head_dims_of_their_own_on_hopper(caplog, head_dim, dtype, layout, n_q, n_k, causal, h_q, h_kv):
    seed = seed_from("hopper head dims", head_dim, dtype, layout, n_q, n_k, causal, h_q, h_kv)
    q, k, v, dout = draw_inputs(2, h_q, h_kv, n_q, n_k, head_dim, dtype, layout, seed)
    _check(caplog, head_dim, q, k, v, dout, causal=causal)


MODS_CASES = [  # (head_dim, dtype, causal, (Nq, Nk), bias (shape, dtype) or None, window, softcap, dropout_p)
    (80, BF16, True, (113, 203), ("padding", torch.bool), (-1, -1), 0.0, 0.0),  # the kernels' key mask
    (80, FP16, False, (203, 113), ("1HQK", FP32), (40, 16), 5.0, 0.15),  # bias + its grad, window, soft-cap, dropout
    (96, BF16, False, (113, 203), ("B11K", BF16), (-1, -1), 0.0, 0.2),
    (160, FP16, True, (97, 97), ("padding", torch.bool), (-1, -1), 0.0, 0.0),
    (160, BF16, False, (113, 203), ("BHQK", BF16), (48, 8), 5.0, 0.0),
    (192, BF16, True, (203, 113), ("11QK", FP32), (64, 0), 5.0, 0.0),
    (192, FP16, False, (17, 17), None, (-1, -1), 5.0, 0.0),
    (256, BF16, False, (113, 203), ("padding", torch.bool), (-1, -1), 0.0, 0.0),
    (256, FP16, True, (203, 113), ("padding", torch.bool), (-1, -1), 0.0, 0.0),
    # the wide backward's window and soft-capping (Gemma 2 and 3 at d256)
    (256, BF16, True, (203, 113), None, (64, 0), 0.0, 0.0),
    (256, FP16, False, (113, 203), None, (-1, -1), 30.0, 0.0),
    (256, BF16, False, (1023, 1024), None, (256, 128), 50.0, 0.0),
    (256, BF16, True, (97, 97), None, (-1, -1), 50.0, 0.0),
    (160, BF16, False, (113, 203), None, (48, 8), 5.0, 0.0),
    # the wide backward's bias: Gemma 2's padding beside its window and soft-cap (an added mask, tiles skipped), a
    # float bias with its gradient (the rebuild rule's rows), a broadcast one
    (256, BF16, True, (1023, 1024), ("padding", torch.bool), (256, 0), 50.0, 0.0),
    (256, FP16, False, (113, 203), ("BHQK", FP32), (-1, -1), 0.0, 0.0),
    (192, BF16, True, (203, 113), ("B11K", BF16), (-1, -1), 30.0, 0.0),
]


@pytest.mark.parametrize("head_dim,dtype,causal,lengths,bias,window,softcap,p", MODS_CASES,
                         ids=[f"d{c[0]}-{'fp16' if c[1] == FP16 else 'bf16'}-{'causal' if c[2] else 'full'}-"
                              f"{c[3][0]}x{c[3][1]}-{c[4][0] if c[4] else 'nobias'}-w{c[5][0]}_{c[5][1]}-cap{c[6]}-p{c[7]}"
                              for c in MODS_CASES])
def test_head_dims_of_their_own_take_score_mods(caplog, head_dim, dtype, causal, lengths, bias, window, softcap, p):
    seed = seed_from("hopper head dims mods", head_dim, dtype, causal, lengths, bias, window, softcap, p)
    q, k, v, dout = draw_inputs(2, 4, 2, *lengths, head_dim, dtype, "contiguous", seed,
                                qk_scale=2.0 if softcap else 1.0)
    attn_bias = None
    if bias is not None:
        attn_bias = padding_mask(q, k, seed) if bias[0] == "padding" else draw_bias(bias[0], q, k, bias[1], seed + 1)
    _check(caplog, head_dim, q, k, v, dout, attn_bias, causal=causal, window=window, dropout_p=p,
           seed=_dropout_seed(seed), softcap=softcap,
           bias_grad=attn_bias is not None and attn_bias.dtype != torch.bool)
