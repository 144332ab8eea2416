"""The fp16 weight format: FBGEMM's products of float16-packed weights with float32 activations, offered only
where packing rounds nothing, and a format's speed judged on verification-sized products too."""

from __future__ import annotations

import time

import pytest
import torch

import draftsmith.backends.format_choice as format_choice
from draftsmith.backends.format_choice import choose_format
from draftsmith.backends.formats import candidate_formats, WeightFormat
from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from scripted_drafters import OracleDrafter
from tiny_models import hf_greedy, tiny_llama

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="this torch build has no FBGEMM")
FP16 = WeightFormat("fp16")


def fp16_valued(model):
    """The model with every linear weight rounded to a float16 value (kept in its own dtype)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().to(module.weight.dtype))
    return model


@pytest.mark.parametrize("value, offered", [(0.5, True), (1.2345e-7, True), (1e6, False)])
def test_fp16_is_offered_only_where_packing_keeps_the_weights(value, offered):
    weight = torch.randn(64, 32).bfloat16()  # bfloat16's 8 significant bits fit float16's 11
    weight[3, 5] = value  # far below float16's normal range it moves by < 2**-25 (allowed); above it, overflow
    assert (FP16 in candidate_formats(weight)) is offered
    if offered:
        packed = weight.half().to(weight.dtype)
        assert (packed.float() - weight.float()).abs().max() <= 2**-25
    assert FP16 not in candidate_formats(torch.randn(64, 32))  # float32 values: 24 bits do not fit


def test_naming_fp16_for_a_model_it_would_round_is_refused():
    with pytest.raises(ConfigError, match="fp16 weights would round this torch.float32 model's weights"):
        choose_format(tiny_llama(seed=2), "fp16")
    assert choose_format(fp16_valued(tiny_llama(seed=2)), "fp16") == FP16


@pytest.mark.parametrize("wrong_at", [set(), {0}, {2}])
def test_greedy_on_fp16_weights_equals_hf_greedy_of_the_same_weights(wrong_at):
    """float32 activations over weights that are float16 values: the same model as transformers' fp32 forward,
    summed in another order; speculation with accepted, rejected and cut drafts keeps its tokens."""
    target = fp16_valued(tiny_llama(seed=5))
    prompt = [5, 17, 33, 8, 21, 40, 9]
    reference = hf_greedy(target, prompt, 30)
    oracle = OracleDrafter(reference, len(prompt), wrong_at=wrong_at, vocab=target.config.vocab_size)
    for drafter, k in ((None, 0), (oracle, 6), (NgramDrafter(), 8)):
        engine = SpecEngine(target, drafter, backend=BackendConfig(weights="fp16"))
        assert engine.runner.lm.weights == FP16
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=30, k=k)).tokens == reference


def test_a_format_slow_only_on_verification_sized_products_is_not_chosen(monkeypatch):
    """One-token products alone would pick it; speculative steps feed several rows, and it must pay there too."""
    weight = torch.randn(256, 64).bfloat16()
    multiply = WeightFormat.multiply

    def timed_multiply(self, x, prepared):
        if self.name == "stored" and x.shape[-2] > 1:
            time.sleep(2e-3)
        elif self.name != "stored":
            time.sleep(2e-4)  # everything else is slower on one row
        return multiply(self, x, prepared)

    monkeypatch.setattr(WeightFormat, "multiply", timed_multiply)
    assert format_choice.fastest_format(weight) != WeightFormat("stored")


def test_each_weight_format_has_a_cost_curve_of_its_own():
    from draftsmith.backends.lean import LeanLlama
    from draftsmith.target_runner import backend_key

    target = fp16_valued(tiny_llama(seed=2))
    keys = {backend_key(LeanLlama(target, weights=name), target) for name in ("stored", "transposed", "fp16")}
    assert len(keys) == 3
