"""The compiled lean forward and the weight formats must not change what is generated."""

import pytest
import torch

import draftsmith.backends.format_choice as format_choice
import draftsmith.backends.lean as lean_module
from draftsmith.backends.formats import candidate_formats, WeightFormat
from draftsmith.backends.lean import LeanLlama
from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from scripted_drafters import OracleDrafter
from tiny_models import char_tokenizer, hf_greedy, tiny_llama

NEW = 30


@pytest.fixture(scope="module")
def compiled_engine_parts():
    """One compiled target for the module: compiling costs tens of seconds even for a tiny model."""
    torch.manual_seed(0)
    target = tiny_llama(seed=1)
    runner_lm = LeanLlama(target, compile=True)
    return target, runner_lm


def test_compiled_forward_is_exact_and_its_time_reported(compiled_engine_parts):
    target, lm = compiled_engine_parts
    assert lm.compile_s is not None and lm.compile_s > 0, "the compile time must be measured"
    eager = LeanLlama(target)
    ids = list(range(3, 40))
    for backend in (lm, eager):
        backend.reset(64)
        backend.forward(ids[:-1], last_only=True)
    # inductor fuses the elementwise work, so the last bits may differ from eager; the choices may not
    def same(compiled: torch.Tensor, reference: torch.Tensor) -> bool:
        return torch.allclose(compiled, reference, atol=1e-4) and torch.equal(compiled.argmax(-1), reference.argmax(-1))

    for chunk in ([ids[-1]], [5, 6, 7, 8], [9]):  # a step, a draft, a step again
        assert same(lm.forward(chunk), eager.forward(chunk))
    lm.truncate(40)
    eager.truncate(40)  # roll back a rejected draft, then continue
    assert same(lm.forward([11, 12]), eager.forward([11, 12]))


@pytest.mark.parametrize("wrong_at", [set(), {0}, {3}])
def test_compiled_engine_matches_hf_greedy_with_rollbacks_and_the_length_cap(compiled_engine_parts, wrong_at):
    target, lm = compiled_engine_parts
    tok = char_tokenizer()
    engine = SpecEngine(target, None, tok)
    engine.runner.lm = lm  # reuse the module's compiled backend
    ids = tok("for i in range(10):\n    print(i)\n").input_ids
    reference = hf_greedy(target, ids, NEW)
    assert len(reference) == NEW  # no EOS: the run ends at the length cap
    engine.drafter = OracleDrafter(reference, len(ids), wrong_at=wrong_at, vocab=target.config.vocab_size)
    result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=8))  # 30 = 3 x 9 + 3: the last draft
    assert result.tokens == reference and result.finish_reason == "length"  # crosses max_new_tokens
    engine.drafter = NgramDrafter()
    assert engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=4, adaptive=True)).tokens == reference


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compiler():
        def stack(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return stack

    monkeypatch.setattr(lean_module, "compiled_stack", broken_compiler)
    target, tok = tiny_llama(seed=1), char_tokenizer()
    with pytest.warns(UserWarning, match="torch.compile failed, running eager instead: RuntimeError: no C"):
        engine = SpecEngine(target, NgramDrafter(), tok, backend=BackendConfig(compile=True))
    assert engine.runner.compile_s is None
    ids = tok("for i in range(3):").input_ids
    assert engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=4)).tokens == hf_greedy(target, ids, NEW)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_every_weight_format_multiplies_like_f_linear(dtype, tolerance, tokens):
    torch.manual_seed(0)
    weight, x = torch.randn(96, 40, dtype=dtype), torch.randn(1, tokens, 40, dtype=dtype)
    exact = torch.nn.functional.linear(x.double(), weight.double())
    formats = candidate_formats(weight)
    assert {WeightFormat("stored"), WeightFormat("transposed")} <= set(formats)
    for fmt in formats:
        product = fmt.multiply(x, fmt.prepare(weight))
        assert product.dtype == (torch.float32 if fmt.float_products else dtype) and product.shape == exact.shape
        assert torch.allclose(product.double(), exact, rtol=tolerance, atol=tolerance * 10), fmt


@pytest.mark.parametrize("fast", ["stored", "transposed"])
def test_the_fastest_format_is_the_one_that_multiplies_fastest(monkeypatch, fast):
    """Every format but `fast` is made slow: the choice must follow the timings, whatever the machine."""
    import time

    weight = torch.randn(256, 64)
    multiply = WeightFormat.multiply

    def timed_multiply(self, x, prepared):
        if self.name != fast:
            time.sleep(2e-3)
        return multiply(self, x, prepared)

    monkeypatch.setattr(WeightFormat, "multiply", timed_multiply)
    assert format_choice.fastest_format(weight) == WeightFormat(fast)


def test_a_format_without_a_kernel_is_skipped(monkeypatch):
    weight = torch.randn(256, 64)
    prepare = WeightFormat.prepare

    def no_kernel_but_stored(self, w):
        if self.name != "stored":
            raise RuntimeError("no kernel for this format in this torch build")
        return prepare(self, w)

    monkeypatch.setattr(WeightFormat, "prepare", no_kernel_but_stored)
    assert format_choice.fastest_format(weight) == WeightFormat("stored")


@pytest.mark.parametrize("slow", [torch.bfloat16, torch.float32])
def test_attention_runs_in_the_dtype_measured_faster(monkeypatch, tmp_path, slow):
    """Below float32 the lean forward attends in its own dtype or in float32, whichever this CPU runs faster
    (measured once, then read back): a CPU without bf16 arithmetic emulates the small products slowly."""
    import time

    from draftsmith.backends.layers import attention_dtype, LeanLayers

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    attend = LeanLayers._attention

    def timed_attention(self, q, keys, values, mask, causal=False):
        if q.dtype == slow:
            time.sleep(1e-3)
        return attend(self, q, keys, values, mask, causal)

    monkeypatch.setattr(LeanLayers, "_attention", timed_attention)
    fast = torch.float32 if slow == torch.bfloat16 else torch.bfloat16
    assert attention_dtype(torch.bfloat16, 4, 2, 8, torch.device("cpu")) == fast
    monkeypatch.setattr(LeanLayers, "_attention", attend)  # the answer is kept, not measured again
    assert attention_dtype(torch.bfloat16, 4, 2, 8, torch.device("cpu")) == fast
    assert attention_dtype(torch.float32, 4, 2, 8, torch.device("cpu")) == torch.float32  # exact: never changed
