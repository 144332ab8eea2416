"""draftsmith: lossless speculative decoding for code LLMs."""

__version__ = "0.1.0"
