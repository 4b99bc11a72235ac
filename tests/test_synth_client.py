"""The synthetic-data client against a scripted OpenAI-compatible server on 127.0.0.1:
retries of transient faults, permanent failures recorded, the SQLite cache, the concurrency
cap, early endpoint checks, and the API key kept out of everything written."""

import asyncio
import time

import pytest

from scripted_llm import MODEL, ScriptedLLM

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server():
    with ScriptedLLM(slow_s=3.0) as s:
        yield s


def client_for(server, **kw):
    from megaphi.synth.client import ChatClient

    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("seed", 0)
    return ChatClient(server.url, MODEL, api_key_env=None, **kw)


def ask(client, text, **sampling):
    from megaphi.synth.client import Sampling

    async def go():
        try:
            return await client.chat([{"role": "user", "content": text}], Sampling(**sampling))
        finally:
            await client.close()
    return asyncio.run(go())


def test_answers_carry_texts_usage_and_the_raw_body(server):
    reply = ask(client_for(server), "hello there", n=2, seed=3)
    assert reply.ok and reply.texts == ["echo: hello there #0", "echo: hello there #1"]
    assert reply.attempts == 1 and not reply.cached and reply.error is None
    assert reply.usage == {"prompt_tokens": 2, "completion_tokens": 8}
    assert reply.raw["choices"][1]["message"]["content"] == "echo: hello there #1"


def test_transient_faults_are_retried_until_an_answer(server):
    server.faults["flaky"] = ["429", "500", "malformed", "empty", "slow"]
    client = client_for(server, max_retries=5, timeout_s=1.0)
    reply = ask(client, "flaky")
    assert reply.ok and reply.text == "echo: flaky" and reply.attempts == 6
    assert client.stats.retries == 5 and client.stats.failures == 0
    assert server.by_message["flaky"] == 6


def test_permanent_faults_are_failures_with_their_error(server):
    server.faults["bad"] = ["400"]
    client = client_for(server, max_retries=5)
    reply = ask(client, "bad")
    assert not reply.ok and reply.texts == [] and reply.attempts == 1  # 4xx: not retried
    assert reply.error == "HTTP 400: bad request"
    server.faults["down"] = ["always500"]
    client = client_for(server, max_retries=2)
    reply = ask(client, "down")
    assert not reply.ok and reply.attempts == 3 and reply.error == "HTTP 500: boom"
    assert client.stats.failures == 1 and server.by_message["down"] == 3


def test_the_cache_answers_a_repeated_request_without_a_request(server, tmp_path):
    from megaphi.synth.cache import RequestCache

    cache = RequestCache(str(tmp_path / "cache.sqlite"))
    first = ask(client_for(server, cache=cache), "cache me", seed=1)
    before = server.requests
    again = ask(client_for(server, cache=cache), "cache me", seed=1)
    assert server.requests == before and again.cached and again.attempts == 0
    assert again.texts == first.texts and again.usage == first.usage
    ask(client_for(server, cache=cache), "cache me", seed=2)  # a new seed is a new request
    assert server.requests == before + 1
    bypass = RequestCache(str(tmp_path / "cache.sqlite"), read=False)  # --no-cache
    assert not ask(client_for(server, cache=bypass), "cache me", seed=1).cached
    assert server.requests == before + 2
    server.faults["fails"] = ["400"]
    assert not ask(client_for(server, cache=cache), "fails").ok
    assert ask(client_for(server, cache=cache), "fails").ok  # a failure is not cached
    assert len(cache) == 3


def test_requests_in_flight_never_exceed_the_concurrency(tmp_path):
    from megaphi.synth.client import Sampling

    with ScriptedLLM(latency_s=0.2) as slow:
        client = client_for(slow, concurrency=8)

        async def go():
            try:
                return await asyncio.gather(*[
                    client.chat([{"role": "user", "content": f"q{i}"}], Sampling())
                    for i in range(32)])
            finally:
                await client.close()

        start = time.perf_counter()
        replies = asyncio.run(go())
        elapsed = time.perf_counter() - start
    assert all(r.ok for r in replies) and [r.text for r in replies] == [
        f"echo: q{i}" for i in range(32)]
    assert client.stats.max_in_flight == slow.max_in_flight == 8
    assert elapsed >= 4 * 0.2  # 32 requests, 8 at a time


def test_unreachable_endpoint_or_unknown_model_fail_before_work(server):
    from megaphi.platform import free_port
    from megaphi.synth.client import ChatClient, SynthError

    async def check(url, model):
        client = ChatClient(url, model, api_key_env=None, timeout_s=5)
        try:
            await client.check()
        finally:
            await client.close()

    with pytest.raises(SynthError, match=r"--endpoint .* is unreachable .*start the server"):
        asyncio.run(check(f"http://127.0.0.1:{free_port()}/v1", MODEL))
    with pytest.raises(SynthError, match=r"--model 'gpt-9' is not served by .* it serves "
                                         r"scripted"):
        asyncio.run(check(server.url, "gpt-9"))
    asyncio.run(check(server.url, MODEL))


def test_the_api_key_is_never_written(server, tmp_path, monkeypatch):
    from megaphi.synth.cache import RequestCache
    from megaphi.synth.client import ChatClient

    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-secret-123")
    cache = RequestCache(str(tmp_path / "cache.sqlite"))
    client = ChatClient(server.url, MODEL, api_key_env="SYNTH_TEST_KEY", cache=cache)
    reply = ask(client, "with a key")
    assert reply.ok and "sk-secret-123" not in repr(client) + repr(reply)
    cache.close()
    for path in tmp_path.iterdir():
        assert b"sk-secret-123" not in path.read_bytes(), path
