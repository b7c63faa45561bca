"""Ctrl-C for the long commands: stop at the next safe point, never inside a compiled call.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be: inside JAX's
tracing or XLA's garbage-collection callback, where it is swallowed ("Exception ignored in ...") and the run goes
on, or half way through the runtime's bookkeeping, which can crash the interpreter at exit. `deferred_sigint()`
replaces that handler for the duration of a command by one that only records the request; the host loops call
`checkpoint()` between compiled calls and between written rows, and it raises `Interrupted` there, so what is
complete is flushed and temporary output is removed by the ordinary `finally` / `except` blocks. A second Ctrl-C
stops at once: the paths registered with `temporary()` are removed and the process exits with 130.

Outside `deferred_sigint()` (the Python API, tests) `checkpoint()` costs one flag read and never raises.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C

# Test hooks, read only while the policy is on: with RAAS_JAX_TRACE_SAFE_POINTS=1 every safe point passed prints
# "raas-jax: safe point NAME" to stderr, so a test can time its SIGINT against the phase the child is in; with
# RAAS_JAX_SIGINT_AT=NAME the process sends itself SIGINT just after passing safe point NAME, so the request
# arrives during the work that follows it (a write too short to hit from outside).
TRACE_ENV = "RAAS_JAX_TRACE_SAFE_POINTS"
SELF_SIGINT_ENV = "RAAS_JAX_SIGINT_AT"


class Interrupted(KeyboardInterrupt):
    """Raised by `checkpoint()` after a Ctrl-C. A KeyboardInterrupt, so `except Exception` does not swallow it."""


_requested = threading.Event()
_active = threading.Event()
_temporaries: dict[int, Path] = {}
_lock = threading.Lock()


def requested() -> bool:
    """Whether a Ctrl-C arrived since `deferred_sigint()` started."""
    return _requested.is_set()


def checkpoint(where: str = "") -> None:
    """A safe point of a host loop: raise `Interrupted` if a Ctrl-C is pending."""
    if _active.is_set() and os.environ.get(TRACE_ENV):
        print(f"raas-jax: safe point {where}", file=sys.stderr, flush=True)
    if _active.is_set() and _requested.is_set():  # outside a deferred_sigint block a stale flag means nothing
        raise Interrupted(f"interrupted (at {where})" if where else "interrupted")
    if _active.is_set() and where and os.environ.get(SELF_SIGINT_ENV) == where:
        os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def temporary(path: str | os.PathLike) -> Iterator[Path]:
    """Register `path` (a file or directory being written) for removal if a second Ctrl-C exits at once.

    The caller still removes it on an ordinary failure; this covers the exit that runs no `finally` block."""
    path = Path(path)
    with _lock:
        key = max(_temporaries, default=0) + 1
        _temporaries[key] = path
    try:
        yield path
    finally:
        with _lock:
            _temporaries.pop(key, None)


def _remove_temporaries() -> None:
    with _lock:
        paths = list(_temporaries.values())
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def exit_now(code: int = EXIT_CODE) -> None:
    """Remove registered temporaries, flush stdout / stderr and end the process with `code`, without running the
    interpreter's teardown (JAX's compile threads may still be busy)."""
    _remove_temporaries()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _on_sigint(signum, frame) -> None:
    if _requested.is_set():
        print("\ninterrupted again: stopping now", file=sys.stderr, flush=True)
        exit_now()
    _requested.set()
    print("\ninterrupted: stopping at the next safe point (Ctrl-C again to stop at once)", file=sys.stderr,
          flush=True)


def install() -> None:
    """Turn the policy on for the rest of the process (the command line: a Ctrl-C between the end of the work and
    the exit must not raise either). `deferred_sigint()` blocks inside keep it on when they end."""
    signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Within the block a Ctrl-C sets a flag that `checkpoint()` turns into `Interrupted` (main thread only: a
    signal handler can be set nowhere else; elsewhere the block does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    if previous is not _on_sigint:
        _requested.clear()
    _active.set()
    try:
        checkpoint("start")
        yield
    finally:
        _active.clear()
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
