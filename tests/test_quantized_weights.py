"""int8 / int4 weight-only formats of the lean forward: opt-in only (lossy), products within quantization
error, a weight already on a 4-bit grid (the embedded model is Q4_1) kept, and speculative decoding on a
quantized target lossless relative to that same quantized target's plain decoding."""

import pytest
import torch

from draftsmith.backends.format_choice import choose_format
from draftsmith.backends.formats import candidate_formats, INT4_GROUP, QUANTIZED, WeightFormat
from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from scripted_drafters import OracleDrafter
from tiny_models import char_tokenizer, noisy_copy, tiny_llama


@pytest.mark.parametrize("name", QUANTIZED)
def test_products_are_within_quantization_error(name):
    torch.manual_seed(0)
    weight = torch.randn(96, 128, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    fmt = WeightFormat(name)
    exact = x.float() @ weight.float().T
    error = (fmt.multiply(x, fmt.prepare(weight)).float() - exact).norm() / exact.norm()
    assert error < {"int8": 0.02, "int4": 0.15, "q8_0": 0.02}[name]


def test_a_weight_on_a_4_bit_grid_is_kept():
    """Each group of 32 holds low + q * step for q in 0..15 (using both ends), as a Q4_1 block does."""
    torch.manual_seed(1)
    rows, columns = 64, 128
    q = torch.randint(0, 16, (rows, columns // INT4_GROUP, INT4_GROUP))
    q[..., 0], q[..., 1] = 0, 15
    low = torch.randn(rows, columns // INT4_GROUP, 1) * 0.1
    step = torch.rand(rows, columns // INT4_GROUP, 1) * 0.01 + 0.001
    weight = (low + q * step).reshape(rows, columns).bfloat16()
    x = torch.randn(2, columns, dtype=torch.bfloat16)
    fmt = WeightFormat("int4")
    reference = x.float() @ weight.float().T
    error = (fmt.multiply(x, fmt.prepare(weight)).float() - reference).norm() / reference.norm()
    assert error < 0.01  # the scales are bfloat16: the grid is kept up to their rounding


def test_int4_says_which_shapes_it_cannot_pack():
    with pytest.raises(ConfigError, match="output sizes by 16"):
        WeightFormat("int4").prepare(torch.randn(102, 64))


def test_quantized_formats_are_never_chosen_unless_named():
    model = tiny_llama(seed=2).to(torch.bfloat16)
    assert not choose_format(model, "auto").lossy and not choose_format(model, "fastest").lossy
    assert not any(f.lossy for f in candidate_formats(model.lm_head.weight))
    assert choose_format(model, "int4").lossy


@pytest.mark.parametrize("name", QUANTIZED)
def test_speculation_on_a_quantized_target_equals_its_own_plain_decoding(name):
    """In float32 activations, where aten's int8 / int4 products do not depend on how many rows are fed (in
    bfloat16 a batched verification rounds differently, as everywhere: the benchmark reports agreement)."""
    tok = char_tokenizer()
    target = tiny_llama(seed=4, hidden_size=64, vocab_size=112)  # int4 packing wants outputs divisible by 16
    ids = tok("def add(a, b):\n    return a + b\n\ndef add(").input_ids
    config = GenerationConfig(max_new_tokens=40, k=0, stop_on_eos=False)
    plain = SpecEngine(target, None, backend=BackendConfig(weights=name))
    assert plain.runner.lm.weights.name == name
    reference = plain.generate(ids, config).tokens
    drafters = [NgramDrafter(min_n=1, max_n=3), ModelDrafter(noisy_copy(target, 0.3)),
                OracleDrafter(reference, len(ids), wrong_at={2}, vocab=target.config.vocab_size)]
    for drafter in drafters:
        for k in (1, 4):
            out = SpecEngine(target, drafter, backend=BackendConfig(weights=name)).generate(ids, GenerationConfig(
                max_new_tokens=40, k=k, stop_on_eos=False))
            assert out.tokens == reference, (type(drafter).__name__, k)
