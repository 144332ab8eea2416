"""Which weight format the lean forward runs: one named, or the one whose whole step was timed fastest here."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from draftsmith.backends.formats import (BF16_AMX, BF16_DOT, FILE_BLOCK_FORMATS, FP16_FORMATS, GGUF_AMX, GGUF_BLOCKS,
                                         GGUF_INT8, Q8_BLOCKS, QUANTIZED, WeightFormat, amx_block_available,
                                         candidate_formats, has_gguf_blocks, model_fp16_holds)
from draftsmith.backends.fused import fused_ops
from draftsmith.backends.fused import wanted as fused_wanted
from draftsmith.backends.layers import LeanLayers, lean_layer, rope_tables
from draftsmith.backends.timing import CLEAR_MARGIN, cached_choice, fastest, measured_once
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TIMED_ROWS = (1, 8)  # a one-token step and a verification: a format is timed on both, summed


@torch.no_grad()
def fastest_format(weight: torch.Tensor, fp16: bool | None = None, rounds: int = 7, repeats: int = 3,
                   fused: bool | None = False) -> WeightFormat:
    """Time products of 1 and 8 rows with `weight` in each candidate format and keep the fastest (see
    `fastest`): a format whose cost grows steeply with rows (aten's emulated bf16 on AVX2) loses there what
    speculative decoding's verification would lose. `fused`: whether the fused kernels' products compete."""
    formats = candidate_formats(weight, fp16, fused)
    if len(formats) == 1:
        return formats[0]
    inputs = [torch.randn(1, rows, weight.shape[1], dtype=weight.dtype) for rows in TIMED_ROWS]
    prepared = {}
    for fmt in formats:
        try:
            prepared[fmt] = fmt.prepare(weight)
            fmt.multiply(inputs[0], prepared[fmt])  # warm-up
        except RuntimeError:  # a torch build without this kernel
            prepared.pop(fmt, None)

    def products(fmt: WeightFormat) -> None:
        for x in inputs:
            fmt.multiply(x, prepared[fmt])

    return fastest({fmt: functools.partial(products, fmt) for fmt in preferred_first(list(prepared))}, rounds, repeats)


# the order that decides when no candidate wins clearly: the fused kernels' formats (built for a whole step)
# first, then FBGEMM's and oneDNN's packed products, then aten's
FORMAT_PREFERENCE = (BF16_DOT, BF16_AMX, "fp16-fused", "fp16", "onednn", "transposed", "stored")


def preferred_first(formats: list[WeightFormat]) -> list[WeightFormat]:
    rank = {name: i for i, name in enumerate(FORMAT_PREFERENCE)}
    return sorted(formats, key=lambda f: rank.get(f.name, len(rank)))


WEIGHT_CHOICES = ("auto", "fastest", "stored", "transposed", "onednn", *FP16_FORMATS, BF16_DOT, BF16_AMX,
                  GGUF_BLOCKS, GGUF_INT8, GGUF_AMX, *QUANTIZED)


def choose_format(model: PreTrainedModel, weights: str = "auto", fused: bool | None = None) -> WeightFormat:
    """`auto`: float32 keeps transformers' own layout and kernel (F.linear), so its logits are transformers'
    bit for bit, as `--dtype float32` promises; other dtypes take the fastest format. `fastest`: the format
    whose lean decoding step (`fastest_step_format`, with the fused kernels as `fused` asks) was timed fastest
    on this machine for this dtype and shape, measured ONCE and cached on disk (timing at every load could pick
    differently between two loads, and so round differently). Or a format by name: `int8` and `int4` quantize
    the weights (lossy: another model, whose greedy output is compared, never promised equal; never chosen
    unless named)."""
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"unknown weight format '{weights}': use one of {', '.join(WEIGHT_CHOICES)}")
    if weights == "auto" and runs_file_blocks(model):
        weights = default_block_format(model.device)  # a GGUF target loaded without a --dtype: the file's own blocks
    if weights == "auto":
        weights = "stored" if model.dtype == torch.float32 else "fastest"
    if weights not in FILE_BLOCK_FORMATS and hasattr(model, "materialize"):
        model.materialize()  # a GGUF target's float weights, deferred at load while its blocks were the plan
    cpu_only = (*QUANTIZED, *FP16_FORMATS, BF16_DOT, BF16_AMX, GGUF_BLOCKS, GGUF_INT8, GGUF_AMX)
    if weights in cpu_only and model.device.type != "cpu":
        raise ConfigError(f"{weights} weights use CPU kernels (aten's, FBGEMM's); on {model.device.type} use "
                          "another format")
    if weights in FP16_FORMATS and not model_fp16_holds(model):
        raise ConfigError(f"{weights} weights would round this {model.dtype} model's weights (some have more significant "
                          "bits than float16 holds, or exceed its range): use another format")
    if weights == GGUF_AMX and not amx_block_available(model.device):
        raise ConfigError(f"{GGUF_AMX} weights need a CPU with AMX's integer tiles (Intel since Sapphire Rapids) "
                          "and the fused kernels: use gguf or gguf-int8")
    if weights in (BF16_DOT, BF16_AMX) and model.dtype != torch.bfloat16:
        raise ConfigError(f"{weights} weights multiply bfloat16 weights: load the model with --dtype bfloat16")
    if weights != "fastest":
        return WeightFormat(weights)
    # fp16 is a CPU format: elsewhere its check would only cost time at load
    fp16 = model.device.type == "cpu" and model_fp16_holds(model)
    formats = candidate_formats(model.lm_head.weight, fp16, fused)
    if len(formats) == 1:
        return formats[0]
    # the fused kernels change what a format's step costs (they run only beside float32 products): part of the key
    fused_on = fused_wanted(model.device, fused) and fused_ops() is not None
    cfg = model.config
    shape = (f"{cfg.num_hidden_layers}x{cfg.hidden_size}x{cfg.intermediate_size}-heads{cfg.num_attention_heads}/"
             f"{cfg.num_key_value_heads}-vocab{model.lm_head.weight.shape[0]}")
    key = (f"step-{model.dtype}-{shape}-{'+'.join(f.name for f in formats)}-rows{'+'.join(map(str, TIMED_ROWS))}"
           f"-fused{int(fused_on)}-clear{CLEAR_MARGIN}")  # (choices made before margins were measured again)
    def measure() -> dict:
        timing = {}
        return {"choice": fastest_step_format(model, formats, fused, timing=timing).name, **timing}

    return WeightFormat(cached_choice(measured_once(key, measure)))



def default_block_format(device: torch.device) -> str:
    """How a GGUF target multiplies its file's blocks by default: on AMX's integer tiles where the CPU has them
    (llama.cpp's 8-bit-activation arithmetic; a verification of 16 rows at ~1.5x a one-token step, and a faster
    one-token step than `gguf`'s: docs/results/2026-12-04-verification-kernels.md); with the same arithmetic
    through AVX2's byte products where the kernels are an AVX2 build (faster than float32 activations there, for
    steps and verifications: docs/results/2026-12-05-avx2-kernels.md); else with float32 activations (AVX-512
    without AMX: measured mixed, a faster step and a slower verification)."""
    if amx_block_available(device):
        return GGUF_AMX
    ops = fused_ops()
    return GGUF_INT8 if ops is not None and ops.vector_isa() == "avx2" else GGUF_BLOCKS


def runs_file_blocks(model: PreTrainedModel) -> bool:
    """Whether the lean forward runs this model on its GGUF file's own blocks by default (a GGUF target loaded on
    CPU without a --dtype, where the block kernels could be built: without a C++ compiler, or on a CPU without
    AVX2, the model runs its dequantized weights instead of failing)."""
    if not (getattr(model, "gguf_blocks_default", False) and has_gguf_blocks(model)):
        return False
    ops = fused_ops()
    return ops is not None and ops.vector_isa() != "generic"


def drafter_format(target: PreTrainedModel) -> WeightFormat | None:
    """The format a drafter beside `target` multiplies in, where its own fastest is not the answer: beside a
    target that runs its file's blocks, its weights as Q8_0 blocks through the same block products (lossy for the
    drafter alone: the target verifies what it proposes). None: the drafter's own choice."""
    return WeightFormat(Q8_BLOCKS) if runs_file_blocks(target) else None


STEP_PROBE_BYTES = 512 * 2**20  # a format's step is timed on the model's first layers up to this many bytes


@torch.no_grad()
def fastest_step_format(model: PreTrainedModel, formats: list[WeightFormat], fused: bool | None = None,
                        context: int = 256, rounds: int = 5, timing: dict | None = None) -> WeightFormat:
    """The format whose lean decoding steps (1 and 8 tokens after `context` cached ones: a step and a
    verification) run fastest here: every layer's products, norms, attention and cache writes as the lean
    forward does them, and the output head. Timing the products alone misjudged it: two formats whose products
    tie can differ by a quarter in a whole step, which also pays for casts, norms and attention in the dtype
    the products hand on (docs/design/backends.md). A large model is timed on
    its first layers (STEP_PROBE_BYTES, more than any CPU cache holds), run over as often as it has layers."""
    cfg, inner = model.config, model.model
    per_layer = sum(p.numel() * p.element_size() for p in inner.layers[0].parameters())
    probe = max(1, min(len(inner.layers), STEP_PROBE_BYTES // max(per_layer, 1)))
    passes = -(-len(inner.layers) // probe)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = rope_tables(model)
    runs = {}
    for fmt in preferred_first(formats):
        try:
            layers = LeanLayers([lean_layer(layer, fmt, share=False) for layer in inner.layers[:probe]], fmt,
                                *rotary, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps,
                                model.dtype, model.device, fused=fused)
            layers.reset(context + max(TIMED_ROWS))
            layers.length = context  # zeros in the cache: attention reads `context` entries all the same
            runs[fmt] = functools.partial(_probe_steps, layers, fmt.prepare(model.lm_head.weight), passes, context)
            runs[fmt]()  # warm-up
        except RuntimeError:  # a torch build without this kernel
            runs.pop(fmt, None)
    return fastest(runs, rounds, repeats=1, timing=timing)


def _probe_steps(layers: LeanLayers, head, passes: int, context: int) -> None:
    """One step of each TIMED_ROWS size through the probe layers (`passes` times over) and the output head."""
    hidden, norm = layers.layers[0]["attn_norm"].shape[0], layers.layers[0]["attn_norm"]
    with torch.inference_mode():
        for rows in TIMED_ROWS:
            x = torch.randn(1, rows, hidden, device=layers.device).to(layers.stream_dtype)
            positions = torch.arange(context, context + rows, device=layers.device)
            mask = layers.attention_mask(rows, context, None, layers.device)
            for _ in range(passes):
                y = layers.decoder_layers(x, positions, mask, context, causal=False)
            layers.weights.multiply(layers.norm(y, norm), head)


def cached_fastest_format(weight: torch.Tensor, fp16: bool | None = None, fused: bool | None = False
                          ) -> WeightFormat:
    formats = candidate_formats(weight, fp16, fused)
    if len(formats) == 1:
        return formats[0]
    # the candidates and timed rows are part of the question: a new candidate is timed, not an old answer read
    names = "+".join(f.name for f in formats)
    key = f"{weight.dtype}-{tuple(weight.shape)}-{names}-rows{'+'.join(map(str, TIMED_ROWS))}"
    return WeightFormat(cached_choice(measured_once(key, lambda: fastest_format(weight, fp16, fused=fused).name)))
