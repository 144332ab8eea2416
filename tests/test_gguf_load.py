"""Reading a GGUF's tensors straight from the memory-mapped file: the same weights transformers' GGUF loading
gives, bit for bit, without its float32 copy of everything; the converted metadata is kept per file."""

import gguf
import numpy as np
import pytest
import torch

from draftsmith import gguf_load
from draftsmith.backends.lean import lean_weights
from draftsmith.gguf_export import write_gguf
from draftsmith.models import embedded_gguf, load_model
from tiny_models import tiny_llama


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_dequantization_equals_gguf_py(qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    values = np.random.default_rng(3).standard_normal((6, 128)).astype(np.float32) * 0.05
    blocks = gguf.quants.quantize(values, kind)
    expected = gguf.quants.dequantize(blocks, kind)
    ours = gguf_load.dequantize_blocks(torch.from_numpy(blocks), int(kind))
    assert ours.shape == (6, 128) and torch.equal(ours, torch.from_numpy(expected))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_llama(vocab_size=49152, seed=5, hidden_size=32)
    return model, write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", embedded_gguf("smollm2"), "f32")


def test_grouped_weights_are_row_blocks_the_lean_forward_multiplies_in_place(tiny_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, path = tiny_gguf
    loaded = load_model(str(path), dtype="float32").model
    for name, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    attn = loaded.model.layers[0].self_attn
    q_ptr = attn.q_proj.weight.data_ptr()
    shared = lean_weights(loaded, "stored")
    assert shared.layers[0]["wqkv"].data_ptr() == q_ptr  # no concatenated copy
    assert attn.k_proj.weight.data_ptr() == q_ptr + attn.q_proj.weight.numel() * 4
    # converted once: a second load reads the cache folder (here: its table of the file's tensors)
    folder = gguf_load.converted(path)
    assert (folder / gguf_load.TABLE).is_file() and len(list(folder.parent.iterdir())) == 1


def test_a_garbage_gguf_is_a_clear_error(tmp_path, monkeypatch):
    from draftsmith.errors import ModelLoadError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model(str(bad))


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
def test_embedded_model_equals_transformers_gguf_loading():
    from transformers import AutoModelForCausalLM

    path = embedded_gguf("smollm2")
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ours = gguf_load.load_gguf_model(path, torch.float32)
    expected, got = reference.state_dict(), ours.state_dict()
    assert set(got) == set(expected)
    for name in expected:  # Q4_1, Q8_0 and F32 tensors, q/k rows un-permuted
        assert torch.equal(got[name], expected[name]), name
    assert ours.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert torch.equal(ours.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
