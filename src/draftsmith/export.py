"""Export an EAGLE-style head in the `speculators` layout (vllm-project/speculators), and read it back.

The layout is speculators' EAGLE-1/HASS one (`speculators_model_type: "eagle"`, class `EagleSpeculator`, in
speculators up to 0.4): a `config.json` and a `model.safetensors` holding

    embedding_layernorm.weight        RMSNorm on the token embeddings (written as ones, see below)
    fusion_fc.weight, fusion_fc.bias  Linear(2H -> H) over concat(token embedding, verifier hidden state)
    transformer.*                     one decoder layer (input_layernorm, self_attn.{q,k,v,o}_proj,
                                      post_attention_layernorm, mlp.{gate,up,down}_proj)
    pre_lm_head_layernorm.weight      RMSNorm before the verifier's lm_head

with `layernorms: true, fusion_bias: true` (HASS-style: our fc has a bias, our decoder layer keeps its input
norm, and our predicted features go through the target's final norm, copied here as the pre-lm-head norm).
The embedding and lm_head are the verifier's and are not stored, as in speculators.

Their fusion concatenates [embedding, hidden]; ours concatenates [feature, embedding], so the fc weight's two
column blocks are swapped on export and back on import.

What the format cannot say exactly (see docs/usage/export.md):
- speculators normalises the token embeddings before the fusion; our head does not. The ones written as
  `embedding_layernorm.weight` keep the layout complete, but a consumer running speculators' forward feeds
  the fc RMS-normalised embeddings, which our head was not trained on.
- The EAGLE-1 format has no reduced draft vocabulary (that exists only in EAGLE-3, as `d2t`/`t2d`). Ours is
  kept in `draft_vocab.json` next to the weights (not a .safetensors file, so loaders that read every
  .safetensors in the folder ignore it); speculators and vLLM draft over the whole vocabulary instead.
  In EAGLE-3 terms our sorted `draft_to_target` ids are d2t = draft_to_target - arange(draft_vocab) and
  t2d[i] = i in draft_to_target.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from draftsmith.errors import ConfigError, IncompatibleDrafterError, ModelLoadError
from draftsmith.heads import EagleHead, HeadConfig, load_head

CONFIG_FILE, WEIGHTS_FILE, DRAFT_VOCAB_FILE = "config.json", "model.safetensors", "draft_vocab.json"
MODEL_TYPE = "eagle"
# the hub ids a serving engine loads for our embedded aliases (we run them from GGUF files)
VERIFIER_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3": "google/gemma-3-270m"}


def export_speculators(
    head_dir: str | Path, out_dir: str | Path, target_spec: str, *, target: PreTrainedModel | None = None,
    verifier: str | None = None, speculative_tokens: int = 5,
) -> Path:
    """Write the EAGLE head in `head_dir` to `out_dir` in the speculators layout. `target_spec` names the
    target (alias, hub id or folder; loaded unless `target` is given); `verifier` overrides the name written
    for the serving engine to load (default: the alias's hub id, or `target_spec` itself)."""
    if target is None:
        from draftsmith.models import load_model

        target = load_model(target_spec, dtype="float32").model
    head = load_head(head_dir, target)  # refuses a head trained for another target
    if not isinstance(head, EagleHead):
        raise ConfigError(f"{head_dir} holds a {head.config.kind} head; only EAGLE-style heads export to "
                          "the speculators format")
    if speculative_tokens < 1:
        raise ConfigError(f"speculative_tokens must be >= 1, got {speculative_tokens}")
    config, hidden = head.config, head.config.hidden_size
    state = {name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()}
    dtype = state["fc.weight"].dtype
    fc = state["fc.weight"]
    weights = {
        "embedding_layernorm.weight": torch.ones(hidden, dtype=dtype),
        "fusion_fc.weight": torch.cat([fc[:, hidden:], fc[:, :hidden]], dim=1).contiguous(),
        "fusion_fc.bias": state["fc.bias"],
        "pre_lm_head_layernorm.weight": final_norm_scale(target).to(dtype),
    }
    weights.update({f"transformer.{name[len('layer.'):]}": t for name, t in state.items() if name.startswith("layer.")})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    name = verifier or VERIFIER_IDS.get(target_spec, target_spec)
    speculators_config = _speculators_config(config, name, target, speculative_tokens, dtype)
    (out / CONFIG_FILE).write_text(json.dumps(speculators_config, indent=2) + "\n")
    draft_to_target = head.draft_to_target.cpu()
    vocab_file = out / DRAFT_VOCAB_FILE
    if config.draft_vocab:
        vocab_file.write_text(json.dumps({"draft_to_target": draft_to_target.tolist()}))
    elif vocab_file.exists():  # a stale mapping from an earlier export into the same folder
        vocab_file.unlink()
    return out


def final_norm_scale(target: PreTrainedModel) -> torch.Tensor:
    """The target's final RMSNorm as a plain scale vector (w in w * x / rms(x)), whatever its convention
    (Llama stores w, Gemma stores w - 1): the norm of a vector of ones, whose RMS is 1, undone for eps."""
    norm = copy.deepcopy(target.base_model.norm).float().cpu()
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    size = next(norm.parameters()).shape[0]
    with torch.no_grad():
        return norm(torch.ones(1, size))[0] * math.sqrt(1 + eps)


def _speculators_config(config: HeadConfig, verifier: str, target: PreTrainedModel, speculative_tokens: int,
                        dtype: torch.dtype) -> dict:
    layer = {  # the decoder layer's LlamaConfig, with both rope spellings (transformers 4.x and 5.x)
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    }
    return {
        "architectures": ["EagleSpeculator"],
        "speculators_version": "0.4.0",  # the last release with the EAGLE-1/HASS model type
        "speculators_model_type": MODEL_TYPE,
        "transformer_layer_architecture": "LlamaDecoderLayer",
        "transformer_layer_config": layer,
        "layernorms": True,
        "fusion_bias": True,
        "draft_vocab_size": config.draft_vocab or config.vocab_size,
        "speculators_config": {
            "algorithm": MODEL_TYPE,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(target.config.architectures or [type(target).__name__])},
        },
        "torch_dtype": str(dtype).removeprefix("torch."),
        # ours, ignored by speculators and vLLM: how the head was made, for `load_speculators`
        "draftsmith": {"target": config.target, "training": config.training},
    }


def load_speculators(out_dir: str | Path, target_model: PreTrainedModel | None = None) -> EagleHead:
    """Read a speculators-layout EAGLE head (ours, or one with the same architecture) back as an EagleHead;
    with `target_model`, refuse one whose shapes or pre-lm-head norm do not fit that target."""
    folder = Path(out_dir)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{folder} is not a speculators folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    spec = json.loads(config_path.read_text())
    if spec.get("speculators_model_type") != MODEL_TYPE or not spec.get("layernorms", False):
        raise IncompatibleDrafterError(
            f"{folder} holds a speculators '{spec.get('speculators_model_type')}' model with layernorms="
            f"{spec.get('layernorms')}; draftsmith's EAGLE head reads only 'eagle' with layernorms=true")
    config = _head_config(spec)
    draft_vocab_path = folder / DRAFT_VOCAB_FILE
    draft_to_target = None
    if draft_vocab_path.is_file():
        draft_to_target = torch.tensor(json.loads(draft_vocab_path.read_text())["draft_to_target"])
        config.draft_vocab = len(draft_to_target)
    weights = load_file(str(weights_path))
    missing = {"embedding_layernorm.weight", "fusion_fc.weight", "pre_lm_head_layernorm.weight"} - weights.keys()
    if missing:
        raise ModelLoadError(f"{weights_path} lacks {', '.join(sorted(missing))}")
    if not torch.equal(weights["embedding_layernorm.weight"], torch.ones_like(weights["embedding_layernorm.weight"])):
        raise IncompatibleDrafterError(f"{folder} has a trained embedding norm, which draftsmith's head lacks")
    if target_model is not None:
        rows = target_model.get_output_embeddings().weight.shape[0]
        if (config.hidden_size, config.vocab_size) != (target_model.config.hidden_size, rows):
            raise IncompatibleDrafterError(
                f"the head in {folder} has hidden size {config.hidden_size} and {config.vocab_size} output rows; "
                f"this target has {target_model.config.hidden_size} and {rows}")
        # our head decodes through the target's own final norm: the stored one must be that norm
        stored, own = weights["pre_lm_head_layernorm.weight"].float(), final_norm_scale(target_model).float()
        if not torch.allclose(stored, own, rtol=1e-2, atol=1e-3):
            raise IncompatibleDrafterError(f"the pre-lm-head norm in {folder} is not this target's final norm")

    hidden = config.hidden_size
    fused = weights["fusion_fc.weight"]
    state = {
        "fc.weight": torch.cat([fused[:, hidden:], fused[:, :hidden]], dim=1),
        "fc.bias": weights.get("fusion_fc.bias", torch.zeros(hidden, dtype=fused.dtype)),
        "draft_to_target": draft_to_target if draft_to_target is not None else torch.arange(config.vocab_size),
    }
    state.update({f"layer.{name[len('transformer.'):]}": t for name, t in weights.items()
                  if name.startswith("transformer.")})
    head = EagleHead(config)
    head.load_state_dict(state)
    if target_model is not None:
        head.to(device=target_model.device, dtype=target_model.dtype)
    return head.eval()


def _head_config(spec: dict) -> HeadConfig:
    layer = spec.get("transformer_layer_config")
    if not isinstance(layer, dict) or layer.get("model_type", "llama") != "llama":
        raise IncompatibleDrafterError("draftsmith's EAGLE head has a Llama decoder layer; this speculators "
                                       f"config's transformer_layer_config is {layer and layer.get('model_type')}")
    heads = layer["num_attention_heads"]
    rope = layer.get("rope_parameters") or {}
    ours = spec.get("draftsmith", {})
    return HeadConfig(
        kind="eagle", hidden_size=layer["hidden_size"], vocab_size=layer["vocab_size"], num_attention_heads=heads,
        num_key_value_heads=layer.get("num_key_value_heads") or heads,
        head_dim=layer.get("head_dim") or layer["hidden_size"] // heads,
        intermediate_size=layer["intermediate_size"], rms_norm_eps=layer.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", layer.get("rope_theta", 10000.0))),
        max_position_embeddings=layer.get("max_position_embeddings", 8192),
        target=ours.get("target") or spec.get("speculators_config", {}).get("verifier", {}).get("name_or_path", ""),
        training=ours.get("training", {}),
    )
