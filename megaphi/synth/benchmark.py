"""How close the synthetic-data client comes to the concurrency bound.

A local OpenAI-compatible server (its own process, FastAPI + uvicorn on 127.0.0.1) answers
every chat request after a fixed ``latency``. With ``concurrency`` requests in flight the best
possible throughput is ``concurrency / latency`` requests per second; the benchmark sends
``requests`` distinct requests through :class:`~megaphi.synth.client.ChatClient` (no cache)
and reports the measured throughput, its fraction of that bound, the mean number of requests
in flight (throughput x latency, Little's law) and their peak as both the client and the
server counted them. Enough rounds (``requests = rounds x concurrency``) amortise opening the
connections of the first round.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, Sequence


def delayed_app(latency_s: float):
    """The server: every chat completion answers ``"ok"`` after ``latency_s``."""
    from fastapi import FastAPI

    app = FastAPI()
    state = {"in_flight": 0, "max_in_flight": 0, "requests": 0}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "delayed", "object": "model"}]}

    @app.get("/stats")
    def stats():
        return state

    @app.post("/stats/reset")
    def reset():
        state.update(in_flight=0, max_in_flight=0, requests=0)
        return state

    @app.post("/v1/chat/completions")
    async def chat():
        state["requests"] += 1
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(latency_s)
        finally:
            state["in_flight"] -= 1
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "delayed",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


def serve(port: int, latency_s: float) -> None:
    import uvicorn

    uvicorn.run(delayed_app(latency_s), host="127.0.0.1", port=port, log_level="error",
                access_log=False, backlog=4096)


class DelayedServer:
    """:func:`serve` in a child process (its own interpreter: the client's event loop does not
    share a GIL with it)."""

    def __init__(self, latency_s: float):
        from megaphi.platform import free_port

        self.port, self.latency_s = free_port(), latency_s
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "DelayedServer":
        code = f"from megaphi.synth.benchmark import serve; serve({self.port}, {self.latency_s})"
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.time() + 60
        while True:
            try:
                self.get("/stats")
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the delayed server did not start") from None
                time.sleep(0.1)

    def get(self, path: str, method: str = "GET") -> dict:
        request = urllib.request.Request(self.url + path, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure(server: DelayedServer, concurrency: int, requests: int) -> Dict[str, float]:
    """Send ``requests`` distinct requests at ``concurrency``; the figures of one run."""
    from megaphi.synth.client import ChatClient, Sampling

    server.get("/stats/reset", "POST")
    client = ChatClient(server.url + "/v1", "delayed", api_key_env=None,
                        concurrency=concurrency, max_retries=0, timeout_s=60)

    async def go():
        try:
            start = time.perf_counter()
            replies = await asyncio.gather(*[
                client.chat([{"role": "user", "content": f"request {i}"}], Sampling())
                for i in range(requests)])
            return time.perf_counter() - start, replies
        finally:
            await client.close()

    elapsed, replies = asyncio.run(go())
    failed = sum(not r.ok for r in replies)
    bound = concurrency / server.latency_s
    throughput = requests / elapsed
    return {"concurrency": concurrency, "requests": requests, "failed": failed,
            "seconds": round(elapsed, 3), "throughput": round(throughput, 2),
            "bound": round(bound, 2), "fraction_of_bound": round(throughput / bound, 4),
            "mean_in_flight": round(throughput * server.latency_s, 2),  # Little's law
            "client_max_in_flight": client.stats.max_in_flight,
            "server_max_in_flight": server.get("/stats")["max_in_flight"]}


def run(latency_s: float = 0.25, concurrencies: Sequence[int] = (1, 8, 64),
        rounds: int = 32) -> List[Dict[str, float]]:
    """:func:`measure` at each concurrency, ``rounds * concurrency`` requests each (at least
    16), after a warm-up."""
    with DelayedServer(latency_s) as server:
        measure(server, 4, 8)  # warm-up: imports, connections
        return [measure(server, c, max(16, rounds * c)) for c in concurrencies]


__all__ = ["DelayedServer", "delayed_app", "measure", "run", "serve"]
