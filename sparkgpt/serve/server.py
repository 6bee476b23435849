"""Running the server: the engine built in the background, the app (`api.py`) in front of it, uvicorn serving it."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import uvicorn

from sparkgpt.errors import SparkGPTError
from sparkgpt.lm import LM
from sparkgpt.rag.index import Index
from sparkgpt.serve.api import create_app
from sparkgpt.serve.embeddings import Pooler
from sparkgpt.serve.engine import Engine

DEFAULT_CONTEXT = 4096  # tokens per slot at most by default (each slot holds a whole sequence): bounds memory


def start_serving(lm: LM, max_slots: int = 8, max_queue: int = 64, context: int | None = None,
                  prefill_chunk: int = 256) -> Engine | Pooler:
    """What serves `lm`: a running Engine for a model that generates (it also embeds, with the engine's model), or
    for an encoder (minilm-l6), which cannot generate, a Pooler alone: /v1/embeddings only."""
    if getattr(lm.config, "architecture", "decoder") == "encoder":
        return Pooler(lm)
    engine = Engine(lm, max_slots=max_slots, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    context=context or min(lm.config.max_seq_len, DEFAULT_CONTEXT))
    return engine.start()


def serve(
    load_lm: Callable[[], LM], model_name: str, host: str = "127.0.0.1", port: int = 8000,
    api_key: str | None = None, max_slots: int = 8, max_queue: int = 64, context: int | None = None,
    prefill_chunk: int = 256, threads: int | None = None, log_level: str = "info", index: Index | None = None,
    k: int = 4,
) -> None:
    """Serve the LM that `load_lm` returns, as `model_name`, over the OpenAI-compatible HTTP API (with the chat
    page at /) on http://host:port until interrupted.

    The port is bound at once: /health answers 503 while the model loads in a background thread, 200 once the
    engine runs. max_slots sequences are decoded together, max_queue requests may wait for a slot, each slot holds
    `context` tokens (default: the model's context, at most 4096), `threads` sets torch's CPU threads. An encoder
    model serves /v1/embeddings only. With an `index` (`Index.load`), chat replies are grounded in its `k` best
    chunks and return them as "sources". Raises SparkGPTError when the model fails to load (the server then shuts
    down) or the port cannot be bound."""

    def load_engine() -> Engine | Pooler:
        if threads is not None:
            torch.set_num_threads(threads)
        lm = load_lm()
        if index is not None and getattr(lm.config, "architecture", "decoder") == "encoder":
            raise SparkGPTError(f"--index grounds chat replies, and {model_name} is an encoder model, which cannot "
                                "chat; serve a decoder model with --index")
        served = start_serving(lm, max_slots=max_slots, max_queue=max_queue, context=context,
                               prefill_chunk=prefill_chunk)
        if isinstance(served, Engine):
            what = f"{max_slots} slots of {served.context} tokens, {served.device}"
            if index is not None:
                what += f", grounded in {index.directory} ({len(index)} chunks, k={k})"
        else:
            what = f"embeddings only: an encoder, {served.device}"
        print(f"sparkgpt: serving {model_name} on http://{host}:{port} ({what})", file=sys.stderr, flush=True)
        return served  # `lm` goes now: the engine keeps its own model, not the caller's

    server: uvicorn.Server | None = None

    def stop_server(message: str) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(model_name, load_engine, api_key=api_key, on_load_error=stop_server, index=index, k=k)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if app.state.serve.load_error is not None:
        raise SparkGPTError(app.state.serve.load_error)
    if not server.started:
        raise SparkGPTError(f"could not serve on {host}:{port} (is the port free?)")
