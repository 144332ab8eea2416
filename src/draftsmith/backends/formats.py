"""The layouts the lean forward keeps linear weights in, how each is packed and multiplied."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from draftsmith.backends.fused import fused_ops
from draftsmith.backends.fused import wanted as fused_wanted
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class WeightFormat:
    """How linear weights are stored for `x @ W.T` products: as transformers stores them ([out, in]),
    transposed ([in, out]), packed into oneDNN's blocked layout (the format torch.compile's CPU freezing
    uses), or packed as float16 for FBGEMM's products with float32 activations (`fp16`: offered only where
    packing rounds no weight of float16's normal range and overflows none, as for any bfloat16 model whose
    weights stay below 65504: 8 significant bits fit float16's 11; see `fp16_holds`). `bf16-fused` keeps
    bfloat16 weights as stored and multiplies them with the fused kernels' AVX512-BF16 dot products (float32 in
    and out, the rows rounded to bfloat16 inside; sums that do not depend on how many rows are fed); `gguf`
    multiplies a GGUF file's blocks as stored. On CPU the fastest differs by machine and dtype (MKL's AVX-512
    path, bf16 arithmetic or its emulation), so it is timed, not assumed: docs/design/backends.md."""

    name: str

    @property
    def lossy(self) -> bool:
        """Weight-only quantized: a different model, never chosen unless asked for by name."""
        return self.name in QUANTIZED

    @property
    def float_products(self) -> bool:
        """Products take and give float32 whatever the model's dtype (`fp16`): the lean forward then feeds them
        float32 norms and attention, and casts only what joins the residual stream."""
        return self.name in FLOAT_PRODUCT_FORMATS

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """An RMS norm's weight as `LeanLayers.norm` applies it: in float32 where the products take float32."""
        return weight.float() if self.float_products else weight

    def prepare_linears(self, linears: list[torch.nn.Module] | tuple) -> object:
        """The weights of these modules (rows stacked, in order) as this format multiplies them: the `gguf`
        format takes the GGML blocks they were loaded from, the others their weights."""
        if self.name == GGUF_AMX:
            return amx_block_tiles(*gguf_block_parts(linears))
        if self.name in FILE_BLOCK_FORMATS:
            return gguf_blocks(linears)
        return self.prepare(joined_rows([linear.weight for linear in linears]))

    def prepare(self, weight: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.name == "transposed":
            return weight.t().contiguous()
        if self.name == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        if self.name == "int8":
            return _int8_weight(weight)
        if self.name == "int4":
            return _int4_weight(weight)
        if self.name == Q8_BLOCKS:
            return q8_blocks(weight)
        if self.name == "fp16":
            return _fp16_weight(weight)
        if self.name == "fp16-fused":
            return weight.to(torch.float16).contiguous()
        if self.name == BF16_DOT:
            return weight.contiguous()
        if self.name == BF16_AMX:
            return amx_tiles(weight), weight.shape[0]
        return weight

    @property
    def product(self) -> Callable[[torch.Tensor, object], torch.Tensor]:
        """`x @ W.T` for weights this format prepared: one function per format, looked up once by the layers
        that call it 121 times a step."""
        if self.name in (*BLOCK_FORMATS, BF16_AMX):  # weights prepared as (tensor, an integer the kernel needs)
            kernel = _fused_product(self.name)
            return lambda x, weight: kernel(_cast(x, torch.float32), *weight)
        if self.name in FUSED_PRODUCTS:  # the kernel looked up here, once, not at each of a step's products
            kernel = _fused_product(self.name)
            return lambda x, weight: kernel(_cast(x, torch.float32), weight)
        return _PRODUCTS.get(self.name, F.linear)

    def multiply(self, x: torch.Tensor, weight) -> torch.Tensor:
        return self.product(x, weight)

    def share(self, prepared: torch.Tensor, linears: list[torch.nn.Linear] | tuple) -> None:
        """Re-point the linears' weights at views of `prepared` (their fused rows, in order), so the two copies
        become one. oneDNN's packed layout and quantized weights cannot be viewed: there the model keeps its
        own weights."""
        if self.name in ("onednn", *FP16_FORMATS, *FILE_BLOCK_FORMATS, BF16_AMX) or self.lossy:
            return
        rows = prepared if self.name in ("stored", BF16_DOT) else prepared.t()
        offset = 0
        for linear in linears:
            out = linear.weight.shape[0]
            linear.weight = torch.nn.Parameter(rows[offset : offset + out], requires_grad=False)
            offset += out


QUANTIZED = ("int8", "int4", "q8_0")


def _int8_product(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.aten._weight_int8pack_mm(rows, *weight).view(*x.shape[:-1], -1)


def _int4_product(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    packed, scales_and_zeros = weight
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, INT4_GROUP, scales_and_zeros)
    return out.view(*x.shape[:-1], -1)


def _fp16_product(x: torch.Tensor, weight) -> torch.Tensor:
    # float32 activations and sums: more precise than a bfloat16 product
    return torch.ops.quantized.linear_dynamic_fp16(x if x.dtype == torch.float32 else x.float(), weight)


_PRODUCTS: dict[str, Callable] = {
    "transposed": torch.matmul,
    "onednn": lambda x, weight: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
    "int8": _int8_product,
    "int4": _int4_product,
    "fp16": _fp16_product,
}
# weights packed as float16 (exact for bfloat16 values of its range), float32 activations and sums: FBGEMM's
# product, or the fused kernels' (csrc/fused_cpu.cpp: each weight row read once for up to 8 rows; opt-in)
FP16_FORMATS = ("fp16", "fp16-fused")
# bfloat16 weights as stored, multiplied by the fused kernels' AVX512-BF16 dot products: float32 activations
# rounded to bfloat16 inside the product (as bfloat16 products round them), float32 sums, float32 out
BF16_DOT = "bf16-fused"
# the same bfloat16 weights packed for AMX tiles (Intel CPUs since Sapphire Rapids), multiplied by the fused
# kernels' tile products: float32 activations rounded to bfloat16, float32 sums, float32 out, batch-invariant;
# up to 16 rows cost what one does, so a tree's verification costs about a one-token step
BF16_AMX = "bf16-amx"
# a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as stored (float16 scales and minimums, 4.5-8.5 bits a weight),
# multiplied by the fused kernels' block products: float32 activations and sums, batch-invariant
GGUF_BLOCKS = "gguf"
# a float model's weights quantized at load to GGML's Q8_0 blocks, multiplied by the same block products: a
# drafter beside a target that runs its file's blocks (lossy, so only for drafters, whose proposals are verified)
Q8_BLOCKS = "q8_0"
# the same blocks multiplied as llama.cpp multiplies them: activations quantized to 8 bits per block of 32,
# integer dot products (VNNI where present), float32 sums in a fixed order: batch-invariant as well
GGUF_INT8 = "gguf-int8"
# the same arithmetic as gguf-int8 on AMX's integer tiles (Intel CPUs since Sapphire Rapids), the blocks repacked at
# load (no weight changes): a verification's rows cost about what one row does
GGUF_AMX = "gguf-amx"
FILE_BLOCK_FORMATS = (GGUF_BLOCKS, GGUF_INT8, GGUF_AMX)  # formats that multiply a GGUF file's own blocks
BLOCK_FORMATS = (*FILE_BLOCK_FORMATS, Q8_BLOCKS)
FUSED_PRODUCTS = {"fp16-fused": "half_product", BF16_DOT: "bf16_product", BF16_AMX: "amx_product",
                  GGUF_BLOCKS: "block_product", GGUF_INT8: "block_product_int8", GGUF_AMX: "amx_block_product",
                  Q8_BLOCKS: "block_product"}
# formats whose products take and give float32
FLOAT_PRODUCT_FORMATS = (*FP16_FORMATS, BF16_DOT, BF16_AMX, *BLOCK_FORMATS)


def has_gguf_blocks(model: PreTrainedModel) -> bool:
    """Whether every weight the lean forward multiplies came from GGML blocks the `gguf` format multiplies."""
    inner = model.model
    head = inner.embed_tokens if model.lm_head.weight is inner.embed_tokens.weight else model.lm_head
    linears = [head] + [m for layer in inner.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    return all(hasattr(m, "gguf_blocks") for m in linears)


def gguf_block_parts(linears: list[torch.nn.Module] | tuple) -> tuple[list[torch.Tensor], int]:
    """The GGML blocks of these modules' weights, one tensor a module, and their GGML type."""
    missing = [m for m in linears if not hasattr(m, "gguf_blocks")]
    if missing:
        raise ConfigError(f"{GGUF_BLOCKS} weights multiply a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks; this model's "
                          "weights did not come from such a file: use another --weights format")
    kinds = {m.gguf_qtype for m in linears}
    if len(kinds) > 1:
        raise ConfigError(f"{GGUF_BLOCKS} weights: one product's weights are stored in several GGML types "
                          f"({sorted(kinds)}): use another --weights format")
    return [m.gguf_blocks() for m in linears], kinds.pop()


def gguf_blocks(linears: list[torch.nn.Module] | tuple) -> tuple[torch.Tensor, int]:
    """The GGML blocks of these modules' weights, rows stacked in order, and their GGML type."""
    blocks, qtype = gguf_block_parts(linears)
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)), qtype


def q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`weight` [out, in] as GGML's Q8_0 blocks (gguf's own quantizer: what llama.cpp writes), rows in order,
    and their GGML type."""
    import gguf

    if weight.shape[-1] % 32:
        raise ConfigError(f"{Q8_BLOCKS} weights need input sizes divisible by 32 (GGML's blocks), got "
                          f"{tuple(weight.shape)}: use another format")
    kind = gguf.GGMLQuantizationType.Q8_0
    blocks = gguf.quants.quantize(weight.detach().float().cpu().numpy(), kind)
    return torch.from_numpy(blocks), int(kind)


def _fused_product(name: str):
    ops = fused_ops()
    if ops is None:
        raise ConfigError(f"{name} weights need the fused CPU kernels, which could not be built here (see the "
                          "warning above): use --weights fp16")
    if name in BLOCK_FORMATS and ops.vector_isa() == "generic":
        raise ConfigError(f"{name} weights need a CPU with AVX2 and FMA (or AVX-512): use --dtype bfloat16")
    if name == BF16_DOT and not ops.bf16_dot_supported():
        raise ConfigError(f"{name} weights need a CPU with AVX512-BF16 dot products, which this one lacks: use "
                          "--weights fp16")
    if name == BF16_AMX and not ops.amx_supported():
        raise ConfigError(f"{name} weights need a CPU with AMX tiles (Intel, since Sapphire Rapids), which this one "
                          "lacks: use --weights bf16-fused or fp16")
    return getattr(ops, FUSED_PRODUCTS[name])


def _kernel_available(device: torch.device, fused: bool | None, supported: str) -> bool:
    """Whether a fused kernel can run here: on CPU, the fused kernels wanted and built, and `supported` (the
    build's own check of this CPU) true."""
    if not fused_wanted(device, fused):
        return False
    ops = fused_ops()
    return ops is not None and getattr(ops, supported)()


def bf16_dot_available(device: torch.device, fused: bool | None = None) -> bool:
    """Whether `bf16-fused` products can run here: a CPU with AVX512-BF16 dot products."""
    return _kernel_available(device, fused, "bf16_dot_supported")


def amx_available(device: torch.device, fused: bool | None = None) -> bool:
    """Whether `bf16-amx` products can run here: a CPU with AMX tiles, which the OS lets this process use."""
    return _kernel_available(device, fused, "amx_supported")


def amx_tiles(weight: torch.Tensor) -> torch.Tensor:
    """bfloat16 weights [out, in] as the AMX product reads them: [out / 16, in / 32, 16, 32], per block of 16
    outputs and 32 inputs the 16 input pairs x 16 outputs x 2 (zero-padded to whole tiles: zeros add nothing)."""
    out, size = weight.shape
    padded = F.pad(weight.detach().to(torch.bfloat16), (0, -size % 32, 0, -out % 16))
    blocks, depth = padded.shape[0] // 16, padded.shape[1] // 32
    return padded.view(blocks, 16, depth, 16, 2).permute(0, 2, 3, 1, 4).contiguous().view(blocks, depth, 16, 32)


def amx_block_available(device: torch.device, fused: bool | None = None) -> bool:
    """Whether `gguf-amx` products can run here: a CPU with AMX's integer tiles, which the OS lets us use."""
    return _kernel_available(device, fused, "amx_int8_supported")


def amx_block_tiles(blocks: list[torch.Tensor] | torch.Tensor, qtype: int) -> tuple[torch.Tensor, int, int]:
    """GGML blocks (Q4_0 / Q4_1 / Q8_0; uint8 [rows, in / 32 * block bytes], or a list of such row blocks in
    order) as the AMX block product reads them, with their type and row count: per 16 weight rows (zero rows pad
    the last) and block of 32 inputs, the weights in TDPBSUD's layout (groups of 4 inputs x 16 rows; 4-bit ones
    two to a byte, the tile's first half in the low nibbles), then the 16 float16 scales and, for Q4_1, the 16
    minimums: the file's numbers, moved (by the kernels' `amx_block_pack`)."""
    parts = [p.contiguous() for p in ([blocks] if isinstance(blocks, torch.Tensor) else blocks)]
    _fused_product(GGUF_AMX)  # says why when the kernels are missing
    return fused_ops().amx_block_pack(parts, qtype), qtype, sum(p.shape[0] for p in parts)


INT4_GROUP = 32  # weights per scale and zero point, as in llama.cpp's Q4_1 blocks


def _int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row, for aten's _weight_int8pack_mm."""
    w = weight.float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
    quantized = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
    return quantized, scales.to(weight.dtype)


def _fp16_weight(weight: torch.Tensor):
    # rounds values float16 cannot hold: who chooses the format decides what may round (a target's weights
    # only below float16's normal range, see fp16_holds; a drafter's freely: its proposals are verified)
    return torch.ops.quantized.linear_prepack_fp16(weight.float(), None)


FP16_NORMAL, FP16_MAX = 2.0**-14, 65504.0  # float16's normal range: 11 significant bits throughout


def fp16_holds(weights) -> bool:
    """Packing these weights as float16 keeps every one of float16's normal range exactly (bfloat16's 8
    significant bits fit its 11) and overflows none; smaller ones move by at most 2**-25, half float16's
    subnormal step, far below the rounding of the products they enter. float32 weights seldom qualify."""
    for w in weights:
        if w.dtype == torch.float16:
            continue
        if w.dtype == torch.bfloat16:  # every bf16 value of the normal range fits: only overflow can fail
            if not w.abs().amax() <= FP16_MAX:  # (NaN fails too)
                return False
            continue
        packed = w.to(torch.float16).to(w.dtype)
        normal = w.abs() >= FP16_NORMAL
        if not torch.isfinite(packed).all() or not torch.equal(packed[normal], w[normal]):
            return False
    return True


_FP16_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> fp16_holds of its linear weights


def model_fp16_holds(model: PreTrainedModel) -> bool:
    if model not in _FP16_HOLDS:
        _FP16_HOLDS[model] = fp16_holds(m.weight for m in model.modules() if isinstance(m, torch.nn.Linear))
    return _FP16_HOLDS[model]


def _int4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of INT4_GROUP along the input (minimum and step per group, like Q4_1), packed
    for aten's _weight_int4pack_mm_for_cpu, which reads w = (q - 8) * scale + zero."""
    rows, columns = weight.shape
    if columns % INT4_GROUP or rows % 16:
        raise ConfigError(f"int4 weights need input sizes divisible by {INT4_GROUP} and output sizes by 16 "
                          f"(aten's packing), got {rows} x {columns}: use int8 or another format")
    groups = weight.float().reshape(rows, columns // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    quantized = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, columns)
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized, 1), scales_and_zeros


def candidate_formats(weight: torch.Tensor, fp16: bool | None = None, fused: bool | None = False
                      ) -> list[WeightFormat]:
    """The formats worth timing for this weight. They agree with F.linear up to float rounding (the order of a
    dot product's additions differs by kernel, as it does between batch sizes within one kernel). `fp16`:
    whether packing the model's weights as float16 keeps them (`fp16_holds`; None: this weight's, for a model's
    part of which this is the largest product)."""
    if weight.device.type != "cpu":
        return [WeightFormat("stored")]
    names = ["stored", "transposed"]
    # oneDNN's packed bf16 weights need AVX-512 (or AVX-NE-CONVERT): an AVX2-only CPU raises on them
    bf16_ok = weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if torch.backends.mkldnn.is_available() and bf16_ok:
        names.append("onednn")
    if fp16 is None:
        fp16 = fp16_holds([weight])
    if fp16 and "fbgemm" in torch.backends.quantized.supported_engines:
        names.append("fp16")
    # fused: whether the lean forward may use the fused kernels (False for a lone product's timing, which
    # cannot see what they save; see fastest_step_format)
    if weight.dtype == torch.bfloat16 and fused is not False and bf16_dot_available(weight.device, fused):
        names.append(BF16_DOT)
    if weight.dtype == torch.bfloat16 and fused is not False and amx_available(weight.device, fused):
        names.append(BF16_AMX)
    return [WeightFormat(name) for name in names]




def joined_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights' rows stacked: the tensor they already are row blocks of, in order (as gguf_load stores a
    layer's q/k/v and gate/up), else a concatenated copy."""
    first = weights[0]
    adjacent = all(w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   for w in weights) and all(
        b.storage_offset() == a.storage_offset() + a.numel() for a, b in zip(weights, weights[1:]))
    if adjacent:
        rows = sum(w.shape[0] for w in weights)
        return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
    return torch.cat(weights)



def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a Python comparison is cheaper than a no-op `.to` call, and the lean step makes ~10 of them a layer
    return x if x.dtype == dtype else x.to(dtype)
