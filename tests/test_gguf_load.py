"""Reading a GGUF's tensors straight from the memory-mapped file: the same weights transformers' GGUF loading
gives, bit for bit, without its float32 copy of everything; the converted metadata is kept per file."""

from pathlib import Path

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
    ours = gguf_load.load_gguf_llama(path, torch.float32).transformers_model()
    expected, got = reference.state_dict(), ours.state_dict()
    assert set(got) == set(expected)
    for name in expected:  # Q4_1, Q8_0 and F32 tensors, q/k rows un-permuted
        assert torch.equal(got[name], expected[name]), name
    assert ours.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert torch.equal(ours.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


LIGHT_LOAD_PROBE = """
import json, sys, torch
from draftsmith.builder import build_engine
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.gguf_load import load_gguf_llama
from draftsmith.models import embedded_gguf, load_model
loaded = load_model('smollm2', dtype='auto')
engine = build_engine(loaded, drafter='none', tokenizer=False)
config = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
tokens = engine.generate(loaded.encode('def fib(n):'), config).tokens  # the file's blocks, float weights unread
light = 'transformers.modeling_utils' not in sys.modules
deferred = loaded.engine_model.model.layers[0].mlp.down_proj.weight.is_meta
hf = loaded.model  # builds the transformers model over the same tensors, reading the deferred ones
ids = loaded.encode('def fib(n):')
eager = load_gguf_llama(embedded_gguf('smollm2'), hf.dtype).state_dict()
same = all(torch.equal(t, eager[name]) for name, t in hf.state_dict().items())
light_model = loaded.engine_model.model
shared = all(a.data_ptr() == b.data_ptr() for a, b in ((hf.model.embed_tokens.weight, light_model.embed_tokens.weight),
             (hf.model.layers[3].mlp.down_proj.weight, light_model.layers[3].mlp.down_proj.weight)))
out = dict(light=light, deferred=deferred, same=same, shared=shared, tokens=tokens,
           hf_tokens=SpecEngine(hf, None).generate(ids, config).tokens)
print(json.dumps(out))
"""


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
def test_a_gguf_target_runs_without_transformers_modelling_and_reads_float_weights_only_on_request():
    """Issue 43's time to the first token: a GGUF target loaded with its own blocks (no --dtype) imports no
    transformers modelling and leaves its linears' float weights unread; asking for the transformers model
    reads them, equal to an eager load's, over the same tensors, and engines decode as before."""
    import json
    import os
    import subprocess
    import sys

    gguf_load.converted(embedded_gguf("smollm2"))
    out = subprocess.run([sys.executable, "-c", LIGHT_LOAD_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert m["light"] and m["deferred"] and m["same"] and m["shared"]
    assert len(m["tokens"]) == 12 and m["hf_tokens"] == m["tokens"]


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}])
def test_the_light_models_rotary_tables_are_transformers(rope):
    from transformers import LlamaConfig, PretrainedConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from draftsmith.gguf_model import RotaryTables

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_parameters=rope)
    light = PretrainedConfig.from_dict(config.to_dict())  # the generic class, as the GGUF loader reads the config
    positions, probe = torch.arange(256)[None], torch.zeros(1, dtype=torch.bfloat16)
    for got, want in zip(RotaryTables(light)(probe, positions), LlamaRotaryEmbedding(config)(probe, positions)):
        assert torch.equal(got, want)


def test_a_light_model_missing_a_tensor_names_it():
    from draftsmith.gguf_model import GgufLlama

    model = tiny_llama(seed=5, hidden_size=32)
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match="mlp.up_proj"):
        GgufLlama(model.config, state, "tiny.gguf", Path("."))


def test_a_light_gguf_model_runs_on_transformers_forward_when_asked(tiny_gguf, monkeypatch, tmp_path):
    """`BackendConfig(lean=False)` on a GGUF target: the engine runs transformers' forward over the same tensors
    (built on request), its greedy tokens those of the model the file was written from (fp32)."""
    from draftsmith.backends.protocol import BackendConfig
    from draftsmith.engine import GenerationConfig, SpecEngine
    from draftsmith.gguf_model import GgufLlama
    from tiny_models import hf_greedy

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, path = tiny_gguf
    loaded = load_model(str(path), dtype="float32")
    assert isinstance(loaded.engine_model, GgufLlama)
    prompt = [5, 9, 14, 3]
    config = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
    tokens = SpecEngine(loaded.engine_model, backend=BackendConfig(lean=False)).generate(prompt, config).tokens
    assert tokens == hf_greedy(model, prompt, 12)
