"""The attention patterns torch/_inductor/fx_passes/fuse_attention.py rewrites (_sfdp_pattern_1..27),
written as plain functions, dropout at p = 0 (inactive). Inputs: q, k, v (B, H, N, D) for the
"bhnd" patterns, (B, N, H, D) for the permuted ("bnhd") ones, (B·H, N, D) for the bmm ones."""
import torch

P = 0.0  # dropout_p: inactive dropout is fused; active dropout is left alone (tested elsewhere)


def p1(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(8.0).softmax(dim=-1).matmul(v)


def p2(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(0.125).softmax(dim=-1).matmul(v)


def p3(q, k, v):
    return torch.nn.functional.dropout(torch.matmul(q, k.transpose(-2, -1)).div(8.0).softmax(dim=-1), p=P).matmul(v)


def p4(q, k, v):
    return torch.nn.functional.dropout(torch.matmul(q, k.transpose(-2, -1)).mul(0.125).softmax(dim=-1), p=P).matmul(v)


def p5(q, k, v, mask):
    return torch.softmax((q @ k.transpose(-2, -1) / 8.0) + mask, dim=-1) @ v


def p6(q, k, v, mask):
    w = torch.softmax((q @ k.transpose(-2, -1) / 8.0) + mask, dim=-1)
    return torch.dropout(w, P, True) @ v


def _perm(*ts):
    return [t.permute(0, 2, 1, 3) for t in ts]


def p7(q, k, v):
    q, k, v = _perm(q, k, v)
    div = (q @ k.transpose(-2, -1) / 8.0).to(torch.float32)
    w = torch.dropout(torch.softmax(div, dim=-1), P, True).to(torch.float16)
    return w @ v.to(w.dtype)


def p8(q, k, v):
    q, k, v = _perm(q, k, v)
    div = (q @ k.transpose(-2, -1) / 8.0).to(torch.float32)
    w = torch.softmax(div, dim=-1).to(torch.float16)
    return w @ v.to(w.dtype)


def p9(q, k, v):
    q, k, v = _perm(q, k, v)
    q = q / 8.0
    div = (q @ k.transpose(-2, -1)).to(torch.float32)
    w = torch.dropout(torch.softmax(div, dim=-1), P, True).to(torch.float16)
    return w @ v.to(w.dtype)


def p10(q, k, v):
    q, k, v = _perm(q, k, v)
    q = q / 8.0
    div = (q @ k.transpose(-2, -1)).to(torch.float32)
    w = torch.softmax(div, dim=-1).to(torch.float16)
    return w @ v.to(w.dtype)


def p11(q, k, v):
    q, k, v = _perm(q, k, v)
    return torch.matmul(q, k.transpose(-2, -1)).div(8.0).softmax(dim=-1).matmul(v)


def p12(q, k, v):
    q, k, v = _perm(q, k, v)
    return torch.nn.functional.dropout(torch.matmul(q, k.transpose(-2, -1)).div(8.0).softmax(dim=-1), p=P).matmul(v)


def p13(q, k, v):
    w = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(torch.nn.functional.dropout(w, p=P), v)


def p14(q, k, v, mask):
    q, k, v = _perm(q, k, v)
    return (torch.matmul(q, k.transpose(-2, -1)).div(8.0) + mask).softmax(dim=-1).matmul(v)


def _distilbert(q, k, v, pad, scale_q, dropout):
    q, k, v = _perm(q, k, v)
    bs, k_len = q.size(0), k.size(-2)
    if scale_q:
        q = q.div(8.0)
    scores = q @ k.transpose(-2, -1)
    if not scale_q:
        scores = scores.div(8.0)
    fill_value = torch.full((), -float("inf"), dtype=q.dtype, device=q.device)
    mask = (pad == 0).view((bs, 1, 1, k_len)).expand_as(scores)
    w = torch.softmax(scores.masked_fill(mask, fill_value), dim=-1)
    return (torch.nn.functional.dropout(w, P) if dropout else w) @ v


def p15(q, k, v, pad):
    return _distilbert(q, k, v, pad, scale_q=False, dropout=False)


def p16(q, k, v, mask):
    q, k, v = _perm(q, k, v)
    w = torch.nn.functional.dropout((torch.matmul(q, k.transpose(-2, -1)).div(8.0) + mask).softmax(dim=-1), P)
    return w.to(dtype=q.dtype).matmul(v)


def p17(q, k, v, pad):
    return _distilbert(q, k, v, pad, scale_q=False, dropout=True)


def _gpt2(q, k, v, causal_mask, attn_mask, permute):
    if permute:
        q, k, v = _perm(q, k, v)
    w = torch.matmul(q, k.permute(0, 1, 3, 2))
    w = w.div(torch.full([], 8.0, dtype=w.dtype, device=w.device))
    mask_value = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
    w = torch.where(causal_mask, w, mask_value)
    if attn_mask is not None:
        w = w + attn_mask
    w = torch.nn.functional.dropout(w.softmax(dim=-1).type(v.dtype), P)
    return w.matmul(v), k, v


def p18(q, k, v, causal_mask):
    return _gpt2(q, k, v, causal_mask, None, permute=True)


def p19(q, k, v, causal_mask, attn_mask):
    return _gpt2(q, k, v, causal_mask, attn_mask, permute=False)


def p20(q, k, v, pad):
    return _distilbert(q, k, v, pad, scale_q=True, dropout=True)


def _t5(q, k, v, mask, dropout, return_kv, from_full):
    q, k, v = _perm(q, k, v)
    score = torch.matmul(q, k.permute(0, 1, 3, 2))
    if from_full:
        score = score.float().type_as(q)
    else:
        score = (score + mask).type_as(q)
    w = score.float().softmax(dim=-1).type_as(q)
    out = (torch.nn.functional.dropout(w, P) if dropout else w).matmul(v)
    return (out, k, v) if return_kv else out


def p21(q, k, v, mask):
    return _t5(q, k, v, mask, dropout=False, return_kv=False, from_full=False)


def p22(q, k, v, mask):
    return _t5(q, k, v, mask, dropout=False, return_kv=True, from_full=False)


def p23(q, k, v):
    return _t5(q, k, v, None, dropout=False, return_kv=True, from_full=True)


def p24(q, k, v, attention_mask):
    bs, n_head, seq_len, head_size = q.shape
    q3 = q.view(bs * n_head, -1, head_size)
    k3 = k.reshape(bs * n_head, -1, head_size)
    v3 = v.reshape(bs * n_head, -1, head_size)
    w = torch.bmm(q3, k3.transpose(1, 2))
    w = w.view(bs, n_head, seq_len, -1) + attention_mask
    w = w.view(bs * n_head, seq_len, -1)
    w = torch.nn.functional.softmax(w, dim=-1)
    return torch.bmm(w, v3).view(bs, n_head, seq_len, head_size)


def p25(q, k, v, mask):
    return _t5(q, k, v, mask, dropout=True, return_kv=False, from_full=False)


def p26(q, k, v, mask):
    return _t5(q, k, v, mask, dropout=True, return_kv=True, from_full=False)


def p27(q, k, v):
    return _t5(q, k, v, None, dropout=True, return_kv=True, from_full=True)
