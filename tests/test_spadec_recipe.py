"""SpaDec's router recipe beside ours: the upstream loss against a hand computation, hard Gumbel decisions with
straight-through gradients, the robust router's 4-bit input, a `train router --recipe upstream` run whose LoRA the
sparse verifier really runs, dense verification staying exact, and head features built on the routed model."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from draftsmith.builder import build_engine
from draftsmith.drafters.layerskip import LayerSkipDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel, load_model
from draftsmith.routers import RouterConfig, Routers, load_routers, quantize_levels
from draftsmith.train.features import FeatureDataConfig, build_feature_shards
from draftsmith.train.router import (RouterTrainConfig, routed_forward, straight_through_gate, train_routers,
                                     upstream_objective)
from draftsmith.train.trainer import TrainConfig
from test_routers import corpus, routed_reference  # noqa: F401  (the fixture and the routed greedy reference)
from tiny_models import char_tokenizer, hf_greedy, tiny_llama


def test_upstream_loss_on_a_toy_batch_is_ce_plus_five_times_the_share_gap():
    """Two rows, 3 tokens of vocabulary, 3 layers, the second row padded at its end. At every position the
    next token has probability 1/2 (the others 1/4), so a correctly aligned CE is ln 2 per counted position;
    the padded position's label would cost -ln 0.1."""
    ids = torch.tensor([[2, 0, 1, 2], [1, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    probs = torch.full((2, 4, 3), 0.25)
    for b in range(2):
        for t in range(3):
            probs[b, t, ids[b, t + 1]] = 0.5
    probs[1, 2] = torch.tensor([0.1, 0.45, 0.45])  # predicts the pad: must not count
    gates = torch.tensor([[[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]],  # t0 reserved, t3 has no next token
                          [[0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]], dtype=torch.float)  # t2's next is padding
    cfg = RouterTrainConfig(recipe="upstream", ratio=0.5, reserve=1)
    loss, metrics = upstream_objective(probs.log(), gates, ids, mask, cfg)
    # CE: 5 positions have a real next token, each ln 2. Share gap: row 0 t1 |1/3 - 1/2|, t2 |2/3 - 1/2|,
    # row 1 t1 |1 - 1/2|: (1/6 + 1/6 + 1/2) / 3 = 5/18
    assert cfg.lam == 5.0  # upstream's weight is the recipe's default
    assert float(metrics["ce"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["ratio_gap"]) == pytest.approx(5 / 18, abs=1e-6)
    assert float(loss) == pytest.approx(math.log(2) + 5 * 5 / 18, abs=1e-6)


def test_hard_gumbel_decisions_are_zero_or_one_with_the_soft_gradient():
    logits = torch.randn(64, 2, requires_grad=True)
    weights = torch.randn(64)
    torch.manual_seed(7)
    gate = straight_through_gate(logits, tau=1.0, noise=1.0)
    assert set(gate.tolist()) == {0.0, 1.0}  # hard, and both decisions drawn
    (gate * weights).sum().backward()
    torch.manual_seed(7)  # the same Gumbel draw, by hand
    noisy = logits.detach() + -torch.empty_like(logits).exponential_().log()
    assert torch.equal(gate.detach(), (noisy[:, 1] > noisy[:, 0]).float())
    reference = logits.detach().clone().requires_grad_(True)
    soft = (reference + (noisy - logits.detach())).softmax(-1)[:, 1]
    (soft * weights).sum().backward()
    assert torch.allclose(logits.grad, reference.grad, atol=1e-6)
    assert logits.grad.abs().sum() > 0


def test_robust_router_reads_4_bit_levels_of_each_token():
    x = torch.tensor([[-1.0, 0.0, 0.6, 2.0], [3.0, 3.0, 3.0, 3.0]])
    # row 0: step (2 - -1) / 15 = 0.2, levels (x + 1) / 0.2; a constant row is all level 0
    assert quantize_levels(x, 4).tolist() == [[0, 5, 8, 15], [0, 0, 0, 0]]
    assert quantize_levels(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2).tolist() == [[0, 1, 2, 3]]
    routers = Routers(RouterConfig(hidden_size=4, num_layers=2, start_layer=1, input_bits=4))
    torch.nn.init.normal_(routers.routers[0].down.weight, std=1.0)
    with torch.no_grad():
        assert torch.equal(routers.logits(1, x), routers.routers[0](quantize_levels(x, 4)))
        # a token rescaled and shifted keeps its levels, so it decides alike (what makes the router robust)
        assert torch.equal(routers.logits(1, x[:1]), routers.logits(1, 2.5 * x[:1] - 0.3))
        plain = Routers(RouterConfig(hidden_size=4, num_layers=2, start_layer=1))
        plain.load_state_dict(routers.state_dict())
        assert not torch.equal(plain.logits(1, x[:1]), plain.logits(1, 2.5 * x[:1] - 0.3))
    with pytest.raises(ConfigError, match="2..8 bits"):
        RouterConfig(hidden_size=4, num_layers=2, start_layer=1, input_bits=1)


def train_upstream(target, corpus, out, steps: int = 12):
    cfg = RouterTrainConfig(recipe="upstream", ratio=0.6, start_layer=1, seq_len=48, sequences=32,
                            heldout_sequences=4, corpus=str(corpus), input_bits=4)
    train = TrainConfig(out_dir=out, max_steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0,
                        checkpoint_every=0, progress=False, device="cpu")
    return train_routers(target, char_tokenizer(), cfg, train)


@pytest.fixture(scope="module")
def upstream_routers(corpus, tmp_path_factory):  # noqa: F811
    target = tiny_llama(num_layers=6, hidden_size=64, init_std=0.08, seed=3)
    before = {name: value.clone() for name, value in target.state_dict().items()}
    out = tmp_path_factory.mktemp("upstream")
    _, info = train_upstream(target, corpus, out)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)  # left as given
    return target, out, info


def test_upstream_routers_carry_their_lora_and_the_sparse_verifier_runs_it(upstream_routers):
    target, out, info = upstream_routers
    assert info["lora"]["modules"] == ["q_proj", "k_proj", "v_proj"] and info["lam"] == 5.0
    routers = load_routers(out, target)
    assert routers.adapter == out and routers.config.recipe == "upstream" and routers.config.input_bits == 4
    routed = routers.routed_model(target)
    q, q_routed = target.model.layers[2].self_attn.q_proj.weight, routed.model.layers[2].self_attn.q_proj.weight
    assert not torch.allclose(q, q_routed)  # the LoRA trained and was merged
    assert routed.model.layers[2].mlp.up_proj.weight is target.model.layers[2].mlp.up_proj.weight  # shared
    assert torch.equal(q, target.model.layers[2].self_attn.q_proj.weight)  # the target itself unchanged
    engine = build_engine(LoadedModel(target, char_tokenizer(), "tiny"), "none", lossy_sparse_verify=True,
                          routers=str(out), tokenizer=False)
    prompt = [5, 17, 33, 9, 2]
    tokens = engine.generate(prompt, GenerationConfig(max_new_tokens=12, k=0, stop_on_eos=False)).tokens
    assert tokens == routed_reference(routed, routers, prompt, 12)  # the routed model WITH its LoRA
    assert tokens != routed_reference(target, routers, prompt, 12)  # power: without it, another output
    assert 0 < engine.runner.sparse_verify.executed_ratio < 1


def test_layer_skipping_draft_with_upstream_routers_stays_exact(upstream_routers):
    target, out, _ = upstream_routers
    drafter = LayerSkipDrafter(load_routers(out, target))
    engine = SpecEngine(target, drafter)
    for prompt in ([5, 17, 33, 9, 2], [40, 41, 42, 43, 40, 41]):
        out_tokens = engine.generate(prompt, GenerationConfig(max_new_tokens=16, k=4, stop_on_eos=False)).tokens
        assert out_tokens == hf_greedy(target, prompt, 16)
    assert drafter.statistics()["executed_ratio"] < 1.0


def test_train_router_cli_runs_the_upstream_recipe(corpus, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from draftsmith.cli.main import app

    model_dir = tmp_path / "tiny"
    tiny_llama(num_layers=4, hidden_size=64, init_std=0.08, seed=3).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    flags = ["train", "router", "--target", str(model_dir), "--corpus", str(corpus), "--start-layer", "1",
             "--steps", "3", "--sequences", "8", "--seq-len", "32", "--batch-size", "4", "--warmup", "1"]
    result = CliRunner().invoke(app, [*flags, "--recipe", "upstream", "--robust-router", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert {"routers.safetensors", "routers.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "r").iterdir()}
    loaded = load_model(str(model_dir))
    routers = load_routers(tmp_path / "r", loaded.model)
    assert routers.config.input_bits == 4 and routers.adapter is not None
    share = ["train", "router-share", "--target", str(model_dir), "--corpus", str(corpus), "--routers",
             str(tmp_path / "r"), "--share", "0.7", "--sequences", "4", "--seq-len", "32"]
    calibrated = CliRunner().invoke(app, share)
    assert calibrated.exit_code == 0, calibrated.output
    copy = load_routers(tmp_path / "r-share0.7", loaded.model)  # the default folder, with the LoRA beside
    assert copy.adapter is not None and copy.config.training["calibration"]["margin"] == copy.config.margin
    assert copy.config.training["calibration"]["command"].startswith("draftsmith")  # how the copy was made
    assert "executed" in calibrated.output and copy.config.input_bits == 4
    again = CliRunner().invoke(app, share)
    assert isinstance(again.exception, ConfigError) and "not empty" in str(again.exception)
    # a LoRA's files damaged or astray: named, never a peft traceback nor a LoRA merged into the shared target
    adapter = tmp_path / "r-share0.7" / "adapter_config.json"
    adapter.write_text(adapter.read_text().replace('"target_modules": [', '"target_modules": "all-linear", "x": ['))
    with pytest.raises(ConfigError, match="target modules as a list"):
        load_routers(tmp_path / "r-share0.7", loaded.model)
    (tmp_path / "r" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="trained with a LoRA .* adapter_model.safetensors is missing"):
        load_routers(tmp_path / "r", loaded.model)
    (tmp_path / "r" / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="trained with a LoRA"):
        load_routers(tmp_path / "r", loaded.model)
    distil = CliRunner().invoke(app, [*flags, "--recipe", "distil", "--out", str(tmp_path / "d")])
    assert distil.exit_code == 0, distil.output
    (tmp_path / "d" / "adapter_config.json").write_text(adapter.read_text())
    with pytest.raises(ConfigError, match="frozen target .* holds a LoRA"):
        load_routers(tmp_path / "d", loaded.model)
    with pytest.raises(ConfigError, match="add --lossy-sparse-verify"):  # routers a dense verifier would ignore
        build_engine(loaded, "ngram", routers=str(tmp_path / "r"))
    refused = CliRunner().invoke(app, [*flags, "--recipe", "frozen", "--out", str(tmp_path / "x")])
    assert isinstance(refused.exception, ConfigError) and "unknown router recipe 'frozen'" in str(refused.exception)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_sparse_features_are_the_routed_models(corpus, tmp_path):  # noqa: F811
    """Dense and sparse shards hold the same sequences; their features agree at the first positions (always
    run, nothing before them skipped) and differ after them, where the routers skip layers. Routers that run
    everything give the dense features."""
    target = tiny_llama(num_layers=4, hidden_size=64, init_std=0.08, seed=3)
    config = FeatureDataConfig(corpus=str(corpus), sequences=8, heldout_sequences=0, seq_len=24, self_distill=0.0,
                               prompt_tokens=8, shard_size=8)
    routers = Routers(RouterConfig(hidden_size=64, num_layers=4, start_layer=1)).eval()

    def features(folder, routers=None):
        build_feature_shards(target, char_tokenizer(), config, folder, progress=False, routers=routers)
        return load_file(str(next((folder / "train").glob("shard-*.safetensors"))))

    dense = features(tmp_path / "dense")
    with torch.no_grad():
        for router in routers.routers:
            router.out.bias.copy_(torch.tensor([-50.0, 50.0]))
    everything = features(tmp_path / "all", routers)
    assert torch.equal(everything["input_ids"], dense["input_ids"])
    assert torch.allclose(everything["features"].float(), dense["features"].float(), atol=2e-2)
    torch.manual_seed(0)
    with torch.no_grad():
        for router in routers.routers:
            torch.nn.init.normal_(router.out.weight, std=2.0)
            router.out.bias.zero_()
    sparse = features(tmp_path / "sparse", routers)
    assert torch.equal(sparse["input_ids"], dense["input_ids"])
    _, gates = routed_forward(target, routers, dense["input_ids"].long(), torch.ones_like(dense["input_ids"]),
                              RouterTrainConfig(), sample=False)
    assert 0.3 < float(gates.mean()) < 0.95  # layers are skipped
    gap = (sparse["features"].float() - dense["features"].float()).abs().amax(-1)
    assert gap[:, :2].max() < 2e-2  # the reserved first positions run dense
    assert (gap[:, 2:] > 0.1).float().mean() > 0.5
    with pytest.raises(ConfigError, match="other settings"):  # sparse shards are never taken for dense ones
        build_feature_shards(target, char_tokenizer(), config, tmp_path / "sparse", progress=False)
