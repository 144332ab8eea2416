"""The fused CPU kernels (fused.py, csrc/fused_cpu.cpp): each equals the eager operations it replaces, the lean
forward through them equals the same forward eager, and a machine that cannot build them runs eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import draftsmith.backends.layers as layers_module
import draftsmith.backends.fused as fused_module
from draftsmith.backends.layers import _swapped_rope
from draftsmith.backends.lean import LeanLlama
from draftsmith.backends.formats import WeightFormat
from draftsmith.backends.protocol import BackendConfig
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.target_runner import backend_key
from tiny_models import tiny_llama

pytestmark = pytest.mark.xdist_group("fused")  # one worker builds the kernels (once per machine)


@pytest.fixture(scope="module")
def ops():
    built = fused_module.fused_ops()
    if built is None:
        pytest.skip("no C++ compiler here: the fused kernels cannot be built (the fallback test covers this)")
    return built


def test_rms_norms_equal_torchs(ops):
    torch.manual_seed(0)
    x, delta, weight = torch.randn(2, 3, 96), torch.randn(2, 3, 96), torch.randn(96)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), F.rms_norm(x, (96,), weight, 1e-6))
    total, normed = ops.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, F.rms_norm(x + delta, (96,), weight, 1e-6))


def test_silu_mul_is_the_mlp_gate(ops):
    gate_up = torch.randn(1, 5, 2 * 48) * 4
    gate_up[0, 0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e4, -1e4])  # the sigmoid's ends and its middle
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up)


def test_silu_mul_gives_each_row_the_same_numbers_whatever_the_rows_beside_it(ops):
    """A verification's MLP rows must equal the one-token step's, bit for bit."""
    gate_up = torch.randn(9, 2 * 200) * 6
    alone = torch.cat([ops.silu_mul(row[None]) for row in gate_up])
    assert torch.equal(ops.silu_mul(gate_up), alone)


def test_rope_write_kv_rotates_like_the_eager_forward_and_writes_only_its_slots(ops):
    heads, kv_heads, d, n, start, capacity = 4, 2, 16, 3, 5, 12
    torch.manual_seed(1)
    qkv = torch.randn(1, n, (heads + 2 * kv_heads) * d)
    cos, signed_sin = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    k_cache = torch.full((kv_heads, capacity, d), 7.0)
    v_cache = torch.full((kv_heads, capacity, d), 7.0)
    q = ops.rope_write_kv(qkv, cos, signed_sin, k_cache, v_cache, start, heads, kv_heads)

    qk, v = qkv.split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
    rotated = _swapped_rope(qk.view(1, n, heads + kv_heads, d).transpose(1, 2), cos, signed_sin)
    torch.testing.assert_close(q, rotated[:, :heads])
    torch.testing.assert_close(k_cache[:, start : start + n], rotated[0, heads:])
    assert torch.equal(v_cache[:, start : start + n], v.view(n, kv_heads, d).transpose(0, 1))
    for cache in (k_cache, v_cache):  # every other slot untouched
        assert (cache[:, :start] == 7).all() and (cache[:, start + n :] == 7).all()


@pytest.mark.parametrize("length", [1, 9, 300, 3000])  # 3000: the kv heads split across threads
def test_decode_attention_equals_sdpa_over_the_cached_prefix(ops, length):
    heads, kv_heads, d, capacity = 6, 2, 32, 3100
    torch.manual_seed(length)
    q = torch.randn(1, heads, 1, d) * 3  # peaked scores: the exponential's range is exercised
    k_cache, v_cache = torch.randn(kv_heads, capacity, d), torch.randn(kv_heads, capacity, d)
    expected = F.scaled_dot_product_attention(q, k_cache[None, :, :length], v_cache[None, :, :length],
                                              enable_gqa=True)
    torch.testing.assert_close(ops.decode_attention(q, k_cache, v_cache, length), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("heads, kv_heads, d", [(6, 2, 64), (9, 3, 32), (10, 2, 64), (8, 1, 128), (6, 3, 48),
                                                (4, 1, 256), (6, 3, 40)])
def test_tree_attention_is_sdpa_under_the_mask_and_each_query_gets_its_one_token_steps_bits(ops, heads, kv_heads, d):
    """Each query of a verification attends to exactly its allowed entries; one whose allowed entries are the
    cache up to its own slot (a chain's, an accepted path's) gets decode_attention's output at that length bit
    for bit: the step that accepts a draft token computes what a one-token step would have. Head sizes with
    registers-wide kernels (multiples of 16 up to 256) and without (40); groups within one pass over the values and
    beyond."""
    torch.manual_seed(3)
    start, n = 37, 5
    k_cache, v_cache = torch.randn(kv_heads, 64, d), torch.randn(kv_heads, 64, d)
    q = torch.randn(1, heads, n, d)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 1]],
                        dtype=torch.bool)
    for block in (tree, torch.ones(n, n, dtype=torch.bool).tril()):
        allowed = torch.cat([torch.ones(n, start, dtype=torch.bool), block], dim=1)
        got = ops.tree_attention(q, k_cache, v_cache, allowed, start)
        keys, values = k_cache[None, :, : start + n], v_cache[None, :, : start + n]
        expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, enable_gqa=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for t in range(n):  # the chain: query t sees slots 0 .. start + t
        one = ops.decode_attention(q[:, :, t : t + 1].contiguous(), k_cache, v_cache, start + t + 1)
        assert torch.equal(got[:, :, t : t + 1], one)
    with pytest.raises(RuntimeError, match="nothing to attend to"):
        ops.tree_attention(q, k_cache, v_cache, torch.zeros(n, start + n, dtype=torch.bool), start)


@pytest.mark.parametrize("rows, size", [(1, 576), (3, 576), (9, 576), (20, 64), (2, 20)])  # 20: no 8-lane path
def test_half_product_is_the_float32_product_of_the_float16_weights(ops, rows, size):
    torch.manual_seed(rows)
    x, weight = torch.randn(1, rows, size), (torch.randn(200, size) * 0.1).half()
    torch.testing.assert_close(ops.half_product(x, weight), x @ weight.float().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrong_at", [set(), {0}, {3}])
def test_greedy_on_fp16_fused_weights_equals_hf_greedy_of_the_same_weights(ops, wrong_at):
    """The same property as FBGEMM's fp16 format: float32 activations over float16-valued weights are
    transformers' fp32 forward summed in another order; speculation keeps its tokens."""
    from scripted_drafters import OracleDrafter
    from test_fp16_weights import fp16_valued
    from tiny_models import hf_greedy

    target = fp16_valued(tiny_llama(seed=5))
    prompt = [5, 17, 33, 8, 21, 40, 9]
    reference = hf_greedy(target, prompt, 30)
    oracle = OracleDrafter(reference, len(prompt), wrong_at=wrong_at, vocab=target.config.vocab_size)
    for drafter, k in ((None, 0), (oracle, 6)):
        engine = SpecEngine(target, drafter, backend=BackendConfig(weights="fp16-fused"))
        assert engine.runner.lm.weights.name == "fp16-fused"
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=30, k=k)).tokens == reference


@pytest.fixture(scope="module")
def bf16_dot(ops):
    if not ops.bf16_dot_supported():
        pytest.skip("this CPU has no AVX512-BF16 dot products: the bf16-fused format is never offered here")
    return ops


@pytest.fixture(params=["bf16-fused", "bf16-amx"])
def bf16_format(request, ops) -> WeightFormat:
    """The fused kernels' bfloat16 formats: AVX512-BF16 dot products, AMX tiles; each where this CPU has it."""
    if not (ops.bf16_dot_supported() if request.param == "bf16-fused" else ops.amx_supported()):
        pytest.skip(f"this CPU cannot run {request.param} products: the format is never offered here")
    return WeightFormat(request.param)


# sizes: 576 (whole 32-lane steps), 40 and 20 (a masked tail / a padded tile); features 203 (a tail past the tiles);
# rows 17 and 33: past one AMX tile of 16 rows
@pytest.mark.parametrize("rows, size", [(1, 576), (3, 576), (9, 576), (17, 576), (33, 40), (6, 40), (2, 20)])
def test_bf16_products_are_the_products_of_bf16_rounded_rows_and_batching_changes_no_bit(bf16_format, rows, size):
    torch.manual_seed(rows)
    x, weight = torch.randn(1, rows, size), (torch.randn(203, size) * 0.1).bfloat16()
    prepared = bf16_format.prepare(weight)
    got = bf16_format.multiply(x, prepared)
    exact = x.bfloat16().double() @ weight.double().t()  # the rows rounded to bf16 once, then exact sums
    assert got.shape == (1, rows, 203) and (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    # each row alone gives the batch's numbers bit for bit: a verification rounds as one-token steps do
    for r in range(rows):
        assert torch.equal(bf16_format.multiply(x[:, r : r + 1], prepared)[0, 0], got[0, r])


def test_speculative_decoding_on_bf16_kernels_keeps_plain_decodings_tokens(bf16_format, monkeypatch):
    """With either bf16 kernel a batched verification rounds exactly as a one-token step: drafts accepted in
    full, cut part way and rejected at once give plain decoding's tokens in the same format, not merely agree
    often."""
    from scripted_drafters import OracleDrafter

    model = bf16_llama(4, monkeypatch)
    prompt = [5, 17, 33, 8, 21, 40, 9, 5, 17, 33]
    backend = BackendConfig(weights=bf16_format.name)
    plain = SpecEngine(model, None, backend=backend)
    assert plain.runner.lm.weights.name == bf16_format.name and plain.runner.lm.fused is not None
    reference = plain.generate(prompt, GenerationConfig(max_new_tokens=40)).tokens
    for wrong_at in (set(), {0}, {3}):
        oracle = OracleDrafter(reference, len(prompt), wrong_at=wrong_at, vocab=model.config.vocab_size)
        engine = SpecEngine(model, oracle, backend=backend)
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=40, k=20)).tokens == reference


def test_bf16_fused_weights_refuse_other_dtypes(bf16_dot):
    for name in ("bf16-fused", "bf16-amx"):
        with pytest.raises(ConfigError, match="--dtype bfloat16"):
            LeanLlama(tiny_llama(seed=2), weights=name)
    with pytest.raises(RuntimeError, match="contiguous BFloat16 CPU matrix"):
        bf16_dot.bf16_product(torch.randn(1, 2, 8), torch.randn(4, 8).half())


def test_the_kernels_refuse_what_they_cannot_compute(ops):
    with pytest.raises(RuntimeError, match="float32 CPU tensor is needed"):
        ops.rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(8).bfloat16(), 1e-6)
    cache = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="past the cache's capacity"):
        ops.rope_write_kv(torch.randn(1, 2, 3 * 8), torch.ones(1, 1, 2, 8), torch.zeros(1, 1, 2, 8), cache,
                          cache.clone(), 3, 1, 1)
    with pytest.raises(RuntimeError, match="length outside the cache"):
        ops.decode_attention(torch.randn(1, 1, 1, 8), cache, cache, 5)
    if ops.amx_supported():
        from draftsmith.backends.formats import amx_tiles

        with pytest.raises(RuntimeError, match="do not fit a packing"):
            ops.amx_product(torch.randn(1, 2, 40), amx_tiles(torch.randn(20, 40).bfloat16()), 300)


def bf16_llama(seed: int, monkeypatch):
    """A tiny bf16 Llama whose norms differ from one another (initialised to ones they would be interchangeable),
    its attention in float32 whatever this machine would time for it: the fused kernels' case on fp16 weights."""
    monkeypatch.setattr(layers_module, "attention_dtype", lambda *args: torch.float32)
    model = tiny_llama(seed=seed, hidden_size=64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.to(torch.bfloat16)


def bf16_lean(fused: bool, monkeypatch) -> LeanLlama:
    return LeanLlama(bf16_llama(3, monkeypatch), weights="fp16", fused=fused)


def test_the_lean_forward_through_the_kernels_equals_it_eager(ops, monkeypatch):
    """Prefill, one-token steps and a masked tree verification: the same logits and hidden states (summed in
    another order, so to float32 rounding), and the same cache."""
    fused, eager = bf16_lean(True, monkeypatch), bf16_lean(False, monkeypatch)
    assert fused.fused is not None and eager.fused is None
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    outputs = {}
    for name, lm in (("fused", fused), ("eager", eager)):
        lm.reset(64)
        steps = [lm.forward(list(range(3, 40)), features=True)]
        steps += [lm.forward([token], features=True) for token in (7, 11, 13)]
        steps.append(lm.forward([4, 9, 21, 30], positions=[40, 41, 41, 42], tree_mask=tree, features=True))
        outputs[name] = steps, lm.k_cache[:, :, : lm.length].clone(), lm.v_cache[:, :, : lm.length].clone()
    pairs = [pair for step, step_eager in zip(outputs["fused"][0], outputs["eager"][0]) for pair in zip(step, step_eager)]
    pairs += list(zip(outputs["fused"][1:], outputs["eager"][1:]))
    for got, expected in pairs:  # float32 rounding relative to the tensor's scale (a wrong operation is ~1)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_speculative_decoding_through_the_kernels_keeps_the_eager_tokens(ops, monkeypatch):
    """Drafts accepted in full, cut part way and rejected at once: the fused forward's rollbacks keep the tokens
    of eager plain decoding."""
    from scripted_drafters import OracleDrafter

    model = bf16_llama(4, monkeypatch)
    prompt = [5, 17, 33, 8, 21, 40, 9, 5, 17, 33]
    reference = SpecEngine(model, None, backend=BackendConfig(weights="fp16", fused=False)).generate(
        prompt, GenerationConfig(max_new_tokens=40)).tokens
    for wrong_at in (set(), {0}, {3}):
        oracle = OracleDrafter(reference, len(prompt), wrong_at=wrong_at, vocab=model.config.vocab_size)
        engine = SpecEngine(model, oracle, backend=BackendConfig(weights="fp16", fused=True))
        assert engine.generate(prompt, GenerationConfig(max_new_tokens=40, k=6)).tokens == reference
    engine = SpecEngine(model, None, backend=BackendConfig(weights="fp16", fused=True))
    assert engine.runner.lm.fused is not None
    # a cost curve of its own, for this build of the kernels
    assert backend_key(engine.runner.lm, model).endswith(f"-fused-{fused_module.build_tag()}")


def test_without_a_compiler_the_forward_says_why_and_runs_eager(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(fused_module, "cache_dir", lambda: tmp_path)  # nothing built there
    monkeypatch.setattr(fused_module, "_loaded_in_process", lambda: False)  # (this process has loaded a build)
    fused_module.fused_ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match="fused CPU kernels unavailable.*g\\+\\+: command not found"):
            lm = bf16_lean(True, monkeypatch)
        assert lm.fused is None
        lm.reset(16)
        assert lm.forward([1, 2, 3]).shape[0] == 3
        for name in ("fp16-fused", "bf16-fused"):
            with pytest.raises(ConfigError, match=f"{name} weights need the fused CPU kernels"):
                LeanLlama(bf16_llama(6, monkeypatch), weights=name).forward([1, 2])
    finally:
        fused_module.fused_ops.cache_clear()


def test_fused_kernels_are_off_where_asked_and_off_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert fused_module.wanted(cpu, None) and fused_module.wanted(cpu, True)
    assert not fused_module.wanted(cpu, False) and not fused_module.wanted(torch.device("cuda"), None)
    monkeypatch.setenv(fused_module.DISABLE_ENV, "0")
    assert not fused_module.wanted(cpu, None)
