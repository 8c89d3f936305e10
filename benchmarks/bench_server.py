"""`pyengine serve` and llama.cpp's `llama-server` under load: throughput and time to first token at
1, 4 and 8 concurrent clients, same GGUF, same threads, same run.

Each server runs in a subprocess on a free 127.0.0.1 port (so the clients' Python does not share
its GIL) with as many slots as the largest concurrency (`--parallel` / `-np`, continuous batching in
both). For each concurrency c, c clients run at once, each sending --requests streaming chat
completions one after another. The clients are asyncio tasks of this process on aiohttp (its HTTP
parser is C): on a 2-core machine the load generator's CPU is taken from the server, and httpx in a
thread per client used about 0.7 ms of it per streamed token against aiohttp's 0.1. Throughput is
all completion tokens (from the usage chunk, else one per content chunk) over the wall time of the
round; TTFT is from sending a request to its first content chunk. llama-server is built natively by llama_cpp_tools.py.
With --rounds N the levels are run N times in turn; each level reports its median round and its
scaling: the median over the passes of its tok/s over the same pass's one-client tok/s (a shared
machine's slow minutes then fall on both sides of a ratio). For pyengine each round also reads the
server's forward-pass counters (/metrics) before and after: passes, rows per pass, milliseconds per
pass and their share of the round's wall time (the rest is the server's Python between passes).

    python benchmarks/bench_server.py                        # default model, 1/4/8 clients, both engines
    python benchmarks/bench_server.py -m model.gguf -c 1,2 --max-tokens 64 --engines pyengine
    python benchmarks/bench_server.py -m model.gguf -c 1,4,8 --max-tokens 64 -t 2 --requests 8 --rounds 5
    python benchmarks/bench_server.py -c 1,8 --requests 4 --system-prompt-tokens 500   # a shared system prompt
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from pyengine.server import wait_until_healthy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engine import cpu_model  # noqa: E402
QUESTIONS = ["Write a short poem about the sea.", "Explain what a CPU does.", "Tell me about the Moon.",
             "Describe a day at the beach.", "What makes a good friend?", "How do plants grow?",
             "Write a story about a robot.", "Why is the sky blue?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def stream_chat(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    """One streaming chat completion: time to its first content chunk, completion tokens (from the usage
    chunk, else one per content chunk), its text and its wall time."""
    t0 = time.perf_counter()
    ttft, tokens, chunks, text = None, 0, 0, []
    async with session.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.content:  # server-sent events, one "data: {...}" line each
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if piece:
                chunks += 1
                text.append(piece)
                if ttft is None:
                    ttft = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    return {"ttft": seconds if ttft is None else ttft, "tokens": tokens or chunks, "text": "".join(text),
            "seconds": seconds}


def sampled_body(model: str, question: str, max_tokens: int, seed: int, system: str = "") -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream_options": {"include_usage": True}}


def system_prompt(tokens: int) -> str:
    """A system prompt of about `tokens` tokens (sentences of ~20 each), the same for every request."""
    return " ".join(f"Rule {i}: answer politely and briefly, and mention the opening hours when asked about a visit."
                    for i in range(max(1, tokens // 20)))


def client_session() -> aiohttp.ClientSession:
    # A connection per request, as a new client would open (llama-server closes idle keep-alive
    # connections, and a request sent on one it has just closed fails); no cap on how many at once.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=600))


async def run_round(url: str, model: str, clients: int, requests: int, max_tokens: int, system: str = "") -> dict:
    async def client(session: aiohttp.ClientSession, i: int) -> list[dict]:
        out = []
        for j in range(requests):
            body = sampled_body(model, QUESTIONS[(i + j) % len(QUESTIONS)], max_tokens, seed=1000 * i + j,
                                system=system)
            try:
                out.append(await stream_chat(session, url, body))
            except aiohttp.ClientError as e:
                out.append({"error": f"{type(e).__name__}: {e}"})
        return out

    async with client_session() as session:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(session, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    results = [r for rs in per_client for r in rs]
    failed = [r for r in results if "error" in r]
    if failed:
        raise SystemExit(f"bench_server: {len(failed)} of {len(results)} requests failed, e.g. {failed[0]['error']}")
    ttfts = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "per_client_tokens_per_s": statistics.mean(
                r["tokens"] / (r["seconds"] - r["ttft"]) for r in results if r["seconds"] > r["ttft"]),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95)}


async def prefix_reuse(url: str, model: str) -> dict:
    """TTFT of a conversation's second turn, whose prompt starts with the first turn's ~1,000 tokens,
    against the first turn's (the server keeps them in the slot); greedy."""
    story = " ".join(QUESTIONS) + " "
    system = {"role": "system", "content": "Background notes: " + story * 18}  # about 1,000 tokens
    first = [system, {"role": "user", "content": "Summarize the notes in one line."}]
    async with client_session() as session:
        r1 = await stream_chat(session, url, {"model": model, "messages": first, "max_tokens": 16, "temperature": 0})
        second = [*first, {"role": "assistant", "content": r1["text"]}, {"role": "user", "content": "And in one word?"}]
        r2 = await stream_chat(session, url, {"model": model, "messages": second, "max_tokens": 16, "temperature": 0})
    return {"first_turn_ttft_s": r1["ttft"], "second_turn_ttft_s": r2["ttft"], "ratio": r2["ttft"] / r1["ttft"]}


ENGINE_COUNTERS = ("pyengine_engine_steps_total", "pyengine_engine_step_rows_total", "pyengine_engine_step_seconds_total")


def engine_counters(url: str) -> dict[str, float] | None:
    """pyengine's forward-pass counters from /metrics (None where the server has none, as llama-server)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    values = dict(line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {k: float(values[k]) for k in ENGINE_COUNTERS} if all(k in values for k in ENGINE_COUNTERS) else None


def engine_share(before: dict | None, after: dict | None, seconds: float) -> dict | None:
    """A round's forward passes from the counters around it: how many, rows per pass, milliseconds per
    pass and the share of the round's wall time spent in them."""
    if before is None or after is None:
        return None
    steps, rows, busy = (after[k] - before[k] for k in ENGINE_COUNTERS)
    if steps <= 0:
        return None
    return {"steps": int(steps), "rows_per_step": rows / steps, "ms_per_step": 1e3 * busy / steps,
            "busy_share": busy / seconds}


async def warm_up(url: str) -> str:
    """The server's model name, after one short request."""
    async with client_session() as session:
        async with session.get(f"{url}/v1/models") as r:
            name = (await r.json())["data"][0]["id"]
        await stream_chat(session, url, sampled_body(name, QUESTIONS[0], 4, 0))
    return name


def server_command(engine: str, model: Path, port: int, slots: int, threads: int) -> list[str]:
    if engine == "pyengine":
        return [sys.executable, "-m", "pyengine", "serve", "--port", str(port), "--parallel", str(slots),
                "--n-ctx", "1024", "--log-level", "warning", "-m", str(model), "-t", str(threads)]
    from llama_cpp_tools import tool_path

    return [str(tool_path("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(1024 * slots), "-t", str(threads), "-tb", str(threads), "--log-disable"]


def bench_engine(engine: str, model: Path, levels: list[int], args) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(server_command(engine, model, port, max(levels), args.threads),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_until_healthy(url, server, timeout=180):
            raise SystemExit(f"bench_server: {engine} did not start")
        name = asyncio.run(warm_up(url))
        # --rounds passes over the levels, one round each, so that a slow minute of a shared machine
        # touches every level alike; a level's row is its median round, with every round's tok/s and
        # the median over passes of its tok/s over the same pass's one client (the scaling).
        passes: list[dict[int, dict]] = []
        for _ in range(args.rounds):
            passes.append({})
            for c in levels:
                before = engine_counters(url)
                r = asyncio.run(run_round(url, name, c, args.requests, args.max_tokens, args.system))
                r["engine_passes"] = engine_share(before, engine_counters(url), r["seconds"])
                passes[-1][c] = r
                e = r["engine_passes"]
                print(f"  {engine}, {c} clients: {r['tokens_per_s']:.1f} tok/s"
                      + (f"; {e['steps']} passes of {e['rows_per_step']:.1f} rows, {e['ms_per_step']:.2f} ms each, "
                         f"{e['busy_share']:.0%} of the wall" if e else ""), file=sys.stderr)
        rows = []
        for c in levels:
            rounds = sorted((p[c] for p in passes), key=lambda r: r["tokens_per_s"])
            row = {"engine": engine, **rounds[(len(rounds) - 1) // 2],
                   "tokens_per_s_rounds": [p[c]["tokens_per_s"] for p in passes]}
            if 1 in levels:
                row["scaling_over_one_client"] = statistics.median(
                    p[c]["tokens_per_s"] / p[1]["tokens_per_s"] for p in passes)
            rows.append(row)
        reuse = {"engine": engine, **asyncio.run(prefix_reuse(url, name))}
        print(f"  {engine}, second turn TTFT / first: {reuse['ratio']:.2f}", file=sys.stderr)
        return rows, reuse
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("-c", "--clients", default="1,4,8", help="concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="passes over the levels; each level reports its median round (the lower middle one for an even count)")
    p.add_argument("--system-prompt-tokens", type=int, default=0,
                   help="give every request the same system prompt of about this many tokens (0: none)")
    p.add_argument("--engines", default="pyengine,llama.cpp")
    p.add_argument("--out", default=str(HERE / "results" / "server.json"))
    args = p.parse_args()
    args.system = system_prompt(args.system_prompt_tokens) if args.system_prompt_tokens > 0 else ""
    levels = [int(c) for c in args.clients.split(",")]
    sys.path.insert(0, str(HERE))
    from pyengine.default_model import find_packaged_model

    model = Path(args.model) if args.model else find_packaged_model("smollm2")
    rows, reuse = [], []
    for engine in args.engines.split(","):
        r, p2 = bench_engine(engine, model, levels, args)
        rows += r
        reuse.append(p2)

    print(f"\nmodel {model.name}, max_tokens {args.max_tokens}, {args.requests} requests per client, "
          f"system prompt of ~{args.system_prompt_tokens} tokens, "
          f"{args.threads} threads, {platform.machine()} with {os.cpu_count()} CPUs\n")
    print("| engine | clients | requests | tokens | total tok/s | vs 1 client | per-client tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|--------:|---------:|-------:|------------:|------------:|-----------------:|-------------:|-------------:|")
    for r in rows:
        scaling = f"{r['scaling_over_one_client']:.2f}" if "scaling_over_one_client" in r else "-"
        print(f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['completion_tokens']} | {r['tokens_per_s']:.1f} | "
              f"{scaling} | {r['per_client_tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} |")
    passes = [r for r in rows if r.get("engine_passes")]
    if passes:
        print("\n| engine | clients | forward passes | rows per pass | ms per pass | share of the wall |\n|---|---:|---:|---:|---:|---:|")
        for r in passes:
            e = r["engine_passes"]
            print(f"| {r['engine']} | {r['clients']} | {e['steps']} | {e['rows_per_step']:.1f} | {e['ms_per_step']:.2f} | "
                  f"{e['busy_share']:.0%} |")
    print("\n| engine | first turn TTFT (s) | second turn TTFT (s) | ratio |\n|---|---:|---:|---:|")
    for p2 in reuse:
        print(f"| {p2['engine']} | {p2['first_turn_ttft_s']:.3f} | {p2['second_turn_ttft_s']:.3f} | {p2['ratio']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model.name, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
                               "rounds": args.rounds, "system_prompt_tokens": args.system_prompt_tokens,
                               "threads": args.threads, "cpus": os.cpu_count(), "cpu": cpu_model(),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows,
                               "prefix_reuse": reuse}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
