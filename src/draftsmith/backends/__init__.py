"""The target's forward with its KV cache, behind one protocol (`protocol.CachedLM`), one module per backend.

- `lean`: Llama-family models (Llama, SmolLM, Mistral, Qwen2) run by a short forward of our own over a
  preallocated cache (`layers` holds the decoder layers it shares with EAGLE heads), each weight in a
  `formats.WeightFormat` chosen by `format_choice` (timed by `timing`); small operations through the fused
  CPU kernels (`fused`, `csrc/`), steps replayed from CUDA graphs on a GPU (`cuda_graphs`).
- `hf`: any other transformers causal LM, through its own forward and a cropped DynamicCache.
- `llamacpp`: a GGUF file run by llama.cpp through llama-cpp-python.
`factory.cached_lm` picks one for a model and a `protocol.BackendConfig`.
"""
