"""Bad input gets a clear error (a DraftsmithError subclass, or a CLI message without a traceback)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import typer

from draftsmith.cli import main as cli
from draftsmith.acceptance import SamplingConfig
from draftsmith.drafters.registry import build_drafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError, IncompatibleDrafterError, ModelLoadError
from draftsmith.models import embedded_gguf, load_model
from draftsmith.train.trainer import list_checkpoints
from tiny_models import char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def saved_target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    tiny_llama(seed=1).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="not found: .*no-such-model"):
        load_model(str(missing))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "weights.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_model_loads_and_same_vocab_drafter_is_accepted(saved_target):
    target = load_model(str(saved_target))
    drafter = build_drafter(f"model:{saved_target}", target)
    assert drafter is not None and drafter.model.config.vocab_size == target.model.config.vocab_size


def test_mismatched_vocabulary_is_refused(saved_target, tmp_path):
    other = char_tokenizer(extra_chars="éü")  # two more tokens: a different vocabulary
    tiny_llama(vocab_size=len(other), seed=2).save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    target = load_model(str(saved_target))
    with pytest.raises(IncompatibleDrafterError, match="different vocabulary"):
        build_drafter(f"model:{tmp_path}", target)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GenerationConfig(k=-1), "k .* must be >= 0"),
        (lambda: GenerationConfig(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (lambda: SamplingConfig(temperature=-0.5), "temperature must be >= 0"),
        (lambda: SamplingConfig(top_p=0.0), "top_p must be in"),
        (lambda: SamplingConfig(temperature=float("nan")), "temperature must be >= 0 and finite"),
        (lambda: SamplingConfig(temperature=float("inf")), "temperature must be >= 0 and finite"),
        (lambda: SamplingConfig(top_p=float("nan")), "top_p must be in"),
        (lambda: build_drafter("ngram", None, min_n=3, max_n=2), "min_n <= max_n"),
        (lambda: build_drafter("eagle9", None), "unknown drafter 'eagle9'"),
    ],
)
def test_impossible_settings(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_empty_prompt_and_context_overflow():
    tok = char_tokenizer()
    engine = SpecEngine(tiny_llama(seed=1), None, tok)
    with pytest.raises(ConfigError, match="prompt is empty"):
        engine.generate_text("", GenerationConfig())
    with pytest.raises(ConfigError, match="prompt is empty"):
        engine.generate([], GenerationConfig())
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        engine.generate([5] * 500, GenerationConfig(max_new_tokens=20))


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "", "--target", "{target}"], "prompt is empty"),
        (["generate", "x", "--target", "{target}", "--k", "-2"], "must be >= 0"),
        (["generate", "x", "--target", "{target}", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "x", "--target", "/no/such/dir"], "model path not found"),
        (["generate", "x", "--target", "{target}", "--temperature", "nan"], "temperature must be >= 0 and finite"),
        (["generate", "x", "--target", "{target}", "--temperature", "0.5", "--top-p", "nan"], "top_p must be in"),
        (["serve", "--target", "{target}", "--port", "70000"], "Invalid value for '--port'"),
    ],
)
def test_cli_reports_errors_without_traceback(saved_target, args, message):
    argv = [a.format(target=saved_target) for a in args]
    proc = subprocess.run([sys.executable, "-m", "draftsmith.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["header cut", "weights cut", "garbage", "empty"])
def test_a_damaged_gguf_is_a_clear_error(tmp_path, damage):
    original = embedded_gguf("smollm2")
    path = tmp_path / "model.gguf"
    with original.open("rb") as f:
        size = {"header cut": 1_000_000, "weights cut": original.stat().st_size - 8_000_000,
                "garbage": 0, "empty": 0}[damage]
        path.write_bytes(f.read(size) if size else (os.urandom(4096) if damage == "garbage" else b""))
    with pytest.raises(ModelLoadError, match=r"could not read model .*model.gguf' \(a truncated or damaged GGUF"):
        load_model(str(path))


def test_cli_generates_with_a_folder_model(saved_target):
    proc = subprocess.run(
        [sys.executable, "-m", "draftsmith.cli", "generate", "def f(", "--target", str(saved_target),
         "--max-new-tokens", "12", "--k", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def f(") and "tau" in proc.stderr


@pytest.mark.parametrize("raised, status, line", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (EOFError(), 1, "error: end of input"),
    (RuntimeError("inner\nsecond line"), 1, "error: RuntimeError: inner (unexpected: DRAFTSMITH_TRACEBACK=1"),
    (typer.Exit(3), 3, None),  # a command's own status (non-standalone typer returns it: it was dropped)
])
def test_every_way_a_command_can_end_gives_a_status_and_one_line(monkeypatch, capsys, raised, status, line):
    app = typer.Typer()

    @app.command()
    def boom():
        raise raised

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["draftsmith"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == status
    err = capsys.readouterr().err
    lines = [text for text in err.splitlines() if text.strip()]
    assert len(lines) == (0 if line is None else 1), err
    assert line is None or lines[0].startswith(line)
    assert "Traceback" not in err


def test_ctrl_c_during_distill_exits_130_with_a_checkpoint(saved_target, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n" + "".join(f"    x = x + {j}\n" for j in range(20)))
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "draftsmith.cli", "distill", "--target", str(saved_target), "--out", str(out),
         "--corpus", str(corpus), "--data", "corpus", "--steps", "100000", "--batch-size", "1", "--seq-len", "16",
         "--layers", "1", "--hidden", "16", "--heads", "2", "--kv-heads", "1", "--eval-every", "0",
         "--checkpoint-every", "0", "--device", "cpu", "--heldout-percent", "25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "tb").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the TensorBoard folder appears when the training loop starts
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    saved = list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and int(saved[0].name[5:]) > 0  # the step it was in, not step 100000
