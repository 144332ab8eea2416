"""Export of an EAGLE-3 head in the layout vLLM, SGLang and llama.cpp load: the names, shapes and config keys
their loaders read, d2t/t2d as they define them, a round trip that drafts the same trees, clear refusals (a
non-EAGLE-3 head, the retired EAGLE-1 format), and the target folder llama.cpp's converter reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from draftsmith.cli.main import app
from draftsmith.drafters.eagle3 import Eagle3Drafter
from draftsmith.export import export_eagle3, load_eagle3
from draftsmith.heads import save_head
from test_eagle3 import FLAT, LAYERS, eagle3_head
from tiny_models import tiny_llama

# every tensor the engines' EAGLE-3 loaders map (vLLM llama_eagle3.py, SGLang llama_eagle3.py, llama.cpp
# conversion/llama.py): the decoder layer under `midlayer.`, fc without bias, the head's own norm and lm_head
LAYOUT = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "midlayer.hidden_norm.weight",
          "midlayer.input_layernorm.weight", "midlayer.post_attention_layernorm.weight",
          *(f"midlayer.self_attn.{p}_proj.weight" for p in "qkvo"),
          *(f"midlayer.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4, num_layers=4)


@pytest.fixture
def exported(tmp_path, target):
    head = eagle3_head(target, draft_vocab=30)
    save_head(head, tmp_path / "head")
    return head, export_eagle3(tmp_path / "head", tmp_path / "out", torch.float32)


def test_the_folder_has_the_names_shapes_and_keys_the_engines_read(exported, target):
    head, out = exported
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == LAYOUT
    hidden, vocab = target.config.hidden_size, target.config.vocab_size
    assert weights["fc.weight"].shape == (hidden, 3 * hidden)
    assert weights["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * hidden
    assert weights["lm_head.weight"].shape == (30, hidden)
    # d2t: offsets (target id - draft id), int64; t2d: a bool mask over the target vocabulary
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
    assert torch.equal(weights["d2t"] + torch.arange(30), head.draft_to_target)
    assert weights["t2d"].shape == (vocab,) and int(weights["t2d"].sum()) == 30
    assert torch.equal(weights["t2d"].nonzero()[:, 0], head.draft_to_target)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["draft_vocab_size"] == 30 and config["vocab_size"] == vocab
    assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS and config["target_hidden_size"] == hidden
    assert config["norm_before_residual"] is False and config["tie_word_embeddings"] is False


def test_the_round_trip_drafts_the_same_trees(exported, target):
    head, out = exported
    again = load_eagle3(out, target)
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    drafters = [Eagle3Drafter(h, target) for h in (head, again)]
    torch.manual_seed(3)
    features, tokens = torch.randn(5, 3 * target.config.hidden_size), [4, 9, 17, 2, 8]
    from draftsmith.drafters.base import Feedback

    proposals = []
    for drafter in drafters:
        drafter.costs = FLAT
        drafter.feedback(Feedback(features, tokens))
        proposals.append(drafter.propose(tokens, 16))
    assert proposals[0].tokens == proposals[1].tokens and proposals[0].parents == proposals[1].parents


def test_refusals_name_what_exports_and_what_loads(tmp_path, target):
    from draftsmith.heads import EagleHead, HeadConfig

    save_head(EagleHead(HeadConfig.for_target("eagle", target)), tmp_path / "eagle")
    result = CliRunner().invoke(app, ["export", "--head", str(tmp_path / "eagle"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "only eagle3 heads export" in str(result.exception)
    retired = CliRunner().invoke(app, ["export", "--format", "speculators", "--out", str(tmp_path / "y")])
    assert retired.exit_code != 0 and "no serving engine loads" in str(retired.exception)
    missing = CliRunner().invoke(app, ["export", "--format", "eagle3", "--out", str(tmp_path / "z")])
    assert missing.exit_code != 0 and "--head" in str(missing.exception)


@pytest.mark.real
def test_the_target_folder_holds_the_config_and_tokenizer_the_converter_reads(tmp_path):
    result = CliRunner().invoke(app, ["export", "--format", "hf", "--target", "smollm2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["architectures"] == ["LlamaForCausalLM"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("def f(x):").input_ids  # the tokenizer loads back
