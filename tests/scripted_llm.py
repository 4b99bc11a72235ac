"""A scripted OpenAI-compatible chat server for tests, on 127.0.0.1 (FastAPI + uvicorn in a
thread): deterministic answers, a fixed latency, and injected faults.

Choice k of a request is ``responder(messages, body, k)`` (default: ``"echo: <last user
message>"``, with ``" #k"`` when ``n > 1``). Faults are planned per last user
message: ``server.faults[text] = ["429", "500", "slow", "malformed", "empty", "400"]`` makes
the next requests with that message fail that way, one fault each, in order; ``"always500"``
fails every time. Every request is counted (``server.requests``, ``server.by_message``).
"""


import asyncio
import threading
import time
from collections import Counter
from typing import Callable, Dict, List, Optional

from megaphi.platform import free_port

MODEL = "scripted"


def echo(messages: List[Dict[str, str]], body: dict, k: int) -> str:
    return "echo: " + messages[-1]["content"] + (f" #{k}" if int(body.get("n") or 1) > 1 else "")


class ScriptedLLM:
    def __init__(self, responder: Callable[[list, dict, int], str] = echo, latency_s: float = 0.0,
                 slow_s: float = 5.0, model: str = MODEL):
        self.responder, self.latency_s, self.slow_s = responder, latency_s, slow_s
        self.model = model
        self.faults: Dict[str, List[str]] = {}
        self.requests = 0
        self.by_message: Counter = Counter()
        self.in_flight = self.max_in_flight = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._server = None
        self._thread: Optional[threading.Thread] = None

    def app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, PlainTextResponse

        app = FastAPI()

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": self.model, "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            messages = body["messages"]
            last = messages[-1]["content"]
            self.requests += 1
            self.by_message[last] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                planned = self.faults.get(last)
                fault = None
                if planned:
                    fault = planned[0] if planned[0] == "always500" else planned.pop(0)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if fault == "429":
                    return JSONResponse({"error": {"message": "rate limited"}}, 429,
                                        headers={"retry-after": "0"})
                if fault in ("500", "always500"):
                    return JSONResponse({"error": {"message": "boom"}}, 500)
                if fault == "400":
                    return JSONResponse({"error": {"message": "bad request"}}, 400)
                if fault == "slow":
                    await asyncio.sleep(self.slow_s)
                if fault == "malformed":
                    return PlainTextResponse("this is not JSON", 200,
                                             media_type="application/json")
                n = int(body.get("n") or 1)
                texts = [self.responder(messages, body, k) for k in range(n)]
                if fault == "empty":
                    texts = [None] * n
                return {"id": f"cmpl-{self.requests}", "object": "chat.completion",
                        "created": int(time.time()), "model": self.model,
                        "choices": [{"index": k, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": t}}
                                    for k, t in enumerate(texts)],
                        "usage": {"prompt_tokens": len(last.split()),
                                  "completion_tokens": sum(len((t or "").split())
                                                           for t in texts),
                                  "total_tokens": 0}}
            finally:
                self.in_flight -= 1

        return app

    def __enter__(self) -> "ScriptedLLM":
        import uvicorn

        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, log_level="error",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("the scripted server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
