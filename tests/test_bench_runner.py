"""The bench runner on a tiny model: interleaved order, records, metric arithmetic by hand, exactness, files, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from draftsmith.bench.config import BenchConfig, parse_method, split_methods
from draftsmith.bench.linecomplete import LineCase, cut_completion, edit_similarity, exact_match
from draftsmith.bench.runner import Method, Output, build_method, run_bench, run_interleaved
from draftsmith.bench.workloads import Task
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel, has_fast_bf16
from test_errors import saved_target  # noqa: F401  (the tiny model saved to a folder; belongs in conftest.py)
from tiny_models import char_tokenizer, tiny_llama

METHODS = ["hf-greedy", "plain", "ngram:k=4"]
NEW = 16


def line_task(i: int) -> Task:
    context = f"def scale_{i}(values):\n    out = []\n    for v in values:\n        out.append(v * {i})\n"
    case = LineCase(case_id=f"m.py:{i}", document="m.py", line=5, context=context, target="    return out")
    return Task(case.case_id, context, case=case)


@pytest.fixture(scope="module")
def target():
    return LoadedModel(tiny_llama(seed=1), char_tokenizer(), "tiny")


@pytest.fixture(scope="module")
def result(target, tmp_path_factory):
    config = BenchConfig(target="tiny", workload="lines", methods=METHODS, limit=3, max_new_tokens=NEW,
                         out=str(tmp_path_factory.mktemp("bench") / "out"))
    return run_bench(config, target=target, tasks=[line_task(i) for i in range(3)])


def test_warm_up_then_rotating_order():
    log = []

    def fake(name):
        return Method(name, lambda ids: log.append((name, ids[0])) or Output([1, 2], 0.5, 2))

    calls = run_interleaved([fake("A"), fake("B"), fake("C")], [("p0", [10]), ("p1", [11]), ("p2", [12])])
    assert log == [("A", 10), ("B", 10), ("C", 10),  # warm-up on the first prompt, dropped
                   ("A", 10), ("B", 10), ("C", 10), ("B", 11), ("C", 11), ("A", 11), ("C", 12), ("A", 12), ("B", 12)]
    assert [(c.method, c.task_id, c.position) for c in calls][3:6] == [("B", "p1", 0), ("C", "p1", 1), ("A", "p1", 2)]
    assert len(calls) == 9


def test_one_record_per_method_and_prompt_in_rotating_order(result):
    records = result.records
    assert sorted((r.method, r.prompt_id) for r in records) == sorted(
        (m, f"m.py:{i}") for m in METHODS for i in range(3))
    for i in range(3):  # prompt i runs the methods rotated left by i
        order = sorted((r for r in records if r.prompt_id == f"m.py:{i}"), key=lambda r: r.position)
        assert [r.method for r in order] == METHODS[i:] + METHODS[:i]


def test_speed_metrics_by_hand(result):
    by = {s.method: s for s in result.summaries}
    rec = {(r.method, r.prompt_id): r for r in result.records}
    prompts = [f"m.py:{i}" for i in range(3)]
    for method in METHODS:
        mine = [rec[method, p] for p in prompts]
        base = [rec["hf-greedy", p] for p in prompts]
        s = by[method]
        assert all(r.new_tokens == len(r.output_tokens) > 0 for r in mine)
        assert s.tokens_per_s == pytest.approx(sum(r.new_tokens for r in mine) / sum(r.seconds for r in mine))
        assert s.speedup == pytest.approx(sum(r.seconds for r in base) / sum(r.seconds for r in mine))
        assert s.speedup_per_prompt == pytest.approx(sum(b.seconds / m.seconds for b, m in zip(base, mine)) / 3)
        assert s.tau == pytest.approx(sum(r.new_tokens for r in mine) / sum(r.target_steps for r in mine))
    assert by["hf-greedy"].tau == 1.0 and by["plain"].tau == 1.0  # one token per target forward
    ngram = [rec["ngram:k=4", p] for p in prompts]
    proposed = sum(r.proposed for r in ngram)
    assert proposed > 0 and by["ngram:k=4"].acceptance == pytest.approx(sum(r.accepted for r in ngram) / proposed)
    assert by["plain"].draft_ms_per_step is not None and by["hf-greedy"].draft_ms_per_step is None
    assert all(r.peak_memory_mb and r.peak_memory_mb > 0 for r in result.records)


def test_lossless_methods_match_hf_greedy_and_line_scores(result, target):
    by = {s.method: s for s in result.summaries}
    assert by["plain"].exactness == 1.0 and by["ngram:k=4"].exactness == 1.0
    greedy = {r.prompt_id: r.output_tokens for r in result.records if r.method == "hf-greedy"}
    assert all(r.output_tokens == greedy[r.prompt_id] for r in result.records)
    for r in result.records:
        text = target.tokenizer.decode(r.output_tokens, skip_special_tokens=True)
        assert r.completion == cut_completion(text, "line")
        assert r.exact_match == exact_match(r.completion, "    return out")
        assert r.edit_similarity == pytest.approx(edit_similarity(r.completion, "    return out"))


def test_report_files(result):
    paths = result.paths
    data = json.loads(paths["json"].read_text())
    assert len(data["records"]) == 9 and [s["method"] for s in data["summaries"]] == METHODS
    assert {r["method"] for r in data["records"]} == set(METHODS)
    meta = data["metadata"]
    for key in ("model", "device", "dtype", "torch", "transformers", "cpu", "command", "date", "peak_memory"):
        assert meta[key], key
    assert meta["baseline"] == meta["reference"] == "hf-greedy" and meta["warmup_prompt"] == "m.py:0"
    # which weight format each lean method ran (timed per machine): named in the report, HF's methods have none
    assert set(meta["weight_formats"]) == {"plain", "ngram:k=4"} and all(meta["weight_formats"].values())
    md = paths["markdown"].read_text()
    assert "| ngram:k=4 | 3 |" in md and "Peak MB:" in md and "Weight formats" in md
    for name in ("speedup", "tau", "tokens_per_s"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hf_reference_methods_agree_with_greedy(saved_target):
    from draftsmith.models import load_model

    target = load_model(str(saved_target))
    ids = target.encode("def f(x):\n    return x + x\n\ndef g(x):\n    return")
    outputs = {spec: build_method(spec, target, 12).generate(ids) for spec in
               ("hf-greedy", "hf-prompt-lookup:3", f"hf-assisted:{saved_target}")}
    greedy = outputs["hf-greedy"]
    assert greedy.target_steps == len(greedy.tokens) == 12
    for out in outputs.values():
        assert out.tokens == greedy.tokens and out.seconds > 0 and out.stats is None


def test_method_list_keeps_options_with_their_method():
    assert split_methods("hf-greedy, ngram:k=16,adaptive=1@bf16,plain,model:/a/b:k=4,adaptive=1") == [
        "hf-greedy", "ngram:k=16,adaptive=1@bf16", "plain", "model:/a/b:k=4,adaptive=1"]
    assert split_methods("plain,cascade:4,2/0,3:k=6,mag") == ["plain", "cascade:4,2/0,3:k=6", "mag"]


def test_method_specs():
    assert parse_method("model:/a/b:k=4").arg == "/a/b" and parse_method("model:/a/b:k=4").options == {"k": 4}
    assert parse_method("ngram:k=8,max_n=3:adaptive=1").options == {"k": 8, "max_n": 3, "adaptive": 1}
    assert parse_method("hf-prompt-lookup").arg is None and parse_method("hf-prompt-lookup:10").arg == "10"
    cascade = parse_method("cascade:4,2/0,3:k=6")
    assert (cascade.kind, cascade.arg, cascade.options) == ("cascade", "4,2/0,3", {"k": 6})
    assert parse_method("student").arg is None and parse_method("mag:t.safetensors:k=5").arg == "t.safetensors"


def test_lossy_sparse_methods_take_a_routers_folder(tmp_path):
    spec = parse_method(f"eagle:lossy_sparse=1,routers={tmp_path}")
    assert spec.options == {"lossy_sparse": 1, "routers": str(tmp_path)}
    with pytest.raises(ConfigError, match="add lossy_sparse=1"):
        parse_method(f"plain:routers={tmp_path}")  # routers only change the lossy verifier
    with pytest.raises(ConfigError, match="not a folder of trained routers"):
        parse_method(f"plain:lossy_sparse=1,routers={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="bad option 'routers"):
        parse_method(f"ngram:routers={tmp_path}")


@pytest.mark.parametrize("kwargs, message", [
    ({"limit": 0}, "limit must be >= 1"),
    ({"workload": "poetry"}, "unknown workload 'poetry'"),
    ({"methods": ["plain", "lookahead"]}, "unknown method 'lookahead'"),
    ({"methods": ["ngram:q=3"]}, "bad option 'q=3'"),
    ({"methods": ["ngram:k=0"]}, "k must be >= 1"),
    ({"methods": ["model"]}, "needs a draft model"),
    ({"methods": ["plain", "plain"]}, "listed twice"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BenchConfig(**kwargs)


def test_cli_bad_method_is_reported_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "draftsmith.cli", "bench", "--methods", "plain,bogus:3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown method 'bogus:3'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bench_on_humaneval_with_pass_at_1(saved_target, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "draftsmith.cli", "bench", "--target", str(saved_target), "--limit", "2",
         "--max-new-tokens", "8", "--methods", "hf-greedy,plain,ngram:k=3", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| ngram:k=3 | 2 |" in proc.stdout and str(tmp_path / "out" / "report.json") in proc.stdout
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(data["records"]) == 6 and {r["prompt_id"] for r in data["records"]} == {"HumanEval/0", "HumanEval/1"}
    assert all(r["passed"] is False for r in data["records"])  # a random model's body fails the tests
    assert data["summaries"][1]["exactness"] == 1.0 and data["metadata"]["workload"] == "humaneval"


def test_demo_runs_the_bench_runner(saved_target, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "draftsmith.cli", "demo", "--target", str(saved_target), "--prompts", "1",
         "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    reports = list(tmp_path.glob("bench-results/*/report.json"))
    assert len(reports) == 1
    data = json.loads(reports[0].read_text())
    fp32 = ["hf-greedy", "hf-prompt-lookup:10", "plain", "ngram:k=16,adaptive=1"]
    with_bf16 = has_fast_bf16(torch.device("cpu"))  # then every method runs in bf16 too
    assert data["metadata"]["methods"] == fp32 + ([f"{m}@bf16" for m in fp32] if with_bf16 else [])
    assert data["metadata"]["pass_at_1"] and "| ngram:k=16,adaptive=1 | 1 |" in proc.stdout


def test_methods_in_another_dtype_are_compared_within_their_dtype(saved_target, tmp_path):
    config = BenchConfig(target=str(saved_target), workload="lines", limit=2, max_new_tokens=8,
                         methods=["hf-greedy", "plain", "hf-greedy@bf16", "ngram:k=3@bf16"], out=str(tmp_path))
    result = run_bench(config)
    by = {s.method: s for s in result.summaries}
    bf16_greedy = {r.prompt_id: r.output_tokens for r in result.records if r.method == "hf-greedy@bf16"}
    ngram = [r for r in result.records if r.method == "ngram:k=3@bf16"]
    # agreement measured against bf16 greedy (bf16 rounds differently by kernel and batch size, so it may
    # be below 1), and a speedup against it beside the one against fp32 greedy
    agreement = sum(r.output_tokens == bf16_greedy[r.prompt_id] for r in ngram) / len(ngram)
    assert by["ngram:k=3@bf16"].exactness == agreement and by["plain"].exactness == 1.0
    bf16_seconds = sum(r.seconds for r in result.records if r.method == "hf-greedy@bf16")
    assert by["ngram:k=3@bf16"].speedup_same_dtype == pytest.approx(bf16_seconds / sum(r.seconds for r in ngram))
    assert by["plain"].speedup_same_dtype == pytest.approx(by["plain"].speedup)  # fp32: the baseline itself
    floors = result.metadata["weight_read_floor"]  # bf16 weights are half the bytes: twice the floor
    assert floors["bfloat16"]["floor_tokens_per_s"] == pytest.approx(2 * floors["float32"]["floor_tokens_per_s"])
    assert "Weight-read floor" in result.notes
    assert "its agreement with greedy decoding in the same dtype" in result.notes  # and why it can be < 100%


def test_without_the_llamacpp_extra_its_methods_say_how_to_install_it(target, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    for spec in ("llamacpp", "llamacpp-lookup:4", "plain:llamacpp=1"):
        with pytest.raises(ConfigError, match=r"pip install \"draftsmith\[llamacpp\]\""):
            build_method(spec, LoadedModel(target.model, target.tokenizer, "smollm2"), NEW)
    config = BenchConfig(target="tiny", workload="lines", methods=["plain"], limit=1, max_new_tokens=4,
                         out=str(tmp_path / "out"))
    assert run_bench(config, target=target, tasks=[line_task(0)]).summaries[0].method == "plain"


def test_a_lossy_sparse_method_runs_the_routers_it_names(target, tmp_path):
    """routers=DIR reaches the verifier: routers that run every layer decode as plain does; routers that skip
    every routed layer do not (the tiny target's greedy output changes without its layers)."""
    from draftsmith.routers import RouterConfig, Routers, save_routers

    config = target.model.config
    for name, bias in (("dense", [-50.0, 50.0]), ("skip", [50.0, -50.0])):
        routers = Routers(RouterConfig(hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                                       start_layer=1))
        with torch.no_grad():
            for router in routers.routers:
                router.out.bias.copy_(torch.tensor(bias))
        save_routers(routers, tmp_path / name)
    prompt = target.tokenizer("def add(a, b):\n    return")["input_ids"]
    tokens = {spec: build_method(spec, target, NEW).generate(prompt).tokens
              for spec in ("plain", f"plain:lossy_sparse=1,routers={tmp_path / 'dense'}",
                           f"plain:lossy_sparse=1,routers={tmp_path / 'skip'}")}
    plain, dense, skip = tokens.values()
    assert dense == plain and skip != plain


def test_ignore_eos_runs_every_method_to_max_new_tokens_and_keeps_exactness(tmp_path):
    """A target whose end-of-sequence token is its own first greedy token: stopping at it gives one token;
    with ignore_eos our engine and transformers' generate both run to max_new_tokens, token for token equal."""
    probe = tiny_llama(seed=1)
    task = line_task(0)
    prompt = char_tokenizer()(task.prompt)["input_ids"]
    first = int(probe(torch.tensor([prompt])).logits[0, -1].argmax())
    target = LoadedModel(tiny_llama(seed=1, eos_token_id=first), char_tokenizer(), "tiny")
    runs = {}
    for ignore in (False, True):
        config = BenchConfig(target="tiny", workload="lines", methods=["hf-greedy", "plain", "ngram:k=4"], limit=1,
                             max_new_tokens=NEW, ignore_eos=ignore, out=str(tmp_path / str(ignore)))
        runs[ignore] = run_bench(config, target=target, tasks=[task])
    assert {s.new_tokens for s in runs[False].summaries} == {1}
    assert {s.new_tokens for s in runs[True].summaries} == {NEW}
    assert all(s.exactness == 1.0 for s in runs[True].summaries if s.method != "hf-greedy")
    assert json.loads((tmp_path / "True" / "report.json").read_text())["metadata"]["ignore_eos"] is True


def test_a_method_that_fails_midway_is_reported_and_the_others_run_on(target, tmp_path, monkeypatch):
    import draftsmith.bench.runner as runner

    build = runner.build_method

    def flaky(spec, *args, **kwargs):
        method = build(spec, *args, **kwargs)
        if method.name != "ngram:k=4":
            return method
        calls = [0]
        plain_generate = method.generate

        def generate(ids):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("peer library bug")
            return plain_generate(ids)

        return Method(method.name, generate)

    monkeypatch.setattr(runner, "build_method", flaky)
    config = BenchConfig(target="tiny", workload="lines", methods=METHODS, limit=3, max_new_tokens=4,
                         out=str(tmp_path / "out"))
    result = run_bench(config, target=target, tasks=[line_task(i) for i in range(3)])
    assert {s.method for s in result.summaries} == {"hf-greedy", "plain"}
    assert all(r.method != "ngram:k=4" for r in result.records)
    assert len([r for r in result.records if r.method == "plain"]) == 3
    assert "ngram:k=4 on" in result.notes and "peer library bug" in result.notes
    assert "peer library bug" in result.metadata["failed_methods"]["ngram:k=4"]


def test_bench_report_recomputes_a_run_against_another_baseline(result, tmp_path):
    from typer.testing import CliRunner

    from draftsmith.bench.report import summarize
    from draftsmith.cli.main import app

    folder = result.paths["json"].parent
    again = CliRunner().invoke(app, ["bench-report", str(folder), "--baseline", "plain", "--out", str(tmp_path / "vs")],
                               env={"COLUMNS": "300", "TERM": "dumb"})
    assert again.exit_code == 0, again.output
    data = json.loads((tmp_path / "vs" / "report.json").read_text())
    expected = {s.method: s for s in summarize(result.records, baseline="plain", plain="plain", reference="hf-greedy")}
    assert data["metadata"]["baseline"] == "plain" and len(data["records"]) == len(result.records)
    for s in data["summaries"]:
        assert s["speedup"] == pytest.approx(expected[s["method"]].speedup)
        assert s["speedup_interval"] == pytest.approx(expected[s["method"]].speedup_interval)
        assert s["exactness"] == pytest.approx(expected[s["method"]].exactness)  # still against the run's reference
    assert next(s for s in data["summaries"] if s["method"] == "plain")["speedup"] == pytest.approx(1.0)
    for args, message in (([str(folder), "--baseline", "eagle"], "'eagle' is not a method of"),
                          ([str(tmp_path / "nothing"), "--baseline", "plain"], "no benchmark report at")):
        proc = subprocess.run([sys.executable, "-m", "draftsmith.cli", "bench-report", *args],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_method_at_another_dtype_does_not_run_the_gguf_files_blocks(target):
    """A method at another dtype than the run's (`plain@fp32` beside a 4-bit GGUF target) runs that dtype's
    weights, as --dtype would, not the file's blocks (the copy keeps the blocks' tensors, and once kept the
    default that multiplies them)."""
    from draftsmith.bench.runner import cast

    target.model.gguf_blocks_default = True
    try:
        copy = cast(target, "bfloat16")
    finally:
        del target.model.gguf_blocks_default
    assert copy.model.dtype == torch.bfloat16 and copy.model.gguf_blocks_default is False
