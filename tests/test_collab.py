"""Collaborative domain code completion (issue 17): domains, LoRA fine-tuning, feature collection, the classifier,
the collaborative and BiLD rules, and the collab benchmark workload, on tiny random models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.bench.linecomplete import LineCaseConfig, build_cases, rest_cuts
from draftsmith.backends.factory import cached_lm
from draftsmith.collab.classifier import CollabClassifier, balanced, train_classifier
from draftsmith.collab.collect import Collected, collect_case
from draftsmith.collab.domains import SplitConfig, completion_cases, resolve_domain, split_documents
from draftsmith.collab.features import FEATURES, SCALARS, ContextIndex, CorpusIndex, FeatureBuilder, token_texts
from draftsmith.collab.finetune import CompletionExamples
from draftsmith.collab.rule import BildRule, CollabRule, line_end_ids
from draftsmith.data.corpus import CodeDocument, load_corpus
from draftsmith.drafters.model import ModelDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from tiny_models import char_tokenizer, hf_greedy, tiny_llama

CONTEXT = "import os\n\ndef load(path):\n    data = read(path)\n    value = data.get('x')\n    return value\n\ndef save(pa"


def write_domain(folder, files: int = 9) -> None:
    folder.mkdir()
    for f in range(files):
        body = "".join(f"def handler_{f}_{i}(request, value):\n    result = compute(value, {i})\n    return result + {i}\n\n"
                       for i in range(12))
        (folder / f"module_{f}.py").write_text(f"import os\nfrom base import compute\n\n{body}")


def favouring(model, tokenizer, char: str, text: str, scale: float = 4.0):
    """The model made to predict `char` at most positions of `text` (its output row turned towards the mean
    final hidden state): two such models, favouring different characters, are each right where the other is
    not, which random models almost never are."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([tokenizer(text).input_ids[:300]])).last_hidden_state[0].mean(0)
        row = tokenizer.convert_tokens_to_ids(char)
        model.lm_head.weight[row] = scale * model.lm_head.weight.norm(dim=1).mean() * hidden / hidden.norm()
    return model


class Recording(torch.nn.Module):
    """A classifier that answers a fixed probability and records what it was asked."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.seen = p, []

    def probability(self, large_hidden, small_hidden, scalars):
        self.seen.append((large_hidden[0].clone(), small_hidden[0].clone(), scalars[0].clone()))
        return torch.full((len(scalars),), self.p)


def collab_engine(large, small, tokenizer, p: float, threshold: float, corpus=None):
    drafter = ModelDrafter(small, vocab_size=large.config.vocab_size, keep_features=True)
    classifier = Recording(p)
    rule = CollabRule(classifier, FeatureBuilder(token_texts(tokenizer), corpus), drafter, tokenizer, threshold)
    return SpecEngine(large, drafter, rule=rule), classifier


def test_feature_count_is_57():
    assert FEATURES == 57 and len(SCALARS) == 25


def test_features_are_the_same_at_collection_and_at_decoding():
    """Decoding with a classifier that always answers 'large' emits the large model's greedy text; teacher-forcing
    collection over that text keeps exactly the positions where the classifier was asked (the large model right,
    the small one not), and computes the same features there."""
    tokenizer, large, small = char_tokenizer(), tiny_llama(seed=0), tiny_llama(seed=1)
    corpus = CorpusIndex([CodeDocument("a.py", "def save(path, data):\n    write(path, data)\n    return path\n")])
    engine, classifier = collab_engine(large, small, tokenizer, p=0.0, threshold=0.5, corpus=corpus)
    prompt = tokenizer(CONTEXT).input_ids
    # the last token of a request is never drafted (no budget left): collect over the ones before it
    result = engine.generate(prompt, GenerationConfig(max_new_tokens=17, k=4))
    assert result.tokens == hf_greedy(large, prompt, 17)
    assert classifier.seen, "the small model never disagreed: the test proves nothing"

    builder = FeatureBuilder(token_texts(tokenizer), corpus)
    rows, counts = collect_case(cached_lm(large), cached_lm(small), builder, tokenizer, CONTEXT,
                                tokenizer.decode(result.tokens[:16]), 48, large.config.vocab_size)
    assert counts["positions"] == counts["large_right"] == 16  # the text is the large model's own greedy one
    assert counts["mismatches"] == len(rows) == len(classifier.seen)
    for (large_h, small_h, scalars, label), (seen_l, seen_s, seen_scalars) in zip(rows, classifier.seen):
        assert label == 0.0
        torch.testing.assert_close(large_h, seen_l, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(small_h, seen_s, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(scalars, seen_scalars.numpy(), atol=1e-4, rtol=1e-4)


def test_threshold_one_is_lossless_speculative_decoding():
    tokenizer, large, small = char_tokenizer(), tiny_llama(seed=0), tiny_llama(seed=1)
    engine, classifier = collab_engine(large, small, tokenizer, p=1.0, threshold=1.0)  # the classifier says "keep"
    prompt = tokenizer(CONTEXT).input_ids
    assert engine.generate(prompt, GenerationConfig(max_new_tokens=24, k=4)).tokens == hf_greedy(large, prompt, 24)
    assert not classifier.seen  # threshold 1 never needs it


def test_kept_small_tokens_then_the_large_models_bonus_token():
    """A classifier that always keeps the small token: each step emits the small model's chain of k tokens, then
    the large model's own next token (the bonus token is kept, not thrown away)."""
    tokenizer, large, small = char_tokenizer(), tiny_llama(seed=0), tiny_llama(seed=1)
    engine, _ = collab_engine(large, small, tokenizer, p=1.0, threshold=0.5)
    prompt = tokenizer(CONTEXT).input_ids
    out = engine.generate(prompt, GenerationConfig(max_new_tokens=5, k=4, stop_on_eos=False)).tokens
    assert out[:4] == hf_greedy(small, prompt, 4)
    assert out[4] == hf_greedy(large, prompt + out[:4], 1)[0]
    assert engine.rule.statistics()["classifier_kept_small"] >= 1


def test_collab_rule_refuses_sampling():
    tokenizer, large, small = char_tokenizer(), tiny_llama(seed=0), tiny_llama(seed=1)
    engine, _ = collab_engine(large, small, tokenizer, p=1.0, threshold=0.5)
    with pytest.raises(ConfigError, match="greedy"):
        engine.generate([5, 6], GenerationConfig(max_new_tokens=4, sampling=SamplingConfig(temperature=1.0)))


def test_bild_rollback_zero_is_greedy_and_infinite_keeps_the_draft():
    large, small = tiny_llama(seed=0), tiny_llama(seed=1)
    prompt = char_tokenizer()(CONTEXT).input_ids
    strict = SpecEngine(large, ModelDrafter(small, confidence=0.0), rule=BildRule(rollback=0.0))
    assert strict.generate(prompt, GenerationConfig(max_new_tokens=20, k=4)).tokens == hf_greedy(large, prompt, 20)
    lenient = SpecEngine(large, ModelDrafter(small), rule=BildRule(rollback=math.inf))
    out = lenient.generate(prompt, GenerationConfig(max_new_tokens=5, k=4, stop_on_eos=False)).tokens
    assert out[:4] == hf_greedy(small, prompt, 4)


def test_bild_fallback_stops_drafting_at_a_low_confidence_token():
    small = tiny_llama(seed=1)
    prompt = char_tokenizer()(CONTEXT).input_ids
    everything = ModelDrafter(small, confidence=1.01)  # no token reaches it: one token per draft
    everything.reset(prompt, SamplingConfig(), torch.Generator())
    assert len(everything.propose(prompt, 6).tokens) == 1
    never = ModelDrafter(small, confidence=0.0)
    never.reset(prompt, SamplingConfig(), torch.Generator())
    assert len(never.propose(prompt, 6).tokens) == 6


def test_completion_stops_at_the_end_of_the_line():
    tokenizer, large = char_tokenizer(), tiny_llama(seed=0)
    prompt = tokenizer(CONTEXT).input_ids
    greedy = hf_greedy(large, prompt, 12)
    cut = next(i for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    result = SpecEngine(large).generate(prompt, GenerationConfig(max_new_tokens=12, k=0, end_ids=frozenset({greedy[cut]})))
    assert result.tokens == greedy[: cut + 1] and result.finish_reason == "stop"
    assert line_end_ids(tokenizer) == frozenset({tokenizer.convert_tokens_to_ids("\n")})


def test_classifier_separates_a_synthetic_set_and_smote_balances_it():
    gen = torch.Generator().manual_seed(0)
    n = 600
    labels = (torch.rand(n, generator=gen) < 0.15).float()
    scalars = torch.randn(n, len(SCALARS), generator=gen)
    scalars[:, 10] += 3 * labels  # one feature tells the classes apart
    data = Collected(torch.randn(n, 8, generator=gen), torch.randn(n, 4, generator=gen), scalars, labels,
                     torch.arange(n) // 3, 0, 0)
    x, y = balanced(torch.cat([data.large_hidden, data.small_hidden, scalars], 1).numpy(), labels.numpy(), 0)
    assert (y == 1).sum() == (y == 0).sum() == (labels == 0).sum()
    model, summary = train_classifier(data)
    assert isinstance(model, CollabClassifier)
    assert summary["validation"]["auc"] > 0.9 and summary["validation"]["accuracy"] > 0.85


def test_domain_split_is_disjoint_deterministic_and_cases_cut_inside_lines(tmp_path):
    write_domain(tmp_path / "dom")
    domain = resolve_domain(tmp_path / "dom")
    parts = split_documents(load_corpus(domain.source))
    names = [{d.name for d in docs} for docs in parts.values()]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == 9
    cases = completion_cases(domain, "test", 20)
    assert cases == completion_cases(domain, "test", 20) and {c.document for c in cases} <= names[2]
    for case in cases:
        line_start = case.context[case.context.rfind("\n") + 1 :]
        text = (tmp_path / "dom" / case.document).read_text()
        assert (case.context + case.target + "\n") in text and "\n" not in case.target
        assert len(line_start) in rest_cuts(line_start + case.target, 4)
    with pytest.raises(ConfigError, match="neither a folder"):
        resolve_domain("no_such_package_here")
    with pytest.raises(ConfigError, match="at least 3 files"):
        split_documents([CodeDocument("a", "x"), CodeDocument("b", "y")])
    with pytest.raises(ConfigError, match="leave room"):
        SplitConfig(finetune=0.9, classifier=0.1)


def test_rest_cuts_never_split_an_identifier_or_follow_a_space():
    line = "    total = compute(value, 3)"
    for cut in rest_cuts(line, 2):
        assert line[cut - 1] != " " or cut == 4
        assert not (line[cut - 1].isalnum() and line[cut].isalnum())


def test_completion_examples_train_only_on_the_completion_and_eos():
    tokenizer = char_tokenizer()
    cases = build_cases(LineCaseConfig(num_cases=3, mode="rest", min_context_chars=10),
                        docs=[CodeDocument("a.py", CONTEXT + "th):\n    write(path)\n" * 3)])
    data = CompletionExamples(cases, tokenizer, context_tokens=40, completion_tokens=30)
    for i, case in enumerate(cases):
        labelled = data.labels[i][data.labels[i] != -100].tolist()
        assert labelled == tokenizer(case.target).input_ids + [tokenizer.eos_token_id]


def test_corpus_index_answers_like_a_scan():
    docs = [CodeDocument("a.py", "x = 1\ny = compute(x)\nreturn y\nx = 2\ny = compute(x, 2)\n")]
    index = CorpusIndex(docs)
    statements = [s.strip() for s in docs[0].text.split("\n") if s.strip()]
    assert index.prefix_count("y = compute") == sum(s.startswith("y = compute") for s in statements) == 2
    assert index.after("x = 2", "y = compute(x,") == 1
    context = ContextIndex.of("a = 1\nb = 2\nc = a + b\nd", [1, 2, 3])
    assert context.statements == ["a = 1", "b = 2", "c = a + b"] and context.last == "c = a + b"


@pytest.mark.parametrize("max_postings", [50, 150, 10_000])  # the first word alone, a few words, every word
def test_corpus_neighbours_equal_jaccard_over_the_rarest_words_postings(max_postings):
    """The numpy count gives exactly the (Jaccard, index) list of scoring each candidate's word set: candidates
    from the rarest query words' postings until max_postings, best first, later statements first on ties."""
    import random

    from draftsmith.collab.features import TOP, jaccard, words

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)] + ["self", "x"]
    lines = [" ".join(rng.choices(vocab, k=rng.randint(1, 8))) for _ in range(600)]
    index = CorpusIndex([CodeDocument("c.py", "\n".join(lines))], max_postings=max_postings)
    for trial in range(40):
        query = set(words(" ".join(rng.choices(vocab + ["absent"], k=rng.randint(1, 6)))))
        seen: set[int] = set()
        for w in sorted(query, key=lambda w: len(index.postings.get(w, ()))):
            seen.update(index.postings[w].tolist() if w in index.postings else ())
            if len(seen) >= index.max_postings:
                break
        expected = sorted(((jaccard(query, index.word_sets[i]), i) for i in seen), reverse=True)[:TOP]
        assert index.neighbours(query) == expected


@pytest.fixture(scope="module")
def collab_folder(tmp_path_factory):
    """finetune -> collect -> train-classifier on a tiny model pair, through the commands' own functions."""
    from draftsmith.collab.classifier import ClassifierConfig, save_classifier
    from draftsmith.collab.collect import CollectConfig, collect, save_collected
    from draftsmith.collab.finetune import FinetuneConfig, finetune, load_small
    from draftsmith.models import LoadedModel
    from draftsmith.train.trainer import TrainConfig

    root = tmp_path_factory.mktemp("collab")
    write_domain(root / "dom")
    tokenizer = char_tokenizer()
    small_dir = root / "small"
    text = (root / "dom" / "module_0.py").read_text()
    favouring(tiny_llama(seed=1), tokenizer, "e", text).save_pretrained(small_dir)
    tokenizer.save_pretrained(small_dir)
    target = LoadedModel(favouring(tiny_llama(seed=0), tokenizer, " ", text), tokenizer, "tiny")
    domain = resolve_domain(root / "dom")
    out = root / "dom-collab"
    config = FinetuneConfig(small=f"model:{small_dir}", examples=32, heldout_examples=8, context_tokens=64,
                            completion_tokens=24)
    train = TrainConfig(out_dir=out, max_steps=3, batch_size=4, lr=1e-2, warmup_steps=1, progress=False,
                        eval_every=0, checkpoint_every=0)
    summary = finetune(target, domain, config, train)
    small = load_small(out, target)
    data = collect(target, small, domain, CollectConfig(cases=40, context_chars=300), progress=False)
    save_collected(data, out, {"domain": domain.name})
    model, info = train_classifier(data, ClassifierConfig(max_epochs=3, balance="weights"))
    save_classifier(model, out, info)
    return target, out, summary, domain


def test_finetune_saves_an_adapter_that_loads_merged(collab_folder):
    from draftsmith.collab.finetune import load_small
    from draftsmith.drafters.registry import draft_model

    target, out, summary, _ = collab_folder
    assert (out / "adapter_model.safetensors").is_file() and summary["step"] == 3
    assert summary["heldout"]["ce"] != summary["heldout_untrained"]["ce"]
    merged = load_small(out, target)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    via_spec = draft_model(f"model:{out}", target)  # --drafter model:DIR takes a fine-tuned folder too
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(merged(ids).logits, via_spec(ids).logits)
    base = draft_model(f"model:{out.parent / 'small'}", target)
    assert not torch.allclose(base(ids).logits, merged(ids).logits)
    meta = json.loads((out / "collab.json").read_text())
    assert meta["small"].startswith("model:") and meta["finetune"]["rank"] == 8


def test_an_adapter_is_refused_on_another_version_of_its_small_model(collab_folder, tmp_path):
    """The folder names its small model by spec; if the weights behind that spec change (a re-trained
    student), the adapter no longer fits them and loading says so instead of drafting nonsense."""
    import shutil

    from draftsmith.collab.finetune import load_small

    target, out, _, _ = collab_folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "collab.json").read_text())
    small_dir = tmp_path / "retrained"
    tiny_llama(seed=7).save_pretrained(small_dir)  # same shape and vocabulary, other weights
    char_tokenizer().save_pretrained(small_dir)
    (copy / "collab.json").write_text(json.dumps({**meta, "small": f"model:{small_dir}"}))
    with pytest.raises(ConfigError, match="another version of 'model:.*retrained'.*collab finetune --small"):
        load_small(copy, target)


def test_collab_benchmark_runs_every_method_per_domain(collab_folder, tmp_path):
    from draftsmith.bench.config import BenchConfig
    from draftsmith.bench.runner import run_bench

    target, out, _, domain = collab_folder
    methods = ["plain", f"small:{out}", f"small-draft:{out}:k=4", f"bild:{out}:k=4,fallback=0.3,rollback=1.5",
               f"collab:{out}:k=4,threshold=0.5", f"collab:{out}:k=4,threshold=1"]
    config = BenchConfig(target="tiny", workload=f"collab:{domain.source}", methods=methods, limit=3,
                         max_new_tokens=24, out=str(tmp_path / "bench"))
    result = run_bench(config, target=target)
    report = json.loads(result.paths["collab_json"].read_text())
    table = report["lines"]
    assert list(table) == [domain.name, "overall"] and list(table["overall"]) == methods  # run order, overall last
    assert table["overall"][f"small:{out}"]["large_calls_per_line"] == 0
    assert table["overall"]["plain"]["large_calls_per_line"] > 1
    summaries = {s.method: s for s in result.summaries}
    for lossless in (f"small-draft:{out}:k=4", f"collab:{out}:k=4,threshold=1"):  # equal to large greedy
        assert summaries[lossless].exactness == 1.0
        assert table["overall"][lossless]["same_as_large"] == 100
    never_asked = table["overall"][f"collab:{out}:k=4,threshold=1"]  # threshold 1 never consults the classifier
    assert never_asked["disagreements_per_line"] is None and never_asked["classifier_kept"] is None
    drafted = table["overall"][f"small-draft:{out}:k=4"]
    assert 0 <= drafted["small_kept"] <= 1 and table["overall"]["plain"]["small_kept"] is None
    # why the rules behave as they do: the folder's own held-out scores, as its commands recorded them
    recorded = json.loads((out / "classifier.json").read_text())["validation"]
    folder = report["folders"][domain.name][str(out)]
    assert folder["classifier_auc"] == recorded["auc"] and 0 <= folder["small_accuracy"] <= 1
    assert "clf AUC" in result.paths["collab_markdown"].read_text()
    assert result.paths["collab_plot"].is_file()


def test_collab_workload_refuses_other_methods(collab_folder, tmp_path):
    from draftsmith.bench.config import BenchConfig
    from draftsmith.bench.runner import run_bench

    target, _, _, domain = collab_folder
    config = BenchConfig(target="tiny", workload=f"collab:{domain.source}", methods=["plain", "ngram"], limit=2)
    with pytest.raises(ConfigError, match="do not run on the collab workload"):
        run_bench(config, target=target)


@pytest.mark.parametrize("args, message", [
    (["collab", "finetune", "--domain", "no_such_package_here"], "neither a folder"),
    (["collab", "complete", "--method", "nope", "x = "], "unknown method 'nope'"),
    (["collab", "train-classifier", "--out", "{tmp}"], "no collected features"),
])
def test_collab_commands_refuse_bad_input_before_loading_a_model(args, message, tmp_path, capsys, monkeypatch):
    import sys

    from draftsmith.cli.main import main

    monkeypatch.setattr(sys, "argv", ["draftsmith"] + [a.replace("{tmp}", str(tmp_path)) for a in args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_collab_method_options_take_decimals_and_refuse_bad_ones():
    from draftsmith.bench.config import parse_method

    spec = parse_method("collab:runs/x:k=8,threshold=0.75")
    assert spec.arg == "runs/x" and spec.options == {"k": 8, "threshold": 0.75}
    assert parse_method("bild:k=4,fallback=0.4,rollback=2.5").options == {"k": 4, "fallback": 0.4, "rollback": 2.5}
    with pytest.raises(ConfigError, match="bad option 'threshold=high'"):
        parse_method("collab:threshold=high")
    with pytest.raises(ConfigError, match="bad option 'k=1.5'"):
        parse_method("collab:k=1.5")
    tokenizer, small = char_tokenizer(), tiny_llama(seed=1)
    with pytest.raises(ConfigError, match=r"threshold must be in \[0, 1\]"):
        CollabRule(Recording(0.5), FeatureBuilder(token_texts(tokenizer), None), ModelDrafter(small), tokenizer, 1.5)


def test_a_collab_folder_from_another_machine_finds_its_domain_by_name(tmp_path):
    from draftsmith.collab.rule import folder_domain

    (tmp_path / "collab.json").write_text(json.dumps({"small": "student", "domain": "click",
                                                      "source": "/elsewhere/site-packages/click", "split": {}}))
    domain, _ = folder_domain(tmp_path)
    assert domain == resolve_domain("click") and domain.source.is_dir()
