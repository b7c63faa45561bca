"""`raas-jax serve` as a live process on a local port, driven by real clients (the `openai` package and raw HTTP).

Every loop here is bounded in count and time, and every request goes to 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import raas_jax
from raas_jax.policies import H2O, Dense, Quest, RaaS, StreamingLLM

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT_S = 240
NAME = "tiny"
POLICY_FLAGS = {
    "raas": (RaaS(budget=48, page_size=4), ["--policy", "raas", "--budget", "48", "--page-size", "4"]),
    "dense": (Dense(page_size=4), ["--policy", "dense", "--page-size", "4"]),
    "quest": (Quest(budget=16, page_size=4, dense_layers=1),
              ["--policy", "quest", "--budget", "16", "--page-size", "4", "--dense-layers", "1"]),
    "h2o": (H2O(budget=48, page_size=4), ["--policy", "h2o", "--budget", "48", "--page-size", "4"]),
    "streaming": (StreamingLLM(budget=48, page_size=4), ["--policy", "streaming", "--budget", "48", "--page-size", "4"]),
}
PROMPTS = [[5, 9, 33, 101, 7], list(range(1, 30)), [200] * 12, [17, 4, 99] * 7, [8, 8, 9], [60, 61, 62, 63] * 4]
NEW = [24, 40, 9, 31, 50, 17]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def request(self, method: str, path: str, body=None, timeout: float = 120) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
            conn.request(method, path, data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode()
            try:
                return response.status, json.loads(text)
            except json.JSONDecodeError:
                return response.status, text
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        status, text = self.request("GET", "/metrics")
        assert status == 200
        match = re.search(rf"^raas_jax:{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))


@contextlib.contextmanager
def running_server(model_dir: Path, tmp_path: Path, *flags: str):
    port = _free_port()
    log = tmp_path / f"serve_{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raas_jax.cli", "serve", "--model", str(model_dir), "--dtype",
                                 "f32", "--served-model-name", NAME, "--host", HOST, "--port", str(port),
                                 "--decode-steps", "8", *flags], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                if server.request("GET", "/health", timeout=5)[0] == 200:
                    break
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def model(tiny_llama_converted):
    return raas_jax.load(tiny_llama_converted, dtype="f32")


@pytest.fixture(scope="module")
def raas_server(tiny_llama_converted, tmp_path_factory):
    with running_server(tiny_llama_converted, tmp_path_factory.mktemp("serve"), "--max-rows", "3",
                        *POLICY_FLAGS["raas"][1]) as server:
        yield server


@pytest.fixture(scope="module")
def endless_server(tiny_llama_converted, tmp_path_factory):
    """A RaaS server that takes requests of a million tokens (its rows are budget-sized), for a request that is
    still decoding when the test acts on it."""
    with running_server(tiny_llama_converted, tmp_path_factory.mktemp("endless"), "--max-rows", "2",
                        "--max-model-len", "1000000", *POLICY_FLAGS["raas"][1]) as server:
        yield server


def _open_stream(server: Server) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6], "max_tokens": 999_000, "ignore_eos": True,
                                                        "stream": True, "return_token_ids": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # decoding has started
    return conn, response


def _wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.2)


def _staggered(server: Server, gap_s: float = 0.15) -> list[list[int]]:
    """Each prompt is sent `gap_s` after the previous one, all in flight together; greedy token ids back."""
    results: list = [None] * len(PROMPTS)

    def send(i):
        time.sleep(i * gap_s)
        status, body = server.request("POST", "/v1/completions", {
            "model": NAME, "prompt": PROMPTS[i], "max_tokens": NEW[i], "temperature": 0, "return_token_ids": True})
        results[i] = body["choices"][0]["token_ids"] if status == 200 else (status, body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request did not come back in 300 s"
    return results


def _alone(model, policy) -> list[list[int]]:
    return [model.generate([ids], max_new_tokens=new, chat=False, policy=policy)[0].token_ids
            for ids, new in zip(PROMPTS, NEW)]


def test_staggered_requests_equal_generate_alone_raas(raas_server, model):
    assert _staggered(raas_server) == _alone(model, POLICY_FLAGS["raas"][0])


# the fast set: RaaS over HTTP above, and every policy's rows in process (tests/serve/test_serve_engine.py)
@pytest.mark.parametrize("name", [pytest.param("dense", marks=pytest.mark.slow),
                                  pytest.param("quest", marks=pytest.mark.slow),
                                  pytest.param("h2o", marks=pytest.mark.slow),
                                  pytest.param("streaming", marks=pytest.mark.slow)])
def test_staggered_requests_equal_generate_alone(name, model, tiny_llama_converted, tmp_path):
    policy, flags = POLICY_FLAGS[name]
    with running_server(tiny_llama_converted, tmp_path, "--max-rows", "3", "--max-model-len", "128",
                        *flags) as server:
        assert _staggered(server) == _alone(model, policy)


def test_openai_client_completions_and_chat(raas_server):
    from openai import OpenAI

    client = OpenAI(base_url=raas_server.url, api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]
    plain = client.completions.create(model=NAME, prompt="the quick brown fox", max_tokens=12, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    streamed = client.completions.create(model=NAME, prompt="the quick brown fox", max_tokens=12, temperature=0,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    messages = [{"role": "user", "content": "1 2 3 4"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, seed=7)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 10
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, seed=7,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and not chunks[-1].choices
    # sampled: the same seed gives the same text; max_tokens ends it with "length" when no EOS comes first
    a, b = (client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=20, temperature=1.0, seed=11,
                                      extra_body={"ignore_eos": True}) for _ in range(2))
    assert a.choices[0].text == b.choices[0].text and a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 20


def test_stop_strings_end_the_text_and_are_not_returned(raas_server):
    status, body = raas_server.request("POST", "/v1/completions", {
        "prompt": [5, 6, 7], "max_tokens": 30, "temperature": 0, "ignore_eos": True})
    full = body["choices"][0]["text"]
    stop = full[5:7]
    assert status == 200 and len(full) > 8 and stop
    status, body = raas_server.request("POST", "/v1/completions", {
        "prompt": [5, 6, 7], "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stop": [stop, "\x00never"]})
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == full[:full.index(stop)]


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": "gpt-7", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": list(range(1, 600))}, 400, "prompt"),
    ("/v1/completions", {"prompt": list(range(1, 60)), "max_tokens": 4}, 400, None),  # 15 pages: budget 48 pins 10
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": 1}, 400, "ignore_eos"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(raas_server):
    for i, (path, body, status, param) in enumerate(BAD_REQUESTS):
        got, answer = raas_server.request("POST", path, body)
        assert got == status, (body, got, answer)
        error = answer["error"]
        assert error["message"] and error["type"] and (param is None or error["param"] == param), (body, answer)
        if i % 7 == 0:
            ok, answer = raas_server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3})
            assert ok == 200 and answer["choices"][0]["text"] is not None
    assert raas_server.request("GET", "/v1/nothing")[0] == 404
    assert raas_server.request("GET", "/v1/completions")[0] == 405
    ok, answer = raas_server.request("POST", "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert ok == 200 and answer["object"] == "chat.completion"


def test_a_client_that_disconnects_mid_stream_frees_its_row(endless_server):
    server = endless_server
    conn, _ = _open_stream(server)
    _wait_for(lambda: server.metric("rows_in_use") == 1, "the request took a row")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait_for(lambda: server.metric("rows_in_use") == 0, "the row was freed")
    assert server.metric("num_requests_running") == 0
    assert server.metric("num_preemptions_total") == 0
    generated = server.metric("generation_tokens_total")
    time.sleep(1.0)
    assert server.metric("generation_tokens_total") == generated  # nothing decodes for it any more


def test_a_full_queue_answers_429_and_the_rest_complete(tiny_llama_converted, tmp_path):
    with running_server(tiny_llama_converted, tmp_path, "--max-rows", "2", "--max-waiting", "10",
                        *POLICY_FLAGS["raas"][1]) as server:
        def send(i):
            return server.request("POST", "/v1/completions", {"prompt": [5 + i % 50, 6], "max_tokens": 8,
                                                              "ignore_eos": True, "temperature": 0}, timeout=240)

        with concurrent.futures.ThreadPoolExecutor(max_workers=60) as pool:
            futures = [pool.submit(send, i) for i in range(60)]
            done, pending = concurrent.futures.wait(futures, timeout=300)
        assert not pending, f"{len(pending)} of 60 requests did not come back in 300 s"
        answers = [f.result() for f in futures]
        statuses = [status for status, _ in answers]
        assert set(statuses) <= {200, 429}, set(statuses)
        # at least the queue's 10 are served (plus whatever the scheduler had moved into the 2 rows by then: on a
        # loaded machine the burst can fill the queue before the first turn admits anyone)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 10, statuses.count(200)
        for status, body in answers:
            if status == 200:
                assert body["usage"]["completion_tokens"] == 8
            else:
                assert body["error"]["code"] == "rate_limit_exceeded"
        assert server.metric("num_requests_waiting") == 0 and server.metric("rows_in_use") == 0


def test_sigterm_while_streaming_ends_the_stream_and_exits_0(tiny_llama_converted, tmp_path):
    with running_server(tiny_llama_converted, tmp_path, "--max-rows", "2", "--max-model-len", "1000000",
                        *POLICY_FLAGS["raas"][1]) as server:
        _, response = _open_stream(server)
        server.proc.send_signal(signal.SIGTERM)
        events = [line for line in response.read().decode().split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "abort"
        assert server.proc.wait(60) == 0, server.log.read_text()[-2000:]


def test_bench_serve_over_http(raas_server, tmp_path):
    """`raas-jax bench serve --url` against the live server: every request completes with its max_tokens."""
    from raas_jax.cli import main

    out = tmp_path / "http"
    assert main(["bench", "serve", "--url", raas_server.url, "--served-model-name", NAME, "--vocab-size", "300",
                 "--num-prompts", "8", "--request-rate", "20", "--prompt-len", "4:20", "--output-median", "10",
                 "--output-p90", "20", "--output-cap", "40", "--max-model-len", "512", "--time-limit", "240",
                 "--out-dir", str(out)]) == 0
    run = json.loads((out / "serve.json").read_text())["runs"][0]
    assert run["name"] == "http" and run["summary"]["completed"] == 8, run["summary"]
    assert all(r["output_tokens"] == r["max_tokens"] and r["error"] is None for r in run["records"])
