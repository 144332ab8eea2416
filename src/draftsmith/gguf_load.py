"""Load a Llama-family GGUF's weights straight from the file, memory-mapped, one tensor at a time.

transformers' GGUF support parses the file's metadata once for the config, once for the tokenizer and once for
the weights (gguf-py reads the 49k-token vocabulary element by element, seconds each time), builds a tensor-name
map per module, and dequantizes every tensor to float32 before the model casts them: ~15 s for SmolLM2-135M,
where generating 48 tokens takes 0.6 s. Here the config and tokenizer are converted by transformers once per file
and kept in draftsmith's cache folder with a table of the file's tensors (name, type, shape, offset); later loads
read that folder and dequantize each tensor from the memory-mapped file with gguf-py's own `dequantize`, straight
into the model's dtype, into the light module tree the lean forward runs (`gguf_model.GgufLlama`; no transformers
modelling imported). A target that multiplies its file's own blocks reads only those, the embedding and the norms;
float weights are read when something asks for them. Each layer's q/k/v and gate/up weights land as row blocks of
one tensor, so the lean forward's fused products need no second copy (see `backends.formats.joined_rows`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from draftsmith.gguf_model import GgufLlama, attach_blocks
from draftsmith.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DIRECT_MODEL_TYPES = {"llama", "mistral", "qwen2"}  # architectures read here; others go through transformers
TABLE = "tensors.json"
# rows of these weights are stored together (the lean forward multiplies each group as one product)
JOINED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a GGUF file lies and how it is encoded."""

    gguf_name: str
    hf_name: str | None  # None: a tensor the transformers model has no parameter for (rope_freqs, ...)
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: [rows, columns] for a weight matrix
    offset: int  # from the file's start
    n_bytes: int

    def raw(self, file: np.memmap) -> np.ndarray:
        """The stored bytes as gguf-py's `dequantize` takes them: [..., bytes of a row] (no copy)."""
        return file[self.offset : self.offset + self.n_bytes].reshape(*self.shape[:-1], -1)

    def dequantized(self, file: np.memmap, rows: slice = slice(None)) -> torch.Tensor | np.ndarray:
        """float32 values [*shape] (of `rows` only, for a matrix): torch's vectorized operations for the block
        types llama.cpp's 4- and 8-bit files use (the same float32 operations as gguf-py's, so the same bits),
        gguf-py's `dequantize` else."""
        import gguf

        raw = self.raw(file)[rows]
        if self.qtype in BLOCK_TYPES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns of the read-only mapping; nothing writes to it
                blocks = torch.from_numpy(raw)
            return dequantize_blocks(blocks, self.qtype).reshape(*raw.shape[:-1], self.shape[-1])
        return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(self.qtype))


VOCABULARY_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # one row per token
ROW_CHUNK = 4096  # rows of a vocabulary-sized tensor dequantized at a time

# GGML block types: (bytes a block, weights a block)
Q4_0, Q4_1, Q8_0 = 2, 3, 8
BLOCK_TYPES = {Q4_0: (18, 32), Q4_1: (20, 32), Q8_0: (34, 32)}


def dequantize_blocks(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """float32 weights of GGML blocks (uint8 [..., blocks * bytes]): Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0
    d * q, with d (and m) the block's float16 scale (and minimum), q its 4-bit (low nibbles first, then high)
    or 8-bit values."""
    size, per_block = BLOCK_TYPES[qtype]
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if qtype == Q8_0:
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(*raw.shape[:-1], -1)
    packed = blocks[:, 4:] if qtype == Q4_1 else blocks[:, 2:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
    if qtype == Q4_0:
        return (d * (q - 8)).reshape(*raw.shape[:-1], -1)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return (d * q + m).reshape(*raw.shape[:-1], -1)


def file_key(path: Path) -> str:
    """Names a GGUF file's converted metadata: its resolved path, size and modification time."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}-{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def model_type_of(path: Path, convert: bool = False) -> str | None:
    """The transformers model type of a GGUF file, from its converted metadata (None where it was not converted
    yet, unless `convert`)."""
    config = (converted(path) if convert else cache_dir() / "gguf" / file_key(path)) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def converted(path: Path) -> Path:
    """draftsmith's cache folder holding this GGUF's config, tokenizer and tensor table, converted on first use."""
    folder = cache_dir() / "gguf" / file_key(path)
    if (folder / TABLE).is_file():
        return folder
    import gguf

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))  # this process's own
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    table = []
    if config.model_type in DIRECT_MODEL_TYPES:
        reader = gguf.GGUFReader(path)
        names = gguf_to_hf_names(config, [t.name for t in reader.tensors])
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            table.append(asdict(StoredTensor(t.name, names.get(t.name), int(t.tensor_type), shape,
                                             int(t.data_offset), int(t.n_bytes))))
    (tmp / TABLE).write_text(json.dumps(table))
    try:
        tmp.rename(folder)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def gguf_to_hf_names(config, gguf_names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> the transformers parameter it holds, by gguf-py's own name map (built once)."""
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == config.model_type)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        hf_names = AutoModelForCausalLM.from_config(config).state_dict().keys()
    by_gguf = {}
    for hf_name in hf_names:
        stem, _, suffix = hf_name.rpartition(".")
        mapped = name_map.get_name(stem)
        if mapped is not None:
            by_gguf[f"{mapped}.{suffix}"] = hf_name
    return {name: by_gguf[name] for name in gguf_names if name in by_gguf}


def saved_config(folder: Path):
    """The converted config's fields as saved, in transformers' generic config class: the model type's own config
    module imports transformers' modelling stack (seconds), which loading the lean forward does not need."""
    from transformers import PretrainedConfig

    return PretrainedConfig.from_json_file(folder / "config.json")


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    folder = converted(path)
    return AutoTokenizer.from_pretrained(folder, config=saved_config(folder))  # the config only names the model type


def load_config(path: Path):
    return AutoConfig.from_pretrained(converted(path))


def stored_tensors(path: Path) -> list[StoredTensor]:
    return [StoredTensor(**{**entry, "shape": tuple(entry["shape"])})
            for entry in json.loads((converted(path) / TABLE).read_text())]


@torch.no_grad()
def load_gguf_llama(path: Path, dtype: torch.dtype, defer_blocks: bool = False) -> GgufLlama:
    """The weights of a Llama-family GGUF file in `dtype` as the lean forward reads them (`GgufLlama`), each
    dequantized from the memory-mapped file one tensor at a time (the peak is the model plus one tensor in
    float32); linears stored in GGML blocks keep a reader of those blocks. `defer_blocks`: those linears' float
    weights are read only if something asks for them (`GgufLlama.materialize`), as a target that multiplies
    its file's blocks never does: its load then holds the blocks, the embedding and the norms, nothing more."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    folder = converted(path)
    config = saved_config(folder)
    tensors = {t.hf_name: t for t in stored_tensors(path) if t.hf_name is not None}
    # the q/k rows llama.cpp's converter permuted for its rotary layout go back as transformers reads them
    arch = {"mistral": "llama"}.get(config.model_type, config.model_type)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    file = np.memmap(path, dtype=np.uint8, mode="r")

    def read(hf_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        stored = tensors[hf_name]
        if hf_name in VOCABULARY_ROWS:  # the largest tensors, which the processor leaves as stored: in row chunks,
            out = torch.empty(stored.shape, dtype=dtype) if out is None else out  # never one float32 copy whole
            for start in range(0, stored.shape[0], ROW_CHUNK):
                rows = slice(start, start + ROW_CHUNK)
                out[rows] = torch.as_tensor(stored.dequantized(file, rows))
            return out
        values = processor.process(weights=stored.dequantized(file), name=stored.gguf_name).weights
        if isinstance(values, np.ndarray):
            if not (values.flags.c_contiguous and values.flags.writeable):  # a view of the read-only file (F32)
                values = np.array(values)
            values = torch.from_numpy(values)
        source = values.contiguous()
        if out is None:
            return source.to(dtype)
        out.copy_(source)
        return out

    deferred = {name for name, t in tensors.items()
                if defer_blocks and t.qtype in BLOCK_TYPES and name.endswith(("_proj.weight", "lm_head.weight"))}
    with single_thread():
        state = _read_state(config, tensors, read, dtype, set(tensors) - deferred)
    placeholders = {name: torch.empty(tensors[name].shape, dtype=dtype, device="meta") for name in deferred}
    model = GgufLlama(config, state | placeholders, path.name, folder)
    if deferred:
        def read_deferred() -> dict[str, torch.Tensor]:
            with single_thread():
                return _read_state(config, tensors, read, dtype, deferred)

        model.defer_weights(read_deferred)
    for name, stored in tensors.items():  # the stored blocks, read when the `gguf` weight format asks for them
        if stored.qtype in BLOCK_TYPES and name.endswith(".weight"):
            attach_blocks(model.get_submodule(name.removesuffix(".weight")), stored.qtype,
                          functools.partial(_stored_blocks, path, stored, processor))
    return model


def _stored_blocks(path: Path, stored: StoredTensor, processor) -> torch.Tensor:
    raw = torch.from_numpy(np.array(stored.raw(np.memmap(path, dtype=np.uint8, mode="r"))))
    # rows permuted for llama.cpp's rotary layout go back as the dequantized weights did (rows are whole blocks)
    return processor.process(weights=raw, name=stored.gguf_name).weights.contiguous()


@contextlib.contextmanager
def single_thread():
    """Dequantization's small element-wise operations on one thread: they gain little from a second, and on a
    machine whose cores are busy OpenMP's waits between them turned a 0.8 s load into 25 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_state(config, tensors: dict, read, dtype: torch.dtype, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` by their transformers names; each layer's joined groups (JOINED) as row blocks of one
    tensor (where the whole group is read)."""
    state = {}
    for prefix in _layer_prefixes(config):
        for group in JOINED:
            group_names = [f"{prefix}.{name}.weight" for name in group]
            if not set(group_names) <= names:
                continue
            rows = [tensors[name].shape[0] for name in group_names]
            block = torch.empty(sum(rows), tensors[group_names[0]].shape[1], dtype=dtype)
            for name, part in zip(group_names, block.split(rows)):
                state[name] = read(name, part)
    for name in names - set(state):
        state[name] = read(name)
    return state


def _layer_prefixes(config) -> list[str]:
    return [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
