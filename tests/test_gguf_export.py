"""Writing a model as GGUF for llama.cpp: transformers reads back the very weights written (the q/k rows are
permuted to llama.cpp's rotary layout on the way out and back on the way in)."""

import pytest
import torch
from typer.testing import CliRunner

from draftsmith.cli.main import app
from draftsmith.errors import ConfigError
from draftsmith.gguf_export import write_gguf
from draftsmith.models import embedded_gguf, load_model
from tiny_models import tiny_llama

VOCAB = 49152  # the embedded SmolLM2 tokenizer's


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, seed=5, hidden_size=32)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_weights_round_trip(model, tmp_path, dtype):
    path = write_gguf(model, tmp_path / f"tiny-{dtype}.gguf", embedded_gguf("smollm2"), dtype)
    back = load_model(str(path)).model.state_dict()
    cast = (lambda w: w.to(torch.bfloat16).float() if w.dim() > 1 else w) if dtype == "bf16" else (lambda w: w)
    for name, weight in model.state_dict().items():
        assert torch.equal(back[name], cast(weight)), name
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left beside it


def test_a_tokenizer_of_another_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer is not this model's"):
        write_gguf(tiny_llama(vocab_size=300), tmp_path / "x.gguf", embedded_gguf("smollm2"))
    with pytest.raises(ConfigError, match="unknown GGUF dtype"):
        write_gguf(tiny_llama(vocab_size=VOCAB), tmp_path / "x.gguf", embedded_gguf("smollm2"), "q4")


def test_the_cli_needs_a_gguf_to_take_the_tokenizer_from(tmp_path):
    folder = tmp_path / "hf"
    tiny_llama(vocab_size=VOCAB).save_pretrained(folder)
    result = CliRunner().invoke(app, ["export", "--format", "gguf", "--target", str(folder), "--out",
                                      str(tmp_path / "out.gguf")])
    assert result.exit_code != 0 and "--tokenizer-gguf" in str(result.exception)
    missing = CliRunner().invoke(app, ["export", "--format", "eagle3", "--out", str(tmp_path / "spec")])
    assert missing.exit_code != 0 and "--head" in str(missing.exception)
