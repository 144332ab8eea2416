"""D-LLM routers: training follows the target ratio, skipped tokens' states are never attended, the routed draft
stays exact, and router folders are checked."""

from __future__ import annotations

import random

import pytest
import torch

from draftsmith.drafters.layerskip import LayerSkipDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.routers import RouterConfig, Routers, load_routers
from draftsmith.sparse import RoutedVerify
from draftsmith.train.router import RouterTrainConfig, routed_forward, routed_layer, train_routers
from draftsmith.train.trainer import TrainConfig
from tiny_models import char_tokenizer, hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "index", "for", "in", "range", "if", "else", "print", "x", "y"]
    for i in range(40):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(20)]
        (folder / f"module_{i}.py").write_text("\n".join(lines))
    return folder


def train_tiny(target, corpus, out, ratio: float, steps: int = 40):
    cfg = RouterTrainConfig(ratio=ratio, start_layer=1, seq_len=48, sequences=64, heldout_sequences=4,
                            corpus=str(corpus), lam=5.0)
    train = TrainConfig(out_dir=out, max_steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0,
                        checkpoint_every=0, progress=False, device="cpu")
    return train_routers(target, char_tokenizer(), cfg, train)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_executed_ratio_follows_the_target_ratio(corpus, tmp_path, ratio):
    target = tiny_llama(num_layers=8, hidden_size=64, init_std=0.08, seed=3)
    _, info = train_tiny(target, corpus, tmp_path, ratio, steps=120)
    assert info["heldout"]["executed"] == pytest.approx(ratio, abs=0.1)  # routers start near 1.0 executed
    routers = load_routers(tmp_path, target)
    assert routers.config.target_ratio == ratio


def test_a_skipped_token_is_invisible_to_the_others():
    """In the training forward, changing the input of a token that skips the layer changes no other token's
    output; a token that runs the layer does change them (power)."""
    target = tiny_llama(num_layers=2, hidden_size=32, init_std=0.1, seed=1)
    layer = target.model.layers[0]
    x = torch.randn(1, 6, 32)
    cos, sin = target.model.rotary_emb(x, torch.arange(6)[None])
    cos, sin = cos[:, None], sin[:, None]
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    changed = x.clone()
    changed[0, 2] += 3.0

    def others(inputs, gate):
        return torch.cat([routed_layer(layer, inputs, cos, sin, gate, allowed)[0, :2],
                          routed_layer(layer, inputs, cos, sin, gate, allowed)[0, 3:]])

    skipping = torch.tensor([[1.0, 1, 0, 1, 1, 1]])
    assert torch.allclose(others(x, skipping), others(changed, skipping))
    running = torch.ones(1, 6)
    assert not torch.allclose(others(x, running), others(changed, running))


def test_routed_draft_is_exact_and_skips_layers(corpus, tmp_path):
    target = tiny_llama(num_layers=6, hidden_size=64, init_std=0.08, seed=3)
    train_tiny(target, corpus, tmp_path, ratio=0.6, steps=30)
    drafter = LayerSkipDrafter(load_routers(tmp_path, target))
    engine = SpecEngine(target, drafter)
    for prompt in ([5, 17, 33, 9, 2], [40, 41, 42, 43, 40, 41]):
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=20, k=4, stop_on_eos=False))
        assert out.tokens == hf_greedy(target, prompt, 20)
    assert drafter.statistics()["executed_ratio"] < 0.95


def test_routers_decide_alike_in_training_and_decoding():
    """The training forward's argmax decisions (sample=False) are the policy's `executes` on the same inputs."""
    target = tiny_llama(num_layers=4, hidden_size=32, init_std=0.1, seed=2)
    routers = Routers(RouterConfig(hidden_size=32, num_layers=4, start_layer=1))
    torch.nn.init.normal_(routers.routers[0].out.weight, std=3.0)  # decisions that vary by token
    ids = torch.tensor([[5, 9, 13, 40, 41, 7, 3]])
    with torch.no_grad():
        x = target(ids, output_hidden_states=True).hidden_states[1]  # layer 1's input: every token ran layer 0
    cfg = RouterTrainConfig(reserve=0)
    _, gates = routed_forward(target, routers, ids, torch.ones_like(ids), cfg, sample=False)
    decisions = [routers.executes(1, x[:, j : j + 1]) for j in range(7)]
    assert decisions == gates[0, :, 1].bool().tolist()
    assert 0 < sum(decisions) < 7  # tokens decide differently
    assert gates[0, :, 0].all()  # before the start layer every token runs


def test_router_folders_are_checked(tmp_path):
    target = tiny_llama(num_layers=4, hidden_size=32)
    with pytest.raises(ConfigError, match="no routers"):
        load_routers(tmp_path, target)
    from draftsmith.routers import save_routers

    save_routers(Routers(RouterConfig(hidden_size=32, num_layers=6)), tmp_path)
    with pytest.raises(ConfigError, match="6-layer target"):
        load_routers(tmp_path, target)
    with pytest.raises(ConfigError, match="below the 3 layers"):
        RouterConfig(hidden_size=32, num_layers=6, start_layer=3, target_ratio=0.3)


def routed_reference(target, routers, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by the training forward with the routers' argmax, the prompt forced dense (reserve)."""
    ids = list(prompt)
    cfg = RouterTrainConfig(reserve=len(prompt) - 1)  # the runner caches all but the last prompt token densely
    for _ in range(new):
        tensor = torch.tensor([ids])
        logits, _ = routed_forward(target, routers, tensor, torch.ones_like(tensor), cfg, sample=False)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_lossy_sparse_verify_decodes_as_the_routed_model_and_dense_when_nothing_skips():
    target = tiny_llama(num_layers=6, hidden_size=64, init_std=0.08, seed=3)
    routers = Routers(RouterConfig(hidden_size=64, num_layers=6, start_layer=1)).eval()
    prompt = [5, 17, 33, 9, 2]
    with torch.no_grad():
        for router in routers.routers:
            router.out.bias.copy_(torch.tensor([-50.0, 50.0]))  # every token runs every layer
    engine = SpecEngine(target, None, sparse_verify=RoutedVerify(routers))
    assert engine.generate(prompt, GenerationConfig(max_new_tokens=16, k=0)).tokens == hf_greedy(target, prompt, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        for router in routers.routers:
            torch.nn.init.normal_(router.out.weight, std=2.0)
            router.out.bias.zero_()
    verify = RoutedVerify(routers)
    engine = SpecEngine(target, None, sparse_verify=verify)
    tokens = engine.generate(prompt, GenerationConfig(max_new_tokens=16, k=0, stop_on_eos=False)).tokens
    assert tokens == routed_reference(target, routers, prompt, 16)
    assert 0.2 < verify.executed_ratio < 0.9
    assert tokens != hf_greedy(target, prompt, 16)  # lossy indeed: another model


def test_a_margin_moves_the_decision_boundary_by_exactly_its_value():
    """A token executes where execute - skip > margin: at a logit difference of 1.5, margin 1.49 executes, 1.5
    and 1.51 skip; the training forward's argmax decisions and the verifier's follow the same rule."""
    routers = Routers(RouterConfig(hidden_size=8, num_layers=3, start_layer=1))
    with torch.no_grad():
        for router in routers.routers:
            router.out.weight.zero_()
            router.out.bias.copy_(torch.tensor([0.25, 1.75]))
    x = torch.randn(1, 1, 8)
    for margin, runs in ((1.49, True), (1.5, False), (1.51, False), (-3.0, True)):
        routers.config.margin = margin
        assert routers.executes(1, x) is runs
        assert routers.decide(2, x).item() is runs
    assert routers.decide(0, x) is None  # before the start layer there is no decision: it runs


def test_calibrated_share_is_reached_and_the_margin_is_kept(corpus, tmp_path):
    """Routers trained for 0.5 calibrated to 0.8 (and to 0.6) run that share of the layers on held-out text,
    a higher share from a lower margin; the calibrated copy keeps its margin when loaded."""
    from draftsmith.data.corpus import load_corpus
    from draftsmith.routers import save_routers
    from draftsmith.train.distill import TokenChunks
    from draftsmith.train.router import calibrate_share

    target = tiny_llama(num_layers=8, hidden_size=64, init_std=0.08, seed=3)
    routers, _ = train_tiny(target, corpus, tmp_path / "r", ratio=0.5, steps=60)
    routers = load_routers(tmp_path / "r", target)
    heldout = TokenChunks(load_corpus(str(corpus), split="heldout"), char_tokenizer(), 48, max_chunks=4)
    high = calibrate_share(target, routers, heldout, 0.8)
    low = calibrate_share(target, routers, heldout, 0.6)
    assert high["executed"] == pytest.approx(0.8, abs=0.03) and low["executed"] == pytest.approx(0.6, abs=0.03)
    assert high["margin"] < low["margin"]
    assert routers.config.margin == low["margin"]
    save_routers(routers, tmp_path / "c")
    assert load_routers(tmp_path / "c", target).config.margin == low["margin"]
    with pytest.raises(ConfigError, match="share must be in"):
        calibrate_share(target, routers, heldout, 0.1)  # below the first layer, which always runs


def test_a_layer_skipping_draft_under_the_lossy_verifier_masks_the_verifiers_holes():
    """Drafting with the verifier's own routers, the draft computes what the routed verifier computes, the holes
    the verifier left in the cached context masked alike: every drafted token is accepted, and the output is the
    routed model's (a draft that read those slots' stale entries had tokens rejected)."""
    target = tiny_llama(num_layers=6, hidden_size=64, init_std=0.08, seed=3)
    routers = Routers(RouterConfig(hidden_size=64, num_layers=6, start_layer=1)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for router in routers.routers:
            torch.nn.init.normal_(router.out.weight, std=2.0)
            router.out.bias.zero_()
    prompt = [5, 17, 33, 9, 2]
    verify = RoutedVerify(routers)
    engine = SpecEngine(target, LayerSkipDrafter(routers), sparse_verify=verify)
    result = engine.generate(prompt, GenerationConfig(max_new_tokens=24, k=4, stop_on_eos=False))
    assert result.tokens == routed_reference(target, routers, prompt, 24)
    assert 0.2 < verify.executed_ratio < 0.9  # holes there are
    assert result.stats.proposed > 0 and result.stats.accepted == result.stats.proposed
