"""Ctrl-C: a real `raas-jax` child process gets SIGINT during compile, decode and writing, and must exit 130 with
no crash, no swallowed interrupt and nothing half-written; plus the flag's behaviour in process."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raas_jax import signals

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "milestones-13m"
BAD = ("Segmentation fault", "Fatal Python error", "Exception ignored", "Traceback")

EVAL = ["eval", "--dataset", "milestones:1", "--model", str(CKPT), "--limit", "2", "--batch-size", "2",
        "--policies", "dense,raas", "--budgets", "128", "--max-new-tokens", "160", "--quiet"]
SHORT_EVAL = [*EVAL[:-2], "32", "--quiet"]  # the first row comes sooner; enough to stop at its write


def run_interrupted(argv: list[str], marker: str, delay: float | None = 0.0, timeout: float = 120.0
                    ) -> tuple[int | None, str]:
    """Start `raas-jax ARGV` with safe points traced, send SIGINT `delay` seconds after the first stderr line
    holding `marker`, and return (exit code, stderr). The marker is not seen: (None, stderr) after killing it.
    `delay` None: the child sends itself SIGINT just after passing the safe point `marker` names."""
    # JAX_DISABLE_MOST_OPTIMIZATIONS: the child decodes real weights for many steps, where XLA's optimization pays
    env = dict(os.environ, **{signals.TRACE_ENV: "1"}, PYTHONUNBUFFERED="1", JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    if delay is None:
        env[signals.SELF_SIGINT_ENV] = marker.removeprefix("safe point ")
    proc = subprocess.Popen([sys.executable, "-m", "raas_jax.cli", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()
    seen, deadline, found = [], time.monotonic() + timeout, False
    while not found and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        found = marker in line
    if found and delay is not None:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=max(deadline - time.monotonic(), 30))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        code = None
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    return (code if found else None), "".join(seen)


def assert_clean(code: int | None, err: str) -> None:
    assert code == 130, f"exit {code}, stderr:\n{err[-3000:]}"
    assert "interrupted" in err
    for bad in BAD:
        assert bad not in err, err[-3000:]


def assert_whole_rows(out: Path) -> None:
    """samples.jsonl holds only complete rows, each line ending in a newline."""
    path = out / "samples.jsonl"
    if path.exists():
        text = path.read_text()
        assert text == "" or text.endswith("\n")
        for line in text.splitlines():
            assert {"cell", "id"} <= set(json.loads(line))


def assert_stopped_early(out: Path) -> None:
    """Whole rows, and the run stopped before its end: no summary."""
    assert_whole_rows(out)
    assert not (out / "summary.md").exists()


def assert_no_export(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


MOMENTS = {  # moment -> (command builder, marker, delay range in s or None: sent by the child, output check)
    "compile": (lambda out: EVAL + ["--out-dir", str(out)], "safe point prefill", (0.0, 0.3), assert_stopped_early),
    "decode": (lambda out: EVAL + ["--out-dir", str(out)], "safe point decode", (0.0, 0.2), assert_stopped_early),
    "writing rows": (lambda out: SHORT_EVAL + ["--out-dir", str(out)], "safe point row written", (0.0, 0.0),
                     assert_stopped_early),
    "writing an export": (lambda out: ["export", str(CKPT), str(out), "--dtype", "f32"], "safe point export tensors",
                          None, assert_no_export),
    "any time": (lambda out: EVAL + ["--out-dir", str(out)], "safe point start", (0.5, 6.0), assert_whole_rows),
}


def interrupt_at(moment: str, tries: int, tmp_path: Path) -> None:
    build, marker, delays, check = MOMENTS[moment]
    rng = random.Random(moment)
    for attempt in range(tries):
        out = tmp_path / f"{moment.replace(' ', '_')}-{attempt}" / "out"
        code, err = run_interrupted(build(out), marker, None if delays is None else rng.uniform(*delays))
        assert code is not None, f"{moment}: the child never reached {marker!r}:\n{err[-3000:]}"
        assert_clean(code, err)
        check(out)


@pytest.mark.parametrize("moment", ["compile", "writing an export"])  # every moment, repeated: the slow test below
def test_ctrl_c_exits_130_with_nothing_half_written(moment, tmp_path):
    interrupt_at(moment, 1, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_is_clean_every_time(moment, tmp_path):
    """Repeated, at random delays, to catch the intermittent crashes and swallowed interrupts."""
    interrupt_at(moment, 4, tmp_path)


@pytest.mark.slow
def test_interrupted_eval_resumes_to_the_end(tmp_path):
    out = tmp_path / "out"
    code, err = run_interrupted(EVAL + ["--out-dir", str(out)], "safe point row written")
    assert_clean(code, err)
    done = (out / "samples.jsonl").read_text().splitlines()
    proc = subprocess.run([sys.executable, "-m", "raas_jax.cli", *EVAL, "--out-dir", str(out)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (out / "samples.jsonl").read_text().splitlines()
    assert rows[:len(done)] == done and len(rows) == 4  # 2 cells x 2 samples, the earlier rows kept as they were


def test_checkpoint_raises_only_after_a_ctrl_c():
    signals.checkpoint("outside")  # no policy installed: never raises
    with signals.deferred_sigint():
        signals.checkpoint("before")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
        assert signals.requested()
        with pytest.raises(signals.Interrupted, match="at here"):
            signals.checkpoint("here")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_exits_at_once_and_removes_temporaries(tmp_path):
    script = f"""
import os, signal, time
from pathlib import Path
from raas_jax import signals
tmp = Path({str(tmp_path)!r}) / "partial"
tmp.mkdir()
(tmp / "half").write_text("x")
with signals.deferred_sigint(), signals.temporary(tmp):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 130 and "not reached" not in proc.stdout, proc.stderr
    assert not (tmp_path / "partial").exists()


def test_a_stale_ctrl_c_does_not_leak_into_later_work():
    """A Ctrl-C caught by one command run in this process must not interrupt later work outside any command (an
    in-process CLI call, then library calls in the same process)."""
    with signals.deferred_sigint():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signals.requested()
    signals.checkpoint("later")  # outside a command: nothing to stop
    with signals.deferred_sigint():  # a new command starts clean
        signals.checkpoint("next")
