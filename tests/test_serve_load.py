"""A bounded load test on loopback: 50 concurrent streaming clients per round, some leaving early, some
malformed. The server must stay up, serve every valid request exactly, and not grow in memory."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import httpx
import pytest

from draftsmith.serve.worker import Job
from serve_helpers import MODEL_NAME, LiveServer, greedy, reference_engine, save_tiny_model

PROMPTS = ["def add(a, b):", "hello", "class Stack:", "import os\n"]
MAX_TOKENS = 24
ROUNDS = 3
MALFORMED = [
    ('{"prompt": "x", "max_tokens": 4', 400),
    (json.dumps({"prompt": "x", "max_tokens": "many"}), 400),
    (json.dumps({"prompt": "x", "temperature": -1}), 400),
    (json.dumps({"prompt": "", "stream": True}), 400),
    (json.dumps({"prompt": "x", "model": "other"}), 404),
]


async def read_stream(http: httpx.AsyncClient, prompt: str) -> tuple[str, str]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text, finish = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


async def leave_early(http: httpx.AsyncClient, prompt: str, after_first_chunk: bool) -> None:
    """Ask for a long stream, then hang up: mid-stream, or right after the headers (likely still queued)."""
    body = {"prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        if after_first_chunk:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break


async def malformed(http: httpx.AsyncClient, content: str, status: int) -> None:
    response = await http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status and "error" in response.json()


async def one_round(url: str, expected: dict[str, str]) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        valid = [read_stream(http, PROMPTS[i % len(PROMPTS)]) for i in range(30)]
        early = [leave_early(http, PROMPTS[i % len(PROMPTS)], after_first_chunk=i % 2 == 0) for i in range(10)]
        bad = [malformed(http, *MALFORMED[i % len(MALFORMED)]) for i in range(10)]
        # interleave the kinds so that early leavers sit between valid requests in the queue
        jobs = [job for trio in zip(valid[::3], valid[1::3], valid[2::3], early, bad) for job in trio]
        results = await asyncio.gather(*jobs)
    served = [r for r in results if r is not None]
    assert len(served) == 30
    for i, (text, finish) in enumerate(served):
        assert (text, finish) == (expected[PROMPTS[i % len(PROMPTS)]], "length")


def rss_mb() -> float:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident memory from /proc")
def test_fifty_concurrent_streams(tmp_path):
    folder = save_tiny_model(tmp_path)
    engine = reference_engine(folder)
    expected = {p: engine.generate_text(p, greedy(MAX_TOKENS)).text for p in PROMPTS}
    with LiveServer(folder) as live:
        live.delay_s = 0.002  # long enough for early leavers to really leave mid-generation
        memory = []
        for _ in range(ROUNDS):
            asyncio.run(one_round(live.url, expected))
            live.wait_idle()
            gc.collect()
            memory.append(rss_mb())
        assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
        metrics = httpx.get(f"{live.url}/metrics").text
    assert memory[-1] - memory[0] < 30, f"resident memory grew by round: {memory}"
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Job], "jobs outlived their requests"
    counts = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("draftsmith_requests_total")}
    assert counts["completed"] >= 30 * ROUNDS and counts["invalid"] == 10 * ROUNDS
    assert counts.get("cancelled", 0) >= 1 and "rejected" not in counts
