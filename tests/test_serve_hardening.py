"""The server under hostile or unlucky requests: out-of-range sampling settings, cancellation anywhere,
internal errors that must not leak, oversized bodies, prompts and stop lists, and the default length."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from draftsmith.drafters.registry import build_drafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.models import load_model
from draftsmith.serve.limits import ServerLimits
from draftsmith.serve.metrics import Metrics
from draftsmith.serve.worker import Cancelled, EngineWorker, Job, QueueFull
from serve_helpers import MODEL_NAME, LiveServer, greedy, reference_engine, save_tiny_model

PROMPT = "def add(a, b):"
SECRET = "/home/secret/cuda/kernel.cu: CUDA error: an illegal memory access"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("hardened"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return reference_engine(model_dir)


LIMITS = ServerLimits(max_body_bytes=4096, max_prompt_chars=1000, max_prompt_tokens=300, max_stop_strings=2,
                      max_stop_chars=8, default_max_tokens=8)


@pytest.fixture(scope="module")
def live(model_dir):
    with LiveServer(model_dir, queue_size=2, limits=LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def roomy(model_dir):
    """The default limits."""
    with LiveServer(model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def post(live, body, path: str = "/v1/completions", **kwargs) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=30, **kwargs)


# -- sampling settings that used to overflow


@pytest.mark.parametrize("seed", [2**64, 2**63, -1])
def test_seed_out_of_range_is_a_400_naming_the_field(live, seed):
    response = post(live, {"prompt": PROMPT, "max_tokens": 4, "seed": seed, "temperature": 0.7})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "seed" and "2**63 - 1" in error["message"]


def test_largest_seed_is_served(live):
    response = post(live, {"prompt": PROMPT, "max_tokens": 4, "seed": 2**63 - 1, "temperature": 0.7})
    assert response.status_code == 200, response.text


def test_tiny_temperature_is_greedy(client, engine):
    expected = engine.generate_text(PROMPT, greedy(12)).text
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1e-45)
    assert response.choices[0].text == expected


# -- cancellation


def test_cancelled_queued_jobs_free_their_slots_at_once(live):
    """Two queued requests hang up while a long one runs: their slots are free for new requests at once,
    not when the worker reaches them."""
    worker = live.app.state.server.worker
    live.delay_s = 0.02  # the running request lasts 8 s or more
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a dropped, half-read iterator closes the connection
                next(line for line in lines if line.startswith("data:"))  # the engine is busy
                with http.stream("POST", "/v1/completions", json=body), \
                        http.stream("POST", "/v1/completions", json=body):
                    assert worker.waiting == 2
                    assert http.post("/v1/completions", json={**body, "stream": False}).status_code == 429
                deadline = time.monotonic() + 3
                while worker.waiting:  # both clients left: their jobs leave the queue, the long one still runs
                    assert time.monotonic() < deadline, "cancelled jobs kept their queue slots"
                    time.sleep(0.02)
                assert worker.busy
                with http.stream("POST", "/v1/completions", json=body) as admitted:
                    assert admitted.status_code == 200  # queued, not refused
    finally:
        live.delay_s = 0.0
    live.wait_idle()


def test_a_job_that_emits_no_text_is_cancelled_mid_generation(model_dir):
    """Without a tokenizer the engine streams no text at all: cancelling must still stop it at the next step
    (it used to be checked only when text was emitted)."""
    loaded = load_model(str(model_dir))
    slow = build_drafter("ngram", loaded)
    propose = slow.propose
    slow.propose = lambda context, k: (time.sleep(0.01), propose(context, k))[1]
    engine = SpecEngine(loaded.model, slow, tokenizer=None)
    worker = EngineWorker(engine, queue_size=2, metrics=Metrics())
    worker.start()

    async def run() -> float:
        job = Job(loaded.encode(PROMPT), GenerationConfig(max_new_tokens=480, k=2))
        worker.submit(job)
        await asyncio.sleep(0.3)
        job.cancel()
        cancelled_at = time.perf_counter()
        with pytest.raises(Cancelled):
            async for _ in job.texts():
                pass
        return time.perf_counter() - cancelled_at

    try:
        assert asyncio.run(run()) < 1.0  # 480 tokens would take seconds
    finally:
        worker.stop()


def test_a_cancelled_queued_job_is_told_and_never_run():
    started = threading.Event()

    class Blocking:
        """Runs until it is told to stop, as a long generation would."""

        prompts: list[list[int]] = []

        def generate(self, prompt_ids, config, on_text=None, should_stop=None):
            self.prompts.append(prompt_ids)
            started.set()
            while not should_stop():
                time.sleep(0.005)
            return SimpleNamespace(finish_reason="cancelled")

    engine = Blocking()
    worker = EngineWorker(engine, queue_size=1, metrics=Metrics())
    worker.start()

    async def run() -> None:
        first = Job([5], GenerationConfig(max_new_tokens=4))
        worker.submit(first)
        assert await asyncio.to_thread(started.wait, 5)
        queued = Job([6], GenerationConfig(max_new_tokens=4))
        worker.submit(queued)
        with pytest.raises(QueueFull):
            worker.submit(Job([5], GenerationConfig(max_new_tokens=4)))
        queued.cancel()
        assert worker.waiting == 0
        with pytest.raises(Cancelled, match="queued"):
            async for _ in queued.texts():
                pass
        worker.submit(Job([7], GenerationConfig(max_new_tokens=4)))  # its slot is free
        first.cancel()
        with pytest.raises(Cancelled):
            async for _ in first.texts():
                pass

    try:
        asyncio.run(run())
    finally:
        worker.stop()
    assert [6] not in engine.prompts  # the cancelled job never reached the engine


# -- errors that are not the client's


@pytest.fixture
def failing_engine(live, monkeypatch):
    """The engine fails the way a GPU can: a message with a path and a device error."""

    def fail(*args, **kwargs):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(live.app.state.server.engine, "generate", fail)


def assert_generic(message: str, request_id: str) -> None:
    assert SECRET not in message and "Traceback" not in message and "RuntimeError" not in message
    assert request_id in message


def test_engine_failure_is_a_generic_500_with_the_request_id(live, failing_engine, caplog):
    with caplog.at_level(logging.ERROR):
        response = post(live, {"prompt": PROMPT, "max_tokens": 4})
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert_generic(error["message"], request_id)
    assert error["type"] == "server_error"
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and SECRET in str(logged[0].exc_info[1])  # the detail is in the log


def test_engine_failure_while_streaming_is_a_generic_event(live, failing_engine, caplog):
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": True}
    with caplog.at_level(logging.ERROR):
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert_generic(error["message"], request_id)
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


def test_failure_outside_the_engine_is_a_generic_500(live, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise OSError(SECRET)

    monkeypatch.setattr(live.app.state.server.loaded, "encode", fail)
    with caplog.at_level(logging.ERROR):
        response = post(live, {"prompt": PROMPT, "max_tokens": 4})
    assert response.status_code == 500
    assert_generic(response.json()["error"]["message"], response.headers["x-request-id"])
    assert any(r.exc_info and SECRET in str(r.exc_info[1]) for r in caplog.records)


def test_client_errors_stay_specific(live):
    response = post(live, {"prompt": [5, 6], "max_tokens": 4, "top_k": 3, "temperature": 0.5})
    assert response.status_code == 200  # control: a valid request passes
    response = post(live, {"prompt": PROMPT, "max_tokens": 600})
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]


@pytest.mark.parametrize("content, content_type", [
    (b'\xff\xfe{"prompt": "x"}', "application/json"),  # not UTF-8
    (b"[" * 50_000 + b"]" * 50_000, "application/json"),  # nested past the JSON parser's recursion limit
    (b'{"prompt": "x", "max_tokens": 2}', "text/plain"),
    (b"null", "application/json"),
    (b'{"prompt": "x"', "application/json"),
])
def test_malformed_bodies_get_a_clear_400(roomy, content, content_type):
    response = httpx.post(f"{roomy.url}/v1/completions", content=content, headers={"Content-Type": content_type},
                          timeout=30)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message and "Traceback" not in message and "File " not in message


# -- caps on what one request may ask


def test_body_over_the_cap_is_refused_before_parsing(live):
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 2})
    response = httpx.post(f"{live.url}/v1/completions", content=big,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the cap counts the bytes as they come
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000].encode()

    response = httpx.post(f"{live.url}/v1/completions", content=chunked(),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413
    assert post(live, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200  # the server is fine


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x" * 1001}, "prompt"),  # characters, before tokenizing
    ({"prompt": [5] * 301}, "prompt"),  # tokens
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "x", "stop": "123456789"}, "stop"),
])
def test_prompt_and_stop_caps(live, body, param):
    response = post(live, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_chat_prompt_cap(live):
    messages = [{"role": "user", "content": "y" * 600}, {"role": "user", "content": "z" * 600}]
    response = post(live, {"messages": messages}, path="/v1/chat/completions")
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


def test_tokenizing_does_not_block_the_event_loop(live, monkeypatch):
    encode = live.app.state.server.loaded.encode

    def slow_encode(*args, **kwargs):
        time.sleep(1.5)
        return encode(*args, **kwargs)

    monkeypatch.setattr(live.app.state.server.loaded, "encode", slow_encode)
    slow = threading.Thread(target=post, args=(live, {"prompt": PROMPT, "max_tokens": 2}))
    slow.start()
    time.sleep(0.3)  # the slow request is tokenizing now
    start = time.monotonic()
    assert httpx.get(f"{live.url}/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 0.8
    slow.join()


# -- the default length


def test_chat_without_max_tokens_gets_the_default_cap(client):
    response = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                              temperature=0)
    assert response.usage.completion_tokens == LIMITS.default_max_tokens
    assert response.choices[0].finish_reason == "length"


def test_default_cap_never_passes_the_context(roomy):
    assert ServerLimits().default_max_tokens == 512  # the whole context of the tiny model
    client = openai.OpenAI(base_url=f"{roomy.url}/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "x" * 490}]  # about 500 tokens of the 512 the model takes
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0)
    usage = response.usage
    assert usage.prompt_tokens + usage.completion_tokens == 512
    assert response.choices[0].finish_reason == "length"


# -- strings that do not encode, loose types, half-sent bodies, keys (the hardening issue)


def post_raw(server, body: dict, path: str = "/v1/completions", **headers) -> httpx.Response:
    """json.dumps escapes a lone surrogate as \\ud800, which httpx's own encoder refuses to send."""
    return httpx.post(server.url + path, content=json.dumps(body).encode(), timeout=30,
                      headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "def f(\ud800):", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["\udfff"], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "model": "tiny\ud83d"}, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \udc00"}], "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
                              "max_tokens": 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "us\ud800er", "content": "hi"}], "max_tokens": 2}, "messages"),
])
def test_lone_surrogates_are_a_400_naming_the_field(roomy, path, body, param):
    response = post_raw(roomy, body, path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error


@pytest.mark.parametrize("field, value", [
    ("stream", "yes"), ("stream", 1), ("prompt", [True, False]), ("seed", "7"), ("max_tokens", "4"),
    ("max_tokens", 4.5), ("temperature", "0.5"), ("top_k", True), ("stop", 5), ("n", "1"),
])
def test_loose_types_are_refused_not_coerced(roomy, field, value):
    response = post(roomy, {"prompt": "def f():", "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_exact_types_still_pass(roomy):
    response = post(roomy, {"prompt": [5, 6], "max_tokens": 2, "temperature": 1, "top_p": 1, "seed": 7,
                            "stream": False, "stream_options": None, "n": 1})
    assert response.status_code == 200, response.text


def test_a_half_sent_body_is_dropped_after_the_body_timeout(model_dir):
    import socket

    limits = ServerLimits(body_timeout_s=1.0)
    with LiveServer(model_dir, limits=limits) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stalled = []
        for _ in range(5):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            stalled.append(s)
        start = time.monotonic()
        for s in stalled:
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply
            while s.recv(4096):  # the server closes the connection
                pass
            s.close()
        assert time.monotonic() - start < 5
        assert post(server, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_api_key_is_required_when_set(model_dir, monkeypatch):
    with LiveServer(model_dir, api_key="s3cret-key") as server:
        body = {"prompt": PROMPT, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}):
            response = post(server, body, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # liveness probes need no key
        assert post(server, body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret-key", max_retries=0, timeout=30)
        assert client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("host, key, warns", [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False), ("127.0.0.2", None, False),
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True), ("my-host.example", None, True),
    ("0.0.0.0", "k", False),
])
def test_listening_beyond_loopback_without_a_key_warns(host, key, warns):
    from draftsmith.cli.serve import exposure_warning

    warning = exposure_warning(host, key)
    assert (warning is not None) == warns
    assert warning is None or ("--api-key" in warning and "DRAFTSMITH_API_KEY" in warning and host in warning)
