"""`pyengine serve`: an OpenAI-compatible HTTP server (needs `pip install 'pyengine[server]'`).

    pyengine serve -m model.gguf --port 8000 --parallel 4

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with
`"stream": true` as server-sent events), GET /health. See `scheduler` for how concurrent requests
share the model and `app` for the API's shapes and errors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["build_server", "main", "wait_until_healthy"]


def wait_until_healthy(url: str, process, timeout: float = 120.0) -> bool:
    """Poll `url`/health until it answers 200 (True), or `process` (a Popen) exits or `timeout` seconds
    pass (False). For scripts and tests that start an OpenAI-compatible server in a subprocess."""
    import time

    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def build_server(model: str | Path | None = None, n_ctx: int = 2048, parallel: int = 4, queue_size: int = 16,
                 api_key: str | None = None, threads: int | None = None, max_body_bytes: int = 1 << 20,
                 max_tokens_cap: int | None = None, prefill_chunk: int = 128, llm=None, n_gpu_layers: int | str = 0,
                 use_mmap: bool = True, kv_type: str = "f16"):
    """(app, scheduler): the FastAPI app and the engine behind it. `llm`: serve these loaded weights
    instead of loading `model` (several servers can share them)."""
    from ..default_model import resolve_model
    from ..engine import offload
    from ..llm import LLM
    from ..tokenizer import Tokenizer
    from .app import ServerConfig, create_app
    from .scheduler import Scheduler

    if llm is None:
        # The slots get their own contexts; this one only holds the weights, so it is tiny.
        llm = LLM(resolve_model(None if model is None else str(model)), n_ctx=16, n_threads=threads,
                  use_mmap=use_mmap)
        # Offload planned for the slots' contexts (n_ctx each, `parallel` of them), made below.
        llm.offload_plan = offload(llm._model, n_gpu_layers, n_ctx, parallel, 512, kv_type)
    tokenizer = Tokenizer.from_metadata(llm.metadata)
    scheduler = Scheduler(llm, tokenizer, parallel=parallel, queue_size=queue_size, n_ctx=n_ctx,
                          prefill_chunk=prefill_chunk, kv_type=kv_type)
    config = ServerConfig(model_id=llm.model_path.stem, api_key=api_key or None, max_body_bytes=max_body_bytes,
                          max_tokens_cap=max_tokens_cap or scheduler.n_ctx)
    return create_app(scheduler, tokenizer, config), scheduler


def main(argv: list[str] | None = None) -> int:
    from ..commands.chat import add_gpu_args, add_mmap_arg, positive_int

    p = argparse.ArgumentParser(prog="pyengine serve", description="OpenAI-compatible HTTP server.")
    p.add_argument("-m", "--model", help="GGUF file, folder or model name (default: the default model, see pyengine chat --help)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("-c", "--n-ctx", type=int, default=2048, help="context length of each slot, in tokens")
    add_gpu_args(p)
    add_mmap_arg(p)
    p.add_argument("-t", "--threads", type=positive_int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("-np", "--parallel", type=int, default=4, help="requests generated at once (slots)")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting for a slot before 503s")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask (default n_ctx)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body size cap")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens evaluated per scheduling step")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)

    import uvicorn

    from .._C import EngineError
    from ..default_model import ModelNotFoundError

    if args.parallel < 1 or args.queue_size < 0 or args.n_ctx < 1:
        print("pyengine serve: --parallel and --n-ctx must be >= 1, --queue-size >= 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        app, scheduler = build_server(args.model, args.n_ctx, args.parallel, args.queue_size, args.api_key,
                                      args.threads, args.max_body_bytes, args.max_tokens, args.prefill_chunk,
                                      n_gpu_layers=args.n_gpu_layers, use_mmap=args.use_mmap, kv_type=args.kv_type)
    except (ModelNotFoundError, FileNotFoundError, EngineError, ValueError) as e:
        print(f"pyengine serve: {e}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"pyengine serve: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    print(f"pyengine serve: {Path(scheduler.slots[0].llm.model_path).name} on http://{args.host}:{args.port}/v1 with {args.parallel} slots of "
          f"{scheduler.n_ctx} tokens", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        scheduler.close()
    return 0
