"""The HTTP server: Starlette routes over the scheduler, run by uvicorn. It knows nothing of JAX.

    POST /v1/completions, /v1/chat/completions   OpenAI-compatible; `stream: true` as server-sent events
    GET  /v1/models, /health, /metrics           model list, liveness, Prometheus metrics

SIGTERM or Ctrl-C: the server stops admitting, ends running requests with finish_reason "abort", and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from raas_jax.serve import openai_api as api
from raas_jax.serve.metrics import ServerMetrics
from raas_jax.serve.scheduler import Event, NotAccepting, QueueFull, Request, Scheduler

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def build_app(scheduler: Scheduler, tokenizer: Any, metrics: ServerMetrics, *, model_name: str,
              max_model_len: int, vocab_size: int) -> Starlette:
    created = int(time.time())

    def error(e: api.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def completions(http: HttpRequest, chat: bool) -> Response:
        try:
            try:
                body = json.loads(await http.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise api.ApiError(400, f"the request body is not valid JSON: {e}") from None
            parsed = api.parse_request(body, chat=chat, model_name=model_name, tokenizer=tokenizer,
                                       max_model_len=max_model_len, vocab_size=vocab_size)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event] = asyncio.Queue()
            request = Request(parsed.prompt_ids, parsed.settings,
                              lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                              seed=parsed.seed, stop=parsed.stop)
            try:
                scheduler.submit(request)
            except ValueError as e:
                raise api.ApiError(400, str(e), param="max_tokens" if "max_tokens" in str(e) else None) from None
            except QueueFull as e:
                raise api.ApiError(429, str(e), kind="rate_limit_exceeded", code="rate_limit_exceeded") from None
            except NotAccepting as e:
                raise api.ApiError(503, str(e), kind="server_error", code="shutting_down") from None
        except api.ApiError as e:
            return error(e)
        rid = api.new_id(chat)
        if parsed.stream:
            return StreamingResponse(_stream(scheduler, request, events, rid, model_name, chat, parsed.include_usage,
                                             parsed.return_token_ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, ids, last = [], [], None
        try:
            while last is None or last.finish_reason is None:
                try:
                    last = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        scheduler.cancel(request)
                        return Response(status_code=499)
                    continue
                text.append(last.text)
                ids += last.token_ids
        except asyncio.CancelledError:
            scheduler.cancel(request)
            raise
        if last.error:
            return error(api.ApiError(500, last.error, kind="server_error"))
        return JSONResponse(api.completion_body(rid, model_name, chat, "".join(text), last.finish_reason,
                                                last.prompt_tokens, last.completion_tokens,
                                                ids if parsed.return_token_ids else None))

    async def completions_route(http: HttpRequest) -> Response:
        return await completions(http, chat=False)

    async def chat_route(http: HttpRequest) -> Response:
        return await completions(http, chat=True)

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                         "owned_by": "raas-jax", "max_model_len": max_model_len}]})

    async def health(_: HttpRequest) -> Response:
        if scheduler.error is not None:
            return JSONResponse({"status": "error", "error": str(scheduler.error)}, status_code=500)
        return JSONResponse({"status": "ok"})

    async def prometheus(_: HttpRequest) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/completions", completions_route, methods=["POST"]),
        Route("/v1/chat/completions", chat_route, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], exception_handlers={404: _not_found, 405: _not_allowed})


async def _not_found(_: HttpRequest, exc: Exception) -> Response:
    return JSONResponse(api.ApiError(404, "no such route", code="not_found").body(), status_code=404)


async def _not_allowed(_: HttpRequest, exc: Exception) -> Response:
    return JSONResponse(api.ApiError(405, "method not allowed").body(), status_code=405)


async def _stream(scheduler: Scheduler, request: Request, events: asyncio.Queue, rid: str, model: str, chat: bool,
                  include_usage: bool, return_token_ids: bool = False) -> AsyncIterator[str]:
    """Server-sent events: a chunk per event with text, the finish reason on the last, usage if asked, [DONE]."""
    finished = False
    first = True
    try:
        if chat:  # the role comes first, as OpenAI's streams do
            yield _sse(api.chunk_body(rid, model, chat, "", None, first=True))
            first = False
        while True:
            event = await events.get()
            if event.error:
                yield _sse(api.ApiError(500, event.error, kind="server_error").body())
                finished = True
                break
            if event.text or event.finish_reason or (return_token_ids and event.token_ids):
                yield _sse(api.chunk_body(rid, model, chat, event.text, event.finish_reason, first=first,
                                          token_ids=event.token_ids if return_token_ids else None))
                first = False
            if event.finish_reason:
                finished = True
                if include_usage:
                    yield _sse(api.chunk_body(rid, model, chat, None, None,
                                              usage_body=api.usage(event.prompt_tokens, event.completion_tokens)))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the server is stopping): free the row
            scheduler.cancel(request)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def serve(engine: Any, tokenizer: Any, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_waiting: int = 256, decode_steps: int = 16, log_level: str = "info") -> int:
    """Run the server until SIGTERM / Ctrl-C; returns the exit code (0 after a clean stop)."""
    import uvicorn

    metrics = ServerMetrics(model_name)
    scheduler = Scheduler(engine, tokenizer, max_waiting=max_waiting, decode_steps=decode_steps, metrics=metrics)
    app = build_app(scheduler, tokenizer, metrics, model_name=model_name, max_model_len=engine.max_model_len,
                    vocab_size=engine.gen.cfg.vocab_size)

    stopped_by: list[int] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            stopped_by.append(sig)
            scheduler.request_stop()  # running requests end with "abort" at the next chunk; no new ones
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM / SIGINT stop the server; unlike uvicorn's own, the signal is not raised again at exit, so a
            SIGTERM ends the process with status 0 (Ctrl-C: 130)."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            lifespan="off")
    server = Server(config)
    scheduler.start()
    print(f"raas-jax serve: {model_name} on http://{host}:{port}/v1 ({engine.max_rows} rows, "
          f"{'budget-sized' if engine.fixed_rows else f'{engine.max_model_len}-token'} rows)", file=sys.stderr,
          flush=True)
    server.run()
    scheduler.request_stop()
    scheduler.join(timeout=60)
    return 130 if signal.SIGINT in stopped_by else 0
