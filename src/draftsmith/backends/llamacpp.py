"""llama.cpp as a target backend: our loop, drafters and acceptance rules, with llama.cpp scoring each draft.

`LlamaCppModel` stands where the engine expects a transformers model (config, device, dtype, generation config)
and `LlamaCppLM` is the third implementation of the cached-LM interface (beside `LeanLlama` and `HFCachedLM`):
feed tokens at positions, get float32 logits for every fed token, keep the accepted entries.

One step is one `llama_decode` of the root and every draft node, with logits for each. Rolling back is removing
cache cells by position. A tree is verified in the same single decode through sequence ids: leaf i of the tree
owns sequence i, every node belongs to the sequences of the leaves below it (the root to all), and the cached
prefix is shared with every sequence first. llama.cpp lets a token see a cached cell when the cell holds the
token's sequence at a position not after it, so each node sees exactly the prefix, its ancestors and itself.
After acceptance the leaf sequence through the last accepted node is kept and renamed back to sequence 0.

Needs the optional extra: `pip install "draftsmith[llamacpp]"` (builds llama.cpp from source).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, PretrainedConfig

from draftsmith.errors import ConfigError, ModelLoadError

INSTALL_HINT = ('pip install "draftsmith[llamacpp]" (llama-cpp-python, which compiles llama.cpp from source: '
                "about 20 minutes on 2 cores)")
MAX_TREE_LEAVES = 64  # sequence ids a verified tree may use: one per leaf
BATCH = 512  # tokens per llama_decode call; longer prompts are fed in chunks
# GGUF file types (general.file_type) whose weights are plain floats, and the torch dtype they correspond to
FILE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}
log = logging.getLogger(__name__)


def llama_cpp_module():
    """The llama_cpp bindings, or a ConfigError saying how to install them."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(f"the llama.cpp backend and peers need llama-cpp-python: {INSTALL_HINT}") from e
    _quiet_logs(llama_cpp)
    return llama_cpp


@functools.cache
def _quiet_logs(llama_cpp) -> None:
    """llama.cpp logs every load to stderr; pass its errors and warnings to Python logging instead."""
    levels = {4: logging.ERROR, 3: logging.WARNING}  # GGML_LOG_LEVEL_ERROR, _WARN

    @llama_cpp.llama_log_callback
    def forward(level, text, user_data):
        if level in levels and text:
            log.log(levels[level], "llama.cpp: %s", text.decode(errors="replace").rstrip())

    _quiet_logs.callback = forward  # ctypes calls it for the life of the process: keep it alive
    llama_cpp.llama_log_set(forward, ctypes.c_void_p())
    llama_cpp.llama_backend_init()


@dataclass
class LlamaCppModel:
    """A GGUF file loaded by llama.cpp, with what the engine reads of a model: its transformers config (from the
    same file), device (cpu), dtype (of the file's weights where they are plain floats; quantized files report
    float32, the precision they are computed in) and generation config."""

    path: Path
    config: PretrainedConfig
    threads: int = field(default_factory=torch.get_num_threads)
    device: torch.device = field(default=torch.device("cpu"), init=False)

    def __post_init__(self) -> None:
        llama_cpp = llama_cpp_module()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load {self.path} (see the log above for why)")
        self.handle = handle
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(handle))
        self.file_type = _file_type(self.path)
        self.dtype = FILE_DTYPES.get(self.file_type, torch.float32)
        self.generation_config = GenerationConfig.from_model_config(self.config)
        self._free = llama_cpp.llama_model_free

    @property
    def weight_type(self) -> str:
        import gguf

        try:
            return gguf.LlamaFileType(self.file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"type{self.file_type}"

    def new_cached_lm(self) -> LlamaCppLM:
        return LlamaCppLM(self)

    def __del__(self) -> None:
        if getattr(self, "handle", None):
            self._free(self.handle)
            self.handle = None


def _file_type(path: Path) -> int:
    import gguf

    field_ = gguf.GGUFReader(path).fields.get("general.file_type")
    return int(field_.contents()) if field_ is not None else -1


class LlamaCppLM:
    """The cached-LM interface over one llama.cpp context (its own KV cache)."""

    def __init__(self, model: LlamaCppModel, context: int | None = None):
        self.llama_cpp = lc = llama_cpp_module()
        self.model, self.device, self.n_vocab = model, model.device, model.n_vocab
        params = lc.llama_context_default_params()
        params.n_ctx = context or model.config.max_position_embeddings
        params.n_batch = params.n_ubatch = BATCH
        params.n_seq_max = MAX_TREE_LEAVES
        params.kv_unified = True  # every sequence shares the prefix's cells, so a tree costs no copies
        params.n_threads = params.n_threads_batch = model.threads
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(model.handle, params)
        if not self.ctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {model.path}")
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(BATCH, 0, MAX_TREE_LEAVES)
        self.length = 0
        self._row_sequences: list[list[int]] | None = None  # per row of the last tree forward

    def reset(self, capacity: int = 0) -> None:
        self.llama_cpp.llama_memory_clear(self.memory, True)
        self.length, self._row_sequences = 0, None

    @torch.no_grad()
    def forward(
        self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
        last_only: bool = False, features: bool = False,
    ) -> torch.Tensor:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache."""
        if features:
            raise ConfigError("the llama.cpp backend does not return the target's hidden features: run feature "
                              "drafters (eagle, medusa) on the torch backend")
        if tree_mask is None and len(ids) > BATCH:
            chunks = [ids[offset : offset + BATCH] for offset in range(0, len(ids), BATCH)]
            logits = [self.forward(chunk, last_only=last_only) for chunk in chunks]
            return logits[-1] if last_only else torch.cat(logits)
        if len(ids) > BATCH:
            raise ConfigError(f"the llama.cpp backend verifies drafts of at most {BATCH - 1} nodes")
        start = self.length
        if positions is None:
            positions = list(range(start, start + len(ids)))
        sequences = [[0]] * len(ids) if tree_mask is None else self._tree_sequences(tree_mask)
        for sequence in range(1, len(sequences[0])):  # the root belongs to every leaf's sequence
            self.llama_cpp.llama_memory_seq_cp(self.memory, 0, sequence, -1, -1)
        self._decode(ids, positions, sequences, last_only)
        self.length = start + len(ids)
        self._row_sequences = sequences if tree_mask is not None else None
        rows = 1 if last_only else len(ids)
        logits = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return torch.from_numpy(logits.copy())

    def _decode(self, ids: list[int], positions: list[int], sequences: list[list[int]], last_only: bool) -> None:
        batch = self.batch
        batch.n_tokens = len(ids)
        for i, (token, position, owners) in enumerate(zip(ids, positions, sequences)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, len(owners)
            for j, sequence in enumerate(owners):
                batch.seq_id[i][j] = sequence
            batch.logits[i] = not last_only or i == len(ids) - 1
        status = self.llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} (1: no room left in the KV cache of "
                               f"{self.llama_cpp.llama_n_ctx(self.ctx)} cells)")

    @staticmethod
    def _tree_sequences(tree_mask: torch.Tensor) -> list[list[int]]:
        """Sequence ids of each row of a tree mask (row i allows its ancestors and itself): leaf j owns sequence
        j, a node the sequences of the leaves below it."""
        allowed = tree_mask.cpu().bool()
        ancestors_of_others = allowed.clone()
        ancestors_of_others.fill_diagonal_(False)
        leaves = [row for row in range(len(allowed)) if not ancestors_of_others[:, row].any()]
        if len(leaves) > MAX_TREE_LEAVES:
            raise ConfigError(f"the llama.cpp backend verifies trees of at most {MAX_TREE_LEAVES} leaves, this one "
                              f"has {len(leaves)}: draft smaller trees or chains")
        return [[j for j, leaf in enumerate(leaves) if allowed[leaf, row]] for row in range(len(allowed))]

    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (a chain's prefix, or a tree's root-to-node path) and drop the rest."""
        lc, end = self.llama_cpp, start + len(offsets)
        if self._row_sequences is not None:
            survivor = self._row_sequences[offsets[-1]][0]  # a leaf sequence through the last kept node
            lc.llama_memory_seq_keep(self.memory, survivor)
            lc.llama_memory_seq_rm(self.memory, survivor, end, -1)
            if survivor != 0:
                lc.llama_memory_seq_cp(self.memory, survivor, 0, -1, -1)
                lc.llama_memory_seq_rm(self.memory, survivor, -1, -1)
            self._row_sequences = None
        elif offsets != list(range(len(offsets))):
            raise ConfigError("the llama.cpp backend keeps a chain's prefix only")
        self.truncate(end)

    def truncate(self, length: int) -> None:
        self.llama_cpp.llama_memory_seq_rm(self.memory, -1, length, -1)
        self.llama_cpp.llama_memory_seq_keep(self.memory, 0)
        self.length, self._row_sequences = length, None

    def __del__(self) -> None:
        if getattr(self, "ctx", None):
            self.llama_cpp.llama_batch_free(self.batch)
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None
