"""`raas-jax bench serve`: requests that arrive over time, measured as vLLM's `bench serve` measures them.

Targets: the engine and scheduler in this process (`--model` a model path, or a random-weight shape such as
llama3-8b), or a running `raas-jax serve` over HTTP (`--url`, aiohttp, streamed completions). `--static` instead
runs the same requests as static batches of `rows` in arrival order (each batch decodes until its longest member
is done: `Model.generate`'s way), the baseline continuous batching is measured against.

Metrics (vLLM's definitions): request throughput, output tokens/s, TTFT, TPOT = (latency - TTFT) / (output
tokens - 1), ITL (the gaps between streamed chunks, per token), end-to-end latency; mean, median and p99; goodput
(requests/s meeting `--goodput ttft:MS,tpot:MS`); rows in use over time, and the output tokens/s while at least
90% of the rows were busy ("saturated"), the figure to hold against `bench e2e`'s decode tokens/s.

Workloads: `random` (prompt and output lengths drawn from the given distributions, every request with
ignore_eos; the default output lengths are reasoning-like: log-normal, median 4K tokens, p90 12K, cap 32K) and
`milestones:D` or `phoenix:D` (the trained checkpoint's held-out problems at difficulty D, real EOS, answers graded).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Z90 = 1.2815515655446004  # the standard normal's 90th percentile


@dataclasses.dataclass(frozen=True)
class WorkItem:
    prompt_ids: list[int]
    max_tokens: int
    arrival: float  # seconds after the start
    answer: str | None = None  # milestones: the gold answer
    problem: Any = None


@dataclasses.dataclass
class Record:
    """What happened to one request."""

    arrival: float
    max_tokens: int
    prompt_tokens: int
    start: float | None = None  # when it was sent / submitted
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (time, tokens) per delivery
    end: float | None = None
    output_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.start if self.chunks and self.start is not None else None

    @property
    def latency(self) -> float | None:
        return self.end - self.start if self.end is not None and self.start is not None else None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def token_time(self, k: int) -> float | None:
        """When output token `k` (1-based) was delivered: the time of the chunk that carried it."""
        delivered = 0
        for t, n in self.chunks:
            delivered += n
            if delivered >= k:
                return t
        return None

    def window_tpot(self, first: int, tokens: int) -> float | None:
        """Seconds per output token from token `first` to token `first + tokens` (None: not reached)."""
        t0, t1 = self.token_time(first), self.token_time(first + tokens)
        return None if t0 is None or t1 is None else (t1 - t0) / tokens

    def itls(self) -> list[float]:
        """Inter-token latencies: each later chunk's gap, spread over its tokens."""
        out = []
        for (t0, _), (t1, n) in zip(self.chunks, self.chunks[1:]):
            out += [(t1 - t0) / n] * n if n else []
        return out


# ---------------------------------------------------------------------------------------------- workloads

def lognormal_lengths(n: int, rng: np.random.Generator, median: float, p90: float, cap: int, low: int = 1
                      ) -> np.ndarray:
    """`n` integers from a log-normal with the given median and 90th percentile, clipped to [low, cap]; p90 = median
    gives every request that length."""
    if not 0 < median <= p90:
        raise ValueError(f"need 0 < median <= p90, got median {median}, p90 {p90}")
    sigma = math.log(p90 / median) / Z90
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), low, cap).astype(int)


def arrivals(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals at `rate` requests/s (inf: all at once)."""
    if math.isinf(rate):
        return np.zeros(n)
    return np.cumsum(rng.exponential(1.0 / rate, n))


def random_workload(n: int, *, vocab: int, seed: int, rate: float, prompt_len: tuple[int, int],
                    output_median: float, output_p90: float, output_cap: int) -> list[WorkItem]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    outputs = lognormal_lengths(n, rng, output_median, output_p90, output_cap)
    times = arrivals(n, rate, rng)
    return [WorkItem(rng.integers(1, vocab, int(length)).tolist(), int(out), float(t))
            for length, out, t in zip(lengths, outputs, times)]


def milestones_workload(model: Any, dataset: str, n: int, *, seed: int, rate: float, max_tokens: int
                        ) -> list[WorkItem]:
    """The eval's held-out milestones problems (`dataset` = milestones:D or phoenix:D), prompts as the eval builds
    them."""
    from raas_jax.eval.datasets import load_samples
    from raas_jax.eval.runner import build_prompt

    samples = load_samples(dataset, None, limit=n)
    times = arrivals(len(samples), rate, np.random.default_rng(seed))
    return [WorkItem(build_prompt(model, s.question, dataset), max_tokens, float(t), answer=s.gold, problem=s)
            for s, t in zip(samples, times)]


def accuracy(dataset: str, items: Sequence[WorkItem], records: Sequence[Record]) -> float | None:
    """Share of the graded requests whose answer is right (the eval's grading)."""
    from raas_jax.eval.runner import grade

    graded = [grade(dataset, it.problem, r.text)["correct"] for it, r in zip(items, records)
              if it.problem is not None and r.finish_reason is not None and r.error is None]
    return sum(graded) / len(graded) if graded else None


# ------------------------------------------------------------------------------------------------ targets

def run_in_process(engine: Any, items: Sequence[WorkItem], *, tokenizer: Any = None, max_concurrency: int | None,
                   decode_steps: int, time_limit: float, sample_every: float = 0.25
                   ) -> tuple[list[Record], list[tuple[float, int, int]]]:
    """Serve `items` through a Scheduler over `engine` in this process. Returns the records and the timeline
    (seconds, rows in use, requests waiting)."""
    from raas_jax.serve.engine import RequestSettings
    from raas_jax.serve.scheduler import Request, Scheduler

    scheduler = Scheduler(engine, tokenizer, max_waiting=len(items) + 1, decode_steps=decode_steps)
    records = [Record(it.arrival, it.max_tokens, len(it.prompt_ids)) for it in items]
    finished = threading.Semaphore(0)
    slots = threading.Semaphore(max_concurrency or len(items))

    def callback(record: Record):
        def on_event(event):
            now = time.perf_counter()
            if event.token_ids:
                record.chunks.append((now, len(event.token_ids)))
            record.text += event.text
            record.output_tokens = event.completion_tokens
            if event.finish_reason:
                record.end, record.finish_reason, record.error = now, event.finish_reason, event.error
                slots.release()
                finished.release()
        return on_event

    timeline: list[tuple[float, int, int]] = []
    stop_sampling = threading.Event()
    scheduler.start()
    t0 = time.perf_counter()

    def sample():
        while True:
            timeline.append((time.perf_counter() - t0, scheduler.running, scheduler.waiting))
            if stop_sampling.wait(sample_every):
                break

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    requests = []
    deadline = t0 + time_limit
    try:
        for item, record in zip(items, records):
            delay = t0 + item.arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if not slots.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                break
            record.start = time.perf_counter()
            request = Request(item.prompt_ids, RequestSettings(max_tokens=item.max_tokens, ignore_eos=item.answer is None),
                              callback(record), seed=0)
            requests.append(request)
            scheduler.submit(request)
        for _ in requests:
            if not finished.acquire(timeout=max(0.0, deadline - time.perf_counter())):
                break
    finally:
        stop_sampling.set()
        sampler.join(5)
        timeline.append((time.perf_counter() - t0, scheduler.running, scheduler.waiting))
        scheduler.shutdown()
    for record in records:
        record.start, record.end = _relative(record.start, t0), _relative(record.end, t0)
        record.chunks = [(t - t0, n) for t, n in record.chunks]
    return records, timeline


def _relative(t: float | None, t0: float) -> float | None:
    return None if t is None else t - t0


def run_static(gen: Any, params: Any, eos_ids: Sequence[int], items: Sequence[WorkItem], *, rows: int,
               time_limit: float) -> list[Record]:
    """The same requests as static batches of `rows`, in arrival order: a batch starts once its last request has
    arrived (and the previous batch is done), prefills together and decodes until every row is done."""
    import jax
    import jax.numpy as jnp

    from raas_jax.decode.generate import RowSettings, batch_keys, eos_array, pad_prompts

    eos = eos_array(eos_ids)
    records = [Record(it.arrival, it.max_tokens, len(it.prompt_ids)) for it in items]
    batches = [list(range(first, min(first + rows, len(items)))) for first in range(0, len(items), rows)]

    def inputs(batch):
        tokens, lengths, padding = pad_prompts([items[i].prompt_ids for i in batch] + [[1]] * (rows - len(batch)))
        padding[len(batch):] = True
        settings = RowSettings.make(tokens.shape[0], max_new_tokens=[items[i].max_tokens for i in batch] +
                                    [1] * (tokens.shape[0] - len(batch)), ignore_eos=True)
        slots = gen.policy.num_slots(int(lengths.max()), max(items[i].max_tokens for i in batch))
        return tokens, lengths, padding, settings, slots

    shapes = {}  # compile every batch's shapes first: the timed run measures decoding, not compiles
    for batch in batches:
        tokens, lengths, padding, settings, slots = inputs(batch)
        shapes.setdefault((tokens.shape, slots), (tokens, lengths, padding, settings, slots))
    for tokens, lengths, padding, settings, slots in shapes.values():
        state = gen.start(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.ones_like(jnp.asarray(padding)),
                          eos, settings, batch_keys(0, tokens.shape[0]), num_slots=slots)
        jax.block_until_ready(gen.decode(params, state, jnp.int32(2), eos))
        del state
    t0 = time.perf_counter()
    for batch in batches:
        wait = t0 + max(items[i].arrival for i in batch) - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        if time.perf_counter() - t0 > time_limit:
            break
        tokens, lengths, padding, settings, slots = inputs(batch)
        for i in batch:  # a request waits from its arrival, as a client would
            records[i].start = items[i].arrival
        state = gen.start(params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(padding), eos, settings,
                          batch_keys(0, tokens.shape[0]), num_slots=slots)
        first_token = time.perf_counter() - t0
        while not bool(jnp.all(state.done)):
            step = int(state.step)
            state = gen.decode(params, state.replace(base=jnp.int32(step)), jnp.int32(step + 128), eos)
        jax.block_until_ready(state)
        end = time.perf_counter() - t0
        counts = np.asarray(state.count)
        for j, i in enumerate(batch):
            records[i].chunks = [(first_token, 1), (end, int(counts[j]) - 1)] if counts[j] > 1 else [(first_token, 1)]
            records[i].end, records[i].output_tokens, records[i].finish_reason = end, int(counts[j]), "length"
    return records


async def _http_one(session: Any, url: str, model: str, item: WorkItem, record: Record, t0: float) -> None:
    body = {"model": model, "prompt": item.prompt_ids, "max_tokens": item.max_tokens, "temperature": 0,
            "ignore_eos": item.answer is None, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True}
    record.start = time.perf_counter() - t0
    try:
        async with session.post(f"{url}/completions", json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    record.error = chunk["error"]["message"]
                    continue
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    ids = choice.get("token_ids") or []
                    if ids:
                        record.chunks.append((time.perf_counter() - t0, len(ids)))
                    record.text += choice.get("text") or ""
                    record.finish_reason = choice.get("finish_reason") or record.finish_reason
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash of the benchmark
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.end = time.perf_counter() - t0
        if not record.output_tokens:
            record.output_tokens = sum(n for _, n in record.chunks)


def run_http(url: str, model: str, items: Sequence[WorkItem], *, max_concurrency: int | None,
             time_limit: float) -> list[Record]:
    """Send `items` to a running server (streamed completions) at their arrival times."""
    import aiohttp

    records = [Record(it.arrival, it.max_tokens, len(it.prompt_ids)) for it in items]

    async def main():
        limit = asyncio.Semaphore(max_concurrency or len(items))
        timeout = aiohttp.ClientTimeout(total=time_limit)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            t0 = time.perf_counter()

            async def one(item, record):
                await asyncio.sleep(max(0.0, item.arrival - (time.perf_counter() - t0)))
                async with limit:
                    await _http_one(session, url.rstrip("/"), model, item, record, t0)

            await asyncio.wait_for(asyncio.gather(*(one(it, r) for it, r in zip(items, records))), time_limit)

    try:
        asyncio.run(main())
    except asyncio.TimeoutError:
        pass
    return records


# ------------------------------------------------------------------------------------------------ summary

def _stats(values: Sequence[float], scale: float = 1e3) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    v = np.asarray(values) * scale
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p99": float(np.percentile(v, 99))}


TPOT_WINDOW = 1024  # output tokens per window of `tpot_by_position_ms`
TPOT_WINDOW_STARTS = (1, 2048, 4096, 8192, 16000)


def summarize(records: Sequence[Record], timeline: Sequence[tuple[float, int, int]], rows: int,
              goodput: dict[str, float] | None = None, measure_after: float = 0.0) -> dict:
    done = [r for r in records if r.end is not None and r.error is None and r.output_tokens > 0
            and r.finish_reason != "abort"]
    aborted = [r for r in records if r.finish_reason == "abort" and r.error is None]  # cut by --time-limit
    by_position = {"tpot_by_position_ms": tpot_by_position(records)}  # finished or cut: what was delivered
    if measure_after > 0:
        by_position["after"] = arrivals_after(records, measure_after)
    if not done:
        return {"completed": 0, "aborted": len(aborted), "failed": len(records) - len(aborted), "rows": rows,
                **by_position}
    span = max(r.end for r in done) - min(r.start for r in done)
    output = sum(r.output_tokens for r in done)
    started = [r for r in records if r.start is not None and r.chunks]
    run_span = max(t for r in started for t, _ in r.chunks) - min(r.start for r in started)
    summary = {
        "completed": len(done), "aborted": len(aborted), "failed": len(records) - len(done) - len(aborted),
        "duration_s": span, "delivered_output_throughput": sum(n for r in started for _, n in r.chunks) / run_span,
        "request_throughput": len(done) / span, "output_throughput": output / span,
        "total_output_tokens": output, "total_input_tokens": sum(r.prompt_tokens for r in done),
        "ttft_ms": _stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats([x for r in done for x in r.itls()]),
        "e2el_ms": _stats([r.latency for r in done]),
        "rows": rows,
    }
    if goodput:
        good = [r for r in done if (r.ttft or 0) * 1e3 <= goodput.get("ttft", math.inf)
                and (r.tpot or 0) * 1e3 <= goodput.get("tpot", math.inf)]
        summary["goodput"] = len(good) / span
    summary["saturated_output_throughput"] = saturated_throughput(records, timeline, rows)
    return summary | by_position


def tpot_by_position(records: Sequence[Record], window: int = TPOT_WINDOW,
                     starts: Sequence[int] = TPOT_WINDOW_STARTS) -> dict[str, dict]:
    """TPOT over output tokens [k, k + window) of each request that got that far (finished or cut by the time
    limit), per start k: {"k": {"requests", "mean", "median", "p99"}}. RaaS's rows hold a fixed pool, so its TPOT
    should not grow with k."""
    out = {}
    for k in starts:
        values = [v for v in (r.window_tpot(k, window) for r in records) if v is not None]
        if values:
            out[str(k)] = {"requests": len(values), **_stats(values)}
    return out


def arrivals_after(records: Sequence[Record], t: float) -> dict:
    """TTFT of the requests that arrived at or after `t` seconds (the steady state of a run at a fixed rate),
    whether or not they finished; and how many of them got no first token before the run ended."""
    later = [r for r in records if r.arrival >= t and r.start is not None]
    return {"from_s": t, "requests": len(later), "no_first_token": sum(1 for r in later if r.ttft is None),
            "ttft_ms": _stats([r.ttft for r in later if r.ttft is not None])}


def saturated_throughput(records: Sequence[Record], timeline: Sequence[tuple[float, int, int]], rows: int,
                         share: float = 0.9) -> float | None:
    """Output tokens/s over the timeline samples with at least `share` of the rows busy (None: never that busy)."""
    busy = [(t0, t1) for (t0, r0, _), (t1, _, _) in zip(timeline, timeline[1:]) if r0 >= share * rows]
    if not busy:
        return None
    seconds = sum(t1 - t0 for t0, t1 in busy)
    tokens = sum(n for r in records for t, n in r.chunks if any(t0 < t <= t1 for t0, t1 in busy))
    return tokens / seconds if seconds > 0 else None


def table(rows: Sequence[dict]) -> str:
    head = ("| run | rows | requests | req/s | output tok/s | saturated tok/s | TTFT median / p99 ms | "
            "TPOT median / p99 ms | ITL median ms | E2E median s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["summary"]
        if not s.get("completed"):
            lines.append(f"| {r['name']} | {s.get('rows', '')} | 0 | | | | | | | |")
            continue

        def ms(key, q):
            value = s[key][q]
            return "" if value is None else f"{value:.1f}"

        sat = s.get("saturated_output_throughput")
        lines.append(f"| {r['name']} | {s['rows']} | {s['completed']} | {s['request_throughput']:.2f} | "
                     f"{s['output_throughput']:.0f} | {'' if sat is None else f'{sat:.0f}'} | "
                     f"{ms('ttft_ms', 'median')} / {ms('ttft_ms', 'p99')} | {ms('tpot_ms', 'median')} / "
                     f"{ms('tpot_ms', 'p99')} | {ms('itl_ms', 'median')} | {s['e2el_ms']['median'] / 1e3:.1f} |")
    return "\n".join(lines)


def position_table(rows: Sequence[dict]) -> str:
    """TPOT median / p99 (ms) per window of output tokens, and the later arrivals' TTFT, for the runs that have
    them ("" when none has)."""
    starts = sorted({int(k) for r in rows for k in r["summary"].get("tpot_by_position_ms", {})})
    lines = []
    if starts:
        head = "| run | " + " | ".join(f"TPOT tokens {k}-{k + TPOT_WINDOW - 1} median / p99 ms (requests)"
                                          for k in starts) + " |"
        lines += [head, "|" + "---|" * (len(starts) + 1)]
        for r in rows:
            cells = []
            for k in starts:
                w = r["summary"].get("tpot_by_position_ms", {}).get(str(k))
                cells.append("" if w is None else f"{w['median']:.2f} / {w['p99']:.2f} ({w['requests']})")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    for r in rows:
        after = r["summary"].get("after")
        if after and after["ttft_ms"]["median"] is not None:
            lines.append(f"\n{r['name']}: {after['requests']} requests arrived after {after['from_s']:g} s: TTFT median "
                         f"{after['ttft_ms']['median']:.0f} ms, p99 {after['ttft_ms']['p99']:.0f} ms; "
                         f"{after['no_first_token']} without a first token at the end")
    return "\n".join(lines)


def plot(runs: Sequence[dict], out: Path) -> list[Path]:
    """Rows in use over time per run, and output tokens/s and TTFT / TPOT per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if not any(run.get("timeline") for run in runs):  # over HTTP the server's rows are not seen
        runs_with_rows = []
    else:
        runs_with_rows = runs
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs_with_rows:
        if run.get("timeline"):
            t, busy, _ = zip(*run["timeline"])
            ax.plot(t, np.asarray(busy) / max(run["summary"].get("rows") or 1, 1), label=run["name"])
    ax.set_xlabel("seconds")
    ax.set_ylabel("rows in use (share)")
    ax.set_ylim(0, 1.05)
    if runs_with_rows:
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "serve_rows_in_use.png")
        fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    done = [r for r in runs if r["summary"].get("completed")]
    if done:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        names = [r["name"] for r in done]
        axes[0].bar(names, [r["summary"]["output_throughput"] for r in done])
        axes[0].set_ylabel("output tokens/s")
        axes[1].bar(names, [r["summary"]["ttft_ms"]["median"] or 0 for r in done])
        axes[1].set_ylabel("TTFT median (ms)")
        axes[2].bar(names, [r["summary"]["tpot_ms"]["median"] or 0 for r in done])
        axes[2].set_ylabel("TPOT median (ms)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30, labelsize=7)
        fig.tight_layout()
        paths.append(out / "serve_throughput_latency.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None):
    import argparse

    from raas_jax.cli import add_policy_flags
    from raas_jax.validation import at_least, finite, rows

    ap = argparse.ArgumentParser(prog="raas-jax bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b", help="a model path, or a random-weight shape: llama3-8b, "
                    "qwen2.5-7b, tiny (default llama3-8b)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "f32"])
    ap.add_argument("--url", default=None, help="a running server's base URL (http://127.0.0.1:8000/v1): send the "
                    "requests there instead of serving them in this process")
    ap.add_argument("--served-model-name", default=None, help="with --url: the model name to send")
    ap.add_argument("--policies", default="raas", help="comma-separated policies, each a run (in-process); "
                    "--budget / --page-size apply to each")
    ap.add_argument("--modes", default="serve", help="serve (continuous batching) and/or static (batches of "
                    "--max-rows in arrival order, each until its longest member is done)")
    ap.add_argument("--max-rows", type=rows, default="auto")
    ap.add_argument("--max-model-len", type=at_least(2), default=32768,
                    help="Dense / Quest rows hold this many tokens (default 32768)")
    ap.add_argument("--workload", default="random", help="random, milestones:D or phoenix:D")
    ap.add_argument("--num-prompts", type=at_least(1), default=200)
    ap.add_argument("--request-rate", type=finite(0.0), default=math.inf, help="Poisson arrivals per second "
                    "(default inf: all at once)")
    ap.add_argument("--max-concurrency", type=at_least(1), default=None)
    ap.add_argument("--seed", type=at_least(0), default=0)
    ap.add_argument("--prompt-len", default="128:512", help="random: prompt lengths, uniform in LOW:HIGH")
    ap.add_argument("--vocab-size", type=at_least(2), default=None, help="random: prompt token ids are drawn from "
                    "[1, this) (default: the model's vocabulary; 256 with --url)")
    ap.add_argument("--output-median", type=finite(1.0), default=4096)
    ap.add_argument("--output-p90", type=finite(1.0), default=12288)
    ap.add_argument("--output-cap", type=at_least(1), default=32768)
    ap.add_argument("--max-tokens", type=at_least(1), default=4096, help="milestones: max_tokens per request")
    ap.add_argument("--goodput", default="", help="e.g. ttft:2000,tpot:100 (milliseconds)")
    ap.add_argument("--decode-steps", type=at_least(1), default=16)
    ap.add_argument("--time-limit", type=finite(1.0), default=600.0, help="seconds per run (then it stops)")
    ap.add_argument("--measure-after", type=finite(0.0), default=0.0, help="also report the TTFT of the requests "
                    "arriving after this many seconds (a fixed-rate run's steady state), finished or not")
    ap.add_argument("--out-dir", default="out/bench_serve")
    add_policy_flags(ap)
    args = ap.parse_args(argv)
    low, _, high = args.prompt_len.partition(":")
    try:
        args.prompt_range = (int(low), int(high or low))
    except ValueError:
        ap.error(f"--prompt-len must be LOW:HIGH, got {args.prompt_len!r}")
    if not 1 <= args.prompt_range[0] <= args.prompt_range[1]:
        ap.error(f"--prompt-len must have 1 <= LOW <= HIGH, got {args.prompt_len!r}")
    if args.output_median > args.output_p90:
        ap.error("--output-median must not exceed --output-p90 (equal: every output that long)")
    args.goodput_limits = {}
    for part in filter(None, args.goodput.split(",")):
        key, _, value = part.partition(":")
        if key not in ("ttft", "tpot"):
            ap.error(f"--goodput takes ttft:MS and tpot:MS, got {part!r}")
        args.goodput_limits[key] = float(value)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"serve", "static"}:
        ap.error(f"--modes takes serve and/or static, got {args.modes!r}")
    args.mode_list = modes
    return args


def _load(args) -> tuple[Any, Any, Any, Sequence[int], Any]:
    """(model or None, cfg, params, eos ids, tokenizer) for --model: a path, or a random-weight shape."""
    import jax
    import jax.numpy as jnp

    from raas_jax.bench.e2e import MODEL_SHAPES, random_params

    if args.model in MODEL_SHAPES:
        cfg = MODEL_SHAPES[args.model]
        dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}.get(args.dtype) or (
            jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        return None, cfg, random_params(cfg, dtype), (), None
    import raas_jax

    model = raas_jax.load(args.model, dtype=args.dtype)
    return model, model.cfg, model.params, model.eos_ids, model.tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    import gc

    import jax

    from raas_jax import configure_gpu
    from raas_jax.cli import policy_from_args
    from raas_jax.decode.generate import Generator
    from raas_jax.decode.memory import device_memory_limit
    from raas_jax.eval.datasets import is_milestones
    from raas_jax.policies import parse_policy_spec
    from raas_jax.serve.engine import Engine, rows_that_fit, warm_up

    configure_gpu()
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, cfg, params, eos_ids, tokenizer = (None, None, None, (), None) if args.url else _load(args)
    if args.workload == "random":
        vocab = args.vocab_size or (cfg.vocab_size if cfg is not None else 256)
        items = random_workload(args.num_prompts, vocab=vocab, seed=args.seed, rate=args.request_rate,
                                prompt_len=args.prompt_range, output_median=args.output_median,
                                output_p90=args.output_p90, output_cap=args.output_cap)
    elif is_milestones(args.workload):
        if model is None:
            raise ValueError(f"--workload {args.workload} needs --model PATH (the trained checkpoint), in process")
        items = milestones_workload(model, args.workload, args.num_prompts, seed=args.seed, rate=args.request_rate,
                                    max_tokens=args.max_tokens)
    else:
        raise ValueError(f"unknown workload {args.workload!r}: random, milestones:D or phoenix:D")
    # prompt + output within --max-model-len (as vLLM's random dataset keeps them within the model's length)
    items = [dataclasses.replace(it, max_tokens=max(1, min(it.max_tokens, args.max_model_len - len(it.prompt_ids))))
             for it in items]
    runs = []

    def save():
        (out / "serve.json").write_text(json.dumps({
            "config": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))},
            "jax": jax.__version__, "device": jax.devices()[0].device_kind, "runs": runs}, indent=1))

    if args.url:
        records = run_http(args.url, args.served_model_name or "default", items,
                           max_concurrency=args.max_concurrency, time_limit=args.time_limit)
        runs.append({"name": "http", "summary": summarize(records, [], 0, args.goodput_limits),
                     "records": [dataclasses.asdict(r) for r in records]})
    budget = args.budget
    for spec in [p.strip() for p in args.policies.split(",") if p.strip()] if not args.url else []:
        args.policy = spec
        args.budget = None if parse_policy_spec(spec)[0] == "dense" else budget  # --budget applies to the others
        policy = policy_from_args(args)
        unroll = jax.default_backend() != "cpu"
        gen = Generator(cfg, jax.tree.leaves(params)[0].dtype, policy, unroll_layers=unroll) if model is None \
            else dataclasses.replace(model._generator(policy), unroll_layers=unroll)
        max_model_len = args.max_model_len
        rows = args.max_rows if args.max_rows != "auto" else rows_that_fit(gen, params, max_model_len,
                                                                           limit=device_memory_limit())
        for mode in args.mode_list:
            name = f"{spec} {mode}"
            print(f"bench serve: {name}, {rows} rows, {len(items)} requests", flush=True)
            if mode == "serve":
                engine = Engine(gen, params, eos_ids, max_rows=rows, max_model_len=max_model_len)
                warm_up(engine, args.decode_steps, sorted({len(it.prompt_ids) for it in items}))
                records, timeline = run_in_process(engine, items, tokenizer=tokenizer,
                                                   max_concurrency=args.max_concurrency,
                                                   decode_steps=args.decode_steps, time_limit=args.time_limit)
                del engine
            else:
                records, timeline = run_static(gen, params, eos_ids, items, rows=rows,
                                               time_limit=args.time_limit), []
            summary = summarize(records, timeline, rows, args.goodput_limits, args.measure_after)
            if is_milestones(args.workload):
                summary["accuracy"] = accuracy(args.workload, items, records)
            runs.append({"name": name, "policy": spec, "mode": mode, "summary": summary, "timeline": timeline,
                         "records": [dataclasses.asdict(r) | {"chunks": len(r.chunks)} for r in records]})
            save()
            print(table(runs[-1:]), flush=True)
            gc.collect()
    save()
    text = table(runs)
    extra = position_table(runs)
    text += "\n\n" + extra if extra else ""
    (out / "serve.md").write_text(text + "\n")
    plot(runs, out)
    print(text)
    return 0
