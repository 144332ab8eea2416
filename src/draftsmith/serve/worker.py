"""One thread owns the engine (one KV cache, not thread-safe) and serves a bounded queue of jobs in turn.

A job's text reaches its asyncio handler through an asyncio.Queue fed with call_soon_threadsafe. A client
that leaves sets the job's cancel flag: a queued job is then skipped, a running one is aborted from inside
the streaming callback (the engine re-initialises its cache at the next prefill, so aborting is safe).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from draftsmith.engine import GenerationConfig, GenerationResult, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.serve.metrics import Metrics

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The engine takes no more work: it is stopping, or its thread has died."""


class QueueFull(Unavailable):
    """Every slot of the request queue is taken."""


class Cancelled(Exception):
    """The client left (or the server stops): raised inside the engine's callback to abort generation."""


@dataclass
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)  # the handler's loop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) ... then one end event
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    result: GenerationResult | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, kind: str, payload: object = None) -> None:
        """From the worker thread: hand one event to the handler's event loop."""
        if isinstance(payload, BaseException):
            # the traceback's frames hold this job: an unread error would keep it alive in a cycle
            payload = payload.with_traceback(None)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            pass

    async def texts(self) -> AsyncIterator[str]:
        """The text as it is generated; afterwards `result` is set. Raises the engine's error, or Cancelled."""
        while True:
            kind, payload = await self.events.get()
            if kind == "text":
                yield payload
            elif kind == "done":
                self.result = payload
                return
            else:
                raise payload


class EngineWorker:
    def __init__(self, engine: SpecEngine, queue_size: int, metrics: Metrics):
        if queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
        self.engine, self.metrics = engine, metrics
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="draftsmith-engine", daemon=True)
        self._stopping = threading.Event()
        self.busy = False

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort the running job, drop the queued ones, and join the thread."""
        self._stopping.set()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post("error", Cancelled("the server is shutting down"))
        self._jobs.put(None)
        if self.alive:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set() or not self.alive:
            raise Unavailable("the engine is not running (the server is shutting down)")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"all {self._jobs.maxsize} queue slots are taken") from None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.busy = True
            try:
                self._serve(job)
            finally:
                del job  # waiting for the next job must not keep the last one alive
                self.busy = False

    def _serve(self, job: Job) -> None:
        started = time.perf_counter()
        if job.cancelled.is_set():  # the client left while queued
            self.metrics.count("cancelled")
            job.post("error", Cancelled("the client disconnected"))
            return
        self.metrics.observe("queue_wait_seconds", started - job.queued_at)
        first = True

        def on_text(text: str) -> None:
            nonlocal first
            if job.cancelled.is_set() or self._stopping.is_set():
                raise Cancelled("the request was cancelled: its client left, or the server stops")
            if first:
                self.metrics.observe("time_to_first_token_seconds", time.perf_counter() - job.queued_at)
                first = False
            job.post("text", text)

        try:
            result = self.engine.generate(job.prompt_ids, job.config, on_text=on_text)
        except Cancelled as e:
            self.metrics.count("cancelled")
            job.post("error", e)
        except Exception as e:  # the worker must outlive any one request's failure
            log.exception("generation failed")
            self.metrics.count("failed")
            job.post("error", e)
        else:
            self.metrics.count("completed")
            self.metrics.add_stats(result.stats)
            self.metrics.observe("request_latency_seconds", time.perf_counter() - job.queued_at)
            job.post("done", result)
