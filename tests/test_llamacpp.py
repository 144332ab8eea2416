"""The llama.cpp target backend: our loop and drafters over llama.cpp must reproduce llama.cpp's own one-token
greedy decoding of the same F32 GGUF, token for token (a tiny random Llama written as GGUF here)."""

import pytest
import torch

pytest.importorskip("llama_cpp")

from draftsmith.backends.protocol import BackendConfig
from draftsmith.draft import ROOT, Draft  # noqa: E402
from draftsmith.drafters.registry import build_drafter  # noqa: E402
from draftsmith.drafters.model import ModelDrafter  # noqa: E402
from draftsmith.drafters.ngram import NgramDrafter  # noqa: E402
from draftsmith.engine import GenerationConfig, SpecEngine  # noqa: E402
from draftsmith.errors import ConfigError  # noqa: E402
from draftsmith.gguf_export import write_gguf  # noqa: E402
from draftsmith.backends.llamacpp import MAX_TREE_LEAVES, LlamaCppLM  # noqa: E402
from draftsmith.models import embedded_gguf, load_model  # noqa: E402
from draftsmith.target_runner import tree_mask  # noqa: E402
from scripted_drafters import OracleDrafter, TreeOracleDrafter  # noqa: E402
from tiny_models import noisy_copy, tiny_llama  # noqa: E402

VOCAB = 49152  # the embedded SmolLM2 GGUF's tokenizer is written into the test file
NEW = 40


@pytest.fixture(scope="module")
def torch_model():
    return tiny_llama(vocab_size=VOCAB, seed=3, hidden_size=32)


@pytest.fixture(scope="module")
def target(torch_model, tmp_path_factory):
    path = write_gguf(torch_model, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", embedded_gguf("smollm2"), "f32")
    return load_model(str(path), backend="llamacpp")


def prompt(seed: int, n: int = 24) -> list[int]:
    # a repeated stretch gives the n-gram drafter something to find
    ids = torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids + ids[:6]


def llamacpp_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """The reference: llama.cpp decoding one token per llama_decode, argmax of each step's logits."""
    lm = LlamaCppLM(model)
    logits = lm.forward(prompt_ids, last_only=True)
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = lm.forward(out[-1:])
    return out


def config(k: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW, k=k, stop_on_eos=False)


def test_llama_cpps_own_generate_agrees_with_the_reference(target):
    import llama_cpp

    llm = llama_cpp.Llama(str(target.model.path), n_ctx=256, n_threads=2, verbose=False)
    ids = prompt(0)
    own = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        own.append(token)
        if len(own) == NEW:
            break
    assert own == llamacpp_greedy(target.model, ids, NEW)


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("drafter_name", ["plain", "ngram", "torch-model-noisy-self"])
def test_greedy_on_llamacpp_equals_llamacpp_greedy(target, torch_model, drafter_name, k):
    drafter = {"plain": None, "ngram": NgramDrafter(min_n=1, max_n=3),
               "torch-model-noisy-self": ModelDrafter(noisy_copy(torch_model, scale=0.2))}[drafter_name]
    for seed in (1, 2):
        ids = prompt(seed)
        result = SpecEngine(target.model, drafter).generate(ids, config(k if drafter else 0))
        assert result.tokens == llamacpp_greedy(target.model, ids, NEW)


@pytest.mark.parametrize("wrong_at", [{0}, set(), {2}], ids=["fully-rejected", "fully-accepted", "partial"])
def test_rollback_after_rejected_and_accepted_drafts(target, wrong_at):
    ids = prompt(4)
    reference = llamacpp_greedy(target.model, ids, NEW)
    drafter = OracleDrafter(reference, len(ids), wrong_at=wrong_at, vocab=VOCAB)
    result = SpecEngine(target.model, drafter).generate(ids, config(6))
    assert result.tokens == reference
    stats = result.stats
    if wrong_at == {0}:
        assert stats.accepted == 0 and stats.proposed > 0
    elif not wrong_at:
        assert stats.accepted == stats.proposed
    else:
        assert 0 < stats.accepted <= 2 * stats.target_steps


def test_trees_are_verified_in_one_decode_through_sequence_ids(target):
    """Wrong siblings come first, so the accepted path runs through sequences other than 0."""
    ids = prompt(5)
    reference = llamacpp_greedy(target.model, ids, NEW)
    drafter = TreeOracleDrafter(reference, len(ids), vocab=VOCAB)
    result = SpecEngine(target.model, drafter).generate(ids, config(8))
    assert result.tokens == reference
    assert result.stats.tau >= 4


def test_tree_logits_equal_each_paths_own_logits(target):
    """Every node of a tree sees exactly its ancestors: its logits equal those of its root-to-node chain."""
    lm = LlamaCppLM(target.model)
    ids = prompt(6)
    draft = Draft(tokens=[11, 12, 13, 14, 15], parents=[ROOT, ROOT, 0, 0, 2])
    lm.forward(ids[:-1], last_only=True)
    positions = [lm.length + d for d in (0, *draft.depths())]
    tree_logits = lm.forward([ids[-1], *draft.tokens], positions=positions, tree_mask=tree_mask(draft))
    for node in range(len(draft)):
        path, at = [], node
        while at != ROOT:
            path.insert(0, draft.tokens[at])
            at = draft.parent_ids()[at]
        lm.truncate(len(ids) - 1)
        chain = lm.forward([ids[-1], *path])
        torch.testing.assert_close(tree_logits[node + 1], chain[-1], rtol=1e-4, atol=1e-4)


def test_limits_and_features_give_clear_errors(target, tmp_path):
    lm = LlamaCppLM(target.model)
    with pytest.raises(ConfigError, match="hidden features"):
        lm.forward([5, 6], features=True)
    wide = Draft(tokens=list(range(10, 10 + MAX_TREE_LEAVES + 1)), parents=[ROOT] * (MAX_TREE_LEAVES + 1))
    with pytest.raises(ConfigError, match="at most"):
        lm.forward([5, *wide.tokens], positions=[0] + [1] * len(wide), tree_mask=tree_mask(wide))
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="runs GGUF files"):
        load_model(str(folder), backend="llamacpp")
    with pytest.raises(ConfigError, match="GGUF file's own weights"):
        SpecEngine(target.model, None, backend=BackendConfig(weights="int4"))
    with pytest.raises(ConfigError, match="unknown backend"):
        load_model("smollm2", backend="vllm")
    for kind in ("eagle", "eagle+ngram", "medusa", "ctc"):  # heads read hidden states llama.cpp does not give
        with pytest.raises(ConfigError, match=f"the {kind.split('+')[0]} drafter reads the target's hidden states"):
            build_drafter(kind, target)


def test_bench_runs_llamacpp_peers_and_our_methods_on_the_llamacpp_backend(torch_model, target, tmp_path):
    """In one interleaved run: llama.cpp's own greedy and prompt lookup, and our plain / n-gram loop with llama.cpp
    scoring, all on the same F32 file: every one gives llama.cpp's greedy tokens."""
    from draftsmith.bench.config import BenchConfig
    from draftsmith.bench.runner import run_bench
    from draftsmith.bench.workloads import Task
    from draftsmith.models import LoadedModel

    loaded = LoadedModel(torch_model, target.tokenizer, str(target.model.path))
    methods = ["plain", "llamacpp", "llamacpp-lookup:4", "plain:llamacpp=1", "ngram:k=4,llamacpp=1"]
    tasks = [Task(f"t{i}", text) for i, text in enumerate(["def add(a, b):\n    return a + b\n\ndef add(",
                                                            "for i in range(10):\n    print(i)\n"])]
    config = BenchConfig(target=loaded.name, workload="lines", methods=methods, limit=2, max_new_tokens=12,
                         pass_at_1=False, out=str(tmp_path / "out"))
    result = run_bench(config, target=loaded, tasks=tasks)
    by_method = {}
    for record in result.records:
        by_method.setdefault(record.method, {})[record.prompt_id] = record.output_tokens
    for method in methods[2:]:
        assert by_method[method] == by_method["llamacpp"], method
    assert all(len(tokens) == 12 for tokens in by_method["llamacpp"].values())
