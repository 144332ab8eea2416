"""Write a Llama-family transformers model as a GGUF file llama.cpp runs, in float32 or bfloat16.

Why: llama.cpp is the peer CPU users pick, and comparing with it is fair only on the same weights at the same
precision. The embedded model ships as Q4_1; transformers dequantizes it on load, and this writes those very
weights back out unquantized, so llama.cpp (as a peer or as our target backend) and our torch backends run one
model. The tokenizer is copied from a GGUF (the one the model came from): building a GGUF vocabulary from a
Hugging Face tokenizer is the job of llama.cpp's own `convert_hf_to_gguf.py`.

llama.cpp's `llama` architecture rotates query/key pairs that are adjacent, transformers' Llama rotates the two
halves of each head: the q and k rows are permuted here, as llama.cpp's converter does (and transformers'
GGUF loader undoes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

from draftsmith.errors import ConfigError
from draftsmith.paths import private_suffix

GGUF_DTYPES = ("f32", "bf16")


def _neox_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first half, second half) pairs to adjacent pairs."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _array(weight: torch.Tensor, dtype: str) -> tuple[np.ndarray, object]:
    import gguf

    weight = weight.detach().cpu()
    if dtype == "bf16" and weight.dim() > 1:  # norms stay float32, as llama.cpp's converter keeps 1-d tensors
        return weight.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    return weight.float().numpy(), gguf.GGMLQuantizationType.F32


def tokenizer_fields(source: Path) -> list:
    """The tokenizer.* metadata of a GGUF file (its vocabulary, merges, special ids, chat template)."""
    import gguf

    reader = gguf.GGUFReader(source)
    return [field for name, field in reader.fields.items() if name.startswith("tokenizer.")]


def write_gguf(model: PreTrainedModel, out: Path, tokenizer_gguf: Path, dtype: str = "bf16") -> Path:
    """Write `model` (a Llama-family transformers model) to `out` with the tokenizer of `tokenizer_gguf`."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"unknown GGUF dtype '{dtype}': use {', '.join(GGUF_DTYPES)}")
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral"):
        raise ConfigError(f"writing GGUF supports Llama-family models; '{cfg.model_type}' is not one "
                          "(use llama.cpp's convert_hf_to_gguf.py)")
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"writing GGUF does not carry rope scaling '{rope}'; use llama.cpp's converter")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConfigError("writing GGUF supports Llama models without biases")
    fields = tokenizer_fields(tokenizer_gguf)
    vocab = next((len(f.contents()) for f in fields if f.name == "tokenizer.ggml.tokens"), None)
    if vocab != model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(f"{tokenizer_gguf} has {vocab} tokens but the model embeds "
                          f"{model.get_input_embeddings().weight.shape[0]}: the tokenizer is not this model's")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(out.stem)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    theta = getattr(cfg, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.ALL_F32)
    for field in fields:
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)

    inner = model.model
    tensors = {"token_embd.weight": inner.embed_tokens.weight, "output_norm.weight": inner.norm.weight}
    if model.lm_head.weight is not inner.embed_tokens.weight:  # llama.cpp reuses token_embd when absent
        tensors["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        tensors.update({
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
            f"blk.{i}.attn_q.weight": _neox_to_interleaved(attn.q_proj.weight, heads),
            f"blk.{i}.attn_k.weight": _neox_to_interleaved(attn.k_proj.weight, kv_heads),
            f"blk.{i}.attn_v.weight": attn.v_proj.weight,
            f"blk.{i}.attn_output.weight": attn.o_proj.weight,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_gate.weight": mlp.gate_proj.weight,
            f"blk.{i}.ffn_up.weight": mlp.up_proj.weight,
            f"blk.{i}.ffn_down.weight": mlp.down_proj.weight,
        })
    for name, weight in tensors.items():
        array, kind = _array(weight, dtype)
        writer.add_tensor(name, array, raw_dtype=kind)
    tmp = out.with_name(f"{out.name}.{private_suffix()}.tmp")
    writer.write_header_to_file(tmp)  # then renamed: an interrupted export leaves no half file at `out`
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out
