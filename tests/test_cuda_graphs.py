"""The captured-step path (cuda_graphs.py): fixed-shape buffers, cache writes by slot tensors, attention over the
whole cache under a mask, padding rows. On CPU its body runs eagerly at each replay (`run_eagerly`): everything
the CUDA graph would replay, checked against the plain forward and HF generate; the capture itself runs on CUDA."""

from __future__ import annotations

import pytest
import torch

from draftsmith.backends.factory import cached_lm
from draftsmith.backends.layers import CACHE_BLOCK
from draftsmith.backends.lean import LeanLlama
from draftsmith.backends.protocol import BackendConfig
from draftsmith.backends.cuda_graphs import BUCKETS, CapturedSteps, check_graphs, run_eagerly
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from scripted_drafters import OracleDrafter, TreeOracleDrafter
from test_heads import eagle
from tiny_models import hf_greedy, tiny_llama

NEW = 40


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=1)


def replayed(lm: LeanLlama) -> LeanLlama:
    lm.graphs = CapturedSteps(lm, capture=run_eagerly)
    return lm


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The masked whole-cache attention sums in another order: equal choices, last bits aside."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-4) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_replayed_steps_compute_what_the_forward_computes(target):
    plain, captured = LeanLlama(target), replayed(LeanLlama(target))
    ids = list(range(3, 40))
    prefills = []
    for lm in (plain, captured):
        lm.reset()
        prefills.append(lm.forward(ids, last_only=True, features=True))  # a short prefill fits a bucket (48) too
    assert captured.graphs.captures == 1
    assert prefills[1][0].shape == (1, target.config.vocab_size) and close(prefills[0][0], prefills[1][0])
    assert torch.allclose(prefills[0][1], prefills[1][1], rtol=1e-5, atol=1e-4)  # every row's features
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # root, two siblings
    steps = [([7], None, None), ([5, 6, 7], None, None), ([9, 4, 4], [40, 41, 41], tree), (list(range(20)), None, None)]
    for ids, positions, mask in steps:  # a step, a chain (bucket 4: one padding row), a tree, bucket 32
        a = plain.forward(ids, positions=positions, tree_mask=mask, features=True)
        b = captured.forward(ids, positions=positions, tree_mask=mask, features=True)
        assert close(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-4)
        assert captured.length == plain.length
    assert captured.graphs.captures == 4  # buckets 48 (the prefill), 1, 4 and 32, each captured once
    # the masked attention reads every slot (weight 0 past the step), so a padding row's slot must hold numbers
    assert torch.isfinite(captured.k_cache).all() and torch.isfinite(captured.v_cache).all()
    plain.truncate(41)
    captured.truncate(41)  # a rollback over slots the padding rows wrote: they must not be read
    assert close(plain.forward([11, 12]), captured.forward([11, 12]))


def test_what_a_step_returns_is_not_overwritten_by_the_next(target):
    lm = replayed(LeanLlama(target))
    lm.reset()
    lm.forward([3, 4, 5], last_only=True)
    first = lm.forward([6])
    kept = first.clone()
    lm.forward([7])  # the same bucket replays into the same buffers
    assert torch.equal(first, kept)


def test_steps_past_the_largest_bucket_run_eagerly(target):
    lm = replayed(LeanLlama(target))
    lm.reset()
    lm.forward([3, 4], last_only=True)  # bucket 2
    lm.forward(list(range(BUCKETS[-1] + 1)))
    assert lm.graphs.captures == 1 and lm.length == 2 + BUCKETS[-1] + 1


@pytest.mark.parametrize("wrong_at", [set(), {0}, {3}])
def test_engine_on_replayed_steps_matches_hf_greedy(target, wrong_at):
    """Chains fully accepted, fully rejected and cut inside, over a request longer than a cache block: it is
    reserved at the request's start, so no captured step is thrown away by a cache growing mid-request."""
    engine = SpecEngine(target)
    lm = replayed(engine.runner.lm)
    prompt = [(7 * i) % 90 + 3 for i in range(CACHE_BLOCK - 20)]
    reference = hf_greedy(target, prompt, NEW)
    engine.drafter = OracleDrafter(reference, len(prompt), wrong_at=wrong_at, vocab=target.config.vocab_size)
    result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=8))
    assert result.tokens == reference
    assert lm.k_cache.shape[2] >= len(prompt) + NEW > CACHE_BLOCK
    assert lm.graphs.cache is lm.k_cache and lm.graphs.captures == len(lm.graphs.steps)  # none captured twice


def test_only_captured_steps_reserve_the_whole_request_up_front(target):
    """Without graphs the cache grows on demand (a request that stops early never holds its whole budget);
    with them a growth would mean capturing every step again, so the request's budget is reserved at once."""
    prompt, budget = list(range(3, 13)), 4 * CACHE_BLOCK
    eager = SpecEngine(target).runner
    eager.prefill(prompt, new_tokens=budget)
    assert eager.lm.k_cache.shape[2] < budget
    captured = SpecEngine(target).runner
    replayed(captured.lm)
    captured.prefill(prompt, new_tokens=budget)
    assert captured.lm.k_cache.shape[2] >= len(prompt) + budget + BUCKETS[-1]  # padding rows of the largest bucket


@pytest.mark.parametrize("make", [
    lambda t, reference, n: TreeOracleDrafter(reference, n, wrong_at={1}, vocab=t.config.vocab_size),
    lambda t, reference, n: NgramDrafter(),
    lambda t, reference, n: eagle(t, depth=4, top_k=3),  # trees from features the replayed steps return
])
def test_tree_and_feature_drafters_on_replayed_steps_are_exact(target, make):
    prompt = [5, 17, 33, 8, 21, 40, 9, 5, 17, 33]
    reference = hf_greedy(target, prompt, NEW)
    engine = SpecEngine(target, make(target, reference, len(prompt)))
    replayed(engine.runner.lm)
    for k in (1, 24):
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=k)).tokens == reference


def test_graphs_are_refused_where_they_cannot_run(target):
    cpu = torch.device("cpu")
    assert check_graphs(None, cpu, torch.bfloat16, compile=False) is False  # the default: only on CUDA
    cuda = torch.device("cuda")
    assert check_graphs(None, cuda, torch.bfloat16, compile=False) is True
    assert check_graphs(None, cuda, torch.float32, compile=False) is False  # fp32 is the exactness mode
    assert check_graphs(None, cuda, torch.bfloat16, compile=True) is False
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device; the target is on cpu"):
        cached_lm(target, backend=BackendConfig(graphs=True))
    with pytest.raises(ConfigError, match="pick one"):
        check_graphs(True, cuda, torch.bfloat16, compile=True)
    with pytest.raises(ConfigError, match="CUDA graphs capture the lean Llama-family forward"):
        cached_lm(target, backend=BackendConfig(lean=False, graphs=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the capture itself needs CUDA")
def test_captured_cuda_graphs_match_the_eager_forward():
    model = tiny_llama(seed=1).to("cuda", torch.bfloat16)
    eager, graphed = LeanLlama(model, graphs=False), LeanLlama(model)
    assert graphed.graphs is not None  # the default on CUDA below float32
    ids = list(range(3, 40))
    for lm in (eager, graphed):
        lm.reset()
        lm.forward(ids, last_only=True)
    for chunk in ([7], [5, 6, 7], [8], list(range(20))):
        a, b = eager.forward(chunk), graphed.forward(chunk)
        assert torch.allclose(a, b, atol=5e-2) and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert graphed.graphs.captures == 4  # the prefill's bucket (48), then 1, 4 and 32
    while graphed.length < CACHE_BLOCK + 8:  # the cache grows: the steps are captured again, in a new pool
        a, b = eager.forward([9, 10, 11]), graphed.forward([9, 10, 11])
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.6
    assert graphed.k_cache.shape[2] > CACHE_BLOCK and graphed.graphs.captures == 5 and not graphed.graphs.failed


def test_bench_methods_take_the_graphs_option(target):
    from draftsmith.bench.config import parse_method
    from draftsmith.bench.runner import build_method
    from draftsmith.models import LoadedModel
    from tiny_models import char_tokenizer

    assert parse_method("ngram:k=8,graphs=0").options == {"k": 8, "graphs": 0}
    loaded = LoadedModel(target, char_tokenizer(), "tiny")
    assert build_method("plain:graphs=0", loaded, 4)  # eager, as on CPU anyway
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        build_method("plain:graphs=1", loaded, 4)


def test_grouped_queries_attend_as_repeated_key_value_heads():
    """CUDA's masked path: the heads sharing a key/value head become rows of one attention (no cache copy)."""
    from draftsmith.backends.layers import grouped_masked_attention

    torch.manual_seed(0)
    q, keys, values = torch.randn(1, 6, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    mask = torch.rand(3, 10) > 0.3
    mask[:, 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(grouped_masked_attention(q, keys, values, mask), expected, atol=1e-6)


def test_a_failed_capture_warns_and_runs_eagerly_from_then_on(target):
    def broken_capture(body, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    plain, lm = LeanLlama(target), LeanLlama(target)
    lm.graphs = CapturedSteps(lm, capture=broken_capture)
    for backend in (plain, lm):
        backend.reset()
    with pytest.warns(UserWarning, match="CUDA graph capture failed, running eager instead: RuntimeError: operation"):
        assert close(lm.forward([3, 4, 5, 6], last_only=True), plain.forward([3, 4, 5, 6], last_only=True))
    assert close(lm.forward([7]), plain.forward([7]))
    assert close(lm.forward([8, 9]), plain.forward([8, 9]))  # no second try, no second warning
    assert lm.graphs.failed and lm.graphs.captures == 0 and lm.length == plain.length


def test_deterministic_algorithms_refuse_graphs():
    torch.use_deterministic_algorithms(True)
    try:
        assert check_graphs(None, torch.device("cuda"), torch.bfloat16, compile=False) is False
        with pytest.raises(ConfigError, match="deterministic"):
            check_graphs(True, torch.device("cuda"), torch.bfloat16, compile=False)
    finally:
        torch.use_deterministic_algorithms(False)
