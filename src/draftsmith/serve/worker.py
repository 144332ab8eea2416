"""One thread owns the engine (one KV cache, not thread-safe) and serves a bounded queue of jobs in turn.

A job's text reaches its asyncio handler through an asyncio.Queue fed with call_soon_threadsafe. A client
that leaves cancels its job: a queued job leaves the queue at once (its slot is free for the next request),
a running one stops at the engine's next check of `should_stop`, which comes after the prefill and after
every step (the engine re-initialises its cache at the next prefill, so stopping anywhere is safe).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from draftsmith.engine import GenerationConfig, GenerationResult, SpecEngine
from draftsmith.errors import ConfigError, DraftsmithError
from draftsmith.serve.metrics import Metrics

log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The engine takes no more work: it is stopping, or its thread has died."""


class QueueFull(Unavailable):
    """Every slot of the request queue is taken."""


class Cancelled(Exception):
    """The client left, or the server stops: the job ended without a result."""


class GenerationFailed(Exception):
    """The engine failed on a job for a reason that is not the client's. The message is safe to show (the
    detail, which may hold paths or device errors, is in the server's log under the request id)."""

    def __init__(self, request_id: str):
        super().__init__(f"generation failed: internal error (request id {request_id})")
        self.request_id = request_id


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:24]}"


@dataclass(eq=False)  # jobs compare by identity: the queue removes this job, not an equal one
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    request_id: str = field(default_factory=new_request_id)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)  # the handler's loop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) ... then one end event
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    result: GenerationResult | None = None
    on_cancel: Callable[[Job], None] | None = field(default=None, repr=False)  # set by the worker it joins

    def cancel(self) -> None:
        """Stop the job wherever it is: a queued job leaves the queue now, a running one at the next step."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)

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
        """The text as it is generated; afterwards `result` is set. Raises DraftsmithError (the request's
        fault), GenerationFailed or Cancelled."""
        while True:
            kind, payload = await self.events.get()
            if kind == "text":
                yield payload
            elif kind == "done":
                self.result = payload
                return
            else:
                raise payload


class JobQueue:
    """A bounded FIFO whose jobs can be taken out from the middle: a cancelled job frees its slot at once,
    rather than when the worker reaches it (queue.Queue cannot remove an item)."""

    def __init__(self, size: int):
        self.size = size
        self._jobs: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def put(self, job: Job) -> None:
        with self._ready:
            if self._closed:
                raise Unavailable("the engine is not running (the server is shutting down)")
            if len(self._jobs) >= self.size:
                raise QueueFull(f"all {self.size} queue slots are taken")
            self._jobs.append(job)
            self._ready.notify()

    def get(self) -> Job | None:
        """The next job; None once the queue is closed."""
        with self._ready:
            while not self._jobs and not self._closed:
                self._ready.wait()
            return None if self._closed else self._jobs.popleft()

    def remove(self, job: Job) -> bool:
        """Take out a job still waiting; False when the worker has it already (or it was never queued)."""
        with self._ready:
            try:
                self._jobs.remove(job)
            except ValueError:
                return False
            return True

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker to stop, and return the jobs that were waiting."""
        with self._ready:
            self._closed = True
            left, self._jobs = list(self._jobs), deque()
            self._ready.notify_all()
            return left


class EngineWorker:
    def __init__(self, engine: SpecEngine, queue_size: int, metrics: Metrics):
        if queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
        self.engine, self.metrics = engine, metrics
        self._jobs = JobQueue(queue_size)
        self._thread = threading.Thread(target=self._run, name="draftsmith-engine", daemon=True)
        self._stopping = threading.Event()
        self.busy = False

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    @property
    def queue_size(self) -> int:
        return self._jobs.size

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the running job at its next step, drop the queued ones, and join the thread."""
        self._stopping.set()
        for job in self._jobs.close():
            job.post("error", Cancelled("the server is shutting down"))
        if self.alive:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set() or not self.alive:
            raise Unavailable("the engine is not running (the server is shutting down)")
        job.on_cancel = self._withdraw
        self._jobs.put(job)

    def _withdraw(self, job: Job) -> None:
        """A job was cancelled (from the event loop): if it still waits, it leaves the queue now."""
        if self._jobs.remove(job):
            self.metrics.count("cancelled")
            job.post("error", Cancelled("the request was cancelled while queued"))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self.busy = True
            try:
                self._serve(job)
            finally:
                job.on_cancel = None
                del job  # waiting for the next job must not keep the last one alive
                self.busy = False

    def _serve(self, job: Job) -> None:
        started = time.perf_counter()
        self.metrics.observe("queue_wait_seconds", started - job.queued_at)
        first = True

        def should_stop() -> bool:
            return job.cancelled.is_set() or self._stopping.is_set()

        def on_text(text: str) -> None:
            nonlocal first
            if first:
                self.metrics.observe("time_to_first_token_seconds", time.perf_counter() - job.queued_at)
                first = False
            job.post("text", text)

        try:
            if should_stop():  # cancelled between leaving the queue and now
                result = None
            else:
                result = self.engine.generate(job.prompt_ids, job.config, on_text=on_text, should_stop=should_stop)
        except DraftsmithError as e:  # the request's settings: its message is for the client (who counts it)
            job.post("error", e)
            return
        except Exception:  # the worker must outlive any one request's failure; the detail stays in the log
            log.exception("generation failed (request id %s)", job.request_id)
            self.metrics.count("failed")
            job.post("error", GenerationFailed(job.request_id))
            return
        if result is None or result.finish_reason == "cancelled":
            self.metrics.count("cancelled")
            job.post("error", Cancelled("the request was cancelled: its client left, or the server stops"))
            return
        self.metrics.count("completed")
        self.metrics.add_stats(result.stats)
        self.metrics.observe("request_latency_seconds", time.perf_counter() - job.queued_at)
        job.post("done", result)
