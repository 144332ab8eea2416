"""Request and response bodies of the OpenAI completions and chat APIs (the subset one engine can serve).

Requests allow unknown fields (clients send many we ignore) but validate the types of the ones we use,
strictly: "stream": "yes", "seed": "7" or true among token ids are refused, not coerced (an int still passes
where a float is asked for). Every string must encode as UTF-8: JSON's "\ud800" escapes decode to lone
surrogates that the tokenizer and the response's encoder would choke on.
Responses carry the engine's speculative statistics in an extra `draftsmith` field that clients ignore.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from draftsmith.acceptance import MAX_SEED
from draftsmith.engine import GenerationResult

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # engine -> OpenAI


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}), "
                         "which no UTF-8 text can hold") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
REQUEST = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What completions and chat share."""

    model_config = REQUEST
    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common on local servers
    stop: Text | list[Text] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # options that would change the output and that this server does not implement: refused unless left at
    # their no-op value, never silently ignored
    logprobs: int | bool | None = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int | None) -> int | None:
        # checked here, not only by the engine: a 400 that names the field, before the job is queued
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {seed}")
        return seed

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported (one engine serves one sequence at a time)")
        return n

    @field_validator("logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias")
    @classmethod
    def _unsupported(cls, value, info):
        return refuse_unless_noop(value, info.field_name)

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: Text | list[Text] | list[int]
    echo: bool | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return refuse_unless_noop(value, "echo")

    @field_validator("best_of")
    @classmethod
    def _one_candidate(cls, value: int | None) -> int | None:
        return refuse_unless_noop(value, "best_of", noop=(None, 1))


def refuse_unless_noop(value, name: str, noop: tuple = (None, 0, {})):
    if value not in noop:  # False == 0
        raise ValueError(f"'{name}' is not supported by this server; leave it out")
    return value


class ContentPart(BaseModel):
    model_config = REQUEST
    type: Literal["text"]  # images and audio are not for a code model
    text: Text


class ChatMessage(BaseModel):
    model_config = REQUEST
    role: Text
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens


def usage(result: GenerationResult) -> dict:
    s = result.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens}


class Shape:
    """Builds one endpoint's response objects: the whole response and the streamed chunks."""

    object = chunk_object = id_prefix = ""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"{self.id_prefix}-{uuid.uuid4().hex}", model, int(time.time())

    def choice(self, text: str | None, finish: str | None, delta: bool) -> dict:
        raise NotImplementedError

    def _envelope(self, obj: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def response(self, result: GenerationResult) -> dict:
        finish = FINISH_REASONS[result.finish_reason]
        return self._envelope(self.object, [self.choice(result.text, finish, delta=False)], usage=usage(result),
                              draftsmith=result.stats.as_dict())

    def chunk(self, text: str | None) -> dict:
        return self._envelope(self.chunk_object, [self.choice(text, None, delta=True)])

    def first_chunks(self) -> list[dict]:
        return []

    def last_chunks(self, result: GenerationResult, include_usage: bool) -> list[dict]:
        """The chunk with the finish reason (and our statistics); then OpenAI's usage-only chunk if asked for."""
        finish = FINISH_REASONS[result.finish_reason]
        last = self._envelope(self.chunk_object, [self.choice(None, finish, delta=True)],
                              draftsmith=result.stats.as_dict())
        if not include_usage:
            return [last]
        return [last, self._envelope(self.chunk_object, [], usage=usage(result))]


class CompletionShape(Shape):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def choice(self, text: str | None, finish: str | None, delta: bool) -> dict:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


class ChatShape(Shape):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice(self, text: str | None, finish: str | None, delta: bool) -> dict:
        if not delta:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    def first_chunks(self) -> list[dict]:
        chunk = self.chunk("")
        chunk["choices"][0]["delta"]["role"] = "assistant"
        return [chunk]
