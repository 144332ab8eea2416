"""Tiny randomly initialised transformers models and a character tokenizer, built in code (no downloads)."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = string.printable  # 100 characters: digits, letters, punctuation, whitespace
SPECIALS = ["<pad>", "<eos>"]


def char_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """Character-level tokenizer: token id = index in SPECIALS + CHARS (+ extra_chars)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS + extra_chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(
    vocab_size: int = len(SPECIALS) + len(CHARS),
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    eos_token_id: int = 1,
    init_std: float = 0.5,
) -> LlamaForCausalLM:
    """A small random Llama in fp32, eval mode. A large init_std makes its distributions peaked and varied."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    return model


def tiny_gemma3(window: int = 8, seed: int = 0) -> Gemma3ForCausalLM:
    """A small random Gemma 3 whose sliding-window layers (window tokens) alternate with a full-attention one."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(SPECIALS) + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=512,
        eos_token_id=1, pad_token_id=0, bos_token_id=None, initializer_range=0.5,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    return model


def noisy_copy(model: LlamaForCausalLM, scale: float, seed: int = 0) -> LlamaForCausalLM:
    """The same model with Gaussian noise on every weight: a drafter that agrees often but not always."""
    import copy

    torch.manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn_like(param) * scale * param.std())
    return noisy


def hf_greedy(model: LlamaForCausalLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: the target alone, through transformers' own generate."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()
