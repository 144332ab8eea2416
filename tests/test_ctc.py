"""The CTC drafter: the collapse, the candidate tree built from collapsed alignments (each node scored as its own
chain), the decode-time frames against the training computation, greedy exactness on both backends, and the
sampling distribution over its trees."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import draftsmith.drafters.eagle as eagle_module
from draftsmith.acceptance import SamplingConfig
from draftsmith.adaptive import CostCurve
from draftsmith.backends.formats import WeightFormat
from draftsmith.backends.protocol import BackendConfig
from draftsmith.draft import ROOT
from draftsmith.drafters.base import Feedback
from draftsmith.drafters.ctc import CtcDrafter, CtcSearch, candidate_tree, ctc_collapse, prefix_beam_search
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.heads import CtcHead, HeadConfig, TargetParts
from draftsmith.train.heads import ctc_frame_log_probs
from draftsmith.target_runner import TargetRunner
from test_heads import _two_token_distribution
from tiny_models import hf_greedy, tiny_llama

FLAT = CostCurve([1, 64], [1.0, 1.0])  # verification costs the same for any size: trees take the whole budget
PROMPTS = [[5, 17, 33, 8, 21, 40, 9], [60, 2, 2, 71, 14], [3]]
NEW = 40
B = 99  # a blank id in the collapse tests
BLANK_BIAS = 4.0  # the frames-equal test's blank bias: some frames best as blanks, some as tokens (checked)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4)


def ctc_head(target, seed: int = 0, draft_vocab: int = 0, feed: bool = False, frames_from: str = "chain") -> CtcHead:
    torch.manual_seed(seed)
    head = CtcHead(HeadConfig.for_target("ctc", target, draft_vocab=draft_vocab, ctc_feed=feed,
                                         ctc_frames_from=frames_from))
    if frames_from == "upstream":  # no frame parameters; the blank is a token of the draft vocabulary
        if draft_vocab:
            head.draft_to_target.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
            head.config.ctc_blank_token = int(head.draft_to_target[3])
        return head.eval()
    with torch.no_grad():  # a random blank row, so that blanks take part in the search
        head.blank_weight.normal_(std=0.5)
        head.frame_embeddings.normal_(std=1.0)
        if feed:
            head.blank_embedding.normal_(std=1.0)
    if draft_vocab:
        head.draft_to_target.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
    return head.eval()


def ctc(target, seed: int = 0, draft_vocab: int = 0, feed: bool = False, frames_from: str = "chain", **search
        ) -> CtcDrafter:
    drafter = CtcDrafter(ctc_head(target, seed, draft_vocab, feed, frames_from), target, CtcSearch(**search))
    drafter.costs = FLAT
    return drafter


def test_the_collapse_merges_repeats_then_drops_blanks():
    assert ctc_collapse([5, 5, B, 5, 7, 7], B) == (5, 5, 7)  # a blank separates a real repeat
    assert ctc_collapse([5, 5, 5, 5, 5, 5], B) == (5,)
    assert ctc_collapse([B, B, B, B], B) == ()  # all-blank frames: nothing
    assert ctc_collapse([B, 3, B, B, 3, 3], B) == (3, 3)
    assert ctc_collapse([1, 2, 3, 4, 5, 6], B) == (1, 2, 3, 4, 5, 6)
    assert ctc_collapse([2, B, 2, B, 2, B], B) == (2, 2, 2)


def test_prefix_beam_search_sums_every_alignment_of_a_candidate():
    """With every entry allowed and room for every candidate, each collapsed candidate's probability is the sum
    over all alignments that collapse to it (enumerated by brute force here)."""
    import itertools

    torch.manual_seed(0)
    log_probs = torch.randn(4, 4).log_softmax(-1)  # 4 frames, tokens 0..2, the blank 3
    expected: dict[tuple[int, ...], float] = {}
    for alignment in itertools.product(range(4), repeat=4):
        candidate = ctc_collapse(alignment, 3)
        p = float(sum(log_probs[f, e] for f, e in enumerate(alignment)).exp())
        expected[candidate] = expected.get(candidate, 0.0) + p
    expected.pop(())  # the empty candidate drafts nothing
    found = prefix_beam_search(log_probs, top_k=3, beams=1000)
    assert found.keys() == expected.keys()
    for candidate, p in expected.items():
        assert found[candidate] == pytest.approx(p, rel=1e-5), candidate


def test_prefix_beam_search_keeps_repeats_apart_only_across_a_blank():
    blank = 2
    frames = torch.tensor([[0.9, 0.0, 0.1], [0.9, 0.0, 0.1], [0.0, 0.0, 1.0]]).clamp(min=1e-9).log()
    found = prefix_beam_search(frames, top_k=1, beams=8)  # "0 0 _", "0 _ _" -> (0,); "_ 0 _" too
    assert _likely(found) == pytest.approx({(0,): 0.9 * 0.9 + 0.9 * 0.1 + 0.1 * 0.9})
    frames = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).clamp(min=1e-9).log()
    assert _likely(prefix_beam_search(frames, top_k=1, beams=8)) == pytest.approx({(0, 0): 1.0})  # "0 _ 0"
    # only the most probable candidates survive a narrow beam
    narrow = prefix_beam_search(torch.randn(5, 7).log_softmax(-1), top_k=3, beams=2)
    assert 1 <= len(narrow) <= 2


def _likely(candidates: dict) -> dict:
    return {c: p for c, p in candidates.items() if p > 1e-6}


def test_collapsed_candidates_merge_into_a_deduplicated_prefix_tree():
    import math

    tokens, parents, scores = candidate_tree({(4,): 0.3, (4, 4): 0.2, (4, 6): 0.25, (8,): 0.05})
    nodes = {_prefix(tokens, parents, i): math.exp(scores[i]) for i in range(len(tokens))}
    assert nodes == pytest.approx({(4,): 0.75, (4, 4): 0.2, (4, 6): 0.25, (8,): 0.05})
    assert all(p < i for i, p in enumerate(parents))  # parents first
    assert len(set(zip(tokens, parents))) == len(tokens)  # siblings distinct


def _prefix(tokens, parents, node):
    path = []
    while node != ROOT:
        path.insert(0, tokens[node])
        node = parents[node]
    return tuple(path)


def _after_prefill(drafter: CtcDrafter, runner: TargetRunner, prompt: list[int]) -> None:
    features = runner.prefill(prompt, features=True)
    drafter.reset(prompt, SamplingConfig(), None)
    drafter.feedback(Feedback(features, prompt[1:]))


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("feed", [False, True])
def test_every_node_of_a_collapsed_tree_is_scored_as_its_own_chain(target, lean, feed):
    """The check that catches upstream's misalignment: the verifier's logits for each node of a tree built
    from collapsed candidates equal those of the node's root-to-node chain fed alone."""
    drafter = ctc(target, draft_vocab=40, feed=feed, top_k=4, beams=24)
    runner = TargetRunner(target, backend=BackendConfig(lean=lean))
    prompt = PROMPTS[0]
    _after_prefill(drafter, runner, prompt)
    draft = drafter.propose(prompt, 24)
    draft.check(24)
    assert len(draft) >= 6 and max(draft.depths()) >= 3 and len(draft.children()[ROOT]) >= 2  # a real tree
    logits = runner.score(prompt[-1], draft, features=True)[0]
    for node in range(len(draft)):
        path = list(_prefix(draft.tokens, draft.parent_ids(), node))
        with torch.no_grad():
            chain = target(torch.tensor([prompt + path])).logits[0, -1]
        torch.testing.assert_close(logits[node + 1], chain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("draft_vocab,feed", [(0, False), (30, False), (0, True), (30, True)])
def test_decode_time_frames_compute_what_training_computes(target, draft_vocab, feed, monkeypatch):
    """The drafter's frames (lean layers over its cache, one call per step) against the training computation
    (all anchors' frames at once under the frame mask): same positions, same attention, same blank, and for a
    feeding head the same best entries fed forward. The head's weights stay float32: the fastest format,
    timed once per session, may be float16, whose rounding (~1e-3) is not what this test is about."""
    monkeypatch.setattr(eagle_module, "cached_fastest_format", lambda *args, **kwargs: WeightFormat("stored"))
    head = ctc_head(target, seed=2, draft_vocab=draft_vocab, feed=feed)
    with torch.no_grad():
        head.blank_bias.fill_(BLANK_BIAS)  # some frames best as blanks, some as tokens
    parts = TargetParts(target, head.draft_to_target, dtype=torch.float32)
    torch.manual_seed(3)
    n, hidden = 7, target.config.hidden_size
    features, tokens = torch.randn(n, hidden), torch.randint(0, target.config.vocab_size, (n,))
    with torch.no_grad():
        positions = torch.arange(1, n + 1)[None]
        cache = DynamicCache()
        predicted = head(features[None], parts.embed_tokens(tokens)[None], positions, None, cache)
        training = ctc_frame_log_probs(head, parts, predicted, positions, cache)[:, 0]  # [F, n, V + 1]
    assert training.shape[-1] == (draft_vocab or target.config.vocab_size) + 1
    best = training.argmax(-1)
    assert (best == training.shape[-1] - 1).any() and (best < training.shape[-1] - 1).any()  # both kinds get fed
    for anchor in (2, n - 1):
        drafter = CtcDrafter(head, target)
        drafter.reset([], SamplingConfig(), None)
        drafter.feedback(Feedback(features[: anchor + 1], tokens[: anchor + 1].tolist()))
        committed = torch.ones(1, drafter.length, dtype=torch.bool)  # frames from the newest committed pair
        frames = drafter.frame_log_probs(drafter.root_feature[None], committed, drafter.length)
        torch.testing.assert_close(frames[0], training[:, anchor], rtol=1e-4, atol=1e-4)
    # a branch: the anchor pair fed as a draft-tree node (as propose feeds its first-level tokens), beside a
    # sibling its frames must not see
    drafter.reset([], SamplingConfig(), None)
    drafter.feedback(Feedback(features[: n - 1], tokens[: n - 1].tolist()))
    sibling = torch.randint(0, target.config.vocab_size, (1,))
    sees = torch.cat([torch.ones(2, n - 1, dtype=torch.bool), torch.eye(2, dtype=torch.bool)], dim=1)
    branch = drafter._run(features[n - 1 :].expand(2, -1), torch.cat([tokens[n - 1 :], sibling]),
                          torch.full((2,), n), sees)
    frames = drafter.frame_log_probs(branch, sees, n)
    torch.testing.assert_close(frames[0], training[:, n - 1], rtol=1e-4, atol=1e-4)


def test_upstream_frames_and_labels_on_a_toy_sequence(target, monkeypatch):
    """Upstream frames (the CTC drafter's `logits_cycle`): anchor a's frames are the head's own teacher-forced
    pair outputs a..a+5, its labels the target's next tokens after features a+1..a+3, the blank the row of a
    vocabulary token, whose own slot can never be spelled; a window whose labels hold the blank token is dropped."""
    import torch.nn.functional as F

    import draftsmith.train.heads as train_heads
    from draftsmith.train.heads import HeadTrainConfig, HeadWithTarget, ctc_loss

    head = ctc_head(target, seed=1, frames_from="upstream")
    parts = TargetParts(target, head.draft_to_target, dtype=torch.float32)
    torch.manual_seed(5)
    length, hidden = 14, target.config.hidden_size
    features, ids = torch.randn(1, length, hidden), torch.randint(0, target.config.vocab_size, (1, length))
    with torch.no_grad():
        next_tokens = parts.logits(features[0, 1:]).argmax(-1).tolist()  # after feature a+1, for a = 0, 1, ..
    head.config.ctc_blank_token = next_tokens[6]  # the blank token is a label of windows 4..6: they go
    captured = {}

    real_ctc_loss = F.ctc_loss

    def spy(log_probs, labels, *args, **kwargs):
        captured.update(log_probs=log_probs, labels=labels)
        return real_ctc_loss(log_probs, labels, *args, **kwargs)

    monkeypatch.setattr(train_heads.F, "ctc_loss", spy)
    model = HeadWithTarget(head, parts, feature_scale=1.0).eval()
    with torch.no_grad():
        ctc_loss(model, {"input_ids": ids, "features": features}, HeadTrainConfig(kind="ctc", noise=0.0))
        positions = torch.arange(1, length)[None]
        pairs = head(features[:, :-1], parts.embed_tokens(ids[:, 1:]), positions)[0]  # pair a at a+1
        by_hand = head.frame_logits(parts.norm(pairs), parts).float().log_softmax(-1)  # [pairs, V + 1]
    blank_row = head.blank_row()
    assert (by_hand[:, blank_row] < -1e3).all()  # the blank token itself is never spelled as a token
    anchors = length - 1 - 5  # six frames: pairs a..a+5 must exist
    kept = [a for a in range(anchors) if blank_row not in next_tokens[a : a + 3]]
    assert kept == [a for a in range(anchors) if a not in (4, 5, 6)]
    log_probs, labels = captured["log_probs"], captured["labels"]
    assert log_probs.shape == (6, len(kept), target.config.vocab_size + 1)
    for window, anchor in enumerate(kept):
        assert labels[window].tolist() == next_tokens[anchor : anchor + 3]
        for frame in range(6):
            torch.testing.assert_close(log_probs[frame, window], by_hand[anchor + frame])


def test_upstream_frames_refuse_a_blank_outside_the_draft_vocabulary(target):
    head = ctc_head(target, draft_vocab=40, frames_from="upstream")
    head.config.ctc_blank_token = int(next(t for t in range(target.config.vocab_size) if t not in head.draft_to_target))
    with pytest.raises(ConfigError, match="blank token .* is not in the head's draft vocabulary"):
        head.blank_row()
    with pytest.raises(ConfigError, match="CTC frames come from one of chain, upstream"):
        CtcHead(HeadConfig.for_target("ctc", target, ctc_frames_from="side"))


def test_impossible_search_settings_are_refused():
    with pytest.raises(ConfigError, match="top_k >= 1 and beams >= 1"):
        CtcSearch(beams=0)
    with pytest.raises(ConfigError, match="1 or 2 levels as EAGLE steps"):
        CtcSearch(levels=3)


def test_second_level_nodes_and_their_frames_see_their_own_chain_only(target):
    """levels=2: each (x, y) node and its frames compute what they compute when x and y are fed alone after
    the committed pairs, one at a time: no sibling of x or of y is seen, positions follow the chain."""
    head = ctc_head(target, seed=2)
    torch.manual_seed(3)
    n, hidden = 6, target.config.hidden_size
    features, tokens = torch.randn(n, hidden), torch.randint(0, target.config.vocab_size, (n,))

    def committed() -> CtcDrafter:
        drafter = CtcDrafter(head, target, CtcSearch(levels=2, top_k=3))
        drafter.reset([], SamplingConfig(), None)
        drafter.feedback(Feedback(features, tokens.tolist()))
        return drafter

    drafter = committed()
    base, firsts = drafter.length, [5, 9, 11]
    sees = torch.cat([torch.ones(3, base, dtype=torch.bool), torch.eye(3, dtype=torch.bool)], dim=1)
    branch = drafter._run(drafter.root_feature[None].expand(3, -1), torch.tensor(firsts), torch.full((3,), base + 1), sees)
    weighted: dict = {}
    anchors, second_sees, prefixes, masses = drafter._second_level(branch, sees, [(x,) for x in firsts],
                                                                   [0.5, 0.3, 0.2], weighted)
    frames = drafter.frame_log_probs(anchors, second_sees, base + 2)
    assert len(prefixes) == 3 and all(weighted[(x,)] >= -1e-9 for x in firsts)
    assert sum(masses) + sum(weighted.values()) == pytest.approx(1.0)  # P(x) split between x and its children
    for row, (x, y) in enumerate(prefixes):
        alone = committed()
        out_x = alone._run(alone.root_feature[None], torch.tensor([x]), torch.tensor([base + 1]),
                           torch.ones(1, base + 1, dtype=torch.bool))
        out_y = alone._run(out_x, torch.tensor([y]), torch.tensor([base + 2]), torch.ones(1, base + 2, dtype=torch.bool))
        torch.testing.assert_close(anchors[row], out_y[0], rtol=1e-4, atol=1e-4)
        expected = alone.frame_log_probs(out_y, torch.ones(1, base + 2, dtype=torch.bool), base + 2)
        torch.testing.assert_close(frames[row], expected[0], rtol=1e-4, atol=1e-4)


class OracleCtc(CtcDrafter):
    """A test oracle computed with the target: the first level's best token is the target's own next greedy token,
    and the frames after it spell the three greedy tokens that follow as "b _ c _ d _"; everything else is random,
    so candidates get accepted and siblings disagree."""

    def __init__(self, target, **search):
        super().__init__(ctc_head(target), target, CtcSearch(**search))
        self.target, self.costs = target, FLAT

    def propose(self, context, k):
        with torch.no_grad():
            ids = torch.tensor([context])  # an explicit mask: generate would mask the pad id (0) out
            greedy = self.target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        self.want = greedy[0, len(context) :].tolist()
        self.generator = torch.Generator().manual_seed(len(context))
        return super().propose(context, k)

    def first_token_probs(self):
        logits = torch.randn(self.blank, generator=self.generator)
        logits[self.want[0]] += 10.0
        return logits.softmax(-1)

    def frame_log_probs(self, anchors, *args):
        logits = torch.randn(len(anchors), 6, self.blank + 1, generator=self.generator)
        spelled = [*self.want[1:2], self.blank, *self.want[2:3], self.blank, *self.want[3:4], self.blank]
        for frame, entry in enumerate(spelled):  # the best first token's branch: its frames spell the rest
            logits[0, frame, entry] += 10.0
        return logits.log_softmax(-1)


@pytest.mark.parametrize("lean", [True, False])
def test_ctc_drafting_is_exact_against_hf_greedy(target, lean):
    for make in (lambda: ctc(target, top_k=3, beams=12), lambda: ctc(target, draft_vocab=40),
                 lambda: ctc(target, levels=2, top_k=3), lambda: ctc(target, levels=2, draft_vocab=40),
                 lambda: ctc(target, feed=True, draft_vocab=40), lambda: ctc(target, feed=True, levels=2),
                 lambda: ctc(target, frames_from="upstream", top_k=3), lambda: ctc(target, frames_from="upstream",
                                                                                    draft_vocab=40, levels=2),
                 lambda: OracleCtc(target)):
        engine = SpecEngine(target, make(), backend=BackendConfig(lean=lean))
        for prompt in PROMPTS:
            for k in (1, 3, 24):
                result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=k))
                assert result.tokens == hf_greedy(target, prompt, NEW), (prompt, k)
                if isinstance(engine.drafter, OracleCtc) and k == 24:
                    assert result.stats.tau > 3  # the oracle's collapsed candidates are accepted
                    assert result.stats.drafter["ctc_blank_rate"] == pytest.approx(0.5)


def test_eos_and_max_new_tokens_inside_a_ctc_tree(target):
    reference = hf_greedy(target, PROMPTS[0], NEW)
    model = tiny_llama(seed=4, eos_token_id=reference[13])
    expected = hf_greedy(model, PROMPTS[0], NEW)
    assert len(expected) < NEW
    result = SpecEngine(model, OracleCtc(model)).generate(PROMPTS[0], GenerationConfig(max_new_tokens=NEW, k=16))
    assert result.tokens == expected and result.finish_reason == "eos"
    for new in (7, 8, 9):  # the budget ends inside an accepted path
        result = SpecEngine(target, OracleCtc(target)).generate(PROMPTS[0], GenerationConfig(max_new_tokens=new, k=16))
        assert result.tokens == reference[:new] and result.finish_reason == "length"


def test_sampling_over_ctc_trees_keeps_the_target_distribution(target):
    """Chi-square on the first two sampled tokens: collapsed nodes are point masses, distinct among siblings, so
    recursive rejection keeps the target's joint distribution."""
    from scipy.stats import chisquare

    prompt, samples = PROMPTS[1], 2000
    sampling = dict(temperature=1.0, top_k=6)
    engine = SpecEngine(target, OracleCtc(target))
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(samples):
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=2, k=8, sampling=SamplingConfig(seed=seed, **sampling)))
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
        accepted += out.stats.accepted
    assert accepted > samples // 10  # drafts get accepted: the test covers the accept path, not only residuals
    expected = _two_token_distribution(target, prompt, SamplingConfig(**sampling))
    assert set(counts) <= set(expected)
    keep = [p for p in sorted(expected, key=expected.get, reverse=True) if expected[p] * samples >= 5]
    observed = [counts.get(p, 0) for p in keep] + [samples - sum(counts.get(p, 0) for p in keep)]
    probs = [expected[p] for p in keep] + [1 - sum(expected[p] for p in keep)]
    assert chisquare(observed, [p * samples for p in probs]).pvalue > 1e-3
