"""SpaDec's acceptance predictor: the DP path choice, pruning that stays exact, recording, training."""

from __future__ import annotations

import math

import pytest
import torch

from draftsmith.draft import ROOT, Draft
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel
from draftsmith.predictor import (AcceptancePredictor, NodeRecorder, PathPruner, PredictorConfig, best_path,
                                  build_pruner, load_pruner, reach_probabilities, save_predictor)
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


def random_pruner(target, layer: int, seed: int = 0, always: bool = True, confidence: bool = False) -> PathPruner:
    torch.manual_seed(seed)
    predictor = AcceptancePredictor(PredictorConfig(hidden_size=target.config.hidden_size, layer=layer,
                                                    confidence=confidence, hidden_logit=0.5 if confidence else None))
    if confidence:
        torch.nn.init.constant_(predictor.confidence_weight, 1.0)
    return PathPruner(predictor.eval(), always=always)


def test_reach_multiplies_acceptance_down_the_tree():
    reach = reach_probabilities(TREE, SCORES)
    assert reach[:2] == SCORES[:2]
    assert reach[5] == pytest.approx(0.76 * 0.95 * 0.90) and reach[6] == pytest.approx(0.90 * 0.74 * 0.99)


class FixedPredictor(torch.nn.Module):
    """Scores the nodes of TREE as SCORES (acceptance given the parent's) whatever the hidden states."""

    config = PredictorConfig(hidden_size=1, layer=1)

    def forward(self, hidden, confidence=None):
        return torch.logit(torch.tensor(SCORES))


def test_the_path_is_cut_only_where_it_is_expected_to_pay():
    from draftsmith.adaptive import CostCurve

    pruner = PathPruner(FixedPredictor())
    pruner.share = 0.1
    path = pruner.select(TREE, torch.zeros(len(TREE), 1))  # no costs: SpaDec's rule, always the path
    assert path == best_path(TREE, reach_probabilities(TREE, SCORES))
    reach = reach_probabilities(TREE, SCORES)
    # flat costs: the whole tree (expected 1 + sum(reach) tokens) costs what the path does, so it is kept
    pruner.costs = CostCurve([1, 8, 16], [1.0, 1.0, 1.0])
    assert pruner.select(TREE, torch.zeros(len(TREE), 1)) is None and pruner.kept_whole == 1
    # steep costs: verifying 8 tokens costs 16 one-token steps, 4 cost 2; the path's tokens per second win
    pruner.costs = CostCurve([1, 4, 8, 16], [1.0, 2.0, 16.0, 32.0])
    assert (1 + sum(reach[n] for n in path)) / (0.1 * 16 + 0.9 * 2) > (1 + sum(reach)) / 16
    assert pruner.select(TREE, torch.zeros(len(TREE), 1)) == path
    pruner.always = True  # SpaDec's rule: cut even where it does not pay
    pruner.costs = CostCurve([1, 8, 16], [1.0, 1.0, 1.0])
    assert pruner.select(TREE, torch.zeros(len(TREE), 1)) == path


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4, num_layers=4)


def test_a_tree_that_cannot_pay_skips_the_split_forward():
    """Before the first layers run, the drafter's confidence (and the hidden part's training mean) judges whether
    cutting could pay; where it could not, the tree is verified whole without splitting the forward."""
    from draftsmith.adaptive import CostCurve

    predictor = AcceptancePredictor(PredictorConfig(hidden_size=4, layer=1, confidence=True, hidden_logit=0.0))
    torch.nn.init.constant_(predictor.confidence_weight, 1.0)  # acceptance = exp(log-probability) / (1 + ...)
    pruner = PathPruner(predictor)
    pruner.share = 0.1
    draft = Draft(tokens=TREE.tokens, parents=TREE.parents, confidence=[math.log(p) for p in SCORES])
    assert pruner.worth_scoring(draft)  # no costs yet: nothing to judge by
    pruner.costs = CostCurve([1, 8, 16], [1.0, 1.0, 1.0])  # flat: a path never saves anything
    assert not pruner.worth_scoring(draft) and pruner.statistics()["unsplit_trees"] == 1.0
    pruner.costs = CostCurve([1, 4, 8, 16], [1.0, 2.0, 16.0, 32.0])  # steep: worth running the first layers
    assert pruner.worth_scoring(draft)
    assert PathPruner(predictor, always=True).worth_scoring(draft)  # SpaDec's rule scores every tree
    assert NodeRecorder(layer=1).worth_scoring(draft)


@pytest.mark.parametrize("layer", [1, 3])
def test_pruned_trees_decode_exactly(target, layer):
    engine = SpecEngine(target, eagle(target, depth=4, top_k=3), pruner=random_pruner(target, layer))
    for prompt in PROMPTS:
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=32, k=24))
        assert result.tokens == hf_greedy(target, prompt, 32)
        assert result.stats.draft_nodes <= result.stats.target_steps * 4  # one path of at most 4 levels a step


@pytest.mark.parametrize("make", ["eagle", "medusa", "ctc"])
def test_pruning_where_it_pays_decodes_exactly_with_the_drafters_confidence(target, make):
    """Any tree drafter gives its log-probability per node, and pruning on it stays exact."""
    from test_ctc import ctc
    from test_heads import medusa

    drafter = {"eagle": lambda: eagle(target, depth=4, top_k=3), "medusa": lambda: medusa(target),
               "ctc": lambda: ctc(target)}[make]()
    seen: list[Draft] = []
    pruner = random_pruner(target, 2, always=False, confidence=True)
    select = pruner.select
    pruner.select = lambda draft, hidden: seen.append(draft) or select(draft, hidden)
    engine = SpecEngine(target, drafter, pruner=pruner)
    for prompt in PROMPTS:
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=32, k=24))
        assert result.tokens == hf_greedy(target, prompt, 32)
    assert pruner.costs is not None and pruner.share == 0.5  # the engine gave it the target's costs
    assert seen and 0.0 <= result.stats.drafter["pruned_trees"] <= 1.0  # the report's statistics, per request
    confidences = [c for draft in seen for c in draft.confidence]
    assert all(-30.0 <= c <= 0.0 for c in confidences) and min(confidences) < 0.0  # log-probabilities


def test_a_predictor_weighing_confidence_refuses_a_drafter_without_it(target):
    from scripted_drafters import TreeOracleDrafter

    drafter = TreeOracleDrafter([1, 2, 3], 1, vocab=target.config.vocab_size)
    with pytest.raises(ConfigError, match="--no-confidence"):
        SpecEngine(target, drafter, pruner=random_pruner(target, 2, confidence=True))


def test_training_with_confidence_refuses_a_drafter_without_it_before_decoding(target, tmp_path, monkeypatch):
    """`train predictor` weighs the drafter's confidence by default: a drafter that gives none is refused before
    minutes of decoding, not after, and with --no-confidence it is taken."""
    import draftsmith.train.predictor as training

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the refusal")

    monkeypatch.setattr(training, "collect_nodes", no_decoding)
    drafter = TreeOracleDrafter(hf_greedy(target, PROMPTS[0], 8), len(PROMPTS[0]), vocab=target.config.vocab_size)
    engine = SpecEngine(target, drafter)
    with pytest.raises(ConfigError, match="gives no confidence per node: use --no-confidence"):
        training.train_predictor(engine, None, training.PredictorTrainConfig(), TrainConfig(out_dir=tmp_path))
    monkeypatch.setattr(training, "collection_prompts", lambda *args: ([], []))
    with pytest.raises(AssertionError, match="decoded before the refusal"):  # taken: it goes on to decode
        training.train_predictor(engine, None, training.PredictorTrainConfig(confidence=False),
                                 TrainConfig(out_dir=tmp_path))


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
    assert bool(torch.cat(recorder.reached).all())  # the oracle's wrong siblings all hang off accepted nodes


def test_training_keeps_only_nodes_put_to_the_test(target):
    """A node under a rejected node was never tested by the target: its label says nothing of it."""
    from draftsmith.train.predictor import collect_nodes

    engine = SpecEngine(target, eagle(target, depth=4, top_k=3))
    data = collect_nodes(engine, PROMPTS, layer=2, new_tokens=24, progress=False)
    recorder = NodeRecorder(layer=2)
    engine.runner.pruner = recorder
    for prompt in PROMPTS:
        engine.generate(prompt, GenerationConfig(max_new_tokens=24, k=64))
    reached, labels = torch.cat(recorder.reached), torch.cat(recorder.labels)
    assert bool(reached[labels == 1].all()) and int(reached.sum()) < len(labels)  # some trees had untested nodes
    assert len(data) == int(reached.sum()) and torch.equal(data.labels, labels[reached])
    assert torch.equal(data.confidences, torch.cat(recorder.confidences)[reached])
    assert bool((data.confidences <= 0).all()) and bool((data.confidences < 0).any())  # eagle's log-probabilities


def test_pruning_an_oracle_tree_keeps_the_true_path_when_the_predictor_says_so(target):
    """A predictor that scores true nodes high (here: an oracle reading the token) makes the pruned path the
    accepted one: all of it is accepted, with one path of the tree verified per step."""
    prompt, new = PROMPTS[1], 30
    reference = hf_greedy(target, prompt, new)
    drafter = TreeOracleDrafter(reference, len(prompt), vocab=target.config.vocab_size)

    class TruthPruner(PathPruner):
        def __init__(self):
            self.layer, self.threshold, self.always = 2, None, True

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
