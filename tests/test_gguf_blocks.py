"""The `gguf` weight format: a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as stored, multiplied by the fused kernels'
block products. A verification of n rows rounds as n one-token steps do, so drafting changes no greedy token;
the AVX2 build gives the AVX-512 build's bits."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from draftsmith.backends.format_choice import choose_format, default_block_format
from draftsmith.backends.formats import GGUF_AMX, GGUF_BLOCKS, WeightFormat, amx_block_available, amx_block_tiles
from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.backends.fused import fused_ops
from draftsmith.gguf_load import dequantize_blocks
from draftsmith.gguf_model import attach_blocks
from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(fused_ops() is None or fused_ops().vector_isa() == "generic",
                                reason="the block products need the fused kernels built for AVX2 or AVX-512")
KINDS = ("Q4_0", "Q4_1", "Q8_0")


def _blocks(kind: str, rows: int, columns: int, seed: int) -> torch.Tensor:
    values = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32) * 0.1
    return torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]))


def _batch_rounding_as_its_rows(product, x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """`product` of all of x's rows, asserted bit-equal to each row alone and to every shorter batch."""
    batch = product(x, blocks, qtype)
    one_by_one = torch.cat([product(x[i : i + 1], blocks, qtype) for i in range(len(x))])
    assert torch.equal(batch, one_by_one)
    for n in (2, 5, 8, 64):
        assert torch.equal(product(x[:n], blocks, qtype), one_by_one[:n])
    return batch


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_rounds_as_its_rows_do_one_at_a_time(kind):
    qtype = int(gguf.GGMLQuantizationType[kind])
    blocks = _blocks(kind, 70, 96, seed=1)  # 70 weight rows: the 4-row tiles and a remainder
    weights = dequantize_blocks(blocks, qtype)
    x = torch.randn(67, 96)
    batch = _batch_rounding_as_its_rows(fused_ops().block_product, x, blocks, qtype)
    # the product of the stored weights, up to float32 rounding of the sums
    assert torch.allclose(batch.double(), x.double() @ weights.double().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_int8_product_is_llama_cpps_arithmetic_and_a_batch_rounds_as_its_rows(kind):
    """`gguf-int8`: activations quantized per block of 32 to 8 bits (scale amax / 127), integer block sums: equal to
    that computation done in float64, and a batch of n rows bit-equal to its rows one at a time."""
    qtype = int(gguf.GGMLQuantizationType[kind])
    blocks = _blocks(kind, 70, 96, seed=1)
    weights = dequantize_blocks(blocks, qtype).double()
    x = torch.randn(67, 96)
    batch = _batch_rounding_as_its_rows(fused_ops().block_product_int8, x, blocks, qtype)
    grouped = x.view(67, 3, 32)
    scale = grouped.abs().amax(-1, keepdim=True) / 127
    quantized = (torch.round(grouped / scale) * scale).view(67, 96).double()  # what the kernel multiplies
    assert torch.allclose(batch.double(), quantized @ weights.T, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batch.double(), x.double() @ weights.T, atol=1e-6, rtol=1e-6)  # not float activations


needs_amx_int8 = pytest.mark.skipif(not amx_block_available(torch.device("cpu")),
                                    reason="gguf-amx needs a CPU with AMX's integer tiles (Intel, Sapphire Rapids on)")


def _tile_reference(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The AMX tile layout, element by element from the GGML blocks: block b of 16-row group g holds, for input
    i = 4 * quad + j of row r, the weight value at (quad * 16 + r) * 4 + j (4-bit ones: inputs 16-31 in the high
    nibble of inputs 0-15's bytes), then the rows' float16 scales and, for Q4_1, minimums."""
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    rows, nb = blocks.shape[0], blocks.shape[1] // size
    groups = (rows + 15) // 16
    tile_bytes = {"Q4_0": 288, "Q4_1": 320, "Q8_0": 544}[kind]
    out = torch.zeros(groups, nb, tile_bytes, dtype=torch.uint8)
    start = 4 if kind == "Q4_1" else 2
    scales_at = 512 if kind == "Q8_0" else 256
    for r in range(rows):
        for b in range(nb):
            block = blocks[r, b * size : (b + 1) * size]
            tile = out[r // 16, b]
            for i in range(32 if kind == "Q8_0" else 16):
                quad, j = divmod(i, 4)
                tile[(quad * 16 + r % 16) * 4 + j] = block[start + i]
            tile[scales_at + 2 * (r % 16) : scales_at + 2 * (r % 16) + 2] = block[0:2]
            if kind == "Q4_1":
                tile[scales_at + 32 + 2 * (r % 16) : scales_at + 34 + 2 * (r % 16)] = block[2:4]
    return out


@needs_amx_int8
@pytest.mark.parametrize("kind", KINDS)
def test_amx_block_pack_puts_each_stored_byte_where_the_tiles_read_it(kind):
    """The kernels' repacking (what a GGUF target's load runs) against the layout written out element by element;
    row blocks given as parts (q, k, v) pack as their rows stacked, and a partial last group is zero-padded."""
    qtype = int(gguf.GGMLQuantizationType[kind])
    blocks = _blocks(kind, 37, 64, seed=4)
    packed, packed_type, features = amx_block_tiles([blocks[:16], blocks[16:21], blocks[21:]], qtype)
    assert (packed_type, features) == (qtype, 37)
    assert torch.equal(packed, _tile_reference(blocks, kind))
    assert torch.equal(amx_block_tiles(blocks, qtype)[0], packed)


@needs_amx_int8
@pytest.mark.parametrize("kind", KINDS)
def test_the_amx_block_product_is_the_int8_arithmetic_and_a_batch_rounds_as_its_rows(kind):
    """`gguf-amx`: the blocks repacked into AMX's integer tiles give gguf-int8's arithmetic (8-bit activations per
    block, exact integer block sums) up to the order of the float32 scaling, and a batch of n rows (beyond one
    16-row tile; 70 weight rows: a padded last tile) bit-equal to its rows one at a time."""
    qtype = int(gguf.GGMLQuantizationType[kind])
    blocks = _blocks(kind, 70, 96, seed=2)
    packed, _, features = amx_block_tiles(blocks, qtype)
    assert features == 70 and packed.shape[:2] == (5, 3)

    def product(x, _blocks, _qtype):
        return fused_ops().amx_block_product(x, packed, qtype, features)

    # seeded: an activation at a tie of the 8-bit grid may round the other way in the float64 reference below
    x = torch.randn(67, 96, generator=torch.Generator().manual_seed(5))
    batch = _batch_rounding_as_its_rows(product, x, blocks, qtype)
    reference = fused_ops().block_product_int8(x, blocks, qtype)
    assert torch.allclose(batch, reference, atol=1e-5, rtol=1e-5)
    weights = dequantize_blocks(blocks, qtype).double()
    grouped = x.view(67, 3, 32)
    scale = grouped.abs().amax(-1, keepdim=True) / 127
    quantized = (torch.round(grouped / scale) * scale).view(67, 96).double()
    assert torch.allclose(batch.double(), quantized @ weights.T, atol=1e-4, rtol=1e-4)


def test_gguf_amx_is_the_default_where_the_cpu_has_it_and_refused_with_the_reason_where_not(monkeypatch):
    import draftsmith.backends.format_choice as format_choice
    from draftsmith.errors import ConfigError

    monkeypatch.setattr(format_choice, "amx_block_available", lambda device, fused=None: True)
    assert choose_format(_quantized_tiny()) == WeightFormat(GGUF_AMX)
    monkeypatch.setattr(format_choice, "amx_block_available", lambda device, fused=None: False)
    assert choose_format(_quantized_tiny()) == WeightFormat(GGUF_BLOCKS if fused_ops().vector_isa() == "avx512"
                                                            else "gguf-int8")
    for isa, chosen in (("avx512", GGUF_BLOCKS), ("avx2", "gguf-int8")):  # an AVX2 build: 8-bit activations
        monkeypatch.setattr(format_choice, "fused_ops", lambda isa=isa: SimpleNamespace(vector_isa=lambda: isa))
        assert choose_format(_quantized_tiny()) == WeightFormat(chosen), isa
    with pytest.raises(ConfigError, match="AMX's integer tiles"):
        choose_format(_quantized_tiny(), GGUF_AMX)


def _quantized_tiny(kind: str = "Q4_1", seed: int = 4):
    """A tiny Llama whose weights are what its GGML blocks dequantize to, the blocks attached as a GGUF load
    attaches them (the embedding, which the output head here is not tied to, stays float32)."""
    model = tiny_llama(seed=seed, hidden_size=64, vocab_size=96, init_std=0.3)
    qtype = int(gguf.GGMLQuantizationType[kind])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                blocks = torch.from_numpy(gguf.quants.quantize(module.weight.numpy(), gguf.GGMLQuantizationType[kind]))
                module.weight.copy_(dequantize_blocks(blocks, qtype))
                attach_blocks(module, qtype, lambda blocks=blocks: blocks)
    model.gguf_blocks_default = True
    return model


@pytest.mark.parametrize("kind,dtype,weights", [(kind, torch.float32, GGUF_BLOCKS) for kind in KINDS]
                         + [("Q4_1", torch.bfloat16, "auto")] + [(kind, torch.float32, "gguf-int8") for kind in KINDS]
                         + [pytest.param(kind, torch.float32, GGUF_AMX, marks=needs_amx_int8) for kind in KINDS])
def test_drafting_changes_no_greedy_token_in_the_gguf_formats(kind, dtype, weights):
    model = _quantized_tiny(kind).to(dtype)  # bfloat16: the fused small operations around the products
    assert choose_format(model) == WeightFormat(default_block_format(model.device))
    prompt = [5, 9, 14, 3, 5, 9, 14]
    config = GenerationConfig(max_new_tokens=40, k=6, stop_on_eos=False)
    backend = BackendConfig(weights=weights)
    plain = SpecEngine(model, backend=backend).generate(prompt, config)
    drafted = SpecEngine(model, NgramDrafter(), backend=backend).generate(prompt, config)
    assert drafted.tokens == plain.tokens and len(plain.tokens) == 40
    assert drafted.stats.accepted > 0 and drafted.stats.target_steps < plain.stats.target_steps  # drafts were verified in batches, not one token a step


def test_a_named_dtype_keeps_the_dequantized_paths():
    model = _quantized_tiny()
    model.gguf_blocks_default = False  # what load_model sets when --dtype is given
    assert choose_format(model) == WeightFormat("stored")
    plain = tiny_llama(seed=4, hidden_size=64, vocab_size=96)
    with pytest.raises(Exception, match="GGUF file"):
        SpecEngine(plain, backend=BackendConfig(weights=GGUF_BLOCKS))


AVX2_PROBE = """
import json, sys, torch, gguf, numpy as np
from draftsmith.backends.fused import fused_ops
ops = fused_ops()
out = {"isa": ops.vector_isa()}
for kind in ("Q4_0", "Q4_1", "Q8_0"):
    values = np.random.default_rng(2).standard_normal((37, 128)).astype(np.float32) * 0.1
    blocks = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]))
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((9, 128)).astype(np.float32))
    out[kind] = ops.block_product(x, blocks, int(gguf.GGMLQuantizationType[kind])).view(torch.int32).tolist()
    out[kind + "-int8"] = ops.block_product_int8(x, blocks, int(gguf.GGMLQuantizationType[kind])).view(torch.int32).tolist()
print(json.dumps(out))
"""


def test_the_avx2_build_gives_the_same_bits():
    """DRAFTSMITH_ISA=avx2 builds the kernels for AVX2 only (how this machine tests what an AVX2-only CPU runs);
    their 16 lanes are two AVX2 registers doing AVX-512's per-lane operations, so the products are equal."""
    runs = {}
    for isa in ("avx2", "native"):
        env = {**os.environ, "DRAFTSMITH_ISA": isa, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-c", AVX2_PROBE], capture_output=True, text=True, env=env, check=True)
        runs[isa] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["avx2"]["isa"] == "avx2"
    for kind in KINDS:
        assert runs["avx2"][kind] == runs["native"][kind], kind
        assert runs["avx2"][kind + "-int8"] == runs["native"][kind + "-int8"], kind  # maddubs + madd = VNNI's dpbusd


def test_q8_blocks_are_ggufs_own_quantization_and_multiply_on_the_block_kernels():
    from draftsmith.backends.formats import Q8_BLOCKS

    weight = torch.randn(40, 96) * 0.2
    blocks, qtype = WeightFormat(Q8_BLOCKS).prepare(weight)
    want = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert qtype == int(gguf.GGMLQuantizationType.Q8_0) and np.array_equal(blocks.numpy(), want)
    x = torch.randn(5, 96)
    product = WeightFormat(Q8_BLOCKS).multiply(x, (blocks, qtype))
    assert torch.allclose(product.double(), x.double() @ dequantize_blocks(blocks, qtype).double().T, atol=1e-5)
    with pytest.raises(Exception, match="divisible by 32"):
        WeightFormat(Q8_BLOCKS).prepare(torch.randn(8, 40))


def test_drafters_beside_a_4bit_target_draft_on_its_block_kernels_and_stay_exact():
    """An EAGLE head, Medusa heads and a draft model next to a target that runs its file's blocks multiply Q8_0 blocks through
    the same products (lossy for the drafter only): the greedy output is still plain decoding's."""
    from draftsmith.adaptive import CostCurve
    from draftsmith.backends.format_choice import drafter_format
    from draftsmith.backends.formats import Q8_BLOCKS
    from draftsmith.drafters.eagle import EagleDrafter, TreeConfig
    from draftsmith.drafters.medusa import MedusaDrafter
    from draftsmith.drafters.model import ModelDrafter
    from draftsmith.heads import EagleHead, HeadConfig, MedusaHeads

    model = _quantized_tiny("Q4_1")
    assert drafter_format(model) == WeightFormat(Q8_BLOCKS)
    assert drafter_format(tiny_llama(seed=4, hidden_size=64, vocab_size=96)) is None  # a float target: the drafter's own
    torch.manual_seed(0)
    head = EagleHead(HeadConfig.for_target("eagle", model, draft_vocab=0)).eval()
    eagle = EagleDrafter(head, model, TreeConfig(depth=3, top_k=3))
    eagle.costs = CostCurve([1, 64], [1.0, 1.0])
    small = ModelDrafter(tiny_llama(seed=9, hidden_size=64, vocab_size=96), backend=BackendConfig(weights=Q8_BLOCKS))
    medusa_heads = MedusaHeads(HeadConfig.for_target("medusa", model, draft_vocab=0)).eval()
    for block in medusa_heads.blocks:  # trained-looking heads: proposals that differ from the target's own
        torch.nn.init.normal_(block.weight, std=0.3)
    medusa = MedusaDrafter(medusa_heads, model)
    assert eagle.layers.weights == WeightFormat(Q8_BLOCKS) and small.lm.weights == WeightFormat(Q8_BLOCKS)
    assert medusa.format == WeightFormat(Q8_BLOCKS)
    feature = torch.randn(1, model.config.hidden_size)  # the blocks' logits are the float heads' up to Q8_0 rounding
    want = medusa.parts.logits(medusa_heads(feature)[:, 0])
    assert torch.allclose(medusa._logits(feature), want, atol=0.05 * float(want.abs().max()))
    prompt = [5, 9, 14, 3, 5, 9, 14]
    config = GenerationConfig(max_new_tokens=30, k=6, stop_on_eos=False)
    plain = SpecEngine(model).generate(prompt, config)
    for drafter in (eagle, small, medusa):
        assert SpecEngine(model, drafter).generate(prompt, config).tokens == plain.tokens


def test_the_weight_read_floor_counts_the_blocks_a_4bit_step_reads():
    from draftsmith.bench.runner import weight_read_floor

    model = _quantized_tiny("Q4_1")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    others = [p for m in model.modules() if not isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False)]
    want = sum(m.gguf_blocks().numel() for m in linears) + sum(p.numel() * p.element_size() for p in others)
    assert weight_read_floor(model, 1.0)["weight_mb"] * 2**20 == want
    model.gguf_blocks_default = False  # run dequantized: every weight in its float dtype
    assert weight_read_floor(model, 1.0)["weight_mb"] * 2**20 == sum(p.numel() * 4 for p in model.parameters())


def test_llama_cpp_peers_run_the_file_itself_where_the_run_multiplies_its_blocks(tmp_path, monkeypatch):
    """The run's own weights are the GGUF file when the run multiplies its blocks as stored: llama.cpp peers then
    decode that file, not an unquantized copy."""
    import draftsmith.gguf_export as gguf_export
    from draftsmith.bench.peers import run_gguf
    from draftsmith.models import LoadedModel

    source = tmp_path / "tiny.Q4_1.gguf"
    source.write_bytes(b"GGUF")  # only its path and stat are read here
    written = []
    monkeypatch.setattr(gguf_export, "write_gguf", lambda model, path, *args: written.append(path))
    model = _quantized_tiny("Q4_1")
    assert run_gguf(LoadedModel(model, None, str(source))) == source and written == []
    model.gguf_blocks_default = False  # dequantized (--dtype given): an unquantized GGUF in the run's dtype
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run_gguf(LoadedModel(model, None, str(source))) != source and len(written) == 1


def test_without_the_block_kernels_a_gguf_target_runs_its_dequantized_weights(monkeypatch):
    """No C++ compiler (or no AVX2): the default falls back to the float weights the loader keeps, never an error."""
    import draftsmith.backends.format_choice as format_choice

    model = _quantized_tiny("Q4_1")
    assert choose_format(model) == WeightFormat(default_block_format(model.device))
    monkeypatch.setattr(format_choice, "fused_ops", lambda: None)
    assert choose_format(model) == WeightFormat("stored") and format_choice.drafter_format(model) is None
    prompt = [5, 9, 14, 3]
    assert len(SpecEngine(model).generate(prompt, GenerationConfig(max_new_tokens=8, stop_on_eos=False)).tokens) == 8
