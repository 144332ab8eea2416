"""The OpenAI-compatible server, driven by the official `openai` client over loopback with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from serve_helpers import MODEL_NAME, LiveServer, greedy, reference_engine, save_tiny_model

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return reference_engine(model_dir)


@pytest.fixture(scope="module")
def live(model_dir):
    with LiveServer(model_dir) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=30)


def chat_prompt(engine, content: str) -> str:
    messages = [{"role": "user", "content": content}]
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_completion_equals_generate(client, engine):
    expected = engine.generate_text(PROMPT, greedy(24))
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0)
    assert response.choices[0].text == expected.text
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(PROMPT) and response.usage.completion_tokens == 24
    stats = response.model_extra["draftsmith"]  # the extra field: clients that don't know it ignore it
    assert stats["new_tokens"] == 24 and stats["tau"] >= 1.0 and 0 <= stats["acceptance_rate"] <= 1
    assert {"draft_s", "verify_s", "accepted", "proposed"} <= stats.keys()


def test_streamed_completion_equals_generate(client, engine):
    expected = engine.generate_text(PROMPT, greedy(24)).text
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True))
    assert len(chunks) > 2  # streamed as tokens are accepted, not in one piece
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["draftsmith"]["new_tokens"] == 24


def test_chat_equals_generate_on_the_template(client, engine):
    expected = engine.generate_text(chat_prompt(engine, "Write add."), greedy(20), templated=True).text
    messages = [{"role": "user", "content": "Write add."}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices


def test_stop_string_and_seeded_sampling(client, engine):
    full = engine.generate_text(PROMPT, greedy(24)).text
    stop = full[6:8]
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0.8,
                                         top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", '{"prompt": "x", "max_tokens": ', 400, None),  # malformed JSON
        ("/v1/completions", '[1, 2]', 400, None),  # JSON, but not an object
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stream": {"on": 1}}, 400, "stream"),
        ("/v1/completions", {"prompt": 12}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "", "max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "n": 3}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),  # would change the output: refused
        ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "x", "best_of": 2}, 400, "best_of"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400,
         "logprobs"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages"),
        ("/v1/no-such-route", {}, 404, None),
    ],
)
def test_bad_input_gets_openai_error(live, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(live.url + path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_extra_fields_are_ignored(live, engine):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "user": "me", "frequency_penalty": 0,
            "echo": False, "logprobs": None, "best_of": 1, "logit_bias": {}}  # no-op values of unsupported ones
    response = httpx.post(f"{live.url}/v1/completions", json=body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == engine.generate_text(PROMPT, greedy(8)).text


def leave_mid_generation(url: str, stream: bool) -> None:
    """Start a request that would take 10 s or more, and hang up once it is being generated."""
    body = {"prompt": PROMPT, "max_tokens": 480, "temperature": 0, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data:"))
        return
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting: its connection closes
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(live, client, engine, stream):
    live.delay_s = 0.02  # 480 tokens now take 10 s or more
    try:
        leave_mid_generation(live.url, stream)
        start = time.monotonic()
        short = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
        assert time.monotonic() - start < 5  # not stuck behind the abandoned request
    finally:
        live.delay_s = 0.0
    assert short.choices[0].text == engine.generate_text(PROMPT, greedy(4)).text
    assert 'draftsmith_requests_total{outcome="cancelled"}' in httpx.get(f"{live.url}/metrics").text


def test_full_queue_answers_429(model_dir):
    with LiveServer(model_dir, queue_size=1) as live:
        live.delay_s = 0.02
        body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.Client(base_url=live.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # kept: a dropped, half-read iterator closes the connection
                next(line for line in lines if line.startswith("data:"))  # the engine is busy
                with http.stream("POST", "/v1/completions", json=body) as queued:
                    assert queued.status_code == 200  # waits in the one queue slot
                    rejected = http.post("/v1/completions", json={**body, "stream": False})
                    assert rejected.status_code == 429
                    assert rejected.json()["error"]["code"] == "queue_full"
            live.delay_s = 0.0
            live.wait_idle()  # both abandoned requests are cancelled, not served to the end
            assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
            metrics = http.get("/metrics").text
        assert 'draftsmith_requests_total{outcome="rejected"} 1' in metrics
        assert 'draftsmith_requests_total{outcome="cancelled"} 2' in metrics


def test_metrics_in_prometheus_text(live, client):
    client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    response = httpx.get(f"{live.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = dict(line.rsplit(" ", 1) for line in response.text.splitlines() if not line.startswith("#"))
    assert float(samples['draftsmith_requests_total{outcome="completed"}']) >= 1
    assert float(samples["draftsmith_generated_tokens_total"]) >= 4
    assert float(samples["draftsmith_target_steps_total"]) >= 1
    assert float(samples['draftsmith_request_latency_seconds_bucket{le="+Inf"}']) >= 1
    assert "draftsmith_draft_tokens_accepted_total" in samples and "draftsmith_queue_waiting" in samples


def test_serve_command_runs_a_server(model_dir, engine):
    """`draftsmith serve` as a user starts it: a subprocess, polled until healthy, then asked once."""
    with httpx.Client() as probe:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "draftsmith.cli", "serve", "--target", str(model_dir), "--port", str(port),
                   "--model-name", MODEL_NAME, "--k", "4", "--max-stop-strings", "1", "--max-body-bytes", "2000"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            deadline = time.monotonic() + 60
            while not _healthy(probe, url):
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the server did not become healthy"
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            response = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
            assert response.choices[0].text == engine.generate_text(PROMPT, greedy(12)).text
            with pytest.raises(openai.BadRequestError, match="stop strings"):  # the limits' flags
                client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, stop=["a", "b"])
            assert probe.post(f"{url}/v1/completions", json={"prompt": "x" * 3000}).status_code == 413
        finally:
            process.terminate()
            process.wait(20)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(probe: httpx.Client, url: str) -> bool:
    try:
        return probe.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
