"""Models with sliding-window layers (Gemma 3) run through transformers' own forward and cache: rollback and tree
verification must stay exact once the context is longer than the window."""

import pytest
import torch

from draftsmith.backends.protocol import BackendConfig
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.target_runner import TargetRunner
from scripted_drafters import OracleDrafter, TreeOracleDrafter
from tiny_models import char_tokenizer, hf_greedy, noisy_copy, tiny_gemma3, tiny_llama

WINDOW = 8
PROMPT = "def add(a, b):\n    return a + b\n\ndef add("  # 40 tokens: five windows
NEW = 40


def tiny_sliding_mistral(window: int = WINDOW):
    """Every layer windowed, and no per-layer types declared: a single mask for all layers."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(
        vocab_size=102, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=window, max_position_embeddings=512, eos_token_id=1, pad_token_id=0,
        bos_token_id=None, initializer_range=0.5)).eval()


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module", params=["gemma3-mixed-layers", "mistral-all-sliding"])
def windowed(request):
    return tiny_gemma3(window=WINDOW) if request.param.startswith("gemma3") else tiny_sliding_mistral()


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("drafter", ["ngram", "oracle-wrong-at-2", "tree-oracle", "model-noisy-self"])
def test_greedy_is_exact_past_the_window(tok, windowed, drafter, k):
    ids = tok.encode(PROMPT)
    reference = hf_greedy(windowed, ids, NEW)
    make = {
        "ngram": lambda: NgramDrafter(min_n=1, max_n=3),
        "oracle-wrong-at-2": lambda: OracleDrafter(reference, len(ids), {2}),  # partial acceptance: rollback
        "tree-oracle": lambda: TreeOracleDrafter(reference, len(ids)),  # the accepted path skips siblings
        "model-noisy-self": lambda: ModelDrafter(noisy_copy(windowed, scale=0.3)),  # its own windowed cache
    }[drafter]
    result = SpecEngine(windowed, make(), tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=k, adaptive=False))
    assert result.tokens == reference


def root_paths(draft: Draft) -> list[list[int]]:
    """For each node, the tokens from the first level down to it."""
    parents, paths = draft.parent_ids(), []
    for node in range(len(draft)):
        path = []
        while node != ROOT:
            path.append(draft.tokens[node])
            node = parents[node]
        paths.append(path[::-1])
    return paths


@pytest.mark.parametrize("backend", ["gemma3-sliding-hf", "mistral-sliding-hf", "llama-hf", "llama-lean"])
def test_each_tree_node_scores_as_its_own_chain(backend):
    """One forward over a tree gives every node the logits a chain of its ancestors would: the tree mask hides
    siblings and, on sliding-window layers, the keys that fell out of the node's window."""
    model = {"gemma3": lambda: tiny_gemma3(window=WINDOW), "mistral": tiny_sliding_mistral,
             "llama": lambda: tiny_llama(seed=3)}[backend.split("-")[0]]()
    lean = backend.endswith("lean")
    prompt = list(range(5, 35))  # longer than the window
    draft = Draft(tokens=[40, 41, 42, 43, 44, 45], parents=[ROOT, ROOT, 0, 0, 1, 2])

    def scored(d: Draft) -> torch.Tensor:
        runner = TargetRunner(model, backend=BackendConfig(lean=lean))
        runner.prefill(prompt)
        return runner.score(prompt[-1], d).logits

    tree = scored(draft)
    for node, path in enumerate(root_paths(draft)):
        torch.testing.assert_close(tree[node + 1], scored(Draft(tokens=path))[-1], rtol=1e-4, atol=1e-4)
