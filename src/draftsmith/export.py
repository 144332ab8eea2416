"""Export an EAGLE-3 head in the checkpoint layout that vLLM, SGLang and llama.cpp load, and read it back;
export the target's config and tokenizer as the folder llama.cpp's converter reads with `--target-model-dir`.

The layout (EAGLE-3's own, as SpecForge writes it; class `LlamaForCausalLMEagle3`) is a `config.json`, a
LlamaConfig of one layer plus EAGLE-3's keys (`draft_vocab_size`, `target_hidden_size`,
`eagle_aux_hidden_state_layer_ids`, `norm_before_residual: false`), and a `model.safetensors` holding

    fc.weight                          Linear(3 x target hidden -> H), no bias, over the 3 layers concatenated
    midlayer.input_layernorm.weight    RMSNorm of the token embedding
    midlayer.hidden_norm.weight        RMSNorm of the fused feature
    midlayer.self_attn.{q,k,v}_proj.weight   reading [normed embedding ; normed feature] (2H)
    midlayer.self_attn.o_proj.weight, midlayer.post_attention_layernorm.weight, midlayer.mlp.{gate,up,down}_proj.weight
    norm.weight, lm_head.weight        the head's own final norm and output rows (draft vocabulary)
    d2t                                int64 [draft vocab]: target id - draft id (an offset, not the id)
    t2d                                bool [target vocab]: which target ids the draft vocabulary holds

The token embedding is the target's and is not stored (vLLM and llama.cpp then take the target's; SGLang's
EAGLE-3 worker shares it). `tie_word_embeddings` is written false: SGLang would otherwise use the embedding as
the output head. How each name was checked against the engines' loaders: docs/usage/export.md.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from draftsmith.errors import ConfigError, IncompatibleDrafterError, ModelLoadError
from draftsmith.heads import Eagle3Head, HeadConfig, load_head

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
ARCHITECTURE = "LlamaForCausalLMEagle3"  # vLLM and llama.cpp also register Eagle3LlamaForCausalLM; SGLang this one
EXPORTABLE = ("eagle3",)
# our names -> the layout's (the decoder layer is `midlayer` there)
RENAMES = (("layer.", "midlayer."), ("hidden_norm.", "midlayer.hidden_norm."))
# the hub ids of our embedded aliases (we run them from GGUF files), for the engines to load as the target
VERIFIER_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3": "google/gemma-3-270m"}


def _exported_name(name: str) -> str:
    for ours, theirs in RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def export_eagle3(head_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write the EAGLE-3 head in `head_dir` to `out_dir` (config.json + model.safetensors); weights in `dtype`
    (default: bfloat16, what the engines serve in)."""
    head = load_head(head_dir)
    config = head.config
    if config.kind not in EXPORTABLE:
        raise ConfigError(f"{head_dir} holds a {config.kind} head; only {', '.join(EXPORTABLE)} heads export "
                          "(`draftsmith train heads --kind eagle3`): the engines load EAGLE-3's layout alone")
    dtype = dtype or torch.bfloat16
    weights = {_exported_name(name): tensor.detach().to(dtype).contiguous()
               for name, tensor in head.state_dict().items() if name != "draft_to_target"}
    draft_ids = head.draft_to_target.long()
    weights["d2t"] = draft_ids - torch.arange(len(draft_ids))
    weights["t2d"] = torch.zeros(config.vocab_size, dtype=torch.bool).index_fill_(0, draft_ids, True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(_config(config, dtype), indent=2) + "\n")
    return out


def _config(config: HeadConfig, dtype: torch.dtype) -> dict:
    layer_ids = list(config.feature_layers)
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "draft_vocab_size": config.draft_vocab or config.vocab_size, "target_hidden_size": config.hidden_size,
        "eagle_aux_hidden_state_layer_ids": layer_ids, "norm_before_residual": False,
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": layer_ids},
        "torch_dtype": str(dtype).removeprefix("torch."),
        # ours, ignored by the engines: what `load_eagle3` needs back, and how the head was made
        "draftsmith": {"target": config.target, "target_layers": config.target_layers, "training": config.training},
    }


def load_eagle3(out_dir: str | Path, target: PreTrainedModel | None = None) -> Eagle3Head:
    """Read an exported EAGLE-3 folder back as an Eagle3Head (float32); with `target`, refuse one made for
    another target."""
    folder = Path(out_dir)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{folder} is not an EAGLE-3 folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    spec = json.loads((folder / CONFIG_FILE).read_text())
    if "draft_vocab_size" not in spec or spec.get("num_hidden_layers") != 1:
        raise ModelLoadError(f"{folder}/{CONFIG_FILE} is not an EAGLE-3 config (draft_vocab_size, one layer)")
    ours = spec.get("draftsmith", {})
    config = HeadConfig(
        kind="eagle3", hidden_size=spec["hidden_size"], vocab_size=spec["vocab_size"],
        num_attention_heads=spec["num_attention_heads"], num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"],
        intermediate_size=spec["intermediate_size"], rms_norm_eps=spec["rms_norm_eps"],
        rope_theta=spec.get("rope_theta", 10000.0), max_position_embeddings=spec["max_position_embeddings"],
        draft_vocab=0 if spec["draft_vocab_size"] == spec["vocab_size"] else spec["draft_vocab_size"],
        feature_layers=list(spec["eagle_aux_hidden_state_layer_ids"]), target_layers=ours.get("target_layers", 0),
        target=ours.get("target", ""), training=ours.get("training", {}),
    )
    if target is not None:
        rows, hidden = target.get_output_embeddings().weight.shape[0], target.config.hidden_size
        if (config.hidden_size, config.vocab_size) != (hidden, rows):
            raise IncompatibleDrafterError(f"{folder} was exported for a target with hidden size {config.hidden_size} "
                                           f"and {config.vocab_size} output rows; this target has {hidden} and {rows}")
    weights = load_file(str(folder / WEIGHTS_FILE))
    d2t, _ = weights.pop("d2t"), weights.pop("t2d")
    renamed = {}
    for name, tensor in weights.items():
        for ours_prefix, theirs in reversed(RENAMES):
            if name.startswith(theirs):
                name = ours_prefix + name[len(theirs) :]
                break
        renamed[name] = tensor.float()
    renamed["draft_to_target"] = d2t + torch.arange(len(d2t))
    head = Eagle3Head(config)
    head.load_state_dict(renamed)
    return head.eval()


def export_target_folder(target: str, out_dir: str | Path) -> Path:
    """The target's config.json and tokenizer files in `out_dir`: what llama.cpp's converter reads from
    `--target-model-dir` for an EAGLE-3 head (layer count, hidden size, vocabulary, the tokenizer)."""
    from draftsmith.models import load_model

    loaded = load_model(target)
    if loaded.tokenizer is None:
        raise ConfigError(f"'{target}' has no tokenizer to export")
    return write_target_folder(loaded.model, loaded.tokenizer, out_dir)


def write_target_folder(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = config.architectures or [type(model).__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
