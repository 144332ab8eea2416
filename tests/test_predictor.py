"""SpaDec's acceptance predictor: the DP path choice, pruning that stays exact, recording, training."""

from __future__ import annotations

import pytest
import torch

from draftsmith.draft import ROOT, Draft
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel
from draftsmith.predictor import (AcceptancePredictor, NodeRecorder, PathPruner, PredictorConfig, best_path,
                                  build_pruner, load_pruner, save_predictor)
from draftsmith.train.predictor import NodeData, PredictorEval, predictor_loss
from draftsmith.train.trainer import TrainConfig, Trainer
from scripted_drafters import TreeOracleDrafter
from test_heads import PROMPTS, eagle
from tiny_models import hf_greedy, tiny_llama

#        root
#       /    \
#     0 .90   1 .76
#    /   \       \
#  2 .20  3 .74   4 .95
#          |       |
#         6 .99   5 .90
TREE = Draft(tokens=[10, 11, 12, 13, 14, 15, 16], parents=[ROOT, ROOT, 0, 0, 1, 4, 3])
SCORES = [0.90, 0.76, 0.20, 0.74, 0.95, 0.90, 0.99]


def test_dp_picks_the_path_of_highest_depth_weighted_score():
    # no threshold: 1 -> 4 -> 5 is worth .76 ln2 + .95 ln3 + .90 = 2.471, 0 -> 3 -> 6 .90 ln2 + .74 ln3 + .99 = 2.427
    assert best_path(TREE, SCORES, threshold=0.0) == [1, 4, 5]
    # the mean (.777) cuts node 1 with its subtree and node 3 with node 6: only node 0 is left
    assert best_path(TREE, SCORES) == [0]
    assert best_path(TREE, SCORES, threshold=0.5) == [1, 4, 5]


def test_when_nothing_survives_the_first_node_is_kept():
    assert best_path(TREE, SCORES, threshold=0.999) == [0]
    flipped = Draft(tokens=[1, 2, 3], parents=[ROOT, ROOT, 1])
    assert best_path(flipped, [0.1, 0.2, 0.9]) == [0]  # both first-level nodes fall below the mean .4


def random_pruner(target, layer: int, seed: int = 0) -> PathPruner:
    torch.manual_seed(seed)
    predictor = AcceptancePredictor(PredictorConfig(hidden_size=target.config.hidden_size, layer=layer))
    return PathPruner(predictor.eval())


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4, num_layers=4)


@pytest.mark.parametrize("layer", [1, 3])
def test_pruned_trees_decode_exactly(target, layer):
    engine = SpecEngine(target, eagle(target, depth=4, top_k=3), pruner=random_pruner(target, layer))
    for prompt in PROMPTS:
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=32, k=24))
        assert result.tokens == hf_greedy(target, prompt, 32)
        assert result.stats.draft_nodes <= result.stats.target_steps * 4  # one path of at most 4 levels a step


def test_recording_keeps_whole_trees_exact_and_labels_the_accepted_path(target):
    prompt, new = PROMPTS[0], 32
    reference = hf_greedy(target, prompt, new)
    recorder = NodeRecorder(layer=2)
    drafter = TreeOracleDrafter(reference, len(prompt), vocab=target.config.vocab_size)
    engine = SpecEngine(target, drafter, pruner=recorder)
    result = engine.generate(prompt, GenerationConfig(max_new_tokens=new, k=6))
    assert result.tokens == reference
    labels = torch.cat(recorder.labels)
    assert len(labels) == result.stats.draft_nodes  # every verified node, once
    assert labels.sum() == result.stats.accepted > 0
    assert torch.cat(recorder.features).shape == (len(labels), target.config.hidden_size)


def test_pruning_an_oracle_tree_keeps_the_true_path_when_the_predictor_says_so(target):
    """A predictor that scores true nodes high (here: an oracle reading the token) makes the pruned path the
    accepted one: all of it is accepted, with one path of the tree verified per step."""
    prompt, new = PROMPTS[1], 30
    reference = hf_greedy(target, prompt, new)
    drafter = TreeOracleDrafter(reference, len(prompt), vocab=target.config.vocab_size)

    class TruthPruner(PathPruner):
        def __init__(self):
            self.layer, self.threshold = 2, None

        def select(self, draft, hidden):
            done = len(engine.runner.tokens) + 1 - len(prompt)
            truth = reference[done:]
            scores = [1.0 if draft.tokens[n] == truth[depth - 1] else 0.0 for n, depth in enumerate(draft.depths())]
            return best_path(draft, scores)

    engine = SpecEngine(target, drafter, pruner=TruthPruner())
    result = engine.generate(prompt, GenerationConfig(max_new_tokens=new, k=6))
    assert result.tokens == reference
    assert result.stats.accepted == result.stats.draft_nodes > 0  # every verified node was the true one


def test_logistic_regression_separates_separable_nodes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(2000, generator=generator) < 0.3).float()
    direction = torch.randn(16, generator=generator)
    features = torch.randn(2000, 16, generator=generator) + 2.0 * labels[:, None] * direction
    data, heldout = NodeData(features[:1600], labels[:1600]), NodeData(features[1600:], labels[1600:])
    predictor = AcceptancePredictor(PredictorConfig(hidden_size=16, layer=1))
    train = TrainConfig(out_dir=tmp_path, max_steps=150, batch_size=64, lr=5e-2, warmup_steps=5, eval_every=0,
                        checkpoint_every=0, progress=False, device="cpu", weight_decay=0.0)
    result = Trainer(train).fit(predictor, data, predictor_loss, PredictorEval(heldout))
    assert result.eval["auc"] > 0.95 and result.eval["accuracy"] > 0.85


def test_predictor_folders_round_trip_and_are_checked(tmp_path, target):
    predictor = AcceptancePredictor(PredictorConfig(hidden_size=target.config.hidden_size, layer=2))
    save_predictor(predictor, tmp_path)
    loaded = LoadedModel(model=target, tokenizer=None, name="tiny")
    pruner = build_pruner(f"predictor:{tmp_path}", loaded)
    assert pruner.layer == 2 and torch.equal(pruner.predictor.linear.weight, predictor.linear.weight)
    assert build_pruner("none", loaded) is None
    with pytest.raises(ConfigError, match="no predictor"):
        build_pruner(f"predictor:{tmp_path / 'missing'}", loaded)
    with pytest.raises(ConfigError, match="no predictor ships for target 'tiny'"):
        build_pruner("predictor", loaded)
    with pytest.raises(ConfigError, match="use none, predictor"):
        build_pruner("oracle", loaded)
    with pytest.raises(ConfigError, match="reads layer 2"):
        load_pruner(tmp_path, tiny_llama(num_layers=2))


def test_pruned_trees_are_sized_by_what_pruned_verification_costs():
    from draftsmith.adaptive import CostCurve
    from draftsmith.predictor import pruned_costs

    steep = CostCurve([1, 2, 4, 8, 16, 32], [1.0, 1.5, 2.5, 4.5, 8.5, 16.5])
    cheap = pruned_costs(steep, share=0.2, longest_path=4)
    assert cheap(1) == pytest.approx(steep(1)) and cheap(5) == pytest.approx(steep(5))  # up to a path: no saving
    assert cheap(32) == pytest.approx(0.2 * 16.5 + 0.8 * steep(5))  # beyond it, only the first layers grow


def test_the_server_prunes_with_a_predictor_folder_and_refuses_a_missing_one(tmp_path, target):
    from draftsmith.serve.app import create_app
    from tiny_models import char_tokenizer

    loaded = LoadedModel(model=target, tokenizer=char_tokenizer(), name="tiny")
    save_predictor(AcceptancePredictor(PredictorConfig(hidden_size=target.config.hidden_size, layer=2)), tmp_path)
    app = create_app(loaded, "ngram", k=4, prune=f"predictor:{tmp_path}")
    assert app.state.server.engine.runner.pruner.layer == 2
    assert create_app(loaded, "ngram", k=4).state.server.engine.runner.pruner is None
    with pytest.raises(ConfigError, match="no predictor"):
        create_app(loaded, "ngram", k=4, prune=f"predictor:{tmp_path / 'missing'}")
