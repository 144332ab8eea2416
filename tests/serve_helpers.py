"""A live draftsmith server on a free loopback port, in a background thread, serving a tiny saved model."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from draftsmith.drafters.registry import build_drafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.models import load_model
from draftsmith.serve import create_app
from draftsmith.serve.limits import ServerLimits
from tiny_models import char_tokenizer, tiny_llama

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
MODEL_NAME = "tiny"
K = 4


def save_tiny_model(folder: Path) -> Path:
    """Seed 0 rarely emits EOS on code prompts, so long requests really run to max_tokens."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # the char tokenizer has none of its own
    tiny_llama(seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_engine(folder: Path) -> SpecEngine:
    """What `draftsmith generate` runs for the same model and drafter."""
    loaded = load_model(str(folder))
    return SpecEngine(loaded.model, build_drafter("ngram", loaded), loaded.tokenizer)


def greedy(max_tokens: int, stop: list[str] | None = None) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_tokens, k=K, stop=stop or [])


class LiveServer:
    def __init__(self, folder: Path, queue_size: int = 64, limits: ServerLimits | None = None,
                 api_key: str | None = None):
        self.app = create_app(load_model(str(folder)), "ngram", k=K, model_name=MODEL_NAME, queue_size=queue_size,
                              limits=limits, api_key=api_key)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.delay_s = 0.0  # added before every draft: makes a long request last long enough to interrupt

    def __enter__(self) -> LiveServer:
        drafter = self.app.state.server.engine.drafter
        propose = drafter.propose

        def slow_propose(context: list[int], k: int):
            time.sleep(self.delay_s)
            return propose(context, k)

        drafter.propose = slow_propose
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def wait_idle(self, timeout: float = 10.0) -> None:
        worker = self.app.state.server.worker
        deadline = time.monotonic() + timeout
        while worker.busy or worker.waiting:
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.02)
