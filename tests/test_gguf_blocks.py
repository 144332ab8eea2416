"""The `gguf` weight format: a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as stored, multiplied by the fused kernels'
block products. A verification of n rows rounds as n one-token steps do, so drafting changes no greedy token;
the AVX2 build gives the AVX-512 build's bits."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from draftsmith.cached_lm import BackendConfig, GGUF_BLOCKS, WeightFormat, choose_format
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.fused import fused_ops
from draftsmith.gguf_load import attach_blocks, dequantize_blocks
from tiny_models import tiny_llama

pytestmark = pytest.mark.skipif(fused_ops() is None or fused_ops().vector_isa() == "generic",
                                reason="the block products need the fused kernels built for AVX2 or AVX-512")
KINDS = ("Q4_0", "Q4_1", "Q8_0")


def _blocks(kind: str, rows: int, columns: int, seed: int) -> torch.Tensor:
    values = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32) * 0.1
    return torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]))


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_rounds_as_its_rows_do_one_at_a_time(kind):
    qtype = int(gguf.GGMLQuantizationType[kind])
    blocks = _blocks(kind, 70, 96, seed=1)  # 70 weight rows: the 4-row tiles and a remainder
    weights = dequantize_blocks(blocks, qtype)
    x = torch.randn(67, 96)
    batch = fused_ops().block_product(x, blocks, qtype)
    one_by_one = torch.cat([fused_ops().block_product(x[i : i + 1], blocks, qtype) for i in range(len(x))])
    assert torch.equal(batch, one_by_one)
    for n in (2, 5, 8, 64):
        assert torch.equal(fused_ops().block_product(x[:n], blocks, qtype), one_by_one[:n])
    # the product of the stored weights, up to float32 rounding of the sums
    assert torch.allclose(batch.double(), x.double() @ weights.double().T, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("kind,dtype", [(kind, torch.float32) for kind in KINDS] + [("Q4_1", torch.bfloat16)])
def test_drafting_changes_no_greedy_token_in_the_gguf_format(kind, dtype):
    model = _quantized_tiny(kind).to(dtype)  # bfloat16: the fused small operations around the products
    assert choose_format(model) == WeightFormat(GGUF_BLOCKS)
    prompt = [5, 9, 14, 3, 5, 9, 14]
    config = GenerationConfig(max_new_tokens=40, k=6, stop_on_eos=False)
    plain = SpecEngine(model).generate(prompt, config)
    drafted = SpecEngine(model, NgramDrafter()).generate(prompt, config)
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
from draftsmith.fused import fused_ops
ops = fused_ops()
out = {"isa": ops.vector_isa()}
for kind in ("Q4_0", "Q4_1", "Q8_0"):
    values = np.random.default_rng(2).standard_normal((37, 128)).astype(np.float32) * 0.1
    blocks = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind]))
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((9, 128)).astype(np.float32))
    out[kind] = ops.block_product(x, blocks, int(gguf.GGMLQuantizationType[kind])).view(torch.int32).tolist()
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
