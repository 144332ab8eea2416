"""The backend a model runs on, from its kind and a `BackendConfig`."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from draftsmith.backends.lean import LeanLlama
from draftsmith.backends.protocol import BackendConfig, CachedLM
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def cached_lm(model: PreTrainedModel, backend: BackendConfig = BackendConfig()) -> CachedLM:
    """The fastest backend that runs this model exactly (compiled on request: Llama-family models only); a
    model llama.cpp loaded gets its llama.cpp context."""
    if hasattr(model, "new_cached_lm"):
        if backend.compile or backend.graphs or backend.weights != "auto":
            raise ConfigError("--compile, --cuda-graphs and --weights apply to the lean torch forward; the llama.cpp "
                              "backend runs the GGUF file's own weights (write another with `draftsmith export "
                              "--format gguf`)")
        return model.new_cached_lm()
    if backend.lean and LeanLlama.supports(model):
        return LeanLlama(model, compile=backend.compile, weights=backend.weights, graphs=backend.graphs,
                         fused=backend.fused)
    if hasattr(model, "transformers_model"):  # a GGUF's weights loaded for the lean forward (gguf_model.py)
        model = model.transformers_model()
    if backend.graphs:
        raise ConfigError(f"CUDA graphs capture the lean Llama-family forward; {model.config.model_type} runs "
                          "through transformers")
    if backend.compile:
        warnings.warn(f"--compile applies to the lean Llama-family forward; {model.config.model_type} runs eager",
                      stacklevel=2)
    from draftsmith.backends.hf import HFCachedLM  # transformers' modelling: imported only when a model runs on it

    return HFCachedLM(model)

