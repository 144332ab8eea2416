"""Export of an EAGLE head in the speculators layout: the folder has the keys the format requires, and
reading it back gives the same head (state dict) and the same drafts (tokens and parents)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from draftsmith.errors import IncompatibleDrafterError
from draftsmith.export import export_speculators, load_speculators
from draftsmith.heads import EagleHead, HeadConfig, save_head
from tiny_models import tiny_llama

DRAFT_VOCAB = 30


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4)


def random_head(target, seed: int = 0, draft_vocab: int = DRAFT_VOCAB) -> EagleHead:
    torch.manual_seed(seed)
    config = HeadConfig.for_target("eagle", target, draft_vocab=draft_vocab)
    config.target = "tiny"
    head = EagleHead(config).eval()
    with torch.no_grad():  # a non-zero bias and norms away from ones, so a dropped or swapped tensor shows
        head.fc.bias.normal_()
        for param in head.layer.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    if draft_vocab:
        head.draft_to_target.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
    return head


@pytest.fixture
def exported(tmp_path, target):
    head = random_head(target)
    save_head(head, tmp_path / "head")
    out = export_speculators(tmp_path / "head", tmp_path / "spec", "tiny", target=target, verifier="org/tiny-llama")
    return head, out


def test_the_written_folder_has_the_keys_the_format_requires(exported, target):
    head, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle"
    assert config["architectures"][0] == "EagleSpeculator"
    assert config["layernorms"] is True and config["fusion_bias"] is True
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 5  # vLLM reads the draft length here
    assert spec["verifier"] == {"name_or_path": "org/tiny-llama", "architectures": ["LlamaForCausalLM"]}
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1
    assert (layer["hidden_size"], layer["vocab_size"]) == (32, target.config.vocab_size)
    assert config["draft_vocab_size"] == DRAFT_VOCAB

    weights = load_file(str(out / "model.safetensors"))
    layer_names = {f"transformer.{name}" for name in head.layer.state_dict()}
    assert set(weights) == {"embedding_layernorm.weight", "fusion_fc.weight", "fusion_fc.bias",
                            "pre_lm_head_layernorm.weight"} | layer_names
    hidden = 32
    # speculators concatenates [embedding, hidden]; ours [feature, embedding]
    assert torch.equal(weights["fusion_fc.weight"][:, :hidden], head.fc.weight[:, hidden:])
    assert torch.equal(weights["fusion_fc.weight"][:, hidden:], head.fc.weight[:, :hidden])
    assert torch.allclose(weights["pre_lm_head_layernorm.weight"], target.model.norm.weight)
    assert json.loads((out / "draft_vocab.json").read_text())["draft_to_target"] == head.draft_to_target.tolist()


def test_round_trip_gives_the_same_head(exported, target):
    head, out = exported
    again = load_speculators(out, target)
    assert again.config.draft_vocab == DRAFT_VOCAB and again.config.target == "tiny"
    ours, theirs = head.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_full_vocabulary_heads_round_trip_without_a_mapping(tmp_path, target):
    head = random_head(target, seed=1, draft_vocab=0)
    save_head(head, tmp_path / "head")
    out = export_speculators(tmp_path / "head", tmp_path / "spec", "tiny", target=target)
    assert not (out / "draft_vocab.json").exists()
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == target.config.vocab_size
    again = load_speculators(out, target)
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_the_reloaded_head_drafts_the_same_trees(exported, target):
    eagle = pytest.importorskip("draftsmith.drafters.eagle")
    from draftsmith.acceptance import SamplingConfig
    from draftsmith.adaptive import CostCurve
    from draftsmith.drafters.base import Feedback

    head, out = exported
    prompt = [5, 17, 33, 8, 21, 40, 9]
    torch.manual_seed(7)
    steps = [(torch.randn(len(prompt) - 1, 32), prompt[1:]), (torch.randn(3, 32), [12, 60, 4])]
    drafts = []
    for h in (head, load_speculators(out, target)):
        drafter = eagle.EagleDrafter(h, target, eagle.TreeConfig(depth=4, top_k=3))
        drafter.costs = CostCurve([1, 64], [1.0, 1.0])
        drafter.reset(prompt, SamplingConfig(), None)
        proposed = []
        for features, next_tokens in steps:
            drafter.feedback(Feedback(features, next_tokens))
            draft = drafter.propose(prompt + next_tokens, 12)
            proposed.append((draft.tokens, draft.parents))
        drafts.append(proposed)
    assert drafts[0] == drafts[1]
    assert all(len(tokens) == 12 for tokens, _ in drafts[0])
    allowed = set(head.draft_to_target.tolist())
    assert all(set(tokens) <= allowed for tokens, _ in drafts[0])  # drafted inside the reduced vocabulary


def test_a_head_for_another_target_is_refused(exported):
    _, out = exported
    with pytest.raises(IncompatibleDrafterError, match="hidden size 32"):
        load_speculators(out, tiny_llama(seed=1, hidden_size=64))
    with pytest.raises(IncompatibleDrafterError, match="final norm"):  # same shapes, another final norm
        other = tiny_llama(seed=2)
        with torch.no_grad():
            other.model.norm.weight.mul_(2)
        load_speculators(out, other)


def test_the_cli_writes_the_folder(tmp_path, target, monkeypatch):
    from typer.testing import CliRunner

    import draftsmith.export as export
    from draftsmith.cli.main import app
    from draftsmith.models import LoadedModel

    save_head(random_head(target), tmp_path / "head")
    monkeypatch.setattr("draftsmith.models.load_model", lambda spec, **_: LoadedModel(target, None, spec))
    result = CliRunner().invoke(app, ["export", "--head", str(tmp_path / "head"), "--out", str(tmp_path / "spec"),
                                      "--target", "smollm2", "--format", "speculators"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == export.VERIFIER_IDS["smollm2"]
    bad = CliRunner().invoke(app, ["export", "--head", str(tmp_path / "head"), "--out", str(tmp_path / "x"),
                                   "--format", "onnx"])
    assert bad.exit_code != 0
