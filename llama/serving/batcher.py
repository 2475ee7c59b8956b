"""Concurrent requests grouped into one batched ``generate`` call, run in a worker thread, streamed back per request.

Requests wait in a queue. When the worker is free, the oldest one opens a batch; for ``window_s`` (or until
``max_rows`` rows are waiting) others may join it: those with the same sampling settings (greedy ones together;
sampled ones with the same temperature/top-p/top-k, a request with its own ``seed`` alone, so that its answer
does not depend on its neighbours) whose prompts and ``max_tokens`` all fit the context together. A request asking
for ``n`` choices brings ``n`` rows. The batch is one call of :func:`llama.generation.generate.generate` (prompts
left-padded, ``max_new_tokens`` the largest asked), whose ``stream(row, token)`` callback feeds each row's
:class:`~llama.serving.detokenize.ReplyText` and sends the pieces to that request's asyncio queue.

A row ends on a stop token, a stop string, its own ``max_tokens``, or when its client went away (the request is
marked cancelled). Generation itself stops as soon as every row of the batch has ended: the callback raises
:class:`_BatchDone`, which ends the ``generate`` call early. Until then an ended row rides along (batched
``generate`` has no per-row exit), its tokens ignored. Requests that arrive while a batch runs wait for the next
one (no continuous batching).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.tokenizer import Tokenizer

from ..generation.generate import generate, stop_token_ids
from ..model import Llama
from .detokenize import ReplyText

log = logging.getLogger("llama.serve")


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are picked; requests batch together only when these agree."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def key(self, job_id: int) -> tuple:
        if self.greedy:  # temperature, top-p/k and the seed do nothing
            return ("greedy", self.repetition_penalty)
        solo = job_id if self.seed is not None else None  # a seeded draw must not depend on other rows
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty, solo)


@dataclass
class Job:
    """One request: a prompt per choice, its limits, and the queue its events go to.

    Events: ``("text", choice, reasoning, content)``, ``("end", choice, finish_reason, completion_tokens)``,
    ``("error", exception)``, and ``("done",)`` once every choice has ended (or after an error).
    """

    prompts: list[list[int]]
    max_tokens: int
    sampling: Sampling
    stops: list[str] = field(default_factory=list)
    split_reasoning: bool = False
    cancelled: bool = False  # set by the server when the client went away; read by the worker
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    rows_left: int = 0

    def __post_init__(self) -> None:
        self.loop = self.loop or asyncio.get_running_loop()
        self.events = self.events or asyncio.Queue()
        self.rows_left = len(self.prompts)
        self.key = self.sampling.key(id(self))

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.prompts)

    def send(self, *event: Any) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


@dataclass
class BatchStats:
    """Counters served at ``GET /stats``: what the batcher did since the server started."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    largest_batch_requests: int = 0
    largest_batch_rows: int = 0
    batches_with_several_requests: int = 0
    stopped_early: int = 0  # batches whose generate call ended as soon as every row had ended
    cancelled_rows: int = 0  # rows whose client went away while they were generated
    failed_batches: int = 0
    completion_tokens: int = 0

    def count(self, jobs: list[Job]) -> None:
        rows = sum(len(j.prompts) for j in jobs)
        self.batches += 1
        self.requests += len(jobs)
        self.rows += rows
        self.largest_batch_requests = max(self.largest_batch_requests, len(jobs))
        self.largest_batch_rows = max(self.largest_batch_rows, rows)
        self.batches_with_several_requests += len(jobs) > 1


class _BatchDone(Exception):
    """Raised from the stream callback when every row of the batch has ended: stops ``generate`` early."""


class _Row:
    """One choice of one request inside a running batch."""

    def __init__(self, job: Job, choice: int, text: ReplyText) -> None:
        self.job, self.choice, self.text = job, choice, text
        self.tokens = 0
        self.done = False

    def take(self, token: int, stop_ids: frozenset[int]) -> None:
        self.tokens += 1
        if token in stop_ids:
            self.close("stop")
            return
        reasoning, content = self.text.push(token)
        if reasoning or content:
            self.job.send("text", self.choice, reasoning, content)
        if self.text.stopped:
            self.close("stop")
        elif self.tokens >= self.job.max_tokens:
            self.close("length")

    def close(self, reason: str) -> None:
        reasoning, content = self.text.finish()
        if reasoning or content:
            self.job.send("text", self.choice, reasoning, content)
        self.job.send("end", self.choice, reason, self.tokens)
        self.done = True
        self.job.rows_left -= 1
        if self.job.rows_left == 0:
            self.job.send("done")


GenerateFn = Callable[..., Any]


class Batcher:
    """Owns the model: the one place ``generate`` is called, in one worker thread, a batch at a time."""

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        window_s: float = 0.015,
        max_rows: int = 16,
        generate_fn: GenerateFn = generate,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"--max-batch-size must be ≥ 1, got {max_rows}")
        if window_s < 0:
            raise ValueError(f"--batch-window-ms must be ≥ 0, got {window_s * 1000:g}")
        self.model, self.tokenizer = model, tokenizer
        self.window_s, self.max_rows = window_s, max_rows
        self.generate_fn = generate_fn
        self.context = model.config.max_seq_len
        self.stop_ids = frozenset(stop_token_ids(tokenizer))
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.stats = BatchStats()
        self.pending: deque[Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llama-generate")

    def start(self) -> None:
        """Start taking batches (call inside the server's event loop)."""
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._run_forever(), name="llama-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self._arrived.set()

    def _waiting_rows(self) -> int:
        return sum(len(j.prompts) for j in self.pending if not j.cancelled)

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.window_s
            # the batching window: let concurrent requests arrive, unless enough rows already wait
            while self._waiting_rows() < self.max_rows and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if batch:
                await loop.run_in_executor(self._executor, self._generate, batch)

    def _take(self) -> list[Job]:
        """The oldest waiting request and the compatible ones that fit beside it (taken off the queue)."""
        while self.pending and self.pending[0].cancelled:
            self.pending.popleft()  # its client left before it started
        if not self.pending:
            return []
        first = self.pending.popleft()
        batch, rows, longest, most_new = [first], len(first.prompts), first.longest, first.max_tokens
        for job in list(self.pending):
            if job.cancelled or job.key != first.key or rows + len(job.prompts) > self.max_rows:
                continue
            if max(longest, job.longest) + max(most_new, job.max_tokens) > self.context:
                continue  # left padding to the longest prompt must still leave room for the longest reply
            batch.append(job)
            self.pending.remove(job)
            rows, longest, most_new = rows + len(job.prompts), max(longest, job.longest), max(most_new, job.max_tokens)
        return batch

    def _generate(self, jobs: list[Job]) -> None:
        """Run one batch to the end (worker thread); every job gets its ``done`` or ``error`` event."""
        self.stats.count(jobs)
        rows = [
            _Row(job, choice, ReplyText(self.tokenizer, job.stops, job.split_reasoning))
            for job in jobs
            for choice in range(len(job.prompts))
        ]
        prompts = [row.job.prompts[row.choice] for row in rows]
        left = [len(rows)]

        def on_token(index: int, token: int) -> None:
            row = rows[index]
            if not row.done:
                if row.job.cancelled:
                    row.close("cancelled")
                    self.stats.cancelled_rows += 1
                else:
                    row.take(token, self.stop_ids)
                self.stats.completion_tokens += 1
                left[0] -= row.done
            if left[0] == 0:
                raise _BatchDone

        sampling = jobs[0].sampling
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**31)
        try:
            self.generate_fn(
                self.model,
                prompts,
                max(job.max_tokens for job in jobs),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                repetition_penalty=sampling.repetition_penalty,
                do_sample=not sampling.greedy,
                eos_ids=tuple(sorted(self.stop_ids)),
                pad_id=self.pad_id,
                stream=on_token,
                seed=seed,
                vocab_limit=self.tokenizer.vocab_size,
            )
        except _BatchDone:
            self.stats.stopped_early += 1
        except Exception as e:  # one batch failing must not take the server down
            log.exception("generation failed for a batch of %d request(s)", len(jobs))
            self.stats.failed_batches += 1
            for job in jobs:
                if job.rows_left:
                    job.send("error", e)
                    job.send("done")
                    job.rows_left = 0
            return
        for row in rows:
            if not row.done:  # generate reached max_new_tokens: the longest reply asked for
                row.close("length")
