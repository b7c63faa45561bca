"""The scheduler: a FIFO queue of requests admitted into the engine's free rows between decode chunks.

One thread owns the engine and its decode state. Each turn it (1) takes new requests and cancellations, (2)
prefills waiting requests into free rows, at most `prefill_budget` prompt tokens per turn (a long prompt goes
one chunk per turn, so running rows stall for at most one chunk), (3) decodes every live row for `decode_steps`
steps, and (4) hands each request its new text: incremental detokenization, stop strings cut (and not returned),
finish reasons `stop` (EOS or a stop string), `length` (max_tokens) or `abort` (shutdown). Nothing is ever
preempted: a request keeps its row until it finishes or is cancelled.

Requests report through a callback run on the scheduler thread (`Request.on_event`); the HTTP layer turns those
into an asyncio queue. Everything the scheduler knows about the outside is in `Request` and `Event`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from raas_jax.decode.generate import DECODE_CHUNK
from raas_jax.serve.engine import Engine, RequestSettings


class QueueFull(Exception):
    """The waiting queue is at its bound (HTTP 429)."""


class NotAccepting(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclasses.dataclass
class Event:
    """What a request gets after a turn: new text and token ids, and how it finished (None: not yet)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the request failed inside the engine (reported as a server error)


@dataclasses.dataclass(eq=False)
class Request:
    ids: list[int]  # the prompt's token ids
    settings: RequestSettings
    on_event: Callable[[Event], None]
    seed: int = 0
    stop: tuple[str, ...] = ()
    id: str = ""
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: bool = False


class Detokenizer:
    """Token ids -> text deltas without decoding the whole output each time: a window of recent tokens is decoded
    with and without the newest ones, and the difference is the new text (a partial UTF-8 character waits)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window's first token
        self.read_offset = 0  # tokens whose text has been given out

    def add(self, new_ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(int(i) for i in new_ids)
        if self.tokenizer is None:  # token ids only (benchmarks of random-weight models)
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]


class _Live:
    """A request that holds a row (or is being prefilled into one)."""

    def __init__(self, request: Request, tokenizer: Any):
        self.request = request
        self.detok = Detokenizer(tokenizer)
        self.text = ""  # output text so far (stop strings cut)
        self.sent = 0  # characters of `text` already given out
        self.count = 0  # tokens sampled
        self.holdback = max((len(s) for s in request.stop), default=1) - 1


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: Any, *, max_waiting: int = 256, decode_steps: int = 16,
                 prefill_budget: int | None = None, metrics: Any = None):
        if not 1 <= decode_steps <= DECODE_CHUNK:
            raise ValueError(f"decode_steps must be in [1, {DECODE_CHUNK}], got {decode_steps}")
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.max_waiting, self.decode_steps = int(max_waiting), int(decode_steps)
        self.prefill_budget = int(prefill_budget or engine.prefill_chunk or 2048)
        self._lock = threading.Condition()
        self._incoming: collections.deque[Request] = collections.deque()
        self._waiting: collections.deque[Request] = collections.deque()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.rows: dict[int, _Live] = {}  # row -> its request
        self.free_rows = list(range(engine.max_rows))
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------------ from other threads
    def submit(self, request: Request) -> None:
        """Queue a request (any thread). Raises ValueError when it can never have a row, QueueFull past the bound,
        NotAccepting while shutting down."""
        self.engine.check_request(len(request.ids), request.settings.max_tokens)
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self._incoming) + len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting; retry later")
            request.id = request.id or f"req-{next(self._ids)}"
            self._incoming.append(request)
            self._lock.notify()
        self._gauges()

    def cancel(self, request: Request) -> None:
        """The client went away: its row is freed at the next turn (any thread)."""
        request.cancelled = True
        with self._lock:
            self._lock.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="raas-jax-scheduler", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop admitting; waiting and running requests end with finish_reason "abort" at the next turn (any
        thread, does not wait: a signal handler may call it)."""
        with self._lock:
            self._accepting = False
            self._stop = True
            self._lock.notify()

    def join(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self, timeout: float = 60.0) -> None:
        self.request_stop()
        self.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._incoming) + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self.rows)

    # ---------------------------------------------------------------------------------- the scheduler thread
    def _run(self) -> None:
        try:
            state = self.engine.init_state()
            job = None  # the prefill in progress: (request, Prefill)
            while True:
                with self._lock:
                    while not (self._stop or self._incoming or self.rows or job or
                               (self._waiting and self.free_rows)):
                        self._lock.wait(timeout=0.5)
                    if self._stop:
                        break
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                state = self._drop_cancelled(state)
                state, job = self._prefill(state, job)
                if self.rows:
                    state = self._decode(state)
                self._gauges()
        except BaseException as e:  # noqa: BLE001 - reported to every request, then to the server
            self.error = e
            traceback.print_exc()
            message = f"the engine failed: {type(e).__name__}: {e}"
            for live in list(self.rows.values()):
                live.request.on_event(Event("", [], "abort", len(live.request.ids), live.count, error=message))
            self.rows.clear()
        finally:
            with self._lock:
                self._accepting = False
                pending = list(self._incoming) + list(self._waiting)
                self._incoming.clear()
                self._waiting.clear()
            for request in pending:
                request.on_event(Event("", [], "abort", len(request.ids), 0))
            for live in list(self.rows.values()):
                self._finish(live, "abort")
            self.rows.clear()
            self._gauges()

    def _drop_cancelled(self, state):
        for row, live in list(self.rows.items()):
            if live.request.cancelled:
                state = self.engine.free(state, row)
                self._release(row)
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        return state

    def _prefill(self, state, job):
        spent = 0
        while spent < self.prefill_budget and (job is not None or (self._waiting and self.free_rows)):
            if job is None:
                request = self._waiting.popleft()
                try:
                    job = (request, self.engine.start_prefill(request.ids, request.settings, request.seed))
                except ValueError as e:  # checked at submit; kept for requests whose check changed meanwhile
                    request.on_event(Event("", [], "abort", len(request.ids), 0, error=str(e)))
                    job = None
                    continue
            request, prefill = job
            spent += prefill.chunk or prefill.tokens.shape[1]
            if not self.engine.prefill_step(prefill):
                continue
            job = None
            if request.cancelled:
                continue
            row = self.free_rows.pop(0)
            state = self.engine.insert(prefill.prefix, state, row)
            first, done = prefill.first_token(), bool(prefill.prefix.done[0])
            prefill.prefix = None  # the row holds it now: free the one-row pool (a Dense row can be GBs)
            live = _Live(request, self.tokenizer)
            self.rows[row] = live
            request.first_token_at = time.perf_counter()
            if self.metrics:
                self.metrics.request_started(request)
            if self._deliver(row, live, [first], done):
                state = self.engine.free(state, row)
        return state, job

    def _decode(self, state):
        state, tokens, new, done = self.engine.generate(state, self.decode_steps)
        for row, live in list(self.rows.items()):
            if self._deliver(row, live, tokens[row, :new[row]].tolist(), bool(done[row])):
                state = self.engine.free(state, row)
        return state

    def _deliver(self, row: int, live: _Live, new_ids: list[int], done: bool) -> bool:
        """Give a request its new tokens; finish it (and release its row) when it is done. Returns whether the row
        is still live on the device (a stop string ended it) and must be freed there."""
        request = live.request
        live.count += len(new_ids)
        if self.metrics:
            self.metrics.tokens(len(new_ids))
        live.text += live.detok.add(new_ids, final=done)
        reason = None
        cut = _find_stop(live.text, request.stop, live.sent)
        if cut is not None:
            live.text, reason = live.text[:cut], "stop"
        elif done:
            eos = bool(new_ids) and new_ids[-1] in self.engine.eos_ids and not request.settings.ignore_eos
            reason = "stop" if eos or live.count < request.settings.max_tokens else "length"
        end = len(live.text) if reason else max(live.sent, len(live.text) - live.holdback)
        delta = live.text[live.sent:end]
        live.sent = end
        if reason:
            self._finish(live, reason, delta, new_ids)
            self._release(row)
            return not done
        if delta or new_ids:
            request.on_event(Event(delta, new_ids, None, len(request.ids), live.count))
        return False

    def _finish(self, live: _Live, reason: str, delta: str = "", new_ids: Sequence[int] = ()) -> None:
        request = live.request
        request.on_event(Event(delta, list(new_ids), reason, len(request.ids), live.count))
        if self.metrics and reason != "abort":
            self.metrics.request_finished(request, live.count, reason)

    def _release(self, row: int) -> None:
        self.rows.pop(row, None)
        self.free_rows.append(row)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.gauges(running=self.running, waiting=self.waiting, rows_in_use=self.running,
                                rows=self.engine.max_rows)


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    """Index of the earliest stop string in `text` that ends past what was already sent (None: none)."""
    best = None
    for stop in stops:
        i = text.find(stop, max(0, sent - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
