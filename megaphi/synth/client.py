"""The client of the synthetic-data workflows: chat requests to any OpenAI-compatible endpoint
(vLLM, SGLang, a hosted API, ``megaphi-serve``) through the ``openai`` package, async.

- **Concurrency**: at most ``concurrency`` requests in flight (a semaphore); the client counts
  the requests in flight and their peak.
- **Retries**: 429, 5xx, timeouts, connection errors and malformed responses (no choices, no
  message text, a body that is not the API's JSON) are retried up to ``max_retries`` times
  with exponential backoff and full jitter (``uniform(0, min(backoff_max, backoff_base *
  2**attempt))``, at least the server's ``Retry-After``). Other 4xx (a bad request, a wrong
  key) are permanent. A request that still fails returns a :class:`Reply` with ``ok=False``
  and its error: never dropped, never an empty answer.
- **Cache**: successful responses go to a :class:`~megaphi.synth.cache.RequestCache` keyed by
  model, sampling parameters and messages; a rerun reads them back without a request.
- **Secrets**: the API key is read from an environment variable (``api_key_env``) and never
  logged, stored or put in a record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from megaphi.synth.cache import RequestCache, request_key

logger = logging.getLogger("megaphi.synth")


class SynthError(ValueError):
    """A problem to report in one line before work starts (bad endpoint, model, template)."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of a request (all part of the cache key)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    n: int = 1
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise SynthError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SynthError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.n < 1:
            raise SynthError(f"max_tokens and n must be >= 1, got {self.max_tokens}, {self.n}")

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Reply:
    """The outcome of one request."""

    ok: bool
    texts: List[str] = field(default_factory=list)
    """The choices' message texts, in choice order (``n`` of them)."""
    error: Optional[str] = None
    """Why it failed, after ``attempts`` tries (``ok=False`` only)."""
    attempts: int = 0
    """Requests made (0 when the answer came from the cache)."""
    cached: bool = False
    usage: Dict[str, int] = field(default_factory=dict)
    """``prompt_tokens`` and ``completion_tokens`` as the endpoint reported them."""
    raw: Optional[Dict[str, Any]] = None
    """The response body as received."""

    @property
    def text(self) -> str:
        return self.texts[0]


class Malformed(Exception):
    """A response that is not a usable chat completion."""


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    cache_hits: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatClient:
    """Async chat completions with a concurrency cap, retries and a cache.

    Args:
        endpoint: the base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key_env: the environment variable holding the API key (none needed if unset).
        concurrency: requests in flight at most.
        max_retries: retries of a transient failure (so ``max_retries + 1`` attempts).
        timeout_s: one attempt's time limit.
        cache: the request cache, or None.
        backoff_base, backoff_max: the backoff's first step and cap, in seconds.
        seed: seeds the jitter (reproducible test timings).
    """

    def __init__(self, endpoint: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 concurrency: int = 16, max_retries: int = 5, timeout_s: float = 120.0,
                 cache: Optional[RequestCache] = None, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, seed: Optional[int] = None):
        from openai import AsyncOpenAI

        if concurrency < 1 or max_retries < 0:
            raise SynthError(f"concurrency must be >= 1 and max retries >= 0, got "
                             f"{concurrency}, {max_retries}")
        key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.endpoint, self.model = endpoint, model
        http = _http_client(concurrency)
        self._client = AsyncOpenAI(base_url=endpoint, api_key=key or "none", timeout=timeout_s,
                                   max_retries=0, http_client=http)
        self.concurrency, self.max_retries = concurrency, max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.cache = cache
        self.stats = ClientStats()
        self._semaphore: Optional[asyncio.Semaphore] = None
        self._rng = random.Random(seed)

    def __repr__(self) -> str:  # never the key
        return f"ChatClient({self.endpoint!r}, model={self.model!r})"

    async def check(self) -> None:
        """Fail early, in one line, when the endpoint is unreachable or lacks the model."""
        import openai

        try:
            models = [m.id for m in (await self._client.models.list()).data]
        except openai.AuthenticationError:
            raise SynthError(f"--endpoint {self.endpoint} refused the API key; set the right "
                             "key in the API key variable (--api-key-env)") from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise SynthError(f"--endpoint {self.endpoint} is unreachable ({exc}); start the "
                             "server or fix the URL") from None
        except openai.APIStatusError as exc:
            logger.warning("%s/models answered HTTP %s; the model name is not checked",
                           self.endpoint, exc.status_code)
            return
        if models and self.model not in models:
            raise SynthError(f"--model {self.model!r} is not served by {self.endpoint}; it "
                             f"serves {', '.join(models)}")

    async def chat(self, messages: List[Dict[str, str]], sampling: Sampling) -> Reply:
        """One chat completion (``sampling.n`` choices), from the cache when it has it."""
        params = sampling.to_dict()
        key = request_key(self.model, params, messages)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return Reply(True, hit["texts"], attempts=0, cached=True,
                             usage=hit.get("usage", {}), raw=hit.get("raw"))
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        async with self._semaphore:
            reply = await self._with_retries(messages, params)
        if reply.ok and self.cache is not None:
            self.cache.put(key, self.model, {"texts": reply.texts, "usage": reply.usage,
                                             "raw": reply.raw})
        if not reply.ok:
            self.stats.failures += 1
        return reply

    async def _with_retries(self, messages, params) -> Reply:
        import openai

        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            wait = None
            try:
                texts, usage, raw = await self._attempt(messages, params)
                return Reply(True, texts, attempts=attempt + 1, usage=usage, raw=raw)
            except openai.RateLimitError as exc:
                error, wait = f"HTTP 429: {_message(exc)}", _retry_after(exc)
            except openai.InternalServerError as exc:
                error = f"HTTP {exc.status_code}: {_message(exc)}"
            except openai.APITimeoutError:
                error = "timed out"
            except openai.APIConnectionError as exc:
                error = f"connection error: {exc}"
            except openai.APIStatusError as exc:  # other 4xx: retrying cannot help
                return Reply(False, error=f"HTTP {exc.status_code}: {_message(exc)}",
                             attempts=attempt + 1)
            except (Malformed, openai.APIResponseValidationError, ValueError) as exc:
                error = f"malformed response: {exc}"
            if attempt < self.max_retries:
                delay = self._rng.uniform(0, min(self.backoff_max,
                                                 self.backoff_base * 2 ** attempt))
                await asyncio.sleep(max(delay, wait or 0.0))
        return Reply(False, error=error, attempts=self.max_retries + 1)

    async def _attempt(self, messages, params):
        from openai.types.chat import ChatCompletion

        extra = {"n": params["n"]} if params.get("n", 1) != 1 else {}
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        body = {"model": self.model, "messages": messages, **{
            k: params[k] for k in ("temperature", "top_p", "max_tokens", "seed") if k in params},
            **extra}
        try:  # the client's plain POST: create() re-validates the typed body (~1 ms a request)
            response = await self._client.post("/chat/completions", body=body,
                                               cast_to=ChatCompletion)
        finally:
            stats.in_flight -= 1
        choices = sorted(getattr(response, "choices", None) or [], key=lambda c: c.index)
        if len(choices) != params.get("n", 1):
            raise Malformed(f"{len(choices)} choices for n={params.get('n', 1)}")
        texts = []
        for choice in choices:
            content = getattr(getattr(choice, "message", None), "content", None)
            if not isinstance(content, str):
                raise Malformed(f"choice {choice.index} has no message text")
            texts.append(content)
        usage = {}
        if getattr(response, "usage", None) is not None:
            usage = {"prompt_tokens": int(response.usage.prompt_tokens or 0),
                     "completion_tokens": int(response.usage.completion_tokens or 0)}
            stats.prompt_tokens += usage["prompt_tokens"]
            stats.completion_tokens += usage["completion_tokens"]
        return texts, usage, response.model_dump()

    async def close(self) -> None:
        await self._client.close()


def _http_client(connections: int):
    """The openai client's HTTP client with as many pooled connections as requests in flight
    (its pool scans every connection for every queued request); None (the default client) where
    this openai version does not expose its limits type."""
    try:
        from openai import DefaultAsyncHttpxClient
        from openai._constants import DEFAULT_CONNECTION_LIMITS
    except ImportError:
        return None
    limits = type(DEFAULT_CONNECTION_LIMITS)(max_connections=connections,
                                             max_keepalive_connections=connections)
    return DefaultAsyncHttpxClient(limits=limits)


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(exc, "message", exc))


def _retry_after(exc) -> Optional[float]:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None


__all__ = ["ChatClient", "ClientStats", "Reply", "Sampling", "SynthError"]
