"""What one request may ask of the server: caps that keep a single client from tying up memory or the engine."""

from __future__ import annotations

from dataclasses import dataclass, fields

from draftsmith.errors import ConfigError


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20  # checked before the body is parsed: a huge body is refused with 413 unread
    max_prompt_chars: int = 200_000  # checked before tokenizing, which is the costly part of a long prompt
    max_prompt_tokens: int = 32_768  # after tokenizing; the model's context may be smaller still
    max_stop_strings: int = 4  # OpenAI's limit
    max_stop_chars: int = 128  # per stop string: the stream holds back up to this much text
    default_max_tokens: int = 512  # chat requests without max_tokens: never more than the context leaves
    completion_default_max_tokens: int = 16  # OpenAI's default for /v1/completions
    body_timeout_s: float = 30.0  # a body not fully received by then gets 408 and its connection closed

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"{f.name} must be >= 1, got {getattr(self, f.name)}")
