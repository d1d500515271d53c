"""Hugging Face transformers eager attention modules in isolation, written as their sources write it (Llama,
Gemma 2), and the masks transformers builds for them. Whole real models from the installed transformers are
tested in test_transformers_models.py; these stay for checks on one attention module (soft-cap spellings, rows
with every key masked)."""

import torch
import torch.nn as nn


# ---- Llama (modeling_llama.py: eager_attention_forward, repeat_kv, rotary embedding) -------------

def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states, n_rep):
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size=64, num_heads=4, num_key_value_heads=2, attention_dropout=0.0):
        super().__init__()
        self.head_dim = hidden_size // num_heads
        self.num_key_value_groups = num_heads // num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, hidden_states, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        cos, sin = self.rotary(hidden_states, position_ids)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attn_output, _ = eager_attention_forward(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


def llama_causal_mask(padding_mask, dtype):
    """The 4-D additive mask HF builds (min_dtype where masked), from a (B, T) 1/0 padding mask."""
    b, t = padding_mask.shape
    min_dtype = torch.finfo(dtype).min
    causal = torch.full((t, t), fill_value=min_dtype, dtype=dtype).triu(1)
    causal = causal[None, None, :, :].expand(b, 1, -1, -1).clone()
    padding = causal + padding_mask[:, None, None, :].to(dtype)
    return causal.masked_fill(padding == 0, min_dtype)


# ---- Gemma 2 (modeling_gemma2.py: eager_attention_forward with logit soft-capping) -----------------

def gemma2_eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                                   softcap=None):
    if scaling is None:
        scaling = module.head_dim ** -0.5
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if softcap is not None:
        attn_weights = attn_weights / softcap
        attn_weights = torch.tanh(attn_weights)
        attn_weights = attn_weights * softcap
    if attention_mask is not None:
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class Gemma2Attention(LlamaAttention):
    """Llama's projections and rotary embedding; Gemma 2 scales by query_pre_attn_scalar ** -0.5 and caps the
    logits with attn_logit_softcapping (50.0 in the released configs)."""

    def __init__(self, hidden_size=64, num_heads=4, num_key_value_heads=2, query_pre_attn_scalar=16,
                 attn_logit_softcapping=50.0):
        super().__init__(hidden_size, num_heads, num_key_value_heads)
        self.scaling = query_pre_attn_scalar ** -0.5
        self.attn_logit_softcapping = attn_logit_softcapping

    def forward(self, hidden_states, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        cos, sin = self.rotary(hidden_states, position_ids)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attn_output, _ = gemma2_eager_attention_forward(
            self, query_states, key_states, value_states, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
            softcap=self.attn_logit_softcapping)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


def sliding_window_mask(padding_mask, window, dtype):
    """llama_causal_mask with keys more than ``window`` - 1 positions back masked too (Gemma 2's local layers)."""
    mask = llama_causal_mask(padding_mask, dtype)
    t = padding_mask.shape[1]
    too_far = torch.ones(t, t, dtype=torch.bool).tril(-window)
    return mask.masked_fill(too_far, torch.finfo(dtype).min)


# ---- BERT (modeling_bert.py) ----------------------------------------------------------------------

def bert_extended_mask(attention_mask, dtype):
    """get_extended_attention_mask: (B, T) 1/0 -> (B, 1, 1, T) additive with finfo.min."""
    extended = attention_mask[:, None, None, :].to(dtype=dtype)
    return (1.0 - extended) * torch.finfo(dtype).min
