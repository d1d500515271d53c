"""Attention sinks (GPT-OSS): softmax over ``cat([scores, sinks], -1)``, less its row max or not, with the sink
column sliced off before P·V. The keys' probabilities are softmax(scores) · σ(lse - sink), so the site runs on the op
with its out scaled per row by the op's lse, and the sinks' gradient flows through that sigmoid (and q's and k's
through the lse: the op's dlse). Look-alikes that slice the wrong columns or shift per column are left alone."""
import math

import pytest
import torch
import torch.nn.functional as F

import compile_backend
from models.harness import assert_left_alone, compile_and_compare

B, H, N, D = 2, 4, 7, 8


def _qkv(n_q=N, n_k=N, dtype=torch.float64):
    return tuple(torch.randn(B, H, n, D, dtype=dtype) for n in (n_q, n_k, n_k))


class Sinks(torch.nn.Module):
    """GPT-OSS's eager attention (transformers' modeling_gpt_oss.eager_attention_forward): a learned logit per head,
    the row max subtracted, the sink column dropped after the softmax; the mask causal, optionally with key padding
    from a (B, Nk) 0/1 attention mask, added as finfo.min."""

    def __init__(self, width: int = 1, shift: bool = True):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(H, width, dtype=torch.float64))
        self.shift = shift

    def forward(self, q, k, v, attention_mask=None):
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)[None, None]
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
        w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D) + mask
        sinks = self.sinks.reshape(1, H, 1, -1).expand(q.shape[0], -1, n_q, -1)
        logits = torch.cat([w, sinks], dim=-1)
        if self.shift:
            logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :n_k]
        return torch.matmul(F.dropout(probs, p=0.0, training=self.training).to(v.dtype), v)


@pytest.mark.parametrize("width,shift", [(1, True), (1, False), (2, True)])
def test_sinks_fused_with_eager_numbers_and_gradients(width, shift):
    """Outputs and the gradients of q, k, v and the sinks equal eager's (fp64), one fused site, proven causal."""
    torch.manual_seed(width + 2 * shift)
    graphs = compile_and_compare(Sinks(width, shift), *_qkv(), expect=1)
    (op,) = [n for gm in graphs for n in gm.graph.nodes if n.target is torch.ops.cupyflash.flash_attn_fwd.default]
    assert op.args[5] is True and op.args[3] is None  # causal, no bias
    torch._dynamo.reset()
    (site,) = compile_backend.explain(Sinks(width, shift), *_qkv()).fused
    assert site.mask_form == "causal" and any(n.startswith("attention sinks") for n in site.notes)


def test_sinks_with_left_padding_rows_that_see_no_key():
    """Left padding leaves batch row 1's first queries no key: eager's sink takes the whole row (out 0, no
    gradient), which the op's own rows give (lse +inf, σ = 1 on out = 0): no uniform rows here."""
    torch.manual_seed(3)
    attention_mask = torch.ones(B, N)
    attention_mask[1, :3] = 0
    q, k, v = _qkv()
    compile_and_compare(Sinks(), q, k, v, attention_mask, expect=1, frozen=(3,))
    torch._dynamo.reset()
    (site,) = compile_backend.explain(Sinks(), q, k, v, attention_mask).fused
    assert site.mask_form == "causal + key padding"


def keys_dropped_instead(q, k, v):
    """The first key sliced off and the sink kept: not attention over the keys."""
    s = q @ k.transpose(-2, -1) / 8.0
    return torch.cat([s, torch.full((*s.shape[:-1], 1), 0.5, dtype=s.dtype)], dim=-1).softmax(dim=-1)[..., 1:] @ v


def shifted_per_column(q, k, v):
    """A shift that differs per column changes the softmax: left as written."""
    s = q @ k.transpose(-2, -1) / 8.0
    logits = torch.cat([s, torch.full((*s.shape[:-1], 1), 0.5, dtype=s.dtype)], dim=-1)
    logits = logits - logits.amax(dim=-2, keepdim=True)
    return logits.softmax(dim=-1)[..., :-1] @ v


def test_sink_look_alikes_left_alone():
    torch.manual_seed(4)
    assert_left_alone(keys_dropped_instead, *_qkv(), reason="not sliced back to the keys alone")
    compile_and_compare(shifted_per_column, *_qkv(), expect=0, grad=False)
