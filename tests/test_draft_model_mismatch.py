"""A draft model that differs from the target in size of vocabulary or of context must not crash a request,
and must not change what the target generates."""

import copy

import pytest
import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.drafters.registry import build_drafter
from draftsmith.drafters.model import ModelDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.models import load_model
from tiny_models import char_tokenizer, hf_greedy, tiny_llama

NEW = 40


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=1)


def with_extra_logits(target) -> torch.nn.Module:
    """The target with its vocabulary padded to twice the size, the extra output rows 1.5 times the real ones:
    wherever the best real logit is positive, the draft's own argmax is an id the target cannot embed."""
    draft = copy.deepcopy(target)
    vocab = target.config.vocab_size
    draft.resize_token_embeddings(2 * vocab)
    with torch.no_grad():
        draft.lm_head.weight[vocab:] = 1.5 * target.lm_head.weight
    return draft


def with_context(model, positions: int) -> torch.nn.Module:
    """A copy of the model that declares a context of `positions` tokens (the lean backend builds its RoPE
    tables for exactly that many, so it cannot run past it)."""
    short = copy.deepcopy(model)
    short.config.max_position_embeddings = positions
    return short


def test_extra_draft_logits_are_never_drafted(target, tok):
    draft = with_extra_logits(target)
    vocab = target.config.vocab_size
    ids = tok("def add(a, b):\n    return a + b\n").input_ids
    with torch.no_grad():  # the test has teeth: unrestricted, the draft would propose an id past the target's
        assert int(draft(torch.tensor([ids])).logits[0, -1].argmax()) >= vocab
    engine = SpecEngine(target, ModelDrafter(draft, vocab_size=vocab), tok)
    for k in (1, 5):
        result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=k))
        assert result.tokens == hf_greedy(target, ids, NEW)
        assert result.stats.acceptance_rate == 1.0  # restricted to the target's rows, it is the target

    sampling = SamplingConfig(temperature=1.0, seed=3)
    result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=4, sampling=sampling))
    assert len(result.tokens) == NEW and max(result.tokens) < vocab
    assert result.stats.accepted > 0


def test_build_drafter_restricts_a_draft_model_with_more_logits(target, tok, tmp_path):
    for name, model in (("target", target), ("draft", with_extra_logits(target))):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    loaded = load_model(str(tmp_path / "target"))
    drafter = build_drafter(f"model:{tmp_path / 'draft'}", loaded)
    assert drafter.vocab_size == target.config.vocab_size
    ids = tok("for i in range(3):").input_ids
    result = SpecEngine(loaded.model, drafter, tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=4))
    assert result.tokens == hf_greedy(target, ids, NEW)


class ContextRecorder(ModelDrafter):
    """Records the context length and the draft length of every proposal."""

    def __init__(self, model):
        super().__init__(model)
        self.proposals: list[tuple[int, int]] = []

    def propose(self, context, k):
        draft = super().propose(context, k)
        self.proposals.append((len(context), len(draft)))
        return draft


@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_draft_model_with_a_shorter_context_stops_drafting_past_it(target, tok, k):
    limit = 24
    drafter = ContextRecorder(with_context(target, limit))  # the target itself, but for its context
    ids = tok("for i in range(10):").input_ids  # 19 tokens: the draft's context ends a few tokens in
    result = SpecEngine(target, drafter, tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=k))
    assert result.tokens == hf_greedy(target, ids, NEW)
    # it drafted while it could, until a step short of its last position, and never past it
    reached = [length + n - 1 for length, n in drafter.proposals if n]  # one past the last position fed
    assert reached and max(reached) <= limit and max(reached) > limit - (k + 1)
    assert any(length > limit for length, _ in drafter.proposals)  # asked past its context, it gave nothing
