"""CS-Drafting: MaG (prompt lookup + bigram chain), acceptance rules that report what they sample, and cascades
of draft models that stay exact at the top whatever their lenient reviews below do."""

import numpy as np
import pytest
import torch

from draftsmith.acceptance import GreedyRule, RejectionRule, SamplingConfig, acceptance_rule
from draftsmith.data.corpus import CodeDocument
from draftsmith.draft import Draft
from draftsmith.drafters.cascade import CascadeConfig, ReviewingLevel, build_cascade, parse_cascade
from draftsmith.drafters.mag import NO_SUCCESSOR, BigramTable, MagDrafter, build_bigram
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.target_runner import TargetRunner
from test_sampling import ALPHA, PROMPT, VOCAB, assert_test_has_power, chi_square_pvalue, exact_joint, sampled_joint
from test_errors import saved_target  # noqa: F401  (the tiny model saved to a folder)
from tiny_models import char_tokenizer, hf_greedy, noisy_copy, tiny_llama

# ---- MaG ----------------------------------------------------------------------------------------------------


def test_bigram_table_holds_each_tokens_most_frequent_successor(tmp_path):
    tokenizer = char_tokenizer()
    docs = [CodeDocument("a", "abab ac"), CodeDocument("b", "ab xy")]  # a->b 3 times, a->c once; never across docs
    table = build_bigram(tokenizer, docs, progress=False)
    id_of = tokenizer.convert_tokens_to_ids
    assert table.successor[id_of("a")] == id_of("b") and table.count[id_of("a")] == 3
    assert table.successor[id_of("x")] == id_of("y") and table.count[id_of("x")] == 1
    assert table.successor[id_of("y")] == NO_SUCCESSOR  # last token of a document: "y" never followed by "a"
    # ties go to the smallest id: " " is followed once by "a" and once by "x"
    assert table.successor[id_of(" ")] == min(id_of("a"), id_of("x"))
    # token sequences (the target's own writing) count alike, added to the documents' pairs
    with_written = build_bigram(tokenizer, docs, progress=False, sequences=[[id_of("a"), id_of("c")] * 3])
    assert with_written.successor[id_of("a")] == id_of("c") and with_written.count[id_of("a")] == 4
    loaded = BigramTable.load(table.save(tmp_path / "bigram.safetensors"), tokenizer)
    assert torch.equal(loaded.successor, table.successor) and torch.equal(loaded.count, table.count)


def test_bigram_table_refuses_another_tokenizer(tmp_path):
    tokenizer = char_tokenizer()
    table = build_bigram(tokenizer, [CodeDocument("a", "abc")], progress=False)
    path = table.save(tmp_path / "t.safetensors")
    with pytest.raises(ConfigError, match="vocabulary of 102 tokens.*has 103"):
        BigramTable.load(path, char_tokenizer(extra_chars="é"))
    same_size = BigramTable(table.successor, table.count, "another").save(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="another tokenizer"):
        BigramTable.load(same_size, tokenizer)
    with pytest.raises(ConfigError, match="not found"):
        BigramTable.load(tmp_path / "missing.safetensors", tokenizer)
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    with pytest.raises(ConfigError, match="not a bigram table"):
        BigramTable.load(tmp_path / "junk.safetensors", tokenizer)


def test_mag_copies_the_longest_suffix_match_then_follows_the_bigram_chain():
    successor = torch.full((10,), NO_SUCCESSOR, dtype=torch.int32)
    successor[5], successor[6] = 6, 7  # 5 -> 6 -> 7, then nothing
    mag = MagDrafter(BigramTable(successor, torch.ones(10, dtype=torch.int32), "x"), min_n=2, max_n=3)
    mag.reset([], SamplingConfig(), torch.Generator())
    # "1 2 3" occurred, followed by "4 5": copied, then the chain continues from 5
    assert mag.propose([1, 2, 3, 4, 5, 0, 1, 2, 3], 6).tokens == [4, 5, 0, 1, 2, 3]
    assert mag.propose([1, 2, 3, 4, 5, 0, 1, 2, 3, 4], 4).tokens == [5, 0, 1, 2]
    # no match of two tokens: the chain alone, from the last token, until a token without successor
    assert mag.propose([8, 9, 5], 5).tokens == [6, 7]


def test_ngram_index_forgets_tokens_that_were_rejected():
    """Inside a cascade the drafter sees drafted tokens that are later rejected: its proposals must equal those
    of a drafter that only ever saw the final context."""
    rng = np.random.default_rng(0)
    drafter = NgramDrafter(1, 3)
    base = rng.integers(0, 5, 40).tolist()
    for trial in range(30):
        cut = int(rng.integers(1, len(base)))
        context = base[:cut] + rng.integers(0, 5, int(rng.integers(0, 8))).tolist()
        fresh = NgramDrafter(1, 3)
        assert drafter.propose(context, 5).tokens == fresh.propose(context, 5).tokens, trial


# ---- acceptance rules -----------------------------------------------------------------------------------------


def test_rules_at_leniency_one_are_the_exact_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    draft = Draft(tokens=[1, 0])
    verdict = GreedyRule().accept(draft, logits)
    assert verdict.path == [0, 1] and verdict.next_token == 2 and verdict.dists is None
    sampled = RejectionRule(SamplingConfig(temperature=1.0)).accept(draft, logits, torch.Generator().manual_seed(0))
    # exact speculative sampling: each emitted token is distributed as the reviewer's own row
    assert torch.allclose(sampled.dists, logits.softmax(-1)[: len(sampled.path) + 1])


def test_lenient_greedy_accepts_a_token_within_the_leniency_factor():
    logits = torch.tensor([[1.0, 1.0 - np.log(1.5), -5.0], [0.0, 0.0, 3.0]])  # p(1) = p(0) / 1.5
    draft = Draft(tokens=[1])
    assert GreedyRule(1.0).accept(draft, logits).path == []
    assert GreedyRule(2.0).accept(draft, logits).path == [0]
    assert GreedyRule(2.0).accept(Draft(tokens=[2]), logits).path == []  # p(2) is far below p(0) / 2


@pytest.mark.parametrize("leniency", [1.0, 3.0])
def test_lenient_sampling_reports_the_distribution_it_samples(leniency):
    """The emitted token follows the distribution the Verdict reports: the q a cascade hands to the level
    above. At leniency 1 that is p; at 3 it is not, and the test tells them apart."""
    p_rows = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25] * 4])
    logits = p_rows.log()
    q = torch.tensor([0.1, 0.1, 0.1, 0.7])  # mass where p has little
    rule = RejectionRule(SamplingConfig(temperature=1.0), leniency)
    generator, draft_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    counts, reported = np.zeros(4), None
    for _ in range(20_000):
        x = int(torch.multinomial(q, 1, generator=draft_generator))
        verdict = rule.accept(Draft(tokens=[x], probs=q[None]), logits, generator)
        counts[x if verdict.path else verdict.next_token] += 1
        reported = verdict.dists[0]
    assert chi_square_pvalue(counts, reported.numpy()) > ALPHA
    if leniency == 1.0:
        assert torch.allclose(reported, p_rows[0])
    else:
        assert_test_has_power(reported.double().numpy(), p_rows[0].double().numpy(), 20_000)


def test_upstream_rule_accepts_above_q_over_l_and_not_at_it():
    """CS-Drafting's review: x passes when p(x) > q(x) / l. A uniform reviewer over 4 tokens gives p = 1/4
    exactly, so the boundary p = q / l is hit exactly: at it the token is refused, just past it accepted."""
    logits = torch.zeros(2, 4)  # p = 1/4 for every token; the argmax is token 0
    point_mass = Draft(tokens=[2])  # a deterministic drafter (MaG): q(x) = 1
    assert GreedyRule(4.0, "upstream").accept(point_mass, logits).path == []  # 1/4 > 1/4 is false
    assert GreedyRule(4.01, "upstream").accept(point_mass, logits).path == [0]
    assert GreedyRule(3.99, "upstream").accept(point_mass, logits).path == []
    q = torch.tensor([[0.1, 0.1, 0.5, 0.3]])  # a model drafter that gave x = 2 half its mass
    model_draft = Draft(tokens=[2], probs=q)
    assert GreedyRule(2.0, "upstream").accept(model_draft, logits).path == []  # 1/4 > 0.5 / 2 is false
    verdict = GreedyRule(2.01, "upstream").accept(model_draft, logits)
    assert verdict.path == [0] and verdict.next_token == 0
    # the verdict hands the reviewer's own rows up as q, as upstream's review returns its probabilities
    assert torch.equal(verdict.dists, logits.softmax(-1))
    # ours measures against the argmax instead: a tie with the best token passes at any l > 1, not at l = 1
    assert GreedyRule(1.001).accept(point_mass, logits).path == [0]
    assert GreedyRule(1.0, "upstream").accept(Draft(tokens=[0]), logits).path == [0]  # the argmax always passes
    assert GreedyRule(1.0, "upstream").accept(Draft(tokens=[2], probs=torch.full((1, 4), 0.01)), logits).path == []


def test_upstream_rule_at_leniency_one_is_the_exact_greedy_review():
    """p > q / l would pass a non-argmax token whose q is small even at l = 1; upstream relaxes nothing there."""
    rng = torch.Generator().manual_seed(0)
    for trial in range(50):
        logits = torch.randn(4, 6, generator=rng)
        draft = Draft(tokens=torch.randint(0, 6, (3,), generator=rng).tolist(), probs=torch.full((3, 6), 1e-3))
        exact = GreedyRule().accept(draft, logits)
        upstream = GreedyRule(1.0, "upstream").accept(draft, logits)
        assert (upstream.path, upstream.next_token) == (exact.path, exact.next_token), trial


def test_leniency_below_one_is_refused():
    with pytest.raises(ConfigError, match="leniency must be >= 1"):
        acceptance_rule(SamplingConfig(), 0.5)


# ---- configuration --------------------------------------------------------------------------------------------


def test_k_matrix_inline_and_toml(tmp_path):
    assert parse_cascade("").k_matrix == [[4, 2], [0, 3]]
    assert parse_cascade("5,1/0,2").k_matrix == [[5, 1], [0, 2]]
    assert parse_cascade("3,0").k_matrix == [[3, 0], [0, 0]]  # rows left out review nothing
    file = tmp_path / "c.toml"
    file.write_text('drafters = ["model:a", "model:b", "mag"]\nk_matrix = [[2, 1, 1], [0, 2, 1], [0, 0, 3]]\n'
                    "leniency = [2.0, 4]\n")
    config = parse_cascade(str(file))
    assert config.drafters == ["model:a", "model:b", "mag"] and config.leniency == [2.0, 4.0]
    assert config.leniency_rule == "argmax"
    upstream = parse_cascade("upstream")  # upstream's main.py: two models above MaG, lenience 2, its rule
    assert upstream.k_matrix == [[5, 14, 10], [0, 1, 10], [0, 0, 10]] and upstream.leniency == [2.0, 2.0]
    assert upstream.leniency_rule == "upstream" and len(upstream.drafters) == 3
    assert parse_cascade("upstream-l4").leniency == [4.0, 4.0]


@pytest.mark.parametrize("spec, message", [
    ("4,x", "cannot read the k-matrix"),
    ("4,2/1,3", "entries before column 1 must be 0"),
    ("0,0", "drafts nothing"),
    ("4,2/0,3/0,0,1", "1 to 2 rows"),
    ("4/0", "must hold 2 counts"),
    ("missing.toml", "not found"),
    ("upstream-lx", "upstream-lL with a leniency"),
    ("upstream-l0.5", "leniency"),
])
def test_bad_cascade_settings_raise_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_cascade(spec)


def test_bad_toml_and_leniency_raise_config_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("k_matrix = [[1, 2]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_cascade(str(bad))
    bad.write_text("k_matrix = [[1, 2]]\nlenience = 2\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_cascade(str(bad))
    bad.write_text('k_matrix = [[1, 2]]\nleniency_rule = "max"\n')
    with pytest.raises(ConfigError, match="leniency_rule must be one of argmax, upstream"):
        parse_cascade(str(bad))
    with pytest.raises(ConfigError, match="leniency"):
        CascadeConfig(leniency=0.5)


def test_a_statistical_drafter_reviews_nothing():
    mag = MagDrafter(BigramTable(torch.full((4,), NO_SUCCESSOR, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), "x"))
    config = CascadeConfig(drafters=["mag", "ngram"], k_matrix=[[2, 1], [0, 2]])
    with pytest.raises(ConfigError, match="'mag' is not a model and reviews nothing"):
        build_cascade(config, lambda spec: ("drafter", mag if spec == "mag" else NgramDrafter()), vocab_size=4)


# ---- a cascade level's cache ------------------------------------------------------------------------------------


def test_runner_sync_keeps_the_shared_prefix_and_scores_like_a_fresh_prefill():
    model = tiny_llama(seed=3)
    runner, fresh = TargetRunner(model), TargetRunner(model)
    runner.prefill([5, 6, 7, 8, 9])
    runner.score(9, Draft(tokens=[10, 11, 12]))
    runner.commit([0, 1])  # holds 5 .. 11
    for context in ([5, 6, 7, 8, 9, 10, 11, 20, 21], [5, 6, 30], [5, 6, 30, 31, 32, 33]):
        runner.sync(context)
        fresh.prefill(context)
        assert runner.tokens + runner.pending == context[:-1]  # the new tokens ride with the next forward
        scored, reference = (r.score(context[-1], Draft(tokens=[40, 41])).logits for r in (runner, fresh))
        assert torch.allclose(scored, reference, atol=1e-4)  # fp32, fed in other shapes: equal to rounding
        runner.commit([])
        fresh.commit([])
        context.append(context[-1])  # the committed root; the next sync starts from here


# ---- cascades end to end --------------------------------------------------------------------------------------


def mag_for(vocab: int, seed: int = 0) -> MagDrafter:
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randint(0, vocab, (vocab,), generator=generator, dtype=torch.int32)
    return MagDrafter(BigramTable(successor, torch.ones(vocab, dtype=torch.int32), "x"), min_n=1)


def cascade_over(models: dict, k_matrix, leniency, vocab: int, mag: MagDrafter, rule: str = "argmax"):
    drafters = [*models, "mag"]
    config = CascadeConfig(drafters=drafters, k_matrix=k_matrix, leniency=leniency, leniency_rule=rule)
    return build_cascade(config, lambda spec: ("model", models[spec]) if spec in models else ("drafter", mag), vocab)


@pytest.fixture(scope="module")
def greedy_models():
    target = tiny_llama(seed=0)
    return target, noisy_copy(target, 0.05, seed=1), noisy_copy(target, 0.15, seed=2)


DEPTHS = {
    1: (["a"], [[4, 0]], 1.0),  # the target reviews a draft model, which drafts alone
    2: (["a"], [[3, 2], [0, 3]], 3.0),  # ...which drafts by leniently reviewing MaG
    3: (["a", "b"], [[3, 1, 1], [0, 2, 1], [0, 0, 2]], [2.0, 5.0]),  # a reviews b and MaG, b reviews MaG
}


@pytest.mark.parametrize("depth, rule, leniency", [*((d, "argmax", None) for d in DEPTHS),
                                                    (3, "upstream", None), (3, "upstream", 1.0)])
def test_cascade_greedy_output_is_the_targets(greedy_models, depth, rule, leniency):
    """Whatever the levels below accept, by either rule, the target's exact review keeps its greedy output."""
    target, a, b = greedy_models
    names, k_matrix, default_leniency = DEPTHS[depth]
    vocab = target.config.vocab_size
    cascade = cascade_over({n: m for n, m in zip(names, (a, b))}, k_matrix, leniency or default_leniency, vocab,
                           mag_for(vocab), rule)
    engine = SpecEngine(target, cascade)
    rng = np.random.default_rng(depth)
    accepted = proposed = level_accepted = level_proposed = 0
    for trial in range(4):
        prompt = rng.integers(2, vocab, int(rng.integers(3, 12))).tolist()
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=30, k=8, stop_on_eos=False))
        assert out.tokens == hf_greedy(target, prompt, 30), (depth, trial)
        accepted, proposed = accepted + out.stats.accepted, proposed + out.stats.proposed
        level_accepted += out.stats.drafter.get("a_accepted", 0)
        level_proposed += out.stats.drafter.get("a_proposed", 0)
    assert 0 < accepted < proposed  # the target accepted some drafts and rejected others
    if depth > 1:  # the levels below really reviewed: they proposed, accepted and rejected
        assert 0 < level_accepted < level_proposed


def test_depth_two_cascade_keeps_the_targets_sampling_distribution():
    """target <- lenient bad model <- MaG: the model's emitted distribution is neither its own nor the target's,
    and only the distributions the rules report keep the top review exact."""
    vocab = VOCAB
    target = tiny_llama(vocab_size=vocab, seed=11, init_std=0.3)
    drafter_model = tiny_llama(vocab_size=vocab, seed=5, init_std=0.3)
    cascade = cascade_over({"a": drafter_model}, [[2, 1], [0, 2]], 3.0, vocab, mag_for(vocab, seed=3))
    cfg = SamplingConfig(temperature=1.0)
    expected = exact_joint(target, PROMPT, cfg)
    counts, stats = sampled_joint(SpecEngine(target, cascade), PROMPT, cfg, n=1500, k=3)
    assert 0 < stats.accepted < stats.proposed
    assert chi_square_pvalue(counts, expected) > ALPHA
    # power: the draft model's own distribution is far from the target's
    assert_test_has_power(expected, exact_joint(drafter_model, PROMPT, cfg), 1500)


def test_reviewing_level_cuts_padded_logits():
    """A draft model with more logits than the target never drafts an id the target cannot embed."""
    target = tiny_llama(seed=0)
    padded = tiny_llama(vocab_size=target.config.vocab_size + 20, seed=4)
    with torch.no_grad():
        padded.lm_head.weight[target.config.vocab_size :] += 50.0  # the padded ids would win every argmax
    level = ReviewingLevel("a", padded, None, 1.0, target.config.vocab_size)
    level.reset([3, 4, 5], SamplingConfig(), torch.Generator())
    assert max(level.propose([3, 4, 5], 6).tokens) < target.config.vocab_size


# ---- commands ----------------------------------------------------------------------------------------------------


def test_build_bigram_and_a_cascade_from_the_command_line(saved_target, tmp_path):
    """build-bigram with the target's tokenizer, then generate through a TOML-configured cascade (the target
    reviewing a draft model that reviews MaG leniently): the same text as plain decoding."""
    from typer.testing import CliRunner

    from draftsmith.cli.main import app

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    table = tmp_path / "bigram.safetensors"
    runner = CliRunner()
    built = runner.invoke(app, ["build-bigram", "--target", str(saved_target), "--corpus", str(corpus), "--out", str(table)])
    assert built.exit_code == 0, built.output
    assert BigramTable.load(table, char_tokenizer()).successor[char_tokenizer().convert_tokens_to_ids("d")] >= 0
    config = tmp_path / "cascade.toml"
    config.write_text(f'drafters = ["model:{saved_target}", "mag:{table}"]\nk_matrix = [[3, 2], [0, 3]]\nleniency = 2\n')
    # upstream's shape: two models above MaG, the smaller one the first layer of the larger, upstream's rule
    upstream = tmp_path / "upstream.toml"
    upstream.write_text(f'drafters = ["model:{saved_target}", "model:{saved_target}:layers=1", "mag:{table}"]\n'
                        'k_matrix = [[2, 2, 1], [0, 1, 2], [0, 0, 3]]\nleniency = 2\nleniency_rule = "upstream"\n')
    outputs = {}
    for drafter in ("none", f"cascade:{config}", f"cascade:{upstream}"):
        result = runner.invoke(app, ["generate", "def add(a", "--target", str(saved_target), "--drafter", drafter,
                                     "--max-new-tokens", "24", "--dtype", "float32"])
        assert result.exit_code == 0, result.output
        # the generated text is the first printed line (progress bars of the loaders go elsewhere or later)
        outputs[drafter] = next(line for line in result.output.split("\n") if line.startswith("def add(a"))
    assert outputs["none"] == outputs[f"cascade:{config}"] == outputs[f"cascade:{upstream}"]


def test_layers_keeps_a_draft_models_first_layers(saved_target):
    from draftsmith.drafters.registry import draft_model
    from draftsmith.models import load_model

    target = load_model(str(saved_target))
    full, cut = draft_model(f"model:{saved_target}", target), draft_model(f"model:{saved_target}:layers=1", target)
    assert len(cut.model.layers) == cut.config.num_hidden_layers == 1 < len(full.model.layers)
    # the kept layer is the full model's first: its hidden state after one layer is the same
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        states = full(ids, output_hidden_states=True).hidden_states[1]
        assert torch.allclose(cut.model(ids).last_hidden_state, cut.model.norm(states), atol=1e-5)
    for spec, message in ((f"model:{saved_target}:layers=0", "layers=N keeps the first N"),
                          (f"model:{saved_target}:layers=9", "has only")):
        with pytest.raises(ConfigError, match=message):
            draft_model(spec, target)


def test_student_and_mag_need_a_shipped_file_or_a_path(saved_target):
    from draftsmith.drafters.registry import build_drafter
    from draftsmith.models import load_model

    target = load_model(str(saved_target))
    for spec, command in (("student", "train student"), ("mag", "train bigram"), ("cascade", "train student")):
        with pytest.raises(ConfigError, match=f"no .* ships for target .*draftsmith {command}"):
            build_drafter(spec, target)
