"""Tiny random models from the real ``transformers`` code (configs built here, nothing downloaded), with eager
attention, and the inputs each one takes: token ids, pixels or audio features, and a padding mask.

Every config is small enough that a model compiles in seconds on a CPU: hidden size 32, 2 layers per stack,
4 query heads (2 key/value heads where the family has grouped-query attention), sequences of 12 tokens,
batch 2. Dropout is off (the models run in eval mode), so eager and compiled runs see the same numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

VOCAB = 96
BATCH, SEQ = 2, 12  # SEQ: tokens of the text side
DECODER_SEQ = 6  # decoder tokens of the encoder-decoder models
# Not 2 for end-of-text: CLIP reads eos_token_id == 2 as its legacy config and pools at the largest token id.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 3
PADDED = 4  # positions of batch row 1 masked by "right"/"left" padding
PADDINGS = ("none", "right", "left")

_SPECIAL = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


@dataclass(frozen=True)
class Spec:
    """One model family: how to build it, what to feed it, and how many attention sites it has."""

    build: Callable[[], torch.nn.Module]  # fp32, eval mode, eager attention
    inputs: Callable[[torch.Generator, str], dict]  # (generator, padding) -> forward kwargs
    sites: int  # softmax-attention computations in one forward: every layer's self- and cross-attention
    padding: bool = True  # takes a padding mask (else only padding "none" applies)
    generates: bool = False  # a decoder with a KV cache: model.generate() is checked too
    encoder_sites: int = 0  # of ``sites``, those generate() runs once outside the compiled forward

    @property
    def step_sites(self) -> int:
        """Sites of one compiled generation step (the prefill or one new token)."""
        return self.sites - self.encoder_sites


def padding_mask(padding: str, length: int = SEQ) -> torch.Tensor:
    """(BATCH, length) 1/0 mask: row 0 all ones; row 1 with PADDED zeros at the end ("right") or start ("left")."""
    mask = torch.ones(BATCH, length, dtype=torch.long)
    if padding == "right":
        mask[1, -PADDED:] = 0
    elif padding == "left":
        mask[1, :PADDED] = 0
    else:
        assert padding == "none", padding
    return mask


def _token_ids(gen: torch.Generator, length: int = SEQ) -> torch.Tensor:
    return torch.randint(max(PAD_ID, BOS_ID, EOS_ID) + 1, VOCAB, (BATCH, length), generator=gen)  # none special


def _text(gen, padding):
    return {"input_ids": _token_ids(gen), "attention_mask": padding_mask(padding)}


def _eager(config: str, model: str, **fields):
    """A builder of ``transformers.<model>(transformers.<config>(**fields))``, eager attention, eval mode; the
    classes are looked up when it runs (importing a model's module takes seconds)."""
    def build():
        import transformers

        made = getattr(transformers, config)(**fields, attn_implementation="eager")
        return getattr(transformers, model)(made).eval()
    return build


def _lm(config: str, model: str, **fields) -> Spec:
    """A decoder-only causal LM: two layers of self-attention."""
    return Spec(_eager(config, model, **fields, **_SPECIAL), _text, sites=2, generates=True)


def _llama_like(config: str, model: str, **fields) -> Spec:
    """A causal LM whose config takes Llama's field names (grouped-query: 4 query heads, 2 key/value heads)."""
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return _lm(config, model, **{**base, **fields})


def _seq2seq_text(gen, padding):
    """Encoder tokens and decoder tokens, each with its own padding mask of the same kind."""
    return {"input_ids": _token_ids(gen), "attention_mask": padding_mask(padding),
            "decoder_input_ids": _token_ids(gen, DECODER_SEQ),
            "decoder_attention_mask": padding_mask(padding, DECODER_SEQ)}


WHISPER_MELS, WHISPER_FRAMES = 8, 16  # the encoder's two convolutions halve the frames: 8 positions


def _whisper_inputs(gen, padding):
    # The encoder takes no padding mask (Whisper pads audio with silence); the decoder's tokens do.
    return {"input_features": torch.randn(BATCH, WHISPER_MELS, WHISPER_FRAMES, generator=gen),
            "decoder_input_ids": _token_ids(gen, DECODER_SEQ),
            "decoder_attention_mask": padding_mask(padding, DECODER_SEQ)}


IMAGE, PATCH = 16, 4  # 16 patches (+ the class token: 17 positions)


def _pixels(gen):
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)


def _clip() -> Spec:
    def build():
        import transformers

        text = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                           **_SPECIAL)
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
        config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=16, attn_implementation="eager")
        return transformers.CLIPModel(config).eval()

    def inputs(gen, padding):
        ids = _token_ids(gen)
        mask = padding_mask(padding)
        # CLIP pools each text at its end-of-text token: put one at every row's last real position.
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,)
        ids[torch.arange(BATCH), last] = EOS_ID
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": _pixels(gen)}

    return Spec(build, inputs, sites=4)  # text and vision towers, 2 layers each


_GPT = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)


def upcast_qk_specs() -> dict[str, Spec]:
    """Families that cast q and k to fp32 while v keeps the model's 16-bit dtype (issue 14, item 4): GPT-J always,
    GPT-2 with ``reorder_and_upcast_attn``."""
    return {"gptj": _lm("GPTJConfig", "GPTJForCausalLM", **_GPT, rotary_dim=4),
            "gpt2_upcast": _lm("GPT2Config", "GPT2LMHeadModel", **_GPT, reorder_and_upcast_attn=True)}


def specs() -> dict[str, Spec]:
    """Every family of issue 14's list, DeepSeek-V3's latent attention (v's head dim not q's), GPT-OSS's attention
    sinks and ModernBERT's bidirectional window, by name."""
    gpt = _GPT
    stack = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": _llama_like("LlamaConfig", "LlamaForCausalLM"),
        "mistral": _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=4),
        "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
        "gemma2": _llama_like("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4,
                              query_pre_attn_scalar=8, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                              layer_types=["sliding_attention", "full_attention"]),
        "gemma3": _llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, sliding_window=4,
                              query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]),
        "phi3": _llama_like("Phi3Config", "Phi3ForCausalLM"),
        # Experts as batched matmuls: no data-dependent loop (one Dynamo graph), and fp64 runs (grouped_mm has
        # no fp64 kernel; fp64 is the reference).
        "mixtral": _llama_like("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                               experts_implementation="batched_mm"),
        # Multi-head latent attention (DeepSeek-V2 / V3): q and k of 8 + 4 columns (no position part, rotary part),
        # v of its own 8; the two layers dense (first_k_dense_replace), as the experts are not what is checked here.
        # Attention sinks (a learned logit per head in each row's softmax denominator), sliding and full layers;
        # experts as batched matmuls, as Mixtral's.
        "gpt_oss": _llama_like("GptOssConfig", "GptOssForCausalLM", intermediate_size=32, head_dim=8,
                               num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"], experts_implementation="batched_mm"),
        "deepseek_v3": _llama_like("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=4,
                                   q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=8, first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2,
                                   n_group=1, topk_group=1, moe_intermediate_size=16),
        "gpt2": _lm("GPT2Config", "GPT2LMHeadModel", **gpt),
        "gptj": _lm("GPTJConfig", "GPTJForCausalLM", **gpt, rotary_dim=4),
        "gpt_neox": _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", **stack, intermediate_size=64,
                        max_position_embeddings=64),
        "opt": _lm("OPTConfig", "OPTForCausalLM", **stack, ffn_dim=64, max_position_embeddings=64,
                   word_embed_proj_dim=32),
        "falcon": _lm("FalconConfig", "FalconForCausalLM", **stack),
        "bert": Spec(_eager("BertConfig", "BertModel", **stack, intermediate_size=64, max_position_embeddings=64,
                            pad_token_id=PAD_ID), _text, sites=2),
        # Global attention in layer 0, a bidirectional sliding window (|i - j| <= 3, masking_utils' abs of the
        # distance) in layer 1.
        "modernbert": Spec(_eager("ModernBertConfig", "ModernBertModel", **stack, intermediate_size=64,
                                  max_position_embeddings=64, local_attention=6, global_attn_every_n_layers=2,
                                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, cls_token_id=BOS_ID,
                                  sep_token_id=EOS_ID),
                           _text, sites=2),
        # Encoder self-attention, decoder self- and cross-attention, 2 layers each; generate() runs the encoder
        # outside the compiled forward.
        "t5": Spec(_eager("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                          num_layers=2, num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                          relative_attention_max_distance=16, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                          decoder_start_token_id=PAD_ID),
                   _seq2seq_text, sites=6, generates=True, encoder_sites=2),
        "whisper": Spec(_eager("WhisperConfig", "WhisperForConditionalGeneration", vocab_size=VOCAB,
                               num_mel_bins=WHISPER_MELS, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                               decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               max_source_positions=WHISPER_FRAMES // 2, max_target_positions=32,
                               decoder_start_token_id=BOS_ID, begin_suppress_tokens=None, **_SPECIAL),
                        _whisper_inputs, sites=6, generates=True, encoder_sites=2),
        "vit": Spec(_eager("ViTConfig", "ViTModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, image_size=IMAGE, patch_size=PATCH),
                    lambda gen, padding: {"pixel_values": _pixels(gen)}, sites=2, padding=False),
        "clip": _clip(),
    }


@contextlib.contextmanager
def fp32_mask_fill():
    """transformers' eager masks filled with fp32's finfo.min also in fp64 models.

    Most models take the softmax in fp32 (``softmax(..., dtype=torch.float32)``): fp64's finfo.min becomes -inf
    there, so a row that sees no key (left padding under a causal mask, right padding under a window) is NaN in
    the fp64 model, and from the next layer on the whole sequence is. With fp32's finfo.min, as the fp32 model
    has, the row stays finite and attends uniformly in both, and the fp64 model is a reference for every input.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    def eager_mask_fp32_fill(*args, dtype=torch.float32, **kwargs):
        mask = eager_mask(*args, dtype=torch.float32, **kwargs)
        return None if mask is None else mask.to(dtype)

    ALL_MASK_ATTENTION_FUNCTIONS["eager"] = eager_mask_fp32_fill  # a local override of the global table
    try:
        yield
    finally:
        del ALL_MASK_ATTENTION_FUNCTIONS["eager"]
