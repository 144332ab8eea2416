"""Training feature heads on a tiny target: shards are built once (and resumed), the loss falls, a killed run
resumes to identical weights, the Medusa tree is chosen from measured accuracy, and the trained folder drafts."""

from __future__ import annotations

import json

import pytest
import torch

from draftsmith.artifacts import SHIPPED_HEADS
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError, ModelLoadError
from draftsmith.heads import load_head
from draftsmith.train.features import FeatureDataConfig, FeatureShards, build_feature_shards
from draftsmith.train.heads import HeadTrainConfig, static_tree, train_head
from draftsmith.train.trainer import TrainConfig, list_checkpoints
from tiny_models import char_tokenizer, hf_greedy, tiny_llama

DATA = FeatureDataConfig(sequences=16, heldout_sequences=8, seq_len=24, prompt_tokens=8, shard_size=8,
                         self_distill=0.5, heldout_percent=25)


class PowerCut(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: OpenMP threads only fight over the cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=6).requires_grad_(False)


def toy_corpus(folder):
    """16 small Python modules of chained assignments: a corpus whose features a tiny head can learn."""
    for i in range(16):
        body = "\n".join(f"    x{j} = x{j - 1} + {i * j % 7}" for j in range(1, 10))
        (folder / f"mod_{i}.py").write_text(f"def f{i}(x0):\n{body}\n    return x9\n")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, target):
    corpus = toy_corpus(tmp_path_factory.mktemp("corpus"))
    folder = tmp_path_factory.mktemp("features")
    config = FeatureDataConfig(**{**DATA.__dict__, "corpus": str(corpus)})
    build_feature_shards(target, char_tokenizer(), config, folder, progress=False)
    return folder, config


def train(out_dir, **overrides) -> TrainConfig:
    settings = dict(out_dir=out_dir, max_steps=40, batch_size=4, lr=3e-3, warmup_steps=2, log_every=5,
                    eval_every=0, checkpoint_every=0, progress=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def test_shards_hold_features_and_resume_without_redoing_work(shards, target, monkeypatch):
    folder, config = shards
    data = FeatureShards(folder)
    assert data.features.shape == (16, 24, target.config.hidden_size) and data.ids.shape == (16, 24)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["done"]) == 3  # two train shards and one held-out
    # a second call finds every shard done: nothing is generated or computed again
    import draftsmith.train.features as features

    monkeypatch.setattr(features, "_shard", lambda *a: pytest.fail("a finished shard was rebuilt"))
    build_feature_shards(target, char_tokenizer(), config, folder, progress=False)
    other = FeatureDataConfig(**{**config.__dict__, "seq_len": 32})
    with pytest.raises(ConfigError, match="other settings"):
        build_feature_shards(target, char_tokenizer(), other, folder, progress=False)


@pytest.mark.parametrize("kind", ["eagle", "medusa", "ctc", "ctc-feed", "ctc-upstream"])
def test_a_tiny_head_learns_and_its_folder_drafts_exactly(shards, target, tmp_path, kind):
    folder, _ = shards
    frames_from = "upstream" if kind.endswith("-upstream") else "chain"
    kind, feed = kind.removesuffix("-feed").removesuffix("-upstream"), kind.endswith("-feed")
    losses = []
    import draftsmith.train.heads as heads_module

    loss = getattr(heads_module, f"{kind}_loss")

    def recording(model, batch, cfg, **options):
        value, metrics = loss(model, batch, cfg, **options)
        losses.append(float(value.detach()))
        return value, metrics

    setattr(heads_module, f"{kind}_loss", recording)
    try:
        head, info = train_head(target, folder, HeadTrainConfig(kind=kind, draft_vocab=0, medusa_heads=2,
                                                                 medusa_tree_nodes=6, noise=0.0, w_ctc=1.0,
                                                                 ctc_feed=feed, ctc_frames_from=frames_from),
                                  train(tmp_path, lr=1e-2, max_steps=60))
    finally:
        setattr(heads_module, f"{kind}_loss", loss)
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    loaded = load_head(tmp_path, target)
    if kind == "medusa":
        assert len(loaded.config.medusa_paths) == 6
    if kind == "ctc":  # held-out: the best alignments spell part of the target's next tokens, blanks included
        assert loaded.config.ctc_frames == 6 and 0 < info["heldout"]["ctc_prefix"] <= 3
        assert loaded.config.ctc_feed == feed and hasattr(loaded, "blank_embedding") == feed
        assert loaded.config.ctc_frames_from == frames_from  # upstream: no frame parameters, the blank a token
        assert hasattr(loaded, "frame_embeddings") == (frames_from == "chain")
        assert 0 < info["heldout"]["ctc_blank_rate"] < 1
    from draftsmith.drafters.registry import build_drafter
    from draftsmith.models import LoadedModel

    drafter = build_drafter(f"{kind}:{tmp_path}", LoadedModel(target, char_tokenizer(), "tiny"))
    prompt = char_tokenizer()("def f3(x0):\n    x1").input_ids
    result = SpecEngine(target, drafter).generate(prompt, GenerationConfig(max_new_tokens=30, k=8))
    assert result.tokens == hf_greedy(target, prompt, 30)


def test_resume_after_a_kill_gives_identical_head_weights(shards, target, tmp_path):
    folder, _ = shards
    import draftsmith.train.heads as heads_module

    real = heads_module.eagle_loss
    settings = dict(max_steps=8, checkpoint_every=3, batch_size=2, grad_accum=2)

    def run(out_dir, resume=False, crash_at_call=None):
        calls = 0

        def maybe_crash(model, batch, cfg, **options):
            nonlocal calls
            calls += 1
            if calls == crash_at_call:
                raise PowerCut
            return real(model, batch, cfg, **options)

        heads_module.eagle_loss = maybe_crash
        try:  # noise on: the RNG state must be restored too, not only weights and data position
            head, _ = train_head(target, folder, HeadTrainConfig(kind="eagle", draft_vocab=20, noise=0.2),
                                 train(out_dir, resume=resume, **settings))
        finally:
            heads_module.eagle_loss = real
        return head.state_dict()

    reference = run(tmp_path / "straight")
    with pytest.raises(PowerCut):
        run(tmp_path / "cut", crash_at_call=2 * 4 + 2)  # in step 5, after the step-3 checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-0000003"]
    resumed = run(tmp_path / "cut", resume=True)
    for name, weight in reference.items():
        assert torch.equal(weight, resumed[name]), name


def test_static_tree_takes_the_most_probable_paths():
    accuracy = torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.3, 0.1]])
    # path values: [0] .6, [1] .2, [0,0] .3, [0,1] .18, [2] .1, [1,0] .1, ...
    assert static_tree(accuracy, 4) == [[0], [1], [0, 0], [0, 1]]


def test_unrolled_training_steps_see_what_a_tree_node_sees_at_decode_time(target):
    """Step d of the training-time test, at anchor a, equals the head run as the drafter runs it: the true pairs
    0..a in its cache, then its own predictions one node per level, each attending the cache and its ancestors."""
    from draftsmith.heads import HeadConfig, TargetParts, build_head
    from draftsmith.train.heads import unrolled_features
    from transformers import DynamicCache

    torch.manual_seed(0)
    head = build_head(HeadConfig.for_target("eagle", target)).eval()
    parts = TargetParts(target, head.draft_to_target, dtype=torch.float32)
    ids = torch.randint(0, target.config.vocab_size, (2, 12))
    features = torch.randn(2, 12, target.config.hidden_size)
    with torch.no_grad():
        steps = unrolled_features(head, parts, ids, features[:, :-1], steps=3)
        for row in range(2):
            for anchor in (0, 4, 8):
                cache = DynamicCache()
                n = anchor + 1  # true pairs 0..anchor at positions 1..anchor+1, causal
                out = head(features[row : row + 1, :n], parts.embed_tokens(ids[row : row + 1, 1 : n + 1]),
                           torch.arange(1, n + 1)[None], None, cache)
                assert torch.allclose(out[0, -1], steps[0][row, anchor], atol=1e-5)
                previous = out[:, -1:]
                for depth in (2, 3):
                    token = ids[row : row + 1, anchor + depth : anchor + depth + 1]
                    previous = head(previous, parts.embed_tokens(token), torch.tensor([[anchor + depth]]),
                                    None, cache)  # one query: it sees the whole cache (true pairs + its path)
                    assert torch.allclose(previous[0, 0], steps[depth - 1][row, anchor], atol=1e-5), (anchor, depth)


def test_an_unrolled_head_learns_its_later_steps(shards, target, tmp_path):
    folder, _ = shards
    head, info = train_head(target, folder, HeadTrainConfig(kind="eagle", draft_vocab=0, noise=0.0, unroll=3),
                            train(tmp_path, lr=1e-2, max_steps=60))
    assert set(info["heldout"]) == {"top1", "top1_step2", "top1_step3"}
    with pytest.raises(ConfigError, match="unroll"):
        HeadTrainConfig(unroll=0)


def test_a_wall_time_budget_stops_training_early_and_saves(shards, target, tmp_path):
    folder, _ = shards
    head, info = train_head(target, folder, HeadTrainConfig(kind="ctc", draft_vocab=0, noise=0.0),
                            train(tmp_path, max_steps=40, max_minutes=1e-9))
    assert info["steps"] == 1  # the budget ran out during the first step: evaluated and saved there
    assert load_head(tmp_path, target).config.kind == "ctc"
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000001"]
    with pytest.raises(ConfigError, match="max_minutes"):
        train(tmp_path, max_minutes=-1)


def test_function_prompts_end_right_after_a_docstring(tmp_path, target):
    from draftsmith.train.features import docstring_ends

    source = ('import os\n\n\ndef f(x):\n    """Add one.\n\n    More.\n    """\n    return x + 1\n\n\nclass A:\n'
              '    def g(self):\n        """One line."""\n        return 2\n\n    def only_doc(self):\n'
              '        """Nothing to write after me."""\n')
    # just past the line closing each docstring; not for a function whose body is only its docstring
    assert [source[:end].split("\n")[-2:] for end in docstring_ends(source)] == [['    """', ''],
                                                                                 ['        """One line."""', '']]
    assert docstring_ends("def broken(:\n") == []
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(source.replace("def f(", f"def f{i}(") * 3)
    config = FeatureDataConfig(**{**DATA.__dict__, "corpus": str(corpus), "self_distill": 1.0, "prompts": "functions",
                                  "heldout_percent": 50})
    build_feature_shards(target, char_tokenizer(), config, tmp_path / "features", progress=False)
    tokenizer = char_tokenizer()
    rows = [row for split in ("train", "heldout") for row in FeatureShards(tmp_path / "features", split).ids.tolist()]
    prompts = {tokenizer.decode(row[: config.prompt_tokens]) for row in rows}
    assert prompts and all(p.endswith('"""\n') for p in prompts), prompts
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "m.py").write_text("def undocumented(x):\n    return x + 1\n" * 20)
    no_docstrings = FeatureDataConfig(**{**config.__dict__, "corpus": str(bare), "heldout_sequences": 0,
                                         "heldout_percent": 0})
    with pytest.raises(ConfigError, match="no function in the corpus has a docstring"):
        build_feature_shards(target, char_tokenizer(), no_docstrings, tmp_path / "none", progress=False)
    with pytest.raises(ConfigError, match="prompts must be one of"):
        FeatureDataConfig(prompts="docstrings")


def test_fine_tuning_starts_from_the_given_head_and_keeps_its_vocabulary(shards, target, tmp_path):
    folder, _ = shards
    import draftsmith.train.heads as heads_module

    first_losses = {}
    real = heads_module.eagle_loss

    def run(name, cfg, steps):
        def recording(model, batch, cfg, **options):
            value, metrics = real(model, batch, cfg, **options)
            if model.training:
                first_losses.setdefault(name, float(value.detach()))
            return value, metrics

        heads_module.eagle_loss = recording
        try:
            return train_head(target, folder, cfg, train(tmp_path / name, lr=1e-2, max_steps=steps))
        finally:
            heads_module.eagle_loss = real

    base, _ = run("base", HeadTrainConfig(kind="eagle", draft_vocab=20, noise=0.0), 60)
    tuned, info = run("tuned", HeadTrainConfig(kind="eagle", draft_vocab=0, noise=0.0, init_from=str(tmp_path / "base")), 5)
    assert torch.equal(tuned.draft_to_target, base.draft_to_target)  # 20 tokens kept, not the whole vocabulary
    assert first_losses["tuned"] < 0.8 * first_losses["base"], first_losses  # it starts where the base ended
    assert info["init_from"] == str(tmp_path / "base") and info["init_training"]["steps"] == 60
    assert info["heldout_init"] == pytest.approx(base.config.training["heldout"])  # measured before fine-tuning
    with pytest.raises(ConfigError, match="holds a eagle head, not medusa"):
        train_head(target, folder, HeadTrainConfig(kind="medusa", init_from=str(tmp_path / "base")), train(tmp_path / "m"))


@pytest.mark.parametrize("flags, error, message", [
    (["--kind", "medusa", "--init-from", str(SHIPPED_HEADS / "smollm2-eagle")], ConfigError,
     "holds a eagle head, not medusa"),
    (["--init-from", "/nonexistent/head"], ModelLoadError, "is not a head folder"),
    (["--kind", "eagle", "--target", "elsewhere/model", "--init-from", "eagle"], ConfigError,
     "no eagle head ships for target"),
    (["--routers", "runs/router"], ConfigError, "--routers are for --features sparse"),  # would be ignored
    (["--kind", "eagle3", "--features", "sparse"], ConfigError, "eagle3 reads dense layer features"),
])
def test_a_bad_head_to_fine_tune_is_refused_before_any_data_is_built(flags, error, message, tmp_path):
    from typer.testing import CliRunner

    from draftsmith.cli.main import app

    result = CliRunner().invoke(app, ["train", "heads", "--out", str(tmp_path / "out"), *flags])
    assert isinstance(result.exception, error), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "features-model").exists() and not (tmp_path / "features-smollm2").exists()


def test_data_only_builds_the_shards_a_later_run_reuses_and_trains_no_head(tmp_path):
    from typer.testing import CliRunner

    from draftsmith.cli.main import app
    from serve_helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(60):  # a held-out share of the files too
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 100)
    flags = ["train", "heads", "--target", str(model), "--corpus", str(corpus), "--out", str(tmp_path / "head"),
             "--sequences", "8", "--shard-size", "4", "--seq-len", "24", "--prompt-tokens", "8",
             "--code-sequences", "0", "--self-distill", "0.5", "--device", "cpu"]
    result = CliRunner().invoke(app, [*flags, "--data-only"])
    assert result.exit_code == 0, result.output
    shards = sorted((tmp_path / "features-model" / "train").glob("shard-*.safetensors"))
    assert len(shards) == 2 and not (tmp_path / "head").exists()
    stamps = [p.stat().st_mtime_ns for p in shards]
    result = CliRunner().invoke(app, [*flags, "--steps", "2", "--batch-size", "4", "--eval-every", "0",
                                      "--checkpoint-every", "0"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "head" / "head.safetensors").is_file()
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # reused, not rebuilt
