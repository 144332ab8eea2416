"""EAGLE-3 heads: the target's three layers reach the head on both backends, drafting stays exactly the target's
greedy output (trees, reduced vocabulary, the lookup chain), the lean head computes what the trained module
computes, and a head made for another target is refused with both sides named."""

from __future__ import annotations

import pytest
import torch

from draftsmith.adaptive import CostCurve
from draftsmith.backends.hf import HFCachedLM
from draftsmith.backends.lean import LeanLlama
from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.eagle import TreeConfig
from draftsmith.drafters.eagle3 import Eagle3Drafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import IncompatibleDrafterError
from draftsmith.heads import Eagle3Head, HeadConfig, load_head, save_head
from test_cuda_graphs import replayed
from tiny_models import hf_greedy, tiny_llama

FLAT = CostCurve([1, 64], [1.0, 1.0])
PROMPTS = [[5, 17, 33, 8, 21, 40, 9], [60, 2, 2, 71, 14], [3]]
NEW = 40
LAYERS = [0, 2, 3]  # of a 4-layer target: the embeddings' stream, and two layers' inputs


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4, num_layers=4)


def eagle3_head(target, seed: int = 0, draft_vocab: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    config = HeadConfig.for_target("eagle3", target, draft_vocab=draft_vocab, feature_layers=LAYERS,
                                   target_layers=target.config.num_hidden_layers)
    head = Eagle3Head(config)
    if draft_vocab:
        head.draft_to_target.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
    head.init_from_target(target)
    return head.eval()


def eagle3(target, seed: int = 0, draft_vocab: int = 0, **tree) -> Eagle3Drafter:
    drafter = Eagle3Drafter(eagle3_head(target, seed, draft_vocab), target, TreeConfig(**tree))
    drafter.costs = FLAT
    return drafter


@pytest.mark.parametrize("lean", [True, False])
def test_both_backends_return_the_inputs_of_the_heads_layers(target, lean):
    """The features are transformers' hidden_states[i] (the residual stream entering layer i), concatenated."""
    lm = LeanLlama(target) if lean else HFCachedLM(target)
    lm.reset(64)
    lm.feature_layers = tuple(LAYERS)
    ids = PROMPTS[0]
    _, features = lm.forward(ids, features=True)
    with torch.no_grad():
        states = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in LAYERS], dim=-1)
    torch.testing.assert_close(features, want, atol=1e-5, rtol=1e-5)
    _, step = lm.forward([7], features=True)  # a step after the cache: its own row
    assert step.shape == (1, 3 * target.config.hidden_size)


def test_replayed_steps_return_the_heads_layers_also_after_a_capture_without_them(target):
    """A captured step (its body replayed eagerly on CPU) returns the three layers' inputs, as the eager forward
    does; a bucket captured before a drafter asked for them is not reused for them."""
    eager, captured = LeanLlama(target), replayed(LeanLlama(target))
    for lm in (eager, captured):
        lm.reset(64)
        lm.forward(PROMPTS[0], last_only=True)
        lm.forward([7], features=True)  # bucket 1, last layer's features
        lm.feature_layers = tuple(LAYERS)
    steps = [eager.forward([9], features=True), captured.forward([9], features=True)]
    assert steps[1].hidden.shape == (1, 3 * target.config.hidden_size)
    # the masked whole-cache attention sums in another order: last bits aside
    torch.testing.assert_close(steps[1].hidden, steps[0].hidden, atol=1e-4, rtol=1e-5)
    assert captured.graphs.captures == 3  # the prefill's bucket, bucket 1 without and with the layers


def test_eagle3_drafting_on_replayed_steps_is_exact(target):
    engine = SpecEngine(target, eagle3(target, depth=4, top_k=3))
    replayed(engine.runner.lm)
    for prompt in PROMPTS:
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=24))
        assert result.tokens == hf_greedy(target, prompt, NEW), prompt
    assert engine.runner.lm.graphs.captures > 0


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("make", [
    lambda t: eagle3(t, depth=4, top_k=3),
    lambda t: eagle3(t, depth=5, top_k=1),
    lambda t: eagle3(t, draft_vocab=40, depth=3, top_k=4),
])
def test_eagle3_drafting_is_exact(target, lean, make):
    engine = SpecEngine(target, make(target), backend=BackendConfig(lean=lean))
    for prompt in PROMPTS:
        for k in (1, 24):
            result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=k))
            assert result.tokens == hf_greedy(target, prompt, NEW), (prompt, k)


def test_eagle3_with_the_lookup_chain_is_exact(target):
    from draftsmith.drafters.merged import TreeWithLookup
    from draftsmith.drafters.ngram import NgramDrafter

    engine = SpecEngine(target, TreeWithLookup(eagle3(target, depth=3, top_k=2), NgramDrafter(), max_chain=8))
    for prompt in ([7, 8, 9, 10, 11, 12] * 4 + [7, 8], PROMPTS[0]):
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=24))
        assert result.tokens == hf_greedy(target, prompt, NEW)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_eagle3_head_computes_what_the_trained_module_computes(dtype):
    """Verification repairs any draft, so the decode-time layer (the pair through the lean cache, the target's
    features fused, then a node reading its parent's output) is checked against the training module."""
    from transformers import DynamicCache

    target = tiny_llama(seed=4, num_layers=4).to(dtype)  # its own copy: casting the shared one would round it
    head = eagle3_head(target, draft_vocab=30).to(dtype)
    drafter = Eagle3Drafter(head, target)
    torch.manual_seed(1)
    n, hidden = 6, target.config.hidden_size
    features, tokens = torch.randn(n, 3 * hidden, dtype=dtype), torch.randint(0, target.config.vocab_size, (n,))
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    tolerance["check_dtype"] = False  # a bf16 head whose products take float32 keeps float32 rows
    lean = drafter._run(features, tokens, torch.arange(1, n + 1), torch.ones(n, n, dtype=torch.bool).tril())
    cache = DynamicCache()
    with torch.no_grad():
        module = head(features[None], drafter.parts.embed_tokens(tokens)[None], torch.arange(1, n + 1)[None], None,
                      cache)[0]
    torch.testing.assert_close(lean, module, **tolerance)
    allowed = torch.zeros(2, n + 2, dtype=torch.bool)
    allowed[:, :n] = True
    allowed[torch.arange(2), n + torch.arange(2)] = True
    node_tokens = torch.randint(0, target.config.vocab_size, (2,))
    lean_nodes = drafter._run(lean[-2:], node_tokens, torch.full((2,), n + 1), allowed)
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    with torch.no_grad():
        module_nodes = head(lean[-2:][None].to(dtype), drafter.parts.embed_tokens(node_tokens)[None],
                            torch.full((1, 2), n + 1), additive[None, None], cache)[0]
        want_logits = head.logits(module_nodes)
    torch.testing.assert_close(lean_nodes, module_nodes, **tolerance)
    torch.testing.assert_close(drafter._logits(lean_nodes).float(), want_logits.float(), **tolerance)


@pytest.mark.parametrize("other, named", [
    (dict(hidden_size=64), "hidden size 64"),
    (dict(num_layers=6), "6 layers"),
    (dict(vocab_size=90), "90 output rows"),
])
def test_a_head_for_another_target_is_refused_with_both_sides_named(tmp_path, target, other, named):
    save_head(eagle3_head(target, draft_vocab=30), tmp_path / "head")
    again = load_head(tmp_path / "head", target)
    assert again.config.feature_layers == LAYERS
    with pytest.raises(IncompatibleDrafterError) as error:
        load_head(tmp_path / "head", tiny_llama(seed=1, **{"num_layers": 4, **other}))
    message = str(error.value)
    assert named in message
    assert "hidden size 32, 4 layers" in message and str(target.config.vocab_size) in message


@pytest.fixture(scope="module")
def eagle3_shards(tmp_path_factory, target):
    from draftsmith.train.features import FeatureDataConfig, build_feature_shards
    from test_train_heads import DATA, toy_corpus
    from tiny_models import char_tokenizer

    corpus = toy_corpus(tmp_path_factory.mktemp("corpus"))
    folder = tmp_path_factory.mktemp("features")
    config = FeatureDataConfig(**{**DATA.__dict__, "corpus": str(corpus), "feature_layers": LAYERS})
    build_feature_shards(target, char_tokenizer(), config, folder, progress=False)
    return folder


def test_shards_hold_the_three_layers_and_an_eagle_folder_is_refused(eagle3_shards, target, tmp_path):
    from draftsmith.errors import ConfigError
    from draftsmith.train.features import FeatureShards
    from draftsmith.train.heads import HeadTrainConfig, train_head
    from test_train_heads import train

    data = FeatureShards(eagle3_shards)
    ids = data.ids[:2]
    with torch.no_grad():
        states = target(ids, output_hidden_states=True).hidden_states
    want = torch.cat([states[i] for i in LAYERS], dim=-1)
    torch.testing.assert_close(data.aux[:2].float(), want, atol=0.05, rtol=0.02)  # stored in bf16
    with pytest.raises(ConfigError, match="EAGLE-3 layer features"):
        train_head(target, eagle3_shards, HeadTrainConfig(kind="eagle", draft_vocab=0), train(tmp_path))


def test_an_eagle3_head_learns_drafts_exactly_and_resumes_exactly(eagle3_shards, target, tmp_path):
    """Training-time test (unroll 2) lowers the loss; the saved folder drafts exactly through `eagle3:DIR` and
    `eagle3+ngram:DIR`; a run killed after a checkpoint resumes to identical weights."""
    import draftsmith.train.heads as heads_module
    from draftsmith.drafters.registry import build_drafter
    from draftsmith.models import LoadedModel
    from draftsmith.train.heads import HeadTrainConfig, train_head
    from draftsmith.train.trainer import list_checkpoints
    from test_train_heads import PowerCut, train
    from tiny_models import char_tokenizer

    real, losses = heads_module.eagle_loss, []
    config = dict(kind="eagle3", draft_vocab=0, unroll=2, feature_layers=LAYERS)

    def run(out_dir, crash_at_call=None, **settings):
        calls = 0

        def recording(model, batch, cfg, **options):
            nonlocal calls
            calls += 1
            if calls == crash_at_call:
                raise PowerCut
            value, metrics = real(model, batch, cfg, **options)
            losses.append(float(value.detach()))
            return value, metrics

        heads_module.eagle_loss = recording
        try:
            return train_head(target, eagle3_shards, HeadTrainConfig(**config), train(out_dir, **settings))[0]
        finally:
            heads_module.eagle_loss = real

    head = run(tmp_path / "learn", lr=1e-2, max_steps=60)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    assert head.config.feature_layers == LAYERS and head.config.target_layers == 4
    loaded = LoadedModel(target, char_tokenizer(), "tiny")
    prompts = [char_tokenizer()(text).input_ids for text in ("def f3(x0):\n    x1", "import os\n\n\ndef g", "    return")]
    for spec in ("eagle3", "eagle3+ngram"):
        drafter = build_drafter(f"{spec}:{tmp_path / 'learn'}", loaded)
        drafter.costs = FLAT  # trees sized by a fixed curve, not by this machine's timings: the same drafts anywhere
        engine, accepted = SpecEngine(target, drafter), 0
        for prompt in prompts:
            result = engine.generate(prompt, GenerationConfig(max_new_tokens=30, k=8))
            assert result.tokens == hf_greedy(target, prompt, 30)
            accepted += result.stats.accepted
        assert accepted > 0, spec  # a trained head's drafts get accepted, so accepted paths run too

    settings = dict(max_steps=8, checkpoint_every=3, batch_size=2, grad_accum=2)
    config["noise"] = 0.2  # the RNG state must be restored too
    reference = run(tmp_path / "straight", **settings).state_dict()
    with pytest.raises(PowerCut):
        run(tmp_path / "cut", crash_at_call=2 * 4 + 2, **settings)
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-0000003"]
    resumed = run(tmp_path / "cut", resume=True, **settings).state_dict()
    for name, weight in reference.items():
        assert torch.equal(weight, resumed[name]), name


def test_benchmark_form_prompts_are_the_corpus_functions_signature_and_docstring(tmp_path, target):
    """--prompts benchmark: each self-distilled sequence starts with the tail of a function prompt as the
    benchmarks pose it (imports, signature, docstring; chat form only for a tokenizer with a chat template)."""
    from draftsmith.data.corpus import load_corpus
    from draftsmith.data.onpolicy import function_prompts
    from draftsmith.train.features import FeatureDataConfig, FeatureShards, build_feature_shards
    from tiny_models import char_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(f'import os\n\n\ndef g{i}(a, b):\n    """Add {i} to a, then b."""\n'
                                         f"    return a + b + {i}\n")
    config = FeatureDataConfig(corpus=str(corpus), sequences=8, heldout_sequences=8, seq_len=24, prompt_tokens=16,
                               shard_size=8, self_distill=1.0, heldout_percent=25, prompts="benchmark")
    build_feature_shards(target, char_tokenizer(), config, tmp_path / "data", progress=False)
    wanted = function_prompts(load_corpus(str(corpus), split="train", heldout_percent=25))
    tokenizer = char_tokenizer()
    for row in FeatureShards(tmp_path / "data").ids:
        prompt = tokenizer.decode(row[:16])
        assert prompt.endswith('."""\n') and any(p.endswith(prompt) for p in wanted), prompt


def test_eagle3_without_a_folder_finds_the_head_shipped_for_smollm2_also_cast():
    from draftsmith.artifacts import shipped_head_folder
    from draftsmith.heads import CONFIG_FILE, WEIGHTS_FILE, HeadConfig

    folder = shipped_head_folder("smollm2@bfloat16", "eagle3")
    assert folder == shipped_head_folder("smollm2", "eagle3")
    assert (folder / WEIGHTS_FILE).stat().st_size < 40e6
    import json

    config = HeadConfig(**json.loads((folder / CONFIG_FILE).read_text()))
    assert (config.kind, config.feature_layers, config.target_layers) == ("eagle3", [2, 15, 27], 30)
